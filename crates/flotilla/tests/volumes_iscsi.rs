//! Volumes in an iSCSI pool, on a real target (tgtd, userspace, on 127.0.0.1:3261:
//! scripts/iscsi-target-up.sh) and a real guest (libvirtd, QEMU TCG with libiscsi, the tiny
//! guest), on a VM of the other of two nodes. A pool made before its target answers is Failed
//! with the reason, and Ready within seconds once it answers. Each volume is one LUN. The guest
//! sees it plugged with its serial and the bytes the target's file held, its writes land in the
//! file, the initiator name is the pool's, growing is refused (a LUN is sized on the target), a
//! LUN is one volume, a volume from an image is written into its LUN, and deleting a volume
//! zeroes its LUN; `kill -9` of the real agents at several moments of claiming, attaching,
//! detaching and deleting a LUN's volume converges, and the LUN ends zeroed.
//!
//! One target per run: everything that needs it is in this one test. Needs tgt, libiscsi-bin,
//! qemu-block-extra, libvirtd and the tiny guest; `make test` provides all of them.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::json;
use support::guests::{self, boot_tiny_vm};
use support::repo;

const TARGET: &str = "iqn.2026-12.dev.flotilla:test-target";
const INITIATOR: &str = "iqn.2026-12.dev.flotilla:test-nodes";

/// A throwaway target with LUNs of the given sizes, stopped when dropped.
struct Target(PathBuf);

impl Target {
    fn start(dir: &Path, sizes: &[&str]) -> Target {
        let out = Command::new(repo().join("scripts/iscsi-target-up.sh"))
            .arg(dir)
            .arg(TARGET)
            .args(sizes)
            .output()
            .expect("scripts/iscsi-target-up.sh runs");
        let target = Target(dir.to_path_buf());
        assert!(
            out.status.success(),
            "the iSCSI target did not start (is tgt installed? make test installs it): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        target
    }

    fn lun(&self, n: u32) -> PathBuf {
        self.0.join(format!("lun{n}.img"))
    }

    fn read(&self, n: u32, offset: u64, len: usize) -> Vec<u8> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(self.lun(n)).unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        let mut bytes = vec![0u8; len];
        file.read_exact(&mut bytes).unwrap();
        bytes
    }

    /// The initiator names logged in to the target now.
    fn initiators(&self) -> String {
        let out = Command::new("tgtadm")
            .args([
                "-C", "7", "--lld", "iscsi", "--op", "show", "--mode", "conn", "--tid", "1",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/iscsi-target-down.sh"))
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iscsi_luns_are_volumes_a_guest_reads_and_writes() {
    let cluster = TestCluster::start().await;
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // No target answers yet (not even one an earlier, killed run left).
    let _ = Command::new("pkill")
        .args(["-9", "-f", "^tgtd -f -C 7 "])
        .status();
    let admin = &cluster.admin;
    let token = cluster.join_token().await;
    let mut agent_a = support::agent(&cluster.server.url, &token, "iscsi-a", cluster.dir.path());
    let mut agent_b = support::agent_with(
        &cluster.server.url,
        &token,
        "iscsi-b",
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

    admin
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "san"}, "spec": {"type": "iscsi", "iscsi": {
                "portal": "127.0.0.1:3261", "target": TARGET, "initiator": INITIATOR}}}),
        )
        .await
        .unwrap();
    // A pool made before its target answers is Failed on each node, with the reason, and
    // asked again within seconds (not at the next resync) once the target is up.
    let pool = eventually("both nodes report the missing target", 60, async || {
        let p = admin.get(pools, None, "san").await.ok()?;
        let failed = |n: &str| p["status"]["nodes"][n]["phase"] == "Failed";
        (failed("iscsi-a") && failed("iscsi-b")).then_some(p)
    })
    .await;
    let message = pool["status"]["nodes"]["iscsi-a"]["message"]
        .as_str()
        .unwrap();
    assert!(message.contains("iscsi-ls"), "{pool}");
    let target = Target::start(&cluster.dir.path().join("iscsi"), &["64M", "32M", "16M"]);
    let pool = eventually("both nodes serve the iscsi pool", 15, async || {
        let p = admin.get(pools, None, "san").await.ok()?;
        let ready = |n: &str| p["status"]["nodes"][n]["phase"] == "Ready";
        (ready("iscsi-a") && ready("iscsi-b")).then_some(p)
    })
    .await;
    // Both nodes joined one libvirtd: the one that takes no migrations publishes no host UUID.
    let nodes = lookup("node").unwrap();
    eventually("the nodes publish what migrations need", 30, async || {
        let a = admin.get(nodes, None, "iscsi-a").await.ok()?;
        let b = admin.get(nodes, None, "iscsi-b").await.ok()?;
        let (a, b) = (&a["status"]["nodeInfo"], &b["status"]["nodeInfo"]);
        a["hostUuid"]
            .is_string()
            .then_some(())
            .filter(|_| b["hostUuid"].is_null() && b["migrationUri"].is_null())
    })
    .await;
    let entry = &pool["status"]["nodes"]["iscsi-a"];
    assert_eq!(entry["volumes"], 3, "{pool}");
    assert_eq!(entry["capacity"], 112u64 << 20, "{pool}");

    // A LUN is named, raw, and one volume.
    let lun_volume = |name: &str, lun: u32, extra: serde_json::Value| {
        let mut spec = json!({"pool": "san", "size": "64Mi", "format": "raw", "lun": lun});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({"metadata": {"name": name}, "spec": spec})
    };
    for (body, field) in [
        (
            json!({"metadata": {"name": "x"}, "spec": {"pool": "san", "size": "64Mi", "format": "raw"}}),
            "spec.lun",
        ),
        (
            lun_volume("x", 1, json!({"format": "qcow2"})),
            "spec.format",
        ),
        (lun_volume("x", 1, json!({"pool": "default"})), "spec.lun"),
    ] {
        let refused = admin
            .create(volumes, Some("default"), &body)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some(422), "{body}: {refused}");
        assert!(refused.to_string().contains(field), "{body}: {refused}");
    }

