//! Storage pools through a real server and a real agent (libvirt's test driver): the `default`
//! pool every node serves from its data directory, a `dir` pool on a chosen directory reporting
//! its space, one QEMU could not reach reported as Failed with what to run, a node selector
//! deciding which nodes serve a pool (and a node leaving it losing its entry); volumes placed
//! on a node with room, made there and removed before their object goes, or pending with the
//! reason. (Node
//! credentials writing only their own entry: flotilla-server's tests/nodes.rs.)

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use flotilla_agent::AgentConfig;
use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_the_pools_that_select_them_and_report_their_space() {
    let cluster = TestCluster::start().await;
    let (server, admin, tmp) = (&cluster.server, &cluster.admin, &cluster.dir);
    let (pools, nodes) = (lookup("storagepool").unwrap(), lookup("node").unwrap());
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let agent_dir = tmp.path().join("agent");
    let mut config = AgentConfig::new(vec![server.url.clone()], "node-1", &agent_dir);
    config.join_token = Some(cluster.join_token().await);
    config.libvirt_uri = "test:///default".into();
    config.heartbeat = Duration::from_millis(500);
    config.resync = Duration::from_secs(1);
    config.labels = [("disk".to_string(), "ssd".to_string())].into();
    let libvirt = flotilla_agent::libvirt::Libvirt::open("test:///default")
        .await
        .unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(config, libvirt, stop_rx));

    let entry = |name: &'static str| {
        let admin = &admin;
        async move {
            let pool = admin.get(pools, None, name).await.ok()?;
            let entry = pool["status"]["nodes"]["node-1"].clone();
            (!entry.is_null()).then_some(entry)
        }
    };

    // The default pool: made by the server, served from the node's data directory.
    let default = eventually("node-1 serves the default pool", 30, async || {
        entry("default").await.filter(|e| e["phase"] == "Ready")
    })
    .await;
    assert_eq!(
        default["path"],
        agent_dir.join("pools/default").display().to_string()
    );
    assert!(default["capacity"].as_u64().unwrap() > 0, "{default}");
    assert!(default["available"].as_u64().unwrap() <= default["capacity"].as_u64().unwrap());
    assert_eq!(default["volumes"], 0);

    // A dir pool on a directory of our choosing, for nodes labelled disk=ssd: made, with its
    // space, and the volumes already in it counted.
    let fast = tmp.path().join("fast");
    std::fs::create_dir(&fast).unwrap();
    flotilla_controllers::testkit::blank_qcow2(&fast.join("existing.qcow2"), "16M");
    admin
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "fast"}, "spec": {"type": "dir", "path": fast, "nodeSelector": {"disk": "ssd"}}}),
        )
        .await
        .unwrap();
    let served = eventually("node-1 serves the fast pool", 30, async || {
        entry("fast").await.filter(|e| e["phase"] == "Ready")
    })
    .await;
    assert_eq!(served["volumes"], 1, "{served}");
    assert!(served["allocation"].as_u64().unwrap() > 0);

    // Volumes: placed on a node with room, made there by its agent (held by its finalizer),
    // and removed from the pool before the object goes.
    let volumes = lookup("volume").unwrap();
    let create = |name: &str, spec: serde_json::Value| {
        let body = json!({"metadata": {"name": name}, "spec": spec});
        async move { admin.create(volumes, Some("default"), &body).await }
    };
    let (code, message, fields) = flotilla_controllers::testkit::refused(
        create(
            "shared",
            json!({"pool": "fast", "size": "64Mi", "shareable": true}),
        )
        .await,
    );
    assert_eq!(
        (code, fields.as_slice()),
        (422, &["spec.shareable".to_string()][..]),
        "{message}"
    );
    let data = create("data", json!({"pool": "fast", "size": "64Mi"}))
        .await
        .unwrap();
    let uid = data["metadata"]["uid"].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let made = eventually("the volume is made", 30, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    eprintln!(
        "volume created -> Available: {} ms",
        started.elapsed().as_millis()
    );
    let file = fast.join(format!("{uid}.qcow2"));
    assert_eq!(made["status"]["node"], "node-1");
    assert_eq!(made["status"]["path"], file.display().to_string());
    assert_eq!(made["status"]["capacity"], 64u64 << 20);
    assert_eq!(
        made["metadata"]["finalizers"],
        json!(["flotilla.dev/volume"])
    );
    assert!(file.exists());
    // Grown (offline: no VM has it); shrinking is refused at the field.
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
    eventually("the volume grew", 30, async || {
        let v = admin.get(volumes, Some("default"), "data").await.ok()?;
        (v["status"]["capacity"] == 128u64 << 20).then_some(())
    })
    .await;
    let (code, message, fields) = flotilla_controllers::testkit::refused(
        admin
            .patch(
                volumes,
                Some("default"),
                "data",
                &json!({"spec": {"size": "64Mi"}}),
                false,
            )
            .await,
    );
    assert_eq!(
        (code, fields.as_slice()),
        (422, &["spec.size".to_string()][..]),
        "{message}"
    );
    assert!(message.contains("disks only grow"), "{message}");

    // Clones, beside their source: linked (an overlay of it) and full (a copy); the source
    // cannot go while a linked clone needs it.
    for (spec, field) in [
        (
            json!({"pool": "fast", "size": "64Mi", "source": {"volume": "data"}}),
            "spec.size",
        ),
        (
            json!({"pool": "fast", "size": "1Gi", "source": {"volume": "nothing"}}),
            "spec.source.volume",
        ),
        (
            json!({"pool": "default", "size": "1Gi", "source": {"volume": "data"}}),
            "spec.source.volume",
        ),
        (
            json!({"pool": "fast", "size": "1Gi", "format": "raw", "source": {"volume": "data", "mode": "linked"}}),
            "spec.source.mode",
        ),
    ] {
        let (code, message, fields) =
            flotilla_controllers::testkit::refused(create("bad", spec).await);
        assert_eq!(
            (code, fields.as_slice()),
            (422, &[field.to_string()][..]),
            "{message}"
        );
    }
    let qemu_backing = |file: &str| {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json", file])
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        info["backing-filename"].as_str().map(str::to_string)
    };
    for (name, mode) in [("copy", "linked"), ("twin", "full")] {
        create(
            name,
            json!({"pool": "fast", "size": "128Mi", "source": {"volume": "data", "mode": mode}}),
        )
        .await
        .unwrap();
    }
    for (name, backing) in [("copy", Some(file.display().to_string())), ("twin", None)] {
        let made = eventually("the clone is made", 30, async || {
            let v = admin.get(volumes, Some("default"), name).await.ok()?;
            (v["status"]["phase"] == "Available").then_some(v)
        })
        .await;
        assert_eq!(made["status"]["node"], "node-1");
        assert_eq!(
            qemu_backing(made["status"]["path"].as_str().unwrap()),
            backing,
            "{name}"
        );
    }
    let (code, message, _) = flotilla_controllers::testkit::refused(
        admin.delete(volumes, Some("default"), "data").await,
    );
    assert_eq!(code, 409, "{message}");
    assert!(message.contains("backs the linked clone copy"), "{message}");
    for name in ["copy", "twin"] {
        admin.delete(volumes, Some("default"), name).await.unwrap();
    }
    eventually("the clones are gone", 30, async || {
        let gone = admin.get(volumes, Some("default"), "copy").await.is_err()
            && admin.get(volumes, Some("default"), "twin").await.is_err();
        gone.then_some(())
    })
    .await;
    // Too big for any node, or in a pool that does not exist: Pending, and why.
    create("huge", json!({"pool": "fast", "size": "4Ti"}))
        .await
        .unwrap();
    create("lost", json!({"pool": "nowhere", "size": "1Gi"}))
        .await
        .unwrap();
    for (name, why) in [
        ("huge", "bytes free"),
        ("lost", "there is no StoragePool \"nowhere\""),
    ] {
        let pending = eventually("the volume says why it waits", 30, async || {
            let v = admin.get(volumes, Some("default"), name).await.ok()?;
            v["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(why))
                .then_some(v)
        })
        .await;
        assert_eq!(pending["status"]["phase"], "Pending");
        assert!(pending["status"].get("node").is_none(), "{pending}");
    }
    // A pool that over-commits (a thousand times) takes it: a thin volume, nothing written.
    admin
        .patch(
            pools,
            None,
            "fast",
            &json!({"spec": {"allocationLimitPercent": 100000}}),
            false,
        )
        .await
        .unwrap();
    eventually("the over-committed volume is made", 30, async || {
        let v = admin.get(volumes, Some("default"), "huge").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(())
    })
    .await;
    // The pool holds volumes: it cannot go before them.
    let (code, message, _) =
        flotilla_controllers::testkit::refused(admin.delete(pools, None, "fast").await);
    assert_eq!(code, 409, "{message}");
    assert!(
        message.contains("holds 2 volumes (default/data, default/huge)"),
        "{message}"
    );
    for name in ["data", "huge", "lost"] {
        admin.delete(volumes, Some("default"), name).await.unwrap();
    }
    eventually("the volumes are gone", 30, async || {
        let list = admin
            .list(volumes, Some("default"), &Default::default())
            .await
            .ok()?;
        list["items"].as_array()?.is_empty().then_some(())
    })
    .await;
    assert!(!file.exists(), "the volume's file went before the object");

    // One QEMU cannot reach: Failed, saying what to run.
    let closed = tmp.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    admin
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "closed"}, "spec": {"path": closed.join("pool")}}),
        )
        .await
        .unwrap();
    let failed = eventually("the closed pool is reported", 30, async || {
        entry("closed").await.filter(|e| e["phase"] == "Failed")
    })
    .await;
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("chmod o+x {}", closed.display())),
        "{message}"
    );

    // A pool for other nodes gets no entry from this one; a node that stops matching loses its.
    admin
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "elsewhere"}, "spec": {"path": tmp.path().join("elsewhere"), "nodeSelector": {"disk": "hdd"}}}),
        )
        .await
        .unwrap();
    admin
        .patch(
            nodes,
            None,
            "node-1",
            &json!({"metadata": {"labels": {"disk": "nvme"}}}),
            false,
        )
        .await
        .unwrap();
    eventually("node-1 no longer serves the fast pool", 30, async || {
        entry("fast").await.is_none().then_some(())
    })
    .await;
    assert!(entry("elsewhere").await.is_none());
    assert!(
        !tmp.path().join("elsewhere").exists(),
        "a pool this node does not serve is not made here"
    );
}

