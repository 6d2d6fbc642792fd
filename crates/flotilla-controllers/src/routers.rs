//! Routers and floating IPs: places each router on a node (Ready, not cordoned, matching its
//! `nodeSelector`, the one running the fewest routers) and places it again elsewhere when that
//! node stops being Ready or goes away — the new node's agent rebuilds it from the API; binds
//! each floating IP to its VM's NIC and to the router on that NIC's network whose external
//! network the address is on, gives every router the list of floating IPs it carries, and lists
//! a VM's floating IPs after its own addresses in its `status.ips`.
//! Runs on every change of a router, floating IP, VM or node (a burst costs one pass) and at
//! least every `resync`.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_server::objects::Objects;
use flotilla_server::ApiError;
use flotilla_types::kinds::FloatingMapping;
use flotilla_types::meta::{Condition, ConditionStatus};
use flotilla_types::{FloatingIP, Router, VirtualMachine};
use serde_json::json;

pub async fn run(objects: Objects, resync: Duration) {
    let kinds = ["Router", "FloatingIP", "VirtualMachine", "Node"];
    crate::on_changes(
        objects,
        &kinds,
        resync,
        "place routers or bind floating IPs",
        |o| async move { sweep(&o).await },
    )
    .await
}

struct NodeView {
    ready: bool,
    cordoned: bool,
    labels: BTreeMap<String, String>,
}

/// One pass; returns how many routers and floating IPs had their status written.
pub async fn sweep(objects: &Objects) -> Result<usize, ApiError> {
    let mut nodes: BTreeMap<String, NodeView> = BTreeMap::new();
    for node in crate::list_all::<flotilla_types::Node>(objects, "Node").await? {
        let ready = node.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True)
        });
        nodes.insert(
            node.metadata.name.clone(),
            NodeView {
                ready,
                cordoned: node.spec.unschedulable,
                labels: node.metadata.labels.clone(),
            },
        );
    }
    let routers: Vec<Router> = crate::list_all(objects, "Router").await?;
    let fips: Vec<FloatingIP> = crate::list_all(objects, "FloatingIP").await?;
    let vms: Vec<VirtualMachine> = crate::list_all(objects, "VirtualMachine").await?;
    let mut written = 0;

    // Floating IPs first: what each router carries follows from them.
    let mut carried: BTreeMap<(String, String), Vec<FloatingMapping>> = BTreeMap::new();
    let mut floating_of: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for fip in &fips {
        let project = fip.metadata.namespace.clone().unwrap_or_default();
        let status = fip.status.clone().unwrap_or_default();
        let (fixed, router, bound) = bind(fip, &project, &routers, &vms);
        if let (Some(address), Some(fixed), Some(router)) = (&status.address, &fixed, &router) {
            if let Some(vm) = &fip.spec.vm {
                floating_of
                    .entry((project.clone(), vm.clone()))
                    .or_default()
                    .push(address.clone());
            }
            carried
                .entry((project.clone(), router.clone()))
                .or_default()
                .push(FloatingMapping {
                    address: address.clone(),
                    fixed_address: fixed.clone(),
                });
        }
        let conditions = vec![condition(&status.conditions, "Bound", bound)];
        if status.fixed_address == fixed
            && status.router == router
            && status.conditions == conditions
        {
            continue;
        }
        let patch =
            json!({"status": {"fixedAddress": fixed, "router": router, "conditions": conditions}});
        written +=
            crate::write_status(objects, "FloatingIP", &project, &fip.metadata.name, patch).await?;
    }

    // A VM's status.ips: its NICs' addresses, then the floating IPs that forward to it.
    for vm in &vms {
        let project = vm.metadata.namespace.clone().unwrap_or_default();
        let Some(status) = &vm.status else {
            continue;
        };
        if status.interfaces.is_empty() {
            continue;
        }
        let mut ips: Vec<String> = status
            .interfaces
            .iter()
            .flat_map(|i| i.ips.iter().filter_map(|ip| ip.split('/').next()))
            .map(str::to_string)
            .collect();
        let mut floating = floating_of
            .remove(&(project.clone(), vm.metadata.name.clone()))
            .unwrap_or_default();
        floating.sort();
        ips.extend(floating);
        if status.ips != ips {
            let patch = json!({"status": {"ips": ips}});
            written += crate::write_status(
                objects,
                "VirtualMachine",
                &project,
                &vm.metadata.name,
                patch,
            )
            .await?;
        }
    }

    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for router in &routers {
        if let Some(node) = router.status.as_ref().and_then(|s| s.node_name.as_ref()) {
            *load.entry(node.clone()).or_default() += 1;
        }
    }
    for router in &routers {
        if router.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let project = router.metadata.namespace.clone().unwrap_or_default();
        let status = router.status.clone().unwrap_or_default();
        let fits = |name: &str, node: &NodeView| {
            node.ready
                && router
                    .spec
                    .node_selector
                    .iter()
                    .all(|(k, v)| node.labels.get(k) == Some(v))
                && !name.is_empty()
        };
        let current = status
            .node_name
            .clone()
            .filter(|n| nodes.get(n).is_some_and(|node| fits(n, node)));
        let node = match current {
            Some(node) => Some(node),
            None => {
                let pick = nodes
                    .iter()
                    .filter(|(name, node)| fits(name, node) && !node.cordoned)
                    .min_by_key(|(name, _)| {
                        (load.get(*name).copied().unwrap_or(0), name.to_string())
                    })
                    .map(|(name, _)| name.clone());
                if let Some(old) = &status.node_name {
                    if let Some(n) = load.get_mut(old) {
                        *n = n.saturating_sub(1);
                    }
                }
                if let Some(new) = &pick {
                    *load.entry(new.clone()).or_default() += 1;
                    tracing::info!(router = %router.metadata.name, from = ?status.node_name, to = %new, "placed a router");
                }
                pick
            }
        };
        let placed = match &node {
            Some(n) => Ok(format!("runs on node {n}")),
            None => Err(if router.spec.node_selector.is_empty() {
                "no Ready node can run it".to_string()
            } else {
                "no Ready node matches its nodeSelector".to_string()
            }),
        };
        let mut floating = carried
            .remove(&(project.clone(), router.metadata.name.clone()))
            .unwrap_or_default();
        floating.sort_by(|a, b| a.address.cmp(&b.address));
        let conditions = vec![condition(&status.conditions, "Placed", placed)];
        if status.node_name == node
            && status.floating_ips == floating
            && status.conditions == conditions
        {
            continue;
        }
        let patch = json!({"status": {"nodeName": node, "floatingIps": floating, "conditions": conditions}});
        written +=
            crate::write_status(objects, "Router", &project, &router.metadata.name, patch).await?;
    }
    Ok(written)
}

