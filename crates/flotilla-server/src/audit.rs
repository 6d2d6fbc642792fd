//! The audit log: one JSON line per API request that changed something or was refused (401,
//! 403), saying who (user, groups, address), what (verb, resource, name, project), the answer
//! and the request's id. Never a token, a body or a header. Nodes renewing their own Lease
//! (every few seconds, by design) are left out.
//!
//! Every request gets an id (`X-Request-Id`: the client's if it sent a sane one, else a new
//! UUID), answered in the same header, stamped on the objects agents act on
//! (`flotilla.dev/request-id`) and sent along when the server calls an agent, so that one id
//! leads from the audit log to the agents' logs.
//!
//! Lines go through a bounded queue to one writer, which rotates the file by size (`audit.log`,
//! `audit.log.1`, ... up to `max_files`) and copies lines to stdout when asked.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::json;
use tokio::sync::mpsc;

use crate::auth::Principal;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The annotation that carries the id of the request that last changed an object's spec.
pub const REQUEST_ID_ANNOTATION: &str = "flotilla.dev/request-id";

/// Where audit lines go.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// The file (None: no file).
    pub path: Option<PathBuf>,
    /// Also print each line on stdout.
    pub stdout: bool,
    /// A file grows to this many bytes before it is rotated.
    pub max_bytes: u64,
    /// Rotated files kept besides the current one.
    pub max_files: u32,
}

impl AuditConfig {
    pub fn in_dir(data_dir: &std::path::Path) -> Self {
        AuditConfig {
            path: Some(data_dir.join("audit.log")),
            stdout: false,
            max_bytes: 100 * 1024 * 1024,
            max_files: 5,
        }
    }
}

/// This request's id, in its extensions.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Where authentication leaves the caller for the audit line (the request itself is gone by
/// the time the answer is known).
#[derive(Clone, Default)]
pub struct Caller(Arc<Mutex<Option<Principal>>>);

impl Caller {
    pub fn set(&self, p: &Principal) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
    }

    fn get(&self) -> Option<Principal> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The queue to the writer; None when auditing is off.
#[derive(Clone, Default)]
pub struct AuditLog(Option<mpsc::Sender<String>>);

impl AuditLog {
    /// Starts the writer. Fails if the file cannot be opened.
    pub fn start(config: AuditConfig) -> std::io::Result<AuditLog> {
        let mut writer = Writer::open(config)?;
        let (tx, mut rx) = mpsc::channel::<String>(10_000);
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                while let Some(line) = rx.blocking_recv() {
                    if let Err(e) = writer.write(&line) {
                        tracing::error!(error = %e, "cannot write the audit log");
                    }
                }
            })?;
        Ok(AuditLog(Some(tx)))
    }

    async fn record(&self, line: String) {
        if let Some(tx) = &self.0 {
            // A full queue slows requests down rather than lose their record.
            let _ = tx.send(line).await;
        }
    }
}

struct Writer {
    config: AuditConfig,
    file: Option<std::fs::File>,
    size: u64,
}

impl Writer {
    fn open(config: AuditConfig) -> std::io::Result<Writer> {
        let mut w = Writer {
            config,
            file: None,
            size: 0,
        };
        w.reopen()?;
        Ok(w)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        if let Some(path) = &self.config.path {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode_0600()
                .open(path)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let Some(path) = self.config.path.clone() else {
            return Ok(());
        };
        self.file = None;
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
        let _ = std::fs::remove_file(numbered(self.config.max_files));
        for n in (1..self.config.max_files).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        if self.config.max_files > 0 {
            std::fs::rename(&path, numbered(1))?;
        } else {
            std::fs::remove_file(&path)?;
        }
        self.reopen()
    }

    fn write(&mut self, line: &str) -> std::io::Result<()> {
        if self.config.stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
        }
        if self.file.is_some() && self.size + line.len() as u64 + 1 > self.config.max_bytes {
            self.rotate()?;
        }
        if let Some(f) = &mut self.file {
            f.write_all(line.as_bytes())?;
            f.write_all(b"\n")?;
            self.size += line.len() as u64 + 1;
        }
        Ok(())
    }
}

