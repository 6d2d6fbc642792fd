//! Network status: the nodes each network spans (those its VMs are bound to, and its router's:
//! the overlay must reach them), where its tunnels end on them (their `status.addresses.tunnel`, so that agents,
//! which may read only their own Node, learn their flood lists), and how many of its addresses
//! NICs hold; and its conditions: `Ready` (a VNI, every node it spans reachable by tunnel) and
//! `AddressesAvailable`. Level-triggered, a pass every few seconds; a network's status is
//! written only when it changed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_ipam::Port;
use flotilla_server::ipam::PORTS_PREFIX;
use flotilla_server::objects::{ListOptions, Objects, PatchBody, Subresource};
use flotilla_server::ApiError;
use flotilla_store::RangeRequest;
use flotilla_types::meta::{Condition, ConditionStatus};
use flotilla_types::registry::by_kind;
use flotilla_types::{Network, NetworkType, VirtualMachine};
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
    // A router's node carries each of its networks.
    let router_kind = by_kind("Router").expect("registered");
    for raw in objects
        .list(router_kind, None, &ListOptions::default())
        .await?
        .items
    {
        let Ok(router) = serde_json::from_slice::<flotilla_types::Router>(&raw) else {
            continue;
        };
        let (Some(project), Some(node)) = (
            router.metadata.namespace.clone(),
            router.status.as_ref().and_then(|s| s.node_name.clone()),
        ) else {
            continue;
        };
        for network in &router.spec.networks {
            spans
                .entry((project.clone(), network.clone()))
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
        let conditions = conditions(&network, &nodes, &endpoints, addresses.as_ref());
        if status.nodes == nodes
            && status.addresses == addresses
            && status.endpoints == endpoints
            && status.conditions == conditions
        {
            continue;
        }
        let patch = json!({"status": {"nodes": nodes, "addresses": addresses, "endpoints": endpoints,
                                      "conditions": conditions}});
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

/// The network's conditions now, keeping each one's transition time while it stays the same.
fn conditions(
    network: &Network,
    nodes: &[String],
    endpoints: &[flotilla_types::kinds::network::TunnelEndpoint],
    addresses: Option<&flotilla_types::kinds::network::AddressUsage>,
) -> Vec<Condition> {
    let vni = network.status.as_ref().and_then(|s| s.vni);
    let (ready, reason, message) = match network.spec.network_type {
        NetworkType::Bridged => (
            true,
            "Ready",
            format!(
                "NICs attach to bridge {} on their nodes",
                network.spec.bridge.as_deref().unwrap_or_default()
            ),
        ),
        NetworkType::Overlay => {
            let unreachable: Vec<&str> = nodes
                .iter()
                .filter(|n| !endpoints.iter().any(|e| &e.node == *n))
                .map(String::as_str)
                .collect();
            match vni {
                None => (false, "NoVNI", "the network has no VNI yet".to_string()),
                Some(_) if !unreachable.is_empty() => (
                    false,
                    "NodesWithoutTunnel",
                    format!(
                        "node{} {} report no tunnel address (flotilla agent --tunnel-address): their VMs cannot reach the network's other nodes",
                        if unreachable.len() == 1 { "" } else { "s" },
                        unreachable.join(", ")
                    ),
                ),
                Some(vni) => (
                    true,
                    "Ready",
                    format!("VNI {vni}, spanning {} node{}", nodes.len(), if nodes.len() == 1 { "" } else { "s" }),
                ),
            }
        }
    };
    let mut now = vec![("Ready", ready, reason.to_string(), message)];
    if let Some(a) = addresses {
        let free = a.total.saturating_sub(a.used);
        now.push(if free > 0 {
            (
                "AddressesAvailable",
                true,
                "Available".into(),
                format!("{free} of {} addresses free", a.total),
            )
        } else {
            (
                "AddressesAvailable",
                false,
                "Exhausted".into(),
                format!(
                    "all {} addresses are held: new NICs on this network are refused",
                    a.total
                ),
            )
        });
    }
    let before = network
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    now.into_iter()
        .map(|(type_, ok, reason, message)| {
            let status = if ok {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            };
            match before.iter().find(|c| c.type_ == type_) {
                Some(c) if c.status == status && c.reason == reason && c.message == message => {
                    c.clone()
                }
                Some(c) if c.status == status => Condition {
                    reason,
                    message,
                    ..c.clone()
                },
                _ => Condition {
                    type_: type_.to_string(),
                    status,
                    reason,
                    message,
                    last_transition_time: Some(flotilla_types::meta::now()),
                    observed_generation: None,
                },
            }
        })
        .collect()
}
