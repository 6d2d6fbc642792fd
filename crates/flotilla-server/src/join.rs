//! Joining nodes. An admin mints a join token (`flotilla node token create`); it carries the
//! SHA-256 of the CA so that an agent can fetch `/cacerts` over an unverified connection and
//! check it before trusting anything (the k3s scheme). The agent then trades the join token for
//! its own node credentials (user `system:node:<name>`), which it keeps for later restarts.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use flotilla_types::registry;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::auth::Principal;
use crate::authz::{BOOTSTRAPPERS, NODES, NODE_USER_PREFIX};
use crate::error::ApiError;
use crate::http::AppState;
use crate::request::{parse_document, read_body};

pub fn ca_hash(ca_pem: &str) -> String {
    hex::encode(Sha256::digest(ca_pem.as_bytes()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinResponse {
    pub node_name: String,
    pub token: String,
}

pub async fn create_join_token(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    if !principal.is_admin() {
        return Err(ApiError::forbidden(format!(
            "{} may not create join tokens",
            principal.user
        )));
    }
    let bytes = read_body(&headers, body).await?;
    let req: TokenRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        TokenRequest { ttl_seconds: None }
    } else {
        serde_json::from_value(parse_document(&headers, &bytes)?)
            .map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))?
    };
    let ttl = std::time::Duration::from_secs(req.ttl_seconds.unwrap_or(24 * 3600));
    if ttl.is_zero() || ttl.as_secs() > 365 * 24 * 3600 {
        return Err(ApiError::bad_request(
            "ttlSeconds must be between 1 and one year",
        ));
    }
    let bearer = state
        .auth
        .issue(None, "system:bootstrap", &[BOOTSTRAPPERS], Some(ttl))
        .await?;
    let token = flotilla_types::join_token::compose(&bearer, &ca_hash(&state.ca_pem));
    let expires = chrono::Utc::now() + chrono::Duration::seconds(ttl.as_secs() as i64);
    Ok(axum::Json(json!({"token": token, "expires": expires})).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JoinRequest {
    node_name: String,
    /// libvirt's host UUID on the joining host (absent for simulated hosts).
    #[serde(default)]
    host_uuid: Option<String>,
}

pub async fn join(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    if !principal.is_bootstrapper() && !principal.is_admin() {
        return Err(ApiError::forbidden(
            "joining needs a join token (flotilla node token create)",
        ));
    }
    let doc = parse_document(&headers, &read_body(&headers, body).await?)?;
    let req: JoinRequest = serde_json::from_value(doc)
        .map_err(|e| ApiError::bad_request(format!("invalid join request: {e}")))?;
    let name = req.node_name;
    if !flotilla_types::validation::is_dns_label(&name) {
        return Err(ApiError::bad_request(format!(
            "node name {name:?} must be a DNS-1123 label"
        )));
    }
    let nodes = registry::by_kind("Node").expect("registered");
    if let Some(uuid) = req.host_uuid.as_deref().filter(|u| !u.is_empty()) {
        // Two hosts with one libvirt host UUID cannot migrate VMs to each other: libvirt
        // takes them for the same host ("Attempt to migrate guest to the same host").
        let listed = state
            .objects
            .list(nodes, None, &crate::objects::ListOptions::default())
            .await?;
        for raw in listed.items {
            let node: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
            let other = node["metadata"]["name"].as_str().unwrap_or_default();
            if other != name && node["status"]["nodeInfo"]["hostUuid"].as_str() == Some(uuid) {
                return Err(ApiError::new(
                    409,
                    "AlreadyExists",
                    format!(
                        "hostUuid: libvirt's host UUID {uuid} is already node {other:?}'s; two hosts with one UUID cannot migrate VMs to each other. Give this host its own (host_uuid in /etc/libvirt/libvirtd.conf, e.g. from uuidgen, then restart libvirtd), or delete node {other:?} if this host replaces it"
                    ),
                ));
            }
        }
    }
    match state
        .objects
        .create(nodes, None, json!({"metadata": {"name": name}}))
        .await
    {
        Ok(_) => tracing::info!(node = %name, "node registered"),
        Err(e) if e.0.reason == "AlreadyExists" => {
            tracing::info!(node = %name, "node re-joined; its old credentials are replaced")
        }
        Err(e) => return Err(e),
    }
    let token = state
        .auth
        .issue(
            Some(&format!("node-{name}")),
            &format!("{NODE_USER_PREFIX}{name}"),
            &[NODES],
            None,
        )
        .await?;
    Ok(axum::Json(JoinResponse {
        node_name: name,
        token,
    })
    .into_response())
}