/// The VM address and router a floating IP forwards through, and whether it is bound (or why
/// not).
fn bind(
    fip: &FloatingIP,
    project: &str,
    routers: &[Router],
    vms: &[VirtualMachine],
) -> (Option<String>, Option<String>, Result<String, String>) {
    let Some(vm_name) = &fip.spec.vm else {
        return (None, None, Err("bound to no VM".into()));
    };
    let Some(vm) = vms
        .iter()
        .find(|v| v.metadata.namespace.as_deref() == Some(project) && &v.metadata.name == vm_name)
    else {
        return (None, None, Err(format!("there is no VM {vm_name:?}")));
    };
    // The router with this external network, on a network of the VM's chosen NIC.
    let router_for = |network: &str| {
        routers.iter().find(|r| {
            r.metadata.namespace.as_deref() == Some(project)
                && r.metadata.deletion_timestamp.is_none()
                && r.spec
                    .external
                    .as_ref()
                    .is_some_and(|e| e.network == fip.spec.network)
                && r.spec.networks.iter().any(|n| n == network)
        })
    };
    let interfaces = vm
        .status
        .as_ref()
        .map(|s| s.interfaces.as_slice())
        .unwrap_or_default();
    let candidates: Vec<_> = interfaces
        .iter()
        .filter(|i| fip.spec.nic.as_ref().is_none_or(|n| &i.name == n))
        .collect();
    if candidates.is_empty() {
        let nic = fip.spec.nic.as_deref().unwrap_or("any NIC");
        return (None, None, Err(format!("VM {vm_name:?} has no {nic}")));
    }
    for interface in candidates {
        let address = interface
            .ips
            .iter()
            .filter_map(|ip| ip.split('/').next())
            .find(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok());
        if let (Some(router), Some(address)) = (router_for(&interface.network), address) {
            return (
                Some(address.to_string()),
                Some(router.metadata.name.clone()),
                Ok(format!(
                    "forwards to {address} ({vm_name}/{}) through router {}",
                    interface.name, router.metadata.name
                )),
            );
        }
    }
    (
        None,
        None,
        Err(format!(
            "no router connects a network of VM {vm_name:?} to network {:?}",
            fip.spec.network
        )),
    )
}

/// A condition `type_` that is True with the Ok message or False with the Err one.
fn condition(before: &[Condition], type_: &str, now: Result<String, String>) -> Condition {
    match now {
        Ok(m) => crate::condition(before, type_, ConditionStatus::True, type_, m),
        Err(m) => crate::condition(
            before,
            type_,
            ConditionStatus::False,
            &format!("Not{type_}"),
            m,
        ),
    }
}