trait Private {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Private for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// A request id a client may choose: short, and only characters that are safe in a log line.
fn sane(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// What a request does, read from its method and path: (verb, resource, name, project).
fn describe(method: &Method, path: &str, query: &str) -> (String, String, String, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest: &[&str] = match parts.as_slice() {
        ["api", _, rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => &[],
    };
    let rest = match rest {
        ["watch", rest @ ..] => rest,
        r => r,
    };
    let (project, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        r => (String::new(), r),
    };
    let (resource, name) = match rest {
        [plural] => (plural.to_string(), String::new()),
        [plural, name] => (plural.to_string(), name.to_string()),
        [plural, name, sub] => (format!("{plural}/{sub}"), name.to_string()),
        _ => (path.to_string(), String::new()),
    };
    let watching = query
        .split('&')
        .any(|q| q == "watch=true" || q == "watch=1")
        || path.contains("/watch/");
    let verb = match (method, name.is_empty()) {
        (&Method::GET, true) if watching => "watch",
        (&Method::GET, true) => "list",
        (&Method::GET, false) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "deletecollection",
        (&Method::DELETE, false) => "delete",
        (m, _) => m.as_str(),
    };
    (verb.to_lowercase(), resource, name, project)
}

/// The middleware: gives the request its id, and records the line once the answer is known.
pub async fn record(State(log): State<AuditLog>, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| sane(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let caller = Caller::default();
    req.extensions_mut().insert(RequestId(id.clone()));
    req.extensions_mut().insert(caller.clone());
    let mut response = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let code = response.status().as_u16();
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let denied = code == 401 || code == 403;
    // A console opened (a WebSocket upgrade) is an action, though its verb reads.
    let opened = code == 101;
    if log.0.is_none() || !(mutating || denied || opened) {
        return response;
    }
    let principal = caller.get();
    let (verb, resource, name, project) = describe(&method, &path, &query);
    // Nodes renew their Lease every few seconds: that is their heartbeat, not an action.
    if let Some(p) = &principal {
        if !denied && resource == "leases" && p.node_name().is_some_and(|n| n == name) {
            return response;
        }
    }
    let line = json!({
        "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "requestID": id,
        "user": principal.as_ref().map(|p| p.user.as_str()),
        "groups": principal.as_ref().map(|p| p.groups.clone()).unwrap_or_default(),
        "source": source,
        "verb": verb,
        "resource": resource,
        "name": name,
        "project": project,
        "code": code,
    });
    log.record(line.to_string()).await;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_described_as_rbac_sees_them() {
        let d = |m: Method, p: &str, q: &str| describe(&m, p, q);
        assert_eq!(
            d(
                Method::POST,
                "/apis/flotilla.dev/v1alpha1/namespaces/a/virtualmachines",
                ""
            ),
            (
                "create".into(),
                "virtualmachines".into(),
                "".into(),
                "a".into()
            )
        );
        assert_eq!(
            d(
                Method::GET,
                "/apis/flotilla.dev/v1alpha1/namespaces/a/virtualmachines/web/log",
                ""
            ),
            (
                "get".into(),
                "virtualmachines/log".into(),
                "web".into(),
                "a".into()
            )
        );
        assert_eq!(
            d(
                Method::GET,
                "/apis/flotilla.dev/v1alpha1/virtualmachines",
                "watch=true"
            ),
            (
                "watch".into(),
                "virtualmachines".into(),
                "".into(),
                "".into()
            )
        );
        assert_eq!(
            d(
                Method::DELETE,
                "/api/v1/namespaces/ci/serviceaccounts/robot/token",
                "id=x"
            ),
            (
                "delete".into(),
                "serviceaccounts/token".into(),
                "robot".into(),
                "ci".into()
            )
        );
        assert_eq!(
            d(Method::PATCH, "/apis/flotilla.dev/v1alpha1/projects/p", "").3,
            ""
        );
    }

    #[test]
    fn only_sane_request_ids_are_taken_from_clients() {
        assert!(sane("3f1c-abc_1.2"));
        for bad in ["", "a b", "x\ny", &"a".repeat(65), "\"quoted\""] {
            assert!(!sane(bad), "{bad:?}");
        }
    }

    #[test]
    fn files_rotate_by_size_keeping_so_many() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut w = Writer::open(AuditConfig {
            path: Some(path.clone()),
            stdout: false,
            max_bytes: 100,
            max_files: 2,
        })
        .unwrap();
        for i in 0..20 {
            w.write(&format!(
                "{{\"line\":{i:04},\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}}"
            ))
            .unwrap();
        }
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
        assert!(read(&path).ends_with("\"line\":0019,\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}\n"));
        for f in [
            &path,
            &dir.path().join("audit.log.1"),
            &dir.path().join("audit.log.2"),
        ] {
            assert!(
                std::fs::metadata(f).unwrap().len() <= 100,
                "{}",
                f.display()
            );
        }
        assert!(!dir.path().join("audit.log.3").exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
