//! Tenancy on a real server: service accounts and their tokens, RBAC per project (the built-in
//! roles, bindings, escalation, SelfSubjectAccessReview) and quotas, including creates racing
//! for a quota's last units through two server replicas on one real etcd.

use std::path::Path;
use std::time::Duration;

use flotilla_server::{RunningServer, ServerConfig};
use flotilla_store::etcd_cluster::EtcdCluster;
use flotilla_store::{EtcdOptions, EtcdStore};
use flotilla_store::{RangeRequest, Store};
use serde_json::{json, Value};

const API: &str = "/apis/flotilla.dev/v1alpha1";
const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1";

/// A caller with one bearer token.
#[derive(Clone)]
struct Caller {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Caller {
    fn new(server: &RunningServer, token: &str) -> Caller {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Caller {
            http,
            base: server.url.clone(),
            token: token.to_string(),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            let content_type = if method == reqwest::Method::PATCH {
                "application/merge-patch+json"
            } else {
                "application/json"
            };
            req = req.header("content-type", content_type).body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let code = resp.status().as_u16();
        if code == 200 && path.contains("watch=true") {
            // A watch that was let in streams until its timeout: its status is the answer.
            return (code, Value::Null);
        }
        let text = resp.text().await.unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text.clone())),
        )
    }

    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (code, v) = self.call(method, path, body).await;
        assert!((200..300).contains(&code), "{method} {path}: {code} {v}");
        v
    }
}

async fn start(dir: &Path, store: Option<std::sync::Arc<dyn Store>>) -> RunningServer {
    let mut config = ServerConfig::new(dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.store = store;
    flotilla_server::start(config)
        .await
        .expect("the server starts")
}

/// A service account in `project` bound to `role` there; its token.
async fn account(admin: &Caller, project: &str, name: &str, role: &str) -> String {
    admin
        .ok(
            "POST",
            &format!("/api/v1/namespaces/{project}/serviceaccounts"),
            Some(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})),
        )
        .await;
    admin
        .ok(
            "POST",
            &format!("{RBAC}/namespaces/{project}/rolebindings"),
            Some(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": format!("{name}-{role}")},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": name}]})),
        )
        .await;
    let t = admin
        .ok(
            "POST",
            &format!("/api/v1/namespaces/{project}/serviceaccounts/{name}/token"),
            Some(json!({"spec": {"expirationSeconds": 3600}})),
        )
        .await;
    t["status"]["token"].as_str().unwrap().to_string()
}

async fn project(admin: &Caller, name: &str, quota: Value) {
    admin
        .ok(
            "POST",
            &format!("{API}/projects"),
            Some(json!({"metadata": {"name": name}, "spec": {"quota": quota}})),
        )
        .await;
}

/// An object of each project-scoped kind to create, named `name`.
fn sample(plural: &str, name: &str) -> Value {
    let meta = json!({"name": name});
    match plural {
        "virtualmachines" => {
            json!({"metadata": meta, "spec": {"resources": {"cpus": 1, "memory": "256Mi"}, "image": "img", "powerState": "Stopped"}})
        }
        "volumes" => json!({"metadata": meta, "spec": {"size": "1Gi"}}),
        "networks" => json!({"metadata": meta, "spec": {"cidr": "10.77.0.0/24"}}),
        "securitygroups" => json!({"metadata": meta, "spec": {}}),
        "images" => {
            json!({"metadata": meta, "spec": {"source": {"url": "http://127.0.0.1:1/x.qcow2"}}})
        }
        "placementpolicies" => json!({"metadata": meta, "spec": {}}),
        _ => json!({"metadata": meta}),
    }
}

