//! The HTTP API: routes, authentication, discovery, health and metrics. Resource requests are
//! read in [`crate::request`] and handled in [`crate::resource`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use flotilla_types::registry;
use serde_json::json;

use crate::auth::Authenticator;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::objects::{Objects, Stored};

/// Largest request body accepted (Kubernetes' limit too).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub objects: Objects,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub bookmark_interval: Duration,
    pub openapi: Arc<crate::openapi::Documents>,
    /// PEM of the CA, served at /cacerts for agents that verify it against their join token.
    pub ca_pem: Arc<String>,
    /// The server's client certificate and key, presented to node agents.
    pub client_cert_pem: Arc<String>,
    pub client_key_pem: Arc<String>,
    /// This cluster's identity (see [`Objects::ensure_cluster_id`]).
    pub cluster_id: Arc<String>,
    /// Where uploaded images are kept.
    pub uploads: Arc<std::path::PathBuf>,
    /// The OIDC issuer and client ID people sign in with (for `flotilla login` and the UI).
    pub login: Arc<Option<(String, String)>>,
    pub audit: crate::audit::AuditLog,
    /// Where the web UI's files come from.
    pub ui: crate::ui::UiSource,
}

pub fn router(state: AppState) -> Router {
    let base = "/apis/flotilla.dev/v1alpha1";
    let api = Router::new()
        .route(
            "/version",
            get(|State(s): State<AppState>| async move { version(&s.cluster_id) }),
        )
        .route("/metrics", get(metrics))
        .route("/api", get(core_versions))
        .route("/api/v1", get(|| api_resources("v1")))
        .route("/apis", get(api_groups))
        .route(base, get(|| api_resources(flotilla_types::API_VERSION)))
        .route(
            "/apis/{group}",
            get(|Path(group): Path<String>| async move { api_group(&group) }),
        )
        .route(RBAC_ROOT, get(|| api_resources(RBAC_API_VERSION)))
        .route(
            "/apis/authorization.k8s.io/v1",
            get(crate::access_review::api_resources),
        )
        .route(
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            axum::routing::post(crate::access_review::review),
        )
        .route(
            "/openapi/v3",
            get(|State(s): State<AppState>, h: HeaderMap| async move {
                serve_document(&s.openapi.index, &h)
            }),
        )
        .route(
            "/openapi/v3/{*path}",
            get(
                |State(s): State<AppState>, Path(path): Path<String>, h: HeaderMap| async move {
                    match s.openapi.groups.get(path.trim_start_matches('/')) {
                        Some(doc) => serve_document(doc, &h),
                        None => ApiError::new(
                            404,
                            "NotFound",
                            format!(
                                "no OpenAPI document for {path:?}; the index is at /openapi/v3"
                            ),
                        )
                        .into_response(),
                    }
                },
            ),
        )
        .route(
            "/openapi/v2",
            get(|State(s): State<AppState>, h: HeaderMap| async move {
                serve_document(&s.openapi.v2, &h)
            }),
        )
        .route(
            "/flotilla/v1/join-tokens",
            axum::routing::post(crate::join::create_join_token),
        )
        .route("/flotilla/v1/join", axum::routing::post(crate::join::join));
    let api = with_resources(api, base, crate::resource::resource);
    let api = with_resources(api, RBAC_ROOT, crate::resource::resource);
    let api = with_resources(api, "/api/v1", crate::resource::resource)
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(
            state.auth.clone(),
            authenticate,
        ))
        // Outside authentication, so that refusals are recorded too.
        .layer(middleware::from_fn_with_state(
            state.audit.clone(),
            crate::audit::record,
        ));
    // Consoles authenticate themselves: a browser's WebSocket carries a ticket, not a token.
    let vm = format!("{base}/namespaces/{{ns}}/virtualmachines/{{name}}");
    let consoles = Router::new()
        .route(&format!("{vm}/console"), any(crate::console::serial))
        .route(&format!("{vm}/vnc"), any(crate::console::vnc))
        .layer(middleware::from_fn_with_state(
            state.audit.clone(),
            crate::audit::record,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/flotilla/v1/login", get(login_config))
        .route("/", get(root))
        .route(
            "/ui",
            get(|| async { axum::response::Redirect::permanent("/ui/") }),
        )
        .route("/ui/", get(crate::ui::serve))
        .route("/ui/{*path}", get(crate::ui::serve))
        .route(
            "/cacerts",
            get(|State(s): State<AppState>| async move { s.ca_pem.as_ref().clone() }),
        )
        .merge(consoles)
        .merge(api)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::record,
        ))
        .with_state(state)
}

