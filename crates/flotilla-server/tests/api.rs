//! The resource API end to end: a real server over TLS, driven by the real client.

mod common;

use common::{kind, start, vm, TestServer};
use flotilla_client::{ClientError, ListParams};
use serde_json::json;

#[tokio::test]
async fn create_get_list_and_server_owned_fields() {
    let t = start().await;
    let vms = kind("vm");
    let mut body = vm("web");
    body["metadata"]["uid"] = json!("forged");
    body["status"] = json!({"phase": "Running"});
    let created = t.client.create(vms, Some("default"), &body).await.unwrap();
    assert_eq!(created["metadata"]["namespace"], "default");
    assert_ne!(created["metadata"]["uid"], "forged", "uid is the server's");
    assert_eq!(created["metadata"]["generation"], 1);
    assert!(created["metadata"]["creationTimestamp"].is_string());
    assert!(
        created.get("status").is_none(),
        "status cannot be set on create"
    );
    assert_eq!(
        created["spec"]["powerState"], "Running",
        "defaults are filled in"
    );
    let got = t.client.get(vms, Some("default"), "web").await.unwrap();
    assert_eq!(got, created);
    let list = t
        .client
        .list(vms, Some("default"), &ListParams::default())
        .await
        .unwrap();
    assert_eq!(list["kind"], "VirtualMachineList");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let again = t
        .client
        .create(vms, Some("default"), &vm("web"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(409));
    assert!(again.to_string().contains("already exists"), "{again}");
}

#[tokio::test]
async fn stale_resource_version_is_a_conflict() {
    let t = start().await;
    let vms = kind("vm");
    let v1 = t
        .client
        .create(vms, Some("default"), &vm("web"))
        .await
        .unwrap();
    let mut a = v1.clone();
    a["spec"]["resources"]["cpus"] = json!(2);
    let v2 = t
        .client
        .replace(vms, Some("default"), "web", &a)
        .await
        .unwrap();
    assert_eq!(
        v2["metadata"]["generation"], 2,
        "a spec change bumps the generation"
    );
    let mut b = v1.clone();
    b["spec"]["resources"]["cpus"] = json!(4);
    let e = t
        .client
        .replace(vms, Some("default"), "web", &b)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(409));
    assert!(e.to_string().contains("modified since you read it"), "{e}");
    assert_eq!(
        t.client.get(vms, Some("default"), "web").await.unwrap()["spec"]["resources"]["cpus"],
        2
    );
    // A no-op update writes nothing.
    let same = t
        .client
        .replace(vms, Some("default"), "web", &v2)
        .await
        .unwrap();
    assert_eq!(
        same["metadata"]["resourceVersion"],
        v2["metadata"]["resourceVersion"]
    );
}

#[tokio::test]
async fn spec_and_status_are_written_separately() {
    let t = start().await;
    let vms = kind("vm");
    t.client
        .create(vms, Some("default"), &vm("web"))
        .await
        .unwrap();
    let status =
        json!({"status": {"phase": "Running", "nodeName": "node-1", "observedGeneration": 1}});
    let s = t
        .client
        .patch(vms, Some("default"), "web", &status, true)
        .await
        .unwrap();
    assert_eq!(s["status"]["phase"], "Running");
    assert_eq!(
        s["metadata"]["generation"], 1,
        "a status write is not a spec change"
    );
    // Writing the main resource cannot change status, and a status write cannot change spec.
    let mut sneaky = s.clone();
    sneaky["status"]["phase"] = json!("Failed");
    sneaky["spec"]["resources"]["cpus"] = json!(3);
    let after = t
        .client
        .replace(vms, Some("default"), "web", &sneaky)
        .await
        .unwrap();
    assert_eq!(after["status"]["phase"], "Running");
    assert_eq!(after["spec"]["resources"]["cpus"], 3);
    let mut sneaky2 = after.clone();
    sneaky2["spec"]["resources"]["cpus"] = json!(8);
    sneaky2["status"]["phase"] = json!("Stopped");
    let after2 = t
        .client
        .replace_status(vms, Some("default"), "web", &sneaky2)
        .await
        .unwrap();
    assert_eq!(after2["spec"]["resources"]["cpus"], 3);
    assert_eq!(after2["status"]["phase"], "Stopped");
    let bad = t
        .client
        .patch(
            vms,
            Some("default"),
            "web",
            &json!({"status": {"phase": "Exploded"}}),
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(422));
    assert!(bad.to_string().contains("status.phase"), "{bad}");
}

