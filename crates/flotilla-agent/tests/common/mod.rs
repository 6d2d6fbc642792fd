//! What the agent's tests share.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_controllers::testkit::TestCluster;

/// An agent `node` of `cluster` on libvirt's test driver, its data in `dir`, looking again every
/// second; it runs until the returned sender is dropped.
pub async fn test_driver_agent(
    cluster: &TestCluster,
    node: &str,
    dir: PathBuf,
) -> tokio::sync::watch::Sender<bool> {
    let mut config = flotilla_agent::AgentConfig::new(vec![cluster.server.url.clone()], node, dir);
    config.join_token = Some(cluster.join_token().await);
    config.libvirt_uri = "test:///default".into();
    config.resync = Duration::from_secs(1);
    let libvirt = flotilla_agent::libvirt::Libvirt::open("test:///default")
        .await
        .expect("libvirt's test driver opens");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(flotilla_agent::run_with(config, libvirt, stop_rx));
    stop
}
