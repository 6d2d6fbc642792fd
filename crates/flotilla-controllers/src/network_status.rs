//! Network status: the nodes each network spans (those its VMs are bound to: the overlay must
//! reach them), where its tunnels end on them (their `status.addresses.tunnel`, so that agents,
//! which may read only their own Node, learn their flood lists), and how many of its addresses
//! NICs hold. Level-triggered, a pass every few
//! seconds; a network's status is written only when it changed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_ipam::Port;
use flotilla_server::ipam::PORTS_PREFIX;
use flotilla_server::objects::{ListOptions, Objects, PatchBody, Subresource};
use flotilla_server::ApiError;
use flotilla_store::RangeRequest;
use flotilla_types::registry::by_kind;
use flotilla_types::{Network, VirtualMachine};
use serde_json::json;

/// A pass every `every` (and one at start).
pub async fn run(objects: Objects, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = sweep(&objects).await {
            tracing::warn!(error = %e, "cannot update network status; trying again later");
        }
    }
}

/// One pass; returns how many networks' status changed.
pub async fn sweep(objects: &Objects) -> Result<usize, ApiError> {
    let (net_kind, vm_kind) = (
        by_kind("Network").expect("registered"),
        by_kind("VirtualMachine").expect("registered"),
    );
    // Nodes per (project, network), from the VMs bound to a node.
    let mut spans: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for raw in objects
        .list(vm_kind, None, &ListOptions::default())
        .await?
        .items
    {
        let Ok(vm) = serde_json::from_slice::<VirtualMachine>(&raw) else {
            continue;
        };
        let (Some(project), Some(node)) =
            (vm.metadata.namespace.clone(), vm.spec.node_name.clone())
        else {
            continue;
        };
        for nic in &vm.spec.networks {
            spans
                .entry((project.clone(), nic.network.clone()))
                .or_default()
                .insert(node.clone());
        }
    }
    // Tunnel addresses of the nodes.
    let node_kind = by_kind("Node").expect("registered");
    let mut tunnels: BTreeMap<String, String> = BTreeMap::new();
    for raw in objects
        .list(node_kind, None, &ListOptions::default())
        .await?
        .items
    {
        let Ok(node) = serde_json::from_slice::<serde_json::Value>(&raw) else {
            continue;
        };
        if let (Some(name), Some(address)) = (
            node["metadata"]["name"].as_str(),
            node["status"]["addresses"]["tunnel"].as_str(),
        ) {
            tunnels.insert(name.to_string(), address.to_string());
        }
    }
    // Addresses held per (project, network), from the ports.
    let mut used: BTreeMap<(String, String), u32> = BTreeMap::new();
    let ports = objects
        .store()
        .range(RangeRequest::prefix(PORTS_PREFIX))
        .await?;
    for kv in ports.kvs {
        let mut path = kv.key[PORTS_PREFIX.len()..].splitn(3, '/');
        let (Some(project), Some(network)) = (path.next(), path.next()) else {
            continue;
        };
        if serde_json::from_slice::<Port>(&kv.value).is_ok_and(|p| p.ip.is_some()) {
            *used
                .entry((project.to_string(), network.to_string()))
                .or_default() += 1;
        }
    }
    let mut changed = 0;
    for raw in objects
        .list(net_kind, None, &ListOptions::default())
        .await?
        .items
    {
        let Ok(network) = serde_json::from_slice::<Network>(&raw) else {
            continue;
        };
        let Some(project) = network.metadata.namespace.clone() else {
            continue;
        };
        let key = (project.clone(), network.metadata.name.clone());
        let nodes: Vec<String> = spans.remove(&key).unwrap_or_default().into_iter().collect();
        let addresses = network.spec.subnet().ok().flatten().map(|subnet| {
            flotilla_types::kinds::network::AddressUsage {
                used: used.get(&key).copied().unwrap_or(0),
                total: subnet.assignable_count(),
            }
        });
        let endpoints: Vec<flotilla_types::kinds::network::TunnelEndpoint> = nodes
            .iter()
            .filter_map(|node| {
                tunnels
                    .get(node)
                    .map(|address| flotilla_types::kinds::network::TunnelEndpoint {
                        node: node.clone(),
                        address: address.clone(),
                    })
            })
            .collect();
        let status = network.status.clone().unwrap_or_default();
        if status.nodes == nodes && status.addresses == addresses && status.endpoints == endpoints {
            continue;
        }
        let patch =
            json!({"status": {"nodes": nodes, "addresses": addresses, "endpoints": endpoints}});
        match objects
            .patch(
                net_kind,
                Some(&project),
                &network.metadata.name,
                PatchBody::Merge(patch),
                Subresource::Status,
            )
            .await
        {
            Ok(_) => changed += 1,
            Err(e) if e.code() == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(changed)
}
