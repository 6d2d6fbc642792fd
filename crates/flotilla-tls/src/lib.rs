//! Flotilla's TLS listeners: the API server and the node agent both serve an axum router over
//! rustls, HTTP/1.1 and HTTP/2, through [`serve`], which holds against hostile clients:
//! - the accept loop never spins: errors (out of file descriptors) back off, and are logged at
//!   most once per [`LOG_EVERY`] with a count;
//! - at most [`Limits::max_connections`] connections; at the cap the longest-idle connection
//!   is closed to make room ([`connections`]);
//! - TLS handshakes, request headers (HTTP/1, also between requests on a kept-alive connection)
//!   and idle connections (HTTP/2) have timeouts; HTTP/2 connections have a stream limit and
//!   keep-alive pings;
//! - every request carries the peer's address (`axum::extract::ConnectInfo`), for per-client
//!   limits such as the server's on failed authentication;
//! - a request body the handler did not read is drained before the answer ([`unread`]), so
//!   that clients rejected early still get their answer.

pub mod connections;
pub mod unread;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use connections::{Admission, Conn, InFlight, Registry};

/// Repeated warnings of the accept loop are logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the server certificate or key is not valid PEM")]
    Pem,
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

pub fn server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Pem)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|_| TlsError::Pem)?
        .ok_or(TlsError::Pem)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a listener allows each client.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections held at once.
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// HTTP/1: the whole request head must arrive within this; on a kept-alive connection the
    /// clock starts when the previous response is done, so it is also the idle timeout.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2 has no timeout
    /// of its own for that).
    pub idle_timeout: Duration,
    /// Concurrent streams per HTTP/2 connection.
    pub max_streams: u32,
}

/// File descriptors kept for everything but client connections (the store, logs, outgoing
/// connections, libvirt).
const RESERVED_FDS: u64 = 128;

impl Limits {
    /// Defaults for a process allowed `open_files` descriptors.
    pub fn for_open_files(open_files: u64) -> Self {
        Limits {
            max_connections: open_files.saturating_sub(RESERVED_FDS).clamp(16, 65_536) as usize,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_streams: 256,
        }
    }

    /// Defaults for this process's current open-file limit.
    pub fn for_this_process() -> Self {
        Self::for_open_files(open_file_limit().0)
    }
}

/// The process's open-file limits (soft, hard).
pub fn open_file_limit() -> (u64, u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return (1024, 1024);
    }
    (l.rlim_cur, l.rlim_max)
}

/// Raises the soft open-file limit to the hard one (a server holds many connections; the
/// default soft limit of 1024 is for interactive shells). Returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    let (soft, hard) = open_file_limit();
    if soft < hard {
        let l = libc::rlimit {
            rlim_cur: hard as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: a valid rlimit for setrlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } == 0 {
            return hard;
        }
    }
    soft
}

/// Counts repeats of a warning and logs it at most once per [`LOG_EVERY`].
struct Throttled {
    what: &'static str,
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl Throttled {
    fn new(what: &'static str) -> Self {
        Throttled {
            what,
            last: None,
            suppressed: 0,
        }
    }

    fn hit(&mut self, detail: &dyn std::fmt::Display) {
        if self.last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(error = %detail, repeated = self.suppressed, "{}", self.what);
        self.last = Some(tokio::time::Instant::now());
        self.suppressed = 0;
    }
}

/// Accepts connections until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: Router,
    limits: Limits,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    serve_with(
        listener,
        Some(TlsAcceptor::from(config)),
        app,
        limits,
        shutdown,
    )
    .await
}

/// Like [`serve`], over plain HTTP/1 and 2 with the same limits: for endpoints that cannot
/// have TLS (a cloud metadata service at a link-local address).
pub async fn serve_plain(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    serve_with(listener, None, app, limits, shutdown).await
}

async fn serve_with(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let registry = Arc::new(Registry::new(limits.max_connections));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .adaptive_window(true)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let sweeper = {
        let registry = registry.clone();
        let idle = limits.idle_timeout;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle / 4);
            loop {
                tick.tick().await;
                registry.sweep(idle);
            }
        })
    };
    let (mut accept_failed, mut refused, mut evicting) = (
        Throttled::new("accept failed; backing off"),
        Throttled::new("every connection is busy; refusing new ones"),
        Throttled::new("at the connection limit; closing the longest-idle connections"),
    );
    let mut backoff = Duration::from_millis(5);
    loop {
        let (tcp, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(5);
                    a
                }
                Err(e) => {
                    accept_failed.hit(&e);
                    // Out of descriptors (or another transient error): wait before the next
                    // try instead of spinning on the same error.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let conn = match registry.admit() {
            Admission::Admitted { conn, evicted } => {
                if evicted {
                    evicting.hit(&format!("{} connections", limits.max_connections));
                }
                conn
            }
            Admission::Full => {
                refused.hit(&peer);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, builder, registry) = (
            acceptor.clone(),
            app.clone(),
            builder.clone(),
            registry.clone(),
        );
        let handshake_timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            tokio::select! {
                _ = serve_connection(tcp, peer, &acceptor, app, &builder, &conn, handshake_timeout) => {}
                _ = conn.close.notified() => tracing::debug!(%peer, "connection closed to make room or for idleness"),
            }
            registry.release(&conn);
        });
    }
    sweeper.abort();
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: &Option<TlsAcceptor>,
    app: Router,
    builder: &hyper_util::server::conn::auto::Builder<TokioExecutor>,
    conn: &Arc<Conn>,
    handshake_timeout: Duration,
) {
    let Some(acceptor) = acceptor else {
        return serve_io(tcp, peer, app, builder, conn).await;
    };
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    serve_io(tls, peer, app, builder, conn).await
}

async fn serve_io<I>(
    io: I,
    peer: SocketAddr,
    app: Router,
    builder: &hyper_util::server::conn::auto::Builder<TokioExecutor>,
    conn: &Arc<Conn>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = conn.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let guard = InFlight::begin(&conn);
        let has_body = !http_body::Body::is_end_stream(req.body());
        let (mut req, unread) = if has_body {
            let (parts, body) = req.into_parts();
            let (body, unread) = unread::share(Body::new(body));
            (hyper::Request::from_parts(parts, body), Some(unread))
        } else {
            (req.map(Body::new), None)
        };
        req.extensions_mut().insert(ConnectInfo(peer));
        let http1 = req.version() < hyper::Version::HTTP_2;
        let app = app.clone();
        async move {
            let mut response = tower::ServiceExt::oneshot(app, req).await?;
            if let Some(unread) = unread {
                if !unread.drain().await && http1 {
                    response.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
            }
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(Tracked {
                    inner: body,
                    _in_flight: guard,
                })
            }))
        }
    });
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A response body that keeps its request counted as in flight until it is sent or dropped
/// (a watch stays in flight as long as it streams).
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