/// Every kind and verb a member may use in its project and nowhere else; a viewer only reads;
/// refusals in another project read the same whether or not the object exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_viewers_are_confined_to_their_project() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), None).await;
    let admin = Caller::new(&server, &server.admin_token);
    project(&admin, "a", json!({})).await;
    project(&admin, "b", json!({})).await;
    let member = Caller::new(&server, &account(&admin, "a", "dev", "member").await);
    let viewer = Caller::new(&server, &account(&admin, "a", "auditor", "viewer").await);
    let kinds = [
        "virtualmachines",
        "volumes",
        "networks",
        "securitygroups",
        "images",
        "placementpolicies",
    ];
    // Something to find in b, made by the admin.
    for plural in kinds {
        admin
            .ok(
                "POST",
                &format!("{API}/namespaces/b/{plural}"),
                Some(sample(plural, "there")),
            )
            .await;
    }
    for plural in kinds {
        for (who, caller, writes) in [("member", &member, true), ("viewer", &viewer, false)] {
            let in_a = format!("{API}/namespaces/a/{plural}");
            let in_b = format!("{API}/namespaces/b/{plural}");
            let name = format!("{who}-{}", &plural[..3]);
            // Create, then every verb on what was made.
            let (code, v) = caller
                .call("POST", &in_a, Some(sample(plural, &name)))
                .await;
            assert_eq!(
                code == 201,
                writes,
                "{who} create {plural} in a: {code} {v}"
            );
            if !writes {
                assert_eq!(code, 403, "{v}");
                let msg = v["message"].as_str().unwrap();
                assert!(
                    msg.contains("may not create") && msg.contains(plural),
                    "{msg}"
                );
                admin.ok("POST", &in_a, Some(sample(plural, &name))).await;
            }
            let object = format!("{in_a}/{name}");
            let reads = [
                ("GET", in_a.clone()),
                ("GET", format!("{in_a}?watch=true")),
                ("GET", object.clone()),
            ];
            for (method, path) in reads {
                let (code, v) = caller.call(method, &path, None).await;
                assert_eq!(code, 200, "{who} {method} {path}: {v}");
            }
            if plural != "placementpolicies" {
                let (code, v) = caller.call("GET", &format!("{object}/status"), None).await;
                assert_eq!(code, 200, "{who} reads {plural}/status: {v}");
                let (code, v) = caller
                    .call(
                        "PATCH",
                        &format!("{object}/status"),
                        Some(json!({"status": {}})),
                    )
                    .await;
                assert_eq!(code, 403, "{who} writes {plural}/status: {v}");
            }
            let current = admin.ok("GET", &object, None).await;
            let writes_on_a = [
                ("PUT", object.clone(), Some(current)),
                (
                    "PATCH",
                    object.clone(),
                    Some(json!({"metadata": {"labels": {"x": "y"}}})),
                ),
                ("DELETE", object.clone(), None),
                ("DELETE", format!("{in_a}?labelSelector=none%3Dnone"), None),
            ];
            for (method, path, body) in writes_on_a {
                let (code, v) = caller.call(method, &path, body).await;
                if writes {
                    assert!(code < 300, "{who} {method} {path}: {code} {v}");
                } else {
                    assert_eq!(code, 403, "{who} {method} {path}: {v}");
                }
            }
            // Project b: every verb refused, and the same answer for an object that exists
            // and one that does not.
            for name in ["there", "nowhere"] {
                let object = format!("{in_b}/{name}");
                let all = [
                    ("GET", in_b.clone(), None),
                    ("GET", format!("{in_b}?watch=true"), None),
                    ("GET", object.clone(), None),
                    ("GET", format!("{object}/status"), None),
                    ("POST", in_b.clone(), Some(sample(plural, name))),
                    ("PUT", object.clone(), Some(sample(plural, name))),
                    ("PATCH", object.clone(), Some(json!({"metadata": {}}))),
                    ("DELETE", object.clone(), None),
                    ("DELETE", in_b.clone(), None),
                ];
                for (method, path, body) in all {
                    let (code, v) = caller.call(method, &path, body).await;
                    assert_eq!(code, 403, "{who} {method} {path}: {v}");
                    let msg = v["message"].as_str().unwrap();
                    assert!(
                        msg.contains("in project \"b\"") && !msg.contains("not found"),
                        "{msg}"
                    );
                }
            }
        }
    }
    // Subresources: a VM's log (the member and the viewer in a, nobody in b), a volume's content.
    admin
        .ok(
            "POST",
            &format!("{API}/namespaces/a/virtualmachines"),
            Some(sample("virtualmachines", "web")),
        )
        .await;
    for caller in [&member, &viewer] {
        let (code, v) = caller
            .call(
                "GET",
                &format!("{API}/namespaces/a/virtualmachines/web/log"),
                None,
            )
            .await;
        assert_ne!(code, 403, "the log in a: {v}");
        let (code, _) = caller
            .call(
                "GET",
                &format!("{API}/namespaces/b/virtualmachines/there/log"),
                None,
            )
            .await;
        assert_eq!(code, 403);
    }
    let (code, _) = viewer
        .call(
            "GET",
            &format!("{API}/namespaces/a/volumes/viewer-vol/data"),
            None,
        )
        .await;
    assert_eq!(code, 403, "a volume's content is not for viewers");
    let (code, _) = member
        .call(
            "GET",
            &format!("{API}/namespaces/b/volumes/there/data"),
            None,
        )
        .await;
    assert_eq!(code, 403);
    // Events of a, not of b.
    member.ok("GET", "/api/v1/namespaces/a/events", None).await;
    assert_eq!(
        member
            .call("GET", "/api/v1/namespaces/b/events", None)
            .await
            .0,
        403
    );

    // Cluster-scoped: the catalog is readable, nodes and every project's VMs are not; the
    // project list shows the caller's projects only.
    member.ok("GET", &format!("{API}/vmclasses"), None).await;
    for path in [
        format!("{API}/nodes"),
        format!("{API}/virtualmachines"),
        format!("{API}/projects/b"),
        "/metrics".to_string(),
    ] {
        let (code, v) = member.call("GET", &path, None).await;
        assert_eq!(code, 403, "{path}: {v}");
    }
    let projects = member.ok("GET", &format!("{API}/projects"), None).await;
    let names: Vec<&str> = projects["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a"]);
    member.ok("GET", &format!("{API}/projects/a"), None).await;
    assert_eq!(
        member
            .call(
                "POST",
                &format!("{API}/projects"),
                Some(json!({"metadata": {"name": "c"}}))
            )
            .await
            .0,
        403
    );

    // Members cannot grant; a project admin grants what it holds and no more.
    let binding = |name: &str, role: &str| {
        json!({"metadata": {"name": name},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
               "subjects": [{"kind": "User", "name": "carol@example.com"}]})
    };
    let bindings = format!("{RBAC}/namespaces/a/rolebindings");
    assert_eq!(
        member
            .call("POST", &bindings, Some(binding("m", "member")))
            .await
            .0,
        403
    );
    let owner = Caller::new(&server, &account(&admin, "a", "owner", "admin").await);
    owner
        .ok("POST", &bindings, Some(binding("carol", "member")))
        .await;
    let (code, v) = owner
        .call(
            "POST",
            &bindings,
            Some(binding("carol-root", "cluster-admin")),
        )
        .await;
    assert_eq!(code, 403, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("may not grant ClusterRole \"cluster-admin\""),
        "{v}"
    );
    let role = json!({"metadata": {"name": "nodes"}, "rules": [{"apiGroups": ["flotilla.dev"], "resources": ["nodes"], "verbs": ["get"]}]});
    assert_eq!(
        owner
            .call("POST", &format!("{RBAC}/namespaces/a/roles"), Some(role))
            .await
            .0,
        403
    );
    let (code, v) = owner
        .call(
            "PATCH",
            &format!("{bindings}/carol"),
            Some(json!({"roleRef": {"name": "admin"}})),
        )
        .await;
    assert_eq!(
        (code, v["details"]["causes"][0]["field"].as_str()),
        (422, Some("roleRef")),
        "{v}"
    );
    // The admin of a has no say in b.
    assert_eq!(
        owner
            .call(
                "POST",
                &format!("{RBAC}/namespaces/b/rolebindings"),
                Some(binding("x", "member"))
            )
            .await
            .0,
        403
    );

    // "May I?" answers as the API enforces.
    let can = |caller: &Caller, ns: &str, verb: &str, resource: &str, sub: &str| {
        let caller = caller.clone();
        let review = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"namespace": ns, "verb": verb, "group": "flotilla.dev", "resource": resource, "subresource": sub}}});
        async move {
            let v = caller
                .ok(
                    "POST",
                    "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                    Some(review),
                )
                .await;
            v["status"]["allowed"].as_bool().unwrap()
        }
    };
    assert!(can(&member, "a", "create", "virtualmachines", "").await);
    assert!(can(&member, "a", "get", "virtualmachines", "console").await);
    assert!(!can(&member, "b", "get", "virtualmachines", "").await);
    assert!(!can(&viewer, "a", "delete", "volumes", "").await);
    assert!(!can(&viewer, "a", "get", "virtualmachines", "console").await);
    assert!(can(&viewer, "a", "list", "volumes", "").await);
    server.shutdown().await;
}

