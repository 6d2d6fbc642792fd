//! The `Status` object every API error is answered with (Kubernetes' shape, so its clients read it).

use serde::{Deserialize, Serialize};

use crate::validation::FieldErrors;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub api_version: String,
    pub kind: String,
    /// `Success` or `Failure`.
    pub status: String,
    pub message: String,
    /// A machine-readable word: `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `BadRequest`, ...
    pub reason: String,
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDetails {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<StatusCause>,
    /// With 429 (and some 5xx): when to try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusCause {
    /// A machine-readable word, e.g. `FieldValueInvalid`, `ResourceVersionTooLarge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
    pub message: String,
}

impl Status {
    pub fn failure(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Status {
            api_version: "v1".into(),
            kind: "Status".into(),
            status: "Failure".into(),
            message: message.into(),
            reason: reason.into(),
            code,
            details: None,
        }
    }

    pub fn success(message: impl Into<String>) -> Self {
        Status {
            status: "Success".into(),
            ..Status::failure(200, "", message)
        }
    }

    /// 422 Invalid with one cause per field error.
    pub fn invalid(kind: &str, name: &str, errs: &FieldErrors) -> Self {
        let what = if name.is_empty() {
            kind.to_string()
        } else {
            format!("{kind} {name:?}")
        };
        let mut s = Status::failure(422, "Invalid", format!("{what} is invalid: {errs}"));
        s.details = Some(StatusDetails {
            name: name.to_string(),
            kind: kind.to_string(),
            causes: errs
                .0
                .iter()
                .map(|e| StatusCause {
                    reason: Some("FieldValueInvalid".into()),
                    field: e.field.clone(),
                    message: e.message.clone(),
                })
                .collect(),
            retry_after_seconds: None,
        });
        s
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
