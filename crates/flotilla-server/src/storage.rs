//! Admission for storage: a pool that holds volumes cannot be deleted (their files would be
//! stranded on the nodes, and their own deletion could not find the pool); a clone names a
//! volume of its project in the same pool, and a volume linked clones are overlays of cannot be
//! deleted before them — the control plane's own backing graph (libvirt would delete the file
//! and leave the clones broken; the pool on the node refuses too).
//!
//! Attachments: a VM that names a volume in `spec.disks` is added to the volume's
//! `status.attachedTo` in the VM's own write (the volume's revision compared), so that two VMs
//! written at once through any replicas never both hold a volume that is not shareable. The VM's
//! agent takes it off again once the domain has let go of the disk (or the VM never ran).

use flotilla_store::{Compare, Op, RangeRequest, Store};
use flotilla_types::registry;
use flotilla_types::validation::FieldErrors;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::objects::{encode, list_prefix, object_key, parse_stored};

/// Object `name` of `kind` in `project` as stored, or None with "project P has no KIND N" at
/// `field` in `errs` (a reference admission checks).
pub(crate) async fn referenced(
    store: &dyn Store,
    (kind, project, name): (&str, &str, &str),
    field: &str,
    errs: &mut FieldErrors,
) -> Result<Option<Value>, ApiError> {
    let info = registry::by_kind(kind).expect("registered");
    match store.get(&object_key(info, Some(project), name)).await? {
        Some(kv) => Ok(Some(parse_stored(&kv)?)),
        None => {
            errs.push(field, format!("project {project:?} has no {kind} {name:?}"));
            Ok(None)
        }
    }
}

/// Refuses (422 at `spec.source.volume`) a clone of a volume the project does not have, or one
/// in another pool; and one smaller than what it clones.
pub async fn check_source(
    store: &dyn Store,
    project: &str,
    volume: &Value,
) -> Result<(), ApiError> {
    let kind = registry::by_kind("Volume").expect("registered");
    let name = volume["metadata"]["name"].as_str().unwrap_or_default();
    let mut errs = FieldErrors::default();
    // Pools that hold no volumes yet say so now, not by leaving the volume Pending.
    let pool_name = volume["spec"]["pool"].as_str().unwrap_or_default();
    let pool_type = pool_type(store, pool_name).await?;
    let format = volume["spec"]["format"].as_str().unwrap_or("qcow2");
    let linked = volume["spec"]["source"]["mode"] == "linked";
    let lun = volume["spec"]["lun"].as_u64();
    match (pool_type.as_str(), lun) {
        ("iscsi", None) => errs.push(
            "spec.lun",
            format!("is required in iscsi pool {pool_name:?}: the target's LUN this volume is"),
        ),
        ("iscsi", Some(lun)) => {
            let holders = luns_claimed(store, pool_name, lun).await?;
            if let Some(holder) = holders.first() {
                errs.push(
                    "spec.lun",
                    format!("LUN {lun} of pool {pool_name:?} is volume {holder} already"),
                );
            }
            let source = &volume["spec"]["source"];
            if source["volume"].is_string() || source["snapshot"].is_string() {
                errs.push(
                    "spec.source",
                    "a volume in an iscsi pool starts blank or as an image (LUNs are not cloned)",
                );
            }
        }
        ("", _) => {}
        (_, Some(_)) => errs.push("spec.lun", "is for volumes in iscsi pools"),
        (_, None) => {}
    }
    match pool_type.as_str() {
        "lvm" => errs.push(
            "spec.pool",
            format!("{pool_name:?} is an lvm pool: making volumes in LVM is not done yet (use a dir pool)"),
        ),
        "rbd" if format != "raw" => errs.push(
            "spec.format",
            format!("{pool_name:?} is an rbd pool: its volumes are raw RBD images (thin and copy-on-write on their own); set format: raw"),
        ),
        "iscsi" if format != "raw" => errs.push(
            "spec.format",
            format!("{pool_name:?} is an iscsi pool: its volumes are LUNs, raw block devices; set format: raw"),
        ),
        "rbd" | "iscsi" => {}
        "nfs" if linked => errs.push(
            "spec.source.mode",
            format!("{pool_name:?} is an nfs pool: its clones are full copies (linked clones are offered in dir and rbd pools)"),
        ),
        _ if linked && format != "qcow2" => errs.push(
            "spec.source.mode",
            "a linked clone in a dir pool must be qcow2: a raw file cannot have a backing file",
        ),
        _ => {}
    }
    if !errs.is_empty() {
        return errs
            .into_result()
            .map_err(|errs| ApiError::invalid("Volume", name, &errs));
    }
    // A snapshot stands for its volume (its pool, its node), at the size it was taken.
    let (field, source, taken) = match (
        volume["spec"]["source"]["volume"].as_str(),
        volume["spec"]["source"]["snapshot"].as_str(),
    ) {
        (Some(v), _) => ("spec.source.volume", Some(v.to_string()), None),
        (None, Some(snapshot)) => {
            let snapshots = registry::by_kind("VolumeSnapshot").expect("registered");
            match store
                .get(&object_key(snapshots, Some(project), snapshot))
                .await?
            {
                None => {
                    errs.push(
                        "spec.source.snapshot",
                        format!("project {project:?} has no VolumeSnapshot {snapshot:?}"),
                    );
                    ("spec.source.snapshot", None, None)
                }
                Some(kv) => {
                    let snap = parse_stored(&kv)?;
                    let size = snap["status"]["size"].as_u64().filter(|s| *s > 0);
                    (
                        "spec.source.snapshot",
                        snap["spec"]["volume"].as_str().map(str::to_string),
                        size,
                    )
                }
            }
        }
        (None, None) => {
            if let Some(image) = volume["spec"]["source"]["image"].as_str() {
                let what = ("Image", project, image);
                referenced(store, what, "spec.source.image", &mut errs).await?;
            }
            return errs
                .into_result()
                .map_err(|errs| ApiError::invalid("Volume", name, &errs));
        }
    };
    let Some(source) = source else {
        return errs
            .into_result()
            .map_err(|errs| ApiError::invalid("Volume", name, &errs));
    };
    let source = source.as_str();
    match store.get(&object_key(kind, Some(project), source)).await? {
        None => errs.push(
            field,
            format!("project {project:?} has no Volume {source:?}"),
        ),
        Some(kv) => {
            let from = parse_stored(&kv)?;
            if from["spec"]["pool"] != volume["spec"]["pool"] {
                errs.push(
                    field,
                    format!(
                        "{source:?} is in pool {}, not {}: a clone is made beside its source",
                        from["spec"]["pool"], volume["spec"]["pool"]
                    ),
                );
            }
            let size = |v: &Value| {
                v["spec"]["size"]
                    .as_str()
                    .and_then(|s| flotilla_types::Quantity::parse(s).ok())
            };
            let has = match taken {
                Some(bytes) => Some(flotilla_types::Quantity::from_bytes(u128::from(bytes))),
                None => size(&from),
            };
            if let (Some(want), Some(has)) = (size(volume), has) {
                if want.value() < has.value() {
                    errs.push(
                        "spec.size",
                        format!("{want} is smaller than its source {source:?} ({has})"),
                    );
                }
            }
        }
    }
    errs.into_result()
        .map_err(|errs| ApiError::invalid("Volume", name, &errs))
}