/// An `lvm` pool at the configuration level: its nodes say whether they can serve it — on this
/// machine the kernel has no device-mapper, which the node says; elsewhere what `vgs` says of a
/// group that does not exist — and a volume in it is refused at once, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_lvm_pool_says_why_its_nodes_cannot_serve_it() {
    let cluster = TestCluster::start().await;
    let (admin, tmp) = (&cluster.admin, &cluster.dir);
    let (pools, volumes) = (lookup("storagepool").unwrap(), lookup("volume").unwrap());
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let _stop = common::test_driver_agent(&cluster, "lvm-node", tmp.path().join("a")).await;

    let refused = admin
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "vg"}, "spec": {"type": "lvm"}}),
        )
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("spec.volumeGroup"),
        "{refused}"
    );
    let pool = json!({"metadata": {"name": "vg"}, "spec": {"type": "lvm", "volumeGroup": "flotilla-test-absent"}});
    admin.create(pools, None, &pool).await.unwrap();
    let entry = eventually("the node reports the lvm pool", 60, async || {
        let p = admin.get(pools, None, "vg").await.ok()?;
        let entry = p["status"]["nodes"]["lvm-node"].clone();
        (!entry.is_null()).then_some(entry)
    })
    .await;
    assert_eq!(entry["phase"], "Failed", "{entry}");
    let message = entry["message"].as_str().unwrap();
    if std::path::Path::new("/dev/mapper/control").exists() {
        assert!(message.contains("flotilla-test-absent"), "{message}");
    } else {
        assert!(message.contains("device-mapper"), "{message}");
    }
    let volume = json!({"metadata": {"name": "lv"}, "spec": {"pool": "vg", "size": "16Mi"}});
    let refused = admin
        .create(volumes, Some("default"), &volume)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(refused.to_string().contains("spec.pool"), "{refused}");
}

