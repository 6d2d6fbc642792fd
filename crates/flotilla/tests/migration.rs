//! VMs move between two real hosts (`support::hosts`: each its own libvirtd, virtlogd and agent
//! in namespaces of its own) with real tiny guests: a suspended live migration, a truly live
//! one, one aborted half-way by deleting its Migration, and a cold one. After every hop the
//! guest must be healthy: a value it wrote to its disk before the hop reads back after it (from
//! the disk, not the page cache), a guest on the other host still reaches it at the same
//! address, and its serial logs show no kernel panic, BUG or call trace. Meanwhile a sampler
//! checks that no disk file is ever open for writing by two QEMU processes.
//!
//! Under TCG, QEMU before 9.0 corrupts a guest that writes memory while it migrates live (see
//! the recipe; this test's health checks caught it too): there, the guest is suspended for
//! every copy, and the truly live hop runs only where QEMU is 9.0 or later, or KVM.
//!
//! Needs root, libvirtd's binaries and the tiny guest; `make test` provides them.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_client::Client;
use flotilla_client::ConsoleKind;
use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use futures::SinkExt;
use serde_json::{json, Value};
use support::hosts::{console, Fabric};
use tokio_tungstenite::tungstenite::Message;

/// Runs `lines` in the guest's shell on its serial console, one at a time, each short (busybox's
/// line editing redraws long lines into a mess) and after a Ctrl-U (clears what a previous
/// session may have left on the line); returns once `expect` shows up.
async fn in_guest(admin: &Client, vm: &str, lines: &[&str], expect: &str) {
    let mut socket = admin
        .console("default", vm, ConsoleKind::Serial)
        .await
        .unwrap();
    for line in lines {
        socket
            .send(Message::Binary(format!("\x15{line}\n").into_bytes().into()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    support::read_until(&mut socket, expect, 60).await;
}

/// Writes `value` (5 bytes) at 2 MiB into the guest's disk, synced.
async fn write_mark(admin: &Client, vm: &str, value: &str) {
    in_guest(
        admin,
        vm,
        &[
            &format!("echo {value}|dd of=/dev/vda seek=4096 conv=fsync"),
            "echo WROTE-$((1+1))",
        ],
        "WROTE-2",
    )
    .await;
}

/// Reads the mark back from the disk itself (the page cache dropped first).
async fn read_mark(admin: &Client, vm: &str, value: &str) {
    in_guest(
        admin,
        vm,
        &[
            "echo 3 >/proc/sys/vm/drop_caches",
            "M=$(dd if=/dev/vda skip=4096 count=1 2>/dev/null)",
            "echo MARK=$M",
        ],
        &format!("MARK={value}"),
    )
    .await;
}

fn assert_healthy(log: &str, what: &str) {
    for bad in ["Kernel panic", "BUG", "Call Trace"] {
        assert!(
            !log.contains(bad),
            "{what}: {bad} in the guest's log:\n{log}"
        );
    }
}

/// Why a truly live migration of a running guest is unsafe on these hosts, if it is: QEMU
/// before 9.0 under TCG can corrupt a guest that writes memory while it migrates (upstream fix
/// 03bfc2188f; KVM is not affected). Seen here: a kernel BUG (list corruption) after a 8 MiB/s
/// live copy of the tiny guest.
async fn live_is_unsafe(admin: &Client) -> Option<String> {
    let node = admin
        .get(lookup("node").unwrap(), None, "host-a")
        .await
        .unwrap();
    let info = &node["status"]["nodeInfo"];
    let version = info["qemuVersion"].as_str().unwrap_or_default().to_string();
    let major: u32 = version.split('.').next()?.parse().ok()?;
    (info["virtType"] != "kvm" && major < 9).then(|| {
        format!("QEMU {version} under TCG corrupts guests that migrate live (fixed in 9.0)")
    })
}

async fn migrate(admin: &Client, name: &str, spec: Value) -> Value {
    let kind = lookup("migration").unwrap();
    admin
        .create(
            kind,
            Some("default"),
            &json!({"metadata": {"name": name}, "spec": spec}),
        )
        .await
        .unwrap();
    eventually(&format!("migration {name} ends"), 180, async || {
        let m = admin.get(kind, Some("default"), name).await.ok()?;
        matches!(
            m["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed" | "Aborted")
        )
        .then_some(m)
    })
    .await
}

/// The VM once it is bound to `node` and its agent there reports it Running.
async fn settled_on(admin: &Client, vm: &str, node: &str) -> Value {
    eventually(&format!("{vm} runs on {node}"), 60, async || {
        let v = admin
            .get(lookup("vm").unwrap(), Some("default"), vm)
            .await
            .ok()?;
        (v["spec"]["nodeName"] == node
            && v["status"]["nodeName"] == node
            && v["status"]["phase"] == "Running"
            && v["status"].get("migration").is_none())
        .then_some(v)
    })
    .await
}

/// The domains host `i`'s libvirt has (names), as `virsh list --all` says.
fn domains(fabric: &Fabric, i: usize) -> Vec<String> {
    let out = fabric.in_host(i, &["virsh", "-q", "list", "--all", "--name"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect()
}

/// The last `FLOTILLA-PING <peer> ok|lost` line of a serial log.
fn last_ping(log: &str, peer: &str) -> Option<String> {
    log.lines()
        .rev()
        .find(|l| l.contains(&format!("FLOTILLA-PING {peer} ")))
        .map(|l| l.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_move_between_two_hosts_live_suspended_aborted_and_cold() {
    let guest = support::tiny_guest();
    let mut fabric = Fabric::new("fmg", 78);
    let cluster =
        TestCluster::start_on(format!("{}:0", fabric.server_address()).parse().unwrap()).await;
    let admin = &cluster.admin;
    for host in ["host-a", "host-b"] {
        fabric.add_host(&cluster, host, &[]).await;
    }
    let nodes = lookup("node").unwrap();
    fabric.wait_ready(admin).await;
    let images = support::traversable_tempdir();
    support::guests::seedling_image(admin, images.path()).await;
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "lan"}, "spec": {"cidr": "10.8.0.0/24"}}),
        )
        .await
        .unwrap();
    let vms = lookup("vm").unwrap();
    let boot = json!({"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"});
    // The peer stays on host B and pings the VM that moves; the mover pings it back.
    let peer = json!({"metadata": {"name": "peer"}, "spec": {
        "nodeName": "host-b", "resources": {"cpus": 1, "memory": "128Mi"}, "boot": boot,
        "userData": "#cloud-config\nflotilla_test_ping: 10.8.0.10\n",
        "networks": [{"network": "lan", "ip": "10.8.0.11"}]}});
    let peer_uid = admin.create(vms, Some("default"), &peer).await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let mover = json!({"metadata": {"name": "mover"}, "spec": {
        "nodeName": "host-a", "resources": {"cpus": 1, "memory": "256Mi"}, "boot": boot,
        "image": "seedling", "rootDisk": {"size": "32Mi"},
        "userData": "#cloud-config\nflotilla_test_ping: 10.8.0.11\n",
        "networks": [{"network": "lan", "ip": "10.8.0.10"}]}});
    let uid = admin.create(vms, Some("default"), &mover).await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let (a_dir, b_dir) = (fabric.agent_dir(0), fabric.agent_dir(1));
    let peer_log = || console(&b_dir, &peer_uid);
    eventually("the two guests reach each other", 120, async || {
        (last_ping(&console(&a_dir, &uid), "10.8.0.11").is_some_and(|l| l.ends_with("ok"))
            && last_ping(&peer_log(), "10.8.0.10").is_some_and(|l| l.ends_with("ok")))
        .then_some(())
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = support::sample_writers(stop.clone());

    // 1. Suspended live migration, target picked by the scheduler: host B, the only other.
    write_mark(admin, "mover", "hop-1").await;
    let m = migrate(admin, "first", json!({"vm": "mover", "suspend": true})).await;
    assert_eq!(m["status"]["phase"], "Succeeded", "{m:#}");
    assert_eq!(m["status"]["targetNode"], "host-b");
    assert_eq!(
        m["status"]["storage"], "incremental",
        "only the overlay is copied"
    );
    assert!(
        m["status"]["downtimeMs"].is_u64() && m["status"]["durationMs"].is_u64(),
        "{m:#}"
    );
    let suspended = (
        m["status"]["downtimeMs"].clone(),
        m["status"]["durationMs"].clone(),
    );
    let vm = settled_on(admin, "mover", "host-b").await;
    assert_eq!(vm["status"]["ips"][0], "10.8.0.10");
    read_mark(admin, "mover", "hop-1").await;
    assert!(
        domains(&fabric, 0).is_empty(),
        "host A holds no domain: {:?}",
        domains(&fabric, 0)
    );
    assert!(
        !a_dir.join("vms").join(&uid).exists(),
        "host A holds no files of the VM"
    );
    assert_eq!(domains(&fabric, 1).len(), 2, "host B runs both");
    eventually(
        "the peer reaches the mover on its new host",
        30,
        async || {
            last_ping(&peer_log(), "10.8.0.10")
                .is_some_and(|l| l.ends_with("ok"))
                .then_some(())
        },
    )
    .await;
    assert_healthy(&console(&a_dir, &uid), "before the first hop");
    assert_healthy(&console(&b_dir, &uid), "after the first hop");

    // 2. Back to host A, named, with a downtime limit: truly live where that is safe.
    write_mark(admin, "mover", "hop-2").await;
    let second = json!({"vm": "mover", "targetNode": "host-a", "maxDowntimeMs": 100});
    let m = migrate(admin, "second", second).await;
    // Where a live copy is unsafe, the agent suspends the guest for it by itself.
    let unsafe_live = live_is_unsafe(admin).await;
    if let Some(why) = &unsafe_live {
        eprintln!("the second hop is suspended, not truly live: {why}");
    }
    assert_eq!(
        m["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("suspended for the copy"),
        unsafe_live.is_some(),
        "{m:#}"
    );
    assert_eq!(m["status"]["phase"], "Succeeded", "{m:#}");
    settled_on(admin, "mover", "host-a").await;
    read_mark(admin, "mover", "hop-2").await;
    assert_eq!(domains(&fabric, 1).len(), 1, "host B keeps only the peer");
    assert!(!b_dir.join("vms").join(&uid).exists());
    eventually(
        "the peer reaches the mover back on host A",
        30,
        async || {
            last_ping(&peer_log(), "10.8.0.10")
                .is_some_and(|l| l.ends_with("ok"))
                .then_some(())
        },
    )
    .await;
    assert_healthy(&console(&a_dir, &uid), "after the second hop");
    eprintln!(
        "second hop: downtime {} ms, {} ms in all; first hop (suspended): blackout {} ms, {} ms in all",
        m["status"]["downtimeMs"], m["status"]["durationMs"], suspended.0, suspended.1
    );

    // 2b. Post-copy and auto-converge asked for, and a bandwidth limit: libvirt takes the
    // flags and the VM moves (on hosts where live copies are unsafe the guest is suspended, so
    // pre-copy converges at once and post-copy never starts: the flags are what is tested).
    let m = migrate(
        admin,
        "tuned",
        json!({"vm": "mover", "postCopy": true, "autoConverge": true, "bandwidthMib": 512}),
    )
    .await;
    assert_eq!(m["status"]["phase"], "Succeeded", "{m:#}");
    settled_on(admin, "mover", "host-b").await;
    read_mark(admin, "mover", "hop-2").await;
    let m = migrate(
        admin,
        "tuned-back",
        json!({"vm": "mover", "targetNode": "host-a"}),
    )
    .await;
    assert_eq!(m["status"]["phase"], "Succeeded", "{m:#}");
    settled_on(admin, "mover", "host-a").await;

    // 3. Aborted: a copy slowed to 1 MiB/s, its Migration deleted while it runs.
    let kind = lookup("migration").unwrap();
    admin
        .create(
            kind,
            Some("default"),
            &json!({"metadata": {"name": "third"}, "spec": {"vm": "mover", "bandwidthMib": 1}}),
        )
        .await
        .unwrap();
    eventually("the slow copy runs", 60, async || {
        let m = admin.get(kind, Some("default"), "third").await.ok()?;
        (m["status"]["phase"] == "Migrating"
            && m["status"]["progress"]["dataProcessed"].as_u64() > Some(0))
        .then_some(())
    })
    .await;
    admin.delete(kind, Some("default"), "third").await.unwrap();
    eventually("the aborted Migration is gone", 60, async || {
        admin
            .get(kind, Some("default"), "third")
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let vm = settled_on(admin, "mover", "host-a").await;
    assert_eq!(vm["spec"]["nodeName"], "host-a");
    eventually("host B let go of what it prepared", 30, async || {
        (domains(&fabric, 1).len() == 1 && !b_dir.join("vms").join(&uid).exists()).then_some(())
    })
    .await;
    read_mark(admin, "mover", "hop-2").await;

    // 3b. The source's agent is killed (-9) in the middle of a copy, and started again: the
    // copy ends one way or the other, and exactly one host runs the VM, where it is bound.
    admin
        .create(
            kind,
            Some("default"),
            // Suspended: a long live copy of a running guest is what QEMU 7.2 corrupts.
            &json!({"metadata": {"name": "killed"}, "spec": {"vm": "mover", "bandwidthMib": 8, "suspend": true}}),
        )
        .await
        .unwrap();
    eventually("the copy runs", 60, async || {
        let m = admin.get(kind, Some("default"), "killed").await.ok()?;
        (m["status"]["phase"] == "Migrating").then_some(())
    })
    .await;
    let agent = fabric.agent_pid(0).expect("host A's agent runs");
    support::hosts::run(&["kill", "-9", &agent.to_string()]);
    let m = eventually("the interrupted migration ends", 180, async || {
        let m = admin.get(kind, Some("default"), "killed").await.ok()?;
        matches!(m["status"]["phase"].as_str(), Some("Succeeded" | "Failed")).then_some(m)
    })
    .await;
    let landed = if m["status"]["phase"] == "Succeeded" {
        "host-b"
    } else {
        "host-a"
    };
    eprintln!(
        "agent killed mid-copy: the migration {} ({})",
        m["status"]["phase"], m["status"]["message"]
    );
    settled_on(admin, "mover", landed).await;
    let (here, there) = if landed == "host-a" { (0, 1) } else { (1, 0) };
    eventually("exactly one host runs the VM", 60, async || {
        let running = |i: usize| {
            let out = fabric.in_host(i, &["virsh", "-q", "domstate", "default_mover"]);
            String::from_utf8_lossy(&out.stdout).trim() == "running"
        };
        (running(here) && !running(there)).then_some(())
    })
    .await;
    read_mark(admin, "mover", "hop-2").await;
    if landed == "host-b" {
        // Back to host A for what follows.
        let m = migrate(
            admin,
            "back",
            json!({"vm": "mover", "targetNode": "host-a"}),
        )
        .await;
        assert_eq!(m["status"]["phase"], "Succeeded", "{m:#}");
        settled_on(admin, "mover", "host-a").await;
    }

    // 4. Cold: the guest boots again on host B from the disk it left.
    write_mark(admin, "mover", "hop-4").await;
    let m = migrate(admin, "fourth", json!({"vm": "mover", "mode": "Cold"})).await;
    assert_eq!(m["status"]["phase"], "Succeeded", "{m:#}");
    assert_eq!(m["status"]["storage"], "cold");
    settled_on(admin, "mover", "host-b").await;
    eventually("the guest booted again on host B", 120, async || {
        console(&b_dir, &uid)
            .contains("FLOTILLA-BOOTED")
            .then_some(())
    })
    .await;
    read_mark(admin, "mover", "hop-4").await;
    assert!(domains(&fabric, 0).is_empty());

    // 5. Shared storage: a VM whose only disk is a volume in an NFS pool (nfs-ganesha, reached
    // by QEMU's libnfs on both hosts) moves without copying any disk.
    let nfs_dir = support::traversable_tempdir();
    let _nfs = support::nfs::NfsServer::start(nfs_dir.path());
    let nfs_port = format!("{}nf", fabric.tag);
    support::hosts::run(&[
        "ip",
        "link",
        "add",
        &nfs_port,
        "type",
        "veth",
        "peer",
        "name",
        "fab",
        "netns",
        "fltnfs-test",
    ]);
    fabric.links.push(nfs_port.clone());
    support::hosts::run(&[
        "ip",
        "link",
        "set",
        &nfs_port,
        "master",
        &fabric.bridge,
        "up",
    ]);
    support::hosts::run(&[
        "ip",
        "-n",
        "fltnfs-test",
        "addr",
        "add",
        "10.78.0.200/24",
        "dev",
        "fab",
    ]);
    support::hosts::run(&["ip", "-n", "fltnfs-test", "link", "set", "fab", "up"]);
    let (pools, volumes) = (lookup("storagepool").unwrap(), lookup("volume").unwrap());
    admin
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "shared"}, "spec": {"type": "nfs",
                    "nfs": {"server": "10.78.0.200", "export": "/export"}}}),
        )
        .await
        .unwrap();
    eventually("both hosts serve the nfs pool", 60, async || {
        let p = admin.get(pools, None, "shared").await.ok()?;
        let ready = |n: &str| p["status"]["nodes"][n]["phase"] == "Ready";
        (ready("host-a") && ready("host-b")).then_some(())
    })
    .await;
    admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "data"}, "spec": {"pool": "shared", "size": "16Mi"}}),
        )
        .await
        .unwrap();
    let sharer = json!({"metadata": {"name": "sharer"}, "spec": {
        "nodeName": "host-a", "resources": {"cpus": 1, "memory": "128Mi"}, "boot": boot,
        "disks": [{"name": "data", "volume": "data"}]}});
    let sharer_uid = admin.create(vms, Some("default"), &sharer).await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    eventually("sharer sees its volume", 120, async || {
        console(&a_dir, &sharer_uid)
            .contains("FLOTILLA-DISK vda")
            .then_some(())
    })
    .await;
    write_mark(admin, "sharer", "nfs-1").await;
    let m = migrate(
        admin,
        "over-nfs",
        json!({"vm": "sharer", "targetNode": "host-b"}),
    )
    .await;
    assert_eq!(m["status"]["phase"], "Succeeded", "{m:#}");
    assert_eq!(m["status"]["storage"], "shared", "no disk is copied: {m:#}");
    settled_on(admin, "sharer", "host-b").await;
    read_mark(admin, "sharer", "nfs-1").await;
    assert_healthy(
        &console(&b_dir, &sharer_uid),
        "after the move over shared storage",
    );
    admin.delete(vms, Some("default"), "sharer").await.unwrap();
    eventually("sharer is gone", 60, async || {
        admin
            .get(vms, Some("default"), "sharer")
            .await
            .is_err()
            .then_some(())
    })
    .await;

    // What cannot move is refused with a reason.
    let m = migrate(
        admin,
        "nowhere",
        json!({"vm": "mover", "targetNode": "host-z"}),
    )
    .await;
    assert_eq!(m["status"]["phase"], "Failed");
    assert_eq!(m["status"]["reason"], "NoTarget", "{m:#}");
    let m = migrate(admin, "ghost", json!({"vm": "ghost"})).await;
    assert_eq!(m["status"]["reason"], "VMNotFound", "{m:#}");

    // Drain host B: the mover and the peer (live), two more guests (live), a stopped VM (cold);
    // one VM whose node selector only host B matches cannot move, and the drain says why.
    admin
        .patch(
            nodes,
            None,
            "host-b",
            &json!({"metadata": {"labels": {"test.flotilla.dev/zone": "b"}}}),
            false,
        )
        .await
        .unwrap();
    for (name, extra) in [
        ("d1", json!({})),
        ("d2", json!({})),
        ("parked", json!({"powerState": "Stopped"})),
        (
            "stuck",
            json!({"nodeSelector": {"test.flotilla.dev/zone": "b"}}),
        ),
    ] {
        let mut spec =
            json!({"nodeName": "host-b", "resources": {"cpus": 1, "memory": "96Mi"}, "boot": boot});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        admin
            .create(
                vms,
                Some("default"),
                &json!({"metadata": {"name": name}, "spec": spec}),
            )
            .await
            .unwrap();
    }
    for name in ["d1", "d2", "stuck", "parked"] {
        let want = if name == "parked" {
            "Stopped"
        } else {
            "Running"
        };
        eventually(&format!("{name} is {want}"), 60, async || {
            let v = admin.get(vms, Some("default"), name).await.ok()?;
            (v["status"]["phase"] == want).then_some(())
        })
        .await;
    }
    let config = cluster.dir.path().join("server/admin.yaml");
    let drained = Instant::now();
    let out = support::cli(&config, &["node", "drain", "host-b", "--timeout", "5m"]);
    let drain_took = drained.elapsed();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "one VM could not move: {said}");
    for name in ["mover", "peer", "d1", "d2", "parked"] {
        assert!(
            said.contains(&format!("moved default/{name} to host-a")),
            "{said}"
        );
        assert_eq!(
            admin.get(vms, Some("default"), name).await.unwrap()["spec"]["nodeName"],
            "host-a"
        );
    }
    assert!(
        said.contains("could not move default/stuck") && said.contains("node selector"),
        "{said}"
    );
    assert!(said.contains("5 of 6 VMs moved"), "{said}");
    let b = admin.get(nodes, None, "host-b").await.unwrap();
    assert_eq!(
        b["spec"]["unschedulable"], true,
        "a drained node stays cordoned"
    );
    eventually("parked stays stopped on host A", 30, async || {
        let v = admin.get(vms, Some("default"), "parked").await.ok()?;
        (v["status"]["phase"] == "Stopped" && v["status"]["nodeName"] == "host-a").then_some(())
    })
    .await;
    settled_on(admin, "mover", "host-a").await;
    read_mark(admin, "mover", "hop-4").await;
    eprintln!(
        "drain of host B (5 VMs moved, 1 refused): {:.1} s",
        drain_took.as_secs_f64()
    );

    // The migrations by phase, in /metrics.
    let listed = admin
        .list(kind, Some("default"), &Default::default())
        .await
        .unwrap();
    let count = |phase: &str| {
        listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["status"]["phase"] == phase)
            .count()
    };
    let (succeeded, failed) = (count("Succeeded"), count("Failed"));
    let metrics = admin
        .send(reqwest::Method::GET, "/metrics", &[], None)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!("flotilla_migrations{{phase=\"Succeeded\"}} {succeeded}");
    assert!(
        succeeded >= 9 && metrics.lines().any(|l| l == line),
        "{line} in:\n{metrics}"
    );
    let line = format!("flotilla_migrations{{phase=\"Failed\"}} {failed}");
    assert!(
        failed >= 3 && metrics.lines().any(|l| l == line),
        "{line} in:\n{metrics}"
    );

    stop.store(true, Ordering::Relaxed);
    let (samples, shared) = sampler.join().unwrap();
    assert!(samples > 10, "the sampler ran ({samples} samples)");
    assert_eq!(shared, None, "a disk was open for writing by two QEMUs");
    assert_healthy(&console(&b_dir, &uid), "at the end");
    drop(fabric);
}

