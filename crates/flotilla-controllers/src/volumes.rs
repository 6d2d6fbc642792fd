//! Volume placement: a volume in a node-local pool gets a node (`status.node`) among those
//! where the pool is Ready with room for it, the one with the most free space (a clone: its
//! source's node); its agent then makes it. Until one has room the volume stays Pending and says
//! why. A volume of a shared pool (rbd) is managed by one node too, which follows the VM it is
//! attached to (whose QEMU grows it) and, until it is made, its source. It also lets go of
//! attachments nothing holds any more: VMs gone (or made again under
//! the same name), and VMs on no node that no longer name the volume. Runs on every change of a
//! volume or pool, and every `resync`.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_server::objects::Objects;
use flotilla_server::ApiError;
use flotilla_types::kinds::{StoragePool, VirtualMachine, Volume, VolumeSnapshot};
use serde_json::json;

pub async fn run(objects: Objects, resync: Duration) {
    crate::on_changes(
        objects,
        &["Volume", "StoragePool", "VolumeSnapshot"],
        resync,
        "place volumes",
        |o| async move { sweep(&o).await },
    )
    .await
}

/// The sizes of a pool's volumes, by node.
pub type Provisioned = BTreeMap<String, u64>;

/// Where a volume of `size` bytes in `pool` goes: the Ready node with the most free space where
/// it fits the pool's allocation limit (`size` within that percentage of the free space, and
/// the sizes already `provisioned` there plus `size` within that percentage of the capacity),
/// or why none.
pub fn place(
    pool: Option<&StoragePool>,
    pool_name: &str,
    size: u64,
    provisioned: &Provisioned,
) -> Result<String, String> {
    let Some(pool) = pool else {
        return Err(format!("there is no StoragePool {pool_name:?}"));
    };
    let nodes = pool.status.as_ref().map(|s| &s.nodes);
    let ready: Vec<_> = nodes
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.phase == "Ready")
        .collect();
    if ready.is_empty() {
        return Err(format!("no node serves StoragePool {pool_name:?} yet"));
    }
    let limit = u128::from(pool.spec.allocation_limit());
    let scaled = |bytes: u64| u128::from(bytes) * limit / 100;
    // A shared pool's space is one: every volume in it counts against each node's view.
    let everywhere: u128 = provisioned.values().map(|&b| u128::from(b)).sum();
    let used = |name: &str| match pool.spec.shared() {
        true => everywhere,
        false => u128::from(provisioned.get(name).copied().unwrap_or(0)),
    };
    let roomy: Vec<_> = ready
        .iter()
        .filter(|(_, n)| scaled(n.available) >= u128::from(size))
        .collect();
    if roomy.is_empty() {
        return Err(format!(
            "no node of StoragePool {pool_name:?} has {size} bytes free (the most: {}; allocationLimitPercent {limit})",
            ready.iter().map(|(_, n)| n.available).max().unwrap_or(0)
        ));
    }
    roomy
        .iter()
        .filter(|(name, n)| used(name) + u128::from(size) <= scaled(n.capacity))
        .max_by_key(|(name, n)| (n.available, std::cmp::Reverse(name.as_str())))
        .map(|(name, _)| name.to_string())
        .ok_or_else(|| {
            let (name, n) = roomy
                .iter()
                .min_by_key(|(name, _)| used(name))
                .expect("not empty");
            format!(
                "StoragePool {pool_name:?} is fully allocated: its volumes may add up to {limit}% of the capacity, and the least allocated node ({name}) has {} of {} bytes given out; {size} more do not fit (raise spec.allocationLimitPercent to over-commit)",
                used(name),
                scaled(n.capacity)
            )
        })
}

