//! The HTTP API: routes, request parsing and response encoding. Each handler turns a request into
//! one call on [`Objects`] (or the watch module) and its result into a response.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use flotilla_types::registry::{self, KindInfo};
use flotilla_types::selector::{FieldSelector, LabelSelector};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::auth::{Authenticator, Principal};
use crate::authz::{self, Verb};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::objects::{ListOptions, Objects, PatchBody, Stored, Subresource};
use crate::watch::{self, WatchRequest};

/// Largest request body accepted (Kubernetes' limit too).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub objects: Objects,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub bookmark_interval: Duration,
    pub openapi: Arc<Value>,
    /// PEM of the CA, served at /cacerts for agents that verify it against their join token.
    pub ca_pem: Arc<String>,
    /// The server's client certificate and key, presented to node agents.
    pub client_cert_pem: Arc<String>,
    pub client_key_pem: Arc<String>,
    /// This cluster's identity (see [`Objects::ensure_cluster_id`]).
    pub cluster_id: Arc<String>,
}

pub fn router(state: AppState) -> Router {
    let base = "/apis/flotilla.dev/v1alpha1";
    let api = Router::new()
        .route(
            "/version",
            get(|State(s): State<AppState>| async move { version(&s.cluster_id) }),
        )
        .route("/metrics", get(metrics))
        .route("/apis", get(api_groups))
        .route("/apis/flotilla.dev", get(api_group))
        .route(base, get(api_resources))
        .route("/openapi/v3", get(openapi))
        .route(
            "/flotilla/v1/join-tokens",
            axum::routing::post(crate::join::create_join_token),
        )
        .route("/flotilla/v1/join", axum::routing::post(crate::join::join))
        .route(&format!("{base}/{{plural}}"), any(resource))
        .route(&format!("{base}/{{plural}}/{{name}}"), any(resource))
        .route(
            &format!("{base}/{{plural}}/{{name}}/{{sub}}"),
            any(resource),
        )
        .route(
            &format!("{base}/namespaces/{{ns}}/{{plural}}"),
            any(resource),
        )
        .route(
            &format!("{base}/namespaces/{{ns}}/{{plural}}/{{name}}"),
            any(resource),
        )
        .route(
            &format!("{base}/namespaces/{{ns}}/{{plural}}/{{name}}/{{sub}}"),
            any(resource),
        )
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(
            state.auth.clone(),
            authenticate,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/cacerts",
            get(|State(s): State<AppState>| async move { s.ca_pem.as_ref().clone() }),
        )
        .merge(api)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::record,
        ))
        .with_state(state)
}

/// Unknown paths need a token too, so nothing can be probed anonymously.
async fn not_found(State(state): State<AppState>, req: Request) -> ApiError {
    if let Err(e) = check_token(&state.auth, credentials(&req)).await {
        return e;
    }
    ApiError::new(
        404,
        "NotFound",
        format!("no API at {}; discovery starts at /apis", req.uri().path()),
    )
}

/// The bearer token and the client address of a request.
fn credentials(req: &Request) -> (Option<String>, Option<std::net::IpAddr>) {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    (token, peer)
}

async fn check_token(
    auth: &Authenticator,
    (token, peer): (Option<String>, Option<std::net::IpAddr>),
) -> Result<crate::auth::Principal, ApiError> {
    auth.authenticate_from(peer, token.as_deref()).await
}

async fn authenticate(
    State(auth): State<Arc<Authenticator>>,
    mut req: Request,
    next: Next,
) -> Response {
    match check_token(&auth, credentials(&req)).await {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.objects.store().get("/flotilla/readyz").await {
        Ok(_) => "ok".into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {e}"),
        )
            .into_response(),
    }
}

fn version(cluster_id: &str) -> Response {
    axum::Json(
        json!({"version": env!("CARGO_PKG_VERSION"), "apiVersion": flotilla_types::API_VERSION,
                      "clusterID": cluster_id}),
    )
    .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.encode(),
    )
        .into_response()
}

async fn openapi(State(state): State<AppState>) -> Response {
    axum::Json(state.openapi.as_ref().clone()).into_response()
}