/// The API server (a real `flotilla server` process, with its controllers) is killed with
/// SIGKILL while a copy runs and started again: the migration still ends, and the VM is bound
/// to the one host that runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_survives_kill_9_of_the_server() {
    let guest = support::tiny_guest();
    let mut fabric = Fabric::new("fms", 81);
    let dir = support::traversable_tempdir();
    let mut server = support::Server::start_on(dir.path(), &fabric.server_address(), None);
    let admin = server.admin().await;
    let token = support::join_token(&admin).await;
    for host in ["host-a", "host-b"] {
        fabric.add_host_to(&server.url(), &token, host, &[]);
    }
    fabric.wait_ready(&admin).await;
    let vms = lookup("vm").unwrap();
    let solo = json!({"metadata": {"name": "solo"}, "spec": {
        "nodeName": "host-a", "resources": {"cpus": 1, "memory": "128Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"}}});
    let uid = admin.create(vms, Some("default"), &solo).await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    eventually("solo booted", 120, async || {
        console(&fabric.agent_dir(0), &uid)
            .contains("FLOTILLA-BOOTED")
            .then_some(())
    })
    .await;
    let kind = lookup("migration").unwrap();
    admin
        .create(
            kind,
            Some("default"),
            &json!({"metadata": {"name": "through"}, "spec": {"vm": "solo", "suspend": true, "bandwidthMib": 4}}),
        )
        .await
        .unwrap();
    eventually("the copy runs", 60, async || {
        let m = admin.get(kind, Some("default"), "through").await.ok()?;
        (m["status"]["phase"] == "Migrating").then_some(())
    })
    .await;
    server.process.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.process.start();
    let admin = server.admin().await;
    let m = eventually("the migration ends", 180, async || {
        let m = admin.get(kind, Some("default"), "through").await.ok()?;
        matches!(m["status"]["phase"].as_str(), Some("Succeeded" | "Failed")).then_some(m)
    })
    .await;
    eprintln!(
        "server killed mid-copy: the migration {} ({})",
        m["status"]["phase"], m["status"]["message"]
    );
    let landed = if m["status"]["phase"] == "Succeeded" {
        "host-b"
    } else {
        "host-a"
    };
    settled_on(&admin, "solo", landed).await;
    let (here, there) = if landed == "host-a" { (0, 1) } else { (1, 0) };
    let running = |i: usize| {
        let out = fabric.in_host(i, &["virsh", "-q", "domstate", "default_solo"]);
        String::from_utf8_lossy(&out.stdout).trim() == "running"
    };
    eventually("exactly one host runs the VM", 60, async || {
        (running(here) && !running(there)).then_some(())
    })
    .await;
    in_guest(&admin, "solo", &["echo ALIVE-$((40+2))"], "ALIVE-42").await;
    assert_healthy(
        &console(&fabric.agent_dir(here), &uid),
        "after the server's kill",
    );
    drop(fabric);
}
