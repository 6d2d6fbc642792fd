//! Node lifecycle: a node is Ready while its agent renews the heartbeat Lease named after it,
//! and Unknown once `grace` has passed without a renewal. This controller alone writes the
//! node's `Ready` condition.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use flotilla_server::objects::{ListOptions, Objects, PatchBody};
use flotilla_server::Subresource;
use flotilla_types::meta::now;
use flotilla_types::registry;
use serde_json::{json, Value};

/// Whether the lease shows a live agent at `now`.
pub fn is_fresh(lease: Option<&Value>, grace: Duration, at: chrono::DateTime<Utc>) -> bool {
    let renewed = lease
        .and_then(|l| l["spec"]["renewTime"].as_str())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    match renewed {
        Some(t) => at
            .signed_duration_since(t)
            .to_std()
            .map_or(true, |age| age <= grace),
        None => false,
    }
}

fn items(raw: Vec<Vec<u8>>) -> Vec<Value> {
    raw.into_iter()
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// One pass over every node; returns how many changed readiness.
pub async fn sync(objects: &Objects, grace: Duration) -> Result<usize, flotilla_server::ApiError> {
    let (nodes_kind, leases_kind) = (
        registry::by_kind("Node").unwrap(),
        registry::by_kind("Lease").unwrap(),
    );
    let nodes = items(
        objects
            .list(nodes_kind, None, &ListOptions::default())
            .await?
            .items,
    );
    let leases: HashMap<String, Value> = items(
        objects
            .list(leases_kind, None, &ListOptions::default())
            .await?
            .items,
    )
    .into_iter()
    .map(|l| {
        (
            l["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            l,
        )
    })
    .collect();
    let mut changed = 0;
    for node in nodes {
        let name = node["metadata"]["name"].as_str().unwrap_or_default();
        let fresh = is_fresh(leases.get(name), grace, Utc::now());
        let mut conditions: Vec<Value> = node["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let current = conditions
            .iter()
            .find(|c| c["type"] == "Ready")
            .and_then(|c| c["status"].as_str())
            .unwrap_or("");
        let (status, reason, message) = if fresh {
            (
                "True",
                "AgentHeartbeat",
                "the agent is renewing its heartbeat lease".to_string(),
            )
        } else {
            (
                "Unknown",
                "NodeStatusUnknown",
                format!(
                    "the agent has not renewed its heartbeat lease for more than {}s",
                    grace.as_secs()
                ),
            )
        };
        if current == status {
            continue;
        }
        conditions.retain(|c| c["type"] != "Ready");
        conditions.push(json!({"type": "Ready", "status": status, "reason": reason, "message": message, "lastTransitionTime": now()}));
        let patch = PatchBody::Merge(json!({"status": {"conditions": conditions}}));
        match objects
            .patch(nodes_kind, None, name, patch, Subresource::Status)
            .await
        {
            Ok(_) => {
                changed += 1;
                tracing::info!(node = name, ready = status, "node readiness changed");
                let (type_, event) = if status == "True" {
                    (flotilla_types::EventType::Normal, "NodeReady")
                } else {
                    (flotilla_types::EventType::Warning, "NodeNotReady")
                };
                crate::events::Recorder::new(objects.clone())
                    .record(
                        &crate::events::reference(nodes_kind, &node),
                        type_,
                        event,
                        &message,
                    )
                    .await;
            }
            Err(e) => tracing::warn!(node = name, error = %e, "could not update node readiness"),
        }
    }
    Ok(changed)
}

pub async fn run(objects: Objects, grace: Duration) {
    let mut tick = tokio::time::interval(
        Duration::from_secs(1)
            .min(grace / 2)
            .max(Duration::from_millis(100)),
    );
    loop {
        tick.tick().await;
        if let Err(e) = sync(&objects, grace).await {
            tracing::warn!(error = %e, "node lifecycle pass failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_follows_the_renew_time() {
        let now = Utc::now();
        let lease = |secs_ago: i64| json!({"spec": {"renewTime": (now - chrono::Duration::seconds(secs_ago)).to_rfc3339()}});
        let grace = Duration::from_secs(10);
        assert!(is_fresh(Some(&lease(3)), grace, now));
        assert!(!is_fresh(Some(&lease(11)), grace, now));
        assert!(!is_fresh(None, grace, now));
        assert!(!is_fresh(Some(&json!({"spec": {}})), grace, now));
    }
}