/// [`place`], or the volume's own `spec.nodeName` (in a node-local pool) when that node serves
/// the pool with room for it.
fn place_on(
    pool: Option<&StoragePool>,
    volume: &Volume,
    size: u64,
    provisioned: &Provisioned,
) -> Result<String, String> {
    let pool_name = &volume.spec.pool;
    let Some(node) = volume
        .spec
        .node_name
        .as_ref()
        .filter(|_| pool.is_some_and(|p| !p.spec.shared()))
    else {
        return place(pool, pool_name, size, provisioned);
    };
    let mut only = pool.expect("filtered above").clone();
    let serves = only.status.as_ref().and_then(|s| s.nodes.get(node));
    if serves.is_none_or(|entry| entry.phase != "Ready") {
        return Err(format!(
            "its spec.nodeName {node:?} does not serve StoragePool {pool_name:?} (yet)"
        ));
    }
    // The pool restricted to that node: the same room checks, and their reasons.
    if let Some(status) = only.status.as_mut() {
        status.nodes.retain(|name, _| name == node);
    }
    place(Some(&only), pool_name, size, provisioned)
}

/// The sizes of the volumes on each node, by pool.
fn provisioned(volumes: &[Volume]) -> BTreeMap<String, Provisioned> {
    let mut out: BTreeMap<String, Provisioned> = BTreeMap::new();
    for v in volumes {
        if let Some(node) = v.status.as_ref().and_then(|s| s.node.clone()) {
            let size = u64::try_from(v.spec.size.value()).unwrap_or(u64::MAX);
            let entry = out.entry(v.spec.pool.clone()).or_default();
            let sum = entry.entry(node).or_default();
            *sum = sum.saturating_add(size);
        }
    }
    out
}

/// Where a clone of `from` goes: its source's node, if the pool is Ready there (and, for a full
/// copy, has room).
fn beside(
    pool: Option<&StoragePool>,
    from: Option<&Volume>,
    source: &flotilla_types::kinds::VolumeSource,
    size: u64,
) -> Result<String, String> {
    let Some(node) = from.and_then(|f| f.status.as_ref()?.node.clone()) else {
        let what = source.volume.as_ref().or(source.snapshot.as_ref());
        return Err(format!("waiting for its source {what:?} to be placed"));
    };
    let entry = pool
        .and_then(|p| p.status.as_ref()?.nodes.get(&node))
        .filter(|e| e.phase == "Ready")
        .ok_or_else(|| format!("its source's node {node:?} does not serve the pool"))?;
    if source.mode == flotilla_types::kinds::CloneMode::Full && entry.available < size {
        return Err(format!(
            "its source's node {node:?} has {} bytes free, not {size}",
            entry.available
        ));
    }
    Ok(node)
}

