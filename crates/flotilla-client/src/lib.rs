//! Rust client for the Flotilla API: one [`Client`] per server (or set of replicas), generic
//! over kinds through the type registry, with watch streams.

mod console;
pub use console::{ConsoleKind, ConsoleSocket};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flotilla_types::clientconfig::Context;
use flotilla_types::registry::KindInfo;
use flotilla_types::Status;
use futures::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error; the message is the server's.
    #[error("{}", .0.message)]
    Api(Box<Status>),
    #[error("cannot reach the server at {url}: {message}")]
    Transport { url: String, message: String },
    #[error("the server's answer could not be read: {0}")]
    Decode(String),
    #[error("client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Api(s) => Some(s.code),
            _ => None,
        }
    }
}

/// Parameters of a list or watch.
#[derive(Clone, Debug, Default)]
pub struct ListParams {
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

impl ListParams {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(s) = &self.label_selector {
            q.push(("labelSelector", s.clone()));
        }
        if let Some(s) = &self.field_selector {
            q.push(("fieldSelector", s.clone()));
        }
        if let Some(l) = self.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = &self.continue_token {
            q.push(("continue", c.clone()));
        }
        q
    }
}

/// One watch event.
#[derive(Clone, Debug, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub type_: String,
    pub object: Value,
}

pub struct Client {
    http: reqwest::Client,
    urls: Vec<String>,
    token: Option<String>,
    /// The CA the server's certificate is checked against (the system's roots without one).
    ca_pem: Option<String>,
    /// The URL that answered last; tried first.
    active: AtomicUsize,
}

/// The path of a collection, an object or its status.
pub fn path(kind: &KindInfo, namespace: Option<&str>, name: Option<&str>, status: bool) -> String {
    let enc = |s: &str| urlencoding::encode(s).into_owned();
    let mut p = kind.api_root();
    if kind.namespaced {
        p.push_str(&format!(
            "/namespaces/{}",
            enc(namespace.unwrap_or("default"))
        ));
    }
    p.push_str(&format!("/{}", kind.plural));
    if let Some(n) = name {
        p.push_str(&format!("/{}", enc(n)));
        if status {
            p.push_str("/status");
        }
    }
    p
}

