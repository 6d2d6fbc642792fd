//! The full VM lifecycle through a real server, its controllers and a real agent on libvirt's
//! test driver: join, heartbeat, scheduling, provisioning (image cache, linked clone, seed ISO),
//! power states, deletion leaving nothing behind, and restarts reusing credentials.

use std::path::Path;
use std::time::Duration;

use flotilla_agent::libvirt::{DomainState, Libvirt};
use flotilla_agent::AgentConfig;
use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::{json, Value};

fn cond(obj: &Value, ty: &str) -> String {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == ty))
        .and_then(|c| c["status"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_lifecycle_on_the_test_driver() {
    let cluster = TestCluster::start().await;
    let (server, admin, tmp) = (&cluster.server, &cluster.admin, &cluster.dir);
    let (vms, nodes, images) = (
        lookup("vm").unwrap(),
        lookup("node").unwrap(),
        lookup("image").unwrap(),
    );

    // A small qcow2 image on "the node".
    let image_file = tmp.path().join("base.qcow2");
    flotilla_controllers::testkit::blank_qcow2(&image_file, "64M");
    admin
        .create(
            images,
            Some("default"),
            &json!({"metadata": {"name": "base"}, "spec": {"source": {"path": image_file}}}),
        )
        .await
        .unwrap();

    let agent_dir = tmp.path().join("agent");
    let mut agent_config = AgentConfig::new(vec![server.url.clone()], "node-1", &agent_dir);
    agent_config.join_token = Some(cluster.join_token().await);
    agent_config.libvirt_uri = "test:///default".into();
    agent_config.heartbeat = Duration::from_millis(500);
    // Long enough that only libvirt's lifecycle events can explain a quick reaction below.
    agent_config.resync = Duration::from_secs(600);
    agent_config.shutdown_timeout = Duration::from_secs(2);
    agent_config.tunnel_address = Some("192.0.2.9".parse().unwrap());
    let libvirt = Libvirt::open("test:///default").await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(flotilla_agent::run_with(
        agent_config.clone(),
        libvirt.clone(),
        stop_rx,
    ));

    // The node joins, reports itself and becomes Ready.
    let node = eventually("node-1 is Ready", 20, async || {
        let n = admin.get(nodes, None, "node-1").await.ok()?;
        (cond(&n, "Ready") == "True").then_some(n)
    })
    .await;
    assert_eq!(node["status"]["nodeInfo"]["virtType"], "qemu");
    assert_eq!(
        node["status"]["addresses"]["tunnel"], "192.0.2.9",
        "the overlay's tunnels end where --tunnel-address says"
    );
    assert!(node["status"]["capacity"]["cpus"].as_u64().unwrap() > 0);
    assert!(node["status"]["nodeInfo"]["libvirtVersion"]
        .as_str()
        .unwrap()
        .contains('.'));
    let unmanaged = node["status"]["unmanagedDomains"].as_array().unwrap();
    assert!(
        unmanaged.iter().any(|d| d["name"] == "test"),
        "the driver's own domain is listed as unmanaged: {unmanaged:?}"
    );

    // A VM without a node is scheduled here and provisioned, with a NIC on an overlay network.
    admin
        .create(
            lookup("network").unwrap(),
            Some("default"),
            &json!({"metadata": {"name": "back"}, "spec": {"cidr": "10.0.0.0/24"}}),
        )
        .await
        .unwrap();
    let vm = json!({"metadata": {"name": "web"}, "spec": {
        "networks": [{"network": "back"}],
        "resources": {"cpus": 2, "memory": "1Gi"}, "image": "base", "rootDisk": {"size": "1Gi"},
        "sshAuthorizedKeys": ["ssh-ed25519 AAAAC3Nza test@flotilla"], "userData": "#cloud-config\nruncmd: [echo hi]\n"}});
    admin.create(vms, Some("default"), &vm).await.unwrap();
    let running = eventually("web is Running", 30, async || {
        let v = admin.get(vms, Some("default"), "web").await.ok()?;
        (v["status"]["phase"] == "Running").then_some(v)
    })
    .await;
    assert_eq!(running["spec"]["nodeName"], "node-1");
    assert_eq!(running["status"]["nodeName"], "node-1");
    assert_eq!(
        running["status"]["observedGeneration"],
        running["metadata"]["generation"]
    );
    assert_eq!(cond(&running, "Ready"), "True");
    assert!(running["metadata"]["finalizers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "flotilla.dev/agent"));
    let uid = running["metadata"]["uid"].as_str().unwrap().to_string();
    // What happened is in its events, found as kubectl describe finds them (core v1).
    let events = lookup("event").unwrap();
    let reasons = eventually("the VM's events are recorded", 10, async || {
        let list = admin
            .list(
                events,
                Some("default"),
                &flotilla_client::ListParams {
                    field_selector: Some(format!(
                        "involvedObject.uid={uid},involvedObject.kind=VirtualMachine"
                    )),
                    ..Default::default()
                },
            )
            .await
            .ok()?;
        let reasons: Vec<String> = list["items"]
            .as_array()?
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect();
        (reasons.contains(&"Scheduled".to_string()) && reasons.contains(&"Started".to_string()))
            .then_some(list)
    })
    .await;
    assert_eq!(reasons["apiVersion"], "v1");
    for e in reasons["items"].as_array().unwrap() {
        assert_eq!(e["type"], "Normal", "{e}");
        assert_eq!(e["count"], 1, "{e}");
    }
    assert_eq!(
        libvirt.state(&uid).await.unwrap(),
        Some(DomainState::Running),
        "the domain UUID is the VM uid"
    );
    let vm_dir = agent_dir.join("vms").join(&uid);
    let mut files = files_in(&vm_dir);
    files.sort();
    assert!(
        files.contains(&"root.qcow2".to_string()) && files.contains(&"seed.iso".to_string()),
        "{files:?}"
    );
    // The root disk is a linked clone of the cached image, grown to rootDisk.size.
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(vm_dir.join("root.qcow2"))
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 1u64 << 30);
    assert!(info["backing-filename"]
        .as_str()
        .unwrap()
        .starts_with(agent_dir.join("images").to_str().unwrap()));
    let image = admin.get(images, Some("default"), "base").await.unwrap();
    assert_eq!(
        image["status"]["nodes"]["node-1"]["phase"], "Ready",
        "the node reports the cached image: {image}"
    );
    let xml = libvirt.xml(&uid).await.unwrap().unwrap();
    assert!(
        xml.contains("<name>default_web</name>") && xml.contains("flotilla.dev/xmlns/domain/1"),
        "{xml}"
    );
    // Its NIC: the MAC IPAM gave it, on the network's bridge, with the overlay's MTU.
    let mac = running["status"]["interfaces"][0]["macAddress"]
        .as_str()
        .unwrap();
    assert_eq!(running["status"]["ips"], json!(["10.0.0.3"]));
    for part in [
        format!("<mac address='{mac}'/>"),
        "<source bridge='fb-4096'/>".to_string(),
        "<mtu size='1450'/>".to_string(),
        "<model type='virtio'/>".to_string(),
    ] {
        assert!(xml.contains(&part), "{part} in {xml}");
    }

    // The domain dies behind Flotilla's back: the lifecycle event brings the agent back at once
    // (powerState Running is the desired state, so it is started again).
    libvirt.destroy(&uid).await.unwrap();
    eventually("the destroyed domain is started again", 10, async || {
        (libvirt.state(&uid).await.ok()? == Some(DomainState::Running)).then_some(())
    })
    .await;

    // Stop, then start again.
    admin
        .patch(
            vms,
            Some("default"),
            "web",
            &json!({"spec": {"powerState": "Stopped"}}),
            false,
        )
        .await
        .unwrap();
    eventually("web is Stopped", 20, async || {
        (admin.get(vms, Some("default"), "web").await.ok()?["status"]["phase"] == "Stopped")
            .then_some(())
    })
    .await;
    assert_eq!(
        libvirt.state(&uid).await.unwrap(),
        Some(DomainState::Stopped)
    );
    admin
        .patch(
            vms,
            Some("default"),
            "web",
            &json!({"spec": {"powerState": "Running"}}),
            false,
        )
        .await
        .unwrap();
    eventually("web runs again", 20, async || {
        (admin.get(vms, Some("default"), "web").await.ok()?["status"]["phase"] == "Running")
            .then_some(())
    })
    .await;

    // A restart request is carried out once.
    admin
        .patch(
            vms,
            Some("default"),
            "web",
            &json!({"metadata": {"annotations": {"flotilla.dev/restart-requested-at": "t1"}}}),
            false,
        )
        .await
        .unwrap();
    eventually("the restart is acknowledged", 20, async || {
        (admin.get(vms, Some("default"), "web").await.ok()?["status"]["lastRestartRequest"] == "t1")
            .then_some(())
    })
    .await;
    assert_eq!(
        libvirt.state(&uid).await.unwrap(),
        Some(DomainState::Running)
    );

    // Delete: the object waits for the agent, which leaves nothing behind.
    admin.delete(vms, Some("default"), "web").await.unwrap();
    eventually("web is gone", 20, async || {
        admin
            .get(vms, Some("default"), "web")
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert_eq!(
        libvirt.state(&uid).await.unwrap(),
        None,
        "the domain is undefined"
    );
    assert!(!vm_dir.exists(), "every file of the VM is removed");

    // A restarted agent reuses its credentials: no join token needed.
    stop_tx.send(true).unwrap();
    agent.await.unwrap().unwrap();
    let mut again = agent_config.clone();
    again.join_token = None;
    let (_stop2, rx2) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(again, libvirt.clone(), rx2));
    admin.create(vms, Some("default"), &json!({"metadata": {"name": "after"}, "spec": {"resources": {"cpus": 1, "memory": "256Mi"}, "boot": {"kernel": "/boot/vmlinuz"}}})).await.unwrap();
    eventually("the restarted agent runs new VMs", 20, async || {
        (admin.get(vms, Some("default"), "after").await.ok()?["status"]["phase"] == "Running")
            .then_some(())
    })
    .await;
}