/// The resource paths under `root`, cluster-scoped and per project, each served by `handler`.
fn with_resources<H, T>(router: Router<AppState>, root: &str, handler: H) -> Router<AppState>
where
    H: axum::handler::Handler<T, AppState> + Clone + Send + Sync + 'static,
    T: 'static,
{
    let router = [
        "{plural}",
        "{plural}/{name}",
        "{plural}/{name}/{sub}",
        "namespaces/{ns}/{plural}",
        "namespaces/{ns}/{plural}/{name}",
        "namespaces/{ns}/{plural}/{name}/{sub}",
    ]
    .into_iter()
    .fold(router, |r, tail| {
        r.route(&format!("{root}/{tail}"), any(handler.clone()))
    });
    // Kubernetes' watch paths: `<root>/watch/<collection>` is the collection with watch=true.
    let watch = move |State(state): State<AppState>, mut req: Request| {
        let handler = handler.clone();
        async move {
            let query = match req.uri().query() {
                Some(q) if !q.is_empty() => format!("{q}&watch=true"),
                _ => "watch=true".to_string(),
            };
            let uri = format!("{}?{query}", req.uri().path());
            match uri.parse() {
                Ok(uri) => *req.uri_mut() = uri,
                Err(_) => return ApiError::bad_request("malformed request path").into_response(),
            }
            handler.call(req, state).await
        }
    };
    ["watch/{plural}", "watch/namespaces/{ns}/{plural}"]
        .into_iter()
        .fold(router, |r, tail| {
            r.route(&format!("{root}/{tail}"), get(watch.clone()))
        })
}