impl Client {
    /// `urls` are tried in order (replicas); `ca_pem` is the CA that signed the server certificate.
    pub fn new(
        urls: Vec<String>,
        ca_pem: Option<&str>,
        token: Option<String>,
    ) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::Config(
                "no server URL: pass --server or set one in the config file".into(),
            ));
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(pem) = ca_pem {
            let cert = reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|e| {
                ClientError::Config(format!("the CA certificate is not valid PEM: {e}"))
            })?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let urls = urls
            .into_iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        Ok(Client {
            http,
            urls,
            token,
            ca_pem: ca_pem.map(str::to_string),
            active: AtomicUsize::new(0),
        })
    }

    pub fn from_context(ctx: &Context) -> Result<Self, ClientError> {
        Client::new(
            ctx.urls(),
            ctx.certificate_authority_data.as_deref(),
            ctx.token.clone(),
        )
    }

    /// Sends a request, moving to the next server URL when one cannot be reached.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<reqwest::Response, ClientError> {
        let start = self.active.load(Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..self.urls.len() {
            let idx = (start + i) % self.urls.len();
            let url = format!("{}{path}", self.urls[idx]);
            let mut req = self.http.request(method.clone(), &url).query(query);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some((ct, bytes)) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, *ct)
                    .body(bytes.clone());
            }
            match req.send().await {
                Ok(resp) => {
                    self.active.store(idx, Ordering::Relaxed);
                    if resp.status().is_success() {
                        return Ok(resp);
                    }
                    return Err(error_from(resp).await);
                }
                Err(e) => {
                    let mut message = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        message = format!("{message}: {s}");
                        source = s.source();
                    }
                    last_error = Some(ClientError::Transport {
                        url: self.urls[idx].clone(),
                        message,
                    });
                }
            }
        }
        Err(last_error.expect("at least one URL was tried"))
    }

    pub async fn request_json(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Value, ClientError> {
        let resp = self.send(method, path, query, body).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Sends `body` as JSON (with `content_type`) and reads a JSON answer.
    async fn send_value(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: &Value,
    ) -> Result<Value, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.request_json(method, path, &[], Some((content_type, bytes)))
            .await
    }

    /// The addresses NICs hold on a network (`NetworkAddressList`).
    pub async fn network_addresses(
        &self,
        project: &str,
        network: &str,
    ) -> Result<Value, ClientError> {
        let kind = flotilla_types::registry::lookup("network").expect("registered");
        let path = format!(
            "{}/addresses",
            path(kind, Some(project), Some(network), false)
        );
        self.request_json(Method::GET, &path, &[], None).await
    }

    pub async fn get(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ClientError> {
        self.request_json(
            Method::GET,
            &path(kind, namespace, Some(name), false),
            &[],
            None,
        )
        .await
    }

    /// Lists a kind in one project (`namespace`), or in all projects (`None`, project-scoped kinds).
    pub async fn list(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        params: &ListParams,
    ) -> Result<Value, ClientError> {
        let p = list_path(kind, namespace);
        self.request_json(Method::GET, &p, &params.query(), None)
            .await
    }

    pub async fn create(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        object: &Value,
    ) -> Result<Value, ClientError> {
        self.send_value(
            Method::POST,
            &path(kind, namespace, None, false),
            "application/json",
            object,
        )
        .await
    }

    pub async fn replace(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        object: &Value,
    ) -> Result<Value, ClientError> {
        self.send_value(
            Method::PUT,
            &path(kind, namespace, Some(name), false),
            "application/json",
            object,
        )
        .await
    }

    pub async fn replace_status(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        object: &Value,
    ) -> Result<Value, ClientError> {
        self.send_value(
            Method::PUT,
            &path(kind, namespace, Some(name), true),
            "application/json",
            object,
        )
        .await
    }

    /// A JSON merge patch of the object (`status = false`) or of its status.
    pub async fn patch(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        status: bool,
    ) -> Result<Value, ClientError> {
        self.send_value(
            Method::PATCH,
            &path(kind, namespace, Some(name), status),
            "application/merge-patch+json",
            patch,
        )
        .await
    }

    /// Deletes; returns the object and whether it is gone (false: waiting for finalizers).
    pub async fn delete(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(Value, bool), ClientError> {
        let resp = self
            .send(
                Method::DELETE,
                &path(kind, namespace, Some(name), false),
                &[],
                None,
            )
            .await?;
        let gone = resp.status() == StatusCode::OK;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let v = serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((v, gone))
    }

    /// Watches a kind. `resource_version = None` starts with ADDED events for what exists.
    pub async fn watch(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        params: &ListParams,
        resource_version: Option<&str>,
    ) -> Result<impl Stream<Item = Result<WatchEvent, ClientError>>, ClientError> {
        let mut query = params.query();
        query.push(("watch", "true".into()));
        query.push(("allowWatchBookmarks", "true".into()));
        if let Some(rv) = resource_version {
            query.push(("resourceVersion", rv.to_string()));
        }
        let resp = self
            .send(Method::GET, &list_path(kind, namespace), &query, None)
            .await?;
        Ok(lines(resp.bytes_stream()).map(|line| {
            let line = line?;
            serde_json::from_slice::<WatchEvent>(&line)
                .map_err(|e| ClientError::Decode(format!("watch event: {e}")))
        }))
    }
}

fn list_path(kind: &KindInfo, namespace: Option<&str>) -> String {
    match namespace {
        Some(_) => path(kind, namespace, None, false),
        None => format!("{}/{}", kind.api_root(), kind.plural),
    }
}

async fn error_from(resp: reqwest::Response) -> ClientError {
    let code = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap_or_default();
    status_error(code, &bytes)
}

/// The server's `Status`, or its words as one when the answer is not JSON.
fn status_error(code: u16, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<Status>(bytes) {
        Ok(status) => ClientError::Api(Box::new(status)),
        Err(_) => ClientError::Api(Box::new(Status::failure(
            code,
            "Unknown",
            String::from_utf8_lossy(bytes).trim().to_string(),
        ))),
    }
}

/// Splits a byte stream into lines.
fn lines(
    body: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
) -> impl Stream<Item = Result<Vec<u8>, ClientError>> + Send {
    futures::stream::unfold(
        (Box::pin(body), Vec::<u8>::new(), false),
        |(mut body, mut buf, mut done)| async move {
            loop {
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    return Some((Ok(line[..line.len() - 1].to_vec()), (body, buf, done)));
                }
                if done {
                    return None;
                }
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        done = true;
                        buf.clear();
                        return Some((
                            Err(ClientError::Decode(format!("watch stream broke: {e}"))),
                            (body, buf, done),
                        ));
                    }
                    None => {
                        done = true;
                        if buf.iter().all(u8::is_ascii_whitespace) {
                            return None;
                        }
                        buf.push(b'\n');
                    }
                }
            }
        },
    )
}

