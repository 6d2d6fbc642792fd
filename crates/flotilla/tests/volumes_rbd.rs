//! Volumes in a Ceph RBD pool, on a real single-node Ceph (scripts/ceph-up.sh: monitor, manager
//! and a memstore OSD on 127.0.0.1, cephx) and a real guest (libvirtd, QEMU TCG with librbd, the
//! tiny guest). Two agents share the host's libvirtd as two nodes: the pool is shared, so a
//! volume made by one node is used by a VM on the other (its management follows the VM). The
//! guest sees the volume plugged with its serial and the host's bytes, grown at once, and
//! unplugged; Ceph's own copy-on-write clones and full copies, a volume from an image, the
//! refusals (qcow2 in an rbd pool, deleting a cloned volume), what a crash mid-clone leaves
//! being cleaned up; then `kill -9` of the real agent at several moments of making, attaching,
//! detaching and deleting a volume, each converging; and nothing left in the Ceph pool at the
//! end. The agents are the real `flotilla agent` binary.
//!
//! One Ceph per run: everything that needs it is in this one test. Needs the Ceph daemons,
//! qemu-block-extra, libvirtd and the tiny guest; `make test` provides all of them. Prints the
//! times from the API call to the guest seeing the change.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::{json, Value};
use support::guests::{self, boot_tiny_vm};
use support::repo;

/// A throwaway Ceph, stopped (and its directory removed) when dropped.
struct Ceph(PathBuf);

impl Ceph {
    fn start(dir: &Path) -> Ceph {
        let started = Instant::now();
        let out = Command::new(repo().join("scripts/ceph-up.sh"))
            .arg(dir)
            .arg("flotilla")
            .output()
            .expect("scripts/ceph-up.sh runs");
        let ceph = Ceph(dir.to_path_buf());
        assert!(
            out.status.success(),
            "Ceph did not start (are ceph-mon, ceph-osd and ceph-mgr installed? make test installs them): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("Ceph up in {:.1} s", started.elapsed().as_secs_f64());
        ceph
    }

    /// `rbd args` as the cluster's admin; its stdout.
    fn rbd(&self, args: &[&str]) -> String {
        let conf = self.0.join("ceph.conf");
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&conf)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn images(&self) -> Vec<String> {
        serde_json::from_str(&self.rbd(&["ls", "--format", "json", "flotilla"])).unwrap()
    }

    fn info(&self, image: &str) -> Value {
        serde_json::from_str(&self.rbd(&["info", "--format", "json", image])).unwrap()
    }

    /// QEMU's name for `image` (`pool/name`) with the admin's credentials.
    fn qemu(&self, image: &str) -> String {
        format!("rbd:{image}:conf={}", self.0.join("ceph.conf").display())
    }

    /// The first `len` bytes at `offset` of `image`, read through QEMU's rbd driver.
    fn read(&self, image: &str, offset: u64, len: usize) -> Vec<u8> {
        let file = self.0.join("read.bin");
        let _ = std::fs::remove_file(&file);
        let out = Command::new("qemu-img")
            .args(["dd", "-f", "raw", "-O", "raw", "bs=512"])
            .arg(format!("count={}", (offset as usize + len).div_ceil(512)))
            .arg(format!("if={}", self.qemu(image)))
            .arg(format!("of={}", file.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&file).unwrap();
        bytes[offset as usize..offset as usize + len].to_vec()
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/ceph-down.sh"))
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbd_volumes_are_shared_plugged_grown_cloned_and_removed() {
    let cluster = TestCluster::start().await;
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ceph = Ceph::start(&cluster.dir.path().join("flotilla-test-ceph"));
    let admin = &cluster.admin;
    let token = cluster.join_token().await;
    let mut agent_a = support::agent(&cluster.server.url, &token, "rbd-a", cluster.dir.path());
    let mut agent_b = support::agent_with(
        &cluster.server.url,
        &token,
        "rbd-b",
        cluster.dir.path(),
        // Two nodes on one libvirtd: the second takes no migrations (join refuses one
        // host UUID twice).
        &["--no-migrations"],
    );
    let (pools, vms, volumes) = (
        lookup("storagepool").unwrap(),
        lookup("vm").unwrap(),
        lookup("volume").unwrap(),
    );
    let keyring = ceph.0.join("ceph.client.flotilla.keyring");
    let key = std::fs::read_to_string(&keyring).unwrap();
    let key = key.split("key = ").nth(1).unwrap().trim().to_string();

    // The pool: both nodes reach the cluster with the pool-scoped user's keyring.
    admin
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "ceph"}, "spec": {"type": "rbd", "rbd": {
                "monitors": ["127.0.0.1:6789"], "pool": "flotilla", "user": "flotilla",
                "keyring": keyring}}}),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let pool = loop {
        let p = admin.get(pools, None, "ceph").await.unwrap();
        let ready = |n: &str| p["status"]["nodes"][n]["phase"] == "Ready";
        if ready("rbd-a") && ready("rbd-b") {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "both nodes do not serve the rbd pool: {p:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let entry = &pool["status"]["nodes"]["rbd-a"];
    assert_eq!(entry["path"], "rbd:flotilla", "{pool}");
    assert!(entry["capacity"].as_u64().unwrap() > 512 << 20, "{pool}");
    assert!(
        !pool.to_string().contains(&key),
        "the key never reaches the API"
    );

    // A qcow2 volume has no place in it; a wrong monitor is a clear error on the node.
    let refused = admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "q"}, "spec": {"pool": "ceph", "size": "64Mi"}}),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(
        refused.to_string().contains("spec.format") && refused.to_string().contains("raw"),
        "{refused}"
    );

