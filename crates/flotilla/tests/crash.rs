//! Crash safety: `kill -9` of the real `flotilla agent` during a create and during a delete, on a
//! real libvirtd with real QEMU. After a restart the VM converges to Running with exactly one
//! domain; after deletion no domain, disk, seed or any other file of it is left, and once no VM
//! uses the overlay network, none of its devices, namespace or DHCP server either.
//!
//! Needs libvirtd and the tiny guest; `make test` provides both.

mod support;

use std::time::Duration;

use flotilla_controllers::testkit::TestCluster;
use flotilla_types::registry::lookup;
use serde_json::json;
use support::{agent_dir, domain_uuids, tiny_guest};

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

fn domains_with_uuid(uuid: &str) -> usize {
    domain_uuids().iter().filter(|u| *u == uuid).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_create_and_delete_converges_and_leaks_nothing() {
    let guest = tiny_guest();
    let cluster = TestCluster::start().await;
    let (server, admin, tmp) = (&cluster.server, &cluster.admin, &cluster.dir);
    let token = cluster.join_token().await;
    let agent_dir = agent_dir(tmp.path(), "crash-node");
    let vms = lookup("vm").unwrap();
    let run = rand::random::<u32>() % 100_000;
    // Every VM has a NIC on an overlay network: its address, and the node's bridge and VXLAN
    // device, must survive the kills and go with the VMs.
    let nets = lookup("network").unwrap();
    let net = admin
        .create(
            nets,
            Some("default"),
            &json!({"metadata": {"name": format!("crash-{run}")}, "spec": {"cidr": "10.9.0.0/24"}}),
        )
        .await
        .unwrap();
    let vni = net["status"]["vni"].as_u64().unwrap();
    let bridge = std::path::PathBuf::from(format!("/sys/class/net/fb-{vni}"));

    for (i, delay_ms) in [0u64, 150, 400, 900].into_iter().enumerate() {
        let name = format!("crash-{run}-{i}");
        let mut agent = support::agent(&server.url, &token, "crash-node", tmp.path());
        let vm = json!({"metadata": {"name": name}, "spec": {
            "nodeName": "crash-node", "resources": {"cpus": 1, "memory": "128Mi"}, "rootDisk": {"size": "64Mi"},
            "boot": {"kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"), "cmdline": "console=ttyS0"},
            "networks": [{"network": format!("crash-{run}")}]}});
        let created = admin.create(vms, Some("default"), &vm).await.unwrap();
        let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        agent.kill9();

        agent.start();
        eventually(
            &format!("{name} runs after the agent restarted"),
            90,
            async || {
                admin
                    .get(vms, Some("default"), &name)
                    .await
                    .is_ok_and(|v| v["status"]["phase"] == "Running")
            },
        )
        .await;
        assert_eq!(domains_with_uuid(&uid), 1, "{name}: exactly one domain");
        assert!(bridge.exists(), "{name}: the overlay's bridge is there");
        eventually(
            &format!("{name}: one DHCP server for the network"),
            10,
            async || support::dnsmasq_serving(vni) == 1,
        )
        .await;

        admin.delete(vms, Some("default"), &name).await.unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms / 2)).await;
        agent.kill9();
        agent.start();
        eventually(
            &format!("{name} is deleted after the agent restarted"),
            90,
            async || {
                admin
                    .get(vms, Some("default"), &name)
                    .await
                    .is_err_and(|e| e.code() == Some(404))
            },
        )
        .await;
        assert_eq!(domains_with_uuid(&uid), 0, "{name}: the domain is gone");
        assert!(
            !agent_dir.join("vms").join(&uid).exists(),
            "{name}: its files are gone"
        );
        agent.kill9();
    }
    let leftovers: Vec<_> = std::fs::read_dir(agent_dir.join("vms"))
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "no VM directory is left: {leftovers:?}"
    );
    // The agent starting again removes the overlay no VM uses; the control plane frees every
    // address (the network's status counts none held).
    let mut agent = support::agent(&server.url, &token, "crash-node", tmp.path());
    let namespace = std::path::PathBuf::from(format!("/run/netns/flotilla-dhcp-{vni}"));
    eventually(
        "the unused overlay and its DHCP server are removed",
        30,
        async || !bridge.exists() && !namespace.exists() && support::dnsmasq_serving(vni) == 0,
    )
    .await;
    agent.kill9();
    eventually("every address is free again", 30, async || {
        admin
            .get(nets, Some("default"), &format!("crash-{run}"))
            .await
            .is_ok_and(|n| n["status"]["addresses"]["used"] == 0)
    })
    .await;
}