async fn api_groups() -> Response {
    let gv =
        json!({"groupVersion": flotilla_types::API_VERSION, "version": flotilla_types::VERSION});
    axum::Json(json!({
        "kind": "APIGroupList", "apiVersion": "v1",
        "groups": [{"name": flotilla_types::GROUP, "versions": [gv.clone()], "preferredVersion": gv}]
    }))
    .into_response()
}

async fn api_group() -> Response {
    let gv =
        json!({"groupVersion": flotilla_types::API_VERSION, "version": flotilla_types::VERSION});
    axum::Json(json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": flotilla_types::GROUP,
        "versions": [gv.clone()], "preferredVersion": gv
    }))
    .into_response()
}

async fn api_resources() -> Response {
    let mut resources = Vec::new();
    for k in registry::KINDS {
        resources.push(json!({
            "name": k.plural, "singularName": k.singular, "namespaced": k.namespaced, "kind": k.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": k.short_names,
        }));
        resources.push(json!({
            "name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced,
            "kind": k.kind, "verbs": ["get", "patch", "update"],
        }));
    }
    axum::Json(json!({
        "kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": flotilla_types::API_VERSION, "resources": resources
    }))
    .into_response()
}

fn json_response(code: StatusCode, body: Vec<u8>) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn object_response(code: StatusCode, stored: &Stored) -> Response {
    json_response(code, stored.to_bytes())
}

/// Query parameters of resource requests.
#[derive(Default)]
struct Query {
    watch: bool,
    resource_version: Option<i64>,
    label_selector: String,
    field_selector: String,
    limit: usize,
    continue_token: Option<String>,
    bookmarks: bool,
    timeout: Option<Duration>,
    /// `dryRun=All`: run the write in full, store nothing.
    dry_run: bool,
}

fn parse_query(raw: Option<&str>) -> Result<Query, ApiError> {
    let mut q = Query::default();
    let boolean = |name: &str, v: &str| match v {
        "true" | "1" => Ok(true),
        "false" | "0" | "" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "query parameter {name}={v:?} must be true or false"
        ))),
    };
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "watch" => q.watch = boolean("watch", &v)?,
            "allowWatchBookmarks" => q.bookmarks = boolean("allowWatchBookmarks", &v)?,
            "labelSelector" => q.label_selector = v.into_owned(),
            "fieldSelector" => q.field_selector = v.into_owned(),
            "continue" if !v.is_empty() => q.continue_token = Some(v.into_owned()),
            "resourceVersion" if !v.is_empty() => {
                q.resource_version = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(format!("query parameter resourceVersion={v:?} must be a resourceVersion this server returned"))
                })?)
            }
            "limit" => {
                q.limit = v
                    .parse()
                    .map_err(|_| ApiError::bad_request(format!("query parameter limit={v:?} must be a whole number")))?
            }
            "dryRun" => {
                q.dry_run = match v.as_ref() {
                    "All" => true,
                    "" => false,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "query parameter dryRun={other:?} is not supported: the only value is All"
                        )))
                    }
                }
            }
            "timeoutSeconds" => {
                let secs: u64 = v.parse().map_err(|_| {
                    ApiError::bad_request(format!("query parameter timeoutSeconds={v:?} must be a whole number"))
                })?;
                q.timeout = Some(Duration::from_secs(secs));
            }
            _ => {}
        }
    }
    Ok(q)
}

pub(crate) async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(format!(
            "the request body is larger than the {} MiB allowed",
            MAX_BODY >> 20
        ))
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > MAX_BODY {
            return Err(too_large());
        }
    }
    match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

pub(crate) fn parse_document(headers: &HeaderMap, bytes: &[u8]) -> Result<Value, ApiError> {
    let ct = content_type(headers);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    match ct.as_str() {
        "" | "application/json" => serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}"))),
        "application/yaml" | "application/x-yaml" | "text/yaml" => serde_yaml::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid YAML: {e}"))),
        other => Err(ApiError::unsupported_media_type(format!(
            "content type {other:?} is not accepted; send application/json or application/yaml"
        ))),
    }
}