/// The type of StoragePool `name` (`dir`, `nfs`, ...), or "" when there is no such pool.
pub(crate) async fn pool_type(store: &dyn Store, name: &str) -> Result<String, ApiError> {
    let pools = registry::by_kind("StoragePool").expect("registered");
    Ok(match store.get(&object_key(pools, None, name)).await? {
        Some(kv) => parse_stored(&kv)?["spec"]["type"]
            .as_str()
            .unwrap_or("dir")
            .to_string(),
        None => String::new(),
    })
}

/// Why a volume cannot have its disk frozen by a snapshot, if it cannot.
pub(crate) async fn unsnapshottable(
    store: &dyn Store,
    volume: &Value,
) -> Result<Option<String>, ApiError> {
    let pool = volume["spec"]["pool"].as_str().unwrap_or_default();
    let kind = pool_type(store, pool).await?;
    Ok(if volume["spec"]["format"].as_str() == Some("raw") {
        Some("is raw: snapshots need qcow2 (its overlays hold the changes)".into())
    } else if volume["spec"]["shareable"] == true {
        Some("is shareable: several guests write it, so no moment is one snapshot".into())
    } else if !matches!(kind.as_str(), "dir" | "") {
        Some(format!(
            "is in {kind} pool {pool:?}: snapshots are offered for volumes in dir pools only"
        ))
    } else {
        None
    })
}

/// The volumes (`project/name`) of any project that are LUN `lun` of pool `pool`.
async fn luns_claimed(store: &dyn Store, pool: &str, lun: u64) -> Result<Vec<String>, ApiError> {
    let kind = registry::by_kind("Volume").expect("registered");
    let resp = store
        .range(RangeRequest::prefix(&list_prefix(kind, None)))
        .await?;
    let mut holders = Vec::new();
    for kv in &resp.kvs {
        let v = parse_stored(kv)?;
        if v["spec"]["pool"] == pool && v["spec"]["lun"].as_u64() == Some(lun) {
            holders.push(format!(
                "{}/{}",
                v["metadata"]["namespace"].as_str().unwrap_or_default(),
                v["metadata"]["name"].as_str().unwrap_or_default()
            ));
        }
    }
    Ok(holders)
}

