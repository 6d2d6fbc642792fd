//! The agent under bursts: many VMs from one new image at once (fetched once), a corrupt cache
//! entry healing itself, a VM stuck on an error it cannot fix saying so once, and a VM unbound
//! and bound again faster than its actor can finish. Real server, real agent, real qemu-img;
//! libvirt is the real libvirtd (`qemu:///system`, VMs left stopped) or the test driver.

use std::time::Duration;

use flotilla_agent::libvirt::{DomainState, Libvirt};
use flotilla_agent::AgentConfig;
use flotilla_controllers::testkit::{eventually, ImageServer, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::{json, Value};

/// Starts an agent for `node` in this process; returns its stop switch.
async fn agent(
    cluster: &TestCluster,
    node: &str,
    uri: &str,
    dir: &std::path::Path,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let mut config = AgentConfig::new(vec![cluster.server.url.clone()], node, dir);
    if !dir.join("agent.yaml").exists() {
        config.join_token = Some(cluster.join_token().await);
    }
    config.libvirt_uri = uri.into();
    // The guest suites own this host's security group rules (one agent per network namespace).
    config.firewall = false;
    config.heartbeat = Duration::from_millis(500);
    config.shutdown_timeout = Duration::from_secs(2);
    // Neither a resync nor a relist may hide a state the agent failed to act on.
    config.resync = Duration::from_secs(3600);
    config.relist = Duration::from_secs(3600);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        flotilla_agent::run(config, rx)
            .await
            .expect("the agent runs");
    });
    (stop, task)
}

fn stopped_vm(name: &str, image: &str, node: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {
        "nodeName": node, "image": image, "powerState": "Stopped",
        "resources": {"cpus": 1, "memory": "64Mi"}}})
}

fn converged(vm: &Value) -> bool {
    let want = vm["spec"]["powerState"].as_str().unwrap_or("Running");
    vm["status"]["phase"] == want
        && vm["status"]["observedGeneration"] == vm["metadata"]["generation"]
}

fn domains_of(uids: &[String]) -> usize {
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "list", "--all", "--uuid"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    uids.iter()
        .filter(|u| listed.lines().any(|l| l.trim() == u.as_str()))
        .count()
}

fn events_about(list: &Value, reason: &str) -> Vec<Value> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == reason)
        .cloned()
        .collect()
}

