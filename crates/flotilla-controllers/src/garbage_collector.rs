//! Garbage collection: an object whose every owner (by `ownerReferences` uid) is gone is deleted,
//! in the background, as Kubernetes does by default. Owners deleted with the Foreground policy
//! (finalizer `foregroundDeletion`) stay until their dependents are gone; owners deleted with
//! the Orphan policy (finalizer `orphan`) first release their dependents (their owner reference
//! is removed). Sweeps run after deletions (batched) and periodically, so deletions missed while
//! the server was down are still cleaned up.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_server::objects::{
    ListOptions, Objects, PatchBody, Subresource, FOREGROUND_FINALIZER, ORPHAN_FINALIZER,
};
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
    propagate(objects, &all).await;
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

fn has_finalizer(v: &Value, f: &str) -> bool {
    v["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|l| l.iter().any(|x| x == f))
}

/// The objects naming `uid` as an owner.
fn dependents<'a>(
    all: &'a [(&'static flotilla_types::KindInfo, Value)],
    uid: &'a str,
) -> impl Iterator<Item = &'a (&'static flotilla_types::KindInfo, Value)> {
    all.iter().filter(move |(_, v)| {
        v["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|o| o.iter().any(|r| r["uid"] == uid))
    })
}

/// A merge patch of `v`'s metadata, guarded by its resourceVersion (a race is retried by the
/// next sweep).
async fn patch_metadata(
    objects: &Objects,
    kind: &flotilla_types::KindInfo,
    v: &Value,
    metadata: Value,
) -> Result<(), flotilla_server::ApiError> {
    let mut metadata = metadata;
    metadata["resourceVersion"] = v["metadata"]["resourceVersion"].clone();
    let (ns, name) = (
        v["metadata"]["namespace"].as_str(),
        v["metadata"]["name"].as_str().unwrap_or_default(),
    );
    objects
        .patch(
            kind,
            ns,
            name,
            PatchBody::Merge(serde_json::json!({ "metadata": metadata })),
            Subresource::Main,
        )
        .await
        .map(|_| ())
}

/// Carries out Foreground and Orphan deletions: deletes (or releases) the dependents of owners
/// being deleted with those policies, and lets the owners go once that is done.
async fn propagate(objects: &Objects, all: &[(&'static flotilla_types::KindInfo, Value)]) {
    for (kind, owner) in all {
        if owner["metadata"].get("deletionTimestamp").is_none() {
            continue;
        }
        let uid = owner["metadata"]["uid"].as_str().unwrap_or_default();
        let name = owner["metadata"]["name"].as_str().unwrap_or_default();
        let (foreground, orphan) = (
            has_finalizer(owner, FOREGROUND_FINALIZER),
            has_finalizer(owner, ORPHAN_FINALIZER),
        );
        if !foreground && !orphan {
            continue;
        }
        let (mut remaining, mut failed) = (0, false);
        for (dkind, dep) in dependents(all, uid) {
            remaining += 1;
            let (ns, dname) = (
                dep["metadata"]["namespace"].as_str(),
                dep["metadata"]["name"].as_str().unwrap_or_default(),
            );
            let result = if orphan {
                let kept: Vec<&Value> = dep["metadata"]["ownerReferences"]
                    .as_array()
                    .map(|o| o.iter().filter(|r| r["uid"] != uid).collect())
                    .unwrap_or_default();
                patch_metadata(
                    objects,
                    dkind,
                    dep,
                    serde_json::json!({"ownerReferences": kept}),
                )
                .await
            } else if dep["metadata"].get("deletionTimestamp").is_none() {
                objects.delete(dkind, ns, dname).await.map(|_| ())
            } else {
                Ok(())
            };
            if let Err(e) = result {
                if e.code() != 404 {
                    failed = true;
                    tracing::warn!(owner = name, dependent = dname, error = %e, "cannot propagate a deletion");
                }
            }
        }
        // Orphaned dependents are released in this pass (if every release landed); foreground
        // ones must be gone first.
        if (orphan && !failed) || remaining == 0 {
            let done = if orphan {
                ORPHAN_FINALIZER
            } else {
                FOREGROUND_FINALIZER
            };
            let finalizers: Vec<&Value> = owner["metadata"]["finalizers"]
                .as_array()
                .map(|f| f.iter().filter(|x| *x != done).collect())
                .unwrap_or_default();
            match patch_metadata(
                objects,
                kind,
                owner,
                serde_json::json!({"finalizers": finalizers}),
            )
            .await
            {
                Ok(()) => {
                    tracing::info!(kind = kind.kind, name, policy = done, "deletion propagated")
                }
                Err(e) if e.code() == 404 || e.code() == 409 => {}
                Err(e) => {
                    tracing::warn!(kind = kind.kind, name, error = %e, "cannot finish a deletion")
                }
            }
        }
    }
}

/// Whether a stored object is being deleted with the Foreground or Orphan policy (a byte
/// search: most changes are not deletions and need no parsing).
fn asks_propagation(raw: &[u8]) -> bool {
    let has = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    has(b"\"deletionTimestamp\"") && (has(FOREGROUND_FINALIZER.as_bytes()) || has(b"\"orphan\""))
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
            // Only deletions can orphan anything, and only deletions with a propagation policy
            // wait for this controller; let a burst of them settle.
            Some(stream) => {
                if crate::wait_for_change(stream, resync, |ev| {
                    ev.kind == flotilla_store::EventKind::Delete || asks_propagation(&ev.kv.value)
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