/// Refuses (422 at `spec.size`) growing a volume past what its backend can give it: an iSCSI
/// LUN is sized on the target, so a volume in an iscsi pool grows only within its LUN.
pub async fn check_resize(
    store: &dyn Store,
    current: &Value,
    next: &Value,
) -> Result<(), ApiError> {
    if current["spec"]["size"] == next["spec"]["size"] {
        return Ok(());
    }
    let pool_name = next["spec"]["pool"].as_str().unwrap_or_default();
    if pool_type(store, pool_name).await? != "iscsi" {
        return Ok(());
    }
    let wanted = next["spec"]["size"]
        .as_str()
        .and_then(|s| flotilla_types::Quantity::parse(s).ok())
        .map(|q| q.value());
    let lun = current["status"]["capacity"].as_u64().filter(|c| *c > 0);
    if let (Some(wanted), Some(lun)) = (wanted, lun) {
        if wanted <= u128::from(lun) {
            return Ok(());
        }
    }
    let mut errs = FieldErrors::default();
    let holds = lun
        .map(|b| format!(" (its LUN holds {b} bytes)"))
        .unwrap_or_default();
    errs.push(
        "spec.size",
        format!("{pool_name:?} is an iscsi pool: a LUN is sized on the target and cannot grow from here{holds}; grow the LUN on the target instead"),
    );
    let name = next["metadata"]["name"].as_str().unwrap_or_default();
    errs.into_result()
        .map_err(|errs| ApiError::invalid("Volume", name, &errs))
}

/// The names of the project's objects of `kind` for which `pick` holds.
async fn names_where(
    store: &dyn Store,
    kind: &str,
    project: &str,
    pick: impl Fn(&Value) -> bool,
) -> Result<Vec<String>, ApiError> {
    let kind = registry::by_kind(kind).expect("registered");
    let resp = store
        .range(RangeRequest::prefix(&list_prefix(kind, Some(project))))
        .await?;
    let mut names = Vec::new();
    for kv in &resp.kvs {
        let v = parse_stored(kv)?;
        if pick(&v) {
            names.push(
                v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    Ok(names)
}

/// Refuses (422 at the field) a snapshot of a volume the project lacks, or of one that cannot
/// have snapshots (raw: no overlay can sit on it shared; shareable: several guests write it).
pub async fn check_snapshot(
    store: &dyn Store,
    project: &str,
    snapshot: &Value,
) -> Result<(), ApiError> {
    let name = snapshot["metadata"]["name"].as_str().unwrap_or_default();
    let volume = snapshot["spec"]["volume"].as_str().unwrap_or_default();
    let kind = registry::by_kind("Volume").expect("registered");
    let mut errs = FieldErrors::default();
    match store.get(&object_key(kind, Some(project), volume)).await? {
        None => errs.push(
            "spec.volume",
            format!("project {project:?} has no Volume {volume:?}"),
        ),
        Some(kv) => {
            let v = parse_stored(&kv)?;
            if let Some(why) = unsnapshottable(store, &v).await? {
                errs.push("spec.volume", format!("volume {volume:?} {why}"));
            } else if v["metadata"].get("deletionTimestamp").is_some() {
                errs.push("spec.volume", format!("volume {volume:?} is being deleted"));
            }
        }
    }
    errs.into_result()
        .map_err(|errs| ApiError::invalid("VolumeSnapshot", name, &errs))
}

/// Refuses (409, naming them) deleting a snapshot that linked clones are overlays of, or one
/// with newer snapshots of the same volume (snapshots go newest first: each is the base of the
/// next).
pub async fn check_snapshot_delete(
    store: &dyn Store,
    project: &str,
    name: &str,
) -> Result<(), ApiError> {
    let kind = registry::by_kind("VolumeSnapshot").expect("registered");
    let Some(kv) = store.get(&object_key(kind, Some(project), name)).await? else {
        return Ok(());
    };
    let snapshot = parse_stored(&kv)?;
    let clones = names_where(store, "Volume", project, |v| {
        v["spec"]["source"]["snapshot"].as_str() == Some(name)
            && v["spec"]["source"]["mode"].as_str() == Some("linked")
    })
    .await?;
    if !clones.is_empty() {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "snapshot {name:?} backs the linked clone{} {}: delete {} first",
                if clones.len() == 1 { "" } else { "s" },
                clones.join(", "),
                if clones.len() == 1 { "it" } else { "them" }
            ),
        ));
    }
    let resp = store
        .range(RangeRequest::prefix(&list_prefix(kind, Some(project))))
        .await?;
    let mut newer = Vec::new();
    for other in &resp.kvs {
        let s = parse_stored(other)?;
        if s["spec"]["volume"] == snapshot["spec"]["volume"]
            && other.create_revision > kv.create_revision
        {
            newer.push(
                s["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    if newer.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        409,
        "Conflict",
        format!(
            "snapshot {name:?} is the base of the newer snapshot{} {} of volume {}: snapshots are deleted newest first",
            if newer.len() == 1 { "" } else { "s" },
            newer.join(", "),
            snapshot["spec"]["volume"]
        ),
    ))
}

/// Refuses (409, naming them) deleting a volume that linked clones are overlays of, or that has
/// snapshots.
pub async fn check_volume_delete(
    store: &dyn Store,
    project: &str,
    name: &str,
) -> Result<(), ApiError> {
    let snapshots = names_where(store, "VolumeSnapshot", project, |s| {
        s["spec"]["volume"].as_str() == Some(name)
    })
    .await?;
    if !snapshots.is_empty() {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "volume {name:?} has the snapshot{} {}: delete {} first",
                if snapshots.len() == 1 { "" } else { "s" },
                snapshots.join(", "),
                if snapshots.len() == 1 { "it" } else { "them" }
            ),
        ));
    }
    let kind = registry::by_kind("Volume").expect("registered");
    let resp = store
        .range(RangeRequest::prefix(&list_prefix(kind, Some(project))))
        .await?;
    let mut clones = Vec::new();
    for kv in &resp.kvs {
        let v = parse_stored(kv)?;
        if v["spec"]["source"]["volume"].as_str() == Some(name)
            && v["spec"]["source"]["mode"].as_str() == Some("linked")
        {
            clones.push(
                v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    if clones.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        409,
        "Conflict",
        format!(
            "volume {name:?} backs the linked clone{} {}: delete {} first",
            if clones.len() == 1 { "" } else { "s" },
            clones.join(", "),
            if clones.len() == 1 { "it" } else { "them" }
        ),
    ))
}

