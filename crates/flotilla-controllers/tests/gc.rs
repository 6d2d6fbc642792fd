//! Deleting an owner deletes its dependents, through a real server and its API.

use std::time::Duration;

use flotilla_server::ServerConfig;
use flotilla_types::registry::lookup;
use serde_json::json;

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
