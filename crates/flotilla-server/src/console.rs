//! A VM's consoles through the API server, as WebSockets:
//! `.../namespaces/P/virtualmachines/NAME/console` (the serial console, bytes both ways) and
//! `.../vnc` (VNC's RFB stream, for noVNC). The server authenticates and authorizes the caller
//! (`create` on `virtualmachines/console` or `virtualmachines/vnc`, as Kubernetes asks for
//! `pods/attach`), then joins the WebSocket to the agent's over mutual TLS
//! ([`crate::pinned`]); the agent reaches QEMU on unix sockets only.
//!
//! Browsers cannot put a bearer token on a WebSocket, so a `POST` to the same path gives a
//! console ticket: single use, valid [`TICKET_TTL`], for this console of this VM (by uid) and
//! the caller who asked. It is kept in the store (hashed, under a lease), so any replica
//! accepts it.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use flotilla_store::{Op, Txn};
use flotilla_types::registry;
use futures::{SinkExt, StreamExt};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::http::AppState;

/// How long a console ticket may wait to be used.
pub const TICKET_TTL: Duration = Duration::from_secs(30);
const TICKETS: &str = "/flotilla/console-tickets/";
/// Console sessions one server relays at once.
const MAX_SESSIONS: usize = 512;
/// The browser is pinged this often, and a session that has heard nothing from it for
/// [`SILENCE`] is closed (a vanished laptop must not hold a console forever).
const PING_EVERY: Duration = Duration::from_secs(20);
const SILENCE: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Console {
    Serial,
    Vnc,
}

impl Console {
    /// The subresource RBAC names.
    fn subresource(self) -> &'static str {
        match self {
            Console::Serial => "console",
            Console::Vnc => "vnc",
        }
    }

    fn agent_path(self) -> &'static str {
        match self {
            Console::Serial => "serial",
            Console::Vnc => "vnc",
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Ticket {
    user: String,
    groups: Vec<String>,
    project: String,
    name: String,
    uid: String,
    console: Console,
    expires: chrono::DateTime<chrono::Utc>,
}

fn sessions() -> &'static Arc<Semaphore> {
    static SESSIONS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SESSIONS.get_or_init(|| Arc::new(Semaphore::new(MAX_SESSIONS)))
}

