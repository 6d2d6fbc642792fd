//! The routers the control plane placed on this node (`Router.status.nodeName`), each run in a
//! network namespace of its own (`flotilla-router-<id>`) by `flotilla-dataplane`: a port on
//! each of its networks' bridges holding the gateway, one on the external network's bridge
//! with its address and floating IPs, SNAT and DNAT in its own table. Rebuilt from the API on
//! every change of a router and every few seconds (a moved router, a crash, a network's flood
//! list); a router placed elsewhere, or gone, is removed — its namespace and so its ports.
//! A router out through the node's uplink gets a link address of [`UPLINK_LINKS`] unique on
//! this node ([`uplink_addresses`]); the node's masquerade table exists while one runs here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_dataplane::namespace::{ensure_namespace, namespaces_with_prefix, remove_namespace};
use flotilla_dataplane::{
    External, ExternalPort, Router as RouterPlan, RouterNetwork, UPLINK_LINKS, UPLINK_NODE_ADDRESS,
};
use flotilla_types::registry::lookup;
use flotilla_types::{EventType, Network, NetworkType, ObjectReference, Router};

use crate::error::AgentError;
use crate::follow::{follow, Mirror};
use crate::vm::Context;

/// Namespaces of routers start with this.
pub const NAMESPACE_PREFIX: &str = "flotilla-router-";

/// A router's number on this node, from its uid: names its namespace and external port.
pub fn router_id(uid: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in uid.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % 100_000_000
}

/// The link addresses of the uplink routers on this node, by uid: each router's address is
/// picked from its uid (so it stays when others come and go) and, when taken, the next free
/// one — routers placed earlier (by creation time) keep theirs.
pub fn uplink_addresses(routers: &[&Router]) -> BTreeMap<String, Ipv4Addr> {
    let (base, len) = UPLINK_LINKS;
    let base = u32::from(base);
    // .0 is the network, .1 the node's end, the last the broadcast.
    let slots = (1u32 << (32 - len)) - 3;
    let mut uplinks: Vec<&&Router> = routers
        .iter()
        .filter(|r| r.spec.external.as_ref().is_some_and(|e| e.uplink))
        .collect();
    uplinks.sort_by_key(|r| (r.metadata.creation_timestamp, r.metadata.uid.clone()));
    let mut taken = BTreeSet::new();
    let mut addresses = BTreeMap::new();
    for router in uplinks.into_iter().take(slots as usize) {
        let uid = router.metadata.uid.clone().unwrap_or_default();
        let mut slot = router_id(&uid) % slots;
        while !taken.insert(slot) {
            slot = (slot + 1) % slots;
        }
        let address = Ipv4Addr::from(base + 2 + slot);
        debug_assert_ne!(address, UPLINK_NODE_ADDRESS);
        addresses.insert(uid, address);
    }
    addresses
}

