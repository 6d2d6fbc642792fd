//! The agent's HTTPS endpoint for the API server: VM console logs, consoles
//! ([`crate::consoles`]) and volume exports ([`crate::export`]). Its certificate is
//! self-signed and pinned by the server through the SHA-256 published in Node status; clients
//! must present a certificate signed by the Flotilla CA (only the API server has one).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::error::AgentError;

/// Largest part of a log sent without following (its tail).
const TAIL_BYTES: u64 = 4 << 20;

pub struct LogServer {
    pub endpoint: String,
    pub cert_sha256: String,
    _stop: tokio::sync::watch::Sender<bool>,
}

#[derive(serde::Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
}

pub(crate) fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

async fn log(
    State(vms): State<Arc<PathBuf>>,
    Path(uid): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    if !is_uid(&uid) {
        return (StatusCode::BAD_REQUEST, "not a VM uid").into_response();
    }
    let path = vms.join(&uid).join("console.log");
    let Ok(mut file) = tokio::fs::File::open(&path).await else {
        return (StatusCode::NOT_FOUND, "no log for this VM on this node").into_response();
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    if file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "cannot read the log").into_response();
    }
    let follow = q.follow;
    let stream = futures::stream::unfold((file, false), move |(mut file, done)| async move {
        if done {
            return None;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buf).await {
                Ok(0) if !follow => return None,
                Ok(0) => tokio::time::sleep(Duration::from_millis(200)).await,
                Ok(n) => {
                    buf.truncate(n);
                    return Some((Ok::<_, std::io::Error>(buf), (file, false)));
                }
                Err(e) => return Some((Err(e), (file, true))),
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

/// Starts serving on `listen`; `advertise` is the host name or address the server should use.
pub async fn start(
    listen: SocketAddr,
    advertise: Option<&str>,
    ca_pem: &str,
    data_dir: PathBuf,
    late: crate::export::Late,
) -> Result<LogServer, AgentError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| AgentError::Config(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let host = match advertise {
        Some(h) => h.to_string(),
        None if addr.ip().is_unspecified() => "127.0.0.1".to_string(),
        None => addr.ip().to_string(),
    };
    let tls_err = |e: String| AgentError::Config(format!("agent TLS: {e}"));
    let key = rcgen::KeyPair::generate().map_err(|e| tls_err(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(vec![host.clone(), "localhost".into()])
        .map_err(|e| tls_err(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "flotilla-agent");
    let cert = params
        .self_signed(&key)
        .map_err(|e| tls_err(e.to_string()))?;
    let cert_sha256 = hex::encode(Sha256::digest(cert.der()));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| tls_err(e.to_string()))?)
            .map_err(|e| tls_err(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| tls_err(e.to_string()))?;
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| tls_err(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.der().clone()], key_der)
        .map_err(|e| tls_err(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let exports = Router::new()
        .route("/v1/volumes/{uid}/data", get(crate::export::export))
        .with_state(late.clone());
    let consoles = crate::consoles::Consoles::new(&data_dir, late);
    let consoles = Router::new()
        .route("/v1/vms/{uid}/serial", get(crate::consoles::serial))
        .route("/v1/vms/{uid}/vnc", get(crate::consoles::vnc))
        .with_state(consoles);
    let app = Router::new()
        .route("/v1/vms/{uid}/log", get(log))
        .with_state(Arc::new(data_dir.join("vms")))
        .merge(consoles)
        .merge(exports)
        .layer(axum::middleware::from_fn(log_request));
    let (stop, rx) = tokio::sync::watch::channel(false);
    // Only the API server (or its replicas) connects here.
    let mut limits = flotilla_tls::Limits::for_this_process();
    limits.max_connections = limits.max_connections.min(256);
    tokio::spawn(flotilla_tls::serve(
        listener,
        Arc::new(config),
        app,
        limits,
        rx,
    ));
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(LogServer {
        endpoint: format!("https://{host}:{}", addr.port()),
        cert_sha256,
        _stop: stop,
    })
}

/// Logs each request of the API server with the id it carries (the one in the server's audit
/// log), so that a user's request can be followed onto the node.
async fn log_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .unwrap_or("-")
        .to_string();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    tracing::info!(request_id = %id, %path, status = response.status().as_u16(), "served the API server");
    response
}
