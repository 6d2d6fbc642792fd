//! Event: something that happened to an object, worth a person's attention (an image cache entry
//! found corrupt, a VM that keeps failing to start). Shaped as Kubernetes' `events.k8s.io/v1`
//! Event: flat fields rather than spec and status, because an event is a record, not a wish.
//! Events expire (the server deletes them an hour after they were last seen, by default).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{ObjectMeta, Time};
use crate::resource::{Column, Resource};
use crate::validation::{self, FieldErrors};

/// Longest `note`, as in Kubernetes.
pub const MAX_NOTE_BYTES: usize = 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Event {
    #[serde(default = "crate::resource::api_version")]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    /// The object this event is about.
    pub regarding: ObjectReference,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: EventType,
    /// A short CamelCase word saying why, e.g. `ImageCacheCorrupt`.
    pub reason: String,
    /// What happened, for a person (at most 1 KiB).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// What reported it, e.g. `flotilla.dev/agent`.
    pub reporting_controller: String,
    /// Which instance of it, e.g. the node name of an agent.
    pub reporting_instance: String,
    /// When it first happened.
    pub event_time: Time,
    /// Set when the same event happened again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<EventSeries>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectReference {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EventType {
    Normal,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventSeries {
    /// How many times it happened, the first included.
    pub count: u32,
    pub last_observed_time: Time,
}

impl Event {
    /// When the event was last seen: the series' last observation, else its time.
    pub fn last_seen(&self) -> Time {
        self.series
            .as_ref()
            .map_or(self.event_time, |s| s.last_observed_time)
    }
}

impl Resource for Event {
    const KIND: &'static str = "Event";
    const PLURAL: &'static str = "events";
    const SINGULAR: &'static str = "event";
    const SHORT_NAMES: &'static [&'static str] = &["ev"];
    const NAMESPACED: bool = true;
    const FIELD_SELECTORS: &'static [&'static str] = &[
        "regarding.kind",
        "regarding.name",
        "regarding.uid",
        "type",
        "reason",
        "reportingInstance",
    ];
    const COLUMNS: &'static [Column] = &[
        Column {
            name: "TYPE",
            path: "type",
            wide: false,
        },
        Column {
            name: "REASON",
            path: "reason",
            wide: false,
        },
        Column {
            name: "KIND",
            path: "regarding.kind",
            wide: false,
        },
        Column {
            name: "OBJECT",
            path: "regarding.name",
            wide: false,
        },
        Column {
            name: "COUNT",
            path: "series.count",
            wide: true,
        },
        Column {
            name: "FROM",
            path: "reportingInstance",
            wide: true,
        },
        Column {
            name: "NOTE",
            path: "note",
            wide: false,
        },
    ];

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self, errs: &mut FieldErrors) {
        if self.regarding.kind.is_empty() {
            errs.push("regarding.kind", "is required");
        }
        validation::dns_label(errs, "regarding.name", &self.regarding.name);
        let reason_ok = !self.reason.is_empty()
            && self.reason.len() <= 128
            && self.reason.bytes().all(|b| b.is_ascii_alphanumeric());
        if !reason_ok {
            errs.push(
                "reason",
                "must be a CamelCase word of at most 128 letters and digits",
            );
        }
        if self.note.len() > MAX_NOTE_BYTES {
            errs.push("note", format!("must be at most {MAX_NOTE_BYTES} bytes"));
        }
        for (field, value) in [
            ("reportingController", &self.reporting_controller),
            ("reportingInstance", &self.reporting_instance),
        ] {
            if value.is_empty() || value.len() > 128 {
                errs.push(field, "is required (at most 128 characters)");
            }
        }
        if let Some(s) = &self.series {
            if s.count < 2 {
                errs.push("series.count", "a series counts at least 2 occurrences");
            }
        }
    }
}

/// Shortens `note` to at most [`MAX_NOTE_BYTES`] on a character boundary, marking the cut.
pub fn truncate_note(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_string();
    }
    let mut end = MAX_NOTE_BYTES - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "web-1"},
            "regarding": {"kind": "VirtualMachine", "namespace": "default", "name": "web", "uid": "u"},
            "type": "Warning", "reason": "ReconcileFailing", "note": "it broke",
            "reportingController": "flotilla.dev/agent", "reportingInstance": "node-1",
            "eventTime": "2026-01-01T00:00:00Z"
        })
    }

    #[test]
    fn a_valid_event_decodes_and_bad_fields_are_named() {
        let e: Event = crate::decode(&event()).unwrap();
        assert_eq!(e.type_, EventType::Warning);
        assert_eq!(e.last_seen(), e.event_time);
        let mut bad = event();
        bad["reason"] = "not a word".into();
        bad["type"] = "Fatal".into();
        let errs = crate::decode::<Event>(&bad).unwrap_err();
        assert!(errs.0.iter().any(|e| e.field == "type"), "{errs:?}");
        bad["type"] = "Normal".into();
        let errs = crate::decode::<Event>(&bad).unwrap_err();
        assert!(errs.0.iter().any(|e| e.field == "reason"), "{errs:?}");
    }

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_NOTE_BYTES);
        let cut = truncate_note(&long);
        assert!(cut.len() <= MAX_NOTE_BYTES && cut.ends_with("..."));
        assert_eq!(truncate_note("short"), "short");
    }
}
