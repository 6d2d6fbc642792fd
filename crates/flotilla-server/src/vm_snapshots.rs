//! Admission for VM snapshots: one names a VM of its project that runs on a node and whose
//! volumes can carry overlays (qcow2, not shareable); they are deleted newest first (each is
//! the base of the next); a VM or a volume with VM snapshots is not deleted (their files live
//! in the VM's directory and in the volume's chain).

use flotilla_store::{RangeRequest, Store};
use flotilla_types::registry;
use flotilla_types::validation::FieldErrors;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::objects::{list_prefix, object_key, parse_stored};

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
    let vms = registry::by_kind("VirtualMachine").expect("registered");
    let mut errs = FieldErrors::default();
    let field = "spec.vm";
    match store.get(&object_key(vms, Some(project), &vm_name)).await? {
        None => errs.push(
            field,
            format!("project {project:?} has no VirtualMachine {vm_name:?}"),
        ),
        Some(kv) => {
            let vm = parse_stored(&kv)?;
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
                let why = if v["spec"]["format"].as_str() == Some("raw") {
                    "is raw: snapshots need qcow2 (its overlays hold the changes)"
                } else if v["spec"]["shareable"] == true {
                    "is shareable: several guests write it, so no moment is one snapshot"
                } else {
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

/// Refuses (409, naming them) deleting a VM snapshot with newer ones of the same VM.
pub async fn check_delete(store: &dyn Store, project: &str, name: &str) -> Result<(), ApiError> {
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