/// Refuses (409, naming them) deleting a pool that volumes of any project are in.
pub async fn check_pool_delete(store: &dyn Store, pool: &str) -> Result<(), ApiError> {
    let volumes = registry::by_kind("Volume").expect("registered");
    let resp = store
        .range(RangeRequest::prefix(&list_prefix(volumes, None)))
        .await?;
    let mut users = Vec::new();
    for kv in &resp.kvs {
        let volume = parse_stored(kv)?;
        if volume["spec"]["pool"].as_str() == Some(pool) {
            users.push(format!(
                "{}/{}",
                volume["metadata"]["namespace"].as_str().unwrap_or_default(),
                volume["metadata"]["name"].as_str().unwrap_or_default()
            ));
        }
    }
    if users.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = users.iter().take(10).map(String::as_str).collect();
    Err(ApiError::new(
        409,
        "Conflict",
        format!(
            "storage pool {pool:?} holds {} volume{} ({}{}): delete them first",
            users.len(),
            if users.len() == 1 { "" } else { "s" },
            shown.join(", "),
            if users.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ),
    ))
}

/// The VM's volumes, by name, with their position in `spec.disks`.
fn disk_volumes(vm: Option<&Value>) -> Vec<(usize, String)> {
    vm.and_then(|v| v["spec"]["disks"].as_array())
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, d)| Some((i, d["volume"].as_str()?.to_string())))
        .collect()
}

/// The node a VM is on or bound to, if any.
fn vm_node(vm: &Value) -> Option<&str> {
    vm["spec"]["nodeName"]
        .as_str()
        .or(vm["status"]["nodeName"].as_str())
}