/// One pass; returns how many volumes were written.
pub async fn sweep(objects: &Objects) -> Result<usize, ApiError> {
    let pools: Vec<StoragePool> = crate::list_all(objects, "StoragePool").await?;
    let all: Vec<Volume> = crate::list_all(objects, "Volume").await?;
    let snapshots: Vec<VolumeSnapshot> = crate::list_all(objects, "VolumeSnapshot").await?;
    let mut written = release_attachments(objects, &all).await?;
    written += follow_vms(objects, &pools, &all).await?;
    written += place_snapshots(objects, &all, &snapshots).await?;
    let mut given = provisioned(&all);
    for volume in &all {
        let status = volume.status.clone().unwrap_or_default();
        if volume.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if status.node.is_some() {
            written += follow_source(objects, volume, &all).await?;
            continue;
        }
        let pool = pools.iter().find(|p| p.metadata.name == volume.spec.pool);
        // A LUN is one volume: of two claims (creates racing through two replicas both
        // passed admission), only the older is placed.
        if let Some(first) = lun_holder(volume, &all).filter(|h| *h != volume) {
            let why = format!(
                "LUN {} of pool {:?} is volume {}/{} already",
                volume.spec.lun.unwrap_or_default(),
                volume.spec.pool,
                first.metadata.namespace.as_deref().unwrap_or_default(),
                first.metadata.name
            );
            if status.message != why {
                let patch = json!({"status": {"phase": "Failed", "message": why}});
                let project = volume.metadata.namespace.clone().unwrap_or_default();
                written +=
                    crate::write_status(objects, "Volume", &project, &volume.metadata.name, patch)
                        .await?;
            }
            continue;
        }
        let size = u64::try_from(volume.spec.size.value()).unwrap_or(u64::MAX);
        let placed = match &volume.spec.source {
            // A copy of an image goes wherever a blank volume would: every node can fetch it.
            Some(source) if source.image.is_some() => place_on(
                pool,
                volume,
                size,
                given.entry(volume.spec.pool.clone()).or_default(),
            ),
            None => place_on(
                pool,
                volume,
                size,
                given.entry(volume.spec.pool.clone()).or_default(),
            ),
            Some(source) => {
                // A snapshot's clone goes beside the snapshot's volume.
                let of_snapshot = source.snapshot.as_ref().and_then(|name| {
                    snapshots.iter().find(|s| {
                        s.metadata.namespace == volume.metadata.namespace
                            && s.metadata.name == *name
                    })
                });
                let from_name = match (&source.volume, of_snapshot) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(s)) => Some(s.spec.volume.clone()),
                    (None, None) => None,
                };
                let from = all.iter().find(|v| {
                    v.metadata.namespace == volume.metadata.namespace
                        && Some(&v.metadata.name) == from_name.as_ref()
                });
                beside(pool, from, source, size)
            }
        };
        let shared = pool.is_some_and(|p| p.spec.shared());
        let patch = match placed {
            Ok(node) => {
                // Counted at once: the next volume of this pass sees it.
                let sums = given.entry(volume.spec.pool.clone()).or_default();
                let sum = sums.entry(node.clone()).or_default();
                *sum = sum.saturating_add(size);
                json!({"status": {"node": node, "shared": shared, "phase": "Pending", "message": ""}})
            }
            Err(why) if status.message == why && status.phase == "Pending" => continue,
            Err(why) => json!({"status": {"phase": "Pending", "message": why}}),
        };
        let project = volume.metadata.namespace.clone().unwrap_or_default();
        written +=
            crate::write_status(objects, "Volume", &project, &volume.metadata.name, patch).await?;
    }
    Ok(written)
}