#[tokio::test]
async fn merge_and_json_patch() {
    let t = start().await;
    let vms = kind("vm");
    t.client
        .create(vms, Some("default"), &vm("web"))
        .await
        .unwrap();
    let p = t
        .client
        .patch(
            vms,
            Some("default"),
            "web",
            &json!({"metadata": {"labels": {"app": "web"}}, "spec": {"powerState": "Stopped"}}),
            false,
        )
        .await
        .unwrap();
    assert_eq!(p["metadata"]["labels"]["app"], "web");
    assert_eq!(p["spec"]["powerState"], "Stopped");
    assert_eq!(
        p["spec"]["resources"]["cpus"], 1,
        "a merge patch keeps what it does not mention"
    );
    let stale = json!({"metadata": {"resourceVersion": "1"}, "spec": {"powerState": "Running"}});
    assert_eq!(
        t.client
            .patch(vms, Some("default"), "web", &stale, false)
            .await
            .unwrap_err()
            .code(),
        Some(409)
    );
    let resp = t
        .http()
        .patch(t.url("/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines/web"))
        .bearer_auth(t.token())
        .header("content-type", "application/json-patch+json")
        .body(r#"[{"op":"replace","path":"/spec/resources/cpus","value":2}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = t
        .http()
        .patch(t.url("/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines/web"))
        .bearer_auth(t.token())
        .header("content-type", "application/strategic-merge-patch+json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let t = start().await;
    let vms = kind("vm");
    let mut body = vm("web");
    body["metadata"]["finalizers"] = json!(["flotilla.dev/agent"]);
    t.client.create(vms, Some("default"), &body).await.unwrap();
    let (obj, gone) = t.client.delete(vms, Some("default"), "web").await.unwrap();
    assert!(!gone, "a finalizer keeps the object");
    assert!(obj["metadata"]["deletionTimestamp"].is_string());
    let still = t.client.get(vms, Some("default"), "web").await.unwrap();
    assert_eq!(still["metadata"]["generation"], 2);
    // The agent may still write status while it cleans up, but no new finalizer may be added.
    t.client
        .patch(
            vms,
            Some("default"),
            "web",
            &json!({"status": {"phase": "Deleting"}}),
            true,
        )
        .await
        .unwrap();
    let add = json!({"metadata": {"finalizers": ["flotilla.dev/agent", "other.dev/x"]}});
    let e = t
        .client
        .patch(vms, Some("default"), "web", &add, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(422));
    assert!(e.to_string().contains("finalizers"), "{e}");
    // Deleting again changes nothing.
    let (_, gone) = t.client.delete(vms, Some("default"), "web").await.unwrap();
    assert!(!gone);
    t.client
        .patch(
            vms,
            Some("default"),
            "web",
            &json!({"metadata": {"finalizers": []}}),
            false,
        )
        .await
        .unwrap();
    let e = t.client.get(vms, Some("default"), "web").await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(404),
        "removing the last finalizer deletes the object"
    );
}

#[tokio::test]
async fn selectors_and_paging() {
    let t = start().await;
    let vms = kind("vm");
    for i in 0..25 {
        let mut body = vm(&format!("vm-{i:02}"));
        body["metadata"]["labels"] = json!({"tier": if i % 2 == 0 { "web" } else { "db" }});
        if i < 5 {
            body["spec"]["nodeName"] = json!("node-a");
        }
        t.client.create(vms, Some("default"), &body).await.unwrap();
    }
    let count = |v: &serde_json::Value| v["items"].as_array().unwrap().len();
    let p = |l: &str, f: &str| ListParams {
        label_selector: (!l.is_empty()).then(|| l.to_string()),
        field_selector: (!f.is_empty()).then(|| f.to_string()),
        ..Default::default()
    };
    assert_eq!(
        count(
            &t.client
                .list(vms, Some("default"), &p("tier=web", ""))
                .await
                .unwrap()
        ),
        13
    );
    assert_eq!(
        count(
            &t.client
                .list(vms, Some("default"), &p("tier in (web,db)", ""))
                .await
                .unwrap()
        ),
        25
    );
    assert_eq!(
        count(
            &t.client
                .list(vms, Some("default"), &p("", "spec.nodeName=node-a"))
                .await
                .unwrap()
        ),
        5
    );
    assert_eq!(
        count(
            &t.client
                .list(vms, Some("default"), &p("tier=db", "spec.nodeName=node-a"))
                .await
                .unwrap()
        ),
        2
    );
    let e = t
        .client
        .list(vms, Some("default"), &p("", "spec.cpus=1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(400));
    assert!(
        e.to_string().contains("spec.nodeName"),
        "the error lists supported fields: {e}"
    );

    // Pages of 10 at one consistent revision: an object created between pages is not seen.
    let mut seen = Vec::new();
    let mut params = ListParams {
        limit: Some(10),
        ..Default::default()
    };
    let mut pages = 0;
    loop {
        let page = t.client.list(vms, Some("default"), &params).await.unwrap();
        pages += 1;
        if pages == 1 {
            t.client
                .create(vms, Some("default"), &vm("vm-00a"))
                .await
                .unwrap();
        }
        for item in page["items"].as_array().unwrap() {
            seen.push(item["metadata"]["name"].as_str().unwrap().to_string());
        }
        match page["metadata"]["continue"].as_str() {
            Some(c) => params.continue_token = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    assert!(!seen.contains(&"vm-00a".to_string()));
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "lists are ordered by name");
    // Paging with a selector fills pages with matches only.
    let page = t
        .client
        .list(
            vms,
            Some("default"),
            &ListParams {
                limit: Some(4),
                label_selector: Some("tier=db".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(count(&page), 4);
    assert!(page["metadata"]["continue"].is_string());
}

#[tokio::test]
async fn projects_scope_objects() {
    let t = start().await;
    let (vms, projects) = (kind("vm"), kind("project"));
    let e = t
        .client
        .create(vms, Some("nope"), &vm("web"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(404));
    assert!(e.to_string().contains("Project \"nope\" not found"), "{e}");
    t.client
        .create(projects, None, &json!({"metadata": {"name": "team-a"}}))
        .await
        .unwrap();
    t.client
        .create(vms, Some("team-a"), &vm("web"))
        .await
        .unwrap();
    t.client
        .create(vms, Some("default"), &vm("web"))
        .await
        .unwrap();
    let all = t
        .client
        .list(vms, None, &ListParams::default())
        .await
        .unwrap();
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        2,
        "a list across projects sees both"
    );
    let e = t.client.delete(projects, None, "team-a").await.unwrap_err();
    assert_eq!(e.code(), Some(409));
    assert!(e.to_string().contains("not empty"), "{e}");
    t.client
        .create(vms, Some("team-a"), &vm("db"))
        .await
        .unwrap();
    t.client.delete(vms, Some("team-a"), "web").await.unwrap();
    t.client.delete(vms, Some("team-a"), "db").await.unwrap();
    let (_, gone) = t.client.delete(projects, None, "team-a").await.unwrap();
    assert!(gone);
    assert_eq!(
        t.client
            .delete(projects, None, "default")
            .await
            .unwrap_err()
            .code(),
        Some(403)
    );
}

#[tokio::test]
async fn generate_name_makes_unique_names() {
    let t = start().await;
    let vms = kind("vm");
    let mut body = vm("");
    body["metadata"] = json!({"generateName": "worker-"});
    let a = t.client.create(vms, Some("default"), &body).await.unwrap();
    let b = t.client.create(vms, Some("default"), &body).await.unwrap();
    let (a, b) = (
        a["metadata"]["name"].as_str().unwrap(),
        b["metadata"]["name"].as_str().unwrap(),
    );
    assert!(a.starts_with("worker-") && a.len() == 12, "{a}");
    assert_ne!(a, b);
}

#[tokio::test]
async fn cluster_scoped_kinds() {
    let t = start().await;
    let classes = kind("vmclass");
    t.client
        .create(
            classes,
            None,
            &json!({"metadata": {"name": "small"}, "spec": {"cpus": 1, "memory": "1Gi"}}),
        )
        .await
        .unwrap();
    let got = t.client.get(classes, None, "small").await.unwrap();
    assert_eq!(got["spec"]["memory"], "1Gi");
    assert!(got["metadata"].get("namespace").is_none());
    let resp = t
        .http()
        .get(t.url("/apis/flotilla.dev/v1alpha1/namespaces/default/vmclasses/small"))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("cluster-scoped"));
}

#[tokio::test]
async fn defaults_do_not_count_as_a_spec_change() {
    let t = start().await;
    let vms = kind("vm");
    let created = t
        .client
        .create(vms, Some("default"), &vm("web"))
        .await
        .unwrap();
    assert_eq!(created["spec"]["powerState"], "Running");
    // The same spec without the defaulted field is the same spec: no write, no new generation.
    let mut again = vm("web");
    again["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"].clone();
    let after = t
        .client
        .replace(vms, Some("default"), "web", &again)
        .await
        .unwrap();
    assert_eq!(after["metadata"]["generation"], 1);
    assert_eq!(
        after["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );
}

/// A VM's binding (spec.nodeName) is set once: re-applying a manifest written before the
/// scheduler placed the VM keeps it on its node, and nobody can move it by editing the spec.
#[tokio::test]
async fn a_binding_survives_a_reapply_and_cannot_be_edited() {
    let t = start().await;
    let vms = kind("vm");
    let mut bound = vm("web");
    bound["spec"]["nodeName"] = json!("node-a");
    t.client.create(vms, Some("default"), &bound).await.unwrap();
    // `flotilla apply` of the original file: a PUT whose spec has no nodeName.
    let mut current = t.client.get(vms, Some("default"), "web").await.unwrap();
    current["spec"] = vm("web")["spec"].clone();
    let after = t
        .client
        .replace(vms, Some("default"), "web", &current)
        .await
        .unwrap();
    assert_eq!(after["spec"]["nodeName"], "node-a", "the binding stays");
    assert_eq!(after["metadata"]["generation"], 1, "nothing changed");
    // A merge patch removing it keeps it too.
    let patched = t
        .client
        .patch(
            vms,
            Some("default"),
            "web",
            &json!({"spec": {"nodeName": null}}),
            false,
        )
        .await
        .unwrap();
    assert_eq!(patched["spec"]["nodeName"], "node-a");
    // Moving it is refused, naming the field.
    let err = t
        .client
        .patch(
            vms,
            Some("default"),
            "web",
            &json!({"spec": {"nodeName": "node-b"}}),
            false,
        )
        .await
        .unwrap_err();
    let ClientError::Api(status) = err else {
        panic!("an API error")
    };
    assert_eq!(status.code, 422);
    let causes = status.details.unwrap().causes;
    assert_eq!(causes[0].field, "spec.nodeName");
    assert!(
        causes[0].message.contains("node-a"),
        "{}",
        causes[0].message
    );
    // An unbound VM can still be pinned by its owner.
    t.client
        .create(vms, Some("default"), &vm("free"))
        .await
        .unwrap();
    let pinned = t
        .client
        .patch(
            vms,
            Some("default"),
            "free",
            &json!({"spec": {"nodeName": "node-b"}}),
            false,
        )
        .await
        .unwrap();
    assert_eq!(pinned["spec"]["nodeName"], "node-b");
}

/// The cluster has one identity, made on first start and kept across restarts; clients read it
/// from /version.
#[tokio::test]
async fn the_cluster_id_is_stable_across_restarts() {
    let t = start().await;
    let version = t
        .client
        .request_json(reqwest::Method::GET, "/version", &[], None)
        .await
        .unwrap();
    let id = version["clusterID"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(t.server.cluster_id, id);
    let data = t.dir.path().join("data");
    let TestServer { server, dir, .. } = t;
    server.shutdown().await;
    let mut config = flotilla_server::ServerConfig::new(&data);
    config.listen = "127.0.0.1:0".parse().unwrap();
    let again = flotilla_server::start(config).await.unwrap();
    assert_eq!(again.cluster_id, id);
    again.shutdown().await;
    drop(dir);
}
