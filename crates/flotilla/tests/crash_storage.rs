//! Crash safety of storage: `kill -9` of the real `flotilla agent` while it makes, attaches,
//! snapshots, merges, detaches and deletes volumes — in a dir pool and in an NFS pool (a real
//! nfs-ganesha, scripts/nfs-server-up.sh) — on a real libvirtd with a running guest, at several
//! moments of each step. Every step converges after the restart, the guest ends up with the
//! disk exactly when it should, and when everything is deleted no file is left in the pool's
//! directory or on the export.
//!
//! Needs libvirtd, the tiny guest and nfs-ganesha; `make test` provides them.

mod support;

use std::path::Path;
use std::time::Duration;

use flotilla_controllers::testkit::TestCluster;
use flotilla_types::registry::lookup;
use serde_json::{json, Value};
use support::guests::crash;
use support::nfs::{NfsServer, SERVER};
use support::{agent_dir, tiny_guest};

async fn eventually(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The files in `dir` (none when it does not exist).
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_volume_steps_converges_and_leaks_nothing() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    let (server, admin, tmp) = (&cluster.server, &cluster.admin, &cluster.dir);
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let nfs = NfsServer::start(&tmp.path().join("nfs"));
    let token = cluster.join_token().await;
    let node = "crash-storage";
    let mut agent = support::agent(&server.url, &token, node, tmp.path());
    let (vms, volumes, snapshots, pools) = (
        lookup("vm").unwrap(),
        lookup("volume").unwrap(),
        lookup("volumesnapshot").unwrap(),
        lookup("storagepool").unwrap(),
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
    let run = rand::random::<u32>() % 100_000;
    let vm_name = format!("crash-storage-{run}");
    let vm = json!({"metadata": {"name": vm_name}, "spec": {
        "nodeName": node, "resources": {"cpus": 1, "memory": "128Mi"}, "rootDisk": {"size": "32Mi"},
        "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0"}}});
    admin.create(vms, Some("default"), &vm).await.unwrap();
    eventually("the VM runs", 120, async || {
        admin
            .get(vms, Some("default"), &vm_name)
            .await
            .is_ok_and(|v| v["status"]["phase"] == "Running")
    })
    .await;
    let get = async |kind, name: &str| -> Option<Value> {
        admin.get(kind, Some("default"), name).await.ok()
    };

    for (pool, dir) in [
        ("default", agent_dir(tmp.path(), node).join("pools/default")),
        ("shared", nfs.export()),
    ] {
        for (i, delay_ms) in [0u64, 60, 150, 300, 600].into_iter().enumerate() {
            let name = format!("{pool}-{i}");
            let step = |what: &str| format!("{name}: {what} after the agent was killed");
            admin
                .create(
                    volumes,
                    Some("default"),
                    &json!({"metadata": {"name": name}, "spec": {"pool": pool, "size": "64Mi"}}),
                )
                .await
                .unwrap();
            crash(&mut [&mut agent], delay_ms).await;
            eventually(&step("made"), 90, async || {
                get(volumes, &name)
                    .await
                    .is_some_and(|v| v["status"]["phase"] == "Available")
            })
            .await;

            let disks = json!({"spec": {"disks": [{"name": "d", "volume": name}]}});
            admin
                .patch(vms, Some("default"), &vm_name, &disks, false)
                .await
                .unwrap();
            crash(&mut [&mut agent], delay_ms).await;
            eventually(&step("attached"), 90, async || {
                get(vms, &vm_name).await.is_some_and(|v| {
                    v["status"]["disks"][0]["state"] == "Attached"
                        && v["status"]["disks"][0]["volume"] == name.as_str()
                })
            })
            .await;

            if pool == "default" {
                let snap = format!("{name}-snap");
                let body = json!({"metadata": {"name": snap}, "spec": {"volume": name}});
                admin
                    .create(snapshots, Some("default"), &body)
                    .await
                    .unwrap();
                crash(&mut [&mut agent], delay_ms).await;
                eventually(&step("snapshot taken"), 90, async || {
                    get(snapshots, &snap)
                        .await
                        .is_some_and(|s| s["status"]["phase"] == "Ready")
                })
                .await;
                admin
                    .delete(snapshots, Some("default"), &snap)
                    .await
                    .unwrap();
                crash(&mut [&mut agent], delay_ms).await;
                eventually(&step("snapshot merged away"), 90, async || {
                    get(snapshots, &snap).await.is_none()
                })
                .await;
            }

            let none = json!({"spec": {"disks": []}});
            admin
                .patch(vms, Some("default"), &vm_name, &none, false)
                .await
                .unwrap();
            crash(&mut [&mut agent], delay_ms).await;
            eventually(&step("detached and let go of"), 90, async || {
                get(volumes, &name)
                    .await
                    .is_some_and(|v| v["status"].get("attachedTo").is_none())
            })
            .await;

            admin.delete(volumes, Some("default"), &name).await.unwrap();
            crash(&mut [&mut agent], delay_ms).await;
            eventually(&step("deleted"), 90, async || {
                get(volumes, &name).await.is_none()
            })
            .await;
            assert_eq!(
                files(&dir),
                Vec::<String>::new(),
                "{name}: no file is left in {}",
                dir.display()
            );
        }
    }

    // The guest still runs, on its own root disk only.
    let vm_now = get(vms, &vm_name).await.unwrap();
    assert_eq!(vm_now["status"]["phase"], "Running", "{vm_now}");
    assert!(vm_now["status"].get("disks").is_none(), "{vm_now}");
    admin.delete(vms, Some("default"), &vm_name).await.unwrap();
    eventually("the VM is gone", 90, async || {
        get(vms, &vm_name).await.is_none()
    })
    .await;
    agent.kill9();
}
