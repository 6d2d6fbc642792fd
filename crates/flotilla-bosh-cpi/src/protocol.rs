//! The CPI's wire contract with the BOSH director and bosh-cli: one JSON request on stdin, one
//! JSON response on stdout, and the director's error types.

use serde::Deserialize;
use serde_json::{json, Value};

/// The highest CPI API version this CPI speaks.
pub const API_VERSION: u64 = 2;

/// One call, as the director sends it.
#[derive(Debug, Deserialize)]
pub struct Request {
    pub method: String,
    pub arguments: Vec<Value>,
    #[serde(default)]
    pub context: Value,
    /// The version the director chose (absent: 1).
    #[serde(default)]
    pub api_version: Option<u64>,
}

impl Request {
    /// Parses a request, or says what is wrong with it (as a `CpiError`).
    pub fn parse(input: &[u8]) -> Result<Request, CpiError> {
        let value: Value = serde_json::from_slice(input)
            .map_err(|e| CpiError::Cpi(format!("Invalid request: not JSON ({e})")))?;
        let Some(object) = value.as_object() else {
            return Err(CpiError::Cpi("Invalid request: not a JSON object".into()));
        };
        match object.get("method") {
            Some(Value::String(_)) => {}
            Some(_) => {
                return Err(CpiError::Cpi(
                    "Invalid request: method must be a string".into(),
                ))
            }
            None => return Err(CpiError::Cpi("Invalid request: method is missing".into())),
        }
        match object.get("arguments") {
            Some(Value::Array(_)) => {}
            Some(_) => {
                return Err(CpiError::Cpi(
                    "Invalid request: arguments must be an array".into(),
                ))
            }
            None => {
                return Err(CpiError::Cpi(
                    "Invalid request: arguments are missing".into(),
                ))
            }
        }
        serde_json::from_value(value).map_err(|e| CpiError::Cpi(format!("Invalid request: {e}")))
    }

    /// The API version results take: the director's choice, at most ours.
    pub fn version(&self) -> u64 {
        self.api_version.unwrap_or(1).clamp(1, API_VERSION)
    }
}

/// What a call can fail with: the director's `Bosh::Clouds::` error types. Any other type
/// would reach the operator as "Unknown CPI error".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpiError {
    #[error("{0}")]
    Cpi(String),
    #[error("{0}")]
    NotImplemented(String),
    #[error("{0}")]
    NotSupported(String),
    #[error("{message}")]
    Cloud { message: String, ok_to_retry: bool },
    #[error("{0}")]
    VmNotFound(String),
    #[error("{0}")]
    NetworkNotFound(String),
    #[error("{message}")]
    NoDiskSpace { message: String, ok_to_retry: bool },
    #[error("{0}")]
    DiskNotAttached(String),
    #[error("{0}")]
    DiskNotFound(String),
    #[error("{message}")]
    VmCreationFailed { message: String, ok_to_retry: bool },
}

impl CpiError {
    pub fn cloud(message: impl Into<String>) -> Self {
        CpiError::Cloud {
            message: message.into(),
            ok_to_retry: false,
        }
    }

    /// The director's name for it.
    pub fn type_name(&self) -> &'static str {
        match self {
            CpiError::Cpi(_) => "Bosh::Clouds::CpiError",
            CpiError::NotImplemented(_) => "Bosh::Clouds::NotImplemented",
            CpiError::NotSupported(_) => "Bosh::Clouds::NotSupported",
            CpiError::Cloud { .. } => "Bosh::Clouds::CloudError",
            CpiError::VmNotFound(_) => "Bosh::Clouds::VMNotFound",
            CpiError::NetworkNotFound(_) => "Bosh::Clouds::NetworkNotFound",
            CpiError::NoDiskSpace { .. } => "Bosh::Clouds::NoDiskSpace",
            CpiError::DiskNotAttached(_) => "Bosh::Clouds::DiskNotAttached",
            CpiError::DiskNotFound(_) => "Bosh::Clouds::DiskNotFound",
            CpiError::VmCreationFailed { .. } => "Bosh::Clouds::VMCreationFailed",
        }
    }

    pub fn ok_to_retry(&self) -> bool {
        match self {
            CpiError::Cloud { ok_to_retry, .. }
            | CpiError::NoDiskSpace { ok_to_retry, .. }
            | CpiError::VmCreationFailed { ok_to_retry, .. } => *ok_to_retry,
            _ => false,
        }
    }
}

