//! Human output: tables with per-kind columns, ages, and the describe view.

use flotilla_types::registry::KindInfo;
use serde_json::Value;

/// Follows a dotted path; `list[key=value]` picks the element of a list whose `key` is `value`
/// (e.g. `status.conditions[type=Ready].status`); arrays are joined with commas, absent values
/// are empty.
pub fn field(object: &Value, path: &str) -> String {
    let v = path
        .split('.')
        .try_fold(object, |v, seg| match seg.split_once('[') {
            Some((name, filter)) => {
                let (key, want) = filter.trim_end_matches(']').split_once('=')?;
                v.get(name)?
                    .as_array()?
                    .iter()
                    .find(|item| item[key].as_str() == Some(want))
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

/// `45s`, `12m`, `3h`, `5d` since an RFC 3339 time.
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

pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn for_kind(kind: &KindInfo, wide: bool, all_projects: bool) -> Table {
        let mut headers = Vec::new();
        if all_projects && kind.namespaced {
            headers.push("PROJECT".to_string());
        }
        headers.push("NAME".to_string());
        headers.extend(
            kind.columns
                .iter()
                .filter(|c| wide || !c.wide)
                .map(|c| c.name.to_string()),
        );
        headers.push("AGE".to_string());
        Table {
            headers,
            rows: Vec::new(),
        }
    }

    pub fn row(kind: &KindInfo, object: &Value, wide: bool, all_projects: bool) -> Vec<String> {
        let mut row = Vec::new();
        if all_projects && kind.namespaced {
            row.push(field(object, "metadata.namespace"));
        }
        let mut name = field(object, "metadata.name");
        if object["metadata"].get("deletionTimestamp").is_some() {
            name.push_str(" (deleting)");
        }
        row.push(name);
        row.extend(
            kind.columns
                .iter()
                .filter(|c| wide || !c.wide)
                .map(|c| field(object, c.path)),
        );
        row.push(age(&field(object, "metadata.creationTimestamp")));
        row
    }

    pub fn render(&self, with_headers: bool) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(String::len).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| -> String {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    out.push_str(c);
                } else {
                    out.push_str(&format!("{c:<w$}   ", w = widths[i]));
                }
            }
            out.trim_end().to_string() + "\n"
        };
        let mut out = String::new();
        if with_headers {
            out.push_str(&line(&self.headers));
        }
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

fn indent(text: &str, by: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(by)))
        .collect()
}

/// The `describe` view: identity first, then spec, status and conditions.
pub fn describe(kind: &KindInfo, object: &Value) -> String {
    let mut out = String::new();
    let meta = &object["metadata"];
    out.push_str(&format!(
        "Name:         {}\n",
        field(object, "metadata.name")
    ));
    if kind.namespaced {
        out.push_str(&format!(
            "Project:      {}\n",
            field(object, "metadata.namespace")
        ));
    }
    out.push_str(&format!("Kind:         {}\n", kind.kind));
    out.push_str(&format!(
        "UID:          {}\n",
        field(object, "metadata.uid")
    ));
    let created = field(object, "metadata.creationTimestamp");
    out.push_str(&format!(
        "Created:      {created} ({} ago)\n",
        age(&created)
    ));
    if let Some(d) = meta.get("deletionTimestamp").and_then(Value::as_str) {
        out.push_str(&format!(
            "Deleting:     since {d}; waiting for finalizers {}\n",
            field(object, "metadata.finalizers")
        ));
    }
    for (title, key) in [("Labels:", "labels"), ("Annotations:", "annotations")] {
        let pairs: Vec<String> = meta[key]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{title:<14}{}\n",
            if pairs.is_empty() {
                "<none>".to_string()
            } else {
                pairs.join("\n              ")
            }
        ));
    }
    out.push_str(&format!(
        "Generation:   {}\n",
        field(object, "metadata.generation")
    ));
    if let Some(spec) = object.get("spec") {
        out.push_str("Spec:\n");
        out.push_str(&indent(&serde_yaml::to_string(spec).unwrap_or_default(), 2));
    }
    // Kinds without spec and status (Event) keep their fields at the top level.
    let mut fields = object.as_object().cloned().unwrap_or_default();
    for envelope in ["apiVersion", "kind", "metadata", "spec", "status"] {
        fields.remove(envelope);
    }
    if !fields.is_empty() {
        out.push_str(&serde_yaml::to_string(&fields).unwrap_or_default());
        return out;
    }
    if let Some(status) = object.get("status") {
        let mut status = status.clone();
        let conditions = status.as_object_mut().and_then(|s| s.remove("conditions"));
        out.push_str("Status:\n");
        out.push_str(&indent(
            &serde_yaml::to_string(&status).unwrap_or_default(),
            2,
        ));
        if let Some(Value::Array(conds)) = conditions {
            let mut t = Table {
                headers: ["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]
                    .map(String::from)
                    .to_vec(),
                rows: Vec::new(),
            };
            for c in &conds {
                t.rows.push(vec![
                    field(c, "type"),
                    field(c, "status"),
                    field(c, "reason"),
                    age(&field(c, "lastTransitionTime")),
                    field(c, "message"),
                ]);
            }
            out.push_str("Conditions:\n");
            out.push_str(&indent(&t.render(true), 2));
        }
    } else {
        out.push_str("Status:       <none yet>\n");
    }
    out
}

/// The Events section of `describe`: oldest first, as kubectl shows them.
pub fn events_section(events: &[Value]) -> String {
    if events.is_empty() {
        return "Events:       <none>\n".to_string();
    }
    let mut sorted: Vec<&Value> = events.iter().collect();
    sorted.sort_by_key(|e| last_seen(e));
    let mut t = Table {
        headers: ["TYPE", "REASON", "LAST SEEN", "COUNT", "FROM", "NOTE"]
            .map(String::from)
            .to_vec(),
        rows: Vec::new(),
    };
    for e in sorted {
        let count = field(e, "series.count");
        t.rows.push(vec![
            field(e, "type"),
            field(e, "reason"),
            age(&last_seen(e)),
            if count.is_empty() { "1".into() } else { count },
            field(e, "reportingInstance"),
            field(e, "note"),
        ]);
    }
    format!("Events:\n{}", indent(&t.render(true), 2))
}

fn last_seen(event: &Value) -> String {
    let series = field(event, "series.lastObservedTime");
    if series.is_empty() {
        field(event, "eventTime")
    } else {
        series
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_and_tables() {
        let vm = json!({"metadata": {"name": "web", "namespace": "default", "creationTimestamp": "2000-01-01T00:00:00Z"},
                        "status": {"phase": "Running", "ips": ["10.0.0.2", "fd00::2"]}});
        assert_eq!(field(&vm, "status.ips"), "10.0.0.2,fd00::2");
        assert_eq!(field(&vm, "status.nodeName"), "");
        let kind = flotilla_types::registry::lookup("vm").unwrap();
        let mut t = Table::for_kind(kind, false, true);
        t.rows.push(Table::row(kind, &vm, false, true));
        let text = t.render(true);
        assert!(
            text.starts_with("PROJECT   NAME   PHASE     NODE   AGE\n"),
            "{text}"
        );
        assert!(
            text.contains("default   web    Running          "),
            "{text}"
        );
    }

    #[test]
    fn ages() {
        assert!(age("2000-01-01T00:00:00Z").ends_with('d'));
        let node = json!({"status": {"conditions": [{"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        assert_eq!(field(&node, "status.conditions[type=Ready].status"), "True");
        assert_eq!(field(&node, "status.conditions[type=Missing].status"), "");
        assert_eq!(age("garbage"), "<unknown>");
    }
}