/// Tokens are shown once, stored hashed, bounded in life, revoked one by one or all together
/// with their account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_are_hashed_revocable_and_die_with_their_account() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), None).await;
    let admin = Caller::new(&server, &server.admin_token);
    project(&admin, "ci", json!({})).await;
    let first = account(&admin, "ci", "robot", "member").await;
    let tokens = "/api/v1/namespaces/ci/serviceaccounts/robot/token";
    let second = admin.ok("POST", tokens, None).await;
    let second_id = second["metadata"]["annotations"]["flotilla.dev/token-id"]
        .as_str()
        .unwrap()
        .to_string();
    let second = second["status"]["token"].as_str().unwrap().to_string();
    assert_eq!(second_id, second.split('.').nth(1).unwrap());
    // The account lists its tokens without their secrets; the store holds no secret either.
    let sa = admin
        .ok("GET", "/api/v1/namespaces/ci/serviceaccounts/robot", None)
        .await;
    assert_eq!(sa["status"]["tokens"].as_array().unwrap().len(), 2, "{sa}");
    let all = server
        .objects
        .store()
        .range(RangeRequest::prefix("/"))
        .await
        .unwrap();
    for kv in &all.kvs {
        let text = String::from_utf8_lossy(&kv.value);
        for token in [&first, &second] {
            let secret = token.rsplit('.').next().unwrap();
            assert!(
                !text.contains(secret),
                "a token's secret is stored under {}",
                kv.key
            );
        }
    }
    // Lifetimes are bounded, with the field named.
    let (code, v) = admin
        .call(
            "POST",
            tokens,
            Some(json!({"spec": {"expirationSeconds": 60}})),
        )
        .await;
    assert_eq!(
        (code, v["details"]["causes"][0]["field"].as_str()),
        (422, Some("spec.expirationSeconds")),
        "{v}"
    );
    let robot = |t: &str| Caller::new(&server, t);
    robot(&second)
        .ok("GET", &format!("{API}/namespaces/ci/virtualmachines"), None)
        .await;
    // Revoking one token leaves the other working.
    admin
        .ok("DELETE", &format!("{tokens}?id={second_id}"), None)
        .await;
    wait_for_401(&robot(&second)).await;
    robot(&first)
        .ok("GET", &format!("{API}/namespaces/ci/virtualmachines"), None)
        .await;
    // A member may not mint tokens, not even its own.
    assert_eq!(robot(&first).call("POST", tokens, None).await.0, 403);
    // Deleting the account ends every token, and their records go with it.
    admin
        .ok(
            "DELETE",
            "/api/v1/namespaces/ci/serviceaccounts/robot",
            None,
        )
        .await;
    wait_for_401(&robot(&first)).await;
    let left = server
        .objects
        .store()
        .range(RangeRequest::prefix("/flotilla/tokens/sa-"))
        .await
        .unwrap();
    assert!(
        left.kvs.is_empty(),
        "token records left: {:?}",
        left.kvs.iter().map(|k| &k.key).collect::<Vec<_>>()
    );
    // A new account of the same name does not revive them.
    admin
        .ok(
            "POST",
            "/api/v1/namespaces/ci/serviceaccounts",
            Some(json!({"metadata": {"name": "robot"}})),
        )
        .await;
    assert_eq!(
        robot(&first)
            .call("GET", &format!("{API}/namespaces/ci/virtualmachines"), None)
            .await
            .0,
        401
    );
    // Accounts, roles, bindings and events go with their project; workloads refuse it.
    let third = admin.ok("POST", tokens, None).await["status"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    admin
        .ok(
            "POST",
            &format!("{RBAC}/namespaces/ci/roles"),
            Some(json!({"metadata": {"name": "r"}, "rules": []})),
        )
        .await;
    let vm = json!({"metadata": {"name": "keep"}, "spec": {"resources": {"cpus": 1, "memory": "256Mi"}, "image": "img", "powerState": "Stopped"}});
    admin
        .ok(
            "POST",
            &format!("{API}/namespaces/ci/virtualmachines"),
            Some(vm),
        )
        .await;
    let (code, v) = admin
        .call("DELETE", &format!("{API}/projects/ci"), None)
        .await;
    assert_eq!(code, 409, "{v}");
    assert_eq!(
        v["message"],
        "project \"ci\" is not empty (it still has virtualmachines); delete those first"
    );
    admin
        .ok(
            "DELETE",
            &format!("{API}/namespaces/ci/virtualmachines/keep"),
            None,
        )
        .await;
    admin
        .ok("DELETE", &format!("{API}/projects/ci"), None)
        .await;
    wait_for_401(&robot(&third)).await;
    let left = server
        .objects
        .store()
        .range(RangeRequest::prefix("/"))
        .await
        .unwrap();
    let about_ci: Vec<&String> = left
        .kvs
        .iter()
        .map(|k| &k.key)
        .filter(|k| k.contains("/ci/") || k.ends_with("/ci") || k.contains("/tokens/sa-"))
        .collect();
    assert!(about_ci.is_empty(), "left of project ci: {about_ci:?}");
    server.shutdown().await;
}

