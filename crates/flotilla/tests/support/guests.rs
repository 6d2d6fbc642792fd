//! What the storage backends' tests share: a tiny guest on a chosen node, a volume plugged
//! into it, grown and unplugged — each until the guest itself says so on its serial console —
//! and `kill -9` of the agents at several moments of a volume's life.

use std::time::{Duration, Instant};

use flotilla_client::Client;
use flotilla_controllers::testkit::{eventually, log_until};
use flotilla_types::registry::lookup;
use serde_json::{json, Value};

use super::{tiny_guest, Process};

/// VM `name` (project `default`) of the tiny guest, bound to `node`, once it has booted.
pub async fn boot_tiny_vm(admin: &Client, name: &str, node: &str) {
    let guest = tiny_guest();
    let vm = json!({"metadata": {"name": name}, "spec": {
        "nodeName": node,
        "resources": {"cpus": 1, "memory": "256Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"},
        "rootDisk": {"size": "32Mi"},
    }});
    admin
        .create(lookup("vm").unwrap(), Some("default"), &vm)
        .await
        .unwrap();
    log_until(admin, name, "the guest has booted", 180, |t| {
        t.contains("FLOTILLA-DISK vda serial=- sectors=65536")
    })
    .await;
}

/// A volume as the guest reports it.
pub struct Seen {
    /// The guest's name for the disk (vdb, ...).
    pub device: String,
    /// The serial the guest read (the volume's uid, cut to 20 characters).
    pub serial: String,
    /// Seconds from the API call to the guest seeing it.
    pub seconds: f64,
}

/// Plugs `volume` into VM `vm` as its only disk; returns once the guest sees a disk with the
/// volume's serial, `sectors` 512-byte sectors and `head` at its start.
pub async fn plug(admin: &Client, vm: &str, volume: &str, sectors: u64, head: &str) -> Seen {
    let (vms, volumes) = (lookup("vm").unwrap(), lookup("volume").unwrap());
    let uid = admin.get(volumes, Some("default"), volume).await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let serial: String = uid.chars().take(20).collect();
    let started = Instant::now();
    let disks = json!({"spec": {"disks": [{"name": "data", "volume": volume}]}});
    admin
        .patch(vms, Some("default"), vm, &disks, false)
        .await
        .unwrap();
    let seen = format!("serial={serial} sectors={sectors} head={head}");
    let log = log_until(admin, vm, "the guest sees the volume", 120, |t| {
        t.contains(&seen)
    })
    .await;
    let device = log
        .lines()
        .find(|l| l.contains(&seen))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_string();
    Seen {
        device,
        serial,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Grows `volume` to `size`; seconds until the guest sees `sectors`.
pub async fn grow(
    admin: &Client,
    vm: &str,
    volume: &str,
    seen: &Seen,
    size: &str,
    sectors: u64,
) -> f64 {
    let started = Instant::now();
    admin
        .patch(
            lookup("volume").unwrap(),
            Some("default"),
            volume,
            &json!({"spec": {"size": size}}),
            false,
        )
        .await
        .unwrap();
    let bigger = format!(
        "FLOTILLA-DISK {} serial={} sectors={sectors}",
        seen.device, seen.serial
    );
    log_until(admin, vm, "the guest sees the volume grow", 120, |t| {
        t.contains(&bigger)
    })
    .await;
    started.elapsed().as_secs_f64()
}

/// Unplugs every disk of VM `vm`; seconds until the guest sees `seen` go, after which the
/// volume is let go of.
pub async fn unplug(admin: &Client, vm: &str, volume: &str, seen: &Seen) -> f64 {
    let started = Instant::now();
    admin
        .patch(
            lookup("vm").unwrap(),
            Some("default"),
            vm,
            &json!({"spec": {"disks": []}}),
            false,
        )
        .await
        .unwrap();
    let gone = format!("FLOTILLA-DISK-GONE {}", seen.device);
    log_until(admin, vm, "the guest sees the volume go", 120, |t| {
        t.contains(&gone)
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    eventually("the volume is let go of", 30, async || {
        let v = admin
            .get(lookup("volume").unwrap(), Some("default"), volume)
            .await
            .ok()?;
        v["status"].get("attachedTo").is_none().then_some(())
    })
    .await;
    seconds
}

/// Kills every agent `delay_ms` after a step was asked for, and starts them again.
pub async fn crash(agents: &mut [&mut Process], delay_ms: u64) {
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    for agent in agents.iter_mut() {
        agent.kill9();
        agent.start();
    }
}

/// For each delay, a volume (`body(name)`) made, attached to VM `vm`, detached and deleted,
/// with every agent killed that long after each step was asked for; every step converges.
/// `after(name)` runs once each volume is gone.
pub async fn crash_rounds(
    admin: &Client,
    agents: &mut [&mut Process],
    vm: &str,
    delays_ms: &[u64],
    body: impl Fn(&str) -> Value,
    mut after: impl FnMut(&str),
) {
    let (vms, volumes) = (lookup("vm").unwrap(), lookup("volume").unwrap());
    for (i, delay_ms) in delays_ms.iter().copied().enumerate() {
        let v = format!("crash-{i}");
        let step = |what: &str| format!("{v}: {what} after the agents were killed");
        admin
            .create(volumes, Some("default"), &body(&v))
            .await
            .unwrap();
        crash(agents, delay_ms).await;
        eventually(&step("made"), 90, async || {
            let v = admin.get(volumes, Some("default"), &v).await.ok()?;
            (v["status"]["phase"] == "Available").then_some(())
        })
        .await;
        let disks = json!({"spec": {"disks": [{"name": "c", "volume": v}]}});
        admin
            .patch(vms, Some("default"), vm, &disks, false)
            .await
            .unwrap();
        crash(agents, delay_ms).await;
        eventually(&step("attached"), 90, async || {
            let d = &admin.get(vms, Some("default"), vm).await.ok()?["status"]["disks"][0];
            (d["state"] == "Attached" && d["volume"] == v.as_str()).then_some(())
        })
        .await;
        let none = json!({"spec": {"disks": []}});
        admin
            .patch(vms, Some("default"), vm, &none, false)
            .await
            .unwrap();
        crash(agents, delay_ms).await;
        eventually(&step("let go of"), 90, async || {
            let v = admin.get(volumes, Some("default"), &v).await.ok()?;
            v["status"].get("attachedTo").is_none().then_some(())
        })
        .await;
        admin.delete(volumes, Some("default"), &v).await.unwrap();
        crash(agents, delay_ms).await;
        eventually(&step("deleted"), 90, async || {
            admin
                .get(volumes, Some("default"), &v)
                .await
                .is_err()
                .then_some(())
        })
        .await;
        after(&v);
    }
}

/// Image `seedling` of project `default`: a 16 MiB qcow2 file in `dir` whose first MiB is 0x5a.
pub async fn seedling_image(admin: &Client, dir: &std::path::Path) {
    let qcow2 = dir.join("seedling.qcow2");
    let path = qcow2.to_str().unwrap();
    for args in [
        vec!["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"],
        vec!["qemu-io", "-c", "write -P 0x5a 0 1M", path],
    ] {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let image = json!({"metadata": {"name": "seedling"}, "spec": {"source": {"path": qcow2}}});
    admin
        .create(lookup("image").unwrap(), Some("default"), &image)
        .await
        .unwrap();
}
