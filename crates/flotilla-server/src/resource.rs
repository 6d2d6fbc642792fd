//! The resource handler: one request on a kind (list, watch, get, create, replace, patch,
//! delete, deletecollection) becomes one call on [`Objects`] (or the watch module) after
//! authorization, answered as Kubernetes answers.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use flotilla_store::Revision;
use flotilla_types::registry::KindInfo;
use flotilla_types::selector::{FieldSelector, LabelSelector};
use flotilla_types::table::{kubernetes_table, IncludeObject};
use futures::StreamExt;
use serde_json::Value;

use crate::auth::Principal;
use crate::authz::{self, Verb};
use crate::error::ApiError;
use crate::http::{json_response, object_response, AppState};
use crate::objects::{ListOptions, ListResult, Objects, PatchBody, Subresource};
use crate::request::{
    delete_options, field_manager, parse_document, parse_patch, parse_query, read_body, resolve,
    wants_table, Query, Target,
};
use crate::watch::{self, WatchRequest};

/// How long a request naming a resourceVersion the store has not reached yet waits for it
/// before the answer is 504 (Kubernetes waits 3 s too).
const FUTURE_REVISION_WAIT: Duration = Duration::from_secs(3);

const COLLECTION_METHODS: &str = "GET, POST, DELETE";
const OBJECT_METHODS: &str = "GET, PUT, PATCH, DELETE";
const STATUS_METHODS: &str = "GET, PUT, PATCH";

/// The caller (set by authentication) and the request's id (set by the audit layer).
pub(crate) struct Who(Principal, Option<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        let principal = parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("authentication required"))?;
        let id = parts
            .extensions
            .get::<crate::audit::RequestId>()
            .map(|r| r.0.clone());
        Ok(Who(principal, id))
    }
}

/// Every resource path: Flotilla's group (`/apis/flotilla.dev/v1alpha1`), Kubernetes' RBAC
/// group (`/apis/rbac.authorization.k8s.io/v1`) and the core kinds Flotilla serves (`/api/v1`).
/// The group and version are those of the path.
pub(crate) async fn resource(
    State(state): State<AppState>,
    who: Who,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let api_version = api_version_of(parts.uri.path());
    let request = (parts.method, parts.headers, body);
    handle(&api_version, state, (who.0, who.1), params, query, request).await
}

/// `flotilla.dev/v1alpha1` of `/apis/flotilla.dev/v1alpha1/...`, `v1` of `/api/v1/...`.
fn api_version_of(path: &str) -> String {
    let mut parts = path.trim_start_matches('/').split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("api"), Some(version), _) => version.to_string(),
        (Some("apis"), Some(group), Some(version)) => format!("{group}/{version}"),
        _ => String::new(),
    }
}

