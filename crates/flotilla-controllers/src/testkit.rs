//! A control plane for tests and benchmarks (feature `testkit`): a real server on a loopback port
//! with its controllers, an admin client, join tokens, `eventually`, and an HTTP server of
//! images.

use std::path::Path;
use std::time::Duration;

use flotilla_client::Client;
use flotilla_server::{RunningServer, ServerConfig};

use crate::ControllerConfig;

pub struct TestCluster {
    pub server: RunningServer,
    pub admin: Client,
    /// Holds the data directories; 0711 so that QEMU (another user) reaches VM files inside.
    pub dir: tempfile::TempDir,
}

impl TestCluster {
    /// A server on 127.0.0.1 (random port) with every controller but compaction.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("an address")).await
    }

    /// A server without controllers (tests run their passes themselves), on 127.0.0.1.
    pub async fn without_controllers() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = ServerConfig::new(dir.path());
        config.listen = "127.0.0.1:0".parse().expect("an address");
        let server = flotilla_server::start(config)
            .await
            .expect("the server starts");
        let admin = Client::new(
            vec![server.url.clone()],
            Some(&server.ca_pem),
            Some(server.admin_token.clone()),
        )
        .expect("a client");
        TestCluster { server, admin, dir }
    }

    /// The same, listening on `listen` (e.g. an address agents in other namespaces reach).
    pub async fn start_on(listen: std::net::SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
        let mut config = ServerConfig::new(dir.path().join("server"));
        config.listen = listen;
        config.upload_sweep = Duration::from_secs(1);
        let server = flotilla_server::start(config)
            .await
            .expect("the server starts");
        crate::spawn_all(
            server.objects.clone(),
            ControllerConfig {
                compaction_interval: Duration::ZERO,
                ..Default::default()
            },
        );
        let admin = Client::new(
            vec![server.url.clone()],
            Some(&server.ca_pem),
            Some(server.admin_token.clone()),
        )
        .expect("a client");
        TestCluster { server, admin, dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A join token for agents, valid for an hour.
    pub async fn join_token(&self) -> String {
        let body = br#"{"ttlSeconds": 3600}"#.to_vec();
        let resp = self
            .admin
            .request_json(
                reqwest::Method::POST,
                "/flotilla/v1/join-tokens",
                &[],
                Some(("application/json", body)),
            )
            .await
            .expect("a join token");
        resp["token"]
            .as_str()
            .expect("the answer has a token")
            .to_string()
    }
}

/// Polls `check` every 100 ms until it yields a value; panics naming `what` after `secs`.
pub async fn eventually<T>(what: &str, secs: u64, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The serial log of VM `name` (project `default`) through the API once `done` holds for it;
/// panics naming `what` and showing what the guest printed after `secs`.
pub async fn log_until(
    admin: &Client,
    name: &str,
    what: &str,
    secs: u64,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut text = String::new();
    while tokio::time::Instant::now() < deadline {
        if let Ok(stream) = admin.vm_log("default", name, false).await {
            let mut stream = Box::pin(stream);
            let mut bytes = Vec::new();
            while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
                bytes.extend_from_slice(&chunk);
            }
            text = String::from_utf8_lossy(&bytes).into_owned();
            if done(&text) {
                return text;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {secs} s waiting until {what}; the guest printed:\n{text}");
}

/// Makes a blank qcow2 image of `size` (e.g. `64M`) at `path` with qemu-img.
pub fn blank_qcow2(path: &Path, size: &str) {
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size)
        .status()
        .expect("qemu-img runs");
    assert!(made.success(), "qemu-img made {}", path.display());
}

/// Serves one small qcow2 image at every path (`{url}/<anything>`), each answer `delay` late so
/// that concurrent requests overlap, and counts the requests per path.
pub struct ImageServer {
    pub url: String,
    hits: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>>,
}

impl ImageServer {
    pub async fn start(dir: &Path, delay: Duration) -> Self {
        let file = dir.join("served.qcow2");
        blank_qcow2(&file, "64M");
        let body = std::fs::read(&file).expect("the image just made");
        let hits: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>> =
            Default::default();
        let counter = hits.clone();
        let app = axum::Router::new().route(
            "/{name}",
            axum::routing::get(
                move |axum::extract::Path(name): axum::extract::Path<String>| {
                    *counter.lock().expect("hits").entry(name).or_default() += 1;
                    let body = body.clone();
                    async move {
                        tokio::time::sleep(delay).await;
                        body
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("an address");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serving") });
        ImageServer {
            url: format!("http://{addr}"),
            hits,
        }
    }

    /// Requests for `path` (without the leading slash) so far.
    pub fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("hits")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Requests for any path so far.
    pub fn total(&self) -> usize {
        self.hits.lock().expect("hits").values().sum()
    }
}

/// The status code, message and field paths of a call the API refused; panics if it succeeded.
pub fn refused<T: std::fmt::Debug>(
    result: Result<T, flotilla_client::ClientError>,
) -> (u16, String, Vec<String>) {
    match result {
        Err(flotilla_client::ClientError::Api(status)) => {
            let details = serde_json::to_value(&status.details).expect("serialises");
            let fields = details["causes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["field"].as_str().map(str::to_string))
                .collect();
            (status.code, status.message.clone(), fields)
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}