/// A snapshot is taken where its volume lives: it gets the volume's node once it has one.
/// Hands each attached volume of a shared pool to the node of the VM using it, so that the
/// node whose QEMU has it open also grows it (the guest sees the size) and follows it. Only a
/// made volume moves (no create is in flight), and only to a node the pool is Ready on.
async fn follow_vms(
    objects: &Objects,
    pools: &[StoragePool],
    volumes: &[Volume],
) -> Result<usize, ApiError> {
    let moving: Vec<&Volume> = volumes
        .iter()
        .filter(|v| v.metadata.deletion_timestamp.is_none())
        .filter(|v| {
            v.status
                .as_ref()
                .is_some_and(|s| s.shared && s.phase == "Available" && !s.attached_to.is_empty())
        })
        .collect();
    if moving.is_empty() {
        return Ok(0);
    }
    let vms: Vec<VirtualMachine> = crate::list_all(objects, "VirtualMachine").await?;
    let mut written = 0;
    for volume in moving {
        let status = volume.status.as_ref().expect("filtered");
        let holder = &status.attached_to[0];
        let Some(node) = vms
            .iter()
            .find(|vm| vm.metadata.uid.as_deref() == Some(holder.uid.as_str()))
            .and_then(|vm| {
                vm.status
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .or_else(|| vm.spec.node_name.clone())
            })
        else {
            continue;
        };
        let ready = pools
            .iter()
            .find(|p| p.metadata.name == volume.spec.pool)
            .and_then(|p| p.status.as_ref()?.nodes.get(&node))
            .is_some_and(|n| n.phase == "Ready");
        if status.node.as_deref() == Some(node.as_str()) || !ready {
            continue;
        }
        tracing::info!(volume = %volume.metadata.name, from = ?status.node, to = %node, "a shared volume follows its VM's node");
        let patch = json!({"metadata": {"resourceVersion": volume.metadata.resource_version},
                           "status": {"node": node}});
        let project = volume.metadata.namespace.clone().unwrap_or_default();
        match crate::write_status(objects, "Volume", &project, &volume.metadata.name, patch).await {
            Ok(n) => written += n,
            Err(e) if e.code() == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// The oldest volume (not being deleted) that claims the same LUN of the same pool as `volume`.
fn lun_holder<'a>(volume: &Volume, all: &'a [Volume]) -> Option<&'a Volume> {
    let lun = volume.spec.lun?;
    all.iter()
        .filter(|v| v.spec.pool == volume.spec.pool && v.spec.lun == Some(lun))
        .filter(|v| v.metadata.deletion_timestamp.is_none())
        .min_by_key(|v| {
            (
                v.metadata.creation_timestamp,
                v.metadata.namespace.clone(),
                v.metadata.name.clone(),
            )
        })
}

/// A shared clone not made yet is made by the node managing its source (which reads the source
/// volume); when the source has moved to another node since, the clone follows it.
async fn follow_source(
    objects: &Objects,
    volume: &Volume,
    all: &[Volume],
) -> Result<usize, ApiError> {
    let status = volume.status.clone().unwrap_or_default();
    let Some(name) = volume.spec.source.as_ref().and_then(|s| s.volume.as_ref()) else {
        return Ok(0);
    };
    if !status.shared || status.phase == "Available" {
        return Ok(0);
    }
    let source_node = all
        .iter()
        .find(|v| v.metadata.namespace == volume.metadata.namespace && v.metadata.name == *name)
        .and_then(|v| v.status.as_ref()?.node.clone());
    let Some(node) = source_node.filter(|n| Some(n) != status.node.as_ref()) else {
        return Ok(0);
    };
    let patch = json!({"metadata": {"resourceVersion": volume.metadata.resource_version},
                       "status": {"node": node}});
    let project = volume.metadata.namespace.clone().unwrap_or_default();
    match crate::write_status(objects, "Volume", &project, &volume.metadata.name, patch).await {
        Err(e) if e.code() == 409 => Ok(0),
        other => other,
    }
}

async fn place_snapshots(
    objects: &Objects,
    volumes: &[Volume],
    snapshots: &[VolumeSnapshot],
) -> Result<usize, ApiError> {
    let mut written = 0;
    for snapshot in snapshots {
        let status = snapshot.status.clone().unwrap_or_default();
        if status.node.is_some() || snapshot.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let volume = volumes.iter().find(|v| {
            v.metadata.namespace == snapshot.metadata.namespace
                && v.metadata.name == snapshot.spec.volume
        });
        let patch = match volume.and_then(|v| v.status.as_ref()?.node.clone()) {
            Some(node) => json!({"status": {"node": node, "phase": "Pending", "message": ""}}),
            None => {
                let why = format!("waiting for volume {:?} to be placed", snapshot.spec.volume);
                if status.message == why {
                    continue;
                }
                json!({"status": {"phase": "Pending", "message": why}})
            }
        };
        let project = snapshot.metadata.namespace.clone().unwrap_or_default();
        written += crate::write_status(
            objects,
            "VolumeSnapshot",
            &project,
            &snapshot.metadata.name,
            patch,
        )
        .await?;
    }
    Ok(written)
}

/// Whether an attachment of `volume` to the VM `vm` (found by name, `uid` as recorded) is
/// held: the VM exists as that uid and is on a node (its agent lets go) or still names it.
fn held(vm: Option<&VirtualMachine>, uid: &str, volume: &str) -> bool {
    let Some(vm) = vm.filter(|vm| vm.metadata.uid.as_deref() == Some(uid)) else {
        return false;
    };
    let on_node =
        vm.spec.node_name.is_some() || vm.status.as_ref().is_some_and(|s| s.node_name.is_some());
    on_node || vm.spec.disks.iter().any(|d| d.volume == volume)
}

/// Takes off the volumes' attachments that nothing holds; returns how many volumes changed.
/// `volumes` must be listed before the VMs are (an attachment is written with its VM).
async fn release_attachments(objects: &Objects, volumes: &[Volume]) -> Result<usize, ApiError> {
    let attached: Vec<&Volume> = volumes
        .iter()
        .filter(|v| v.status.as_ref().is_some_and(|s| !s.attached_to.is_empty()))
        .collect();
    if attached.is_empty() {
        return Ok(0);
    }
    let vms: Vec<VirtualMachine> = crate::list_all(objects, "VirtualMachine").await?;
    let mut written = 0;
    for volume in attached {
        let holders = &volume.status.as_ref().expect("filtered").attached_to;
        let kept: Vec<_> = holders
            .iter()
            .filter(|h| {
                let vm = vms.iter().find(|vm| {
                    vm.metadata.namespace == volume.metadata.namespace && vm.metadata.name == h.vm
                });
                held(vm, &h.uid, &volume.metadata.name)
            })
            .collect();
        if kept.len() == holders.len() {
            continue;
        }
        tracing::info!(volume = %volume.metadata.name, from = holders.len(), to = kept.len(), "released attachments nothing holds");
        // Guarded: an attachment made since the list is not lost.
        let patch = json!({"metadata": {"resourceVersion": volume.metadata.resource_version},
                           "status": {"attachedTo": kept}});
        let project = volume.metadata.namespace.clone().unwrap_or_default();
        match crate::write_status(objects, "Volume", &project, &volume.metadata.name, patch).await {
            Ok(n) => written += n,
            Err(e) if e.code() == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(nodes: serde_json::Value) -> StoragePool {
        serde_json::from_value(
            json!({"metadata": {"name": "p"}, "spec": {}, "status": {"nodes": nodes}}),
        )
        .unwrap()
    }

    #[test]
    fn the_ready_node_with_the_most_room_gets_the_volume() {
        let p = pool(json!({
            "a": {"phase": "Ready", "capacity": 1000, "available": 100},
            "b": {"phase": "Ready", "capacity": 1000, "available": 300},
            "c": {"phase": "Failed", "capacity": 1000, "available": 900, "message": "closed"},
        }));
        let none = Provisioned::new();
        assert_eq!(place(Some(&p), "p", 50, &none), Ok("b".into()));
        assert_eq!(place(Some(&p), "p", 300, &none), Ok("b".into()));
        let full = place(Some(&p), "p", 301, &none).unwrap_err();
        assert!(full.contains("301 bytes free (the most: 300"), "{full}");
        // Equal room: the first name, so replicas agree.
        let tie = pool(
            json!({"x": {"phase": "Ready", "capacity": 9, "available": 5}, "w": {"phase": "Ready", "capacity": 9, "available": 5}}),
        );
        assert_eq!(place(Some(&tie), "p", 1, &none), Ok("w".into()));
        assert!(place(Some(&pool(json!({}))), "p", 1, &none)
            .unwrap_err()
            .contains("no node serves"));
        assert!(place(None, "gone", 1, &none)
            .unwrap_err()
            .contains("no StoragePool \"gone\""));
    }

    #[test]
    fn a_volume_naming_its_node_goes_there_or_waits_saying_why() {
        let p = pool(json!({
            "a": {"phase": "Ready", "capacity": 1000, "available": 100},
            "b": {"phase": "Ready", "capacity": 1000, "available": 900},
            "c": {"phase": "Failed", "capacity": 1000, "available": 900, "message": "closed"},
        }));
        let volume = |node: Option<&str>| -> Volume {
            serde_json::from_value(json!({"metadata": {"name": "v"},
                "spec": {"pool": "p", "size": "1Mi", "nodeName": node}}))
            .unwrap()
        };
        let none = Provisioned::new();
        // Not the roomiest node: the one it names.
        assert_eq!(
            place_on(Some(&p), &volume(Some("a")), 50, &none),
            Ok("a".into())
        );
        assert_eq!(place_on(Some(&p), &volume(None), 50, &none), Ok("b".into()));
        let full = place_on(Some(&p), &volume(Some("a")), 101, &none).unwrap_err();
        assert!(full.contains("101 bytes free (the most: 100"), "{full}");
        for node in ["c", "nowhere"] {
            let why = place_on(Some(&p), &volume(Some(node)), 1, &none).unwrap_err();
            assert!(
                why.contains(&format!("spec.nodeName \"{node}\" does not serve")),
                "{why}"
            );
        }
        // A shared pool has no node of its own to choose.
        let mut shared = p.clone();
        shared.spec.pool_type = flotilla_types::kinds::PoolType::Rbd;
        assert_eq!(
            place_on(Some(&shared), &volume(Some("a")), 50, &none),
            Ok("b".into())
        );
    }

    #[test]
    fn a_shared_pool_counts_every_volume_against_its_one_space() {
        let mut p = pool(json!({
            "a": {"phase": "Ready", "capacity": 1000, "available": 900},
            "b": {"phase": "Ready", "capacity": 1000, "available": 900},
        }));
        p.spec.pool_type = flotilla_types::kinds::PoolType::Rbd;
        // 600 given out by a's volumes and 300 by b's: 900 of the cluster's 1000.
        let given = Provisioned::from([("a".to_string(), 600), ("b".to_string(), 300)]);
        assert_eq!(place(Some(&p), "p", 100, &given), Ok("a".into()));
        let full = place(Some(&p), "p", 101, &given).unwrap_err();
        assert!(full.contains("fully allocated"), "{full}");
    }

    #[test]
    fn the_oldest_claim_of_a_lun_holds_it() {
        let volume = |name: &str, at: &str, lun: Option<u32>, deleting: bool| -> Volume {
            let mut v = json!({"metadata": {"name": name, "namespace": "p", "creationTimestamp": at},
                               "spec": {"pool": "san", "size": "1Gi", "format": "raw", "lun": lun}});
            if deleting {
                v["metadata"]["deletionTimestamp"] = json!("2026-12-02T00:00:09Z");
            }
            serde_json::from_value(v).unwrap()
        };
        let all = vec![
            volume("young", "2026-12-02T00:00:05Z", Some(3), false),
            volume("old", "2026-12-02T00:00:01Z", Some(3), false),
            volume("gone", "2026-12-02T00:00:00Z", Some(3), true),
            volume("other", "2026-12-02T00:00:00Z", Some(4), false),
            volume("plain", "2026-12-02T00:00:00Z", None, false),
        ];
        let holder = |i: usize| lun_holder(&all[i], &all).map(|v| v.metadata.name.clone());
        assert_eq!(holder(0), Some("old".into()));
        assert_eq!(holder(1), Some("old".into()));
        assert_eq!(holder(3), Some("other".into()));
        assert_eq!(holder(4), None);
    }

    #[test]
    fn volumes_never_add_up_past_the_allocation_limit() {
        let mut p = pool(json!({
            "a": {"phase": "Ready", "capacity": 1000, "available": 600},
            "b": {"phase": "Ready", "capacity": 1000, "available": 500},
        }));
        // a has the most room, but 800 of its 1000 bytes are given out: b gets the 300.
        let given = Provisioned::from([("a".to_string(), 800), ("b".to_string(), 100)]);
        assert_eq!(place(Some(&p), "p", 300, &given), Ok("b".into()));
        let full = place(Some(&p), "p", 550, &given).unwrap_err();
        assert!(
            full.contains("fully allocated") && full.contains("(a) has 800 of 1000"),
            "{full}"
        );
        // Over-committing thin volumes: twice the capacity, and twice the free space.
        p.spec.allocation_limit_percent = Some(200);
        assert_eq!(place(Some(&p), "p", 1100, &given), Ok("a".into()));
        assert!(
            place(Some(&p), "p", 1300, &given).is_err(),
            "more than twice a's 600 free"
        );
    }
}
