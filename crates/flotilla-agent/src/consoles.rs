//! A VM's consoles as the API server reaches them: QEMU serves the serial console and VNC on
//! unix sockets in the VM's directory (no TCP port, no password on the wire), and the agent
//! offers each as a WebSocket on its mutual-TLS endpoint ([`crate::logserver`]).
//!
//! QEMU's serial socket takes one client at a time, so the agent holds that one connection per
//! VM while anyone watches and shares it ([`SerialHub`]): every viewer sees the output, anyone
//! may type, and a new viewer first gets the recent output. VNC needs no sharing: QEMU serves
//! several VNC clients itself.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, Semaphore};

/// The serial console's socket in a VM's directory.
pub fn serial_socket(vm_dir: &Path) -> PathBuf {
    vm_dir.join("serial.sock")
}

/// Where the running domain's VNC socket is. QEMU itself binds it (libvirt passes it no
/// descriptor, unlike the serial socket's), so it lives in libvirt's own directory for the
/// domain, which QEMU's user may write, and is read from the live definition.
pub fn vnc_socket_of(live_xml: &str) -> Option<PathBuf> {
    let doc = roxmltree::Document::parse(live_xml).ok()?;
    doc.descendants()
        .find(|n| n.has_tag_name("graphics") && n.attribute("type") == Some("vnc"))?
        .attribute("socket")
        .map(PathBuf::from)
}

/// Recent serial output a new viewer gets first.
const RECENT_BYTES: usize = 64 * 1024;
/// Console sessions one agent serves at once (each holds a socket and a WebSocket).
const MAX_SESSIONS: usize = 128;

/// The consoles of this node's VMs.
pub struct Consoles {
    vms: PathBuf,
    /// The agent's context (libvirt), once it has one.
    late: crate::export::Late,
    hubs: Mutex<HashMap<String, Weak<SerialHub>>>,
    sessions: Arc<Semaphore>,
}

impl Consoles {
    pub fn new(data_dir: &Path, late: crate::export::Late) -> Arc<Consoles> {
        Arc::new(Consoles {
            vms: data_dir.join("vms"),
            late,
            hubs: Mutex::new(HashMap::new()),
            sessions: Arc::new(Semaphore::new(MAX_SESSIONS)),
        })
    }

    /// The shared connection to `uid`'s serial console, made when the first viewer comes.
    async fn hub(&self, uid: &str) -> std::io::Result<Arc<SerialHub>> {
        if let Some(hub) = self.live_hub(uid) {
            return Ok(hub);
        }
        let dir = self.vms.join(uid);
        let recent = log_tail(&dir.join("console.log")).await;
        let stream = UnixStream::connect(serial_socket(&dir)).await?;
        let mut hubs = self.hubs.lock().expect("hubs lock");
        // Another viewer may have connected meanwhile: theirs is kept, this one closes.
        if let Some(hub) = hubs.get(uid).and_then(open_hub) {
            return Ok(hub);
        }
        hubs.retain(|_, h| h.strong_count() > 0);
        let hub = SerialHub::start(stream, recent);
        hubs.insert(uid.to_string(), Arc::downgrade(&hub));
        Ok(hub)
    }

    fn live_hub(&self, uid: &str) -> Option<Arc<SerialHub>> {
        self.hubs
            .lock()
            .expect("hubs lock")
            .get(uid)
            .and_then(open_hub)
    }
}

/// The hub, unless every viewer has left or its console has closed (the VM stopped; a new
/// connection reaches the VM after a restart).
fn open_hub(hub: &Weak<SerialHub>) -> Option<Arc<SerialHub>> {
    let hub = hub.upgrade()?;
    let open = hub.shared.lock().expect("hub lock").1.is_some();
    open.then_some(hub)
}

/// The last [`RECENT_BYTES`] of the console log: what the guest printed before anyone watched.
async fn log_tail(path: &Path) -> Vec<u8> {
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(RECENT_BYTES as u64);
    let mut out = Vec::new();
    if file.seek(std::io::SeekFrom::Start(start)).await.is_ok() {
        let _ = file.read_to_end(&mut out).await;
    }
    out
}

/// One connection to a VM's serial console, shared by its viewers. It closes when the last
/// viewer leaves (the tasks are aborted on drop) or when QEMU closes the socket.
pub struct SerialHub {
    shared: Arc<Mutex<Shared>>,
    input: mpsc::Sender<Bytes>,
    tasks: Vec<tokio::task::AbortHandle>,
}

/// Recent output and the sender of new output, under one lock: a viewer joining gets the
/// recent output and a subscription with nothing missed or repeated in between. No sender
/// once the console has closed.
type Shared = (VecDeque<u8>, Option<broadcast::Sender<Bytes>>);