async fn handle(
    api_version: &str,
    state: AppState,
    (principal, request_id): (Principal, Option<String>),
    params: HashMap<String, String>,
    query: Option<String>,
    (method, headers, body): (Method, HeaderMap, Body),
) -> Result<Response, ApiError> {
    if params.get("sub").map(String::as_str) == Some("log")
        && params.get("plural").map(String::as_str) == Some("virtualmachines")
    {
        let (ns, name) = (
            params.get("ns").cloned().unwrap_or_default(),
            params.get("name").cloned().unwrap_or_default(),
        );
        if method != Method::GET {
            return Err(ApiError::method_not_allowed(
                "the log is read with GET",
                "GET",
            ));
        }
        return crate::logs::proxy(
            &state,
            &principal,
            &ns,
            &name,
            (query.as_deref(), request_id.as_deref()),
        )
        .await;
    }
    if params.get("sub").map(String::as_str) == Some("data")
        && params.get("plural").map(String::as_str) == Some("volumes")
    {
        let (ns, name) = (
            params.get("ns").cloned().unwrap_or_default(),
            params.get("name").cloned().unwrap_or_default(),
        );
        if method != Method::GET {
            return Err(ApiError::method_not_allowed(
                "a volume's content is read with GET",
                "GET",
            ));
        }
        return crate::logs::export_volume(
            &state,
            &principal,
            &ns,
            &name,
            (query.as_deref(), request_id.as_deref()),
        )
        .await;
    }
    if params.get("sub").map(String::as_str) == Some("data")
        && params.get("plural").map(String::as_str) == Some("images")
    {
        let (ns, name) = (
            params.get("ns").cloned().unwrap_or_default(),
            params.get("name").cloned().unwrap_or_default(),
        );
        let (objects, dir) = (&state.objects, state.uploads.as_path());
        return match method {
            Method::PUT => {
                let length = headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                let sent = (length, body);
                crate::uploads::receive(objects, dir, &principal, (&ns, &name), sent).await
            }
            Method::GET => crate::uploads::send(objects, dir, &principal, (&ns, &name)).await,
            _ => Err(ApiError::method_not_allowed(
                "an image's file is sent with PUT and read with GET",
                "GET, PUT",
            )),
        };
    }
    if params.get("sub").map(String::as_str) == Some("token")
        && params.get("plural").map(String::as_str) == Some("serviceaccounts")
        && api_version == "v1"
    {
        let ns = params.get("ns").cloned().unwrap_or_default();
        let name = params.get("name").cloned().unwrap_or_default();
        let objects = &state.objects;
        return match method {
            Method::POST => {
                let body = read_body(&headers, body).await?;
                crate::service_accounts::issue(objects, &principal, (&ns, &name), &body).await
            }
            Method::DELETE => {
                crate::service_accounts::revoke(objects, &principal, (&ns, &name), query.as_deref())
                    .await
            }
            _ => Err(ApiError::method_not_allowed(
                "a token is made with POST and revoked with DELETE ?id=<id>",
                "POST, DELETE",
            )),
        };
    }
    if params.get("sub").map(String::as_str) == Some("addresses")
        && params.get("plural").map(String::as_str) == Some("networks")
    {
        let (ns, name) = (
            params.get("ns").cloned().unwrap_or_default(),
            params.get("name").cloned().unwrap_or_default(),
        );
        if method != Method::GET {
            return Err(ApiError::method_not_allowed(
                "a network's addresses are read with GET",
                "GET",
            ));
        }
        let kind = flotilla_types::registry::by_kind("Network").expect("registered");
        let asked = authz::Request::new(Verb::Get, kind, Some(&ns), Some(&name)).on("addresses");
        authz::authorize(&state.objects, &principal, &asked).await?;
        let list = crate::ipam::network_addresses(&state.objects, &ns, &name).await?;
        return Ok(json_response(
            StatusCode::OK,
            serde_json::to_vec(&list).expect("serialises"),
        ));
    }
    let target = resolve(api_version, &params)?;
    let q = parse_query(query.as_deref())?;
    let verb = verb_of(&target, &method, &q)?;
    // A create names its object in the body; everything else in the path.
    let body = match verb {
        Verb::Watch | Verb::List | Verb::Get => Default::default(),
        _ => read_body(&headers, body).await?,
    };
    let create_body = match verb {
        Verb::Create => Some(parse_document(&headers, &body)?),
        _ => None,
    };
    let name_for_authz = match &create_body {
        Some(doc) => doc["metadata"]["name"].as_str().map(str::to_string),
        None => target.name.clone(),
    };
    let asked = authz::Request {
        verb,
        kind: target.kind,
        sub: target.sub.and_then(|s| match s {
            Subresource::Main => None,
            Subresource::Status => Some("status"),
        }),
        project: target.namespace.as_deref(),
        name: name_for_authz.as_deref(),
        field_selector: &q.field_selector,
    };
    let scope = authz::authorize(&state.objects, &principal, &asked).await?;
    if let Some(doc) = &create_body {
        crate::rbac::check_escalation(
            state.objects.store(),
            &principal,
            &with_project(doc, &target),
        )
        .await?;
    }
    let update_check = match (verb, &target.name) {
        (Verb::Update | Verb::Patch, Some(name)) => {
            let ns = target.namespace.as_deref();
            crate::rbac::UpdateCheck::prepare(&state.objects, &principal, target.kind, ns, name)
                .await?
        }
        _ => None,
    };
    let dry_run = match verb {
        Verb::Delete | Verb::DeleteCollection => delete_options(&q, &headers, &body)?.1,
        _ => q.dry_run,
    };
    let dry = dry_run.then(|| state.objects.dry_run());
    let objects = dry
        .as_ref()
        .unwrap_or(&state.objects)
        .with_field_validation(q.field_validation)
        .as_manager(field_manager(&q, &headers), q.force)
        // What people and automation change is traced to the agents; agents' own writes are
        // the tracing's far end.
        .with_request_id(request_id.filter(|_| principal.node_name().is_none()));
    let objects = &objects;
    let table = wants_table(&headers).then(|| q.include_object.unwrap_or(IncludeObject::Metadata));
    let bookmarks = q.bookmarks.then_some(state.bookmark_interval);
    let response = serve(
        verb,
        &target,
        &q,
        objects,
        &headers,
        &body,
        create_body,
        (&scope, update_check.as_ref()),
        (table, bookmarks),
    )
    .await?;
    let writes = !matches!(verb, Verb::Get | Verb::List | Verb::Watch);
    if writes && crate::rbac::is_rbac_kind(Some(target.kind.kind)) {
        // Grants read before this write are stale now.
        state.objects.grants_cache().forget();
    }
    Ok(with_warnings(response, objects.warnings()))
}

