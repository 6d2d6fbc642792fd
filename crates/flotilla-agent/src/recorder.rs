//! Events the agent records in the API (`kubectl get events`, `flotilla describe`): one Event
//! object per object, reason and node, whose `count` and `lastTimestamp` say when it happened
//! again, as Kubernetes' event recorder does, so that a repeating failure is one line, not
//! thousands.

use std::sync::Arc;

use flotilla_client::Client;
use flotilla_types::kinds::event::repeat_patch;
use flotilla_types::registry::lookup;
use flotilla_types::{Event, EventType, ObjectReference};

/// Who the agent's events say reported them.
pub const REPORTING_COMPONENT: &str = "flotilla.dev/agent";

#[derive(Clone)]
pub struct Recorder {
    client: Arc<Client>,
    node: String,
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
        message: &str,
    ) {
        if let Err(e) = self.try_record(regarding, type_, reason, message).await {
            tracing::debug!(object = %regarding.name, reason, error = %e, "cannot record an event");
        }
    }

    async fn try_record(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) -> Result<(), flotilla_client::ClientError> {
        let events = lookup("event").expect("registered");
        let event = Event::new(
            regarding,
            type_,
            reason,
            message,
            REPORTING_COMPONENT,
            &self.node,
        );
        let ns = event.metadata.namespace.clone();
        let name = event.metadata.name.clone();
        let body = serde_json::to_value(&event).expect("serialises");
        for _ in 0..5 {
            let existing = match self.client.get(events, ns.as_deref(), &name).await {
                Ok(e) => e,
                Err(e) if e.code() == Some(404) => {
                    match self.client.create(events, ns.as_deref(), &body).await {
                        Ok(_) => return Ok(()),
                        Err(e) if e.code() == Some(409) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            let patch = repeat_patch(&existing, type_, message);
            match self
                .client
                .patch(events, ns.as_deref(), &name, &patch, false)
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
