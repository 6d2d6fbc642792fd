//! A PlacementPolicy referenced by VMs keeps them apart, through the real server and scheduler.

use std::time::Duration;

use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::{json, Value};

fn scheduled(vm: &Value) -> (String, String) {
    vm["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Scheduled"))
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().into(),
                c["message"].as_str().unwrap_or_default().into(),
            )
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_policy_spreads_a_group_over_nodes() {
    let cluster = TestCluster::start().await;
    let c = &cluster.admin;
    let (nodes, leases, vms, policies) = (
        lookup("node").unwrap(),
        lookup("lease").unwrap(),
        lookup("vm").unwrap(),
        lookup("pp").unwrap(),
    );
    for n in ["n1", "n2", "n3"] {
        c.create(nodes, None, &json!({"metadata": {"name": n}}))
            .await
            .unwrap();
        c.patch(
            nodes,
            None,
            n,
            &json!({"status": {"allocatable": {"cpus": 16, "memory": "64Gi"}}}),
            true,
        )
        .await
        .unwrap();
    }
    // Heartbeats for the three nodes, as their agents would send.
    let c2 = flotilla_client::Client::new(
        vec![cluster.server.url.clone()],
        Some(&cluster.server.ca_pem),
        Some(cluster.server.admin_token.clone()),
    )
    .unwrap();
    tokio::spawn(async move {
        loop {
            for n in ["n1", "n2", "n3"] {
                let lease =
                    json!({"metadata": {"name": n}, "spec": {"renewTime": chrono::Utc::now()}});
                if c2
                    .patch(
                        leases,
                        None,
                        n,
                        &json!({"spec": {"renewTime": chrono::Utc::now()}}),
                        false,
                    )
                    .await
                    .is_err()
                {
                    let _ = c2.create(leases, None, &lease).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    c.create(
        policies,
        Some("default"),
        &json!({"metadata": {"name": "one-per-node"}, "spec": {"affinity": {"vmAntiAffinity": {
        "required": [{"labelSelector": "app=web", "topologyKey": "flotilla.dev/node"}]}}}}),
    )
    .await
    .unwrap();
    let web = |name: &str| {
        json!({"metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"resources": {"cpus": 1, "memory": "1Gi"}, "image": "x", "placementPolicy": "one-per-node"}})
    };
    for i in 0..4 {
        c.create(vms, Some("default"), &web(&format!("web-{i}")))
            .await
            .unwrap();
    }
    let placed = eventually(
        "three replicas are placed and the fourth is refused",
        30,
        async || {
            let mut nodes_used = Vec::new();
            let mut refused = Vec::new();
            for i in 0..4 {
                let v = c
                    .get(vms, Some("default"), &format!("web-{i}"))
                    .await
                    .ok()?;
                match v["spec"]["nodeName"].as_str() {
                    Some(n) => nodes_used.push(n.to_string()),
                    None => refused.push(scheduled(&v).1),
                }
            }
            // Nodes turn Ready one by one, so earlier messages may also count nodes not ready yet.
            let settled = refused
                .first()
                .is_some_and(|m| m.contains("3 breaking VM anti-affinity"));
            (nodes_used.len() == 3 && refused.len() == 1 && settled)
                .then_some((nodes_used, refused))
        },
    )
    .await;
    let (mut used, refused) = placed;
    used.sort();
    assert_eq!(used, ["n1", "n2", "n3"], "one replica per node");
    assert_eq!(
        refused[0],
        "0/3 nodes are available: 3 breaking VM anti-affinity"
    );

    let mut missing = web("orphan");
    missing["spec"]["placementPolicy"] = json!("nope");
    c.create(vms, Some("default"), &missing).await.unwrap();
    eventually("a missing policy is reported", 30, async || {
        (scheduled(&c.get(vms, Some("default"), "orphan").await.ok()?).1
            == "PlacementPolicy \"nope\" does not exist in project \"default\"")
            .then_some(())
    })
    .await;
}