    // The target's bytes at the LUN's start, before it is claimed.
    let suffix: u32 = rand::random::<u32>() % 100_000;
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(target.lun(1))
            .unwrap();
        write!(file, "hello-{suffix}").unwrap();
    }
    admin
        .create(
            volumes,
            Some("default"),
            &lun_volume("data", 1, json!({"size": "32Mi"})),
        )
        .await
        .unwrap();
    let volume = eventually("the LUN's volume is Available", 60, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    assert_eq!(volume["status"]["shared"], true, "{volume}");
    assert_eq!(volume["status"]["capacity"], 64u64 << 20, "{volume}");
    assert_eq!(
        volume["status"]["path"],
        format!("iscsi://127.0.0.1:3261/{TARGET}/1"),
        "{volume}"
    );
    let taken = admin
        .create(volumes, Some("default"), &lun_volume("again", 1, json!({})))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Some(422), "{taken}");
    assert!(taken.to_string().contains("default/data"), "{taken}");
    // It grows within its LUN, not past it.
    admin
        .patch(
            volumes,
            Some("default"),
            "data",
            &json!({"spec": {"size": "64Mi"}}),
            false,
        )
        .await
        .unwrap();
    let grow = admin
        .patch(
            volumes,
            Some("default"),
            "data",
            &json!({"spec": {"size": "128Mi"}}),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(grow.code(), Some(422), "{grow}");
    assert!(
        grow.to_string().contains("spec.size") && grow.to_string().contains("target"),
        "{grow}"
    );

    // A VM on the other node; the LUN plugged in, seen with its serial and the target's bytes.
    let name = format!("iscsi-{suffix}");
    boot_tiny_vm(admin, &name, "iscsi-b").await;
    let seen = guests::plug(admin, &name, "data", 131072, &format!("hello-{suffix}")).await;
    assert!(
        target.initiators().contains(INITIATOR),
        "QEMU logs in as the pool's initiator: {}",
        target.initiators()
    );
    let wanted = format!("guest-wrote-{}", seen.device);
    eventually("the guest's write is in the LUN", 30, async || {
        (target.read(1, 4096, wanted.len()) == wanted.as_bytes()).then_some(())
    })
    .await;
    let detach_s = guests::unplug(admin, &name, "data", &seen).await;
    println!(
        "iscsi volume on a running guest: plugged and seen {:.1} s, unplugged and gone {detach_s:.1} s",
        seen.seconds
    );

    // A volume from an image, written into its LUN.
    guests::seedling_image(admin, cluster.dir.path()).await;
    admin
        .create(
            volumes,
            Some("default"),
            &lun_volume(
                "from-image",
                2,
                json!({"size": "32Mi", "source": {"image": "seedling"}}),
            ),
        )
        .await
        .unwrap();
    eventually("the volume from the image is Available", 90, async || {
        let v = admin
            .get(volumes, Some("default"), "from-image")
            .await
            .ok()?;
        (v["status"]["phase"] == "Available").then_some(())
    })
    .await;
    assert_eq!(target.read(2, 0, 4096), vec![0x5a; 4096]);

    // kill -9 of both agents at several moments of each step of LUN 3's volume: each
    // converges, and the LUN ends zeroed.
    let mark = |round: &str| {
        use std::io::Write;
        let mut lun = std::fs::OpenOptions::new()
            .write(true)
            .open(target.lun(3))
            .unwrap();
        write!(lun, "{round}").unwrap();
    };
    mark("before");
    guests::crash_rounds(
        admin,
        &mut [&mut agent_a, &mut agent_b],
        &name,
        &[0, 80, 200, 500],
        |v| lun_volume(v, 3, json!({"size": "16Mi"})),
        |v| {
            assert!(
                target.read(3, 0, 4096).iter().all(|b| *b == 0),
                "{v}: LUN 3 is zeroed"
            );
            mark(v);
        },
    )
    .await;

    // Deleting a volume zeroes its LUN.
    admin.delete(vms, Some("default"), &name).await.unwrap();
    eventually("the VM is gone", 60, async || {
        admin
            .get(vms, Some("default"), &name)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    for v in ["data", "from-image"] {
        admin.delete(volumes, Some("default"), v).await.unwrap();
    }
    eventually("the volumes are gone", 60, async || {
        let left = admin
            .list(volumes, Some("default"), &Default::default())
            .await
            .ok()?;
        left["items"].as_array()?.is_empty().then_some(())
    })
    .await;
    assert!(
        target.read(1, 0, 8192).iter().all(|b| *b == 0),
        "LUN 1 is zeroed"
    );
    assert!(
        target.read(2, 0, 8192).iter().all(|b| *b == 0),
        "LUN 2 is zeroed"
    );
}