/// Twenty VMs from one image nobody has cached yet, applied at once: all converge, the image
/// is downloaded once, the cache holds one verified entry and nothing half-written; then a
/// corrupted entry is found by the next agent process, discarded with an event, fetched again,
/// and the VM waiting on it converges without anyone's help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_a_new_image_fetches_it_once_and_a_corrupt_entry_heals() {
    let cluster = TestCluster::start().await;
    let admin = &cluster.admin;
    let (vms, images, events) = (
        lookup("vm").unwrap(),
        lookup("image").unwrap(),
        lookup("event").unwrap(),
    );
    let server = ImageServer::start(cluster.path(), Duration::from_millis(300)).await;
    admin
        .create(
            images,
            Some("default"),
            &json!({"metadata": {"name": "fresh"}, "spec": {"source": {"url": format!("{}/fresh.qcow2", server.url)}}}),
        )
        .await
        .unwrap();
    let node = format!("burst-{}", std::process::id());
    let agent_dir = cluster.path().join("agent");
    let (stop, task) = agent(&cluster, &node, "qemu:///system", &agent_dir).await;

    // Names unique to this run: domains are named after VMs, and libvirtd outlives test runs.
    let tag = format!("{:04x}", rand::random::<u16>());
    let name = |i: usize| format!("b{tag}-{i}");
    let creates = (0..20).map(|i| {
        let vm = stopped_vm(&name(i), "fresh", &node);
        async move { admin.create(vms, Some("default"), &vm).await.unwrap() }
    });
    let burst = std::time::Instant::now();
    let created = futures::future::join_all(creates).await;
    let uids: Vec<String> = created
        .iter()
        .map(|v| v["metadata"]["uid"].as_str().unwrap().to_string())
        .collect();
    eventually("all 20 VMs are Stopped", 30, async || {
        let list = admin
            .list(vms, Some("default"), &Default::default())
            .await
            .ok()?;
        let items = list["items"].as_array()?;
        (items.len() == 20 && items.iter().all(converged)).then_some(())
    })
    .await;
    println!(
        "{{\"vms\":20,\"all_stopped_ms\":{},\"image_downloads\":{}}}",
        burst.elapsed().as_millis(),
        server.total()
    );
    assert_eq!(server.total(), 1, "the image is downloaded once");
    assert_eq!(domains_of(&uids), 20, "every VM has its domain");
    let mut cache: Vec<String> = std::fs::read_dir(agent_dir.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    cache.sort();
    assert_eq!(
        cache.len(),
        2,
        "one image and its manifest, no temporary file: {cache:?}"
    );
    assert!(
        cache[0].ends_with(".json") && cache[1].ends_with(".qcow2"),
        "{cache:?}"
    );
    let cached = agent_dir.join("images").join(&cache[1]);
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-U", "-q"])
        .arg(&cached)
        .status()
        .unwrap();
    assert!(check.success(), "the cached image is a sound qcow2");

    // The cache entry is damaged while the agent is down (a disk error, a bad copy): the next
    // agent process checks it before first use, throws it away and fetches it again.
    stop.send(true).unwrap();
    task.await.unwrap();
    std::fs::write(&cached, b"").unwrap();
    // What a download and a conversion interrupted by a crash leave behind.
    let leftovers = [
        agent_dir.join("images/0123.download"),
        agent_dir.join("images/0123.qcow2.99-0-cafe.tmp"),
    ];
    for f in &leftovers {
        std::fs::write(f, b"half").unwrap();
    }
    let (_stop, _task) = agent(&cluster, &node, "qemu:///system", &agent_dir).await;
    admin
        .create(vms, Some("default"), &stopped_vm(&name(20), "fresh", &node))
        .await
        .unwrap();
    eventually(
        "the VM created after the damage converges",
        60,
        async || converged(&admin.get(vms, Some("default"), &name(20)).await.ok()?).then_some(()),
    )
    .await;
    assert_eq!(server.total(), 2, "fetched again once");
    for f in &leftovers {
        assert!(!f.exists(), "{} is removed at start", f.display());
    }
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&cached)
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2", "the entry is whole again");
    let list = admin
        .list(events, Some("default"), &Default::default())
        .await
        .unwrap();
    let corrupt = events_about(&list, "ImageCacheCorrupt");
    assert_eq!(corrupt.len(), 1, "{list}");
    assert_eq!(corrupt[0]["involvedObject"]["name"], "fresh");
    assert_eq!(corrupt[0]["type"], "Warning");
    assert_eq!(corrupt[0]["reportingInstance"], node.as_str());

    for i in 0..=20 {
        admin.delete(vms, Some("default"), &name(i)).await.unwrap();
    }
    eventually("every VM is deleted", 60, async || {
        let list = admin
            .list(vms, Some("default"), &Default::default())
            .await
            .ok()?;
        list["items"].as_array()?.is_empty().then_some(())
    })
    .await;
    assert_eq!(domains_of(&uids), 0, "no domain is left");
}

