//! Real Kubernetes clients against a real Flotilla server, unmodified: the `kube` crate
//! (discovery, `Api<DynamicObject>`, the runtime's watcher, server-side apply, typed core/v1
//! Events), the official Python client (tests/clients/python_client.py), kubectl (when it is on
//! the PATH), and a bounded schemathesis run over both OpenAPI documents.
//!
//! The Python tools live in target/clients-venv (`scripts/install-deps.sh test` makes it). A
//! missing tool skips its test with a printed reason, unless FLOTILLA_REQUIRE_CLIENTS=1 (set by
//! `make test`), which makes it a failure. kubectl is not installable from the registries this
//! project uses: its test skips with a reason wherever it is not on the PATH.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::{Discovery, Scope};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::json;
use support::{repo, traversable_tempdir, Server};

/// A tool of the clients' virtual environment, or why the test cannot run.
fn venv_tool(name: &str) -> Option<PathBuf> {
    let path = repo().join("target/clients-venv/bin").join(name);
    if path.exists() {
        return Some(path);
    }
    skip(&format!(
        "{} is missing: run scripts/install-deps.sh test",
        path.display()
    ));
    None
}

fn skip(reason: &str) {
    assert!(
        std::env::var("FLOTILLA_REQUIRE_CLIENTS").as_deref() != Ok("1"),
        "FLOTILLA_REQUIRE_CLIENTS=1 but {reason}"
    );
    eprintln!("skipped: {reason}");
}

/// A started server with its admin token and CA, and a kubeconfig for it.
struct Fixture {
    _dir: tempfile::TempDir,
    server: Server,
    token: String,
    ca: PathBuf,
    kubeconfig: PathBuf,
    home: PathBuf,
}

async fn fixture() -> Fixture {
    let dir = traversable_tempdir();
    let server = Server::start(dir.path());
    server.admin().await;
    let token = server.admin_token();
    let ca = server.data_dir.join("pki/ca.crt");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: flotilla\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: admin\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: flotilla\n  context: {{cluster: flotilla, user: admin, namespace: default}}\ncurrent-context: flotilla\n",
            server.url(),
            ca.display()
        ),
    )
    .unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    Fixture {
        _dir: dir,
        server,
        token,
        ca,
        kubeconfig,
        home,
    }
}

