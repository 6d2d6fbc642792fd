//! Service-account tokens: `POST .../serviceaccounts/NAME/token` (Kubernetes' TokenRequest,
//! as `kubectl create token NAME --duration 720h` sends it) makes one; `DELETE
//! .../serviceaccounts/NAME/token?id=ID` revokes one; deleting the account revokes them all.
//! The secret is shown once and stored only as its SHA-256; the account's `status.tokens`
//! lists ids and lifetimes, in the same transaction as the record.

use axum::http::StatusCode;
use axum::response::Response;
use chrono::SubsecRound;
use flotilla_store::{Compare, Op, Txn};
use flotilla_types::kinds::rbac::{
    IssuedToken, TOKEN_TTL_DEFAULT_SECONDS, TOKEN_TTL_MAX_SECONDS, TOKEN_TTL_MIN_SECONDS,
};
use flotilla_types::registry::{self, KindInfo};
use flotilla_types::validation::FieldErrors;
use serde_json::{json, Value};

use crate::auth::{service_account_token, token_key, Principal};
use crate::authz::{self, Verb};
use crate::error::ApiError;
use crate::http::json_response;
use crate::objects::{encode, parse_stored, Objects};

fn accounts() -> &'static KindInfo {
    registry::by_kind("ServiceAccount").expect("registered")
}

fn lifetime(body: &[u8]) -> Result<(i64, Value), ApiError> {
    let request: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not a TokenRequest: {e}")))?
    };
    let seconds = match &request["spec"]["expirationSeconds"] {
        Value::Null => TOKEN_TTL_DEFAULT_SECONDS,
        v => v.as_i64().unwrap_or(-1),
    };
    if !(TOKEN_TTL_MIN_SECONDS..=TOKEN_TTL_MAX_SECONDS).contains(&seconds) {
        let mut errs = FieldErrors::default();
        errs.push(
            "spec.expirationSeconds",
            format!(
                "must be a whole number from {TOKEN_TTL_MIN_SECONDS} (10 minutes) to {TOKEN_TTL_MAX_SECONDS} (366 days)"
            ),
        );
        return Err(ApiError::invalid("TokenRequest", "", &errs));
    }
    // Clients read `audiences` back as a list (the Python client insists on it).
    let audiences = match &request["spec"]["audiences"] {
        Value::Array(a) => Value::Array(a.clone()),
        _ => json!([]),
    };
    Ok((seconds, audiences))
}

/// `POST`: a new token for the account.
pub async fn issue(
    objects: &Objects,
    principal: &Principal,
    (project, name): (&str, &str),
    body: &[u8],
) -> Result<Response, ApiError> {
    let asked = authz::Request::new(Verb::Create, accounts(), Some(project), Some(name));
    authz::authorize(objects, principal, &asked.on("token")).await?;
    let (seconds, audiences) = lifetime(body)?;
    for _ in 0..20 {
        let kv = objects.get_kv(accounts(), Some(project), name).await?;
        let mut account = parse_stored(&kv)?;
        if account["metadata"].get("deletionTimestamp").is_some() {
            return Err(ApiError::forbidden(format!(
                "service account {name:?} is being deleted"
            )));
        }
        let uid = account["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let now = chrono::Utc::now();
        let expires = now + chrono::Duration::seconds(seconds);
        let (token, id, record) = service_account_token(project, name, &uid, expires);
        let mut txn = Txn::new().when(Compare::mod_revision(&kv.key, kv.mod_revision));
        // Expired tokens leave the list (and the store) as a new one comes.
        let mut tokens: Vec<IssuedToken> =
            serde_json::from_value(account["status"]["tokens"].clone()).unwrap_or_default();
        tokens.retain(|t| {
            let live = t.expiration_timestamp > now;
            if !live {
                txn = std::mem::take(&mut txn).and_then(Op::delete(token_key(&t.id)));
            }
            live
        });
        tokens.push(IssuedToken {
            id: id.clone(),
            creation_timestamp: flotilla_types::meta::now(),
            expiration_timestamp: expires.trunc_subsecs(0),
        });
        account["status"] = json!({"tokens": tokens});
        let txn = txn
            .and_then(Op::put(&kv.key, encode(&account)))
            .and_then(Op::put(token_key(&id), record));
        if objects.store().txn(txn).await?.succeeded {
            tracing::info!(project, account = name, token = %id, "service-account token issued");
            let answer = json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "metadata": {"name": name, "namespace": project,
                             "annotations": {"flotilla.dev/token-id": id}},
                "spec": {"expirationSeconds": seconds, "audiences": audiences},
                "status": {"token": token, "expirationTimestamp": expires.trunc_subsecs(0)},
            });
            return Ok(json_response(
                StatusCode::CREATED,
                serde_json::to_vec(&answer).expect("serialises"),
            ));
        }
    }
    Err(ApiError::new(
        409,
        "Conflict",
        "too many concurrent changes; try again",
    ))
}

/// `DELETE ?id=ID`: revokes one token of the account.
pub async fn revoke(
    objects: &Objects,
    principal: &Principal,
    (project, name): (&str, &str),
    query: Option<&str>,
) -> Result<Response, ApiError> {
    let asked = authz::Request::new(Verb::Delete, accounts(), Some(project), Some(name));
    authz::authorize(objects, principal, &asked.on("token")).await?;
    let id = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| {
            ApiError::bad_request("name the token to revoke: DELETE .../token?id=<id>")
        })?;
    for _ in 0..20 {
        let kv = objects.get_kv(accounts(), Some(project), name).await?;
        let mut account = parse_stored(&kv)?;
        let mut tokens: Vec<IssuedToken> =
            serde_json::from_value(account["status"]["tokens"].clone()).unwrap_or_default();
        let before = tokens.len();
        tokens.retain(|t| t.id != id);
        if tokens.len() == before {
            return Err(ApiError::not_found("token of service account", &id));
        }
        account["status"] = json!({"tokens": tokens});
        let txn = Txn::new()
            .when(Compare::mod_revision(&kv.key, kv.mod_revision))
            .and_then(Op::put(&kv.key, encode(&account)))
            .and_then(Op::delete(token_key(&id)));
        if objects.store().txn(txn).await?.succeeded {
            tracing::info!(project, account = name, token = %id, "service-account token revoked");
            return Ok(json_response(
                StatusCode::OK,
                serde_json::to_vec(
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Success",
                    "message": format!("token {id} of service account {name:?} revoked")}),
                )
                .expect("serialises"),
            ));
        }
    }
    Err(ApiError::new(
        409,
        "Conflict",
        "too many concurrent changes; try again",
    ))
}

/// What deleting an account also deletes: the records of its tokens.
pub fn removal_ops(account: &Value) -> Vec<Op> {
    let tokens: Vec<IssuedToken> =
        serde_json::from_value(account["status"]["tokens"].clone()).unwrap_or_default();
    tokens
        .iter()
        .map(|t| Op::delete(token_key(&t.id)))
        .collect()
}
