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

// The patterns the OpenAPI document states for what the functions below accept. A test checks
// each against its function; where a pattern cannot say everything (the 253-character limit of a
// label key's prefix) it accepts less, never more.

/// [`is_dns_label`] (with a maximum length of 63).
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";
/// What [`is_dns_subdomain`] accepts (with a maximum length of 253).
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$";
/// A name, or nothing (then `generateName` is required).
pub const NAME_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$";
/// A `generateName`: a prefix that becomes a DNS-1123 label with five more characters.
pub const GENERATE_NAME_PATTERN: &str = r"^([a-z0-9][-a-z0-9]{0,56})?$";
/// [`is_qualified_name`]: label and annotation keys, finalizers, topology keys.
pub const QUALIFIED_NAME_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?){0,2}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// [`is_label_value`].
pub const LABEL_VALUE_PATTERN: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";
/// [`host_path`] (with a maximum length of [`MAX_PATH_CHARS`]).
pub const HOST_PATH_PATTERN: &str = r"^/[^\x00\n\r]*$";
pub const MAX_PATH_CHARS: usize = 4096;
/// One line: no NUL, CR or LF.
pub const ONE_LINE_PATTERN: &str = r"^[^\x00\n\r]*$";

/// The schema of a label map: any keys (OpenAPI 3.0 cannot constrain them; the server checks
/// them as [`labels`] does), values matching [`LABEL_VALUE_PATTERN`].
pub fn labels_schema(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
    serde_json::from_value(serde_json::json!({
        "type": "object",
        "additionalProperties": {"type": "string", "pattern": LABEL_VALUE_PATTERN, "maxLength": 63},
    }))
    .expect("a valid schema")
}

/// The schema of a list of IP addresses (v4 or v6).
pub fn ip_list_schema(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
    serde_json::from_value(serde_json::json!({
        "type": "array",
        "items": {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
    }))
    .expect("a valid schema")
}

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

pub fn is_dns_subdomain(value: &str) -> bool {
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

/// A disk's size: 1Mi to 64Ti.
pub fn disk_size(errs: &mut FieldErrors, field: &str, size: &crate::Quantity) {
    if size.value() < 1 << 20 {
        errs.push(field, format!("{size} is too small: at least 1Mi"));
    } else if size.value() > 64 << 40 {
        errs.push(field, format!("{size} is more than the 64Ti allowed"));
    }
}

/// A path on the node: absolute, no NUL or newline.
pub fn host_path(errs: &mut FieldErrors, field: &str, value: &str) {
    if !value.starts_with('/')
        || value.contains(['\0', '\n', '\r'])
        || value.chars().count() > MAX_PATH_CHARS
    {
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

    /// The document's patterns accept what the checks accept: every string drawn from a pattern
    /// passes its check, and (where the pattern is exact) a string the check accepts matches.
    mod patterns {
        use super::*;
        use proptest::prelude::*;

        fn matches(pattern: &str, s: &str) -> bool {
            regex::Regex::new(pattern).unwrap().is_match(s)
        }

        /// Strings near the boundaries: the characters these rules are about, any length to 70,
        /// and keys with prefixes.
        fn near() -> impl Strategy<Value = String> {
            prop_oneof![
                "[-a-zA-Z0-9_./ \\n]{0,70}",
                "[-a-z0-9]{0,70}",
                "[-a-z0-9.]{0,30}/[-a-zA-Z0-9_.]{0,70}",
            ]
        }

        proptest! {
            #[test]
            fn drawn_from_the_pattern_passes_the_check(
                label in DNS_LABEL_PATTERN.trim_matches(['^', '$']),
                key in QUALIFIED_NAME_PATTERN.trim_matches(['^', '$']),
                value in LABEL_VALUE_PATTERN.trim_matches(['^', '$']),
                prefix in GENERATE_NAME_PATTERN.trim_matches(['^', '$']),
                path in "/[^\\x00\\n\\r]{0,80}",
            ) {
                prop_assert!(is_dns_label(&label), "{label:?}");
                prop_assert!(is_qualified_name(&key), "{key:?}");
                prop_assert!(is_label_value(&value), "{value:?}");
                prop_assert!(is_dns_label(&format!("{prefix}abcde")), "{prefix:?}");
                prop_assert!(matches(HOST_PATH_PATTERN, &path));
                let mut errs = FieldErrors::default();
                host_path(&mut errs, "p", &path);
                prop_assert!(errs.is_empty(), "{path:?}");
            }

            #[test]
            fn accepted_by_the_check_matches_the_pattern(s in near()) {
                prop_assert_eq!(is_dns_label(&s), matches(DNS_LABEL_PATTERN, &s), "{:?}", s);
                prop_assert_eq!(is_label_value(&s), matches(LABEL_VALUE_PATTERN, &s) && s.len() <= 63, "{:?}", s);
                prop_assert_eq!(s.is_empty() || is_dns_label(&s), matches(NAME_PATTERN, &s), "{:?}", s);
                let generates = s.len() <= 57 && (s.is_empty() || is_dns_label(&format!("{s}a")));
                prop_assert_eq!(generates, matches(GENERATE_NAME_PATTERN, &s), "{:?}", s);
                let short_prefix = s.split_once('/').is_none_or(|(p, _)| p.split('.').count() <= 3);
                if short_prefix {
                    prop_assert_eq!(is_qualified_name(&s), matches(QUALIFIED_NAME_PATTERN, &s), "{:?}", s);
                } else {
                    prop_assert!(!matches(QUALIFIED_NAME_PATTERN, &s) || is_qualified_name(&s));
                }
            }
        }
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
