//! Moving a VM between nodes, as its two agents see it.
//!
//! - **Target**: a Migration naming this node as its target, in phase Preparing, makes the
//!   agent prepare the VM here exactly as it would to run it (image cached, an empty overlay on
//!   it, seed, networks, security group rules) without defining the domain, then set
//!   `targetReady`. Until the migration has ended, the sweeps leave those files alone. A
//!   migration that failed leaves nothing here.
//! - **Source**: once the target is ready, the VM's actor runs libvirt's peer-to-peer
//!   migration to the target's libvirt ([`drive`]): the domain's own XML with its paths moved
//!   to the target's directory, the VM's overlay copied by incremental block migration (only
//!   what the VM wrote; the image is cached on the target), a blank root disk by a full copy,
//!   nothing else (shared volumes). Progress goes into the Migration's status every second; a
//!   deleted Migration aborts the copy, and the VM stays here. A cold migration starts the
//!   stopped domain paused (its CPUs never run) and moves it the same way; on the target it is
//!   resumed as a fresh boot, or destroyed if it should stay stopped.
//! - **Outcome**: libvirt leaves the domain running on exactly one side. The source reports
//!   how it ended; the migration controller then binds the VM to the target, whose agent takes
//!   it over as it is, and the source's agent removes what is left here. An agent that restarts
//!   in the middle finds out which side runs the domain before doing anything.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_client::ListParams;
use flotilla_types::registry::lookup;
use flotilla_types::{EventType, Migration, VirtualMachine};
use serde_json::{json, Value};

use crate::error::AgentError;
use crate::follow::{follow_selected, Mirror};
use crate::vm::Context;

mod jobs;
mod source;
mod target;

pub use source::{drive, retarget_xml};

/// The migrations this node takes part in, as its followers hear them (by `namespace/name`).
#[derive(Default)]
pub struct NodeMigrations {
    outgoing: Mutex<BTreeMap<String, Migration>>,
    incoming: Mutex<BTreeMap<String, Migration>>,
    /// Whether both lists have come (before that, nothing is known to be absent).
    listed: Mutex<(bool, bool)>,
}

fn key(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or_default())
}

impl NodeMigrations {
    /// The migration `name` of the VM's project, if this node is its source.
    pub fn outgoing(&self, vm: &VirtualMachine, name: &str) -> Option<Migration> {
        let k = key(vm.metadata.namespace.as_deref(), name);
        self.outgoing
            .lock()
            .expect("migrations lock")
            .get(&k)
            .cloned()
    }

    /// Whether both followers have listed (until then the sweeps keep every VM directory).
    pub fn listed(&self) -> bool {
        let l = self.listed.lock().expect("migrations lock");
        l.0 && l.1
    }

    /// The VMs coming here whose files the sweeps must leave alone: every migration to this
    /// node that has not failed or been aborted.
    pub fn incoming_vms(&self) -> HashSet<String> {
        self.incoming
            .lock()
            .expect("migrations lock")
            .values()
            .filter_map(|m| m.status.as_ref())
            .filter(|s| !matches!(s.phase.as_str(), "Failed" | "Aborted"))
            .map(|s| s.vm_uid.clone())
            .filter(|uid| !uid.is_empty())
            .collect()
    }
}

/// Follows the migrations from and to this node: kicks the actor of a VM whose outgoing
/// migration changed, and prepares, watches and cleans up the incoming ones.
pub async fn follow(ctx: Arc<Context>, kick: tokio::sync::mpsc::UnboundedSender<String>) {
    let kind = lookup("migration").expect("registered");
    let select = |field: &str| ListParams {
        field_selector: Some(format!("status.{field}={}", ctx.node)),
        ..Default::default()
    };
    let mut outgoing = follow_selected(ctx.client.clone(), kind, select("sourceNode"));
    let mut incoming = follow_selected(ctx.client.clone(), kind, select("targetNode"));
    let uid_key = |m: &Migration| Some(key(m.metadata.namespace.as_deref(), &m.metadata.name));
    let mut out_mirror = Mirror::<Migration>::new(uid_key);
    let mut in_mirror = Mirror::<Migration>::new(uid_key);
    let busy: Arc<Mutex<HashSet<String>>> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            Some(seen) = outgoing.recv() => {
                out_mirror.apply(seen);
                let mut known = ctx.migrations.outgoing.lock().expect("migrations lock");
                *known = out_mirror.items.clone();
                ctx.migrations.listed.lock().expect("migrations lock").0 = out_mirror.listed;
                for m in known.values().filter(|m| current(m)) {
                    if let Some(uid) = m.status.as_ref().map(|s| s.vm_uid.clone()) {
                        let _ = kick.send(uid);
                    }
                }
                continue;
            }
            Some(seen) = incoming.recv() => {
                in_mirror.apply(seen);
                *ctx.migrations.incoming.lock().expect("migrations lock") = in_mirror.items.clone();
                ctx.migrations.listed.lock().expect("migrations lock").1 = in_mirror.listed;
                if let Some(overlays) = &ctx.overlays {
                    overlays.release_migrations(&ctx.migrations.incoming_vms());
                }
            }
            _ = tick.tick() => {}
            else => return,
        }
        for m in in_mirror.items.values().filter(|m| current(m)) {
            let k = key(m.metadata.namespace.as_deref(), &m.metadata.name);
            if !busy.lock().expect("busy lock").insert(k.clone()) {
                continue;
            }
            let (ctx, m, busy) = (ctx.clone(), m.clone(), busy.clone());
            tokio::spawn(async move {
                if let Err(e) = target::incoming_step(&ctx, &m).await {
                    tracing::warn!(migration = %m.metadata.name, error = %e, "cannot take part in an incoming migration; will retry");
                }
                busy.lock().expect("busy lock").remove(&k);
            });
        }
    }
}

/// How long after its end a migration still needs looking after (the target resumes a guest
/// that landed paused, or removes what a failed one prepared; the sweeps do the rest later).
const AFTERMATH: Duration = Duration::from_secs(120);

/// Whether a migration still concerns its nodes: under way, or ended less than
/// [`AFTERMATH`] ago (ended ones stay until someone deletes them).
fn current(m: &Migration) -> bool {
    let status = m.status.clone().unwrap_or_default();
    if !status.finished() {
        return true;
    }
    status
        .completion_time
        .is_none_or(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default() < AFTERMATH)
}

/// Patches the Migration's status (as one of its two nodes).
async fn report(ctx: &Context, m: &Migration, status: Value) -> Result<(), AgentError> {
    let kind = lookup("migration").expect("registered");
    ctx.client
        .patch(
            kind,
            m.metadata.namespace.as_deref(),
            &m.metadata.name,
            &json!({ "status": status }),
            true,
        )
        .await?;
    Ok(())
}

async fn event(ctx: &Context, m: &Migration, type_: EventType, reason: &str, message: &str) {
    let regarding = flotilla_types::ObjectReference {
        kind: "Migration".into(),
        api_version: Some(flotilla_types::API_VERSION.into()),
        namespace: m.metadata.namespace.clone(),
        name: m.metadata.name.clone(),
        uid: m.metadata.uid.clone(),
        ..Default::default()
    };
    ctx.recorder
        .record(&regarding, type_, reason, message)
        .await;
}
