//! `flotilla agent --simulate N`: a fleet of real agents in one process, each on its own
//! test:///default hypervisor, joining, reporting the configured capacity and zones, running VMs.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use flotilla_client::ListParams;
use flotilla_controllers::testkit::{eventually, TestCluster};
use flotilla_types::registry::lookup;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_joins_and_runs_vms() {
    let cluster = TestCluster::start().await;
    let token = cluster.join_token().await;
    let mut fleet = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "agent",
            "--server",
            &cluster.server.url,
            "--join-token",
            &token,
            "--data-dir",
        ])
        .arg(cluster.path().join("fleet"))
        .args([
            "--simulate",
            "20",
            "--simulate-zones",
            "2",
            "--simulate-cpus",
            "8",
            "--simulate-memory",
            "16Gi",
        ])
        .env("FLOTILLA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (nodes, vms) = (lookup("node").unwrap(), lookup("vm").unwrap());
    let admin = &cluster.admin;
    let listed = eventually("20 simulated nodes are Ready", 60, async || {
        let list = admin.list(nodes, None, &ListParams::default()).await.ok()?;
        let items = list["items"].as_array()?.clone();
        let ready = items.iter().filter(|n| {
            n["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        });
        (ready.count() == 20).then_some(items)
    })
    .await;
    let mut zones: BTreeMap<String, usize> = BTreeMap::new();
    for n in &listed {
        *zones
            .entry(
                n["metadata"]["labels"]["topology.flotilla.dev/zone"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
            .or_default() += 1;
        assert_eq!(n["status"]["capacity"]["cpus"], 8);
        assert_eq!(n["status"]["capacity"]["memory"], "16Gi");
    }
    assert_eq!(
        zones,
        BTreeMap::from([("zone-0".to_string(), 10), ("zone-1".to_string(), 10)])
    );

    for i in 0..40 {
        let vm = json!({"metadata": {"name": format!("vm-{i:02}")}, "spec": {"resources": {"cpus": 1, "memory": "512Mi"}, "boot": {"kernel": "/boot/vmlinuz"}}});
        admin.create(vms, Some("default"), &vm).await.unwrap();
    }
    let running = eventually("all 40 VMs are Running", 60, async || {
        let list = admin
            .list(vms, Some("default"), &ListParams::default())
            .await
            .ok()?;
        let items = list["items"].as_array()?.clone();
        items
            .iter()
            .all(|v| v["status"]["phase"] == "Running")
            .then_some(items)
    })
    .await;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for v in &running {
        *per_node
            .entry(v["status"]["nodeName"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_node.len(), 20, "every node runs VMs: {per_node:?}");
    assert!(
        per_node.values().all(|&n| n == 2),
        "least-allocated placement spreads evenly: {per_node:?}"
    );
    fleet.kill().unwrap();
    fleet.wait().unwrap();
}