pub async fn serial(
    state: State<AppState>,
    path: Path<(String, String)>,
    query: RawQuery,
    req: Request,
) -> Response {
    open(Console::Serial, state, path, query, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn vnc(
    state: State<AppState>,
    path: Path<(String, String)>,
    query: RawQuery,
    req: Request,
) -> Response {
    open(Console::Vnc, state, path, query, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn open(
    console: Console,
    State(state): State<AppState>,
    Path((project, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    req: Request,
) -> Result<Response, ApiError> {
    let ticket = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "ticket")
        .map(|(_, v)| v.into_owned());
    let method = req.method().clone();
    let request_id = req
        .extensions()
        .get::<crate::audit::RequestId>()
        .map(|r| r.0.clone());
    let caller = req.extensions().get::<crate::audit::Caller>().cloned();
    let credentials = crate::http::credentials(&req);
    let (mut parts, _) = req.into_parts();
    // A GET must be a WebSocket before anything else: a plain GET does not use up a ticket.
    let upgrade = match method {
        Method::GET => Some(
            WebSocketUpgrade::from_request_parts(&mut parts, &state)
                .await
                .map_err(|_| {
                    ApiError::bad_request(format!(
                        "{} is a WebSocket: open it with a WebSocket client (Upgrade: websocket), or use `flotilla vm console`",
                        parts.uri.path()
                    ))
                })?,
        ),
        _ => None,
    };
    // The uid of the VM a redeemed ticket was for: the VM read below must be that one.
    let mut ticket_uid = None;
    let principal = match (&ticket, &method) {
        (Some(ticket), &Method::GET) => {
            let (principal, uid) = redeem(&state, ticket, console, (&project, &name)).await?;
            ticket_uid = Some(uid);
            principal
        }
        (Some(_), _) => {
            return Err(ApiError::bad_request(
                "a console ticket opens the console (GET); ask for a ticket with a token",
            ))
        }
        (None, _) => {
            state
                .auth
                .authenticate_from(credentials.1, credentials.0.as_deref())
                .await?
        }
    };
    if let Some(caller) = caller {
        caller.set(&principal);
    }
    let vms = registry::by_kind("VirtualMachine").expect("registered");
    let asked =
        crate::authz::Request::new(crate::authz::Verb::Create, vms, Some(&project), Some(&name));
    crate::authz::authorize(&state.objects, &principal, &asked.on(console.subresource())).await?;
    let vm = state
        .objects
        .get(vms, Some(&project), &name)
        .await?
        .to_value();
    // A VM deleted and made again under the same name is another VM.
    if ticket_uid.is_some_and(|uid| vm["metadata"]["uid"].as_str() != Some(uid.as_str())) {
        return Err(ticket_refused());
    }
    match (method, upgrade) {
        (Method::POST, _) => issue(&state, &principal, console, &vm).await,
        (Method::GET, Some(upgrade)) => {
            let Ok(permit) = sessions().clone().try_acquire_owned() else {
                return Err(ApiError::new(
                    503,
                    "ServiceUnavailable",
                    format!("this server relays {MAX_SESSIONS} consoles already; try again later"),
                ));
            };
            let agent = connect(&state, console, &vm, request_id.as_deref()).await?;
            tracing::info!(user = %principal.user, project, vm = name, console = console.subresource(), "console opened");
            Ok(upgrade
                .on_upgrade(move |socket| async move {
                    relay(socket, agent).await;
                    drop(permit);
                })
                .into_response())
        }
        _ => Err(ApiError::method_not_allowed(
            "a console is opened with GET (a WebSocket); POST gives a ticket for a browser",
            "GET, POST",
        )),
    }
}

/// `POST`: a single-use ticket for this console of this VM.
async fn issue(
    state: &AppState,
    principal: &Principal,
    console: Console,
    vm: &Value,
) -> Result<Response, ApiError> {
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let secret = hex::encode(secret);
    let expires = chrono::Utc::now() + TICKET_TTL;
    let record = Ticket {
        user: principal.user.clone(),
        groups: principal.groups.clone(),
        project: vm["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .into(),
        name: vm["metadata"]["name"].as_str().unwrap_or_default().into(),
        uid: vm["metadata"]["uid"].as_str().unwrap_or_default().into(),
        console,
        expires,
    };
    let store = state.objects.store();
    // The lease outlives the ticket a little: expiry is checked on use, the lease cleans up.
    let lease = store.lease_grant(TICKET_TTL * 2).await?;
    let value = serde_json::to_vec(&record).expect("a ticket serialises");
    store
        .txn(Txn::new().and_then(Op::put_with_lease(key(&secret), value, lease)))
        .await?;
    let path = format!(
        "/apis/{}/namespaces/{}/virtualmachines/{}/{}",
        flotilla_types::API_VERSION,
        record.project,
        record.name,
        console.subresource()
    );
    let body = json!({
        "ticket": secret,
        "expiresAt": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "path": format!("{path}?ticket={secret}"),
    });
    let mut response = (StatusCode::CREATED, axum::Json(body)).into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

fn key(secret: &str) -> String {
    format!(
        "{TICKETS}{}",
        hex::encode(Sha256::digest(secret.as_bytes()))
    )
}

/// Uses up a ticket: whom it was given to and the uid of the VM it was for, if it is for this
/// console and still valid.
async fn redeem(
    state: &AppState,
    secret: &str,
    console: Console,
    (project, name): (&str, &str),
) -> Result<(Principal, String), ApiError> {
    let refused = ticket_refused;
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refused());
    }
    // Deleting is the redemption: of two uses of one ticket, only one deletes it.
    let Some(kv) = state.objects.store().delete(&key(secret)).await? else {
        return Err(refused());
    };
    let ticket: Ticket = serde_json::from_slice(&kv.value).map_err(|_| refused())?;
    if ticket.console != console
        || ticket.project != project
        || ticket.name != name
        || ticket.expires < chrono::Utc::now()
    {
        return Err(refused());
    }
    let principal = Principal {
        user: ticket.user,
        groups: ticket.groups,
    };
    Ok((principal, ticket.uid))
}

fn ticket_refused() -> ApiError {
    ApiError::unauthorized(
        "the console ticket is unknown, used, expired or for another console: ask for a new one (POST to this path with a token)",
    )
}

type AgentSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// The agent's WebSocket for this console (errors as the API's: the VM has no node, is not
/// running, the agent cannot be reached).
async fn connect(
    state: &AppState,
    console: Console,
    vm: &Value,
    request_id: Option<&str>,
) -> Result<AgentSocket, ApiError> {
    let name = vm["metadata"]["name"].as_str().unwrap_or_default();
    let not_running = || {
        ApiError::new(
            409,
            "Conflict",
            format!("VirtualMachine {name:?} is not running, so it has no console; start it first"),
        )
    };
    let node = vm["status"]["nodeName"]
        .as_str()
        .or(vm["spec"]["nodeName"].as_str())
        .ok_or_else(not_running)?;
    let uid = vm["metadata"]["uid"].as_str().unwrap_or_default();
    let (endpoint, fingerprint) = crate::logs::agent_endpoint(state, node).await?;
    let unreachable = |e: String| {
        ApiError::new(
            502,
            "BadGateway",
            format!("cannot reach the agent of node {node:?} at {endpoint}: {e}"),
        )
    };
    let url = url::Url::parse(&endpoint).map_err(|e| unreachable(e.to_string()))?;
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let mut tls =
        crate::pinned::agent_tls(&fingerprint, &state.client_cert_pem, &state.client_key_pem)
            .map_err(|e| ApiError::internal(format!("cannot build the agent client: {e}")))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| unreachable(e.to_string()))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| unreachable("timed out".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let target = format!(
        "wss://{}/v1/vms/{uid}/{}",
        url.authority(),
        console.agent_path()
    );
    let mut request = target
        .into_client_request()
        .map_err(|e| unreachable(e.to_string()))?;
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        request
            .headers_mut()
            .insert(crate::audit::REQUEST_ID_HEADER, id);
    }
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(answer)) => match answer.status().as_u16() {
            404 => Err(not_running()),
            503 => Err(ApiError::new(
                503,
                "ServiceUnavailable",
                format!("the agent of node {node:?} serves too many consoles; try again later"),
            )),
            code => Err(unreachable(format!("it answered {code}"))),
        },
        Err(e) => Err(unreachable(e.to_string())),
    }
}

/// Copies messages between the browser (or CLI) and the agent until either side closes, the
/// browser goes silent for [`SILENCE`], or the server stops.
async fn relay(client: WebSocket, agent: AgentSocket) {
    let (mut to_client, mut from_client) = client.split();
    let (mut to_agent, mut from_agent) = agent.split();
    let last_heard = std::sync::Mutex::new(Instant::now());
    let down = async {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                message = from_agent.next() => {
                    let message = match message {
                        Some(Ok(tungstenite::Message::Binary(b))) => Message::Binary(b),
                        Some(Ok(tungstenite::Message::Text(t))) => Message::Text(t.as_str().into()),
                        Some(Ok(tungstenite::Message::Close(frame))) => {
                            let frame = frame.map(|f| CloseFrame { code: f.code.into(), reason: f.reason.as_str().into() });
                            let _ = to_client.send(Message::Close(frame)).await;
                            return;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => {
                            let _ = to_client.send(Message::Close(Some(CloseFrame { code: 1011, reason: "the node's agent closed the console".into() }))).await;
                            return;
                        }
                    };
                    if to_client.send(message).await.is_err() {
                        return;
                    }
                }
                _ = ping.tick() => {
                    let silent = last_heard.lock().expect("clock lock").elapsed();
                    if silent > SILENCE {
                        let _ = to_client.send(Message::Close(Some(CloseFrame { code: 1001, reason: "no answer to pings".into() }))).await;
                        return;
                    }
                    if to_client.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let up = async {
        while let Some(Ok(message)) = from_client.next().await {
            *last_heard.lock().expect("clock lock") = Instant::now();
            let message = match message {
                Message::Binary(b) => tungstenite::Message::Binary(b),
                Message::Text(t) => tungstenite::Message::Text(t.as_str().into()),
                Message::Close(_) => break,
                _ => continue,
            };
            if to_agent.send(message).await.is_err() {
                return;
            }
        }
        let _ = to_agent.send(tungstenite::Message::Close(None)).await;
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}