/// Warnings (dropped unknown fields) as Kubernetes sends them: `Warning: 299 - "..."`.
fn with_warnings(mut response: Response, warnings: Vec<String>) -> Response {
    for w in warnings {
        let value = format!("299 - {}", serde_json::Value::String(w));
        if let Ok(v) = value.parse() {
            response.headers_mut().append(header::WARNING, v);
        }
    }
    response
}

/// Carries out one authorized request.
#[allow(clippy::too_many_arguments)]
async fn serve(
    verb: Verb,
    target: &Target,
    q: &Query,
    objects: &Objects,
    headers: &HeaderMap,
    body: &[u8],
    create_body: Option<Value>,
    (scope, update_check): (&authz::Scope, Option<&crate::rbac::UpdateCheck>),
    (table, bookmarks): (Option<IncludeObject>, Option<Duration>),
) -> Result<Response, ApiError> {
    let guard = |current: &Value, next: Option<&Value>| {
        authz::guard(scope, current, next)?;
        match (update_check, next) {
            (Some(check), Some(next)) => check.check(current, next),
            _ => Ok(()),
        }
    };
    let (kind, ns) = (target.kind, target.namespace.as_deref());
    let sub = target.sub.unwrap_or(Subresource::Main);
    let delete = match verb {
        Verb::Delete | Verb::DeleteCollection => delete_options(q, headers, body)?.0,
        _ => Default::default(),
    };
    match verb {
        Verb::Watch if matches!(scope, authz::Scope::BoundProjects(_)) => Err(ApiError::forbidden(
            "watching projects needs a role that lists every project; list them instead",
        )),
        Verb::Watch => {
            let rv = q.resource_version.filter(|rv| *rv > 0);
            if let Some(rv) = rv {
                wait_for_revision(objects, rv).await?;
            }
            let stream = watch::start(
                objects,
                WatchRequest {
                    kind,
                    namespace: target.namespace.clone(),
                    options: list_options(kind, q)?,
                    resource_version: q.resource_version,
                    bookmarks,
                    timeout: q.timeout,
                },
            )
            .await?;
            let body = match table {
                None => Body::from_stream(stream),
                Some(include) => Body::from_stream(
                    stream.map(move |line| line.map(|l| watch_line_as_table(kind, &l, include))),
                ),
            };
            Ok(Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(body)
                .expect("valid response"))
        }
        Verb::List => {
            if let Some(rv) = q.resource_version.filter(|rv| *rv > 0) {
                wait_for_revision(objects, rv).await?;
            }
            // A project that does not exist simply has nothing in it, as in Kubernetes.
            let mut list = objects.list(kind, ns, &list_options(kind, q)?).await?;
            if let authz::Scope::BoundProjects(_) = scope {
                list.items.retain(|raw| {
                    serde_json::from_slice::<Value>(raw).is_ok_and(|v| guard(&v, None).is_ok())
                });
            }
            match table {
                Some(include) => {
                    let items: Vec<Value> = list
                        .items
                        .iter()
                        .filter_map(|raw| serde_json::from_slice(raw).ok())
                        .collect();
                    let mut t = kubernetes_table(kind, &items, &list.revision.to_string(), include);
                    if let Some(token) = &list.continue_token {
                        t["metadata"]["continue"] = Value::String(token.clone());
                    }
                    Ok(json_response(
                        StatusCode::OK,
                        serde_json::to_vec(&t).expect("serialises"),
                    ))
                }
                None => Ok(list_response(kind, &list)),
            }
        }
        Verb::Create => {
            let doc = create_body.expect("parsed above");
            authz::guard_create(scope, &doc)?;
            let stored = objects.create(kind, ns, doc).await?;
            Ok(object_response(StatusCode::CREATED, &stored))
        }
        Verb::Get => {
            let name = target.name.as_deref().expect("a named target");
            match objects.get_guarded(kind, ns, name, &guard).await {
                Ok(stored) => match table {
                    Some(include) => {
                        let t = kubernetes_table(
                            kind,
                            &[stored.to_value()],
                            &stored.revision.to_string(),
                            include,
                        );
                        Ok(json_response(
                            StatusCode::OK,
                            serde_json::to_vec(&t).expect("serialises"),
                        ))
                    }
                    None => Ok(object_response(StatusCode::OK, &stored)),
                },
                Err(e) if e.code() == 404 => {
                    ensure_project(objects, ns).await?;
                    Err(e)
                }
                Err(e) => Err(e),
            }
        }
        Verb::Update => {
            let name = target.name.as_deref().expect("a named target");
            let doc = parse_document(headers, body)?;
            let stored = objects
                .update_guarded(kind, ns, name, doc, sub, &guard)
                .await?;
            Ok(object_response(StatusCode::OK, &stored))
        }
        Verb::Patch => {
            let name = target.name.as_deref().expect("a named target");
            let patch = parse_patch(headers, body)?;
            let applying = matches!(patch, PatchBody::Apply(_));
            if applying && q.field_manager.is_none() {
                return Err(ApiError::bad_request(
                    "fieldManager is required for apply requests (server-side apply)",
                ));
            }
            if q.force && !applying {
                return Err(ApiError::bad_request(
                    "force is only allowed for apply requests",
                ));
            }
            // An apply that made the object answers 201, as a create does.
            let existed = !applying || objects.get(kind, ns, name).await.is_ok();
            let stored = objects
                .patch_guarded(kind, ns, name, patch, sub, &guard)
                .await?;
            let code = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok(object_response(code, &stored))
        }
        Verb::Delete => {
            let name = target.name.as_deref().expect("a named target");
            let (stored, gone) = objects.delete_with(kind, ns, name, &delete).await?;
            Ok(object_response(
                if gone {
                    StatusCode::OK
                } else {
                    StatusCode::ACCEPTED
                },
                &stored,
            ))
        }
        Verb::DeleteCollection => {
            let list = objects.list(kind, ns, &list_options(kind, q)?).await?;
            let mut after = Vec::with_capacity(list.items.len());
            for raw in &list.items {
                let v: Value = serde_json::from_slice(raw)
                    .map_err(|e| ApiError::internal(format!("a stored object is corrupt: {e}")))?;
                let name = v["metadata"]["name"].as_str().unwrap_or_default();
                let item_ns = v["metadata"]["namespace"].as_str();
                match objects.delete_with(kind, item_ns, name, &delete).await {
                    Ok((stored, _)) => after.push(stored.to_bytes()),
                    // Deleted by someone else meanwhile: what was asked for is done.
                    Err(e) if e.code() == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            let revision = objects.store().current_revision().await?;
            Ok(list_response(
                kind,
                &ListResult {
                    items: after,
                    revision,
                    continue_token: None,
                },
            ))
        }
    }
}

/// A watch line whose object becomes a one-row Table (`kubectl get -w`); bookmarks and errors
/// pass as they are.
fn watch_line_as_table(
    kind: &'static KindInfo,
    line: &[u8],
    include: IncludeObject,
) -> bytes::Bytes {
    let Ok(mut event) = serde_json::from_slice::<Value>(line) else {
        return bytes::Bytes::copy_from_slice(line);
    };
    if matches!(
        event["type"].as_str(),
        Some("ADDED" | "MODIFIED" | "DELETED")
    ) {
        let object = event["object"].take();
        let rv = object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        event["object"] = kubernetes_table(kind, &[object], &rv, include);
    }
    let mut out = serde_json::to_vec(&event).expect("serialises");
    out.push(b'\n');
    bytes::Bytes::from(out)
}

/// What a request asks, or 405 (with `Allow`) when the method makes no sense on its target.
fn verb_of(target: &Target, method: &Method, q: &Query) -> Result<Verb, ApiError> {
    let not_allowed = |allow: &'static str| {
        Err(ApiError::method_not_allowed(
            format!("{method} is not allowed here; use {allow}"),
            allow,
        ))
    };
    match (&target.name, target.sub, method) {
        (None, _, &Method::GET) if q.watch => Ok(Verb::Watch),
        (None, _, &Method::GET) => Ok(Verb::List),
        (None, _, &Method::POST) => Ok(Verb::Create),
        (None, _, &Method::DELETE) => Ok(Verb::DeleteCollection),
        (None, _, _) => not_allowed(COLLECTION_METHODS),
        (Some(_), _, &Method::GET) => Ok(Verb::Get),
        (Some(_), _, &Method::PUT) => Ok(Verb::Update),
        (Some(_), _, &Method::PATCH) => Ok(Verb::Patch),
        (Some(_), None, &Method::DELETE) => Ok(Verb::Delete),
        (Some(_), None, _) => not_allowed(OBJECT_METHODS),
        (Some(_), Some(_), _) => not_allowed(STATUS_METHODS),
    }
}

fn list_options(kind: &KindInfo, q: &Query) -> Result<ListOptions, ApiError> {
    Ok(ListOptions {
        labels: LabelSelector::parse(&q.label_selector)
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        fields: FieldSelector::parse(&q.field_selector, kind.field_selectors)
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        limit: q.limit,
        continue_token: q.continue_token.clone(),
    })
}

/// A list answer built from the stored bytes, without parsing the objects again.
fn list_response(kind: &KindInfo, list: &ListResult) -> Response {
    let mut out = Vec::with_capacity(list.items.iter().map(Vec::len).sum::<usize>() + 256);
    out.extend_from_slice(
        format!(
            "{{\"apiVersion\":\"{}\",\"kind\":\"{}List\",\"metadata\":{{\"resourceVersion\":\"{}\"",
            kind.api_version, kind.kind, list.revision
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
    json_response(StatusCode::OK, out)
}

/// Waits (briefly) until the store has reached `revision`; Kubernetes answers a resourceVersion
/// from the future with 504 "Too large resource version" after the same wait, and clients
/// retry.
async fn wait_for_revision(objects: &Objects, revision: Revision) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + FUTURE_REVISION_WAIT;
    loop {
        let current = objects.store().current_revision().await?;
        if current >= revision {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::resource_version_too_large(revision, current));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ensure_project(objects: &Objects, namespace: Option<&str>) -> Result<(), ApiError> {
    if let Some(ns) = namespace {
        let project = flotilla_types::registry::by_kind("Project").expect("registered");
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

/// A document to be created, with the kind and project of its path (what RBAC checks judge it
/// by; the body may leave both out).
fn with_project(doc: &Value, target: &Target) -> Value {
    let mut doc = doc.clone();
    if let Some(obj) = doc.as_object_mut() {
        obj.insert("kind".into(), Value::String(target.kind.kind.to_string()));
    }
    if let (Some(ns), Some(meta)) = (
        &target.namespace,
        doc.get_mut("metadata").and_then(Value::as_object_mut),
    ) {
        meta.entry("namespace")
            .or_insert_with(|| Value::String(ns.clone()));
    }
    doc
}
