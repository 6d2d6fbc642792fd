//! Tables of objects, as `flotilla get` prints them and as the API serves them to kubectl
//! (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`): the name, each kind's columns
//! (wide ones only with `-o wide`, priority 1 for kubectl) and the age.

use serde_json::{json, Value};

use crate::registry::KindInfo;
use crate::resource::Column;

/// Follows a dotted path; `list[key=value]` picks the element of a list whose `key` is `value`
/// (e.g. `status.conditions[type=Ready].status`), `list[n]` its n-th element (e.g.
/// `status.ips[0]`); arrays are joined with commas, absent values are empty.
pub fn field(object: &Value, path: &str) -> String {
    let v = path
        .split('.')
        .try_fold(object, |v, seg| match seg.split_once('[') {
            Some((name, filter)) => {
                let filter = filter.trim_end_matches(']');
                let list = v.get(name)?.as_array()?;
                match filter.split_once('=') {
                    Some((key, want)) => list.iter().find(|item| item[key].as_str() == Some(want)),
                    None => list.get(filter.parse::<usize>().ok()?),
                }
            }
            None => v.get(seg),
        });
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// `45s`, `12m`, `3h`, `5d` since an RFC 3339 time (`<unknown>` if it is not one).
pub fn age(timestamp: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(timestamp) else {
        return "<unknown>".into();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A column's value in one object. Byte sizes (memory and disk columns) are shown in binary
/// units with at most one decimal (`13.7Gi`) when written with more than four digits, as
/// agents write them (`14379212Ki`); sizes people wrote (`512Mi`, `1G`) are shown as written.
pub fn cell(column: &Column, object: &Value) -> String {
    let value = field(object, column.path);
    if column.age && !value.is_empty() {
        age(&value)
    } else if column.path.ends_with(".memory") || column.path.ends_with(".disk") {
        human_bytes(&value).unwrap_or(value)
    } else {
        value
    }
}

/// `14379212Ki` -> `13.7Gi`; None for quantities short enough to keep as written.
pub fn human_bytes(text: &str) -> Option<String> {
    let digits = text.chars().take_while(char::is_ascii_digit).count();
    if digits <= 4 {
        return None;
    }
    let bytes = crate::quantity::Quantity::parse(text).ok()?.value();
    let (unit, shift) = crate::quantity::BINARY_UNITS
        .into_iter()
        .find(|(_, shift)| bytes >> shift > 0)
        .unwrap_or(("", 0));
    let scaled = bytes as f64 / (1u128 << shift) as f64;
    let rounded = format!("{scaled:.1}");
    Some(format!("{}{unit}", rounded.trim_end_matches(".0")))
}

/// The kind's columns, the wide ones too if `wide`.
pub fn columns(kind: &KindInfo, wide: bool) -> impl Iterator<Item = &'static Column> {
    kind.columns.iter().filter(move |c| wide || !c.wide)
}

/// `LAST SEEN` -> `Last Seen`: kubectl upper-cases headers itself.
fn title(name: &str) -> String {
    name.split(' ')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f
                    .to_uppercase()
                    .chain(c.flat_map(char::to_lowercase))
                    .collect(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How much of each object a Table row carries (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    /// Its metadata, as a `PartialObjectMetadata` (kubectl's default).
    Metadata,
    Object,
}

/// A `meta.k8s.io/v1` Table of `objects`: Name, the kind's columns (wide ones at priority 1)
/// and Age.
pub fn kubernetes_table(
    kind: &KindInfo,
    objects: &[Value],
    resource_version: &str,
    include: IncludeObject,
) -> Value {
    let mut definitions = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "The object's name, unique in its project", "priority": 0})];
    for c in kind.columns {
        definitions.push(json!({"name": title(c.name), "type": "string", "format": "",
            "description": format!("{} ({})", title(c.name), c.path), "priority": i32::from(c.wide)}));
    }
    definitions.push(json!({"name": "Age", "type": "string", "format": "",
        "description": "How long ago the object was created", "priority": 0}));
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![json!(field(o, "metadata.name"))];
            cells.extend(kind.columns.iter().map(|c| json!(cell(c, o))));
            cells.push(json!(age(&field(o, "metadata.creationTimestamp"))));
            let object = match include {
                IncludeObject::None => Value::Null,
                IncludeObject::Object => o.clone(),
                IncludeObject::Metadata => json!({"kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}),
            };
            let mut row = json!({"cells": cells});
            if !object.is_null() {
                row["object"] = object;
            }
            row
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
           "metadata": {"resourceVersion": resource_version},
           "columnDefinitions": definitions, "rows": rows})
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_sizes_are_shown_in_binary_units() {
        use super::human_bytes;
        assert_eq!(human_bytes("14379212Ki").as_deref(), Some("13.7Gi"));
        assert_eq!(human_bytes("1073741824").as_deref(), Some("1Gi"));
        assert_eq!(human_bytes("52428800Ki").as_deref(), Some("50Gi"));
        assert_eq!(human_bytes("12345").as_deref(), Some("12.1Ki"));
        // What people wrote stays as they wrote it.
        for kept in ["512Mi", "1G", "1.5Gi", "1024", ""] {
            assert_eq!(human_bytes(kept), None, "{kept}");
        }
    }

    use super::*;

    #[test]
    fn fields_ages_and_titles() {
        let vm = json!({"metadata": {"name": "web"}, "status": {"phase": "Running", "ips": ["10.0.0.2", "fd00::2"],
            "conditions": [{"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        assert_eq!(field(&vm, "status.ips"), "10.0.0.2,fd00::2");
        assert_eq!(field(&vm, "status.ips[0]"), "10.0.0.2");
        assert_eq!(field(&vm, "status.ips[5]"), "");
        assert_eq!(field(&vm, "status.nodeName"), "");
        assert_eq!(field(&vm, "status.conditions[type=Ready].status"), "True");
        assert_eq!(field(&vm, "status.conditions[type=Missing].status"), "");
        assert!(age("2000-01-01T00:00:00Z").ends_with('d'));
        assert_eq!(age("garbage"), "<unknown>");
        assert_eq!(title("LAST SEEN"), "Last Seen");
    }

    #[test]
    fn a_table_has_name_columns_and_age_with_wide_columns_at_priority_one() {
        let kind = crate::registry::lookup("vm").unwrap();
        let vm = json!({"metadata": {"name": "web", "namespace": "default", "creationTimestamp": "2000-01-01T00:00:00Z"},
            "spec": {"powerState": "Running"}, "status": {"phase": "Running", "nodeName": "n1"}});
        let t = kubernetes_table(kind, &[vm], "7", IncludeObject::Metadata);
        let defs = t["columnDefinitions"].as_array().unwrap();
        assert_eq!(defs[0]["name"], "Name");
        assert_eq!(defs[1]["name"], "Phase");
        assert_eq!(defs.last().unwrap()["name"], "Age");
        let power = defs.iter().position(|d| d["name"] == "Power").unwrap();
        assert_eq!(defs[power]["priority"], 1);
        let row = &t["rows"][0];
        assert_eq!(row["cells"][0], "web");
        assert_eq!(row["cells"][1], "Running");
        assert_eq!(row["cells"][power], "Running");
        assert_eq!(row["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["metadata"]["resourceVersion"], "7");
    }
}
