//! Human output: tables with per-kind columns, ages, and the describe view.

use flotilla_types::registry::KindInfo;
use serde_json::Value;

pub use flotilla_types::table::{age, field};

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
        headers.extend(flotilla_types::table::columns(kind, wide).map(|c| c.name.to_string()));
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
            flotilla_types::table::columns(kind, wide)
                .map(|c| flotilla_types::table::cell(c, object)),
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
    if kind.kind == "SecurityGroup" {
        out.push_str(&security_group_tables(object));
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

/// A SecurityGroup's rules and members as tables (`any` where a rule leaves a field open).
fn security_group_tables(object: &Value) -> String {
    let mut rules = Table {
        headers: ["DIRECTION", "PROTOCOL", "PORTS", "REMOTE", "DESCRIPTION"]
            .map(String::from)
            .to_vec(),
        rows: Vec::new(),
    };
    for r in object["spec"]["rules"].as_array().into_iter().flatten() {
        let remote = match (
            r["remote"]["cidr"].as_str(),
            r["remote"]["securityGroup"].as_str(),
        ) {
            (Some(cidr), _) => cidr.to_string(),
            (None, Some(group)) => format!("group {group}"),
            _ => "anywhere".to_string(),
        };
        let or_any = |v: String| if v.is_empty() { "any".to_string() } else { v };
        rules.rows.push(vec![
            field(r, "direction"),
            field(r, "protocol"),
            or_any(field(r, "ports")),
            remote,
            field(r, "description"),
        ]);
    }
    let mut out = if rules.rows.is_empty() {
        "Rules:        <none: members receive and send nothing but DHCP>\n".to_string()
    } else {
        format!("Rules:\n{}", indent(&rules.render(true), 2))
    };
    let mut members = Table {
        headers: ["VM", "NIC", "ADDRESSES"].map(String::from).to_vec(),
        rows: Vec::new(),
    };
    for m in object["status"]["members"].as_array().into_iter().flatten() {
        let addresses: Vec<&str> = m["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        members
            .rows
            .push(vec![field(m, "vm"), field(m, "nic"), addresses.join(",")]);
    }
    if members.rows.is_empty() {
        out.push_str("Members:      <none>\n");
    } else {
        out.push_str(&format!("Members:\n{}", indent(&members.render(true), 2)));
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
        headers: ["TYPE", "REASON", "LAST SEEN", "COUNT", "FROM", "MESSAGE"]
            .map(String::from)
            .to_vec(),
        rows: Vec::new(),
    };
    for e in sorted {
        let count = field(e, "count");
        let mut from = field(e, "reportingInstance");
        if from.is_empty() {
            from = field(e, "source.host");
        }
        t.rows.push(vec![
            field(e, "type"),
            field(e, "reason"),
            age(&last_seen(e)),
            if count.is_empty() { "1".into() } else { count },
            from,
            field(e, "message"),
        ]);
    }
    format!("Events:\n{}", indent(&t.render(true), 2))
}

fn last_seen(event: &Value) -> String {
    [
        "lastTimestamp",
        "eventTime",
        "firstTimestamp",
        "metadata.creationTimestamp",
    ]
    .iter()
    .map(|p| field(event, p))
    .find(|v| !v.is_empty())
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_security_group_is_described_with_its_rules_and_members() {
        let kind = flotilla_types::registry::lookup("sg").unwrap();
        let group = serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": {"rules": [
                {"direction": "ingress", "protocol": "tcp", "ports": "443", "remote": {"cidr": "0.0.0.0/0"}, "description": "https"},
                {"direction": "ingress", "protocol": "any", "remote": {"securityGroup": "web"}},
                {"direction": "egress", "protocol": "any"},
            ]},
            "status": {"memberCount": 1, "members": [{"vm": "web-1", "nic": "nic0", "addresses": ["10.0.0.2", "10.0.0.100"]}]}
        });
        let text = describe(kind, &group);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        for row in [
            vec!["ingress", "tcp", "443", "0.0.0.0/0", "https"],
            vec!["ingress", "any", "any", "group", "web"],
            vec!["egress", "any", "any", "anywhere"],
            vec!["web-1", "nic0", "10.0.0.2,10.0.0.100"],
        ] {
            assert!(lines.contains(&row), "{row:?} in:\n{text}");
        }
        let empty = serde_json::json!({"metadata": {"name": "closed"}, "spec": {}});
        assert!(describe(kind, &empty).contains("nothing but DHCP"));
    }
}
