//! Event: something that happened to an object, worth a person's attention (a VM scheduled,
//! started, stopped, failing; an image cache entry found corrupt; a node gone NotReady). Served
//! as Kubernetes' core `v1` Event at `/api/v1/namespaces/{project}/events`, so that `kubectl get
//! events` and `kubectl describe` show them; flat fields rather than spec and status, because an
//! event is a record, not a wish. One object per (object, reason, reporter) counts repeats in
//! `count` and `lastTimestamp`. Events expire (by default an hour after they were last seen).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{ObjectMeta, Time};
use crate::resource::{Column, Resource};
use crate::validation::{self, FieldErrors};

/// Longest `message` kept, as in Kubernetes.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// Events about cluster-scoped objects (nodes) are kept in this project, as Kubernetes keeps
/// them in `default`.
pub const CLUSTER_EVENTS_PROJECT: &str = "default";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Event {
    /// `v1`.
    #[serde(default = "core_v1")]
    pub api_version: String,
    /// `Event`.
    #[serde(default)]
    pub kind: String,
    /// The event's metadata (its name identifies the object, reason and reporter).
    pub metadata: ObjectMeta,
    /// The object this event is about.
    pub involved_object: ObjectReference,
    /// A short CamelCase word saying why, e.g. `Scheduled`, `FailedScheduling`, `Started`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9]{1,128}$"))]
    pub reason: String,
    /// What happened, for a person (at most 1024 characters).
    #[schemars(length(max = 1024))]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: EventType,
    /// Who reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<EventSource>,
    /// When it first happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_timestamp: Option<Time>,
    /// When it last happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_timestamp: Option<Time>,
    /// How many times it happened.
    #[schemars(range(min = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// The controller that reported it, e.g. `flotilla.dev/agent`.
    #[schemars(length(max = 128))]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reporting_component: String,
    /// Which instance of it, e.g. the agent's node.
    #[schemars(length(max = 128))]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reporting_instance: String,
    /// When it first happened, with microseconds (events.k8s.io's field).
    #[schemars(with = "Option<Time>")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    /// What was done, e.g. `Binding`, `Starting`, `Killing`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub action: String,
}

fn core_v1() -> String {
    "v1".to_string()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectReference {
    /// The object's kind.
    #[schemars(length(min = 1))]
    pub kind: String,
    /// The object's project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The object's name.
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub name: String,
    /// The object's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The object's apiVersion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// The object's resourceVersion when the event happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// The part of the object the event is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_path: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventSource {
    /// The component that reported the event.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub component: String,
    /// The host (node) it was reported from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EventType {
    Normal,
    Warning,
}

impl Event {
    /// A new event (count 1, first and last seen now) reported by `component` on `host`.
    pub fn new(
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
        component: &str,
        host: &str,
    ) -> Event {
        let now = crate::meta::now();
        Event {
            api_version: core_v1(),
            kind: "Event".into(),
            metadata: ObjectMeta {
                name: event_name(regarding, reason, host),
                namespace: Some(
                    regarding
                        .namespace
                        .clone()
                        .unwrap_or_else(|| CLUSTER_EVENTS_PROJECT.into()),
                ),
                ..Default::default()
            },
            involved_object: regarding.clone(),
            reason: reason.to_string(),
            message: truncate_message(message),
            type_,
            source: Some(EventSource {
                component: component.to_string(),
                host: host.to_string(),
            }),
            first_timestamp: Some(now),
            last_timestamp: Some(now),
            count: Some(1),
            reporting_component: component.to_string(),
            reporting_instance: host.to_string(),
            event_time: Some(
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
            action: String::new(),
        }
    }

    /// When the event was last seen.
    pub fn last_seen(&self) -> Option<Time> {
        self.last_timestamp.or(self.first_timestamp).or_else(|| {
            self.event_time
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc))
        })
    }
}

/// The merge patch that counts `existing` (a stored Event, as JSON) once more, with the latest
/// message and type; guarded by its resourceVersion.
pub fn repeat_patch(
    existing: &serde_json::Value,
    type_: EventType,
    message: &str,
) -> serde_json::Value {
    let count = existing["count"].as_u64().unwrap_or(1) + 1;
    serde_json::json!({
        "metadata": {"resourceVersion": existing["metadata"]["resourceVersion"]},
        "type": type_, "message": truncate_message(message),
        "count": count, "lastTimestamp": crate::meta::now(),
    })
}

/// The name of the event about `regarding` for `reason` reported from `host`: the object's name
/// and a hash of what makes the event this event, so that a repeat finds the same object.
pub fn event_name(regarding: &ObjectReference, reason: &str, host: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!(
        "{}\n{}\n{}\n{reason}\n{host}",
        regarding.kind,
        regarding.uid.as_deref().unwrap_or(&regarding.name),
        regarding.name
    ));
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let prefix: String = regarding.name.chars().take(50).collect();
    format!("{}-{hex}", prefix.trim_end_matches('-'))
}

