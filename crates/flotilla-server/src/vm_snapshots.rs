//! Admission for VM snapshots: one names a VM of its project that runs on a node and whose
//! volumes can carry overlays (qcow2, not shareable); they are deleted newest first (each is
//! the base of the next) and not while a VM's root disk is a linked clone of one; a VM or a
//! volume with VM snapshots is not deleted (their files live in the VM's directory and in the
//! volume's chain). A VM cloned from a snapshot or another VM is made on their node.

use flotilla_store::{RangeRequest, Store};
use flotilla_types::registry;
use flotilla_types::validation::FieldErrors;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::objects::{list_prefix, object_key, parse_stored};
use crate::storage::referenced;

/// Every VM snapshot of `project`, with the revision that created it.
async fn all(store: &dyn Store, project: &str) -> Result<Vec<(i64, Value)>, ApiError> {
    let kind = registry::by_kind("VMSnapshot").expect("registered");
    let resp = store
        .range(RangeRequest::prefix(&list_prefix(kind, Some(project))))
        .await?;
    resp.kvs
        .iter()
        .map(|kv| Ok((kv.create_revision, parse_stored(kv)?)))
        .collect()
}

fn names(snapshots: &[&Value]) -> String {
    snapshots
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refuses (422 at `spec.vm`) a snapshot of a VM the project lacks, one not on a node yet, an
/// adopted one (Flotilla does not own its disks), or one with a volume that cannot carry an
/// overlay. Otherwise places it: `status.node` is the VM's node, whose agent takes it.
pub async fn admit(store: &dyn Store, project: &str, snapshot: &mut Value) -> Result<(), ApiError> {
    let name = snapshot["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let vm_name = snapshot["spec"]["vm"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (mut node, mut vm_uid) = (Value::Null, Value::Null);
    let mut errs = FieldErrors::default();
    let field = "spec.vm";
    let what = ("VirtualMachine", project, vm_name.as_str());
    match referenced(store, what, field, &mut errs).await? {
        None => {}
        Some(vm) => {
            if vm["metadata"].get("deletionTimestamp").is_some() {
                errs.push(field, format!("VM {vm_name:?} is being deleted"));
            } else if vm["spec"]["adoptedDomain"].is_string() {
                errs.push(
                    field,
                    format!(
                        "VM {vm_name:?} is an adopted domain: Flotilla does not manage its disks"
                    ),
                );
            } else if !vm["spec"]["nodeName"].is_string() {
                errs.push(
                    field,
                    format!(
                        "VM {vm_name:?} is not on a node yet: snapshot it once it is scheduled"
                    ),
                );
            }
            node = vm["spec"]["nodeName"].clone();
            vm_uid = vm["metadata"]["uid"].clone();
            let volumes = registry::by_kind("Volume").expect("registered");
            for (i, disk) in vm["spec"]["disks"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let volume = disk["volume"].as_str().unwrap_or_default();
                let Some(kv) = store
                    .get(&object_key(volumes, Some(project), volume))
                    .await?
                else {
                    continue;
                };
                let v = parse_stored(&kv)?;
                let Some(why) = crate::storage::unsnapshottable(store, &v).await? else {
                    continue;
                };
                errs.push(
                    field,
                    format!("VM {vm_name:?} has volume {volume:?} (spec.disks[{i}]), which {why}; detach it first"),
                );
            }
        }
    }
    errs.into_result()
        .map_err(|errs| ApiError::invalid("VMSnapshot", &name, &errs))?;
    snapshot["status"] = json!({"node": node, "vmUid": vm_uid, "phase": "Pending"});
    Ok(())
}

/// Places a VM whose root disk is cloned (`spec.rootDisk.source`) on its source's node, or
/// refuses it (422 at the field): a source the project lacks, a snapshot not Ready or without a
/// root disk, a size under the source's, a `nodeName` elsewhere.
pub async fn place_clone(store: &dyn Store, project: &str, vm: &mut Value) -> Result<(), ApiError> {
    let source = vm["spec"]["rootDisk"]["source"].clone();
    if source.is_null() {
        return Ok(());
    }
    let name = vm["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut errs = FieldErrors::default();
    let (node, size) = match (source["vmSnapshot"].as_str(), source["vm"].as_str()) {
        (Some(snapshot), _) => {
            let field = "spec.rootDisk.source.vmSnapshot";
            let what = ("VMSnapshot", project, snapshot);
            match referenced(store, what, field, &mut errs).await? {
                None => (Value::Null, None),
                Some(s) => {
                    let root = s["status"]["disks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|d| d["volume"].is_null())
                        .cloned();
                    if s["status"]["phase"] != "Ready" {
                        errs.push(field, format!("snapshot {snapshot:?} is not Ready yet"));
                    } else if root.is_none() {
                        errs.push(field, format!("snapshot {snapshot:?} has no root disk"));
                    }
                    (
                        s["status"]["node"].clone(),
                        root.and_then(|r| r["size"].as_u64()),
                    )
                }
            }
        }
        (None, Some(source_vm)) => {
            let what = ("VirtualMachine", project, source_vm);
            match referenced(store, what, "spec.rootDisk.source.vm", &mut errs).await? {
                None => (Value::Null, None),
                Some(v) => {
                    if !v["spec"]["nodeName"].is_string() {
                        errs.push(
                            "spec.rootDisk.source.vm",
                            format!("VM {source_vm:?} is not on a node yet"),
                        );
                    }
                    (v["spec"]["nodeName"].clone(), None)
                }
            }
        }
        _ => (Value::Null, None),
    };
    let asked =
        flotilla_types::Quantity::parse(vm["spec"]["rootDisk"]["size"].as_str().unwrap_or("0"))
            .map(|q| q.value())
            .unwrap_or(0);
    if let Some(size) = size.filter(|s| u128::from(*s) > asked) {
        errs.push(
            "spec.rootDisk.size",
            format!("is smaller than the source's root disk ({size} bytes)"),
        );
    }
    if let (Some(node), Some(wanted)) = (node.as_str(), vm["spec"]["nodeName"].as_str()) {
        if node != wanted {
            errs.push(
                "spec.nodeName",
                format!("is {wanted:?}, but the root disk's source is on node {node:?}"),
            );
        }
    }
    errs.into_result()
        .map_err(|errs| ApiError::invalid("VirtualMachine", &name, &errs))?;
    if node.is_string() {
        vm["spec"]["nodeName"] = node;
    }
    Ok(())
}

/// Refuses (409, naming them) deleting a VM snapshot with newer ones of the same VM, or one
/// that VMs' root disks are linked clones of.
pub async fn check_delete(store: &dyn Store, project: &str, name: &str) -> Result<(), ApiError> {
    let vms = registry::by_kind("VirtualMachine").expect("registered");
    let resp = store
        .range(RangeRequest::prefix(&list_prefix(vms, Some(project))))
        .await?;
    let mut clones = Vec::new();
    for kv in &resp.kvs {
        let vm = parse_stored(kv)?;
        let source = &vm["spec"]["rootDisk"]["source"];
        if source["vmSnapshot"].as_str() == Some(name) && source["mode"] == "linked" {
            clones.push(
                vm["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    if !clones.is_empty() {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "VM snapshot {name:?} backs the root disk{} of VM{} {}: delete {} first",
                if clones.len() == 1 { "" } else { "s" },
                if clones.len() == 1 { "" } else { "s" },
                clones.join(", "),
                if clones.len() == 1 { "it" } else { "them" }
            ),
        ));
    }
    let snapshots = all(store, project).await?;
    let Some((revision, snapshot)) = snapshots
        .iter()
        .find(|(_, s)| s["metadata"]["name"].as_str() == Some(name))
    else {
        return Ok(());
    };
    let newer: Vec<&Value> = snapshots
        .iter()
        .filter(|(r, s)| s["spec"]["vm"] == snapshot["spec"]["vm"] && r > revision)
        .map(|(_, s)| s)
        .collect();
    if newer.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        409,
        "Conflict",
        format!(
            "VM snapshot {name:?} is the base of the newer snapshot{} {} of VM {}: snapshots are deleted newest first",
            if newer.len() == 1 { "" } else { "s" },
            names(&newer),
            snapshot["spec"]["vm"]
        ),
    ))
}

/// Refuses (409, naming them) deleting a VM, or a volume, that VM snapshots hold.
pub async fn check_holder_delete(
    store: &dyn Store,
    project: &str,
    kind: &str,
    name: &str,
) -> Result<(), ApiError> {
    let snapshots = all(store, project).await?;
    let holding: Vec<&Value> = snapshots
        .iter()
        .map(|(_, s)| s)
        .filter(|s| match kind {
            "VirtualMachine" => s["spec"]["vm"].as_str() == Some(name),
            _ => s["status"]["disks"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|d| d["volume"].as_str() == Some(name)),
        })
        .collect();
    if holding.is_empty() {
        return Ok(());
    }
    let what = if kind == "VirtualMachine" {
        "VM"
    } else {
        "volume"
    };
    Err(ApiError::new(
        409,
        "Conflict",
        format!(
            "{what} {name:?} is in the VM snapshot{} {}: delete {} first (newest first)",
            if holding.len() == 1 { "" } else { "s" },
            names(&holding),
            if holding.len() == 1 { "it" } else { "them" }
        ),
    ))
}
