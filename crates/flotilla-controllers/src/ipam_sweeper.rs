//! Releases what deleted objects held in the networks' records: the ports (MACs and addresses)
//! of VMs that no longer exist, and, for a Network being deleted that no VM uses any more, its
//! VNI and its record, then its finalizer. Level-triggered: every pass compares the records with
//! what exists, so a crash of the server at any point is mended by the next pass.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_ipam::{Allocations, Vnis};
use flotilla_server::ipam::{ports_key, PORTS_PREFIX, VNI_KEY};
use flotilla_server::objects::{ListOptions, Objects, PatchBody, Subresource};
use flotilla_server::ApiError;
use flotilla_store::{Compare, KeyValue, Op, RangeRequest, Txn};
use flotilla_types::registry::by_kind;
use serde_json::{json, Value};

/// The finalizer a Network carries until its VNI and record are released.
pub const NETWORK_FINALIZER: &str = flotilla_server::ipam::NETWORK_FINALIZER;

/// What one pass released.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub ports: usize,
    pub networks: usize,
}

/// A pass every `every` (and one at start).
pub async fn run(objects: Objects, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match sweep(&objects).await {
            Ok(r) if r == Released::default() => {}
            Ok(r) => tracing::debug!(ports = r.ports, networks = r.networks, "released"),
            Err(e) => tracing::warn!(error = %e, "cannot release addresses; trying again later"),
        }
    }
}

/// One pass.
pub async fn sweep(objects: &Objects) -> Result<Released, ApiError> {
    let store = objects.store();
    let mut released = Released::default();
    // Records first, VMs second: a port read before its VM was found missing is garbage (a port
    // is written in the same transaction as its VM, so a live VM's port is never missed).
    let records = store
        .range(RangeRequest {
            start: PORTS_PREFIX.to_string(),
            end: Some(flotilla_store::prefix_end(PORTS_PREFIX)),
            limit: 0,
            revision: 0,
        })
        .await?;
    let vm_kind = by_kind("VirtualMachine").expect("registered");
    let live: HashSet<String> = objects
        .list(vm_kind, None, &ListOptions::default())
        .await?
        .items
        .iter()
        .filter_map(|raw| serde_json::from_slice::<Value>(raw).ok())
        .filter_map(|vm| vm["metadata"]["uid"].as_str().map(str::to_string))
        .collect();
    for kv in records.kvs {
        let mut record = parse(&kv)?;
        let gone: Vec<String> = record
            .ports
            .values()
            .filter(|p| !live.contains(&p.uid))
            .map(|p| p.uid.clone())
            .collect();
        if gone.is_empty() {
            continue;
        }
        for uid in &gone {
            record.release(uid);
        }
        let txn = Txn::new()
            .when(Compare::mod_revision(&kv.key, kv.mod_revision))
            .and_then(Op::put(
                &kv.key,
                serde_json::to_vec(&record).expect("serialises"),
            ));
        // Lost to a concurrent create: the next pass looks again.
        if store.txn(txn).await?.succeeded {
            released.ports += gone.len();
        }
    }
    released.networks = finish_deleted_networks(objects).await?;
    Ok(released)
}

fn parse(kv: &KeyValue) -> Result<Allocations, ApiError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("the record {} is damaged: {e}", kv.key)))
}

/// Networks being deleted whose record holds no port: their VNI and record go, then their
/// finalizer. Returns how many finished.
async fn finish_deleted_networks(objects: &Objects) -> Result<usize, ApiError> {
    let store = objects.store();
    let kind = by_kind("Network").expect("registered");
    let mut finished = 0;
    for raw in objects
        .list(kind, None, &ListOptions::default())
        .await?
        .items
    {
        let network: Value = serde_json::from_slice(&raw)
            .map_err(|e| ApiError::internal(format!("a stored Network: {e}")))?;
        let meta = &network["metadata"];
        let finalizers: Vec<&str> = meta["finalizers"]
            .as_array()
            .map(|f| f.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if meta.get("deletionTimestamp").is_none() || !finalizers.contains(&NETWORK_FINALIZER) {
            continue;
        }
        let (project, name, uid) = (
            meta["namespace"].as_str().unwrap_or_default(),
            meta["name"].as_str().unwrap_or_default(),
            meta["uid"].as_str().unwrap_or_default(),
        );
        let key = ports_key(project, name);
        let record = store.get(&key).await?;
        if let Some(kv) = &record {
            if !parse(kv)?.ports.is_empty() {
                continue;
            }
            let txn = Txn::new()
                .when(Compare::mod_revision(&key, kv.mod_revision))
                .and_then(Op::delete(&key));
            if !store.txn(txn).await?.succeeded {
                continue;
            }
        }
        // The VNI, by compare-and-swap (other networks take and release theirs meanwhile).
        loop {
            let kv = store.get(VNI_KEY).await?;
            let Some(kv) = kv else { break };
            let mut vnis: Vnis = serde_json::from_slice(&kv.value)
                .map_err(|e| ApiError::internal(format!("the VNI record is damaged: {e}")))?;
            if !vnis.release(uid) {
                break;
            }
            let txn = Txn::new()
                .when(Compare::mod_revision(VNI_KEY, kv.mod_revision))
                .and_then(Op::put(
                    VNI_KEY,
                    serde_json::to_vec(&vnis).expect("serialises"),
                ));
            if store.txn(txn).await?.succeeded {
                break;
            }
        }
        let rest: Vec<&str> = finalizers
            .into_iter()
            .filter(|f| *f != NETWORK_FINALIZER)
            .collect();
        let patch = json!({"metadata": {
            "finalizers": rest, "resourceVersion": meta["resourceVersion"].clone(),
        }});
        match objects
            .patch(
                kind,
                Some(project),
                name,
                PatchBody::Merge(patch),
                Subresource::Main,
            )
            .await
        {
            Ok(_) => finished += 1,
            Err(e) if e.code() == 404 || e.code() == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(finished)
}