impl Resource for Event {
    const KIND: &'static str = "Event";
    const PLURAL: &'static str = "events";
    const SINGULAR: &'static str = "event";
    const SHORT_NAMES: &'static [&'static str] = &["ev"];
    const NAMESPACED: bool = true;
    const API_VERSION: &'static str = "v1";
    const HAS_STATUS: bool = false;
    const FIELD_SELECTORS: &'static [&'static str] = &[
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "type",
        "source",
        "reportingComponent",
    ];
    const COLUMNS: &'static [Column] = &[
        Column {
            name: "LAST SEEN",
            path: "lastTimestamp",
            wide: false,
            age: true,
        },
        Column {
            name: "TYPE",
            path: "type",
            wide: false,
            age: false,
        },
        Column {
            name: "REASON",
            path: "reason",
            wide: false,
            age: false,
        },
        Column {
            name: "OBJECT",
            path: "involvedObject.name",
            wide: false,
            age: false,
        },
        Column {
            name: "KIND",
            path: "involvedObject.kind",
            wide: true,
            age: false,
        },
        Column {
            name: "COUNT",
            path: "count",
            wide: true,
            age: false,
        },
        Column {
            name: "FROM",
            path: "reportingInstance",
            wide: true,
            age: false,
        },
        Column {
            name: "MESSAGE",
            path: "message",
            wide: false,
            age: false,
        },
    ];

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self, errs: &mut FieldErrors) {
        if self.involved_object.kind.is_empty() {
            errs.push("involvedObject.kind", "is required");
        }
        validation::dns_label(errs, "involvedObject.name", &self.involved_object.name);
        let reason_ok = !self.reason.is_empty()
            && self.reason.len() <= 128
            && self.reason.bytes().all(|b| b.is_ascii_alphanumeric());
        if !reason_ok {
            errs.push(
                "reason",
                "must be a CamelCase word of at most 128 letters and digits",
            );
        }
        if self.message.chars().count() > MAX_MESSAGE_BYTES {
            errs.push(
                "message",
                format!("must be at most {MAX_MESSAGE_BYTES} characters"),
            );
        }
        if self.count == Some(0) {
            errs.push("count", "must be at least 1");
        }
        if self.reporting_instance.chars().count() > 128
            || self.reporting_component.chars().count() > 128
        {
            errs.push("reportingInstance", "at most 128 characters");
        }
        if let Some(t) = &self.event_time {
            if chrono::DateTime::parse_from_rfc3339(t).is_err() {
                errs.push("eventTime", "must be an RFC 3339 time");
            }
        }
    }
}

/// Shortens `message` to at most [`MAX_MESSAGE_BYTES`] on a character boundary, marking the cut.
pub fn truncate_message(message: &str) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE_BYTES - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> ObjectReference {
        ObjectReference {
            kind: "VirtualMachine".into(),
            namespace: Some("default".into()),
            name: "web".into(),
            uid: Some("u-1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_new_event_is_valid_and_bad_fields_are_named() {
        let e = Event::new(
            &vm(),
            EventType::Warning,
            "Failed",
            "it broke",
            "flotilla.dev/agent",
            "node-1",
        );
        let value = serde_json::to_value(&e).unwrap();
        let decoded: Event = crate::decode(&value).unwrap();
        assert_eq!(decoded.count, Some(1));
        assert_eq!(decoded.last_seen(), decoded.first_timestamp);
        assert_eq!(value["apiVersion"], "v1");
        assert_eq!(value["involvedObject"]["name"], "web");
        let mut bad = value.clone();
        bad["reason"] = "not a word".into();
        bad["type"] = "Fatal".into();
        let errs = crate::decode::<Event>(&bad).unwrap_err();
        assert!(errs.0.iter().any(|e| e.field == "type"), "{errs:?}");
    }

    #[test]
    fn names_are_dns_labels_and_tell_reasons_and_reporters_apart() {
        let long = ObjectReference {
            name: "a".repeat(63),
            ..vm()
        };
        let a = event_name(&long, "Failed", "node-1");
        assert!(validation::is_dns_label(&a), "{a}");
        assert_ne!(a, event_name(&long, "Started", "node-1"));
        assert_ne!(a, event_name(&long, "Failed", "node-2"));
        assert_eq!(a, event_name(&long, "Failed", "node-1"));
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = truncate_message(&long);
        assert!(cut.len() <= MAX_MESSAGE_BYTES && cut.ends_with("..."));
        assert_eq!(truncate_message("short"), "short");
    }
}
