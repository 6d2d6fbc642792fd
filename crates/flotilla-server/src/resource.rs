//! The resource handler: one request on a kind (list, watch, get, create, replace, patch,
//! delete) becomes one call on [`Objects`] (or the watch module) after authorization.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use flotilla_types::registry;
use flotilla_types::selector::{FieldSelector, LabelSelector};
use serde_json::Value;

use crate::auth::Principal;
use crate::authz::{self, Verb};
use crate::error::ApiError;
use crate::http::{json_response, object_response, AppState};
use crate::objects::{ListOptions, Objects, Subresource};
use crate::request::{parse_document, parse_patch, parse_query, read_body, resolve};
use crate::watch::{self, WatchRequest};

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

pub(crate) async fn resource(
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