fn parse_patch(headers: &HeaderMap, bytes: &[u8]) -> Result<PatchBody, ApiError> {
    let ct = content_type(headers);
    let json = || -> Result<Value, ApiError> {
        serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))
    };
    match ct.as_str() {
        "application/merge-patch+json" | "application/json" | "" => Ok(PatchBody::Merge(json()?)),
        "application/json-patch+json" => serde_json::from_value(json()?)
            .map(PatchBody::Json)
            .map_err(|e| ApiError::bad_request(format!("the JSON patch is malformed: {e}"))),
        other => Err(ApiError::unsupported_media_type(format!(
            "patch type {other:?} is not supported; use application/merge-patch+json or application/json-patch+json"
        ))),
    }
}

struct Target {
    kind: &'static KindInfo,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<Subresource>,
}

fn resolve(params: &HashMap<String, String>) -> Result<Target, ApiError> {
    let plural = params.get("plural").map(String::as_str).unwrap_or_default();
    let kind = registry::by_plural(plural).ok_or_else(|| {
        let hint = registry::lookup(plural)
            .map(|k| format!(" (did you mean {}?)", k.plural))
            .unwrap_or_default();
        ApiError::new(
            404,
            "NotFound",
            format!(
                "the server has no resource {plural:?} in {}{hint}; see /apis/{}",
                flotilla_types::API_VERSION,
                flotilla_types::API_VERSION
            ),
        )
    })?;
    let namespace = params.get("ns").cloned();
    let name = params.get("name").cloned();
    match (kind.namespaced, &namespace, &name) {
        (false, Some(_), _) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!(
                    "{} is cluster-scoped: use /apis/{}/{}",
                    kind.kind,
                    flotilla_types::API_VERSION,
                    kind.plural
                ),
            ))
        }
        (true, None, Some(_)) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!(
                    "{} belongs to a project: use /apis/{}/namespaces/<project>/{}/<name>",
                    kind.kind,
                    flotilla_types::API_VERSION,
                    kind.plural
                ),
            ))
        }
        _ => {}
    }
    let sub = match params.get("sub").map(String::as_str) {
        None => None,
        Some("status") => Some(Subresource::Status),
        Some(other) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("{} has no subresource {other:?}; only status", kind.kind),
            ))
        }
    };
    Ok(Target {
        kind,
        namespace,
        name,
        sub,
    })
}

async fn ensure_project(objects: &Objects, namespace: Option<&str>) -> Result<(), ApiError> {
    if let Some(ns) = namespace {
        let project = registry::by_kind("Project").expect("registered");
        objects.get(project, None, ns).await.map_err(|e| {
            if e.code() == 404 {
                ApiError::not_found("Project", ns)
            } else {
                e
            }
        })?;
    }
    Ok(())
}

