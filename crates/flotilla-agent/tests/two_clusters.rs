//! Two Flotilla clusters on one libvirtd (a reinstall beside running VMs, or two installations
//! sharing a host): each agent removes only the domains of its own cluster and node, and lists
//! the other's as unmanaged; legacy domains (no cluster recorded) are removed only by the agent
//! whose data directory holds their files. Real servers, real agents, real libvirtd.

use std::time::Duration;

use flotilla_agent::domain::{DomainSpec, VirtType};
use flotilla_agent::libvirt::Libvirt;
use flotilla_agent::AgentConfig;
use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::json;

async fn start_agent(cluster: &TestCluster, node: &str) -> tokio::sync::watch::Sender<bool> {
    let mut config = AgentConfig::new(
        vec![cluster.server.url.clone()],
        node,
        cluster.path().join("agent"),
    );
    config.join_token = Some(cluster.join_token().await);
    config.heartbeat = Duration::from_millis(500);
    // The guest suites own this host's security group rules (one agent per network namespace).
    config.firewall = false;
    // Orphans are swept at every resync: make it quick.
    config.resync = Duration::from_secs(1);
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        flotilla_agent::run(config, rx)
            .await
            .expect("the agent runs")
    });
    stop
}

/// A stopped domain with Flotilla's metadata, defined behind the agents' backs.
fn domain(name: &str, uuid: &str, cluster: &str, node: &str) -> String {
    DomainSpec {
        virt_type: VirtType::Qemu,
        name: name.into(),
        uuid: uuid.into(),
        project: "default".into(),
        vm_name: name.into(),
        cluster_id: cluster.into(),
        node: node.into(),
        cpus: 1,
        memory_bytes: 64 << 20,
        boot: None,
        root_disk: None,
        disks: Vec::new(),
        seed_iso: None,
        openstack_sysinfo: false,
        nics: Vec::new(),
        console_log: "/dev/null".into(),
        serial_socket: "/tmp/unused-serial.sock".into(),
    }
    .to_xml()
}

/// Undefines the test's domains however the test ends.
struct Undefine(Vec<String>);

impl Drop for Undefine {
    fn drop(&mut self) {
        for uuid in &self.0 {
            let _ = std::process::Command::new("virsh")
                .args(["-c", "qemu:///system", "undefine", uuid])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_removes_only_its_own_domains() {
    let (a, b) = (TestCluster::start().await, TestCluster::start().await);
    assert_ne!(a.server.cluster_id, b.server.cluster_id);
    let libvirt = Libvirt::open("qemu:///system").await.unwrap();
    let tag = format!("{:04x}", rand::random::<u16>());
    let node = format!("shared-{tag}");
    let vms = lookup("vm").unwrap();
    let nodes = lookup("node").unwrap();

    // Cluster A runs a VM on the host (both clusters even call the node the same).
    let _stop_a = start_agent(&a, &node).await;
    let vm = json!({"metadata": {"name": format!("a-{tag}")}, "spec": {"nodeName": node,
        "powerState": "Stopped", "resources": {"cpus": 1, "memory": "64Mi"}, "rootDisk": {"size": "64Mi"},
        "boot": {"kernel": "/boot/vmlinuz"}}});
    let created = a.admin.create(vms, Some("default"), &vm).await.unwrap();
    let a_uid = created["metadata"]["uid"].as_str().unwrap().to_string();
    // Domains behind both agents' backs: an orphan of A (its VM is gone), and a legacy domain
    // (no cluster recorded) whose files are nowhere.
    let orphan = uuid::Uuid::new_v4().to_string();
    let legacy = uuid::Uuid::new_v4().to_string();
    let _cleanup = Undefine(vec![a_uid.clone(), orphan.clone(), legacy.clone()]);
    libvirt
        .define(domain(
            &format!("orphan-{tag}"),
            &orphan,
            &a.server.cluster_id,
            &node,
        ))
        .await
        .unwrap();
    let legacy_xml = domain(&format!("legacy-{tag}"), &legacy, "x", "x")
        .replace("<flotilla:cluster>x</flotilla:cluster>", "")
        .replace("<flotilla:node>x</flotilla:node>", "");
    libvirt.define(legacy_xml).await.unwrap();
    eventually("A's VM is Stopped", 60, async || {
        (a.admin
            .get(vms, Some("default"), &format!("a-{tag}"))
            .await
            .ok()?["status"]["phase"]
            == "Stopped")
            .then_some(())
    })
    .await;
    eventually("A removes its own orphan", 30, async || {
        libvirt
            .state(&orphan)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    // Cluster B's agent starts on the same libvirt with a fresh data directory.
    let _stop_b = start_agent(&b, &node).await;
    let listed = eventually("B lists A's domain as unmanaged", 30, async || {
        let n = b.admin.get(nodes, None, &node).await.ok()?;
        let entry = n["status"]["unmanagedDomains"]
            .as_array()?
            .iter()
            .find(|d| d["uuid"] == a_uid.as_str())?
            .clone();
        Some((n, entry))
    })
    .await;
    assert_eq!(
        listed.1["flotillaCluster"],
        a.server.cluster_id.as_str(),
        "{}",
        listed.0
    );
    assert!(
        listed.0["status"]["unmanagedDomains"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["uuid"] == legacy.as_str()),
        "the legacy domain is unmanaged for B too"
    );
    // Several of B's orphan sweeps later, A's domain and the legacy one are still there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        libvirt.state(&a_uid).await.unwrap().is_some(),
        "A's domain survives B"
    );
    assert!(
        libvirt.state(&legacy).await.unwrap().is_some(),
        "a legacy domain without files here survives"
    );
    // And A's node does not list its own domain as unmanaged.
    let a_node = a.admin.get(nodes, None, &node).await.unwrap();
    assert!(
        !a_node["status"]["unmanagedDomains"]
            .as_array()
            .map(|l| l.iter().any(|d| d["uuid"] == a_uid.as_str()))
            .unwrap_or(false),
        "{a_node}"
    );

    // Deleting A's VM removes its domain (A's agent owns it).
    a.admin
        .delete(vms, Some("default"), &format!("a-{tag}"))
        .await
        .unwrap();
    eventually("A's domain is removed by A", 30, async || {
        libvirt.state(&a_uid).await.unwrap().is_none().then_some(())
    })
    .await;
}