/// A VM that cannot be provisioned (its image is not there) says so in its Ready condition, and
/// gets one Warning event however often the agent retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_vm_says_so_once() {
    let cluster = TestCluster::start().await;
    let admin = &cluster.admin;
    let (vms, images, events) = (
        lookup("vm").unwrap(),
        lookup("image").unwrap(),
        lookup("event").unwrap(),
    );
    let missing = cluster.path().join("no-such-image.qcow2");
    admin
        .create(
            images,
            Some("default"),
            &json!({"metadata": {"name": "gone"}, "spec": {"source": {"path": missing}}}),
        )
        .await
        .unwrap();
    let (_stop, _task) = agent(
        &cluster,
        "node-1",
        "test:///default",
        &cluster.path().join("agent"),
    )
    .await;
    let created = admin
        .create(vms, Some("default"), &stopped_vm("stuck", "gone", "node-1"))
        .await
        .unwrap();
    let ready = eventually("the Ready condition names the error", 30, async || {
        let vm = admin.get(vms, Some("default"), "stuck").await.ok()?;
        let cond = vm["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?
            .clone();
        (cond["reason"] == "ReconcileFailed").then_some(cond)
    })
    .await;
    assert!(
        ready["message"].as_str().unwrap().contains("no-such-image"),
        "{ready}"
    );
    // The fifth failure in a row (after 0.5 + 1 + 2 + 4 s of backoff) records the event.
    let warning = eventually("a ReconcileFailing event is recorded", 30, async || {
        let list = admin
            .list(events, Some("default"), &Default::default())
            .await
            .ok()?;
        events_about(&list, "ReconcileFailing").pop()
    })
    .await;
    assert_eq!(warning["type"], "Warning");
    assert_eq!(warning["involvedObject"]["uid"], created["metadata"]["uid"]);
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .contains("no-such-image"),
        "{warning}"
    );
    // The sixth and seventh failures (8 and 16 s later) add nothing.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let list = admin
        .list(events, Some("default"), &Default::default())
        .await
        .unwrap();
    let again = events_about(&list, "ReconcileFailing");
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0]["metadata"]["resourceVersion"], warning["metadata"]["resourceVersion"],
        "not counted again"
    );
}

/// A VM unbound and bound again (as a migration or a careless writer does) faster than its
/// actor can finish cleaning up: the agent must not drop the newer state. Before actors reported
/// their exit, the binding arrived while the old actor was finishing and was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_unbound_and_bound_again_at_once_converges() {
    let cluster = TestCluster::start().await;
    let admin = &cluster.admin;
    let vms = lookup("vm").unwrap();
    let libvirt = Libvirt::open("test:///default").await.unwrap();
    let mut config = AgentConfig::new(
        vec![cluster.server.url.clone()],
        "node-1",
        cluster.path().join("agent"),
    );
    config.join_token = Some(cluster.join_token().await);
    config.libvirt_uri = "test:///default".into();
    // No relist and no resync to the rescue: only the watch can deliver the new binding.
    config.resync = Duration::from_secs(3600);
    config.relist = Duration::from_secs(3600);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(config, libvirt.clone(), rx));
    let vm = json!({"metadata": {"name": "flip"}, "spec": {"nodeName": "node-1",
        "resources": {"cpus": 1, "memory": "64Mi"}, "boot": {"kernel": "/boot/vmlinuz"}}});
    let created = admin.create(vms, Some("default"), &vm).await.unwrap();
    let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
    let key = flotilla_server::objects::object_key(vms, Some("default"), "flip");
    let store = cluster.server.objects.store();
    for round in 0..20 {
        eventually(&format!("flip runs (round {round})"), 20, async || {
            (libvirt.state(&uid).await.ok()? == Some(DomainState::Running)
                && admin.get(vms, Some("default"), "flip").await.ok()?["status"]["phase"]
                    == "Running")
                .then_some(())
        })
        .await;
        // Unbind and bind again, straight through the store (the API keeps bindings).
        let mut stored: Value =
            serde_json::from_slice(&store.get(&key).await.unwrap().unwrap().value).unwrap();
        stored["spec"].as_object_mut().unwrap().remove("nodeName");
        stored["status"] = json!({"phase": "Pending"});
        store
            .put(&key, serde_json::to_vec(&stored).unwrap())
            .await
            .unwrap();
        stored["spec"]["nodeName"] = json!("node-1");
        store
            .put(&key, serde_json::to_vec(&stored).unwrap())
            .await
            .unwrap();
    }
}
