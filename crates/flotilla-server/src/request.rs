//! Reading resource requests as Kubernetes clients send them: the target (kind, project, name,
//! subresource) from the path, the query parameters, and bodies by content type.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use flotilla_types::registry::{self, KindInfo};
use flotilla_types::validation;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::Value;

use flotilla_types::table::IncludeObject;

use crate::error::ApiError;
use crate::http::MAX_BODY;
use crate::objects::{DeleteOptions, FieldValidation, PatchBody, Propagation, Subresource};

/// Query parameters of resource requests, as Kubernetes names and parses them.
#[derive(Default)]
pub(crate) struct Query {
    pub(crate) watch: bool,
    pub(crate) resource_version: Option<i64>,
    pub(crate) label_selector: String,
    pub(crate) field_selector: String,
    pub(crate) limit: usize,
    pub(crate) continue_token: Option<String>,
    pub(crate) bookmarks: bool,
    pub(crate) timeout: Option<Duration>,
    /// `dryRun=All`: run the write in full, store nothing.
    pub(crate) dry_run: bool,
    /// DELETE: `Background` (default), `Foreground` or `Orphan`.
    pub(crate) propagation_policy: Option<Propagation>,
    pub(crate) grace_period_seconds: Option<i64>,
    /// With a Table answer: how much of each object its row carries.
    pub(crate) include_object: Option<IncludeObject>,
    /// What writes do with unknown fields.
    pub(crate) field_validation: FieldValidation,
    /// Who writes (server-side apply requires it).
    pub(crate) field_manager: Option<String>,
    /// Server-side apply: take fields other managers own.
    pub(crate) force: bool,
}

fn parse_propagation(v: &str) -> Result<Propagation, ApiError> {
    {
        match v {
            "Background" => Ok(Propagation::Background),
            "Foreground" => Ok(Propagation::Foreground),
            "Orphan" => Ok(Propagation::Orphan),
            other => Err(ApiError::bad_request(format!(
                "propagationPolicy {other:?} is not one of Background, Foreground, Orphan"
            ))),
        }
    }
}

/// A boolean as Go's strconv.ParseBool (and so Kubernetes) reads it.
pub(crate) fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" | "" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "query parameter {name}={v:?} must be true or false"
        ))),
    }
}

fn parse_dry_run(v: &str) -> Result<bool, ApiError> {
    match v {
        "All" => Ok(true),
        "" => Ok(false),
        other => Err(ApiError::bad_request(format!(
            "dryRun={other:?} is not supported: the only value is All"
        ))),
    }
}

fn whole<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ApiError> {
    v.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "query parameter {name}={v:?} must be a whole number"
        ))
    })
}

