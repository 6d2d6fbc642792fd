//! Placement placeholder: a VM without `spec.nodeName` goes to the Ready, schedulable node that
//! has the fewest VMs. The scheduler issue replaces this file with filters, scores and atomic
//! capacity claims; the contract stays: bind by writing `spec.nodeName` (guarded by the VM's
//! resourceVersion) and say why in the `Scheduled` condition.

use std::collections::HashMap;
use std::time::Duration;

use flotilla_server::objects::{ListOptions, Objects, PatchBody};
use flotilla_server::Subresource;
use flotilla_types::meta::now;
use flotilla_types::registry;
use flotilla_types::selector::FieldSelector;
use serde_json::{json, Value};

fn items(raw: Vec<Vec<u8>>) -> Vec<Value> {
    raw.into_iter()
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

fn ready(node: &Value) -> bool {
    let ready = node["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    ready && node["spec"]["unschedulable"] != true
}

/// One pass: binds every unbound VM it can; returns how many.
pub async fn schedule_pending(objects: &Objects) -> Result<usize, flotilla_server::ApiError> {
    let (vms_kind, nodes_kind) = (
        registry::by_kind("VirtualMachine").unwrap(),
        registry::by_kind("Node").unwrap(),
    );
    let vms = items(
        objects
            .list(vms_kind, None, &ListOptions::default())
            .await?
            .items,
    );
    let nodes: Vec<Value> = items(
        objects
            .list(nodes_kind, None, &ListOptions::default())
            .await?
            .items,
    );
    let mut load: HashMap<String, usize> = nodes
        .iter()
        .filter(|n| ready(n))
        .map(|n| {
            (
                n["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                0,
            )
        })
        .collect();
    let unbound =
        FieldSelector::parse("spec.nodeName=", &["spec.nodeName"]).expect("valid selector");
    for vm in &vms {
        if let Some(n) = vm["spec"]["nodeName"].as_str() {
            if let Some(count) = load.get_mut(n) {
                *count += 1;
            }
        }
    }
    let mut bound = 0;
    for vm in vms
        .iter()
        .filter(|v| unbound.matches(v) && v["metadata"].get("deletionTimestamp").is_none())
    {
        let (ns, name) = (
            vm["metadata"]["namespace"].as_str(),
            vm["metadata"]["name"].as_str().unwrap_or_default(),
        );
        let Some((node, _)) = load.iter().min_by_key(|(n, c)| (**c, (*n).clone())) else {
            let message = format!(
                "0/{} nodes are available: none is Ready and schedulable",
                nodes.len()
            );
            let already = vm["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Scheduled" && c["message"] == message)
            });
            if !already {
                let status = json!({"status": {"phase": "Pending", "conditions": [
                    {"type": "Scheduled", "status": "False", "reason": "Unschedulable", "message": message, "lastTransitionTime": now()}]}});
                let _ = objects
                    .patch(
                        vms_kind,
                        ns,
                        name,
                        PatchBody::Merge(status),
                        Subresource::Status,
                    )
                    .await;
            }
            continue;
        };
        let node = node.clone();
        let bind = PatchBody::Merge(
            json!({"metadata": {"resourceVersion": vm["metadata"]["resourceVersion"]}, "spec": {"nodeName": node}}),
        );
        match objects
            .patch(vms_kind, ns, name, bind, Subresource::Main)
            .await
        {
            Ok(_) => {
                *load.get_mut(&node).expect("chosen from the map") += 1;
                bound += 1;
                let status = json!({"status": {"phase": "Scheduled", "nodeName": node, "conditions": [
                    {"type": "Scheduled", "status": "True", "reason": "Scheduled", "message": format!("placed on {node}"), "lastTransitionTime": now()}]}});
                let _ = objects
                    .patch(
                        vms_kind,
                        ns,
                        name,
                        PatchBody::Merge(status),
                        Subresource::Status,
                    )
                    .await;
                tracing::debug!(vm = name, node = %node, "scheduled");
            }
            Err(e) if e.code() == 409 || e.code() == 404 => {}
            Err(e) => tracing::warn!(vm = name, error = %e, "could not bind"),
        }
    }
    Ok(bound)
}

pub async fn run(objects: Objects, resync: Duration) {
    // One watch for the controller's lifetime: a change between two passes is never missed.
    let mut events = None;
    loop {
        if events.is_none() {
            events = objects.store().watch("/registry/", 0).await.ok();
        }
        if let Err(e) = schedule_pending(&objects).await {
            tracing::warn!(error = %e, "scheduling pass failed");
        }
        let relevant = |ev: &flotilla_store::WatchEvent| {
            ev.kv.key.starts_with("/registry/virtualmachines/")
                || ev.kv.key.starts_with("/registry/nodes/")
        };
        match events.as_mut() {
            Some(stream) => {
                if !crate::wait_for_change(stream, resync, relevant).await {
                    events = None;
                }
            }
            None => tokio::time::sleep(resync).await,
        }
    }
}
