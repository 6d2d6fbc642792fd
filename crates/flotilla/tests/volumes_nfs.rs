//! Volumes in an NFS pool, on a real NFS server (nfs-ganesha and rpcbind in a network
//! namespace joined to the host by a veth pair: scripts/nfs-server-up.sh) and a real guest
//! (libvirtd, QEMU TCG with libnfs, the tiny guest), on a VM of the other of two nodes: no
//! kernel NFS client anywhere. The files belong to QEMU's user; the guest sees a qcow2 volume
//! plugged with its serial and the bytes the host put there, grown at once, and unplugged; its
//! writes are in the file; a full copy (to raw) and a volume from an image are made on the
//! export; linked clones and snapshots are refused, saying why; nothing is left on the export.
//! The agents are the real `flotilla agent` binary (kill -9 of it: crash_storage.rs).
//!
//! One server per run: everything that needs it is in this one test. Needs nfs-ganesha,
//! nfs-ganesha-vfs, rpcbind, qemu-block-extra, libvirtd and the tiny guest; `make test`
//! provides all of them.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Instant;

use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::json;
use support::guests::{self, boot_tiny_vm};
use support::nfs::{NfsServer, SERVER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_volumes_are_shared_plugged_grown_copied_and_removed() {
    let cluster = TestCluster::start().await;
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = NfsServer::start(&cluster.dir.path().join("nfs"));
    let admin = &cluster.admin;
    let token = cluster.join_token().await;
    let _a = support::agent(&cluster.server.url, &token, "nfs-a", cluster.dir.path());
    let _b = support::agent_with(
        &cluster.server.url,
        &token,
        "nfs-b",
        cluster.dir.path(),
        // Two nodes on one libvirtd: the second takes no migrations (join refuses one
        // host UUID twice).
        &["--no-migrations"],
    );
    let (pools, vms, volumes, snapshots) = (
        lookup("storagepool").unwrap(),
        lookup("vm").unwrap(),
        lookup("volume").unwrap(),
        lookup("volumesnapshot").unwrap(),
    );

    admin
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "shared"}, "spec": {"type": "nfs",
                    "nfs": {"server": SERVER, "export": "/export"}}}),
        )
        .await
        .unwrap();
    let pool = eventually("both nodes serve the nfs pool", 60, async || {
        let p = admin.get(pools, None, "shared").await.ok()?;
        let ready = |n: &str| p["status"]["nodes"][n]["phase"] == "Ready";
        (ready("nfs-a") && ready("nfs-b")).then_some(p)
    })
    .await;
    assert!(
        pool["status"]["nodes"]["nfs-a"]["capacity"]
            .as_u64()
            .unwrap()
            > 0,
        "{pool}"
    );

    let made = Instant::now();
    admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "data"}, "spec": {"pool": "shared", "size": "64Mi"}}),
        )
        .await
        .unwrap();
    let volume = eventually("the volume is Available", 60, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    let create_s = made.elapsed().as_secs_f64();
    let uid = volume["metadata"]["uid"].as_str().unwrap().to_string();
    let file = format!("{uid}.qcow2");
    assert_eq!(volume["status"]["shared"], true, "{volume}");
    assert_eq!(
        volume["status"]["path"],
        format!("nfs://{SERVER}/export/{file}"),
        "{volume}"
    );
    assert_eq!(server.files(), vec![file.clone()]);
    let meta = std::fs::metadata(server.export().join(&file)).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (64055, 64055),
        "QEMU's user owns it"
    );

    // Refused, saying why: linked clones and snapshots of volumes in an nfs pool.
    let linked = json!({"metadata": {"name": "l"}, "spec": {"pool": "shared", "size": "64Mi",
        "source": {"volume": "data", "mode": "linked"}}});
    let refused = admin
        .create(volumes, Some("default"), &linked)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(
        refused.to_string().contains("spec.source.mode"),
        "{refused}"
    );
    let snapshot = json!({"metadata": {"name": "s"}, "spec": {"volume": "data"}});
    let refused = admin
        .create(snapshots, Some("default"), &snapshot)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(refused.to_string().contains("nfs pool"), "{refused}");

    // The host's bytes at the volume's start, written through libnfs as QEMU's user.
    let suffix: u32 = rand::random::<u32>() % 100_000;
    let hello = cluster.dir.path().join("hello.bin");
    let mut bytes = format!("hello-{suffix}").into_bytes();
    bytes.resize(512, 0);
    std::fs::write(&hello, &bytes).unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -s {} 0 512", hello.display()))
        .arg(server.url(&file))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A VM on the other node: the volume follows it, and the guest sees it.
    let name = format!("nfs-{suffix}");
    boot_tiny_vm(admin, &name, "nfs-b").await;
    let seen = guests::plug(admin, &name, "data", 131072, &format!("hello-{suffix}")).await;
    let volume = admin.get(volumes, Some("default"), "data").await.unwrap();
    assert_eq!(volume["status"]["node"], "nfs-b", "{volume}");

    // Grown online through the guest's QEMU.
    let resize_s = guests::grow(admin, &name, "data", &seen, "128Mi", 262144).await;
    eventually("the volume reports its new size", 30, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        (v["status"]["capacity"] == 128u64 << 20).then_some(())
    })
    .await;
    let wanted = format!("guest-wrote-{}", seen.device);
    eventually("the guest's write is in the file", 30, async || {
        (server.read(&file, "qcow2", 4096, wanted.len()) == wanted.as_bytes()).then_some(())
    })
    .await;
    let detach_s = guests::unplug(admin, &name, "data", &seen).await;
    println!(
        "nfs volume: made {create_s:.1} s; on a running guest: plugged and seen {:.1} s, grown and seen {resize_s:.1} s, unplugged and gone {detach_s:.1} s",
        seen.seconds
    );

    // A full copy, to raw, holds the volume's bytes; a volume from an image holds the image's.
    admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "copy"}, "spec": {"pool": "shared", "size": "128Mi",
                    "format": "raw", "source": {"volume": "data"}}}),
        )
        .await
        .unwrap();
    let copy = eventually("the copy is Available", 60, async || {
        let v = admin.get(volumes, Some("default"), "copy").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    let copy_file = format!("{}.raw", copy["metadata"]["uid"].as_str().unwrap());
    let head = format!("hello-{suffix}");
    assert_eq!(
        server.read(&copy_file, "raw", 0, head.len()),
        head.as_bytes()
    );
    guests::seedling_image(admin, cluster.dir.path()).await;
    admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "from-image"}, "spec": {"pool": "shared", "size": "32Mi",
                    "source": {"image": "seedling"}}}),
        )
        .await
        .unwrap();
    let from_image = eventually("the volume from the image is Available", 90, async || {
        let v = admin
            .get(volumes, Some("default"), "from-image")
            .await
            .ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    let image_file = format!("{}.qcow2", from_image["metadata"]["uid"].as_str().unwrap());
    assert_eq!(server.read(&image_file, "qcow2", 0, 4096), vec![0x5a; 4096]);
    assert_eq!(from_image["status"]["capacity"], 32u64 << 20);

    // Deleting everything leaves nothing on the export.
    admin.delete(vms, Some("default"), &name).await.unwrap();
    for v in ["data", "copy", "from-image"] {
        admin.delete(volumes, Some("default"), v).await.unwrap();
    }
    eventually("every volume is gone", 60, async || {
        let left = admin
            .list(volumes, Some("default"), &Default::default())
            .await
            .ok()?;
        left["items"].as_array()?.is_empty().then_some(())
    })
    .await;
    assert_eq!(server.files(), Vec::<String>::new());
    eventually("the VM is gone", 60, async || {
        admin
            .get(vms, Some("default"), &name)
            .await
            .is_err()
            .then_some(())
    })
    .await;
}
