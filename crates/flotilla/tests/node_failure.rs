//! A node fails, for real, between two hosts (`support::hosts`): its uplink is cut, then later
//! its agent hangs (SIGSTOP). A VM with `evacuation: Restart` (diskless: nothing of it lives
//! on the node) must be destroyed on the failed node by its agent (cut off) or by the agent's
//! watchdog (hung) *before* the control plane starts it on the other host, and only after the
//! node's lease has expired plus the margin; a guest on the other host measures how long it
//! could not reach it. A VM with local disks (`evacuation: Never`) is reported NodeLost and
//! keeps running where it is. When the node is back, it removes the moved VM and does not
//! start it again. Last, a VM bound to a Node deleted for good can be deleted at once.
//!
//! Needs root, libvirtd's binaries and the tiny guest; `make test` provides them.

mod support;

use std::time::{Duration, Instant};

use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::{json, Value};
use support::hosts::{console, run, Fabric};

/// The domain's state on host `i` as `virsh domstate` says it ("" when it does not exist).
fn domstate(fabric: &Fabric, i: usize, name: &str) -> String {
    let out = fabric.in_host(i, &["virsh", "-q", "domstate", name]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn count(log: &str, line: &str) -> usize {
    log.matches(line).count()
}

/// When (since the failure) each of these first happened.
struct Moments {
    fenced: Option<Duration>,
    started_elsewhere: Option<Duration>,
    unbound: Option<Duration>,
}

/// Polls every 100 ms until `done` and the VM runs on the other host; returns when (since
/// `from`) its domain stopped on host `failed`, ran on the other, and it was unbound.
async fn watch_failover(
    fabric: &Fabric,
    admin: &flotilla_client::Client,
    vm: &str,
    failed: usize,
    from: Instant,
    done: impl Fn() -> bool,
) -> Moments {
    let mut m = Moments {
        fenced: None,
        started_elsewhere: None,
        unbound: None,
    };
    let (domain, other) = (format!("default_{vm}"), 1 - failed);
    let deadline = from + Duration::from_secs(90);
    while !(done() && m.started_elsewhere.is_some()) {
        assert!(Instant::now() < deadline, "no failover within 90 s");
        if m.fenced.is_none() && domstate(fabric, failed, &domain) != "running" {
            m.fenced = Some(from.elapsed());
        }
        if m.started_elsewhere.is_none() && domstate(fabric, other, &domain) == "running" {
            m.started_elsewhere = Some(from.elapsed());
        }
        if m.unbound.is_none() {
            let v = admin.get(lookup("vm").unwrap(), Some("default"), vm).await;
            if v.is_ok_and(|v| v["spec"]["nodeName"] != fabric_node(failed)) {
                m.unbound = Some(from.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m
}

fn fabric_node(i: usize) -> &'static str {
    ["host-a", "host-b"][i]
}

async fn vm(admin: &flotilla_client::Client, name: &str) -> Value {
    admin
        .get(lookup("vm").unwrap(), Some("default"), name)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_nodes_vms_are_fenced_there_before_they_restart_elsewhere() {
    let guest = support::tiny_guest();
    let mut fabric = Fabric::new("fnf", 79);
    let cluster =
        TestCluster::start_on(format!("{}:0", fabric.server_address()).parse().unwrap()).await;
    let admin = &cluster.admin;
    for host in ["host-a", "host-b"] {
        fabric.add_host(&cluster, host, &[]).await;
    }
    fabric.wait_ready(admin).await;
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "lan"}, "spec": {"cidr": "10.9.0.0/24"}}),
        )
        .await
        .unwrap();
    let vms = lookup("vm").unwrap();
    let boot = json!({"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"});
    let make = |name: &str, node: &str, ip: &str, extra: Value| {
        let mut spec = json!({"nodeName": node, "resources": {"cpus": 1, "memory": "128Mi"}, "boot": boot,
            "networks": [{"network": "lan", "ip": ip}]});
        json_patch_merge(&mut spec, &extra);
        json!({"metadata": {"name": name}, "spec": spec})
    };
    let mut uids = std::collections::HashMap::new();
    for (name, node, ip, extra) in [
        (
            "ha",
            "host-a",
            "10.9.0.10",
            json!({"evacuation": "Restart"}),
        ),
        (
            "pinned",
            "host-a",
            "10.9.0.12",
            json!({"rootDisk": {"size": "16Mi"}}),
        ),
        (
            "watch",
            "host-b",
            "10.9.0.11",
            json!({"userData": "#cloud-config\nflotilla_test_ping: 10.9.0.10\n"}),
        ),
    ] {
        let made = admin
            .create(vms, Some("default"), &make(name, node, ip, extra))
            .await
            .unwrap();
        uids.insert(name, made["metadata"]["uid"].as_str().unwrap().to_string());
    }
    let b_dir = fabric.agent_dir(1);
    let watch_log = || console(&b_dir, &uids["watch"]);
    let (ok, lost) = ("FLOTILLA-PING 10.9.0.10 ok", "FLOTILLA-PING 10.9.0.10 lost");
    eventually(
        "the watcher on host B reaches ha on host A",
        120,
        async || (count(&watch_log(), ok) == 1).then_some(()),
    )
    .await;
    eventually("pinned runs", 60, async || {
        (vm(admin, "pinned").await["status"]["phase"] == "Running").then_some(())
    })
    .await;

    // No disk file is ever open for writing by two QEMUs, through every step below.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = support::sample_writers(stop.clone());

    // 1. Host A is cut off from everything (its agent, libvirtd and guests go on).
    let cut = Instant::now();
    run(&[
        "ip",
        "-n",
        &fabric.namespace(0),
        "link",
        "set",
        "ul",
        "down",
    ]);
    let m = watch_failover(&fabric, admin, "ha", 0, cut, || {
        count(&watch_log(), ok) >= 2
    })
    .await;
    let answered = cut.elapsed();
    let (fenced, started, unbound) = (
        m.fenced.expect("fenced"),
        m.started_elsewhere.expect("started"),
        m.unbound.expect("unbound"),
    );
    eprintln!(
        "partition: fenced on host A after {:.1} s, taken off host A after {:.1} s, running on host B after {:.1} s, answering again after {:.1} s",
        fenced.as_secs_f64(),
        unbound.as_secs_f64(),
        started.as_secs_f64(),
        answered.as_secs_f64()
    );
    assert!(
        fenced < started,
        "host A destroyed ha before host B started it"
    );
    // The lease is 10 s and renewed every 3 s, the margin 5 s: the control plane waits at
    // least 15 s after the last renewal it saw, which was at most 3 s before the cut.
    assert!(
        unbound >= Duration::from_secs(12),
        "not moved before the lease expired plus the margin ({unbound:?})"
    );
    assert!(
        fenced <= Duration::from_secs(10),
        "fenced within the lease ({fenced:?})"
    );
    assert!(count(&watch_log(), lost) >= 1, "the watcher saw the outage");
    let ha = vm(admin, "ha").await;
    assert_eq!(ha["spec"]["nodeName"], "host-b");
    // pinned keeps running on host A, reported NodeLost.
    eventually("pinned is reported NodeLost", 30, async || {
        let p = vm(admin, "pinned").await;
        p["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "NodeLost" && c["status"] == "True")
            .then_some(())
    })
    .await;
    assert_eq!(domstate(&fabric, 0, "default_pinned"), "running");
    assert_eq!(vm(admin, "pinned").await["spec"]["nodeName"], "host-a");
    let metrics = metrics(admin).await;
    for line in [
        "flotilla_failed_node_vms{condition=\"Evacuated\"} 1",
        "flotilla_failed_node_vms{condition=\"NodeLost\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    // 2. Host A is back: it removes ha (not restarted) and pinned is no longer NodeLost.
    run(&["ip", "-n", &fabric.namespace(0), "link", "set", "ul", "up"]);
    eventually("host A removed the moved VM", 60, async || {
        (domstate(&fabric, 0, "default_ha").is_empty()
            && !fabric.agent_dir(0).join("vms").join(&uids["ha"]).exists())
        .then_some(())
    })
    .await;
    eventually("pinned is no longer NodeLost", 30, async || {
        let p = vm(admin, "pinned").await;
        (!p["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "NodeLost"))
        .then_some(())
    })
    .await;
    assert_eq!(domstate(&fabric, 1, "default_ha"), "running");
    eventually("host A reports that it was fenced", 30, async || {
        let events = admin
            .list(
                lookup("event").unwrap(),
                Some("default"),
                &Default::default(),
            )
            .await
            .ok()?;
        events["items"]
            .as_array()?
            .iter()
            .any(|e| e["reason"] == "Fenced" && e["involvedObject"]["name"] == "host-a")
            .then_some(())
    })
    .await;

    // 3. Host A's agent hangs: its watchdog fences in its place.
    let ha2 = make(
        "ha2",
        "host-a",
        "10.9.0.20",
        json!({"evacuation": "Restart"}),
    );
    admin.create(vms, Some("default"), &ha2).await.unwrap();
    eventually("ha2 runs on host A", 60, async || {
        (vm(admin, "ha2").await["status"]["phase"] == "Running").then_some(())
    })
    .await;
    let agent = fabric.agent_pid(0).expect("host A's agent runs");
    let stopped = Instant::now();
    run(&["kill", "-STOP", &agent.to_string()]);
    let m = watch_failover(&fabric, admin, "ha2", 0, stopped, || true).await;
    run(&["kill", "-CONT", &agent.to_string()]);
    let (fenced, started) = (
        m.fenced.expect("fenced"),
        m.started_elsewhere.expect("started"),
    );
    eprintln!(
        "hung agent: the watchdog fenced after {:.1} s, running on host B after {:.1} s",
        fenced.as_secs_f64(),
        started.as_secs_f64()
    );
    assert!(
        fenced < started,
        "the watchdog destroyed ha2 before host B started it"
    );
    assert!(
        fenced <= Duration::from_secs(10),
        "fenced within the lease ({fenced:?})"
    );
    eventually(
        "host A's agent, running again, removes ha2",
        60,
        async || domstate(&fabric, 0, "default_ha2").is_empty().then_some(()),
    )
    .await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, shared) = sampler.join().unwrap();
    assert!(samples > 10, "the sampler ran ({samples} samples)");
    assert_eq!(shared, None, "a disk was open for writing by two QEMUs");

    // 4. A Node deleted for good: its VMs being deleted are not held by its finalizer.
    fabric.kill_host(0);
    admin
        .delete(lookup("node").unwrap(), None, "host-a")
        .await
        .unwrap();
    admin.delete(vms, Some("default"), "pinned").await.unwrap();
    eventually(
        "pinned is deleted although its node is gone",
        30,
        async || {
            admin
                .get(vms, Some("default"), "pinned")
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    drop(fabric);
}

async fn metrics(admin: &flotilla_client::Client) -> String {
    admin
        .send(reqwest::Method::GET, "/metrics", &[], None)
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn json_patch_merge(target: &mut Value, patch: &Value) {
    if let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            t.insert(k.clone(), v.clone());
        }
    }
}
