//! Flotilla's API server: the Kubernetes-style resource API over the store, served over TLS with
//! bearer-token authentication, watch, discovery, OpenAPI and metrics.
//!
//! [`start`] opens the store, makes sure the CA, server certificate, admin token and `default`
//! project exist, writes `<data-dir>/admin.yaml` for clients, and serves until shut down.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_store::{SqliteStore, Store, StoreError};
use flotilla_types::clientconfig::{ClientConfig, Context};

pub mod access_review;
pub mod apply;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod binding;
pub mod console;
pub mod error;
pub mod http;
pub mod ipam;
pub mod join;
pub mod logs;
pub mod metrics;
pub mod objects;
pub mod openapi;
pub mod pinned;
pub mod pki;
pub mod quota;
pub mod rbac;
mod request;
mod resource;
pub mod security_groups;
mod service_accounts;
mod storage;
pub mod ui;
mod uploads;
mod vm_snapshots;
pub mod watch;
pub mod watch_cache;

pub use error::ApiError;
pub use objects::{Objects, Stored, Subresource};

/// How often each project's quota use is counted again from its objects (see [`quota::recount`]).
const QUOTA_RECOUNT: Duration = Duration::from_secs(300);

pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7443);

#[derive(Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Loopback by default: exposing the API is a deliberate choice.
    pub listen: SocketAddr,
    /// Extra DNS names or IPs for the server certificate.
    pub tls_names: Vec<String>,
    pub bookmark_interval: Duration,
    /// A store to use instead of SQLite in the data directory.
    pub store: Option<Arc<dyn Store>>,
    /// Client connections held at once (default: what the open-file limit allows).
    pub max_connections: Option<usize>,
    /// How often uploaded files of deleted images are removed.
    pub upload_sweep: Duration,
    /// People sign in with tokens of this OpenID issuer (none: tokens of this server only).
    pub oidc: Option<flotilla_oidc::VerifierConfig>,
    /// Where the audit log goes (default: `<data-dir>/audit.log`; None: nowhere).
    pub audit: Option<audit::AuditConfig>,
    /// Where the web UI's files come from (default: built in).
    pub ui: ui::UiSource,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        ServerConfig {
            data_dir: data_dir.clone(),
            listen: DEFAULT_LISTEN,
            tls_names: Vec::new(),
            bookmark_interval: Duration::from_secs(10),
            store: None,
            max_connections: None,
            upload_sweep: Duration::from_secs(60),
            oidc: None,
            audit: Some(audit::AuditConfig::in_dir(&data_dir)),
            ui: ui::UiSource::Embedded,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Tls(#[from] flotilla_tls::TlsError),
    #[error("cannot initialise the API: {0}")]
    Api(#[from] ApiError),
    #[error("OIDC: {0}")]
    Oidc(String),
}

/// A server that is serving. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub addr: SocketAddr,
    pub url: String,
    pub ca_pem: String,
    pub admin_token: String,
    pub objects: Objects,
    pub admin_config_path: PathBuf,
    pub cluster_id: String,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    /// A client configuration with admin credentials for this server.
    pub fn client_config(&self) -> ClientConfig {
        admin_config(&self.url, &self.ca_pem, &self.admin_token)
    }

    /// Stops accepting connections.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Waits until the server stops (it only stops through `shutdown`).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

fn admin_config(url: &str, ca_pem: &str, token: &str) -> ClientConfig {
    ClientConfig {
        current_context: Some("admin@flotilla".into()),
        contexts: vec![Context {
            name: "admin@flotilla".into(),
            server: Some(url.to_string()),
            servers: Vec::new(),
            certificate_authority_data: Some(ca_pem.to_string()),
            token: Some(token.to_string()),
            project: Some("default".into()),
            oidc: None,
        }],
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), ServerError> {
    flotilla_files::write_atomic(path, contents.as_bytes(), 0o600).map_err(io_err(path))
}

fn certificate_names(listen: &SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && flotilla_types::validation::is_qualified_name(host) {
            names.push(host.to_string());
        }
    }
    names.extend(extra.iter().cloned());
    names
}

/// Starts serving; returns once the listener is bound.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let dir = &config.data_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        // Traversable but not listable: the agent's VM files below must be reachable by QEMU's
        // user in the all-in-one; every secret in here is a 0600 file.
        .mode(0o711)
        .create(dir)
        .map_err(io_err(dir))?;
    let store: Arc<dyn Store> = match &config.store {
        Some(s) => s.clone(),
        None => Arc::new(SqliteStore::open(dir.join("store.db")).await?),
    };
    let objects = Objects::new(store.clone());
    objects.ensure_default_project().await?;
    objects.ensure_default_pool().await?;
    rbac::ensure_builtin(&objects).await?;
    let cluster_id = objects.ensure_cluster_id().await?;
    // One shared store watch per kind, ready before the first client watches.
    for kind in flotilla_types::registry::KINDS {
        let prefix = objects::list_prefix(kind, None);
        objects.watch_cache().warm(&prefix, watch::translate).await;
    }
    let pki = pki::load_or_create(
        &dir.join("pki"),
        &certificate_names(&config.listen, &config.tls_names),
    )?;
    let tls = flotilla_tls::server_config(&pki.cert_pem, &pki.key_pem)?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let host = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
        ip if ip.is_unspecified() => "[::1]".to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    };
    let url = format!("https://{host}:{}", addr.port());

    // Reuse the admin token from admin.yaml while it is valid; otherwise issue a new one.
    let oidc = match &config.oidc {
        Some(c) => {
            let verifier = Arc::new(
                flotilla_oidc::Verifier::new(c.clone())
                    .map_err(|e| ServerError::Oidc(e.to_string()))?,
            );
            // Discovered now so that a wrong issuer shows in the log at once; verification
            // tries again while it fails.
            let early = verifier.clone();
            tokio::spawn(async move {
                if let Err(e) = early.prefetch().await {
                    tracing::warn!(error = %e, "the OIDC issuer is not usable yet; people cannot sign in until it is");
                }
            });
            Some(verifier)
        }
        None => None,
    };
    let auth = Arc::new(auth::Authenticator::with_oidc(store.clone(), oidc));
    let admin_path = dir.join("admin.yaml");
    let existing = std::fs::read_to_string(&admin_path)
        .ok()
        .and_then(|s| serde_yaml::from_str::<ClientConfig>(&s).ok())
        .and_then(|c| c.context(None).and_then(|ctx| ctx.token.clone()));
    let admin_token = match existing {
        Some(token)
            if auth
                .authenticate(&token)
                .await
                .is_ok_and(|p| p.user == "admin") =>
        {
            token
        }
        _ => {
            auth.issue(Some("admin"), "admin", &["system:masters"], None)
                .await?
        }
    };
    let admin_yaml = format!(
        "# Flotilla client configuration for the admin user. It holds the admin token: keep it secret.\n\
         # Use it with: export FLOTILLA_CONFIG={}\n{}",
        admin_path.display(),
        serde_yaml::to_string(&admin_config(&url, &pki.ca_pem, &admin_token)).expect("config serialises")
    );
    write_private(&admin_path, &admin_yaml)?;

    let state = http::AppState {
        objects: objects.clone(),
        auth,
        metrics: Arc::new(metrics::Metrics::default()),
        bookmark_interval: config.bookmark_interval,
        openapi: Arc::new(openapi::Documents::build()),
        ca_pem: Arc::new(pki.ca_pem.clone()),
        client_cert_pem: Arc::new(pki.client_cert_pem.clone()),
        client_key_pem: Arc::new(pki.client_key_pem.clone()),
        cluster_id: Arc::new(cluster_id.clone()),
        uploads: Arc::new(dir.join("uploads")),
        login: Arc::new(
            config
                .oidc
                .as_ref()
                .map(|c| (c.issuer.clone(), c.client_id.clone())),
        ),
        audit: match &config.audit {
            Some(a) => audit::AuditLog::start(a.clone()).map_err(|source| ServerError::Io {
                path: a.path.clone().unwrap_or_default(),
                source,
            })?,
            None => audit::AuditLog::default(),
        },
        ui: config.ui.clone(),
    };
    let app = http::router(state);
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let mut stop = rx.clone();
    let sweeper = uploads::run_sweeper(objects.clone(), dir.join("uploads"), config.upload_sweep);
    let recounter = quota::run_recounter(store.clone(), QUOTA_RECOUNT);
    tokio::spawn(async move {
        tokio::select! {
            _ = sweeper => {}
            _ = recounter => {}
            _ = stop.changed() => {}
        }
    });
    let mut limits = flotilla_tls::Limits::for_this_process();
    if let Some(n) = config.max_connections {
        limits.max_connections = n;
    }
    tracing::debug!(?limits, "connection limits");
    let task = tokio::spawn(flotilla_tls::serve(listener, tls, app, limits, rx));
    tracing::info!(%url, data_dir = %dir.display(), "API server listening");
    Ok(RunningServer {
        addr,
        url,
        ca_pem: pki.ca_pem,
        admin_token,
        objects,
        admin_config_path: admin_path,
        cluster_id,
        shutdown,
        task,
    })
}
