//! Admission for storage: a pool that holds volumes cannot be deleted (their files would be
//! stranded on the nodes, and their own deletion could not find the pool).

use flotilla_store::{RangeRequest, Store};
use flotilla_types::registry;

use crate::error::ApiError;
use crate::objects::{list_prefix, parse_stored};

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
