//! `GET .../virtualmachines/NAME/log[?follow=true]`: the VM's serial console, proxied from the
//! agent of its node over mutually authenticated TLS (see [`crate::pinned`]).

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use flotilla_types::registry;
use futures::StreamExt;
use serde_json::Value;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::http::AppState;

pub async fn proxy(
    state: &AppState,
    principal: &Principal,
    namespace: &str,
    name: &str,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    if !principal.is_admin() {
        return Err(ApiError::forbidden(format!(
            "{} may not read VM logs",
            principal.user
        )));
    }
    let vms = registry::by_kind("VirtualMachine").expect("registered");
    let vm = state
        .objects
        .get(vms, Some(namespace), name)
        .await?
        .to_value();
    let uid = vm["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let node_name = vm["status"]["nodeName"].as_str().or(vm["spec"]["nodeName"].as_str()).ok_or_else(|| {
        ApiError::bad_request(format!("VirtualMachine {name:?} has no node yet, so it has no log; try again once it is scheduled"))
    })?;
    let node: Value = state
        .objects
        .get(
            registry::by_kind("Node").expect("registered"),
            None,
            node_name,
        )
        .await?
        .to_value();
    let info = &node["status"]["nodeInfo"];
    let (Some(endpoint), Some(fingerprint)) = (
        info["agentEndpoint"].as_str(),
        info["agentCertSha256"].as_str(),
    ) else {
        return Err(ApiError::new(
            503,
            "ServiceUnavailable",
            format!("the agent of node {node_name:?} has not published its endpoint yet"),
        ));
    };
    let client =
        crate::pinned::agent_client(fingerprint, &state.client_cert_pem, &state.client_key_pem)
            .map_err(|e| ApiError::internal(format!("cannot build the agent client: {e}")))?;
    let follow = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .any(|(k, v)| k == "follow" && (v == "true" || v == "1"));
    let url = format!("{endpoint}/v1/vms/{uid}/log?follow={follow}");
    let resp = client.get(&url).send().await.map_err(|e| {
        ApiError::new(
            502,
            "BadGateway",
            format!("cannot reach the agent of node {node_name:?} at {endpoint}: {e}"),
        )
    })?;
    match resp.status().as_u16() {
        200 => {}
        404 => return Err(ApiError::not_found("log of VirtualMachine", name)),
        code => {
            return Err(ApiError::new(
                502,
                "BadGateway",
                format!("the agent of node {node_name:?} answered {code}"),
            ))
        }
    }
    let stream = resp
        .bytes_stream()
        .map(|chunk| chunk.map_err(std::io::Error::other));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("valid response"))
}
