//! Migration benchmark (`make bench-migration`), on two real hosts (`tests/support/hosts.rs`)
//! with real tiny guests under QEMU:
//!
//! 1. 20 hops of one VM (an overlay on a cached image: incremental block migration) with the
//!    guest suspended for each copy, then 20 hops asked for live. Where QEMU < 9 runs under TCG,
//!    the agent suspends "live" copies too (such QEMU corrupts guests that migrate live), and
//!    the output says so. Per hop: the guest's downtime (QEMU's own figure when live; from the
//!    suspend to the resume otherwise) and the whole migration (API create -> Succeeded, and the
//!    agent's copy alone), p50/p99. After every hop the guest must still answer a peer's pings
//!    and its serial log must show no panic, BUG or call trace.
//! 2. Drain of a host running 10 tiny VMs: `flotilla node drain` from start to all moved.
//!
//! Time from node failure to VMs answering elsewhere is measured by the `node_failure` test
//! (it needs a host killed, which this benchmark's hosts are not). Ends with a JSON line.
//! Built with the dev profile: what it measures is QEMU's and libvirt's time, not ours.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::{json, Value};
use support::hosts::{console, Fabric};

const HOPS: usize = 20;
const DRAINED: usize = 10;

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (pct(values, 0.5), pct(values, 0.99))
}