/// Verified tokens are trusted for 5 s without a store read (the documented revocation delay).
async fn wait_for_401(caller: &Caller) {
    for _ in 0..80 {
        let (code, _) = caller
            .call("GET", &format!("{API}/namespaces/ci/virtualmachines"), None)
            .await;
        if code == 401 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the token still works 8 s after its revocation");
}

/// Creates racing for a quota's last units through two replicas on one etcd: exactly as many
/// succeed as fit; refusals say which quota, its limit and its use; deleting frees the units.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_through_two_replicas_never_exceed_a_quota() {
    let etcd = EtcdCluster::start(1).await;
    let connect = || async {
        let store = EtcdStore::connect(EtcdOptions {
            endpoints: etcd.endpoints.clone(),
            tls: None,
        })
        .await
        .unwrap();
        std::sync::Arc::new(store) as std::sync::Arc<dyn Store>
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = start(&tmp.path().join("a"), Some(connect().await)).await;
    // Replica b shares a's CA and admin token, as the HA guide says.
    let b_dir = tmp.path().join("b");
    std::fs::create_dir_all(b_dir.join("pki")).unwrap();
    for entry in std::fs::read_dir(tmp.path().join("a/pki")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), b_dir.join("pki").join(entry.file_name())).unwrap();
    }
    std::fs::copy(tmp.path().join("a/admin.yaml"), b_dir.join("admin.yaml")).unwrap();
    let b = start(&b_dir, Some(connect().await)).await;
    let admin_a = Caller::new(&a, &a.admin_token);
    project(
        &admin_a,
        "team",
        json!({"vms": 5, "cpus": 8, "memory": "4Gi"}),
    )
    .await;
    let fresh = admin_a
        .ok("GET", &format!("{API}/projects/team"), None)
        .await;
    assert_eq!(
        fresh["status"]["used"]["vms"], 0,
        "a new project shows its use: {fresh}"
    );
    let dev = account(&admin_a, "team", "dev", "member").await;
    let callers = [Caller::new(&a, &dev), Caller::new(&b, &dev)];
    let vm = |i: usize| {
        json!({"metadata": {"name": format!("vm-{i}")},
               "spec": {"resources": {"cpus": 1, "memory": "256Mi"}, "image": "img", "powerState": "Stopped"}})
    };
    let path = format!("{API}/namespaces/team/virtualmachines");
    let mut racing = Vec::new();
    for i in 0..20 {
        let (caller, path, body) = (callers[i % 2].clone(), path.clone(), vm(i));
        racing.push(tokio::spawn(async move {
            caller.call("POST", &path, Some(body)).await
        }));
    }
    let mut made = 0;
    for r in racing {
        let (code, v) = r.await.unwrap();
        match code {
            201 => made += 1,
            403 => {
                let msg = v["message"].as_str().unwrap();
                assert!(
                    msg.contains(
                        "exceeded quota of project \"team\": vms would be 6 (limit 5, used 5"
                    ),
                    "{msg}"
                );
            }
            _ => panic!("{code} {v}"),
        }
    }
    assert_eq!(made, 5, "exactly the quota's VMs were made");
    let listed = admin_a.ok("GET", &path, None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 5);
    let team = admin_a
        .ok("GET", &format!("{API}/projects/team"), None)
        .await;
    assert_eq!(team["status"]["used"]["vms"], 5);
    assert_eq!(team["status"]["used"]["cpus"], 5);
    assert_eq!(team["status"]["used"]["memory"], "1280Mi");
    // A deleted VM (no agent holds a finalizer here) frees its units at once.
    let name = listed["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    callers[1]
        .ok("DELETE", &format!("{path}/{name}"), None)
        .await;
    let team = admin_a
        .ok("GET", &format!("{API}/projects/team"), None)
        .await;
    assert_eq!(team["status"]["used"]["vms"], 4);
    // Memory is refused by its own quota, naming it.
    let big = json!({"metadata": {"name": "big"}, "spec": {"resources": {"cpus": 1, "memory": "3500Mi"}, "image": "img", "powerState": "Stopped"}});
    let (code, v) = callers[0].call("POST", &path, Some(big)).await;
    assert_eq!(code, 403);
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("memory would be 4524Mi (limit 4Gi, used 1Gi"),
        "{msg}"
    );
    callers[0].ok("POST", &path, Some(vm(100))).await;
    // Growing a VM counts as well: 5 VMs with 1 CPU each, 8 allowed.
    let grow = json!({"spec": {"resources": {"cpus": 5, "memory": "256Mi"}}});
    let (code, v) = callers[1]
        .call("PATCH", &format!("{path}/vm-100"), Some(grow))
        .await;
    assert_eq!(code, 403, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("cpus would be 9 (limit 8, used 5"),
        "{v}"
    );
    // Lowering a quota below the use refuses new units but keeps what exists.
    admin_a
        .ok(
            "PATCH",
            &format!("{API}/projects/team"),
            Some(json!({"spec": {"quota": {"vms": 2}}})),
        )
        .await;
    assert_eq!(callers[0].call("POST", &path, Some(vm(101))).await.0, 403);
    assert_eq!(
        admin_a.ok("GET", &path, None).await["items"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    b.shutdown().await;
    a.shutdown().await;
}

/// One request of a scripted session: caller, method, path, body, the expected answer, and
/// whether the audit log records it.
type Step<'a> = (&'a Caller, &'a str, String, Option<Value>, u16, bool);

/// A scripted session: every request that changed something or was refused is in the audit
/// log once, with who, what, the answer and the request's id; reads are not; no token is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_each_change_and_refusal_once_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, None).await;
    let admin = Caller::new(&server, &server.admin_token);
    project(&admin, "a", json!({})).await;
    project(&admin, "b", json!({})).await;
    let dev = account(&admin, "a", "dev", "member").await;
    let member = Caller::new(&server, &dev);
    let stranger = Caller::new(&server, "flt.nobody.0000");
    // (caller, method, path, body, expected code, recorded)
    let vms = format!("{API}/namespaces/a/virtualmachines");
    let script: Vec<Step> = vec![
        (
            &member,
            "POST",
            vms.clone(),
            Some(sample("virtualmachines", "web")),
            201,
            true,
        ),
        (&member, "GET", format!("{vms}/web"), None, 200, false),
        (&member, "GET", vms.clone(), None, 200, false),
        (
            &member,
            "PATCH",
            format!("{vms}/web"),
            Some(json!({"metadata": {"labels": {"tier": "front"}}})),
            200,
            true,
        ),
        (
            &member,
            "GET",
            format!("{API}/namespaces/b/virtualmachines"),
            None,
            403,
            true,
        ),
        (
            &member,
            "POST",
            format!("{RBAC}/namespaces/a/rolebindings"),
            Some(
                json!({"metadata": {"name": "x"}, "roleRef": {"kind": "ClusterRole", "name": "admin"}}),
            ),
            403,
            true,
        ),
        (&stranger, "GET", vms.clone(), None, 401, true),
        (
            &member,
            "POST",
            vms.clone(),
            Some(json!({"metadata": {"name": "Bad Name"}})),
            422,
            true,
        ),
        (&member, "DELETE", format!("{vms}/web"), None, 200, true),
    ];
    let mut expected = Vec::new();
    for (i, (caller, method, path, body, code, recorded)) in script.into_iter().enumerate() {
        let id = format!("step-{i}");
        let mut req = caller
            .http
            .request(method.parse().unwrap(), format!("{}{path}", caller.base))
            .bearer_auth(&caller.token)
            .header("x-request-id", &id);
        if let Some(b) = body {
            let ct = if method == "PATCH" {
                "application/merge-patch+json"
            } else {
                "application/json"
            };
            req = req.header("content-type", ct).body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), code, "{method} {path}");
        assert_eq!(
            resp.headers()["x-request-id"],
            id.as_str(),
            "the answer carries the id"
        );
        if recorded {
            expected.push((id, method, code));
        }
        if i == 0 {
            // The object agents act on carries the id of the request that made it.
            let vm = admin.ok("GET", &format!("{vms}/web"), None).await;
            assert_eq!(
                vm["metadata"]["annotations"]["flotilla.dev/request-id"],
                "step-0"
            );
        }
    }
    // A request without an id gets one.
    let resp = admin
        .http
        .get(format!("{}{API}/namespaces/a/virtualmachines", admin.base))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"].len(), 36);
    server.shutdown().await;
    // Lines reach the file through the writer's queue: wait for the last one.
    let mut text = String::new();
    for _ in 0..50 {
        text = std::fs::read_to_string(data.join("audit.log")).unwrap();
        if text.contains("\"step-8\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (id, method, code) in &expected {
        let found: Vec<&Value> = lines
            .iter()
            .filter(|l| l["requestID"] == id.as_str())
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{id} ({method}) once in the audit log:\n{text}"
        );
        let line = found[0];
        assert_eq!(line["code"], *code, "{line}");
        assert_eq!(line["source"], "127.0.0.1");
        assert!(line["time"].is_string());
        if *code == 401 {
            assert!(line["user"].is_null(), "{line}");
        } else {
            assert_eq!(line["user"], "system:serviceaccount:a:dev", "{line}");
            assert_eq!(
                line["project"],
                if *code == 403 && line["resource"] == "virtualmachines" {
                    "b"
                } else {
                    "a"
                },
                "{line}"
            );
        }
    }
    let web = lines.iter().find(|l| l["requestID"] == "step-0").unwrap();
    assert_eq!(
        (web["verb"].as_str(), web["resource"].as_str()),
        (Some("create"), Some("virtualmachines"))
    );
    let deleted = lines.iter().find(|l| l["requestID"] == "step-8").unwrap();
    assert_eq!(
        (deleted["verb"].as_str(), deleted["name"].as_str()),
        (Some("delete"), Some("web"))
    );
    for read in ["step-1", "step-2"] {
        assert!(!text.contains(read), "reads are not audited: {read}");
    }
    // The admin's setup was recorded too (its token creation among it), but no secret is.
    assert!(lines
        .iter()
        .any(|l| l["resource"] == "serviceaccounts/token" && l["user"] == "admin"));
    for secret in [&server_secret(&dev), &server_secret(&admin.token)] {
        assert!(
            !text.contains(secret.as_str()),
            "a token's secret is in the audit log"
        );
    }
}

