//! The node following its Networks and SecurityGroups. Each change of a Network this node
//! carries (a node joining or leaving it changes `status.endpoints`; a VM made or deleted
//! anywhere changes its address count) re-ensures the network's overlay and DHCP server here at
//! once — flood lists and DNS names of VMs on other nodes — rather than at the next reconcile of
//! one of its VMs here; and the node's firewall hears of every network's bridge and every
//! group's rules and members, so a rule change is applied here as soon as it is made.

use std::collections::BTreeSet;
use std::sync::Arc;

use flotilla_types::registry::lookup;
use flotilla_types::{Network, SecurityGroup};

use crate::firewall::Listed;
use crate::follow::{follow, Seen};
use crate::vm::Context;

pub async fn follow_networks(ctx: Arc<Context>) {
    let kind = lookup("network").expect("registered");
    let mut seen = follow(ctx.client.clone(), kind);
    while let Some(seen) = seen.recv().await {
        match seen {
            Seen::Listed(items) => {
                for item in &items {
                    refresh(&ctx, item).await;
                }
                if let Some(firewall) = &ctx.firewall {
                    firewall.listed(Listed::Networks);
                }
            }
            Seen::Changed(item) => refresh(&ctx, &item).await,
            Seen::Deleted(_) => {}
        }
    }
}

pub async fn follow_security_groups(ctx: Arc<Context>) {
    let Some(firewall) = ctx.firewall.clone() else {
        return;
    };
    let kind = lookup("securitygroup").expect("registered");
    let decode = |v: &serde_json::Value| serde_json::from_value::<SecurityGroup>(v.clone()).ok();
    let mut seen = follow(ctx.client.clone(), kind);
    while let Some(seen) = seen.recv().await {
        match seen {
            Seen::Listed(items) => {
                let mut keys = BTreeSet::new();
                for group in items.iter().filter_map(decode) {
                    keys.insert((
                        group.metadata.namespace.clone().unwrap_or_default(),
                        group.metadata.name.clone(),
                    ));
                    firewall.set_group(group);
                }
                firewall.retain_groups(&keys);
                firewall.listed(Listed::Groups);
            }
            Seen::Changed(item) => {
                if let Some(group) = decode(&item) {
                    firewall.set_group(group);
                }
            }
            Seen::Deleted(item) => {
                if let Some(group) = decode(&item) {
                    let project = group.metadata.namespace.unwrap_or_default();
                    firewall.remove_group(&project, &group.metadata.name);
                }
            }
        }
    }
}

/// Tells the firewall of `network`'s bridge, and re-ensures its overlay and DHCP server if this
/// node carries it.
async fn refresh(ctx: &Context, network: &serde_json::Value) {
    let Ok(network) = serde_json::from_value::<Network>(network.clone()) else {
        return;
    };
    if let Some(firewall) = &ctx.firewall {
        firewall.set_network(&network);
    }
    let Some(overlays) = &ctx.overlays else {
        return;
    };
    let (Some(vni), Some(project)) = (
        network.status.as_ref().and_then(|s| s.vni),
        network.metadata.namespace.clone(),
    ) else {
        return;
    };
    if !overlays.present().await.is_ok_and(|p| p.contains(&vni)) {
        return;
    }
    let result = async {
        overlays.ensure(&ctx.node, &network, false).await?;
        let mtu = overlays.mtu_for(&network)?;
        crate::vm::serve_dhcp(ctx, &project, &network, mtu).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(network = %network.metadata.name, error = %e, "cannot update a network on this node");
    }
}
