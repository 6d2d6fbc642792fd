//! The target's side of a migration: prepare the VM, report it running, resume a guest that
//! landed paused, and remove what a failed migration prepared.

use std::time::Instant;

use flotilla_types::registry::lookup;
use flotilla_types::{EventType, Migration, MigrationMode, VirtualMachine};
use serde_json::json;

use super::{event, report};
use crate::error::AgentError;
use crate::libvirt::DomainState;
use crate::vm::Context;

/// The target's part, one step at a time (called again every second and at every change).
pub(super) async fn incoming_step(ctx: &Context, m: &Migration) -> Result<(), AgentError> {
    let status = m.status.clone().unwrap_or_default();
    let uid = status.vm_uid.clone();
    if uid.is_empty() {
        return Ok(());
    }
    match status.phase.as_str() {
        "Preparing" if !status.target_ready && m.metadata.deletion_timestamp.is_none() => {
            let vms = lookup("vm").expect("registered");
            let project = m.metadata.namespace.as_deref();
            let vm: VirtualMachine =
                serde_json::from_value(ctx.client.get(vms, project, &m.spec.vm).await?)
                    .map_err(|e| AgentError::Config(format!("the VM cannot be read: {e}")))?;
            if vm.metadata.uid.as_deref() != Some(uid.as_str()) {
                return Ok(());
            }
            let started = Instant::now();
            match crate::vm::prepare_incoming(ctx, &vm).await {
                Ok(()) => {
                    let dir = ctx.vm_dir(&uid);
                    tracing::info!(vm = %vm.metadata.name, ms = started.elapsed().as_millis() as u64, "prepared for an incoming migration");
                    report(
                        ctx,
                        m,
                        json!({"targetReady": true, "targetVmDir": dir, "message": format!("{} is ready to take the VM", ctx.node)}),
                    )
                    .await?;
                }
                Err(e) => {
                    let message = format!("{} cannot prepare the VM: {e}", ctx.node);
                    event(ctx, m, EventType::Warning, "PrepareFailed", &message).await;
                    report(
                        ctx,
                        m,
                        json!({"phase": "Failed", "reason": "PrepareFailed", "message": message, "completionTime": flotilla_types::meta::now()}),
                    )
                    .await?;
                }
            }
        }
        "Migrating" | "Succeeded" => {
            let state = ctx.libvirt.state(&uid).await?;
            if state == Some(DomainState::Running) && !status.target_running {
                report(ctx, m, json!({"targetRunning": true})).await?;
            }
            // A suspended (or cold) move lands paused: the guest goes on once the copy is done.
            let landed_paused = m.spec.suspend || m.spec.mode == MigrationMode::Cold;
            if status.phase == "Succeeded" && landed_paused && state == Some(DomainState::Paused) {
                let vms = lookup("vm").expect("registered");
                let vm = ctx
                    .client
                    .get(vms, m.metadata.namespace.as_deref(), &m.spec.vm)
                    .await?;
                if vm["spec"]["powerState"] == "Stopped" {
                    ctx.libvirt.destroy(&uid).await?;
                } else {
                    ctx.libvirt.resume(&uid).await?;
                    tracing::info!(vm = %m.spec.vm, "resumed after the move");
                }
            }
        }
        "Failed" | "Aborted" if ctx.vm_dir(&uid).exists() => {
            // libvirt keeps the domain on one side only; a failed move leaves it on the source.
            let bound_here = {
                let vms = lookup("vm").expect("registered");
                let vm = ctx
                    .client
                    .get(vms, m.metadata.namespace.as_deref(), &m.spec.vm)
                    .await;
                matches!(vm, Ok(vm) if vm["spec"]["nodeName"] == ctx.node.as_str() && vm["metadata"]["uid"] == uid.as_str())
            };
            if !bound_here && ctx.libvirt.state(&uid).await?.is_none() {
                crate::vm::remove_everything(ctx, &uid).await?;
                if let Some(firewall) = &ctx.firewall {
                    firewall.remove_vm(&uid);
                }
                ctx.unused_overlays.notify_one();
                tracing::info!(vm = %m.spec.vm, "removed what an unfinished incoming migration prepared");
            }
        }
        _ => {}
    }
    Ok(())
}