/// What a VM's write (`vm`, over `before` when it exists) must also do to the volumes it names:
/// compares and puts for the same transaction. A volume newly named must exist in the project,
/// not be deleted, live on the VM's node (a node-local pool), and hold no other VM unless it is
/// shareable (409 naming the holder); it then lists the VM in `status.attachedTo`. A volume no
/// longer named by a VM that is on no node is let go at once (nothing holds it).
pub async fn attach(
    store: &dyn Store,
    project: &str,
    vm: &Value,
    before: Option<&Value>,
) -> Result<(Vec<Compare>, Vec<Op>), ApiError> {
    let (wanted, had) = (disk_volumes(Some(vm)), disk_volumes(before));
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    if wanted.is_empty() && had.is_empty() {
        return Ok((compares, ops));
    }
    let kind = registry::by_kind("Volume").expect("registered");
    let name = vm["metadata"]["name"].as_str().unwrap_or_default();
    let uid = vm["metadata"]["uid"].as_str().unwrap_or_default();
    let mut errs = FieldErrors::default();
    // The node the VM's disks pin it to: its own, else the first placed volume's.
    let mut node: Option<(String, String)> =
        vm_node(vm).map(|n| (n.to_string(), format!("the VM is on node {n:?}")));
    for (i, volume) in &wanted {
        let field = format!("spec.disks[{i}].volume");
        let Some(kv) = store.get(&object_key(kind, Some(project), volume)).await? else {
            errs.push(
                field,
                format!("project {project:?} has no Volume {volume:?}"),
            );
            continue;
        };
        let mut object = parse_stored(&kv)?;
        // A shared volume (rbd) follows the VM using it: it pins only while other VMs hold it.
        let held_elsewhere = object["status"]["attachedTo"]
            .as_array()
            .is_some_and(|hs| hs.iter().any(|h| h["uid"] != uid));
        let pins = object["status"]["shared"] != true || held_elsewhere;
        if let Some(on) = object["status"]["node"].as_str().filter(|_| pins) {
            match &node {
                Some((n, why)) if n != on => errs.push(
                    field.clone(),
                    format!(
                        "volume {volume:?} lives on node {on:?} but {why}: a volume in a node-local pool (or a shared one other VMs hold) attaches only to VMs on its node"
                    ),
                ),
                Some(_) => {}
                None => node = Some((on.to_string(), format!("volume {volume:?} is on node {on:?}"))),
            }
        }
        if had.iter().any(|(_, v)| v == volume) {
            continue;
        }
        if object["metadata"].get("deletionTimestamp").is_some() {
            errs.push(field, format!("volume {volume:?} is being deleted"));
            continue;
        }
        let mut holders: Vec<Value> = object["status"]["attachedTo"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if holders.iter().any(|h| h["uid"] == uid) {
            // Still held from before (being unplugged): named again, it stays — written again
            // all the same, so that an agent letting go of it meanwhile (a write guarded by the
            // volume's revision) and this write cannot both succeed.
            compares.push(Compare::mod_revision(kv.key.clone(), kv.mod_revision));
            ops.push(Op::put(&kv.key, encode(&object)));
            continue;
        }
        if let Some(holder) = holders
            .first()
            .filter(|_| object["spec"]["shareable"] != true)
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "volume {volume:?} is attached to VM {}: detach it there first (only a shareable volume attaches to several VMs)",
                    holder["vm"]
                ),
            ));
        }
        holders.push(json!({"vm": name, "uid": uid}));
        object["status"]["attachedTo"] = json!(holders);
        compares.push(Compare::mod_revision(kv.key.clone(), kv.mod_revision));
        ops.push(Op::put(&kv.key, encode(&object)));
    }
    errs.into_result()
        .map_err(|errs| ApiError::invalid("VirtualMachine", name, &errs))?;
    if vm_node(vm).is_none() {
        for (_, volume) in had
            .iter()
            .filter(|(_, v)| !wanted.iter().any(|(_, w)| w == v))
        {
            let Some(kv) = store.get(&object_key(kind, Some(project), volume)).await? else {
                continue;
            };
            let mut object = parse_stored(&kv)?;
            if let Some(holders) = object["status"]["attachedTo"].as_array_mut() {
                let before = holders.len();
                holders.retain(|h| h["uid"] != uid);
                if holders.len() != before {
                    if holders.is_empty() {
                        // As the typed object writes it: no list rather than an empty one.
                        if let Some(status) = object["status"].as_object_mut() {
                            status.remove("attachedTo");
                        }
                    }
                    compares.push(Compare::mod_revision(kv.key.clone(), kv.mod_revision));
                    ops.push(Op::put(&kv.key, encode(&object)));
                }
            }
        }
    }
    Ok((compares, ops))
}

/// Refuses (409, naming them) deleting a volume attached to VMs.
pub fn check_volume_detached(volume: &Value) -> Result<(), ApiError> {
    let holders: Vec<&str> = volume["status"]["attachedTo"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["vm"].as_str())
        .collect();
    if holders.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        409,
        "Conflict",
        format!(
            "volume {} is attached to VM {}: detach it first (remove it from the VM's spec.disks)",
            volume["metadata"]["name"],
            holders.join(", ")
        ),
    ))
}
