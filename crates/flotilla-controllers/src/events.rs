//! Events the controllers record (Scheduled, FailedScheduling, NodeReady, NodeNotReady): the
//! same Event objects the agents write through the API, written here straight through
//! [`Objects`], counted again (`count`, `lastTimestamp`) when the same thing happens again.

use flotilla_server::objects::{Objects, PatchBody, Subresource};
use flotilla_types::kinds::event::repeat_patch;
use flotilla_types::registry::by_kind;
use flotilla_types::{Event, EventType, ObjectReference};

/// Who the controllers' events say reported them.
pub const REPORTING_COMPONENT: &str = "flotilla.dev/controllers";

#[derive(Clone)]
pub struct Recorder {
    objects: Objects,
    host: String,
}

impl Recorder {
    pub fn new(objects: Objects) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "flotilla".into());
        Recorder { objects, host }
    }

    /// Records (or counts again) an event; a failure is logged, never returned.
    pub async fn record(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) {
        let kind = by_kind("Event").expect("registered");
        let event = Event::new(
            regarding,
            type_,
            reason,
            message,
            REPORTING_COMPONENT,
            &self.host,
        );
        let (ns, name) = (
            event.metadata.namespace.clone(),
            event.metadata.name.clone(),
        );
        let body = serde_json::to_value(&event).expect("serialises");
        for _ in 0..5 {
            let existing = match self.objects.get(kind, ns.as_deref(), &name).await {
                Ok(stored) => stored.to_value(),
                Err(e) if e.code() == 404 => {
                    match self.objects.create(kind, ns.as_deref(), body.clone()).await {
                        Ok(_) => return,
                        Err(e) if e.code() == 409 => continue,
                        Err(e) => {
                            tracing::debug!(reason, error = %e, "cannot record an event");
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(reason, error = %e, "cannot record an event");
                    return;
                }
            };
            let patch = PatchBody::Merge(repeat_patch(&existing, type_, message));
            match self
                .objects
                .patch(kind, ns.as_deref(), &name, patch, Subresource::Main)
                .await
            {
                Ok(_) => return,
                Err(e) if e.code() == 409 || e.code() == 404 => continue,
                Err(e) => {
                    tracing::debug!(reason, error = %e, "cannot record an event");
                    return;
                }
            }
        }
    }
}

/// A reference to a stored object (as JSON), for the events about it.
pub fn reference(kind: &flotilla_types::KindInfo, object: &serde_json::Value) -> ObjectReference {
    let meta = &object["metadata"];
    ObjectReference {
        kind: kind.kind.to_string(),
        api_version: Some(kind.api_version.to_string()),
        namespace: meta["namespace"].as_str().map(str::to_string),
        name: meta["name"].as_str().unwrap_or_default().to_string(),
        uid: meta["uid"].as_str().map(str::to_string),
        ..Default::default()
    }
}