fn vm(name: &str, cpus: u32) -> serde_json::Value {
    json!({
        "apiVersion": "flotilla.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"resources": {"cpus": cpus, "memory": "64Mi"}, "image": "base"}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_crate_works_unmodified() {
    let f = fixture().await;
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&f.kubeconfig).expect("the kubeconfig reads");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();

    // Discovery finds the group, the kind and its scope.
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let group = discovery
        .groups()
        .find(|g| g.name() == "flotilla.dev")
        .expect("the flotilla.dev group is discovered");
    let (ar, caps) = group
        .recommended_resources()
        .into_iter()
        .find(|(ar, _)| ar.kind == "VirtualMachine")
        .expect("VirtualMachine is discovered");
    assert_eq!(
        (ar.plural.as_str(), caps.scope),
        ("virtualmachines", Scope::Namespaced)
    );
    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);

    // The runtime's watcher (list, then watch with bookmarks) sees what is created.
    let watched = vms.clone();
    let seen = tokio::spawn(async move {
        let stream = watcher(watched, watcher::Config::default()).default_backoff();
        let mut objects = std::pin::pin!(stream.applied_objects());
        while let Some(object) = objects.try_next().await.unwrap() {
            if object.metadata.name.as_deref() == Some("kr-watched") {
                return object;
            }
        }
        panic!("the watch ended");
    });

    // Create, get, list by label.
    let web: DynamicObject = serde_json::from_value(vm("kr-web", 1)).unwrap();
    let made = vms.create(&PostParams::default(), &web).await.unwrap();
    assert!(made.metadata.uid.is_some());
    let listed = vms
        .list(&ListParams::default().labels("app=kr-web"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    dry_runs_store_nothing(&client, group).await;
    vms.create(
        &PostParams::default(),
        &serde_json::from_value(vm("kr-watched", 1)).unwrap(),
    )
    .await
    .unwrap();
    let watched = tokio::time::timeout(Duration::from_secs(15), seen)
        .await
        .expect("the watcher sees the new VM within 15 s")
        .unwrap();
    assert_eq!(watched.data["spec"]["resources"]["cpus"], 1);

    // Server-side apply: creates, owns, conflicts with another manager, forced.
    let ssa = PatchParams::apply("kube-rs");
    let applied = vms
        .patch("kr-ssa", &ssa, &Patch::Apply(vm("kr-ssa", 2)))
        .await
        .unwrap();
    let managers: Vec<String> = applied
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(managers, ["kube-rs"]);
    let other = PatchParams::apply("other");
    match vms
        .patch("kr-ssa", &other, &Patch::Apply(vm("kr-ssa", 4)))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 409);
            assert!(
                status.message.contains(".spec.resources.cpus"),
                "{}",
                status.message
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let forced = vms
        .patch("kr-ssa", &other.force(), &Patch::Apply(vm("kr-ssa", 4)))
        .await
        .unwrap();
    assert_eq!(forced.data["spec"]["resources"]["cpus"], 4);
    // A merge patch, as kube users write them.
    let merged = vms
        .patch(
            "kr-web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "front"}}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.labels()["tier"], "front");

    // Typed core/v1 Events: the scheduler says why kr-web is not placed (no nodes).
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(10);
    let event = loop {
        let list = events
            .list(&ListParams::default().fields("involvedObject.name=kr-web"))
            .await
            .unwrap();
        if let Some(e) = list.items.into_iter().next() {
            break e;
        }
        assert!(Instant::now() < deadline, "no event for kr-web");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        event.involved_object.kind.as_deref(),
        Some("VirtualMachine")
    );
    assert_eq!(event.reason.as_deref(), Some("FailedScheduling"));

    // Deletion with a wrong uid is a conflict and deletes nothing; with the right one it goes.
    let wrong = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("not-it".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match vms.delete("kr-web", &wrong).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 409),
        other => panic!("expected a conflict, got {:?}", other.map(|_| ())),
    }
    vms.delete("kr-web", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while vms.get_opt("kr-web").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "kr-web was not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A missing object is a 404 Status.
    match vms.get("kr-web").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"))
        }
        other => panic!("expected NotFound, got {:?}", other.map(|_| ())),
    }
    drop(f.server);
}

/// Dry-run create, patch and delete answer what would be stored, and store nothing: the
/// object is as it was and a watch from before them sees no change. (VMClasses: no controller
/// writes them, so any event would be the dry runs'.)
async fn dry_runs_store_nothing(client: &kube::Client, group: &kube::discovery::ApiGroup) {
    let (ar, _) = group
        .recommended_resources()
        .into_iter()
        .find(|(ar, _)| ar.kind == "VMClass")
        .expect("VMClass is discovered");
    let classes: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let class = |name: &str, cpus: u32| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "flotilla.dev/v1alpha1", "kind": "VMClass",
            "metadata": {"name": name}, "spec": {"cpus": cpus, "memory": "1Gi"}
        }))
        .unwrap()
    };
    let small = classes
        .create(&PostParams::default(), &class("kr-small", 1))
        .await
        .unwrap();
    let before = small.metadata.resource_version.clone().unwrap();
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let would = classes.create(&dry, &class("kr-dry", 2)).await.unwrap();
    assert_eq!(would.metadata.name.as_deref(), Some("kr-dry"));
    let patched = classes
        .patch(
            "kr-small",
            &PatchParams::default().dry_run(),
            &Patch::Merge(json!({"spec": {"cpus": 8}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.data["spec"]["cpus"], 8,
        "the answer is what would be stored"
    );
    let delete = DeleteParams {
        dry_run: true,
        ..Default::default()
    };
    classes.delete("kr-small", &delete).await.unwrap();
    assert!(classes.get_opt("kr-dry").await.unwrap().is_none());
    let now = classes.get("kr-small").await.unwrap();
    assert_eq!(now.data["spec"]["cpus"], 1);
    assert_eq!(
        now.metadata.resource_version.as_deref(),
        Some(before.as_str())
    );
    let params = kube::api::WatchParams::default().timeout(2);
    let changes: Vec<_> = classes
        .watch(&params, &before)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let changes: Vec<_> = changes
        .into_iter()
        .filter(|e| !matches!(e, kube::api::WatchEvent::Bookmark(_)))
        .collect();
    assert!(changes.is_empty(), "dry runs were seen: {changes:?}");
}

#[tokio::test]
async fn the_python_kubernetes_client_works_unmodified() {
    let Some(python) = venv_tool("python") else {
        return;
    };
    let f = fixture().await;
    let out = Command::new(python)
        .arg(repo().join("tests/clients/python_client.py"))
        .env("FLOTILLA_URL", f.server.url())
        .env("FLOTILLA_CA", &f.ca)
        .env("FLOTILLA_TOKEN", &f.token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", report(&out));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}

/// Runs kubectl with the fixture's kubeconfig; its output, or a panic with it on failure.
fn kubectl(f: &Fixture, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("kubectl");
    cmd.args(args)
        .env("KUBECONFIG", &f.kubeconfig)
        .env("HOME", &f.home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let input = stdin.unwrap_or_default().to_string();
    let mut pipe = child.stdin.take().unwrap();
    std::thread::spawn(move || std::io::Write::write_all(&mut pipe, input.as_bytes()));
    child.wait_with_output().unwrap()
}

fn ok(f: &Fixture, args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(f, args, stdin);
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        report(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn report(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const WEB: &str = "apiVersion: flotilla.dev/v1alpha1
kind: VirtualMachine
metadata: {name: web}
spec: {resources: {cpus: 1, memory: 64Mi}, image: base}
";

#[tokio::test]
async fn kubectl_works_unmodified() {
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("skipped: kubectl is not on the PATH (install it to run this test)");
        return;
    }
    let f = fixture().await;
    let cpus = |f: &Fixture| {
        ok(
            f,
            &["get", "vm", "web", "-o", "jsonpath={.spec.resources.cpus}"],
            None,
        )
    };

    // kubectl version reads /version in Kubernetes' form.
    let version = ok(&f, &["version", "-o", "json"], None);
    let version: serde_json::Value = serde_json::from_str(&version).unwrap();
    assert!(version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap()
        .contains("flotilla"));
    let resources = ok(&f, &["api-resources"], None);
    assert!(resources.contains("virtualmachines") && resources.contains("events"));

    // Client-side apply with validation on (kubectl's default reads the OpenAPI document).
    assert!(ok(&f, &["apply", "-f", "-"], Some(WEB)).contains("created"));
    assert!(ok(&f, &["apply", "-f", "-"], Some(WEB)).contains("unchanged"));
    // kubectl diff is a dry-run patch: it shows the change and stores nothing.
    let two = WEB.replace("cpus: 1", "cpus: 2");
    let diff = kubectl(&f, &["diff", "-f", "-"], Some(&two));
    assert_eq!(diff.status.code(), Some(1), "{}", report(&diff));
    assert!(String::from_utf8_lossy(&diff.stdout).contains("+    cpus: 2"));
    assert_eq!(cpus(&f), "1");
    // A field kubectl does not know is refused by its validation, with the field named.
    let typo = kubectl(
        &f,
        &["apply", "-f", "-"],
        Some(&WEB.replace("cpus: 1", "cpu: 1")),
    );
    assert!(!typo.status.success());
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("cpu"),
        "{}",
        report(&typo)
    );
    // Server-side apply takes over from client-side apply, as in Kubernetes.
    assert!(
        ok(&f, &["apply", "--server-side", "-f", "-"], Some(&two)).contains("serverside-applied")
    );
    assert_eq!(cpus(&f), "2");
    // Dry runs on the server store nothing.
    ok(
        &f,
        &["label", "vm", "web", "tier=front", "--dry-run=server"],
        None,
    );
    ok(&f, &["delete", "vm", "web", "--dry-run=server"], None);
    let labels = ok(
        &f,
        &["get", "vm", "web", "-o", "jsonpath={.metadata.labels}"],
        None,
    );
    assert!(!labels.contains("tier"), "{labels}");
    // edit and replace.
    let editor = f.home.join("editor.sh");
    std::fs::write(&editor, "#!/bin/sh\nsed -i 's/cpus: 2/cpus: 3/' \"$1\"\n").unwrap();
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new("kubectl")
        .args(["edit", "vm", "web"])
        .env("KUBECONFIG", &f.kubeconfig)
        .env("HOME", &f.home)
        .env("KUBE_EDITOR", &editor)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", report(&out));
    assert_eq!(cpus(&f), "3");
    ok(
        &f,
        &["replace", "-f", "-"],
        Some(&WEB.replace("cpus: 1", "cpus: 4")),
    );
    assert_eq!(cpus(&f), "4");

    // Server-side printing: the same columns as flotilla get, wide ones with -o wide.
    let wide = ok(&f, &["get", "vm", "-o", "wide"], None);
    let header = wide.lines().next().unwrap();
    for column in ["NAME", "PHASE", "NODE", "CPUS", "AGE"] {
        assert!(header.contains(column), "{header}");
    }
    // explain reads the field descriptions; describe shows the events.
    let explain = ok(&f, &["explain", "virtualmachine.spec.resources"], None);
    assert!(explain.contains("cpus"), "{explain}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let describe = ok(&f, &["describe", "vm", "web"], None);
        if describe.contains("FailedScheduling") {
            break;
        }
        assert!(Instant::now() < deadline, "{describe}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ok(&f, &["get", "events"], None).contains("FailedScheduling"));

    // get -w streams changes; wait --for=delete returns once the object is gone.
    let mut watch = Command::new("kubectl")
        .args(["get", "vm", "-w", "--output-watch-events"])
        .env("KUBECONFIG", &f.kubeconfig)
        .env("HOME", &f.home)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    ok(
        &f,
        &["create", "-f", "-"],
        Some(&WEB.replace("name: web", "name: db")),
    );
    ok(&f, &["delete", "vm", "db", "--wait=false"], None);
    ok(
        &f,
        &["wait", "--for=delete", "vm/db", "--timeout=30s"],
        None,
    );
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !events
        .iter()
        .any(|l: &String| l.starts_with("DELETED") && l.contains("db"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => events.push(line),
            Err(_) => panic!("kubectl get -w showed {events:?}"),
        }
    }
    assert!(
        events
            .iter()
            .any(|l| l.starts_with("ADDED") && l.contains("db")),
        "{events:?}"
    );
    watch.kill().unwrap();
    watch.wait().unwrap();
}

/// Fetches an OpenAPI document of the server into `dir`.
async fn document(f: &Fixture, path: &str, dir: &Path) -> PathBuf {
    let body = f
        .server
        .http()
        .get(format!("{}{path}", f.server.url()))
        .bearer_auth(&f.token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let file = dir.join(format!("{}.json", path.replace('/', "_")));
    std::fs::write(&file, body).unwrap();
    file
}

/// schemathesis with every check over both documents: no 5xx (but the documented 504), no
/// answer the document does not state, no invalid request accepted, no valid one refused.
/// FLOTILLA_SCHEMATHESIS_EXAMPLES raises the examples per operation (default 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() {
    let Some(st) = venv_tool("st") else {
        return;
    };
    let f = fixture().await;
    // Routers and floating IPs name networks that must exist (cross-object): the hooks point
    // generated ones at these.
    let admin = f.server.admin().await;
    let nets = flotilla_types::registry::lookup("network").unwrap();
    for body in [
        json!({"metadata": {"name": "st-ext"}, "spec": {"type": "bridged", "bridge": "br-st", "cidr": "198.18.0.0/16"}}),
        json!({"metadata": {"name": "st-lan"}, "spec": {"cidr": "10.250.0.0/24"}}),
    ] {
        admin.create(nets, Some("default"), &body).await.unwrap();
    }
    // Snapshots name a qcow2 volume that must exist: the hooks point generated ones at it.
    let volumes = flotilla_types::registry::lookup("volume").unwrap();
    let volume = json!({"metadata": {"name": "st-vol"}, "spec": {"size": "16Mi"}});
    admin
        .create(volumes, Some("default"), &volume)
        .await
        .unwrap();
    // VM snapshots name a VM on a node: the hooks point generated ones at this one.
    let vms = flotilla_types::registry::lookup("vm").unwrap();
    let vm = json!({"metadata": {"name": "st-vm"}, "spec": {"nodeName": "st-node",
        "resources": {"cpus": 1, "memory": "64Mi"}, "boot": {"kernel": "/k"}}});
    admin.create(vms, Some("default"), &vm).await.unwrap();
    let scratch = traversable_tempdir();
    let examples = std::env::var("FLOTILLA_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "10".into());
    for path in [
        "/openapi/v3/apis/flotilla.dev/v1alpha1",
        "/openapi/v3/api/v1",
    ] {
        let doc = document(&f, path, scratch.path()).await;
        let started = Instant::now();
        // Run in the scratch directory: schemathesis and hypothesis keep state in the current one.
        let clients = repo().join("tests/clients");
        let out = Command::new(&st)
            .current_dir(scratch.path())
            .args(["--no-color", "--config-file"])
            .arg(clients.join("schemathesis.toml"))
            .arg("run")
            .arg(&doc)
            .args([
                "--checks",
                "all",
                "--seed",
                "1",
                "--max-examples",
                &examples,
            ])
            .env("PYTHONPATH", &clients)
            .env("FLOTILLA_URL", f.server.url())
            .env("FLOTILLA_CA", &f.ca)
            .env("FLOTILLA_TOKEN", &f.token)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis on {path}: {}",
            report(&out)
        );
        let cases = stdout
            .lines()
            .find(|l| l.contains("generated"))
            .unwrap_or("?")
            .trim()
            .to_string();
        assert!(cases.contains("passed"), "{stdout}");
        eprintln!(
            "schemathesis {path}: {cases} in {:.1} s ({examples} examples per operation)",
            started.elapsed().as_secs_f64()
        );
    }
}
