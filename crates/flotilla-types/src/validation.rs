//! Field-level validation: errors that name the field path and say what to do.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One problem with one field, e.g. `spec.resources.memory: must be at least 16Mi`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Every problem found in one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result(self) -> Result<(), FieldErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

impl std::error::Error for FieldErrors {}

const DNS_LABEL_HINT: &str =
    "must be a DNS-1123 label: at most 63 lowercase letters, digits or '-', starting and ending with a letter or digit";

/// Checks a DNS-1123 label (object names, projects, nodes).
pub fn dns_label(errs: &mut FieldErrors, field: &str, value: &str) {
    if !is_dns_label(value) {
        errs.push(field, format!("{value:?} {DNS_LABEL_HINT}"));
    }
}

pub fn is_dns_label(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_dns_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(is_dns_label)
}

fn is_label_name(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Kubernetes label and annotation keys: `[prefix/]name`.
pub fn is_qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

pub fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_label_name(value)
}

pub fn labels(
    errs: &mut FieldErrors,
    field: &str,
    map: &std::collections::BTreeMap<String, String>,
) {
    for (k, v) in map {
        if !is_qualified_name(k) {
            errs.push(
                format!("{field}[{k:?}]"),
                "label keys are [prefix/]name: a name of at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric",
            );
        }
        if !is_label_value(v) {
            errs.push(
                format!("{field}[{k:?}]"),
                format!("label value {v:?} must be empty or at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric"),
            );
        }
    }
}

/// The closest DNS-1123 label to `s` (lowercased, other characters become '-', at most 63), or
/// `fallback` when nothing is left.
pub fn to_dns_label(s: &str, fallback: &str) -> String {
    let cleaned: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let label: String = cleaned.trim_matches('-').chars().take(63).collect();
    let label = label.trim_end_matches('-');
    if label.is_empty() {
        fallback.to_string()
    } else {
        label.to_string()
    }
}

/// A path on the node: absolute, no NUL or newline.
pub fn host_path(errs: &mut FieldErrors, field: &str, value: &str) {
    if !value.starts_with('/') || value.contains(['\0', '\n', '\r']) || value.len() > 4096 {
        errs.push(
            field,
            format!("{value:?} must be an absolute path on the node, without control characters"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "web-1", "0abc", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Web",
            "a_b",
            "a.b",
            &"a".repeat(64),
            "a b",
            "ü",
        ] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn dns_labels_from_arbitrary_names() {
        assert_eq!(to_dns_label("My_Domain.01", "x"), "my-domain-01");
        assert_eq!(to_dns_label("--", "x"), "x");
        assert!(is_dns_label(&to_dns_label(&"a-".repeat(50), "x")));
    }

    #[test]
    fn label_keys_and_values() {
        assert!(is_qualified_name("app"));
        assert!(is_qualified_name("topology.flotilla.dev/zone"));
        assert!(!is_qualified_name("/zone"));
        assert!(!is_qualified_name("a/b/c"));
        assert!(is_label_value(""));
        assert!(is_label_value("eu-1.a_b"));
        assert!(!is_label_value("bad value"));
    }
}