/// Follows the Routers and keeps the ones placed here running until the task is aborted.
pub async fn run(ctx: Arc<Context>, every: Duration) {
    let Some(overlays) = ctx.overlays.clone() else {
        return;
    };
    let mut seen = follow(ctx.client.clone(), lookup("router").expect("registered"));
    let mut routers = Mirror::<Router>::new(|r: &Router| r.metadata.uid.clone());
    let mut failing: BTreeMap<String, String> = BTreeMap::new();
    // Whether the node's uplink masquerade may still be there (a restarted agent checks).
    let mut uplink_nat = true;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            got = seen.recv() => {
                let Some(got) = got else { return };
                routers.apply(got);
            }
            _ = tick.tick() => {}
        }
        if !routers.listed {
            continue;
        }
        let mine: Vec<&Router> = routers
            .items
            .values()
            .filter(|r| {
                r.metadata.deletion_timestamp.is_none()
                    && r.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&ctx.node)
            })
            .collect();
        let mut keep = BTreeSet::new();
        let mut vnis = BTreeSet::new();
        let links = uplink_addresses(&mine);
        for router in mine {
            let uid = router.metadata.uid.clone().unwrap_or_default();
            keep.insert(format!("{NAMESPACE_PREFIX}{}", router_id(&uid)));
            match ensure(&ctx, &overlays, router, links.get(&uid).copied()).await {
                Ok(used) => {
                    vnis.extend(used);
                    if failing.remove(&uid).is_some() {
                        tracing::info!(router = %router.metadata.name, "router running again");
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    if failing.get(&uid) != Some(&message) {
                        tracing::warn!(router = %router.metadata.name, error = %message, "cannot run a router; retrying");
                        let regarding = ObjectReference {
                            kind: "Router".into(),
                            api_version: Some(flotilla_types::API_VERSION.into()),
                            namespace: router.metadata.namespace.clone(),
                            name: router.metadata.name.clone(),
                            uid: router.metadata.uid.clone(),
                            ..Default::default()
                        };
                        ctx.recorder
                            .record(&regarding, EventType::Warning, "RouterFailed", &message)
                            .await;
                        failing.insert(uid, message);
                    }
                }
            }
        }
        overlays.keep_for_routers(vnis);
        for namespace in namespaces_with_prefix(NAMESPACE_PREFIX) {
            if !keep.contains(&namespace) {
                // Its veth pairs go with the namespace's ends of them.
                match remove_namespace(&namespace) {
                    Ok(()) => tracing::info!(%namespace, "removed a router no longer placed here"),
                    Err(e) => {
                        tracing::warn!(%namespace, error = %e, "cannot remove a router's namespace")
                    }
                }
            }
        }
        if !links.is_empty() {
            uplink_nat = true;
        } else if uplink_nat {
            match overlays.netlink().ensure_uplink_nat(false).await {
                Ok(()) => uplink_nat = false,
                Err(e) => tracing::warn!(error = %e, "cannot remove the uplink masquerade table"),
            }
        }
    }
}

