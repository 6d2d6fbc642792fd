//! Releases what deleted objects held on the networks: the ports (MACs) and addresses of VMs
//! that no longer exist, and, for a Network being deleted that no VM uses any more, its VNI,
//! then its finalizer. Level-triggered: every pass compares the records with what exists, so a
//! crash of the server at any point is mended by the next pass.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_ipam::{Port, Vnis};
use flotilla_server::ipam::{addresses_prefix, ports_prefix, PORTS_PREFIX, VNI_KEY};
use flotilla_server::objects::{ListOptions, Objects, PatchBody, Subresource};
use flotilla_server::ApiError;
use flotilla_store::{Compare, KeyValue, Op, RangeRequest, Store, Txn};
use flotilla_types::registry::by_kind;
use serde_json::{json, Value};

/// The finalizer a Network carries until its VNI and records are released.
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

async fn range(store: &dyn Store, prefix: &str) -> Result<Vec<KeyValue>, ApiError> {
    Ok(store.range(RangeRequest::prefix(prefix)).await?.kvs)
}

/// One pass.
pub async fn sweep(objects: &Objects) -> Result<Released, ApiError> {
    let store = objects.store().as_ref();
    let mut released = Released::default();
    // Ports first, VMs second: a port read before its VM was found missing is garbage (a port is
    // written in the same transaction as its VM, so a live VM's port is never taken for one).
    let ports = range(store, PORTS_PREFIX).await?;
    // Ports are held by VMs, routers and floating IPs.
    let mut live: HashSet<String> = HashSet::new();
    for kind in ["VirtualMachine", "Router", "FloatingIP"] {
        let kind = by_kind(kind).expect("registered");
        live.extend(
            objects
                .list(kind, None, &ListOptions::default())
                .await?
                .items
                .iter()
                .filter_map(|raw| serde_json::from_slice::<Value>(raw).ok())
                .filter_map(|o| o["metadata"]["uid"].as_str().map(str::to_string)),
        );
    }
    for kv in ports {
        let port: Port = serde_json::from_slice(&kv.value).map_err(|e| {
            ApiError::internal(format!("the port record {} is damaged: {e}", kv.key))
        })?;
        if live.contains(&port.uid) {
            continue;
        }
        // <project>/<network>/<mac>
        let mut path = kv.key[PORTS_PREFIX.len()..].splitn(3, '/');
        let (Some(project), Some(network)) = (path.next(), path.next()) else {
            continue;
        };
        let mut txn = Txn::new()
            .when(Compare::mod_revision(&kv.key, kv.mod_revision))
            .and_then(Op::delete(&kv.key));
        if let Some(ip) = port.ip {
            txn = txn.and_then(Op::delete(format!(
                "{}{ip}",
                addresses_prefix(project, network)
            )));
        }
        if store.txn(txn).await?.succeeded {
            released.ports += 1;
        }
    }
    if released.ports > 0 {
        objects.forget_held_addresses();
    }
    released.networks = finish_deleted_networks(objects).await?;
    Ok(released)
}

/// Networks being deleted that no port is left on: their VNI goes, then their finalizer.
/// Returns how many finished.
async fn finish_deleted_networks(objects: &Objects) -> Result<usize, ApiError> {
    let store = objects.store().as_ref();
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
        if !range(store, &ports_prefix(project, name)).await?.is_empty() {
            continue;
        }
        // The VNI, by compare-and-swap (other networks take and release theirs meanwhile).
        loop {
            let Some(kv) = store.get(VNI_KEY).await? else {
                break;
            };
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
