//! What the API server reads from a node's agent, over mutually authenticated TLS (see
//! [`crate::pinned`]): `GET .../virtualmachines/NAME/log[?follow=true]`, the VM's serial
//! console, and `GET .../volumes/NAME/data[?format=qcow2|raw]`, a volume's content as one
//! standalone file.

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
    (query, request_id): (Option<&str>, Option<&str>),
) -> Result<Response, ApiError> {
    let vms = registry::by_kind("VirtualMachine").expect("registered");
    let asked =
        crate::authz::Request::new(crate::authz::Verb::Get, vms, Some(namespace), Some(name));
    crate::authz::authorize(&state.objects, principal, &asked.on("log")).await?;
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
    let (endpoint, client) = agent(state, node_name).await?;
    let follow = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .any(|(k, v)| k == "follow" && (v == "true" || v == "1"));
    let resp = ask(
        &client,
        &endpoint,
        node_name,
        &format!("/v1/vms/{uid}/log?follow={follow}"),
        request_id,
    )
    .await?;
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

/// The endpoint of `node_name`'s agent and a client that trusts only its certificate.
async fn agent(state: &AppState, node_name: &str) -> Result<(String, reqwest::Client), ApiError> {
    let (endpoint, fingerprint) = agent_endpoint(state, node_name).await?;
    let client =
        crate::pinned::agent_client(&fingerprint, &state.client_cert_pem, &state.client_key_pem)
            .map_err(|e| ApiError::internal(format!("cannot build the agent client: {e}")))?;
    Ok((endpoint, client))
}

/// The endpoint of `node_name`'s agent and the SHA-256 of its certificate, from its Node.
pub(crate) async fn agent_endpoint(
    state: &AppState,
    node_name: &str,
) -> Result<(String, String), ApiError> {
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
    Ok((endpoint.to_string(), fingerprint.to_string()))
}

/// GETs `path` from the agent at `endpoint` (502 when it cannot be reached).
async fn ask(
    client: &reqwest::Client,
    endpoint: &str,
    node_name: &str,
    path: &str,
    request_id: Option<&str>,
) -> Result<reqwest::Response, ApiError> {
    let mut req = client.get(format!("{endpoint}{path}"));
    if let Some(id) = request_id {
        // The agent logs it: one id from the audit log to the node.
        req = req.header(crate::audit::REQUEST_ID_HEADER, id);
    }
    req.send().await.map_err(|e| {
        ApiError::new(
            502,
            "BadGateway",
            format!("cannot reach the agent of node {node_name:?} at {endpoint}: {e}"),
        )
    })
}

/// `GET .../volumes/NAME/data`: the volume's content, flattened by its node's agent.
pub async fn export_volume(
    state: &AppState,
    principal: &Principal,
    namespace: &str,
    name: &str,
    (query, request_id): (Option<&str>, Option<&str>),
) -> Result<Response, ApiError> {
    let volumes = registry::by_kind("Volume").expect("registered");
    // Reading a volume's bytes is more than reading the object (`volumes/data`).
    let asked = crate::authz::Request::new(
        crate::authz::Verb::Get,
        volumes,
        Some(namespace),
        Some(name),
    );
    crate::authz::authorize(&state.objects, principal, &asked.on("data")).await?;
    let volume = state
        .objects
        .get(volumes, Some(namespace), name)
        .await?
        .to_value();
    let format = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "format")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| "qcow2".into());
    if format != "qcow2" && format != "raw" {
        let mut errs = flotilla_types::validation::FieldErrors::default();
        errs.push("format", format!("{format:?} is neither qcow2 nor raw"));
        return Err(ApiError::invalid("Volume", name, &errs));
    }
    let uid = volume["metadata"]["uid"].as_str().unwrap_or_default();
    let Some(node_name) = volume["status"]["node"].as_str() else {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!("volume {name:?} is not made yet (it has no node)"),
        ));
    };
    let (endpoint, client) = agent(state, node_name).await?;
    let path = format!("/v1/volumes/{uid}/data?format={format}");
    let resp = ask(&client, &endpoint, node_name, &path, request_id).await?;
    match resp.status().as_u16() {
        200 => {}
        404 => return Err(ApiError::not_found("file of Volume", name)),
        409 => {
            let why = resp.text().await.unwrap_or_default();
            return Err(ApiError::new(
                409,
                "Conflict",
                format!("volume {name:?}: {why}"),
            ));
        }
        code => {
            let why = resp.text().await.unwrap_or_default();
            return Err(ApiError::new(
                502,
                "BadGateway",
                format!("the agent of node {node_name:?} answered {code}: {why}"),
            ));
        }
    }
    let len = resp.content_length();
    let stream = resp
        .bytes_stream()
        .map(|chunk| chunk.map_err(std::io::Error::other));
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}.{format}\""),
        );
    if let Some(len) = len {
        response = response.header(header::CONTENT_LENGTH, len);
    }
    Ok(response
        .body(Body::from_stream(stream))
        .expect("valid response"))
}
