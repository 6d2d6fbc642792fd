//! Test harness: a real server (SQLite, TLS, auth) on a loopback port, and clients for it.
#![allow(dead_code)]

use std::time::Duration;

use flotilla_client::Client;
use flotilla_server::{RunningServer, ServerConfig};
use flotilla_types::registry::{lookup, KindInfo};
use serde_json::{json, Value};

pub struct TestServer {
    pub server: RunningServer,
    pub client: Client,
    pub dir: tempfile::TempDir,
}

pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

pub async fn start_with(configure: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path().join("data"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    configure(&mut config);
    let server = flotilla_server::start(config).await.expect("server starts");
    let client = Client::new(
        vec![server.url.clone()],
        Some(&server.ca_pem),
        Some(server.admin_token.clone()),
    )
    .unwrap();
    TestServer {
        server,
        client,
        dir,
    }
}

impl TestServer {
    /// A raw HTTP client trusting the server's CA, for requests the typed client would not send.
    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.server.ca_pem.as_bytes()).unwrap(),
            )
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url)
    }

    pub fn token(&self) -> &str {
        &self.server.admin_token
    }
}

pub fn kind(name: &str) -> &'static KindInfo {
    lookup(name).unwrap()
}

pub fn vm(name: &str) -> Value {
    json!({
        "apiVersion": "flotilla.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"resources": {"cpus": 1, "memory": "512Mi"}, "image": "debian-12"}
    })
}