pub(crate) fn parse_query(raw: Option<&str>) -> Result<Query, ApiError> {
    let mut q = Query::default();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "watch" => q.watch = parse_bool("watch", &v)?,
            "allowWatchBookmarks" => q.bookmarks = parse_bool("allowWatchBookmarks", &v)?,
            "labelSelector" => q.label_selector = v.into_owned(),
            "fieldSelector" => q.field_selector = v.into_owned(),
            "continue" if !v.is_empty() => q.continue_token = Some(v.into_owned()),
            "resourceVersion" if !v.is_empty() => {
                q.resource_version = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(format!("query parameter resourceVersion={v:?} must be a resourceVersion this server returned"))
                })?)
            }
            "limit" => q.limit = whole("limit", &v)?,
            "dryRun" => q.dry_run = parse_dry_run(&v)?,
            "timeoutSeconds" => q.timeout = Some(Duration::from_secs(whole("timeoutSeconds", &v)?)),
            "propagationPolicy" => q.propagation_policy = Some(parse_propagation(&v)?),
            "orphanDependents" if parse_bool("orphanDependents", &v)? => {
                q.propagation_policy = Some(Propagation::Orphan)
            }
            "gracePeriodSeconds" => q.grace_period_seconds = Some(whole("gracePeriodSeconds", &v)?),
            "fieldValidation" => {
                q.field_validation = match v.as_ref() {
                    "Strict" | "" => FieldValidation::Strict,
                    "Warn" => FieldValidation::Warn,
                    "Ignore" => FieldValidation::Ignore,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "fieldValidation={other:?} is not one of Strict, Warn, Ignore"
                        )))
                    }
                }
            }
            "fieldManager" if !v.is_empty() => {
                if v.chars().count() > 128 || v.chars().any(|c| c.is_control()) {
                    return Err(ApiError::bad_request(
                        "fieldManager must be at most 128 printable characters",
                    ));
                }
                q.field_manager = Some(v.into_owned())
            }
            "force" => q.force = parse_bool("force", &v)?,
            "includeObject" => {
                q.include_object = Some(match v.as_ref() {
                    "None" => IncludeObject::None,
                    "Metadata" => IncludeObject::Metadata,
                    "Object" => IncludeObject::Object,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "includeObject={other:?} is not one of None, Metadata, Object"
                        )))
                    }
                })
            }
            _ => {}
        }
    }
    Ok(q)
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteOptionsBody {
    // Read only to check their type; any value is accepted (Kubernetes' v1 or meta.k8s.io/v1).
    #[serde(default)]
    #[allow(dead_code)]
    api_version: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    kind: Option<String>,
    #[serde(default)]
    dry_run: Option<Vec<String>>,
    #[serde(default)]
    propagation_policy: Option<String>,
    #[serde(default)]
    orphan_dependents: Option<bool>,
    #[serde(default)]
    grace_period_seconds: Option<i64>,
    #[serde(default)]
    preconditions: Option<Preconditions>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Preconditions {
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
}

/// The DeleteOptions of a DELETE, from its body (if any) and its query (which wins), and
/// whether it is a dry run.
pub(crate) fn delete_options(
    q: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(DeleteOptions, bool), ApiError> {
    let mut o = DeleteOptions::default();
    let mut dry_run = q.dry_run;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let doc = parse_document(headers, body)?;
        if !doc.is_object() {
            return Err(ApiError::bad_request(
                "the body must be a DeleteOptions object",
            ));
        }
        let b =
            DeleteOptionsBody::deserialize(flotilla_types::strict::Strict(&doc)).map_err(|e| {
                ApiError::bad_request(format!("the body is not valid DeleteOptions: {e}"))
            })?;
        for v in b.dry_run.iter().flatten() {
            dry_run |= parse_dry_run(v)?;
        }
        if let Some(p) = &b.propagation_policy {
            o.propagation = Some(parse_propagation(p)?);
        } else if b.orphan_dependents == Some(true) {
            o.propagation = Some(Propagation::Orphan);
        }
        if b.grace_period_seconds.is_some_and(|g| g < 0) {
            return Err(ApiError::bad_request(
                "gracePeriodSeconds must be 0 or more",
            ));
        }
        o.grace_period_seconds = b.grace_period_seconds;
        if let Some(p) = b.preconditions {
            o.uid = p.uid;
            o.resource_version = p.resource_version;
        }
    }
    if q.propagation_policy.is_some() {
        o.propagation = q.propagation_policy;
    }
    if q.grace_period_seconds.is_some() {
        o.grace_period_seconds = q.grace_period_seconds;
    }
    if o.grace_period_seconds.is_some_and(|g| g < 0) {
        return Err(ApiError::bad_request(
            "gracePeriodSeconds must be 0 or more",
        ));
    }
    Ok((o, dry_run))
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

pub(crate) fn parse_patch(headers: &HeaderMap, bytes: &[u8]) -> Result<PatchBody, ApiError> {
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
        // YAML is a superset of JSON: both arrive here.
        "application/apply-patch+yaml" | "application/apply-patch+json" => {
            let config: Value = serde_yaml::from_slice(bytes).map_err(|e| {
                ApiError::bad_request(format!("the applied configuration is not valid YAML: {e}"))
            })?;
            if !config.is_object() {
                return Err(ApiError::bad_request("the applied configuration must be an object"));
            }
            Ok(PatchBody::Apply(config))
        }
        other => Err(ApiError::unsupported_media_type(format!(
            "patch type {other:?} is not supported; use application/merge-patch+json, application/json-patch+json or application/apply-patch+yaml"
        ))),
    }
}

pub(crate) struct Target {
    pub(crate) kind: &'static KindInfo,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) sub: Option<Subresource>,
}

/// The target of a request to `api_version`'s paths (`/apis/flotilla.dev/v1alpha1/...` or
/// `/api/v1/...`).
pub(crate) fn resolve(
    api_version: &str,
    params: &HashMap<String, String>,
) -> Result<Target, ApiError> {
    let plural = params.get("plural").map(String::as_str).unwrap_or_default();
    let kind = registry::by_plural(plural)
        .filter(|k| k.api_version == api_version)
        .ok_or_else(|| {
            let hint = registry::lookup(plural)
                .map(|k| format!(" (did you mean {} in {}?)", k.plural, k.api_root()))
                .unwrap_or_default();
            ApiError::new(
                404,
                "NotFound",
                format!(
                    "the server has no resource {plural:?} in {api_version}{hint}; discovery starts at /apis and /api"
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
                    "{} is cluster-scoped: use {}/{}",
                    kind.kind,
                    kind.api_root(),
                    kind.plural
                ),
            ))
        }
        (true, None, Some(_)) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!(
                    "{} belongs to a project: use {}/namespaces/<project>/{}/<name>",
                    kind.kind,
                    kind.api_root(),
                    kind.plural
                ),
            ))
        }
        _ => {}
    }
    // No project can have such a name: say so rather than list an empty project.
    if let Some(ns) = namespace
        .as_deref()
        .filter(|ns| !validation::is_dns_label(ns))
    {
        return Err(ApiError::bad_request(format!(
            "the project {ns:?} in the path is not a valid project name: lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit"
        )));
    }
    let sub = match params.get("sub").map(String::as_str) {
        None => None,
        Some("status") if kind.has_status => Some(Subresource::Status),
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

/// Whether the client asks for a `meta.k8s.io` Table (kubectl's server-side printing): the first
/// media type of `Accept` that names `as=Table` with that group wins over plain JSON only if it
/// comes first.
pub(crate) fn wants_table(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let essence = parts.next().unwrap_or_default();
        if essence != "application/json" && essence != "*/*" {
            continue;
        }
        let params: Vec<(&str, &str)> = parts.filter_map(|p| p.split_once('=')).collect();
        let has = |k: &str, v: &str| {
            params
                .iter()
                .any(|(pk, pv)| pk.trim() == k && pv.trim() == v)
        };
        if has("as", "Table") && has("g", "meta.k8s.io") {
            return true;
        }
        if !params.iter().any(|(k, _)| k.trim() == "as") {
            // Plain JSON comes first: that is what the client prefers.
            return false;
        }
    }
    false
}

/// The field manager of a write: `fieldManager`, else the client's name from `User-Agent`
/// (`kubectl/v1.32.4 ...` -> `kubectl`), as Kubernetes derives it.
pub(crate) fn field_manager(q: &Query, headers: &HeaderMap) -> Option<String> {
    q.field_manager.clone().or_else(|| {
        headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split(['/', ' ']).next())
            .filter(|name| !name.is_empty())
            .map(|name| name.chars().take(128).collect())
    })
}
