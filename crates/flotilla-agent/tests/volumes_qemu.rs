//! Volumes on a real guest (libvirtd, QEMU TCG, the tiny guest): attached to a running VM the
//! guest sees the disk appear with the volume's serial and the data the host put there, grown
//! it sees the new size at once, detached it sees it go — and only then is the volume free for
//! another VM. What the guest wrote is in the volume's file afterwards.
//!
//! Needs libvirtd and the tiny guest (`scripts/build-tiny-guest.sh`); `make test` provides both.
//! Prints the times from the API call to the guest seeing the change.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use flotilla_agent::domain::VirtType;
use flotilla_agent::libvirt::Libvirt;
use flotilla_agent::AgentConfig;
use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::json;

fn tiny_guest() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let status = std::process::Command::new(root.join("scripts/build-tiny-guest.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "building the tiny guest failed");
    root.join("target/guests/tiny").canonicalize().unwrap()
}

/// The serial log of `name` through the API once `done` holds for it (or a panic showing it).
async fn log_until(
    admin: &flotilla_client::Client,
    name: &str,
    what: &str,
    seconds: u64,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut text = String::new();
    while Instant::now() < deadline {
        if let Ok(stream) = admin.vm_log("default", name, false).await {
            let mut stream = Box::pin(stream);
            let mut bytes = Vec::new();
            while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
                bytes.extend_from_slice(&chunk);
            }
            text = String::from_utf8_lossy(&bytes).into_owned();
            if done(&text) {
                return text;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {seconds} s waiting until {what}; the guest printed:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_sees_volumes_plugged_grown_and_unplugged() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    let (server, admin, tmp) = (&cluster.server, &cluster.admin, &cluster.dir);
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent_dir = tmp.path().join("agent");
    let mut agent = AgentConfig::new(vec![server.url.clone()], "vol-node", &agent_dir);
    agent.join_token = Some(cluster.join_token().await);
    agent.libvirt_uri = "qemu:///system".into();
    agent.virt_type = VirtType::Qemu;
    agent.shutdown_timeout = Duration::from_secs(2);
    agent.resync = Duration::from_secs(3);
    let libvirt = Libvirt::open("qemu:///system")
        .await
        .expect("libvirtd is running (make test starts it)");
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(agent, libvirt.clone(), rx));
    let (vms, volumes) = (lookup("vm").unwrap(), lookup("volume").unwrap());
    let suffix: u32 = rand::random::<u32>() % 100_000;

    // A raw volume with something of the host's at its start.
    admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "data"}, "spec": {"size": "64Mi", "format": "raw"}}),
        )
        .await
        .unwrap();
    let volume = eventually("the volume is Available", 60, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    let path = PathBuf::from(volume["status"]["path"].as_str().unwrap());
    let serial: String = volume["metadata"]["uid"]
        .as_str()
        .unwrap()
        .chars()
        .take(20)
        .collect();
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    write!(file, "hello-{suffix}").unwrap();
    drop(file);

    let name = format!("disks-{suffix}");
    let vm = json!({"metadata": {"name": name}, "spec": {
        "resources": {"cpus": 1, "memory": "256Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"},
        "rootDisk": {"size": "32Mi"},
    }});
    admin.create(vms, Some("default"), &vm).await.unwrap();
    eventually("the VM is Running", 90, async || {
        let v = admin.get(vms, Some("default"), &name).await.ok()?;
        (v["status"]["phase"] == "Running").then_some(())
    })
    .await;
    log_until(admin, &name, "the guest has booted", 120, |t| {
        t.contains("FLOTILLA-SEED-FILES") && t.contains("FLOTILLA-DISK vda serial=- sectors=65536")
    })
    .await;

    // The root disk grows online too, and never shrinks.
    let grown = Instant::now();
    let root = |size: &str| json!({"spec": {"rootDisk": {"size": size}}});
    admin
        .patch(vms, Some("default"), &name, &root("48Mi"), false)
        .await
        .unwrap();
    log_until(admin, &name, "the guest sees its root disk grow", 60, |t| {
        t.contains("FLOTILLA-DISK vda serial=- sectors=98304")
    })
    .await;
    let root_s = grown.elapsed().as_secs_f64();
    let refused = admin
        .patch(vms, Some("default"), &name, &root("16Mi"), false)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(
        refused.to_string().contains("spec.rootDisk.size")
            && refused.to_string().contains("shrink"),
        "{refused}"
    );

    // Plugged in: the guest sees the disk with the volume's serial and the host's bytes.
    let plugged = Instant::now();
    let disks = json!({"spec": {"disks": [{"name": "data", "volume": "data"}]}});
    admin
        .patch(vms, Some("default"), &name, &disks, false)
        .await
        .unwrap();
    let seen = format!("serial={serial} sectors=131072 head=hello-{suffix}");
    let log = log_until(admin, &name, "the guest sees the volume", 60, |t| {
        t.contains(&seen)
    })
    .await;
    let attach_s = plugged.elapsed().as_secs_f64();
    let line = log.lines().find(|l| l.contains(&seen)).unwrap();
    let device = line.split_whitespace().nth(1).unwrap().to_string();
    let vm_now = eventually("status.disks says Attached", 30, async || {
        let v = admin.get(vms, Some("default"), &name).await.ok()?;
        (v["status"]["disks"][0]["state"] == "Attached").then_some(v)
    })
    .await;
    assert_eq!(vm_now["status"]["disks"][0]["volume"], "data");
    assert_eq!(vm_now["status"]["disks"][0]["serial"], serial.as_str());
    // While attached, the volume is held: not deletable, not attachable elsewhere.
    let held = admin
        .delete(volumes, Some("default"), "data")
        .await
        .unwrap_err();
    assert_eq!(held.code(), Some(409), "{held}");
    assert!(held.to_string().contains(&name), "{held}");

    // Grown online: the guest sees the new size at once.
    let grown = Instant::now();
    admin
        .patch(
            volumes,
            Some("default"),
            "data",
            &json!({"spec": {"size": "128Mi"}}),
            false,
        )
        .await
        .unwrap();
    let bigger = format!("FLOTILLA-DISK {device} serial={serial} sectors=262144");
    log_until(admin, &name, "the guest sees the volume grow", 60, |t| {
        t.contains(&bigger)
    })
    .await;
    let resize_s = grown.elapsed().as_secs_f64();
    eventually("the volume reports its new size", 30, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        (v["status"]["capacity"] == 128u64 << 20).then_some(())
    })
    .await;

    // Unplugged: the guest lets go, then the volume is free again.
    let unplugged = Instant::now();
    admin
        .patch(
            vms,
            Some("default"),
            &name,
            &json!({"spec": {"disks": []}}),
            false,
        )
        .await
        .unwrap();
    let gone = format!("FLOTILLA-DISK-GONE {device}");
    log_until(admin, &name, "the guest sees the volume go", 60, |t| {
        t.contains(&gone)
    })
    .await;
    let detach_s = unplugged.elapsed().as_secs_f64();
    eventually("the volume is let go of", 30, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        v["status"].get("attachedTo").is_none().then_some(())
    })
    .await;
    let vm_now = admin.get(vms, Some("default"), &name).await.unwrap();
    assert!(vm_now["status"].get("disks").is_none(), "{vm_now}");
    println!(
        "volume on a running guest (dir pool, raw): plugged and seen {attach_s:.1} s, grown and seen {resize_s:.1} s, unplugged and gone {detach_s:.1} s; root disk grown and seen {root_s:.1} s"
    );

    // What the guest wrote is in the file.
    let mut file = std::fs::File::open(&path).unwrap();
    file.seek(SeekFrom::Start(4096)).unwrap();
    let mut written = vec![0u8; 32];
    file.read_exact(&mut written).unwrap();
    let wanted = format!("guest-wrote-{device}");
    assert!(
        written.starts_with(wanted.as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&written)
    );

    // Deleting the VM and the volume leaves nothing.
    admin.delete(vms, Some("default"), &name).await.unwrap();
    eventually("the VM is gone", 60, async || {
        admin
            .get(vms, Some("default"), &name)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    admin
        .delete(volumes, Some("default"), "data")
        .await
        .unwrap();
    eventually("the volume's file is gone", 30, async || {
        (!path.exists()).then_some(())
    })
    .await;
}
