//! Routers and floating IPs through a real server: a router takes an external address from its
//! external network's IPAM and each network's gateway (so a network has one router), is placed
//! on a Ready node matching its selector (the least loaded) and placed again when that node
//! fails; a floating IP takes an address, binds to a VM's NIC through the router of its network
//! and moves with a rebind; deleting them frees every address. (Their dataplane on a real node
//! is crates/flotilla-agent/tests/e2e_qemu.rs.)

use flotilla_client::Client;
use flotilla_controllers::routers::sweep;
use flotilla_controllers::testkit::refused;
use flotilla_types::registry::lookup;
use serde_json::{json, Value};

async fn set_ready(c: &Client, node: &str, ready: bool, labels: Value) {
    let nodes = lookup("node").unwrap();
    if c.get(nodes, None, node).await.is_err() {
        c.create(
            nodes,
            None,
            &json!({"metadata": {"name": node, "labels": labels}}),
        )
        .await
        .unwrap();
    }
    let status = if ready { "True" } else { "False" };
    c.patch(
        nodes,
        None,
        node,
        &json!({"status": {"conditions": [{"type": "Ready", "status": status, "reason": "Test", "message": "set by the test"}]}}),
        true,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn routers_are_placed_and_moved_and_floating_ips_follow_their_vm() {
    let cluster = flotilla_controllers::testkit::TestCluster::without_controllers().await;
    let (server, c) = (&cluster.server, &cluster.admin);
    let (nets, routers, fips, vms) = (
        lookup("network").unwrap(),
        lookup("router").unwrap(),
        lookup("floatingip").unwrap(),
        lookup("vm").unwrap(),
    );
    let create = |kind, body: Value| {
        let c = &c;
        async move { c.create(kind, Some("default"), &body).await }
    };
    create(nets, json!({"metadata": {"name": "ext"}, "spec": {"type": "bridged", "bridge": "br-ex",
        "cidr": "203.0.113.0/24", "gateway": "203.0.113.1", "ranges": [{"start": "203.0.113.10", "end": "203.0.113.11"}]}}))
        .await
        .unwrap();
    create(
        nets,
        json!({"metadata": {"name": "lan"}, "spec": {"type": "bridged", "bridge": "br0"}}),
    )
    .await
    .unwrap();
    create(
        nets,
        json!({"metadata": {"name": "inside"}, "spec": {"cidr": "10.9.0.0/24"}}),
    )
    .await
    .unwrap();

    // Wrong kinds of networks are refused at their fields.
    let (code, message, fields) = refused(
        create(
            routers,
            json!({"metadata": {"name": "bad"}, "spec": {
            "external": {"network": "lan"}, "networks": ["ext"]}}),
        )
        .await,
    );
    assert_eq!(code, 422, "{message}");
    assert_eq!(
        fields,
        ["spec.external.network", "spec.networks[0]"],
        "{message}"
    );

    // The node's own uplink instead of a network: both at once, or neither, are refused.
    for (external, field) in [
        (
            json!({"uplink": true, "network": "ext"}),
            "spec.external.uplink",
        ),
        (
            json!({"uplink": true, "ip": "203.0.113.10"}),
            "spec.external.uplink",
        ),
        (json!({}), "spec.external.network"),
    ] {
        let (code, message, fields) = refused(
            create(
                routers,
                json!({"metadata": {"name": "bad"}, "spec": {"external": external}}),
            )
            .await,
        );
        assert_eq!(
            (code, fields.as_slice()),
            (422, &[field.to_string()][..]),
            "{message}"
        );
    }
    create(
        nets,
        json!({"metadata": {"name": "home"}, "spec": {"cidr": "10.8.0.0/24"}}),
    )
    .await
    .unwrap();
    let home = create(
        routers,
        json!({"metadata": {"name": "home"}, "spec": {"external": {"uplink": true}, "networks": ["home"]}}),
    )
    .await
    .unwrap();
    // No address of any external network is taken: it holds only its network's gateway.
    assert!(home["status"].get("externalAddress").is_none(), "{home}");
    assert_eq!(
        home["status"]["interfaces"].as_array().unwrap().len(),
        1,
        "{home}"
    );
    assert_eq!(
        home["status"]["interfaces"][0]["ips"],
        json!(["10.8.0.1/24"])
    );
    assert_eq!(
        c.network_addresses("default", "ext").await.unwrap()["items"],
        json!([])
    );

    let gw = create(
        routers,
        json!({"metadata": {"name": "gw"}, "spec": {
        "external": {"network": "ext"}, "networks": ["inside"], "nodeSelector": {"net": "edge"}}}),
    )
    .await
    .unwrap();
    assert_eq!(gw["status"]["externalAddress"], "203.0.113.10");
    assert_eq!(gw["status"]["interfaces"][1]["ips"], json!(["10.9.0.1/24"]));
    // One router per network: the gateway is taken.
    let (code, message, fields) = refused(
        create(
            routers,
            json!({"metadata": {"name": "second"}, "spec": {"networks": ["inside"]}}),
        )
        .await,
    );
    assert_eq!(
        (code, fields.as_slice()),
        (422, &["spec.networks[0]".to_string()][..])
    );
    assert!(
        message.contains("Router/gw") || message.contains("gw"),
        "{message}"
    );

    // Placement: only Ready nodes matching the selector; none yet.
    set_ready(c, "a", true, json!({"net": "edge"})).await;
    set_ready(c, "b", true, json!({"net": "edge"})).await;
    set_ready(c, "c", true, json!({})).await;
    sweep(&server.objects).await.unwrap();
    let placed = c.get(routers, Some("default"), "gw").await.unwrap();
    let first = placed["status"]["nodeName"].as_str().unwrap().to_string();
    assert!(first == "a" || first == "b", "{placed}");
    assert_eq!(placed["status"]["conditions"][0]["status"], "True");
    // Its node fails: it moves to the other matching one, never to c.
    set_ready(c, &first, false, json!({})).await;
    sweep(&server.objects).await.unwrap();
    let moved = c.get(routers, Some("default"), "gw").await.unwrap();
    let second = moved["status"]["nodeName"].as_str().unwrap();
    assert!(second != first && second != "c", "{moved}");
    // No node left: it says so.
    set_ready(c, second, false, json!({})).await;
    sweep(&server.objects).await.unwrap();
    let stranded = c.get(routers, Some("default"), "gw").await.unwrap();
    assert!(stranded["status"].get("nodeName").is_none(), "{stranded}");
    assert_eq!(stranded["status"]["conditions"][0]["status"], "False");
    assert!(stranded["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .contains("nodeSelector"));

    // Floating IPs: an address each; the range has one left after the router's.
    let vm = |name: &str, ip: &str| {
        json!({"metadata": {"name": name}, "spec": {"resources": {"cpus": 1, "memory": "64Mi"}, "image": "x",
            "networks": [{"network": "inside", "ip": ip}]}})
    };
    create(vms, vm("one", "10.9.0.10")).await.unwrap();
    create(vms, vm("two", "10.9.0.11")).await.unwrap();
    let fip = create(
        fips,
        json!({"metadata": {"name": "web"}, "spec": {"network": "ext", "vm": "one"}}),
    )
    .await
    .unwrap();
    assert_eq!(fip["status"]["address"], "203.0.113.11");
    let (code, message, fields) = refused(
        create(
            fips,
            json!({"metadata": {"name": "more"}, "spec": {"network": "ext"}}),
        )
        .await,
    );
    assert_eq!(
        (code, fields.as_slice()),
        (422, &["spec.network".to_string()][..]),
        "{message}"
    );
    let (code, _, fields) = refused(
        create(fips, json!({"metadata": {"name": "taken"}, "spec": {"network": "ext", "address": "203.0.113.10"}})).await,
    );
    assert_eq!(
        (code, fields.as_slice()),
        (422, &["spec.address".to_string()][..])
    );
    sweep(&server.objects).await.unwrap();
    let fip = c.get(fips, Some("default"), "web").await.unwrap();
    assert_eq!(fip["status"]["fixedAddress"], "10.9.0.10");
    assert_eq!(fip["status"]["router"], "gw");
    let gw = c.get(routers, Some("default"), "gw").await.unwrap();
    assert_eq!(
        gw["status"]["floatingIps"],
        json!([{"address": "203.0.113.11", "fixedAddress": "10.9.0.10"}])
    );
    // The VM lists it after its own address.
    let one = c.get(vms, Some("default"), "one").await.unwrap();
    assert_eq!(one["status"]["ips"], json!(["10.9.0.10", "203.0.113.11"]));
    // Rebound: the router's list follows.
    c.patch(
        fips,
        Some("default"),
        "web",
        &json!({"spec": {"vm": "two"}}),
        false,
    )
    .await
    .unwrap();
    sweep(&server.objects).await.unwrap();
    let gw = c.get(routers, Some("default"), "gw").await.unwrap();
    assert_eq!(gw["status"]["floatingIps"][0]["fixedAddress"], "10.9.0.11");
    let (one, two) = (
        c.get(vms, Some("default"), "one").await.unwrap(),
        c.get(vms, Some("default"), "two").await.unwrap(),
    );
    assert_eq!(one["status"]["ips"], json!(["10.9.0.10"]));
    assert_eq!(two["status"]["ips"], json!(["10.9.0.11", "203.0.113.11"]));
    // Bound to a VM without a router: not bound, and why.
    c.patch(
        fips,
        Some("default"),
        "web",
        &json!({"spec": {"vm": "nobody"}}),
        false,
    )
    .await
    .unwrap();
    sweep(&server.objects).await.unwrap();
    let fip = c.get(fips, Some("default"), "web").await.unwrap();
    assert_eq!(fip["status"]["conditions"][0]["status"], "False");
    assert!(fip["status"].get("fixedAddress").is_none());

    // The external network is in use; deleting the floating IP and router frees it all.
    let (code, message, _) = refused(c.delete(nets, Some("default"), "ext").await);
    assert_eq!(code, 409);
    assert!(
        message.contains("Router gw") && message.contains("FloatingIP web"),
        "{message}"
    );
    c.delete(fips, Some("default"), "web").await.unwrap();
    c.delete(routers, Some("default"), "gw").await.unwrap();
    c.delete(routers, Some("default"), "home").await.unwrap();
    for name in ["one", "two"] {
        c.delete(vms, Some("default"), name).await.unwrap();
    }
    let addresses = c.network_addresses("default", "ext").await.unwrap();
    assert_eq!(addresses["items"], json!([]), "{addresses}");
    let again = create(
        fips,
        json!({"metadata": {"name": "again"}, "spec": {"network": "ext"}}),
    )
    .await
    .unwrap();
    assert_eq!(again["status"]["address"], "203.0.113.10");
}
