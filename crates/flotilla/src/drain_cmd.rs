//! `flotilla node drain`: cordons a node, then moves every VM off it with one Migration each
//! (live when it runs, cold when it is stopped) and reports what could not move and why. The
//! migration controller runs them a few at a time (per node and per cluster) and picks their
//! targets; `uncordon` makes the node schedulable again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use flotilla_client::{Client, ListParams};
use flotilla_types::registry;
use serde_json::{json, Value};

use crate::output;

/// Label on a drain's Migrations, naming the drained node.
pub const DRAIN_LABEL: &str = "flotilla.dev/drain";

pub async fn drain(client: &Client, node: &str, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let nodes = registry::by_kind("Node").expect("registered");
    client
        .patch(
            nodes,
            None,
            node,
            &json!({"spec": {"unschedulable": true}}),
            false,
        )
        .await?;
    println!("node/{node} cordoned");
    let vms = registry::by_kind("VirtualMachine").expect("registered");
    let migrations = registry::by_kind("Migration").expect("registered");
    let list = client
        .list(
            vms,
            None,
            &ListParams {
                field_selector: Some(format!("spec.nodeName={node}")),
                ..Default::default()
            },
        )
        .await?;
    let mut failed: Vec<(String, String)> = Vec::new();
    // (project, migration) -> VM
    let mut pending: BTreeMap<(String, String), String> = BTreeMap::new();
    for vm in list["items"].as_array().into_iter().flatten() {
        let project = output::field(vm, "metadata.namespace");
        let name = output::field(vm, "metadata.name");
        let key = format!("{project}/{name}");
        if vm["metadata"].get("deletionTimestamp").is_some() {
            continue;
        }
        if vm["spec"]["adoptedDomain"].is_string() {
            failed.push((
                key,
                "an adopted domain: Flotilla drives its power only and does not move it".into(),
            ));
            continue;
        }
        let mode = if vm["status"]["phase"] == "Running" {
            "Live"
        } else {
            "Cold"
        };
        let body = json!({"metadata": {"generateName": format!("drain-{name}-"), "labels": {DRAIN_LABEL: node}},
            "spec": {"vm": name, "mode": mode}});
        match client.create(migrations, Some(&project), &body).await {
            Ok(m) => {
                pending.insert((project, output::field(&m, "metadata.name")), key);
            }
            Err(e) => failed.push((key, e.to_string())),
        }
    }
    let total = pending.len() + failed.len();
    println!("moving {} VMs off {node}", pending.len());
    let mut moved = 0;
    while !pending.is_empty() {
        if started.elapsed() > timeout {
            for ((project, name), key) in std::mem::take(&mut pending) {
                // Deleting a Migration aborts it; the VM stays where it is.
                let _ = client.delete(migrations, Some(&project), &name).await;
                failed.push((
                    key,
                    format!("not moved within {} s (aborted)", timeout.as_secs()),
                ));
            }
            break;
        }
        let keys: Vec<(String, String)> = pending.keys().cloned().collect();
        for (project, name) in keys {
            let m: Value = match client.get(migrations, Some(&project), &name).await {
                Ok(m) => m,
                Err(e) if e.code() == Some(404) => {
                    let key = pending.remove(&(project, name)).unwrap_or_default();
                    failed.push((key, "its Migration was deleted".into()));
                    continue;
                }
                Err(e) => return Err(anyhow!(e)),
            };
            let phase = output::field(&m, "status.phase");
            let key = || {
                pending
                    .get(&(project.clone(), name.clone()))
                    .cloned()
                    .unwrap_or_default()
            };
            match phase.as_str() {
                "Succeeded" => {
                    println!(
                        "moved {} to {} ({}, {} ms downtime)",
                        key(),
                        output::field(&m, "status.targetNode"),
                        if output::field(&m, "spec.mode").is_empty() {
                            "Live".to_string()
                        } else {
                            output::field(&m, "spec.mode")
                        },
                        output::field(&m, "status.downtimeMs")
                    );
                    moved += 1;
                    pending.remove(&(project, name));
                }
                "Failed" | "Aborted" => {
                    failed.push((key(), output::field(&m, "status.message")));
                    pending.remove(&(project, name));
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (vm, why) in &failed {
        println!("could not move {vm}: {why}");
    }
    println!(
        "node/{node} drained in {:.1} s: {moved} of {total} VMs moved{}",
        started.elapsed().as_secs_f64(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(", {} could not move", failed.len())
        }
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "{} VMs are still on {node} (see above); it stays cordoned",
            failed.len()
        ))
    }
}
