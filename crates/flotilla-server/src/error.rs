//! API errors: every one is a Kubernetes `Status` with a code, a reason and an actionable message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_store::StoreError;
use flotilla_types::{FieldErrors, Status};

#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.message)]
pub struct ApiError(pub Box<Status>, Option<&'static str>);

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        ApiError(Box::new(Status::failure(code, reason, message)), None)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "Unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn not_found(kind: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{kind} {name:?} not found"))
    }

    /// 405, with `Allow` naming the methods that are (e.g. "GET, POST").
    pub fn method_not_allowed(message: impl Into<String>, allow: &'static str) -> Self {
        ApiError(
            Box::new(Status::failure(405, "MethodNotAllowed", message)),
            Some(allow),
        )
    }

    pub fn already_exists(kind: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{kind} {name:?} already exists"),
        )
    }

    pub fn conflict(kind: &str, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "{kind} {name:?} has been modified since you read it: \
                 read it again, apply your change to the latest version and retry"
            ),
        )
    }

    /// 503, with `Retry-After`: the store did not answer. Not a bug, so not logged as one; a
    /// write may or may not have been applied, which the message says.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        tracing::warn!(%reason, "the store is unavailable");
        let mut status = Status::failure(
            503,
            "ServiceUnavailable",
            format!(
                "the store did not answer ({reason}): try again; a write may or may not have been applied, so read the object before writing it again"
            ),
        );
        status.details = Some(flotilla_types::status::StatusDetails {
            retry_after_seconds: Some(1),
            ..Default::default()
        });
        ApiError(Box::new(status), None)
    }

    /// 429, with `Retry-After`.
    pub fn too_many_requests(message: impl Into<String>, retry_after_seconds: u32) -> Self {
        let mut status = Status::failure(429, "TooManyRequests", message);
        status.details = Some(flotilla_types::status::StatusDetails {
            retry_after_seconds: Some(retry_after_seconds),
            ..Default::default()
        });
        ApiError(Box::new(status), None)
    }

    /// 504 for a resourceVersion the store has not reached, as Kubernetes answers it.
    pub fn resource_version_too_large(requested: i64, current: i64) -> Self {
        let mut status = Status::failure(
            504,
            "Timeout",
            format!("Timeout: Too large resource version: {requested}, current: {current}"),
        );
        status.details = Some(flotilla_types::status::StatusDetails {
            causes: vec![flotilla_types::status::StatusCause {
                reason: Some("ResourceVersionTooLarge".into()),
                field: String::new(),
                message: "Too large resource version".into(),
            }],
            retry_after_seconds: Some(1),
            ..Default::default()
        });
        ApiError(Box::new(status), None)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, "RequestEntityTooLarge", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    pub fn invalid(kind: &str, name: &str, errs: &FieldErrors) -> Self {
        ApiError(Box::new(Status::invalid(kind, name, errs)), None)
    }

    /// A 5xx: always a bug or an unavailable store, logged where it is made.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(%message, "internal error");
        Self::new(500, "InternalError", message)
    }

    pub fn code(&self) -> u16 {
        self.0.code
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Compacted { requested, compacted } => ApiError::gone(format!(
                "resourceVersion {} is too old (history before {compacted} has been compacted): list again and watch from the list's resourceVersion",
                requested.saturating_sub(1)
            )),
            StoreError::FutureRevision { requested, current } => ApiError::bad_request(format!(
                "resourceVersion {requested} is newer than the server's current {current}"
            )),
            StoreError::Unavailable(reason) => ApiError::unavailable(reason),
            other => ApiError::internal(format!("store: {other}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.0.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.0.details.as_ref().and_then(|d| d.retry_after_seconds);
        let mut response = (code, axum::Json(self.0)).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        if let Some(allow) = self.1 {
            response.headers_mut().insert(
                axum::http::header::ALLOW,
                axum::http::HeaderValue::from_static(allow),
            );
        }
        response
    }
}