async fn resource(
    State(state): State<AppState>,
    axum::Extension(principal): axum::Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if params.get("sub").map(String::as_str) == Some("log")
        && params.get("plural").map(String::as_str) == Some("virtualmachines")
    {
        let (ns, name) = (
            params.get("ns").cloned().unwrap_or_default(),
            params.get("name").cloned().unwrap_or_default(),
        );
        if method != Method::GET {
            return Err(ApiError::method_not_allowed("the log is read with GET"));
        }
        return crate::logs::proxy(&state, &principal, &ns, &name, query.as_deref()).await;
    }
    let target = resolve(&params)?;
    let q = parse_query(query.as_deref())?;
    let mut body = Some(body);
    let dry_run = q.dry_run.then(|| state.objects.dry_run());
    let objects = dry_run.as_ref().unwrap_or(&state.objects);
    let (kind, ns) = (target.kind, target.namespace.as_deref());
    let verb = match (&target.name, &method) {
        (None, &Method::GET) if q.watch => Verb::Watch,
        (None, &Method::GET) => Verb::List,
        (None, _) => Verb::Create,
        (Some(_), &Method::GET) => Verb::Get,
        (Some(_), &Method::PUT) => Verb::Update,
        (Some(_), &Method::PATCH) => Verb::Patch,
        (Some(_), _) => Verb::Delete,
    };
    // A create names its object in the body; everything else in the path.
    let mut create_body = None;
    let name_for_authz = match verb {
        Verb::Create if method == Method::POST => {
            let doc = parse_document(
                &headers,
                &read_body(&headers, body.take().unwrap_or_default()).await?,
            )?;
            let name = doc["metadata"]["name"].as_str().map(str::to_string);
            create_body = Some(doc);
            name
        }
        _ => target.name.clone(),
    };
    let scope = authz::authorize(
        &principal,
        verb,
        kind,
        name_for_authz.as_deref(),
        &q.field_selector,
    )?;
    let guard = |current: &Value, next: Option<&Value>| authz::guard(&scope, current, next);
    match (&target.name, method.clone()) {
        (None, Method::GET) => {
            ensure_project(objects, ns).await?;
            let options = ListOptions {
                labels: LabelSelector::parse(&q.label_selector)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?,
                fields: FieldSelector::parse(&q.field_selector, kind.field_selectors)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?,
                limit: q.limit,
                continue_token: q.continue_token,
            };
            if q.watch {
                let stream = watch::start(
                    objects,
                    WatchRequest {
                        kind,
                        namespace: target.namespace.clone(),
                        options,
                        resource_version: q.resource_version,
                        bookmarks: q.bookmarks.then_some(state.bookmark_interval),
                        timeout: q.timeout,
                    },
                )
                .await?;
                return Ok(Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::CACHE_CONTROL, "no-cache")
                    .body(Body::from_stream(stream))
                    .expect("valid response"));
            }
            let list = objects.list(kind, ns, &options).await?;
            let mut out = Vec::with_capacity(list.items.iter().map(Vec::len).sum::<usize>() + 256);
            out.extend_from_slice(
                format!(
                    "{{\"apiVersion\":\"{}\",\"kind\":\"{}List\",\"metadata\":{{\"resourceVersion\":\"{}\"",
                    flotilla_types::API_VERSION,
                    kind.kind,
                    list.revision
                )
                .as_bytes(),
            );
            if let Some(token) = &list.continue_token {
                out.extend_from_slice(format!(",\"continue\":\"{token}\"").as_bytes());
            }
            out.extend_from_slice(b"},\"items\":[");
            for (i, item) in list.items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(item);
            }
            out.extend_from_slice(b"]}");
            Ok(json_response(StatusCode::OK, out))
        }
        (None, Method::POST) => {
            let doc = create_body.expect("parsed for authorization");
            authz::guard_create(&scope, &doc)?;
            let stored = objects.create(kind, ns, doc).await?;
            Ok(object_response(StatusCode::CREATED, &stored))
        }
        (None, m) => Err(ApiError::method_not_allowed(format!(
            "{m} is not allowed on a collection; use GET or POST"
        ))),
        (Some(name), Method::GET) => match objects.get_guarded(kind, ns, name, &guard).await {
            Ok(stored) => Ok(object_response(StatusCode::OK, &stored)),
            Err(e) if e.code() == 404 => {
                ensure_project(objects, ns).await?;
                Err(e)
            }
            Err(e) => Err(e),
        },
        (Some(name), Method::PUT) => {
            let doc = parse_document(
                &headers,
                &read_body(&headers, body.take().unwrap_or_default()).await?,
            )?;
            let stored = objects
                .update_guarded(
                    kind,
                    ns,
                    name,
                    doc,
                    target.sub.unwrap_or(Subresource::Main),
                    &guard,
                )
                .await?;
            Ok(object_response(StatusCode::OK, &stored))
        }
        (Some(name), Method::PATCH) => {
            let patch = parse_patch(
                &headers,
                &read_body(&headers, body.take().unwrap_or_default()).await?,
            )?;
            let stored = objects
                .patch_guarded(
                    kind,
                    ns,
                    name,
                    patch,
                    target.sub.unwrap_or(Subresource::Main),
                    &guard,
                )
                .await?;
            Ok(object_response(StatusCode::OK, &stored))
        }
        (Some(name), Method::DELETE) if target.sub.is_none() => {
            let (stored, gone) = objects.delete(kind, ns, name).await?;
            Ok(object_response(
                if gone {
                    StatusCode::OK
                } else {
                    StatusCode::ACCEPTED
                },
                &stored,
            ))
        }
        (Some(_), m) => Err(ApiError::method_not_allowed(format!(
            "{m} is not allowed here"
        ))),
    }
}