fn server_secret(token: &str) -> String {
    token.rsplit('.').next().unwrap().to_string()
}

/// Every project-scoped kind the server serves, every verb, for a member and a viewer of project
/// a: what their role allows in a and nothing in b or in a project that does not exist. A kind
/// added later without a thought for RBAC fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_project_kind_and_verb_answers_as_the_role_says() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), None).await;
    let admin = Caller::new(&server, &server.admin_token);
    project(&admin, "a", json!({})).await;
    project(&admin, "b", json!({})).await;
    let member = Caller::new(&server, &account(&admin, "a", "dev", "member").await);
    let viewer = Caller::new(&server, &account(&admin, "a", "auditor", "viewer").await);
    let workloads = [
        "virtualmachines",
        "volumes",
        "volumesnapshots",
        "vmsnapshots",
        "networks",
        "securitygroups",
        "routers",
        "floatingips",
        "placementpolicies",
        "images",
    ];
    let readable = |plural: &str| {
        workloads.contains(&plural) || plural == "events" || plural == "serviceaccounts"
    };
    for kind in flotilla_types::registry::KINDS
        .iter()
        .filter(|k| k.namespaced)
    {
        let plural = kind.plural;
        for (who, caller, writer) in [("member", &member, true), ("viewer", &viewer, false)] {
            for project in ["a", "b", "nowhere"] {
                let base = format!("{}/namespaces/{project}/{plural}", kind.api_root());
                let body = json!({"apiVersion": kind.api_version, "kind": kind.kind, "metadata": {"name": "zz-probe"}});
                let mut asks = vec![
                    ("list", "GET", base.clone(), None, false),
                    ("watch", "GET", format!("{base}?watch=true"), None, false),
                    ("get", "GET", format!("{base}/zz-missing"), None, false),
                    ("create", "POST", base.clone(), Some(body.clone()), true),
                    (
                        "update",
                        "PUT",
                        format!("{base}/zz-missing"),
                        Some(body.clone()),
                        true,
                    ),
                    (
                        "patch",
                        "PATCH",
                        format!("{base}/zz-missing"),
                        Some(json!({})),
                        true,
                    ),
                    ("delete", "DELETE", format!("{base}/zz-missing"), None, true),
                    (
                        "deletecollection",
                        "DELETE",
                        format!("{base}?labelSelector=zz%3Dnone"),
                        None,
                        true,
                    ),
                ];
                if kind.has_status {
                    asks.push((
                        "get status",
                        "GET",
                        format!("{base}/zz-missing/status"),
                        None,
                        false,
                    ));
                    asks.push((
                        "patch status",
                        "PATCH",
                        format!("{base}/zz-missing/status"),
                        Some(json!({})),
                        true,
                    ));
                }
                for (verb, method, path, body, writes) in asks {
                    let allowed = project == "a"
                        && match verb {
                            // Every workload's status but a placement policy's; nobody but the
                            // agents and controllers writes one.
                            "get status" => {
                                workloads.contains(&plural) && plural != "placementpolicies"
                            }
                            "patch status" => false,
                            _ if writes => writer && workloads.contains(&plural),
                            _ => readable(plural),
                        };
                    let (code, v) = caller.call(method, &path, body).await;
                    if allowed {
                        assert!(
                            code != 403 && code != 401,
                            "{who} may {verb} {plural} in {project}: {code} {v}"
                        );
                    } else {
                        assert_eq!(code, 403, "{who} may not {verb} {plural} in {project}: {v}");
                        let msg = v["message"].as_str().unwrap_or_default();
                        assert!(
                            msg.contains(plural) && msg.contains(&format!("project \"{project}\"")),
                            "{msg}"
                        );
                    }
                }
            }
        }
    }
    server.shutdown().await;
}
