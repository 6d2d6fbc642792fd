//! Attaching volumes through a real server, scheduler and two agents (libvirt's test driver,
//! which has no hot-plug: the VMs here are stopped, so their disks live in the definition).
//! A volume holds one VM at a time (409 naming the holder, also for creates racing each
//! other), pins it to the volume's node, cannot be deleted while attached, and is let go of
//! when the VM drops it, is deleted, or is deleted before it ever reached a node. The guest's
//! side (plug, grow, unplug on a running VM): tests/volumes_qemu.rs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use flotilla_agent::AgentConfig;
use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::{json, Value};

fn vm(name: &str, volumes: &[&str]) -> Value {
    let disks: Vec<Value> = volumes
        .iter()
        .map(|v| json!({"name": format!("d-{v}"), "volume": v}))
        .collect();
    json!({"metadata": {"name": name}, "spec": {
        "powerState": "Stopped", "resources": {"cpus": 1, "memory": "64Mi"},
        "boot": {"kernel": "/k"}, "disks": disks}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_holds_one_vm_pins_it_and_is_let_go_of() {
    let cluster = TestCluster::start().await;
    let (server, admin, tmp) = (&cluster.server, &cluster.admin, &cluster.dir);
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for node in ["node-a", "node-b"] {
        let mut config = AgentConfig::new(vec![server.url.clone()], node, tmp.path().join(node));
        config.join_token = Some(cluster.join_token().await);
        config.libvirt_uri = "test:///default".into();
        config.heartbeat = Duration::from_millis(500);
        config.resync = Duration::from_secs(1);
        let libvirt = flotilla_agent::libvirt::Libvirt::open("test:///default")
            .await
            .unwrap();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        std::mem::forget(stop);
        tokio::spawn(flotilla_agent::run_with(config, libvirt, stop_rx));
    }
    let (vms, volumes) = (lookup("vm").unwrap(), lookup("volume").unwrap());
    let ns = Some("default");
    let available = |name: &'static str| async move {
        eventually(&format!("volume {name} is Available"), 60, async || {
            let v = admin.get(volumes, ns, name).await.ok()?;
            (v["status"]["phase"] == "Available").then_some(v)
        })
        .await
    };
    for name in ["data", "other"] {
        let volume = json!({"metadata": {"name": name}, "spec": {"size": "16Mi"}});
        admin.create(volumes, ns, &volume).await.unwrap();
    }
    let data = available("data").await;
    let other = available("other").await;
    let home = data["status"]["node"].as_str().unwrap().to_string();

    // The VM goes where its volume is, and the volume lists it.
    let a = admin.create(vms, ns, &vm("a", &["data"])).await.unwrap();
    let a_uid = a["metadata"]["uid"].as_str().unwrap().to_string();
    let a = eventually("a is Stopped with its disk defined", 60, async || {
        let v = admin.get(vms, ns, "a").await.ok()?;
        (v["status"]["phase"] == "Stopped" && v["status"]["disks"][0]["state"] == "Defined")
            .then_some(v)
    })
    .await;
    assert_eq!(
        a["spec"]["nodeName"],
        home.as_str(),
        "pinned to the volume's node"
    );
    let disk = &a["status"]["disks"][0];
    assert_eq!(
        (&disk["name"], &disk["volume"]),
        (&json!("d-data"), &json!("data"))
    );
    let serial: String = data["metadata"]["uid"]
        .as_str()
        .unwrap()
        .chars()
        .take(20)
        .collect();
    assert_eq!(disk["serial"], serial.as_str());
    let held = admin.get(volumes, ns, "data").await.unwrap();
    assert_eq!(
        held["status"]["attachedTo"],
        json!([{"vm": "a", "uid": a_uid}])
    );

    // Held: another VM gets a 409 naming the holder; the volume cannot be deleted.
    let refused = admin
        .create(vms, ns, &vm("b", &["data"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(409), "{refused}");
    assert!(refused.to_string().contains("\"a\""), "{refused}");
    let refused = admin.delete(volumes, ns, "data").await.unwrap_err();
    assert_eq!(refused.code(), Some(409), "{refused}");
    assert!(
        refused.to_string().contains("attached to VM a"),
        "{refused}"
    );

    // A volume the project lacks, or on another node than the VM: 422 at the field.
    let refused = admin
        .create(vms, ns, &vm("c", &["nope"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(
        refused.to_string().contains("spec.disks[0].volume"),
        "{refused}"
    );
    let elsewhere = if other["status"]["node"] == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    let mut pinned = vm("c", &["other"]);
    pinned["spec"]["nodeName"] = json!(elsewhere);
    let refused = admin.create(vms, ns, &pinned).await.unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(refused.to_string().contains("lives on node"), "{refused}");

    // Dropped from the spec: the definition loses it, the volume lets go, b may have it.
    admin
        .patch(vms, ns, "a", &json!({"spec": {"disks": []}}), false)
        .await
        .unwrap();
    eventually("data is let go of", 30, async || {
        let v = admin.get(volumes, ns, "data").await.ok()?;
        v["status"].get("attachedTo").is_none().then_some(())
    })
    .await;
    let a = admin.get(vms, ns, "a").await.unwrap();
    assert!(a["status"].get("disks").is_none(), "{a}");
    admin.create(vms, ns, &vm("b", &["data"])).await.unwrap();

    // Deleting the holder lets go too.
    eventually("b holds data", 30, async || {
        let v = admin.get(vms, ns, "b").await.ok()?;
        (v["status"]["disks"][0]["state"] == "Defined").then_some(())
    })
    .await;
    admin.delete(vms, ns, "b").await.unwrap();
    eventually("data is let go of by the deleted b", 30, async || {
        let v = admin.get(volumes, ns, "data").await.ok()?;
        v["status"].get("attachedTo").is_none().then_some(())
    })
    .await;

    // Creates racing for one volume: exactly one wins.
    let bodies: Vec<Value> = (0..8)
        .map(|i| vm(&format!("racer-{i}"), &["other"]))
        .collect();
    let racers =
        futures::future::join_all(bodies.iter().map(|body| admin.create(vms, ns, body))).await;
    let mut won = 0;
    for r in racers {
        match r {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e.code(), Some(409), "{e}"),
        }
    }
    assert_eq!(won, 1, "one VM holds the volume");
    let other = admin.get(volumes, ns, "other").await.unwrap();
    assert_eq!(other["status"]["attachedTo"].as_array().unwrap().len(), 1);

    // A VM that never reached a node holds its volume until it is deleted.
    let winner = other["status"]["attachedTo"][0]["vm"]
        .as_str()
        .unwrap()
        .to_string();
    admin.delete(vms, ns, &winner).await.unwrap();
    eventually("other is let go of", 30, async || {
        let v = admin.get(volumes, ns, "other").await.ok()?;
        v["status"].get("attachedTo").is_none().then_some(())
    })
    .await;
    let mut nowhere = vm("lost", &["other"]);
    nowhere["spec"]["nodeSelector"] = json!({"zone": "nowhere"});
    admin.create(vms, ns, &nowhere).await.unwrap();
    admin.delete(vms, ns, "lost").await.unwrap();
    eventually(
        "the controller lets go for the unscheduled VM",
        30,
        async || {
            let v = admin.get(volumes, ns, "other").await.ok()?;
            v["status"].get("attachedTo").is_none().then_some(())
        },
    )
    .await;
}

/// Downloading a volume: its whole chain (here a snapshot under the current overlay) comes
/// back as one standalone file, qcow2 or raw, with the same content; not while a running VM
/// writes it; nothing is left beside the volume afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_downloads_as_one_standalone_file() {
    use futures::StreamExt;
    let cluster = TestCluster::start().await;
    let (admin, tmp) = (&cluster.admin, &cluster.dir);
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let _stop = common::test_driver_agent(&cluster, "dl-node", tmp.path().join("a")).await;
    let (vms, volumes, snapshots) = (
        lookup("vm").unwrap(),
        lookup("volume").unwrap(),
        lookup("volumesnapshot").unwrap(),
    );
    let ns = Some("default");
    let volume = json!({"metadata": {"name": "src"}, "spec": {"size": "16Mi"}});
    admin.create(volumes, ns, &volume).await.unwrap();
    let path_when = async |what: &str, done: fn(&Value) -> bool| -> String {
        eventually(what, 60, async || {
            let v = admin.get(volumes, ns, "src").await.ok()?;
            done(&v).then(|| v["status"]["path"].as_str().unwrap().to_string())
        })
        .await
    };
    let base = path_when("the volume is Available", |v| {
        v["status"]["phase"] == "Available"
    })
    .await;
    let io = |path: &str, command: &str| {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", command, path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    io(&base, "write -q -P 0x11 0 1M");
    let snapshot = json!({"metadata": {"name": "s"}, "spec": {"volume": "src"}});
    admin.create(snapshots, ns, &snapshot).await.unwrap();
    let base_clone = base.clone();
    let top = eventually("the volume moved onto an overlay", 60, async || {
        let v = admin.get(volumes, ns, "src").await.ok()?;
        let p = v["status"]["path"].as_str()?.to_string();
        (p != base_clone).then_some(p)
    })
    .await;
    io(&top, "write -q -P 0x22 2M 1M");

    let download =
        async |format: &str| -> Result<std::path::PathBuf, flotilla_client::ClientError> {
            let stream = admin.volume_data("default", "src", format).await?;
            let mut stream = std::pin::pin!(stream);
            let file = tmp.path().join(format!("download.{format}"));
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.next().await {
                bytes.extend_from_slice(&chunk?);
            }
            std::fs::write(&file, bytes).unwrap();
            Ok(file)
        };
    let info = |path: &std::path::Path| -> Value {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(path)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let compare = |format: &str, path: &std::path::Path| {
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-U", "-F", format, "-f", "qcow2", &top])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    for format in ["qcow2", "raw"] {
        let file = download(format).await.unwrap();
        let got = info(&file);
        assert_eq!(got["format"], format, "{got}");
        assert!(got.get("backing-filename").is_none(), "standalone: {got}");
        assert_eq!(got["virtual-size"], 16u64 << 20, "{got}");
        compare(format, &file);
    }
    let refused = admin
        .volume_data("default", "src", "vmdk")
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), Some(422), "{refused}");
    let pool = std::path::Path::new(&top).parent().unwrap().to_path_buf();
    let files = || std::fs::read_dir(&pool).unwrap().count();
    assert_eq!(
        files(),
        2,
        "the snapshot's file and the overlay, no export copy left"
    );

    // A running VM writes it: refused, saying what to do.
    let mut running = vm("writer", &["src"]);
    running["spec"]["powerState"] = json!("Running");
    admin.create(vms, ns, &running).await.unwrap();
    eventually("the writer runs", 60, async || {
        let v = admin.get(vms, ns, "writer").await.ok()?;
        (v["status"]["phase"] == "Running").then_some(())
    })
    .await;
    let refused = admin
        .volume_data("default", "src", "qcow2")
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), Some(409), "{refused}");
    assert!(refused.to_string().contains("running VM"), "{refused}");
}
