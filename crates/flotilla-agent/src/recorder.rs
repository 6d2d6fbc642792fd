//! Events the agent records in the API (`flotilla describe` shows them): one Event object per
//! object, reason and node; when the same thing happens again its `series` counts it, as
//! Kubernetes' event recorder does, so that a repeating failure is one line, not thousands.

use std::sync::Arc;

use flotilla_client::Client;
use flotilla_types::kinds::event::truncate_note;
use flotilla_types::registry::lookup;
use flotilla_types::{EventType, ObjectReference};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Who the agent's events say reported them.
pub const REPORTING_CONTROLLER: &str = "flotilla.dev/agent";

#[derive(Clone)]
pub struct Recorder {
    client: Arc<Client>,
    node: String,
}

/// The event's name: the object's name and a hash of what makes the event this event.
fn event_name(regarding: &ObjectReference, reason: &str, node: &str) -> String {
    let digest = Sha256::digest(format!(
        "{}\n{}\n{}\n{reason}\n{node}",
        regarding.kind,
        regarding.uid.as_deref().unwrap_or(&regarding.name),
        regarding.name
    ));
    let prefix: String = regarding.name.chars().take(50).collect();
    format!(
        "{}-{}",
        prefix.trim_end_matches('-'),
        &hex::encode(digest)[..12]
    )
}

impl Recorder {
    pub fn new(client: Arc<Client>, node: &str) -> Self {
        Recorder {
            client,
            node: node.to_string(),
        }
    }

    /// Records (or counts again) an event. Never fails the caller: an event that cannot be
    /// written is logged and dropped.
    pub async fn record(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        if let Err(e) = self.try_record(regarding, type_, reason, note).await {
            tracing::debug!(object = %regarding.name, reason, error = %e, "cannot record an event");
        }
    }

    async fn try_record(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), flotilla_client::ClientError> {
        let events = lookup("event").expect("registered");
        // Events about cluster-scoped objects (nodes) are kept in the default project.
        let ns = regarding.namespace.as_deref().unwrap_or("default");
        let name = event_name(regarding, reason, &self.node);
        let now = flotilla_types::meta::now();
        let note = truncate_note(note);
        let event = json!({
            "metadata": {"name": name},
            "regarding": regarding, "type": type_, "reason": reason, "note": note,
            "reportingController": REPORTING_CONTROLLER, "reportingInstance": self.node,
            "eventTime": now,
        });
        for _ in 0..5 {
            let existing = match self.client.get(events, Some(ns), &name).await {
                Ok(e) => e,
                Err(e) if e.code() == Some(404) => {
                    match self.client.create(events, Some(ns), &event).await {
                        Ok(_) => return Ok(()),
                        Err(e) if e.code() == Some(409) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            let count = existing["series"]["count"].as_u64().unwrap_or(1) + 1;
            let patch = json!({
                "metadata": {"resourceVersion": existing["metadata"]["resourceVersion"]},
                "type": type_, "note": note,
                "series": {"count": count, "lastObservedTime": now},
            });
            match self
                .client
                .patch(events, Some(ns), &name, &patch, false)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.code(), Some(409) | Some(404)) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels_and_distinguish_reasons() {
        let vm = ObjectReference {
            kind: "VirtualMachine".into(),
            namespace: Some("default".into()),
            name: "a".repeat(63),
            uid: Some("u-1".into()),
        };
        let a = event_name(&vm, "ReconcileFailing", "node-1");
        assert!(flotilla_types::validation::is_dns_label(&a), "{a}");
        assert_ne!(a, event_name(&vm, "ImageCacheCorrupt", "node-1"));
        assert_ne!(a, event_name(&vm, "ReconcileFailing", "node-2"));
        assert_eq!(a, event_name(&vm, "ReconcileFailing", "node-1"));
    }
}
