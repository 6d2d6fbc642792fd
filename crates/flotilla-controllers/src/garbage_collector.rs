//! Garbage collection: an object whose every owner (by `ownerReferences` uid) is gone is deleted,
//! in the background, as Kubernetes does by default. Sweeps run after deletions (batched) and
//! periodically, so deletions missed while the server was down are still cleaned up.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_server::objects::{ListOptions, Objects};
use flotilla_types::registry::KINDS;
use serde_json::Value;

/// One sweep: deletes orphans; returns how many.
pub async fn sweep(objects: &Objects) -> Result<usize, flotilla_server::ApiError> {
    let mut all: Vec<(&'static flotilla_types::KindInfo, Value)> = Vec::new();
    for kind in KINDS {
        let list = objects.list(kind, None, &ListOptions::default()).await?;
        for raw in list.items {
            let v: Value = serde_json::from_slice(&raw)
                .map_err(|e| flotilla_server::ApiError::internal(e.to_string()))?;
            all.push((kind, v));
        }
    }
    let uids: HashSet<&str> = all
        .iter()
        .filter_map(|(_, v)| v["metadata"]["uid"].as_str())
        .collect();
    let mut deleted = 0;
    for (kind, v) in &all {
        let Some(owners) = v["metadata"]["ownerReferences"].as_array() else {
            continue;
        };
        if owners.is_empty()
            || owners
                .iter()
                .any(|o| o["uid"].as_str().is_some_and(|u| uids.contains(u)))
        {
            continue;
        }
        let (ns, name) = (
            v["metadata"]["namespace"].as_str(),
            v["metadata"]["name"].as_str().unwrap_or_default(),
        );
        if v["metadata"].get("deletionTimestamp").is_some() {
            continue;
        }
        match objects.delete(kind, ns, name).await {
            Ok(_) => {
                deleted += 1;
                tracing::info!(
                    kind = kind.kind,
                    name,
                    "deleted an object whose owners are gone"
                );
            }
            Err(e) if e.code() == 404 => {}
            Err(e) => {
                tracing::warn!(kind = kind.kind, name, error = %e, "could not delete an orphan")
            }
        }
    }
    Ok(deleted)
}

pub async fn run(objects: Objects, resync: Duration) {
    let mut events = None;
    loop {
        if events.is_none() {
            events = objects.store().watch("/registry/", 0).await.ok();
        }
        if let Err(e) = sweep(&objects).await {
            tracing::warn!(error = %e, "garbage collection sweep failed");
        }
        match events.as_mut() {
            // Only deletions can orphan anything; let a burst of them settle.
            Some(stream) => {
                if crate::wait_for_change(stream, resync, |ev| {
                    ev.kind == flotilla_store::EventKind::Delete
                })
                .await
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                } else {
                    events = None;
                }
            }
            None => tokio::time::sleep(resync).await,
        }
    }
}