/// The response document: `log` is always a string, `error` null on success.
pub fn response(result: Result<Value, CpiError>, log: &str) -> Value {
    match result {
        Ok(result) => json!({"result": result, "error": null, "log": log}),
        Err(e) => json!({
            "result": null,
            "error": {"type": e.type_name(), "message": e.to_string(), "ok_to_retry": e.ok_to_retry()},
            "log": log,
        }),
    }
}

/// The arguments of a call, read by position with the director's types.
pub struct Arguments<'a> {
    pub method: &'a str,
    pub values: &'a [Value],
}

impl Arguments<'_> {
    fn wrong(&self, i: usize, what: &str) -> CpiError {
        CpiError::Cpi(format!(
            "Arguments are not correct: {} takes {what} as argument {}",
            self.method,
            i + 1
        ))
    }

    /// Argument `i` as a string (a CID).
    pub fn string(&self, i: usize, what: &str) -> Result<String, CpiError> {
        match self.values.get(i) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(self.wrong(i, &format!("{what} (a string)"))),
        }
    }

    /// Argument `i` as a whole number.
    pub fn number(&self, i: usize, what: &str) -> Result<u64, CpiError> {
        match self.values.get(i).and_then(Value::as_u64) {
            Some(n) => Ok(n),
            None => Err(self.wrong(i, &format!("{what} (a whole number)"))),
        }
    }

    /// Argument `i` as an object; null or absent when `optional` is an empty object.
    pub fn object(&self, i: usize, what: &str, optional: bool) -> Result<Value, CpiError> {
        match self.values.get(i) {
            Some(v @ Value::Object(_)) => Ok(v.clone()),
            Some(Value::Null) | None if optional => Ok(json!({})),
            _ => Err(self.wrong(i, &format!("{what} (an object)"))),
        }
    }

    /// Argument `i` as a list of strings; null or absent is empty.
    pub fn strings(&self, i: usize, what: &str) -> Result<Vec<String>, CpiError> {
        match self.values.get(i) {
            Some(Value::Null) | None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.wrong(i, &format!("{what} (a list of strings)"))),
            _ => Err(self.wrong(i, &format!("{what} (a list of strings)"))),
        }
    }

    /// Argument `i` as an optional string (null or absent: None).
    pub fn optional_string(&self, i: usize, what: &str) -> Result<Option<String>, CpiError> {
        match self.values.get(i) {
            Some(Value::Null) | None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(self.wrong(i, &format!("{what} (a string or null)"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_field_by_field() {
        let bad = |s: &str| Request::parse(s.as_bytes()).unwrap_err().to_string();
        assert!(bad("{").contains("not JSON"));
        assert!(bad("[]").contains("not a JSON object"));
        assert!(bad(r#"{"arguments":[]}"#).contains("method is missing"));
        assert!(bad(r#"{"method":1,"arguments":[]}"#).contains("method must be a string"));
        assert!(bad(r#"{"method":"info"}"#).contains("arguments are missing"));
        assert!(bad(r#"{"method":"info","arguments":{}}"#).contains("must be an array"));
        let ok = Request::parse(br#"{"method":"info","arguments":[],"extra":1}"#).unwrap();
        assert_eq!((ok.method.as_str(), ok.version()), ("info", 1));
        let v2 = Request::parse(br#"{"method":"info","arguments":[],"api_version":2}"#).unwrap();
        assert_eq!(v2.version(), 2);
        let v9 = Request::parse(br#"{"method":"info","arguments":[],"api_version":9}"#).unwrap();
        assert_eq!(v9.version(), API_VERSION, "never more than this CPI speaks");
    }

    #[test]
    fn errors_carry_the_directors_types() {
        let e = response(
            Err(CpiError::VmCreationFailed {
                message: "m".into(),
                ok_to_retry: true,
            }),
            "",
        );
        assert_eq!(e["error"]["type"], "Bosh::Clouds::VMCreationFailed");
        assert_eq!(e["error"]["ok_to_retry"], true);
        assert_eq!(e["log"], "");
        assert_eq!(response(Ok(json!(true)), "x")["error"], Value::Null);
    }
}