impl SerialHub {
    fn start(stream: UnixStream, recent: Vec<u8>) -> Arc<SerialHub> {
        let (mut read, mut write) = stream.into_split();
        let (out, _) = broadcast::channel(256);
        let (input, mut typed) = mpsc::channel::<Bytes>(64);
        let mut kept = VecDeque::from(recent);
        let excess = kept.len().saturating_sub(RECENT_BYTES);
        kept.drain(..excess);
        let shared = Arc::new(Mutex::new((kept, Some(out))));
        let reader = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = read.read(&mut buf).await.unwrap_or(0);
                    let mut shared = shared.lock().expect("hub lock");
                    if n == 0 {
                        shared.1 = None;
                        return;
                    }
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    shared.0.extend(chunk.iter());
                    let excess = shared.0.len().saturating_sub(RECENT_BYTES);
                    shared.0.drain(..excess);
                    if let Some(out) = &shared.1 {
                        let _ = out.send(chunk);
                    }
                }
            })
        };
        let writer = tokio::spawn(async move {
            while let Some(bytes) = typed.recv().await {
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        Arc::new(SerialHub {
            shared,
            input,
            tasks: vec![reader.abort_handle(), writer.abort_handle()],
        })
    }

    /// The recent output and a subscription to what follows (`None`: the console has closed).
    fn join(&self) -> Option<(Vec<u8>, broadcast::Receiver<Bytes>)> {
        let shared = self.shared.lock().expect("hub lock");
        let rx = shared.1.as_ref()?.subscribe();
        Some((shared.0.iter().copied().collect(), rx))
    }
}

impl Drop for SerialHub {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn refuse(code: StatusCode, why: &str) -> Response {
    (code, why.to_string()).into_response()
}

/// A session for VM `uid`, unless the uid is malformed or the node serves enough already.
fn admit(
    consoles: &Consoles,
    uid: &str,
) -> Result<tokio::sync::OwnedSemaphorePermit, (StatusCode, &'static str)> {
    if !crate::logserver::is_uid(uid) {
        return Err((StatusCode::BAD_REQUEST, "not a VM uid"));
    }
    consoles.sessions.clone().try_acquire_owned().map_err(|_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many open consoles on this node",
        )
    })
}

/// `GET /v1/vms/{uid}/serial` (WebSocket): the VM's interactive serial console, shared.
pub async fn serial(
    State(consoles): State<Arc<Consoles>>,
    UrlPath(uid): UrlPath<String>,
    ws: WebSocketUpgrade,
) -> Response {
    let permit = match admit(&consoles, &uid) {
        Ok(permit) => permit,
        Err((code, why)) => return refuse(code, why),
    };
    let hub = match consoles.hub(&uid).await {
        Ok(hub) => hub,
        Err(_) => return not_running(),
    };
    let Some((recent, mut rx)) = hub.join() else {
        return not_running();
    };
    ws.on_upgrade(move |socket| async move {
        let _permit = permit;
        let (mut to_viewer, mut from_viewer) = socket.split();
        if !recent.is_empty() && to_viewer.send(Message::Binary(recent.into())).await.is_err() {
            return;
        }
        let output = async {
            loop {
                match rx.recv().await {
                    Ok(chunk) => {
                        if to_viewer.send(Message::Binary(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let note = format!("\r\n[flotilla: {n} chunks of output skipped: this viewer fell behind]\r\n");
                        if to_viewer.send(Message::Binary(note.into())).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = to_viewer
                            .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                                code: 1000,
                                reason: "the console closed (the VM stopped)".into(),
                            })))
                            .await;
                        return;
                    }
                }
            }
        };
        let input = async {
            while let Some(Ok(message)) = from_viewer.next().await {
                let bytes = match message {
                    Message::Binary(b) => b,
                    Message::Text(t) => Bytes::copy_from_slice(t.as_bytes()),
                    Message::Close(_) => return,
                    _ => continue,
                };
                if hub.input.send(bytes).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = output => {}
            _ = input => {}
        }
    })
}

/// `GET /v1/vms/{uid}/vnc` (WebSocket): the VM's VNC (RFB) stream, one connection per viewer.
pub async fn vnc(
    State(consoles): State<Arc<Consoles>>,
    UrlPath(uid): UrlPath<String>,
    ws: WebSocketUpgrade,
) -> Response {
    let permit = match admit(&consoles, &uid) {
        Ok(permit) => permit,
        Err((code, why)) => return refuse(code, why),
    };
    let Some(ctx) = consoles.late.get() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "the agent is starting");
    };
    let xml = match ctx.libvirt.xml(&uid).await {
        Ok(Some(xml)) => xml,
        Ok(None) => return not_running(),
        Err(e) => return refuse(StatusCode::BAD_GATEWAY, &format!("libvirt: {e}")),
    };
    let Some(path) = vnc_socket_of(&xml) else {
        return not_running();
    };
    let Ok(stream) = UnixStream::connect(path).await else {
        return not_running();
    };
    ws.on_upgrade(move |socket| async move {
        let _permit = permit;
        pipe(socket, stream).await
    })
}

fn not_running() -> Response {
    refuse(StatusCode::NOT_FOUND, "the VM is not running on this node")
}

/// Copies binary messages to the socket and what the socket says back, until either side ends.
async fn pipe(socket: WebSocket, stream: UnixStream) {
    let (mut to_viewer, mut from_viewer) = socket.split();
    let (mut read, mut write) = stream.into_split();
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = read.read(&mut buf).await {
            if n == 0
                || to_viewer
                    .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
            {
                break;
            }
        }
        let _ = to_viewer.send(Message::Close(None)).await;
    };
    let up = async {
        while let Some(Ok(message)) = from_viewer.next().await {
            let bytes = match message {
                Message::Binary(b) => b,
                Message::Close(_) => return,
                _ => continue,
            };
            if write.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}
