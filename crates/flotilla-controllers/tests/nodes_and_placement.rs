//! Node readiness follows the heartbeat lease; unbound VMs are placed on Ready nodes only.

use std::time::Duration;

use flotilla_client::Client;
use flotilla_server::ServerConfig;
use flotilla_types::registry::lookup;
use serde_json::{json, Value};

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

fn condition(obj: &Value, ty: &str) -> (String, String) {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == ty))
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_placement() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server = flotilla_server::start(config).await.unwrap();
    let controllers = flotilla_controllers::ControllerConfig {
        compaction_interval: Duration::ZERO,
        node_grace: Duration::from_secs(3),
        ..Default::default()
    };
    flotilla_controllers::spawn_all(server.objects.clone(), controllers);
    let c = Client::new(
        vec![server.url.clone()],
        Some(&server.ca_pem),
        Some(server.admin_token.clone()),
    )
    .unwrap();
    let (nodes, leases, vms) = (
        lookup("node").unwrap(),
        lookup("lease").unwrap(),
        lookup("vm").unwrap(),
    );

    // No node yet: the VM waits, and says why.
    c.create(vms, Some("default"), &json!({"metadata": {"name": "web"}, "spec": {"resources": {"cpus": 1, "memory": "1Gi"}, "image": "x"}})).await.unwrap();
    eventually("the VM says it is unschedulable", async || {
        let (status, message) = condition(
            &c.get(vms, Some("default"), "web").await.unwrap(),
            "Scheduled",
        );
        status == "False" && message.contains("0/0 nodes")
    })
    .await;

    // A node whose agent renews its lease becomes Ready, and the VM lands on it.
    c.create(nodes, None, &json!({"metadata": {"name": "node-a"}}))
        .await
        .unwrap();
    c.patch(
        nodes,
        None,
        "node-a",
        &json!({"status": {"allocatable": {"cpus": 8, "memory": "16Gi"}}}),
        true,
    )
    .await
    .unwrap();
    let renew = || json!({"spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 1, "renewTime": chrono::Utc::now()}});
    let mut lease = renew();
    lease["metadata"] = json!({"name": "node-a"});
    c.create(leases, None, &lease).await.unwrap();
    eventually("node-a is Ready", async || {
        condition(&c.get(nodes, None, "node-a").await.unwrap(), "Ready").0 == "True"
    })
    .await;
    eventually("web is bound to node-a", async || {
        let vm = c.get(vms, Some("default"), "web").await.unwrap();
        vm["spec"]["nodeName"] == "node-a" && vm["status"]["phase"] == "Scheduled"
    })
    .await;

    // Heartbeats stop: within the grace period the node is no longer Ready.
    eventually("node-a is Unknown", async || {
        condition(&c.get(nodes, None, "node-a").await.unwrap(), "Ready").0 == "Unknown"
    })
    .await;
    c.create(vms, Some("default"), &json!({"metadata": {"name": "late"}, "spec": {"resources": {"cpus": 1, "memory": "1Gi"}, "image": "x"}})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        c.get(vms, Some("default"), "late").await.unwrap()["spec"]
            .get("nodeName")
            .is_none(),
        "nothing lands on a node that is not Ready"
    );
    // It comes back when the agent renews again.
    c.patch(leases, None, "node-a", &renew(), false)
        .await
        .unwrap();
    eventually("late is bound after node-a recovers", async || {
        c.get(vms, Some("default"), "late").await.unwrap()["spec"]["nodeName"] == "node-a"
    })
    .await;

    // A cordoned node takes no new VMs until it is uncordoned.
    c.patch(
        nodes,
        None,
        "node-a",
        &json!({"spec": {"unschedulable": true}}),
        false,
    )
    .await
    .unwrap();
    c.patch(leases, None, "node-a", &renew(), false)
        .await
        .unwrap();
    c.create(vms, Some("default"), &json!({"metadata": {"name": "cordoned"}, "spec": {"resources": {"cpus": 1, "memory": "1Gi"}, "image": "x"}})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        c.get(vms, Some("default"), "cordoned").await.unwrap()["spec"]
            .get("nodeName")
            .is_none(),
        "a cordoned node takes no VM"
    );
    c.patch(
        nodes,
        None,
        "node-a",
        &json!({"spec": {"unschedulable": null}}),
        false,
    )
    .await
    .unwrap();
    c.patch(leases, None, "node-a", &renew(), false)
        .await
        .unwrap();
    eventually("the VM lands once the node is uncordoned", async || {
        c.get(vms, Some("default"), "cordoned").await.unwrap()["spec"]["nodeName"] == "node-a"
    })
    .await;

    // A VM that fits nowhere says why, per reason.
    c.patch(leases, None, "node-a", &renew(), false)
        .await
        .unwrap();
    c.create(vms, Some("default"), &json!({"metadata": {"name": "huge"}, "spec": {"resources": {"cpus": 1, "memory": "32Gi"}, "image": "x"}})).await.unwrap();
    eventually("huge says it does not fit", async || {
        let (status, message) = condition(
            &c.get(vms, Some("default"), "huge").await.unwrap(),
            "Scheduled",
        );
        status == "False" && message == "0/1 nodes are available: 1 insufficient memory"
    })
    .await;
}
