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
use flotilla_controllers::testkit::{eventually, log_until, TestCluster};
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

/// A cluster's agent `node` on the host's libvirtd (QEMU, TCG), its data in the cluster's
/// directory; it runs until the returned sender is dropped.
async fn start_agent(
    cluster: &TestCluster,
    node: &str,
) -> (Libvirt, tokio::sync::watch::Sender<bool>) {
    let tmp = &cluster.dir;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut agent = AgentConfig::new(
        vec![cluster.server.url.clone()],
        node,
        tmp.path().join("agent"),
    );
    agent.join_token = Some(cluster.join_token().await);
    agent.libvirt_uri = "qemu:///system".into();
    agent.virt_type = VirtType::Qemu;
    agent.shutdown_timeout = Duration::from_secs(2);
    agent.resync = Duration::from_secs(3);
    let libvirt = Libvirt::open("qemu:///system")
        .await
        .expect("libvirtd is running (make test starts it)");
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(agent, libvirt.clone(), rx));
    (libvirt, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_sees_volumes_plugged_grown_and_unplugged() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    let admin = &cluster.admin;
    let (_libvirt, _stop) = start_agent(&cluster, "vol-node").await;
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
    log_until(
        admin,
        &name,
        "the guest sees its root disk grow",
        120,
        |t| t.contains("FLOTILLA-DISK vda serial=- sectors=98304"),
    )
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
    let log = log_until(admin, &name, "the guest sees the volume", 120, |t| {
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
    log_until(admin, &name, "the guest sees the volume grow", 120, |t| {
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
    log_until(admin, &name, "the guest sees the volume go", 120, |t| {
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

/// Fills the first 64 bytes of a qcow2 file with `byte` (nothing may have it open).
fn fill(path: &str, byte: u8) {
    let status = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -q -P {byte} 0 64"),
            path,
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "qemu-io wrote {path}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

/// Snapshots of a qcow2 volume: taken offline and under a running guest, merged away when
/// deleted (also under the guest), reverted to (the guest then reads what was there at the
/// snapshot, not what came after), cloned from; deleting all of it leaves no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_freeze_revert_merge_and_clone_a_volume() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    let admin = &cluster.admin;
    let (libvirt, _stop) = start_agent(&cluster, "snap-node").await;
    let (vms, volumes, snapshots) = (
        lookup("vm").unwrap(),
        lookup("volume").unwrap(),
        lookup("volumesnapshot").unwrap(),
    );
    let ns = Some("default");
    let suffix: u32 = rand::random::<u32>() % 100_000;
    let snapshot = |name: &str| json!({"metadata": {"name": name}, "spec": {"volume": "data"}});
    let ready = |name: &'static str| async move {
        eventually(&format!("snapshot {name} is Ready"), 60, async || {
            let s = admin.get(snapshots, ns, name).await.ok()?;
            (s["status"]["phase"] == "Ready").then_some(s)
        })
        .await
    };
    let path_of = async |name: &str| -> String {
        let v = admin.get(volumes, ns, name).await.unwrap();
        v["status"]["path"].as_str().unwrap().to_string()
    };

    admin
        .create(
            volumes,
            ns,
            &json!({"metadata": {"name": "data"}, "spec": {"size": "64Mi"}}),
        )
        .await
        .unwrap();
    eventually("the volume is Available", 60, async || {
        let v = admin.get(volumes, ns, "data").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(())
    })
    .await;
    let base = path_of("data").await;
    let pool = PathBuf::from(&base).parent().unwrap().to_path_buf();
    fill(&base, b'A');

    // Offline: the file freezes as the snapshot; an overlay takes the writes from now on.
    let started = Instant::now();
    admin.create(snapshots, ns, &snapshot("one")).await.unwrap();
    let one = ready("one").await;
    let offline_s = started.elapsed().as_secs_f64();
    assert_eq!(one["status"]["path"], base.as_str());
    assert_eq!(one["status"]["size"], 64u64 << 20);
    let overlay = path_of("data").await;
    assert_ne!(overlay, base, "the volume moved to an overlay");
    fill(&overlay, b'B');

    // A raw or unknown volume has no snapshots.
    let refused = admin
        .create(
            snapshots,
            ns,
            &json!({"metadata": {"name": "x"}, "spec": {"volume": "nope"}}),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");

    // Attached to a running guest, which reads what came after the snapshot.
    let name = format!("snaps-{suffix}");
    let vm = json!({"metadata": {"name": name}, "spec": {
        "resources": {"cpus": 1, "memory": "256Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"},
        "disks": [{"name": "data", "volume": "data"}],
    }});
    admin.create(vms, ns, &vm).await.unwrap();
    let b_head = format!("head={}", "B".repeat(64));
    log_until(admin, &name, "the guest reads the newer data", 120, |t| {
        t.contains(&b_head)
    })
    .await;

    // Online: the guest's disk switches to a new overlay without noticing.
    let started = Instant::now();
    admin.create(snapshots, ns, &snapshot("two")).await.unwrap();
    let two = ready("two").await;
    let online_s = started.elapsed().as_secs_f64();
    assert_eq!(two["status"]["path"], overlay.as_str());
    let live = path_of("data").await;
    let uid = admin.get(vms, ns, &name).await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let xml = libvirt.xml(&uid).await.unwrap().unwrap();
    assert!(
        xml.contains(&live),
        "the running guest writes the new overlay: {xml}"
    );
    // The older one cannot go first (it is the newer one's base).
    let refused = admin.delete(snapshots, ns, "one").await.unwrap_err();
    assert_eq!(refused.code(), Some(409), "{refused}");
    assert!(refused.to_string().contains("newest first"), "{refused}");
    // Deleted under the running guest: merged back, the guest now on the snapshot's file —
    // also when a merge was started and never pivoted (an agent killed in the middle): the job
    // left in QEMU is taken up, not refused as a second one. (virsh starts it here.)
    let target = flotilla_agent::libvirt::disks_of(&xml)
        .into_iter()
        .find(|d| d.volume.as_deref() == Some("data"))
        .unwrap()
        .target;
    let started_job = std::process::Command::new("virsh")
        .args(["blockcommit", &uid, &target, "--active", "--base", &overlay])
        .output()
        .unwrap();
    assert!(
        started_job.status.success(),
        "{}",
        String::from_utf8_lossy(&started_job.stderr)
    );
    let started = Instant::now();
    admin.delete(snapshots, ns, "two").await.unwrap();
    eventually("snapshot two is gone", 60, async || {
        admin.get(snapshots, ns, "two").await.is_err().then_some(())
    })
    .await;
    let merge_s = started.elapsed().as_secs_f64();
    assert_eq!(
        path_of("data").await,
        overlay,
        "the volume is back on the merged file"
    );
    assert!(
        !std::path::Path::new(&live).exists(),
        "the merged overlay is gone"
    );
    let xml = libvirt.xml(&uid).await.unwrap().unwrap();
    assert!(
        xml.contains(&overlay),
        "the guest pivoted to the merged file: {xml}"
    );

    // Reverting needs the guest to let go; then it reads what the snapshot held.
    admin
        .patch(vms, ns, &name, &json!({"spec": {"disks": []}}), false)
        .await
        .unwrap();
    log_until(admin, &name, "the guest lets go of the volume", 120, |t| {
        t.contains("FLOTILLA-DISK-GONE")
    })
    .await;
    let started = Instant::now();
    let request = json!({"metadata": {"annotations": {"flotilla.dev/revert-to": "one 1"}}});
    admin
        .patch(volumes, ns, "data", &request, false)
        .await
        .unwrap();
    eventually("the volume is reverted", 60, async || {
        let v = admin.get(volumes, ns, "data").await.ok()?;
        (v["status"]["lastRevert"] == "one 1").then_some(())
    })
    .await;
    let revert_s = started.elapsed().as_secs_f64();
    // The file reverted away from goes (at once, or with the volume's strays).
    eventually("the reverted-away file is gone", 30, async || {
        (!std::path::Path::new(&overlay).exists()).then_some(())
    })
    .await;
    admin
        .patch(
            vms,
            ns,
            &name,
            &json!({"spec": {"disks": [{"name": "data", "volume": "data"}]}}),
            false,
        )
        .await
        .unwrap();
    let a_head = format!("head={}", "A".repeat(64));
    log_until(
        admin,
        &name,
        "the guest reads the snapshot's data",
        120,
        |t| t.contains(&a_head),
    )
    .await;

    // A clone of the snapshot: an overlay of its file, which then cannot go before it.
    admin
        .create(
            volumes,
            ns,
            &json!({"metadata": {"name": "copy"}, "spec": {"size": "64Mi", "source": {"snapshot": "one", "mode": "linked"}}}),
        )
        .await
        .unwrap();
    eventually("the clone is made", 60, async || {
        let v = admin.get(volumes, ns, "copy").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(())
    })
    .await;
    let refused = admin.delete(snapshots, ns, "one").await.unwrap_err();
    assert_eq!(refused.code(), Some(409), "{refused}");
    assert!(
        refused.to_string().contains("linked clone copy"),
        "{refused}"
    );
    let refused = admin.delete(volumes, ns, "data").await.unwrap_err();
    assert_eq!(refused.code(), Some(409), "{refused}");
    println!(
        "volume snapshots (dir pool, qcow2, 64 MiB): offline {offline_s:.1} s, under a running guest {online_s:.1} s, deleted with a live merge {merge_s:.1} s, revert {revert_s:.1} s"
    );

    // Everything goes, and no file of either volume stays.
    admin.delete(vms, ns, &name).await.unwrap();
    admin.delete(volumes, ns, "copy").await.unwrap();
    eventually("the clone is gone", 60, async || {
        admin.get(volumes, ns, "copy").await.is_err().then_some(())
    })
    .await;
    admin.delete(snapshots, ns, "one").await.unwrap();
    eventually("snapshot one is gone", 60, async || {
        admin.get(snapshots, ns, "one").await.is_err().then_some(())
    })
    .await;
    eventually("the VM is gone", 60, async || {
        admin.get(vms, ns, &name).await.is_err().then_some(())
    })
    .await;
    admin.delete(volumes, ns, "data").await.unwrap();
    eventually("the pool holds nothing", 60, async || {
        let left: Vec<_> = std::fs::read_dir(&pool).ok()?.collect();
        left.is_empty().then_some(())
    })
    .await;
}

/// Whether the first 64 bytes of the qcow2 file at `path` are all `byte` (qemu-io verifies).
fn holds(path: &str, byte: u8) -> bool {
    let out = std::process::Command::new("qemu-io")
        .args([
            "-r",
            "-U",
            "-f",
            "qcow2",
            "-c",
            &format!("read -P {byte} 0 64"),
            path,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    out.status.success() && !text.contains("verification failed") && text.contains("read 64/64")
}

/// VM snapshots on a real guest: taken with its memory while it runs (it pauses for it and
/// goes on), reverted to — the guest resumes where it was without booting, and its disks hold
/// what they held then, not what came after — taken of its disks while stopped, merged away
/// when deleted; neither the VM nor its volume goes while a snapshot holds them, and nothing
/// stays behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_snapshots_keep_memory_and_disks_and_revert_a_running_guest() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    let admin = &cluster.admin;
    let (libvirt, _stop) = start_agent(&cluster, "vmsnap-node").await;
    let (vms, volumes, vm_snapshots) = (
        lookup("vm").unwrap(),
        lookup("volume").unwrap(),
        lookup("vmsnapshot").unwrap(),
    );
    let ns = Some("default");
    let suffix: u32 = rand::random::<u32>() % 100_000;
    let path_of = async |name: &str| -> String {
        let v = admin.get(volumes, ns, name).await.unwrap();
        v["status"]["path"].as_str().unwrap().to_string()
    };
    let ready = async |name: &str| {
        eventually(&format!("VM snapshot {name} is Ready"), 90, async || {
            let s = admin.get(vm_snapshots, ns, name).await.ok()?;
            (s["status"]["phase"] == "Ready").then_some(s)
        })
        .await
    };
    let set_disks = async |name: &str, disks: serde_json::Value| {
        admin
            .patch(vms, ns, name, &json!({"spec": {"disks": disks}}), false)
            .await
            .unwrap();
    };
    let attached = json!([{"name": "state", "volume": "state"}]);

    admin
        .create(
            volumes,
            ns,
            &json!({"metadata": {"name": "state"}, "spec": {"size": "64Mi"}}),
        )
        .await
        .unwrap();
    eventually("the volume is Available", 60, async || {
        let v = admin.get(volumes, ns, "state").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(())
    })
    .await;
    let base = path_of("state").await;
    let pool = PathBuf::from(&base).parent().unwrap().to_path_buf();
    fill(&base, b'A');

    let name = format!("vmsnap-{suffix}");
    let vm = json!({"metadata": {"name": name}, "spec": {
        "resources": {"cpus": 1, "memory": "256Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0 panic=-1"},
        "rootDisk": {"size": "32Mi"},
        "disks": attached,
    }});
    admin.create(vms, ns, &vm).await.unwrap();
    let a_head = format!("head={}", "A".repeat(64));
    log_until(admin, &name, "the guest reads the volume", 180, |t| {
        t.contains(&a_head)
    })
    .await;
    let uid = admin.get(vms, ns, &name).await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let vm_dir = cluster.dir.path().join("agent/vms").join(&uid);

    // A snapshot of a VM the project lacks is refused at the field.
    let refused = admin
        .create(
            vm_snapshots,
            ns,
            &json!({"metadata": {"name": "x"}, "spec": {"vm": "nope"}}),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(refused.to_string().contains("spec.vm"), "{refused}");

    // With memory, while the guest runs.
    let started = Instant::now();
    admin
        .create(
            vm_snapshots,
            ns,
            &json!({"metadata": {"name": "warm"}, "spec": {"vm": name}}),
        )
        .await
        .unwrap();
    let warm = ready("warm").await;
    let warm_s = started.elapsed().as_secs_f64();
    assert_eq!(warm["status"]["vmState"], "Running", "{warm}");
    let memory = warm["status"]["memoryPath"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&memory).is_file(), "{warm}");
    let disks = warm["status"]["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "the root disk and the volume: {warm}");
    assert!(
        disks[0]["path"].as_str().unwrap().ends_with("/root.qcow2"),
        "{warm}"
    );
    assert_eq!(disks[1]["path"], base.as_str(), "{warm}");
    let overlay = path_of("state").await;
    assert_ne!(overlay, base, "the volume moved to an overlay");
    let xml = libvirt.xml(&uid).await.unwrap().unwrap();
    assert!(
        xml.contains(&overlay),
        "the guest writes the overlay: {xml}"
    );

    // What came after: the guest lets go, the host writes B, the guest reads B.
    set_disks(&name, json!([])).await;
    log_until(admin, &name, "the guest lets go of the volume", 120, |t| {
        t.contains("FLOTILLA-DISK-GONE")
    })
    .await;
    fill(&path_of("state").await, b'B');
    set_disks(&name, attached.clone()).await;
    let b_head = format!("head={}", "B".repeat(64));
    log_until(admin, &name, "the guest reads the newer data", 120, |t| {
        t.contains(&b_head)
    })
    .await;
    // A revert to a snapshot the VM lacks says why, and leaves the guest running.
    let request = json!({"metadata": {"annotations": {"flotilla.dev/revert-to": "nope"}}});
    admin.patch(vms, ns, &name, &request, false).await.unwrap();
    let events = lookup("event").unwrap();
    eventually("the VM says it cannot revert", 60, async || {
        let list = admin.list(events, ns, &Default::default()).await.ok()?;
        list["items"]
            .as_array()?
            .iter()
            .any(|e| {
                e["reason"] == "RevertFailed"
                    && e["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("no such snapshot")
            })
            .then_some(())
    })
    .await;
    assert_eq!(
        admin.get(vms, ns, &name).await.unwrap()["status"]["phase"],
        "Running"
    );

    // Revert: the guest resumes from the snapshot, on its disks as they were.
    let started = Instant::now();
    let request = json!({"metadata": {"annotations": {"flotilla.dev/revert-to": "warm 1"}}});
    admin.patch(vms, ns, &name, &request, false).await.unwrap();
    eventually("the VM is reverted", 90, async || {
        let v = admin.get(vms, ns, &name).await.ok()?;
        (v["status"]["lastRevert"] == "warm 1" && v["status"]["phase"] == "Running").then_some(())
    })
    .await;
    let revert_s = started.elapsed().as_secs_f64();
    let reverted = path_of("state").await;
    assert_ne!(reverted, overlay, "the volume is on a fresh overlay");
    assert!(
        !std::path::Path::new(&overlay).exists() || {
            // Swept with the volume's strays at the next pass.
            tokio::time::sleep(Duration::from_secs(8)).await;
            !std::path::Path::new(&overlay).exists()
        },
        "the overlay reverted away from is gone"
    );
    // The resumed guest reads the snapshot's data through the fresh overlay (grown, it reads
    // the disk's start again): the whole chain is under it, not an empty overlay.
    admin
        .patch(
            volumes,
            ns,
            "state",
            &json!({"spec": {"size": "80Mi"}}),
            false,
        )
        .await
        .unwrap();
    log_until(
        admin,
        &name,
        "the resumed guest reads the old data",
        120,
        |t| t.contains(&format!("sectors=163840 {a_head}")),
    )
    .await;
    // Alive and as it was: it reacts to the volume going (which it had seen before the
    // snapshot, so it prints no new sighting of it), and it never booted again.
    set_disks(&name, json!([])).await;
    let text = log_until(admin, &name, "the resumed guest lets go", 120, |t| {
        t.matches("FLOTILLA-DISK-GONE").count() >= 2
    })
    .await;
    assert_eq!(
        text.matches("FLOTILLA-BOOTED").count(),
        1,
        "the guest resumed rather than booted:\n{text}"
    );
    assert!(
        holds(&path_of("state").await, b'A'),
        "the volume holds what it held at the snapshot"
    );

    // Disks only, while stopped.
    admin
        .patch(
            vms,
            ns,
            &name,
            &json!({"spec": {"powerState": "Stopped"}}),
            false,
        )
        .await
        .unwrap();
    eventually("the VM is Stopped", 90, async || {
        let v = admin.get(vms, ns, &name).await.ok()?;
        (v["status"]["phase"] == "Stopped").then_some(())
    })
    .await;
    let started = Instant::now();
    admin
        .create(
            vm_snapshots,
            ns,
            &json!({"metadata": {"name": "cold"}, "spec": {"vm": name}}),
        )
        .await
        .unwrap();
    let cold = ready("cold").await;
    let cold_s = started.elapsed().as_secs_f64();
    assert_eq!(cold["status"]["vmState"], "Stopped", "{cold}");
    assert!(cold["status"].get("memoryPath").is_none(), "{cold}");
    assert_eq!(
        cold["status"]["disks"].as_array().unwrap().len(),
        1,
        "{cold}"
    );

    // New VMs from it: linked to the snapshot's root, and a full copy of the stopped VM's. They
    // are made on its node without being told.
    let clone = |n: &str, source: serde_json::Value| {
        json!({"metadata": {"name": n}, "spec": {
            "powerState": "Stopped",
            "resources": {"cpus": 1, "memory": "256Mi"},
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz")},
            "rootDisk": {"size": "32Mi", "source": source},
        }})
    };
    let refused = admin
        .create(vms, ns, &clone("x", json!({"vm": name, "mode": "linked"})))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(
        refused.to_string().contains("rootDisk.source.mode"),
        "{refused}"
    );
    let cold_root = cold["status"]["disks"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    let mut roots = Vec::new();
    for (clone_name, source) in [
        ("linked", json!({"vmSnapshot": "cold", "mode": "linked"})),
        ("copy", json!({"vm": name})),
    ] {
        let made = admin
            .create(vms, ns, &clone(clone_name, source))
            .await
            .unwrap();
        assert_eq!(made["spec"]["nodeName"], "vmsnap-node", "{made}");
        let clone_uid = made["metadata"]["uid"].as_str().unwrap().to_string();
        let root = cluster
            .dir
            .path()
            .join("agent/vms")
            .join(clone_uid)
            .join("root.qcow2");
        eventually(
            &format!("{clone_name}'s root disk is made"),
            90,
            async || {
                let v = admin.get(vms, ns, clone_name).await.ok()?;
                (v["status"]["phase"] == "Stopped" && root.exists()).then_some(())
            },
        )
        .await;
        roots.push(root);
    }
    let clones_s = started.elapsed().as_secs_f64();
    let info = |path: &std::path::Path| -> serde_json::Value {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(path)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(info(&roots[0])["backing-filename"], cold_root.as_str());
    assert!(
        info(&roots[1]).get("backing-filename").is_none(),
        "a copy stands alone"
    );
    let dump = std::process::Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c", "read -v 4096 16"])
        .arg(&roots[1])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&dump.stdout).contains("guest.wrote.vda"),
        "the copy holds what the guest wrote on its root disk: {}",
        String::from_utf8_lossy(&dump.stdout)
    );
    let refused = admin.delete(vm_snapshots, ns, "cold").await.unwrap_err();
    assert_eq!(refused.code(), Some(409), "{refused}");
    assert!(
        refused
            .to_string()
            .contains("backs the root disk of VM linked"),
        "{refused}"
    );
    for clone_name in ["linked", "copy"] {
        admin.delete(vms, ns, clone_name).await.unwrap();
    }
    for clone_name in ["linked", "copy"] {
        eventually(&format!("{clone_name} is gone"), 90, async || {
            admin.get(vms, ns, clone_name).await.is_err().then_some(())
        })
        .await;
    }

    // Snapshots hold the VM and the volume, and go newest first.
    for (kind, what) in [(vms, name.as_str()), (volumes, "state")] {
        let refused = admin.delete(kind, ns, what).await.unwrap_err();
        assert_eq!(refused.code(), Some(409), "{refused}");
        assert!(refused.to_string().contains("VM snapshot"), "{refused}");
    }
    let refused = admin.delete(vm_snapshots, ns, "warm").await.unwrap_err();
    assert_eq!(refused.code(), Some(409), "{refused}");
    assert!(refused.to_string().contains("newest first"), "{refused}");
    let started = Instant::now();
    for snapshot in ["cold", "warm"] {
        admin.delete(vm_snapshots, ns, snapshot).await.unwrap();
        eventually(&format!("VM snapshot {snapshot} is gone"), 90, async || {
            admin
                .get(vm_snapshots, ns, snapshot)
                .await
                .is_err()
                .then_some(())
        })
        .await;
    }
    let delete_s = started.elapsed().as_secs_f64();
    assert!(
        !std::path::Path::new(&memory).exists(),
        "the memory file went"
    );
    let roots: Vec<String> = std::fs::read_dir(&vm_dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("root") && n.ends_with(".qcow2"))
        .collect();
    assert_eq!(roots, ["root.qcow2"], "merged back into one root file");
    assert_eq!(path_of("state").await, base, "merged back into its file");
    assert!(holds(&base, b'A'));
    println!(
        "VM snapshots (tiny guest, 256 MiB, root disk and one volume): with memory {warm_s:.1} s, revert with memory {revert_s:.1} s, disks only while stopped {cold_s:.1} s, two deleted (merged) {delete_s:.1} s; a linked clone and a full copy of a 32 MiB root disk as new VMs {clones_s:.1} s"
    );

    admin.delete(vms, ns, &name).await.unwrap();
    eventually("the VM is gone", 90, async || {
        admin.get(vms, ns, &name).await.is_err().then_some(())
    })
    .await;
    admin.delete(volumes, ns, "state").await.unwrap();
    eventually(
        "the pool and the VM's directory hold nothing",
        60,
        async || {
            let left: Vec<_> = std::fs::read_dir(&pool).ok()?.collect();
            (left.is_empty() && !vm_dir.exists()).then_some(())
        },
    )
    .await;
}