impl Client {
    /// A VM's serial console log, proxied by the server from its node; `follow` keeps streaming.
    /// Sends the file of an uploaded Image (`source: {upload: {}}`), streamed from `body`
    /// (`len` bytes); returns the Image as the server has it after checking the file. Only the
    /// server in use is tried: a stream cannot be sent twice.
    pub async fn upload_image(
        &self,
        namespace: &str,
        name: &str,
        body: reqwest::Body,
        len: u64,
    ) -> Result<Value, ClientError> {
        let kind = flotilla_types::registry::by_kind("Image").expect("registered");
        let p = format!("{}/data", path(kind, Some(namespace), Some(name), false));
        let idx = self.active.load(Ordering::Relaxed) % self.urls.len();
        let mut req = self
            .http
            .put(format!("{}{p}", self.urls[idx]))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| ClientError::Transport {
            url: self.urls[idx].clone(),
            message: e.to_string(),
        })?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        resp.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A volume's content as one standalone `format` (qcow2 or raw) file, as a stream.
    pub async fn volume_data(
        &self,
        namespace: &str,
        name: &str,
        format: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>>, ClientError> {
        let kind = flotilla_types::registry::by_kind("Volume").expect("registered");
        let p = format!("{}/data", path(kind, Some(namespace), Some(name), false));
        let resp = self
            .send(Method::GET, &p, &[("format", format.to_string())], None)
            .await?;
        Ok(resp
            .bytes_stream()
            .map(|c| c.map_err(|e| ClientError::Decode(format!("the volume stream broke: {e}")))))
    }

    /// The file of an uploaded Image, as a stream.
    pub async fn image_data(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>>, ClientError> {
        let kind = flotilla_types::registry::by_kind("Image").expect("registered");
        let p = format!("{}/data", path(kind, Some(namespace), Some(name), false));
        let resp = self.send(Method::GET, &p, &[], None).await?;
        Ok(resp
            .bytes_stream()
            .map(|c| c.map_err(|e| ClientError::Decode(format!("the image stream broke: {e}")))))
    }

    pub async fn vm_log(
        &self,
        namespace: &str,
        name: &str,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>>, ClientError> {
        let kind = flotilla_types::registry::by_kind("VirtualMachine").expect("registered");
        let p = format!("{}/log", path(kind, Some(namespace), Some(name), false));
        let query = [("follow", follow.to_string())];
        let resp = self.send(Method::GET, &p, &query, None).await?;
        Ok(resp
            .bytes_stream()
            .map(|c| c.map_err(|e| ClientError::Decode(format!("log stream broke: {e}")))))
    }
}
