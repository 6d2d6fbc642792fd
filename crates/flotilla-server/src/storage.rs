//! Admission for storage: a pool that holds volumes cannot be deleted (their files would be
//! stranded on the nodes, and their own deletion could not find the pool); a clone names a
//! volume of its project in the same pool, and a volume linked clones are overlays of cannot be
//! deleted before them — the control plane's own backing graph (libvirt would delete the file
//! and leave the clones broken; the pool on the node refuses too).

use flotilla_store::{RangeRequest, Store};
use flotilla_types::registry;
use flotilla_types::validation::FieldErrors;
use serde_json::Value;

use crate::error::ApiError;
use crate::objects::{list_prefix, object_key, parse_stored};

/// Refuses (422 at `spec.source.volume`) a clone of a volume the project does not have, or one
/// in another pool; and one smaller than what it clones.
pub async fn check_source(
    store: &dyn Store,
    project: &str,
    volume: &Value,
) -> Result<(), ApiError> {
    let Some(source) = volume["spec"]["source"]["volume"].as_str() else {
        return Ok(());
    };
    let kind = registry::by_kind("Volume").expect("registered");
    let name = volume["metadata"]["name"].as_str().unwrap_or_default();
    let mut errs = FieldErrors::default();
    match store.get(&object_key(kind, Some(project), source)).await? {
        None => errs.push(
            "spec.source.volume",
            format!("project {project:?} has no Volume {source:?}"),
        ),
        Some(kv) => {
            let from = parse_stored(&kv)?;
            if from["spec"]["pool"] != volume["spec"]["pool"] {
                errs.push(
                    "spec.source.volume",
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
            if let (Some(want), Some(has)) = (size(volume), size(&from)) {
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

/// Refuses (409, naming them) deleting a volume that linked clones are overlays of.
pub async fn check_volume_delete(
    store: &dyn Store,
    project: &str,
    name: &str,
) -> Result<(), ApiError> {
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
