//! SecurityGroups through a real server: every project has its `default` group from the start
//! (and loses it with the project); VMs may name only groups their project has, may change
//! them while they run but nothing else of their NICs; a group in use (and `default`) cannot be
//! deleted; group status follows its members' addresses, and says when a rule names a group
//! that does not exist. Rule enforcement is the agent's (crates/flotilla-agent/tests/e2e_qemu.rs)
//! and the dataplane's (crates/flotilla-dataplane/tests/firewall.rs).

use flotilla_client::Client;
use flotilla_controllers::security_groups::sweep;
use flotilla_controllers::testkit::refused;
use flotilla_types::registry::lookup;
use serde_json::{json, Value};

#[tokio::test]
async fn groups_are_admitted_referenced_and_followed() {
    let cluster = flotilla_controllers::testkit::TestCluster::without_controllers().await;
    let (server, c) = (&cluster.server, &cluster.admin);
    let (sgs, vms, nets, projects) = (
        lookup("securitygroup").unwrap(),
        lookup("vm").unwrap(),
        lookup("network").unwrap(),
        lookup("project").unwrap(),
    );
    // A new project comes with its default group: all egress, ingress from its own members.
    c.create(projects, None, &json!({"metadata": {"name": "shop"}}))
        .await
        .unwrap();
    let default = c.get(sgs, Some("shop"), "default").await.unwrap();
    assert_eq!(
        default["spec"]["rules"],
        json!([{"direction": "egress", "protocol": "any"},
               {"direction": "ingress", "protocol": "any", "remote": {"securityGroup": "default"}}])
    );
    let (code, message, _) = refused(c.delete(sgs, Some("shop"), "default").await);
    assert_eq!(code, 409, "{message}");

    // Bad rules: every field path named.
    let (code, _, fields) = refused(
        c.create(
            sgs,
            Some("shop"),
            &json!({"metadata": {"name": "bad"}, "spec": {"rules": [
                {"protocol": "icmp", "ports": "22"},
                {"protocol": "tcp", "ports": "9-1", "remote": {"cidr": "10.0.0.1/8"}},
                {"remote": {"cidr": "10.0.0.0/8", "securityGroup": "x"}},
            ]}}),
        )
        .await,
    );
    assert_eq!(code, 422);
    assert_eq!(
        fields,
        [
            "spec.rules[0].ports",
            "spec.rules[1].ports",
            "spec.rules[1].remote.cidr",
            "spec.rules[2].remote"
        ]
    );
    c.create(
        sgs,
        Some("shop"),
        &json!({"metadata": {"name": "web"}, "spec": {"rules": [
            {"protocol": "tcp", "ports": "80", "remote": {"cidr": "0.0.0.0/0"}},
            {"protocol": "tcp", "ports": "5432", "direction": "egress", "remote": {"securityGroup": "db"}},
        ]}}),
    )
    .await
    .unwrap();

    c.create(
        nets,
        Some("shop"),
        &json!({"metadata": {"name": "lan"}, "spec": {"cidr": "10.9.0.0/24"}}),
    )
    .await
    .unwrap();
    let vm = |name: &str, nics: Value| {
        json!({"metadata": {"name": name}, "spec": {
            "resources": {"cpus": 1, "memory": "64Mi"}, "image": "x", "networks": nics}})
    };
    // A group the project lacks is refused at the NIC that names it.
    let (code, message, fields) = refused(
        c.create(
            vms,
            Some("shop"),
            &vm(
                "a",
                json!([{"network": "lan", "securityGroups": ["web", "nope"]}]),
            ),
        )
        .await,
    );
    assert_eq!(
        (code, fields.as_slice()),
        (422, &["spec.networks[0].securityGroups[1]".to_string()][..]),
        "{message}"
    );
    assert!(message.contains("no security group \"nope\""), "{message}");
    let (code, _, fields) = refused(
        c.create(
            vms,
            Some("shop"),
            &vm(
                "a",
                json!([{"network": "lan", "allowedAddressPairs": ["10.9.0.7/8"]}]),
            ),
        )
        .await,
    );
    assert_eq!(
        (code, fields.as_slice()),
        (
            422,
            &["spec.networks[0].allowedAddressPairs[0]".to_string()][..]
        )
    );

    c.create(
        vms,
        Some("shop"),
        &vm("web-1", json!([{"network": "lan", "ip": "10.9.0.10", "securityGroups": ["web"], "allowedAddressPairs": ["10.9.0.100"]}])),
    )
    .await
    .unwrap();
    c.create(
        vms,
        Some("shop"),
        &vm("plain", json!([{"network": "lan", "ip": "10.9.0.11"}])),
    )
    .await
    .unwrap();
    sweep(&server.objects).await.unwrap();
    let web = c.get(sgs, Some("shop"), "web").await.unwrap();
    assert_eq!(
        web["status"]["members"],
        json!([{"vm": "web-1", "nic": "nic0", "addresses": ["10.9.0.10", "10.9.0.100"]}])
    );
    assert_eq!(web["status"]["memberCount"], 1);
    // Its egress rule names a group the project lacks: it matches nothing, and status says so.
    assert_eq!(web["status"]["conditions"][0]["status"], "False");
    assert_eq!(
        web["status"]["conditions"][0]["reason"],
        "UnknownRemoteGroup"
    );
    let default = c.get(sgs, Some("shop"), "default").await.unwrap();
    assert_eq!(default["status"]["members"][0]["vm"], "plain");
    assert_eq!(default["status"]["conditions"][0]["status"], "True");

    // A group in use cannot go; the refusal names the VM.
    let (code, message, _) = refused(c.delete(sgs, Some("shop"), "web").await);
    assert_eq!(code, 409);
    assert!(message.contains("web-1"), "{message}");

    // Groups change on a running VM; other NIC fields do not.
    let patch = |nics: Value| json!({"spec": {"networks": nics}});
    c.patch(
        vms,
        Some("shop"),
        "web-1",
        &patch(json!([{"network": "lan", "ip": "10.9.0.10", "securityGroups": ["default"]}])),
        false,
    )
    .await
    .unwrap();
    let (code, _, fields) = refused(
        c.patch(
            vms,
            Some("shop"),
            "web-1",
            &patch(json!([{"network": "lan", "ip": "10.9.0.12"}])),
            false,
        )
        .await,
    );
    assert_eq!(
        (code, fields.as_slice()),
        (422, &["spec.networks".to_string()][..])
    );
    let (code, _, fields) = refused(
        c.patch(
            vms,
            Some("shop"),
            "web-1",
            &patch(json!([{"network": "lan", "ip": "10.9.0.10", "securityGroups": ["gone"]}])),
            false,
        )
        .await,
    );
    assert_eq!(
        (code, fields.as_slice()),
        (422, &["spec.networks[0].securityGroups[0]".to_string()][..])
    );
    sweep(&server.objects).await.unwrap();
    let web = c.get(sgs, Some("shop"), "web").await.unwrap();
    assert_eq!(web["status"]["memberCount"], 0);
    assert!(web["status"].get("members").is_none());
    let default = c.get(sgs, Some("shop"), "default").await.unwrap();
    assert_eq!(default["status"]["memberCount"], 2);
    c.delete(sgs, Some("shop"), "web").await.unwrap();

    // A project whose default group was lost gets it back; deleting the project takes it along.
    for name in ["web-1", "plain"] {
        c.delete(vms, Some("shop"), name).await.unwrap();
    }
    c.delete(nets, Some("shop"), "lan").await.unwrap();
    let (key, _) = flotilla_server::security_groups::default_group("shop");
    server.objects.store().delete(&key).await.unwrap();
    assert!(sweep(&server.objects).await.unwrap() >= 1);
    c.get(sgs, Some("shop"), "default").await.unwrap();
    flotilla_controllers::ipam_sweeper::sweep(&server.objects)
        .await
        .unwrap();
    eventually_deleted(c, projects, "shop").await;
    assert!(c.get(sgs, Some("shop"), "default").await.is_err());
}

/// Deletes the project, waiting for its network's finalizer to be released.
async fn eventually_deleted(c: &Client, projects: &flotilla_types::KindInfo, name: &str) {
    for _ in 0..50 {
        if c.delete(projects, None, name).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "project {name} was not deleted: {:?}",
        c.delete(projects, None, name).await
    );
}