/// Makes `router` run here; returns the VNIs of its networks.
async fn ensure(
    ctx: &Context,
    overlays: &crate::overlays::Overlays,
    router: &Router,
    uplink: Option<Ipv4Addr>,
) -> Result<Vec<u32>, AgentError> {
    let project = router.metadata.namespace.clone().unwrap_or_default();
    let uid = router.metadata.uid.clone().unwrap_or_default();
    let status = router.status.clone().unwrap_or_default();
    let kind = lookup("network").expect("registered");
    let get = |name: String| {
        let project = project.clone();
        async move {
            let v = ctx.client.get(kind, Some(&project), &name).await?;
            serde_json::from_value::<Network>(v)
                .map_err(|e| AgentError::Config(format!("network {name:?}: {e}")))
        }
    };
    let port_mac = |name: &str| {
        status
            .interfaces
            .iter()
            .find(|i| i.name == name)
            .and_then(|i| crate::firewall::parse_mac(&i.mac_address))
    };
    let mut networks = Vec::new();
    for name in &router.spec.networks {
        let network = get(name.clone()).await?;
        let vni = network
            .status
            .as_ref()
            .and_then(|s| s.vni)
            .ok_or_else(|| AgentError::Config(format!("network {name:?} has no VNI yet")))?;
        let subnet = network
            .spec
            .subnet()
            .ok()
            .flatten()
            .ok_or_else(|| AgentError::Config(format!("network {name:?} has no cidr")))?;
        overlays.ensure(&ctx.node, &network, true).await?;
        networks.push(RouterNetwork {
            vni,
            network: subnet.cidr.network(),
            prefix_len: subnet.cidr.prefix(),
            gateway: subnet.gateway,
            mtu: overlays.mtu_for(&network)?,
            mac: port_mac(name),
        });
    }
    let external = match &router.spec.external {
        None => None,
        Some(external) if external.uplink => {
            let route = overlays.netlink().default_route().await;
            if route
                .map_err(|e| AgentError::Config(e.to_string()))?
                .is_none()
            {
                return Err(AgentError::Config(format!(
                    "node {} has no IPv4 default route for the router to leave through",
                    ctx.node
                )));
            }
            let address = uplink.ok_or_else(|| {
                AgentError::Config(format!(
                    "node {} has no link address left for another uplink router",
                    ctx.node
                ))
            })?;
            Some(External::Uplink(address))
        }
        Some(external) => {
            let network = get(external.network.clone()).await?;
            let (Some(bridge), Some(subnet)) = (
                network
                    .bridge_name()
                    .filter(|_| network.spec.network_type == NetworkType::Bridged),
                network.spec.subnet().ok().flatten(),
            ) else {
                return Err(AgentError::Config(format!(
                    "the external network {:?} is not a bridged network with a cidr",
                    external.network
                )));
            };
            if !std::path::Path::new("/sys/class/net")
                .join(&bridge)
                .exists()
            {
                return Err(AgentError::Config(format!(
                    "the external network's bridge {bridge} does not exist on node {} (run routers on nodes that have it: spec.nodeSelector)",
                    ctx.node
                )));
            }
            let address: Ipv4Addr = status
                .external_address
                .as_deref()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| AgentError::Config("the router has no external address".into()))?;
            Some(External::Bridge(ExternalPort {
                bridge,
                address,
                prefix_len: subnet.cidr.prefix(),
                gateway: subnet.gateway,
                mtu: network.nic_mtu(),
                mac: port_mac("external"),
            }))
        }
    };
    let floating = status
        .floating_ips
        .iter()
        .filter_map(|f| Some((f.address.parse().ok()?, f.fixed_address.parse().ok()?)))
        .collect();
    let routes = router
        .spec
        .routes
        .iter()
        .filter_map(|r| {
            let (dst, len) = flotilla_types::kinds::security_group::parse_cidr(&r.destination)?;
            Some((dst, len, r.via.parse().ok()?))
        })
        .collect();
    let id = router_id(&uid);
    let namespace = ensure_namespace(&format!("{NAMESPACE_PREFIX}{id}"))
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let vnis = networks.iter().map(|n| n.vni).collect();
    overlays
        .netlink()
        .ensure_router(&RouterPlan {
            id,
            namespace,
            networks,
            external,
            floating,
            routes,
        })
        .await
        .map_err(|e| AgentError::Config(format!("router {:?}: {e}", router.metadata.name)))?;
    Ok(vnis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(uid: &str, created: &str, uplink: bool) -> Router {
        let mut r: Router = serde_json::from_value(serde_json::json!({
            "metadata": {"name": uid, "namespace": "p", "uid": uid, "creationTimestamp": created},
            "spec": {"external": if uplink { serde_json::json!({"uplink": true}) } else { serde_json::json!({"network": "lan"}) }},
        }))
        .unwrap();
        r.status = None;
        r
    }

    #[test]
    fn uplink_routers_get_distinct_stable_link_addresses() {
        let (a, b, lan) = (
            router("a", "2026-01-01T00:00:00Z", true),
            router("b", "2026-01-02T00:00:00Z", true),
            router("c", "2026-01-03T00:00:00Z", false),
        );
        let both = uplink_addresses(&[&b, &lan, &a]);
        assert_eq!(both.len(), 2, "only uplink routers get one: {both:?}");
        assert_ne!(both["a"], both["b"]);
        for address in both.values() {
            let (base, len) = UPLINK_LINKS;
            assert_eq!(
                u32::from(*address) >> (32 - len),
                u32::from(base) >> (32 - len)
            );
            assert_ne!(*address, UPLINK_NODE_ADDRESS);
        }
        // A router's address does not depend on the others.
        assert_eq!(uplink_addresses(&[&a])["a"], both["a"]);
        assert_eq!(uplink_addresses(&[&b])["b"], both["b"]);
        // Many routers: all distinct, all in the range.
        let many: Vec<Router> = (0..2000)
            .map(|i| router(&format!("r{i}"), "2026-01-01T00:00:00Z", true))
            .collect();
        let addresses = uplink_addresses(&many.iter().collect::<Vec<_>>());
        let distinct: BTreeSet<_> = addresses.values().collect();
        assert_eq!(distinct.len(), 2000);
        assert!(!distinct.contains(&UPLINK_NODE_ADDRESS));
    }
}