fn healthy(log: &str) -> bool {
    !["Kernel panic", "BUG", "Call Trace"]
        .iter()
        .any(|bad| log.contains(bad))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

async fn bench() {
    let guest = support::tiny_guest();
    let mut fabric = Fabric::new("fmb", 80);
    let cluster =
        TestCluster::start_on(format!("{}:0", fabric.server_address()).parse().unwrap()).await;
    let admin = &cluster.admin;
    // Room for a dozen 1-vCPU VMs on each 2-core host (the default allows 8 vCPUs).
    for host in ["host-a", "host-b"] {
        fabric
            .add_host(&cluster, host, &["--cpu-overcommit", "16"])
            .await;
    }
    fabric.wait_ready(admin).await;
    let images = support::traversable_tempdir();
    support::guests::seedling_image(admin, images.path()).await;
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "lan"}, "spec": {"cidr": "10.10.0.0/24"}}),
        )
        .await
        .unwrap();
    let vms = lookup("vm").unwrap();
    let boot = json!({"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"});
    let create = async |name: &str, node: &str, spec: Value| -> String {
        let mut s =
            json!({"nodeName": node, "resources": {"cpus": 1, "memory": "128Mi"}, "boot": boot});
        for (k, v) in spec.as_object().unwrap() {
            s[k] = v.clone();
        }
        admin
            .create(
                vms,
                Some("default"),
                &json!({"metadata": {"name": name}, "spec": s}),
            )
            .await
            .unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The peer stays on host B (drains move host A's VMs only) and pings the hopper.
    let peer = create(
        "peer",
        "host-b",
        json!({"userData": "#cloud-config\nflotilla_test_ping: 10.10.0.10\n",
               "networks": [{"network": "lan", "ip": "10.10.0.11"}]}),
    )
    .await;
    let hopper = create(
        "hopper",
        "host-a",
        json!({"image": "seedling", "rootDisk": {"size": "32Mi"},
               "networks": [{"network": "lan", "ip": "10.10.0.10"}]}),
    )
    .await;
    let peer_log = || console(&fabric.agent_dir(1), &peer);
    let answers = || {
        peer_log()
            .lines()
            .rev()
            .find(|l| l.contains("FLOTILLA-PING 10.10.0.10 "))
            .is_some_and(|l| l.trim().ends_with("ok"))
    };
    eventually("the peer reaches the hopper", 120, async || {
        answers().then_some(())
    })
    .await;

    let kind = lookup("migration").unwrap();
    let mut report = serde_json::Map::new();
    let mut n = 0;
    for variant in ["suspended", "live"] {
        let (mut downtime, mut total, mut copy) = (Vec::new(), Vec::new(), Vec::new());
        let mut unhealthy = 0;
        let mut effective = variant.to_string();
        for hop in 0..HOPS {
            n += 1;
            let to = if n % 2 == 1 { "host-b" } else { "host-a" };
            let mut spec = json!({"vm": "hopper", "targetNode": to});
            if variant == "suspended" {
                spec["suspend"] = json!(true);
            }
            let name = format!("hop-{n}");
            let started = Instant::now();
            admin
                .create(
                    kind,
                    Some("default"),
                    &json!({"metadata": {"name": name}, "spec": spec}),
                )
                .await
                .unwrap();
            let m = eventually(&format!("{name} ends"), 120, async || {
                let m = admin.get(kind, Some("default"), &name).await.ok()?;
                matches!(m["status"]["phase"].as_str(), Some("Succeeded" | "Failed")).then_some(m)
            })
            .await;
            assert_eq!(m["status"]["phase"], "Succeeded", "{m:#}");
            total.push(started.elapsed().as_secs_f64() * 1000.0);
            downtime.push(m["status"]["downtimeMs"].as_f64().unwrap_or(f64::NAN));
            copy.push(m["status"]["durationMs"].as_f64().unwrap_or(f64::NAN));
            if variant == "live" && hop == 0 {
                let message = m["status"]["message"].as_str().unwrap_or_default();
                if message.contains("suspended for the copy") {
                    effective = "live asked, suspended by the agent (QEMU < 9 under TCG)".into();
                }
            }
            // Healthy after the hop: bound where it runs, answering, no panic.
            eventually(&format!("hopper settles on {to}"), 60, async || {
                let v = admin.get(vms, Some("default"), "hopper").await.ok()?;
                (v["status"]["nodeName"] == to && v["status"]["phase"] == "Running").then_some(())
            })
            .await;
            let dir = fabric.agent_dir(if to == "host-a" { 0 } else { 1 });
            let answered = tokio::time::timeout(Duration::from_secs(20), async {
                while !answers() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
            .is_ok();
            if !answered || !healthy(&console(&dir, &hopper)) {
                unhealthy += 1;
            }
        }
        let (d50, d99) = summary(&mut downtime);
        let (t50, t99) = summary(&mut total);
        let (c50, c99) = summary(&mut copy);
        println!(
            "{variant} ({effective}), {HOPS} hops, incremental disks: downtime p50 {d50:.0} ms p99 {d99:.0} ms; copy p50 {c50:.0} ms p99 {c99:.0} ms; API to Succeeded p50 {t50:.0} ms p99 {t99:.0} ms; unhealthy after a hop: {unhealthy}"
        );
        report.insert(
            variant.into(),
            json!({"effective": effective, "hops": HOPS, "downtime_ms_p50": d50, "downtime_ms_p99": d99,
                   "copy_ms_p50": c50, "copy_ms_p99": c99, "total_ms_p50": t50, "total_ms_p99": t99, "unhealthy": unhealthy}),
        );
    }

    // Drain host A of 10 tiny VMs (and the hopper, where the last hop left it).
    for i in 0..DRAINED {
        create(
            &format!("d{i}"),
            "host-a",
            json!({"resources": {"cpus": 1, "memory": "64Mi"}}),
        )
        .await;
    }
    eventually("the VMs to drain run", 120, async || {
        let list = admin
            .list(vms, Some("default"), &Default::default())
            .await
            .ok()?;
        let running = list["items"]
            .as_array()?
            .iter()
            .filter(|v| {
                v["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with('d'))
                    && v["status"]["phase"] == "Running"
            })
            .count();
        (running == DRAINED).then_some(())
    })
    .await;
    let config = cluster.dir.path().join("server/admin.yaml");
    let started = Instant::now();
    let out = support::cli(&config, &["node", "drain", "host-a", "--timeout", "10m"]);
    let drain = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let moved = String::from_utf8_lossy(&out.stdout)
        .matches("moved default/")
        .count();
    println!("drain of a host with {moved} VMs ({DRAINED} tiny, 64 MiB): {drain:.1} s (at most 2 migrations per node at once)");
    report.insert("drain".into(), json!({"vms": moved, "seconds": drain}));
    println!("{}", Value::Object(report));
    drop(fabric);
}
