//! Label selectors (`app=web,tier!=db,zone in (a,b),gpu,!legacy`) and field selectors
//! (`spec.nodeName=node-1`), parsed as Kubernetes parses them.

use std::collections::BTreeMap;

use crate::validation::{is_label_value, is_qualified_name};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {selector:?}: {problem}")]
pub struct SelectorError {
    pub selector: String,
    pub problem: String,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let err = |problem: String| SelectorError {
            selector: selector.to_string(),
            problem,
        };
        let mut reqs = Vec::new();
        if selector.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top_level(selector) {
            let part = part.trim();
            let check_key = |k: &str| -> Result<String, SelectorError> {
                let k = k.trim();
                if is_qualified_name(k) {
                    Ok(k.to_string())
                } else {
                    Err(err(format!("{k:?} is not a valid label key")))
                }
            };
            let check_value = |v: &str| -> Result<String, SelectorError> {
                let v = v.trim();
                if is_label_value(v) {
                    Ok(v.to_string())
                } else {
                    Err(err(format!("{v:?} is not a valid label value")))
                }
            };
            let set = |rest: &str| -> Result<Vec<String>, SelectorError> {
                let rest = rest.trim();
                let inner = rest
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| {
                        err(format!(
                            "expected a parenthesised list after the operator in {part:?}"
                        ))
                    })?;
                if inner.trim().is_empty() {
                    return Err(err(format!(
                        "the set of values in {part:?} is empty: 'in' and 'notin' need at least one"
                    )));
                }
                inner.split(',').map(check_value).collect()
            };
            let req = if let Some(k) = part.strip_prefix('!') {
                Requirement::DoesNotExist(check_key(k)?)
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(check_key(k)?, check_value(v)?)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(check_key(k)?, check_value(v)?)
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(check_key(k)?, set(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Requirement::In(check_key(k)?, set(rest)?)
            } else if part.is_empty() {
                return Err(err("empty requirement".into()));
            } else {
                Requirement::Exists(check_key(part)?)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A field selector: `field=value` / `field==value` / `field!=value`, comma-separated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<(String, bool, String)>);

/// The fields every kind can be selected by, besides its own.
pub const METADATA_FIELDS: [&str; 2] = ["metadata.name", "metadata.namespace"];

impl FieldSelector {
    /// Parses and checks every field against [`METADATA_FIELDS`] and the ones the kind supports.
    pub fn parse(selector: &str, supported: &[&str]) -> Result<Self, SelectorError> {
        let err = |problem: String| SelectorError {
            selector: selector.to_string(),
            problem,
        };
        let mut reqs = Vec::new();
        if selector.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for part in selector.split(',') {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(err(format!("{part:?} must be field=value or field!=value")));
            };
            let field = field.trim();
            if !METADATA_FIELDS.contains(&field) && !supported.contains(&field) {
                let known: Vec<&str> = METADATA_FIELDS.iter().chain(supported).copied().collect();
                return Err(err(format!(
                    "field {field:?} is not supported; use one of: {}",
                    known.join(", ")
                )));
            }
            reqs.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    /// Matches against an object; a missing field reads as the empty string, as in Kubernetes.
    pub fn matches(&self, object: &serde_json::Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field
                .split('.')
                .try_fold(object, |v, seg| v.get(seg))
                .and_then(|v| v.as_str())
                .unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_sets_are_refused() {
        for s in ["a in ()", "a notin ( )"] {
            let e = LabelSelector::parse(s).unwrap_err();
            assert!(e.problem.contains("empty"), "{s}: {e}");
        }
    }

    #[test]
    fn label_selector_operators() {
        let l = labels(&[("app", "web"), ("zone", "a"), ("gpu", "")]);
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(&l);
        assert!(ok("app=web"));
        assert!(ok("app==web,zone in (a, b)"));
        assert!(!ok("app!=web"));
        assert!(ok("zone notin (b,c)"));
        assert!(ok("gpu"));
        assert!(ok("!legacy"));
        assert!(!ok("!gpu"));
        assert!(!ok("zone in (b)"));
        assert!(ok(""));
    }

    #[test]
    fn label_selector_errors_name_the_problem() {
        let e = LabelSelector::parse("app=we b").unwrap_err();
        assert!(e.to_string().contains("not a valid label value"), "{e}");
        assert!(LabelSelector::parse("zone in a,b").is_err());
        assert!(LabelSelector::parse("a,,b").is_err());
    }

    #[test]
    fn field_selector() {
        let vm = serde_json::json!({"spec": {"nodeName": "n1"}, "metadata": {"name": "x"}});
        let supported = ["spec.nodeName"];
        assert!(FieldSelector::parse("spec.nodeName=n1", &supported)
            .unwrap()
            .matches(&vm));
        assert!(!FieldSelector::parse("spec.nodeName!=n1", &supported)
            .unwrap()
            .matches(&vm));
        assert!(
            FieldSelector::parse("spec.nodeName!=n2,metadata.name=x", &supported)
                .unwrap()
                .matches(&vm)
        );
        let e = FieldSelector::parse("spec.cpus=1", &supported).unwrap_err();
        assert!(e.to_string().contains("not supported"));
        assert!(e
            .to_string()
            .contains("metadata.name, metadata.namespace, spec.nodeName"));
    }
}