/// An `rbd` pool (and an `iscsi` one) is checked at the door (its type's fields, monitor addresses and a keyring
/// path that reaches QEMU's option syntax), a node says why it cannot reach the cluster — a
/// keyring it lacks, monitors that do not answer (within seconds, not minutes) — and a qcow2
/// volume has no place in it. The real cluster is in `volumes_rbd`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rbd_pool_is_checked_and_its_nodes_say_why_they_cannot_reach_it() {
    let cluster = TestCluster::start().await;
    let (admin, tmp) = (&cluster.admin, &cluster.dir);
    let (pools, volumes) = (lookup("storagepool").unwrap(), lookup("volume").unwrap());
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let _stop = common::test_driver_agent(&cluster, "rbd-node", tmp.path().join("a")).await;

    let bad = [
        (json!({"type": "rbd"}), "spec.rbd"),
        (
            json!({"type": "rbd", "path": "/srv/x", "rbd": {"monitors": ["m"], "pool": "p"}}),
            "spec.path",
        ),
        (
            json!({"type": "rbd", "rbd": {"monitors": ["m1,m2"], "pool": "p"}}),
            "spec.rbd.monitors[0]",
        ),
        (
            json!({"type": "rbd", "rbd": {"monitors": ["m"], "pool": "p", "keyring": "/etc/a:b"}}),
            "spec.rbd.keyring",
        ),
        (
            json!({"type": "dir", "rbd": {"monitors": ["m"], "pool": "p"}}),
            "spec.rbd",
        ),
        (json!({"type": "iscsi"}), "spec.iscsi"),
        (json!({"type": "nfs"}), "spec.nfs"),
        (
            json!({"type": "nfs", "nfs": {"server": "nfs1", "export": "/a/../etc"}}),
            "spec.nfs.export",
        ),
        (
            json!({"type": "nfs", "nfs": {"server": "nfs1 -o", "export": "/export"}}),
            "spec.nfs.server",
        ),
        (
            json!({"type": "iscsi", "iscsi": {"portal": "10.0.0.1", "target": "not-an-iqn"}}),
            "spec.iscsi.target",
        ),
        (
            json!({"type": "iscsi", "iscsi": {"portal": "10.0.0.1,file.driver=file",
                   "target": "iqn.2026-12.dev.flotilla:t"}}),
            "spec.iscsi.portal",
        ),
    ];
    for (spec, field) in bad {
        let refused = admin
            .create(
                pools,
                None,
                &json!({"metadata": {"name": "bad"}, "spec": spec}),
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some(422), "{spec}: {refused}");
        assert!(refused.to_string().contains(field), "{spec}: {refused}");
    }

    let keyring = tmp.path().join("ceph.client.flotilla.keyring");
    let pool = |name: &str, monitor: &str| {
        json!({"metadata": {"name": name}, "spec": {"type": "rbd", "rbd": {
            "monitors": [monitor], "pool": "flotilla", "user": "flotilla", "keyring": keyring}}})
    };
    std::fs::write(
        &keyring,
        "[client.flotilla]\n\tkey = AQA2tQ9rs8S6DhAAyVnxmm11y7PfjwwJ0xS3GA==\n",
    )
    .unwrap();
    let entry = |name: &'static str| async move {
        eventually("the node reports the rbd pool", 60, async || {
            let p = admin.get(pools, None, name).await.ok()?;
            let entry = p["status"]["nodes"]["rbd-node"].clone();
            (entry["phase"] == "Failed").then_some(entry)
        })
        .await
    };
    let started = std::time::Instant::now();
    admin
        .create(pools, None, &pool("unreachable", "127.0.0.1:1"))
        .await
        .unwrap();
    let failed = entry("unreachable").await;
    let message = failed["message"].as_str().unwrap();
    assert!(message.contains("timed out"), "{message}");
    assert!(started.elapsed() < std::time::Duration::from_secs(45));
    admin
        .create(
            pools,
            None,
            &json!({"metadata": {"name": "missing"}, "spec": {"type": "rbd", "rbd": {
                "monitors": ["127.0.0.1:1"], "pool": "flotilla", "keyring": "/nonexistent/k"}}}),
        )
        .await
        .unwrap();
    let missing = entry("missing").await;
    assert!(
        missing["message"]
            .as_str()
            .unwrap()
            .contains("cannot read the keyring"),
        "{missing}"
    );

    let qcow2 = json!({"metadata": {"name": "q"}, "spec": {"pool": "unreachable", "size": "16Mi"}});
    let refused = admin
        .create(volumes, Some("default"), &qcow2)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(refused.to_string().contains("spec.format"), "{refused}");
    // In a dir pool a linked clone is a qcow2 overlay: a raw one is refused, saying why.
    let raw_linked = json!({"metadata": {"name": "r"}, "spec": {"size": "16Mi", "format": "raw",
        "source": {"volume": "nothing", "mode": "linked"}}});
    let refused = admin
        .create(volumes, Some("default"), &raw_linked)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(
        refused.to_string().contains("spec.source.mode"),
        "{refused}"
    );
}
