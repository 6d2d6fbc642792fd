//! Garbage: deleting an owner deletes its dependents, and events expire; through a real server.

use std::time::Duration;

use flotilla_server::ServerConfig;
use flotilla_types::registry::lookup;
use serde_json::{json, Value};

#[tokio::test]
async fn dependents_follow_their_owner() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server = flotilla_server::start(config).await.unwrap();
    let _controllers = flotilla_controllers::spawn_all(
        server.objects.clone(),
        flotilla_controllers::ControllerConfig {
            compaction_interval: Duration::ZERO,
            gc_resync: Duration::from_secs(30),
            ..Default::default()
        },
    );
    let client = flotilla_client::Client::new(
        vec![server.url.clone()],
        Some(&server.ca_pem),
        Some(server.admin_token.clone()),
    )
    .unwrap();
    let vms = lookup("vm").unwrap();
    let vm = |name: &str| json!({"metadata": {"name": name}, "spec": {"resources": {"cpus": 1, "memory": "1Gi"}, "image": "x"}});
    let owner = client
        .create(vms, Some("default"), &vm("owner"))
        .await
        .unwrap();
    let mut dependent = vm("dependent");
    dependent["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "flotilla.dev/v1alpha1", "kind": "VirtualMachine", "name": "owner", "uid": owner["metadata"]["uid"]
    }]);
    client
        .create(vms, Some("default"), &dependent)
        .await
        .unwrap();
    client
        .create(vms, Some("default"), &vm("bystander"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        client.get(vms, Some("default"), "dependent").await.is_ok(),
        "a dependent with a live owner stays"
    );
    client.delete(vms, Some("default"), "owner").await.unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if client
            .get(vms, Some("default"), "dependent")
            .await
            .is_err_and(|e| e.code() == Some(404))
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the dependent is deleted after its owner");
    assert!(client.get(vms, Some("default"), "bystander").await.is_ok());
}

/// Events last seen longer ago than the TTL are deleted; recent ones (and recent repeats of old
/// ones) stay.
#[tokio::test]
async fn expired_events_are_deleted() {
    let cluster = flotilla_controllers::testkit::TestCluster::start().await;
    let events = flotilla_types::registry::lookup("event").unwrap();
    let now = chrono::Utc::now();
    let at = |ago_s: i64| {
        (now - chrono::Duration::seconds(ago_s)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let make = |name: &str, first: String, last: Option<String>| {
        let mut e = serde_json::json!({
            "metadata": {"name": name},
            "involvedObject": {"kind": "VirtualMachine", "name": "web"},
            "type": "Normal", "reason": "Test",
            "reportingComponent": "test", "reportingInstance": "test",
            "firstTimestamp": first, "lastTimestamp": first,
        });
        if let Some(last) = last {
            e["count"] = serde_json::json!(2);
            e["lastTimestamp"] = serde_json::json!(last);
        }
        e
    };
    for e in [
        make("old", at(7200), None),
        make("recent", at(60), None),
        make("old-but-repeated", at(7200), Some(at(30))),
    ] {
        cluster
            .admin
            .create(events, Some("default"), &e)
            .await
            .unwrap();
    }
    // The cluster's own expiry controller may get there first; either way "old" goes.
    flotilla_controllers::event_ttl::sweep(
        &cluster.server.objects,
        std::time::Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let left = cluster
        .admin
        .list(events, Some("default"), &Default::default())
        .await
        .unwrap();
    let mut names: Vec<&str> = left["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["old-but-repeated", "recent"]);
}

/// Foreground: the owner waits (being deleted) until its dependents are gone. Orphan: the
/// dependents stay, released from the owner, and the owner goes.
#[tokio::test]
async fn foreground_and_orphan_deletions_propagate() {
    let cluster = flotilla_controllers::testkit::TestCluster::start().await;
    let admin = &cluster.admin;
    let (classes, vms) = (lookup("vmclass").unwrap(), lookup("vm").unwrap());
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(cluster.server.ca_pem.as_bytes()).unwrap(),
        )
        .build()
        .unwrap();
    for policy in ["Foreground", "Orphan"] {
        let owner_name = format!("owner-{}", policy.to_lowercase());
        let owner = admin
            .create(
                classes,
                None,
                &json!({"metadata": {"name": owner_name}, "spec": {"cpus": 1, "memory": "1Gi"}}),
            )
            .await
            .unwrap();
        let reference = json!([{"apiVersion": "flotilla.dev/v1alpha1", "kind": "VMClass",
            "name": owner_name, "uid": owner["metadata"]["uid"]}]);
        for i in 0..2 {
            let vm = json!({"metadata": {"name": format!("{owner_name}-{i}"), "ownerReferences": reference},
                "spec": {"resources": {"cpus": 1, "memory": "64Mi"}, "image": "x"}});
            admin.create(vms, Some("default"), &vm).await.unwrap();
        }
        let resp = http
            .delete(format!(
                "{}/apis/flotilla.dev/v1alpha1/vmclasses/{owner_name}?propagationPolicy={policy}",
                cluster.server.url
            ))
            .bearer_auth(&cluster.server.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            202,
            "{policy}: the owner waits for the garbage collector"
        );
        flotilla_controllers::testkit::eventually(
            &format!("{policy}: the owner is gone"),
            20,
            async || {
                admin
                    .get(classes, None, &owner_name)
                    .await
                    .is_err()
                    .then_some(())
            },
        )
        .await;
        let left: Vec<Value> = admin
            .list(vms, Some("default"), &Default::default())
            .await
            .unwrap()["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| {
                v["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with(&owner_name)
            })
            .cloned()
            .collect();
        match policy {
            "Foreground" => assert!(left.is_empty(), "the dependents went first: {left:?}"),
            _ => {
                assert_eq!(left.len(), 2, "the dependents stay");
                assert!(
                    left.iter()
                        .all(|v| v["metadata"].get("ownerReferences").is_none()),
                    "{left:?}"
                );
            }
        }
    }
}