    // A volume, made by one node (the pool's first by name), with the host's bytes at its start.
    let made = Instant::now();
    admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "data"}, "spec": {"pool": "ceph", "size": "64Mi", "format": "raw"}}),
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
    let image = format!("flotilla/{uid}");
    assert_eq!(volume["status"]["shared"], true, "{volume}");
    assert_eq!(volume["status"]["node"], "rbd-a", "{volume}");
    assert_eq!(volume["status"]["path"], format!("rbd:{image}"), "{volume}");
    assert_eq!(volume["status"]["capacity"], 64u64 << 20, "{volume}");
    assert_eq!(ceph.info(&image)["size"], 64u64 << 20);
    let suffix: u32 = rand::random::<u32>() % 100_000;
    let hello = ceph.0.join("hello.bin");
    let mut bytes = format!("hello-{suffix}").into_bytes();
    bytes.resize(512, 0);
    std::fs::write(&hello, &bytes).unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -s {} 0 512", hello.display()))
        .arg(ceph.qemu(&image))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A VM on the other node; plugged in, the volume follows the VM's node, and the guest sees
    // it with its serial and the host's bytes, through librbd.
    let name = format!("rbd-{suffix}");
    boot_tiny_vm(admin, &name, "rbd-b").await;
    let seen = guests::plug(admin, &name, "data", 131072, &format!("hello-{suffix}")).await;
    let volume = admin.get(volumes, Some("default"), "data").await.unwrap();
    assert_eq!(volume["status"]["node"], "rbd-b", "{volume}");
    assert!(seen.serial.starts_with(&uid[..8]));

    // Grown online through the guest's QEMU: seen at once, and the image is bigger.
    let resize_s = guests::grow(admin, &name, "data", &seen, "128Mi", 262144).await;
    assert_eq!(ceph.info(&image)["size"], 128u64 << 20);
    eventually("the volume reports its new size", 30, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        (v["status"]["capacity"] == 128u64 << 20).then_some(())
    })
    .await;

    // What the guest wrote is in the image.
    let wanted = format!("guest-wrote-{}", seen.device);
    eventually("the guest's write is in the image", 30, async || {
        (ceph.read(&image, 4096, wanted.len()) == wanted.as_bytes()).then_some(())
    })
    .await;

    // Unplugged: the guest lets go, then the volume is free again.
    let detach_s = guests::unplug(admin, &name, "data", &seen).await;
    println!(
        "rbd volume: made {create_s:.1} s; on a running guest: plugged and seen {:.1} s, grown and seen {resize_s:.1} s, unplugged and gone {detach_s:.1} s",
        seen.seconds
    );

    // Clones: Ceph's copy-on-write clone (linked) and a full copy, both holding the volume's
    // bytes; the cloned volume cannot be deleted while the linked clone exists.
    let clone = |name: &str, mode: &str| {
        json!({"metadata": {"name": name}, "spec": {"pool": "ceph", "size": "128Mi", "format": "raw",
               "source": {"volume": "data", "mode": mode}}})
    };
    let cloned = Instant::now();
    admin
        .create(volumes, Some("default"), &clone("linked", "linked"))
        .await
        .unwrap();
    let linked = eventually("the linked clone is Available", 60, async || {
        let v = admin.get(volumes, Some("default"), "linked").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    let linked_s = cloned.elapsed().as_secs_f64();
    let cloned = Instant::now();
    admin
        .create(volumes, Some("default"), &clone("full", "full"))
        .await
        .unwrap();
    let full = eventually("the full clone is Available", 60, async || {
        let v = admin.get(volumes, Some("default"), "full").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    let full_s = cloned.elapsed().as_secs_f64();
    let linked_image = format!("flotilla/{}", linked["metadata"]["uid"].as_str().unwrap());
    let full_image = format!("flotilla/{}", full["metadata"]["uid"].as_str().unwrap());
    assert_eq!(ceph.info(&linked_image)["parent"]["image"], uid.as_str());
    assert!(ceph.info(&full_image).get("parent").is_none());
    let head = format!("hello-{suffix}");
    for image in [&linked_image, &full_image] {
        assert_eq!(ceph.read(image, 0, head.len()), head.as_bytes(), "{image}");
    }
    let held = admin
        .delete(volumes, Some("default"), "data")
        .await
        .unwrap_err();
    assert_eq!(held.code(), Some(409), "{held}");
    assert!(held.to_string().contains("linked"), "{held}");

    // A volume from an image: the node's cached copy written into a new RBD image.
    guests::seedling_image(admin, cluster.dir.path()).await;
    admin
        .create(
            volumes,
            Some("default"),
            &json!({"metadata": {"name": "from-image"}, "spec": {"pool": "ceph", "size": "32Mi",
                    "format": "raw", "source": {"image": "seedling"}}}),
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
    let from_image = format!(
        "flotilla/{}",
        from_image["metadata"]["uid"].as_str().unwrap()
    );
    assert_eq!(ceph.info(&from_image)["size"], 32u64 << 20);
    assert_eq!(ceph.read(&from_image, 0, 4096), vec![0x5a; 4096]);
    assert_eq!(ceph.read(&from_image, 2 << 20, 512), vec![0; 512]);
    println!(
        "rbd clones of a 128 MiB volume: linked {linked_s:.1} s, full {full_s:.1} s (API call to Available)"
    );

    // What a create cut short leaves (a temporary image, a clone snapshot with no clone) goes
    // with the volume it belongs to.
    ceph.rbd(&["create", "--size", "8M", &format!("{linked_image}.tmp")]);
    ceph.rbd(&["snap", "create", &format!("{image}@flotilla-clone-ghost")]);
    ceph.rbd(&["snap", "protect", &format!("{image}@flotilla-clone-ghost")]);

    // kill -9 of both agents at several moments of each step of a volume's life: each converges.
    guests::crash_rounds(
        admin,
        &mut [&mut agent_a, &mut agent_b],
        &name,
        &[0, 80, 200, 500],
        |v| json!({"metadata": {"name": v}, "spec": {"pool": "ceph", "size": "32Mi", "format": "raw"}}),
        |_| {},
    )
    .await;

    // Deleting everything leaves nothing in the Ceph pool.
    admin.delete(vms, Some("default"), &name).await.unwrap();
    for v in ["linked", "full", "from-image"] {
        admin.delete(volumes, Some("default"), v).await.unwrap();
    }
    eventually("the clones are gone", 60, async || {
        let left = admin
            .list(volumes, Some("default"), &Default::default())
            .await
            .ok()?;
        (left["items"].as_array()?.len() == 1).then_some(())
    })
    .await;
    admin
        .delete(volumes, Some("default"), "data")
        .await
        .unwrap();
    eventually("every volume is gone", 60, async || {
        let left = admin
            .list(volumes, Some("default"), &Default::default())
            .await
            .ok()?;
        left["items"].as_array()?.is_empty().then_some(())
    })
    .await;
    assert_eq!(ceph.images(), Vec::<String>::new());

    // The pool goes, and with it its key in libvirtd.
    let secret = pool["metadata"]["uid"].as_str().unwrap().to_string();
    let has_secret = || {
        let out = Command::new("virsh")
            .args(["-c", "qemu:///system", "secret-list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&secret)
    };
    assert!(has_secret(), "the nodes gave libvirtd the pool's key");
    admin.delete(pools, None, "ceph").await.unwrap();
    eventually("the pool's secret is gone from libvirtd", 30, async || {
        (!has_secret()).then_some(())
    })
    .await;
    eventually("the VM is gone", 60, async || {
        admin
            .get(vms, Some("default"), &name)
            .await
            .is_err()
            .then_some(())
    })
    .await;
}
