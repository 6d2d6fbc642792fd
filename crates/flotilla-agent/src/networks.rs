//! The node following its Networks: each change of a Network this node carries (a node joining
//! or leaving it changes `status.endpoints`; a VM made or deleted anywhere changes its address
//! count) re-ensures the network's overlay and DHCP server here at once — flood lists and DNS
//! names of VMs on other nodes — rather than at the next reconcile of one of its VMs here.
//! Relists after a broken watch.

use std::sync::Arc;
use std::time::Duration;

use flotilla_client::ListParams;
use flotilla_types::registry::lookup;
use flotilla_types::Network;

use crate::vm::Context;

pub async fn follow(ctx: Arc<Context>) {
    let kind = lookup("network").expect("registered");
    loop {
        let list = match ctx.client.list(kind, None, &ListParams::default()).await {
            Ok(list) => list,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list networks; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        for item in list["items"].as_array().into_iter().flatten() {
            refresh(&ctx, item).await;
        }
        let events = match ctx
            .client
            .watch(kind, None, &ListParams::default(), Some(&rv))
            .await
        {
            Ok(events) => events,
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch networks; relisting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut events = std::pin::pin!(events);
        while let Some(Ok(event)) = futures::StreamExt::next(&mut events).await {
            match event.type_.as_str() {
                "ADDED" | "MODIFIED" => refresh(&ctx, &event.object).await,
                "ERROR" => break,
                _ => {}
            }
        }
    }
}

/// Re-ensures the overlay and DHCP server of `network` if this node carries it.
async fn refresh(ctx: &Context, network: &serde_json::Value) {
    let Some(overlays) = &ctx.overlays else {
        return;
    };
    let Ok(network) = serde_json::from_value::<Network>(network.clone()) else {
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