/// `/`: browsers go to the web UI; anything else is answered as an unknown path.
async fn root(state: State<AppState>, req: Request) -> Response {
    if crate::ui::wants_html(&req) {
        return axum::response::Redirect::to("/ui/").into_response();
    }
    not_found(state, req).await.into_response()
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
pub(crate) fn credentials(req: &Request) -> (Option<String>, Option<std::net::IpAddr>) {
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
            if let Some(caller) = req.extensions().get::<crate::audit::Caller>() {
                caller.set(&principal);
            }
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// Where people sign in: public, like the issuer's own discovery document, so that `flotilla
/// login` and the web UI need nothing but the server's URL.
async fn login_config(State(state): State<AppState>) -> Response {
    match state.login.as_ref() {
        Some((issuer, client_id)) => {
            axum::Json(json!({"issuer": issuer, "clientID": client_id})).into_response()
        }
        None => ApiError::new(
            404,
            "NotFound",
            "this server has no OIDC issuer: sign in with a token (flotilla server --oidc-issuer enables people's logins)",
        )
        .into_response(),
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

/// The Kubernetes API version whose conventions this server follows; `kubectl version` and
/// client libraries read `major`, `minor` and `gitVersion`.
const KUBERNETES_MAJOR: &str = "1";
const KUBERNETES_MINOR: &str = "31";

/// `/version` in Kubernetes' form, with Flotilla's own version and the cluster's ID beside it.
fn version(cluster_id: &str) -> Response {
    let flotilla = env!("CARGO_PKG_VERSION");
    axum::Json(json!({
        "major": KUBERNETES_MAJOR, "minor": KUBERNETES_MINOR,
        "gitVersion": format!("v{KUBERNETES_MAJOR}.{KUBERNETES_MINOR}.0+flotilla-{flotilla}"),
        "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "",
        "compiler": "rustc", "platform": format!("{}/{}", std::env::consts::OS, if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH }),
        "flotillaVersion": flotilla, "apiVersion": flotilla_types::API_VERSION, "clusterID": cluster_id,
    }))
    .into_response()
}

/// Metrics count every project's objects: for admins and for callers granted `get` on
/// `metrics` cluster-wide (a ClusterRoleBinding, e.g. to `cluster-admin`, for a scraper's
/// service account).
async fn metrics(
    State(state): State<AppState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
) -> Response {
    if !principal.is_admin() {
        let asked = crate::rbac::Attributes {
            verb: "get",
            group: "",
            resource: "metrics".into(),
            project: None,
            name: None,
            namespaced: false,
        };
        let allowed =
            match crate::rbac::grants(state.objects.store().as_ref(), &principal, None).await {
                Ok(g) => g.allows(&asked),
                Err(e) => return e.into_response(),
            };
        if !allowed {
            return ApiError::forbidden(format!("{} may not get metrics", principal.user))
                .into_response();
        }
    }
    state.metrics.refresh(&state.objects).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.encode(),
    )
        .into_response()
}

/// An OpenAPI document with its ETag; `If-None-Match` with the same tag is answered 304.
fn serve_document(doc: &crate::openapi::Served, headers: &HeaderMap) -> Response {
    let etag = format!("\"{}\"", doc.hash);
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if cached {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        json_response(StatusCode::OK, doc.bytes.clone())
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, etag.parse().expect("a valid header"));
    h.insert(
        header::CACHE_CONTROL,
        "no-cache, private".parse().expect("a valid header"),
    );
    response
}

const RBAC_ROOT: &str = "/apis/rbac.authorization.k8s.io/v1";
const RBAC_API_VERSION: &str = flotilla_types::kinds::rbac::RBAC_API_VERSION;

/// The API groups served under `/apis`, each with its one version.
const GROUPS: &[(&str, &str)] = &[
    (flotilla_types::GROUP, flotilla_types::VERSION),
    (flotilla_types::kinds::rbac::RBAC_GROUP, "v1"),
    ("authorization.k8s.io", "v1"),
];

fn group_json(name: &str, version: &str) -> serde_json::Value {
    let gv = json!({"groupVersion": format!("{name}/{version}"), "version": version});
    json!({"name": name, "versions": [gv.clone()], "preferredVersion": gv})
}

async fn api_groups() -> Response {
    let groups: Vec<_> = GROUPS.iter().map(|(n, v)| group_json(n, v)).collect();
    axum::Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        .into_response()
}

fn api_group(name: &str) -> Response {
    match GROUPS.iter().find(|(n, _)| *n == name) {
        Some((n, v)) => {
            let mut g = group_json(n, v);
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            axum::Json(g).into_response()
        }
        None => ApiError::new(
            404,
            "NotFound",
            format!("no API group {name:?}; the groups are listed at /apis"),
        )
        .into_response(),
    }
}

/// Kubernetes' core group: only `v1`, where Flotilla serves Event.
async fn core_versions() -> Response {
    axum::Json(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}))
        .into_response()
}

async fn api_resources(group_version: &'static str) -> Response {
    let mut resources = Vec::new();
    for k in registry::KINDS
        .iter()
        .filter(|k| k.api_version == group_version)
    {
        resources.push(json!({
            "name": k.plural, "singularName": k.singular, "namespaced": k.namespaced, "kind": k.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": k.short_names,
        }));
        if k.kind == "ServiceAccount" {
            resources.push(json!({
                "name": "serviceaccounts/token", "singularName": "", "namespaced": true,
                "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"],
            }));
        }
        if k.has_status {
            resources.push(json!({
                "name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced,
                "kind": k.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    axum::Json(json!({
        "kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": group_version, "resources": resources
    }))
    .into_response()
}

pub(crate) fn json_response(code: StatusCode, body: Vec<u8>) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(crate) fn object_response(code: StatusCode, stored: &Stored) -> Response {
    json_response(code, stored.to_bytes())
}
