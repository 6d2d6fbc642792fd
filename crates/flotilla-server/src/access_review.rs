//! `POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`: "may I?" for the caller, as
//! `kubectl auth can-i` and the web UI ask it. The answer is the authorizer's own decision on
//! the same request, so it cannot drift from what the API enforces.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_types::registry::{self, KindInfo};
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::authz::{self, Verb};
use crate::error::ApiError;
use crate::http::{json_response, AppState};
use crate::rbac::{self, Attributes};

pub async fn api_resources() -> Response {
    axum::Json(json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "authorization.k8s.io/v1",
        "resources": [{"name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview",
                       "namespaced": false, "kind": "SelfSubjectAccessReview", "verbs": ["create"]}]
    }))
    .into_response()
}

fn verb(v: &str) -> Option<Verb> {
    Some(match v {
        "get" => Verb::Get,
        "list" => Verb::List,
        "watch" => Verb::Watch,
        "create" => Verb::Create,
        "update" => Verb::Update,
        "patch" => Verb::Patch,
        "delete" => Verb::Delete,
        "deletecollection" => Verb::DeleteCollection,
        _ => return None,
    })
}

fn kind_of(group: &str, resource: &str) -> Option<&'static KindInfo> {
    registry::by_plural(resource).filter(|k| rbac::group_of(k) == group)
}

pub async fn review(
    State(state): State<AppState>,
    axum::Extension(principal): axum::Extension<Principal>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mut review: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the body is not a SelfSubjectAccessReview: {e}"))
    })?;
    let attrs = &review["spec"]["resourceAttributes"];
    let (allowed, reason) = if attrs.is_object() {
        let s = |f: &str| attrs[f].as_str().unwrap_or_default().to_string();
        let (ns, v, group, resource, sub, name) = (
            s("namespace"),
            s("verb"),
            s("group"),
            s("resource"),
            s("subresource"),
            s("name"),
        );
        let project = (!ns.is_empty()).then_some(ns.as_str());
        let name = (!name.is_empty()).then_some(name.as_str());
        let sub = (!sub.is_empty()).then_some(sub.as_str());
        match (kind_of(&group, &resource), verb(&v)) {
            (Some(kind), Some(verb)) => {
                let asked = authz::Request {
                    verb,
                    kind,
                    sub,
                    project,
                    name,
                    field_selector: "",
                };
                match authz::authorize(&state.objects, &principal, &asked).await {
                    Ok(_) => (true, String::new()),
                    Err(e) if e.code() == 403 => (false, e.0.message.clone()),
                    Err(e) => return Err(e),
                }
            }
            // A resource or verb this server does not serve: only what a rule grants in so many
            // words (or a wildcard) is allowed.
            _ => {
                let allowed = principal.is_admin() || {
                    let a = Attributes {
                        verb: &v,
                        group: &group,
                        resource: match sub {
                            Some(sub) => format!("{resource}/{sub}"),
                            None => resource.clone(),
                        },
                        project,
                        name,
                        namespaced: project.is_some(),
                    };
                    let store = state.objects.store().as_ref();
                    rbac::grants(store, &principal, project).await?.allows(&a)
                };
                (allowed, String::new())
            }
        }
    } else if review["spec"]["nonResourceAttributes"].is_object() {
        (principal.is_admin(), String::new())
    } else {
        return Err(ApiError::bad_request(
            "spec.resourceAttributes or spec.nonResourceAttributes is required",
        ));
    };
    let mut status = json!({"allowed": allowed});
    if !reason.is_empty() {
        status["reason"] = json!(reason);
    }
    review["status"] = status;
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SelfSubjectAccessReview");
    Ok(json_response(
        StatusCode::CREATED,
        serde_json::to_vec(&review).expect("serialises"),
    ))
}
