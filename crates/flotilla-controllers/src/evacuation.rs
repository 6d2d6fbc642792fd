//! Recovery of a failed node's VMs.
//!
//! A node has failed once its Lease has not changed for its duration (T) plus a safety margin,
//! measured by this controller's own clock from the moment it saw the lease change (a new
//! leader starts counting afresh, so a takeover only delays recovery). By then the node's agent
//! (or its watchdog) has destroyed every VM that restarts elsewhere: it fences at T − δ after
//! the last renewal it *sent* and had acknowledged (see the agent's `fence` module). Then:
//!
//! - VMs with `evacuation: Restart` whose disks are all on shared storage are taken off the
//!   node (one transaction that also checks the lease is still the one seen, so an agent whose
//!   renewal wins keeps them) and the scheduler places them again with its usual rules.
//! - Every other VM gets a `NodeLost` condition and a Warning event, and is never started
//!   twice: its disks are on that node. The condition goes when the node is back.
//! - VMs of a Node that was deleted for good are handled the same way, and those being deleted
//!   lose the agent's finalizer: no agent will ever remove it.
//!
//! A node that comes back finds the moved VMs no longer bound to it and removes their domains
//! and files (its orphan sweep), without starting them.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use flotilla_server::objects::{list_prefix, object_key, Objects, PatchBody};
use flotilla_server::{ApiError, Subresource};
use flotilla_store::{RangeRequest, Revision};
use flotilla_types::kinds::vm::AGENT_FINALIZER;
use flotilla_types::meta::now;
use flotilla_types::registry::{self, KindInfo};
use flotilla_types::{Evacuation, EventType, StoragePool, VirtualMachine, Volume};
use serde_json::{json, Value};

/// What the controller last saw of a node's lease.
struct Seen {
    renew_time: Option<String>,
    revision: Revision,
    at: Instant,
    duration: Duration,
}

pub struct Recovery {
    objects: Objects,
    margin: Duration,
    seen: HashMap<String, Seen>,
    recorder: crate::events::Recorder,
    passes: u64,
}

fn kind(name: &str) -> &'static KindInfo {
    registry::by_kind(name).expect("registered")
}

/// Whether a VM can run elsewhere from its disks: it has no root disk of the node's own (an
/// image overlay or a blank disk) and each of its volumes is in a shared pool.
fn restartable(
    vm: &VirtualMachine,
    shared_volumes: &HashSet<(String, String)>,
) -> Result<(), String> {
    if vm.spec.image.is_some() || vm.spec.root_disk.is_some() {
        return Err("its root disk lives on that node".into());
    }
    let project = vm.metadata.namespace.clone().unwrap_or_default();
    for disk in &vm.spec.disks {
        if !shared_volumes.contains(&(project.clone(), disk.volume.clone())) {
            return Err(format!("volume {:?} is not in a shared pool", disk.volume));
        }
    }
    Ok(())
}

impl Recovery {
    pub fn new(objects: Objects, margin: Duration) -> Self {
        Recovery {
            recorder: crate::events::Recorder::new(objects.clone()),
            objects,
            margin,
            seen: HashMap::new(),
            passes: 0,
        }
    }

    /// One pass; returns how many VMs it moved or marked.
    pub async fn sync(&mut self) -> Result<usize, ApiError> {
        let store = self.objects.store().clone();
        let leases = store
            .range(RangeRequest::prefix(&list_prefix(kind("Lease"), None)))
            .await
            .map_err(ApiError::from)?;
        let mut present = HashSet::new();
        for kv in &leases.kvs {
            let lease: Value = serde_json::from_slice(&kv.value).unwrap_or_default();
            let node = lease["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let renew = lease["spec"]["renewTime"].as_str().map(str::to_string);
            let duration =
                Duration::from_secs(lease["spec"]["leaseDurationSeconds"].as_u64().unwrap_or(10));
            present.insert(node.clone());
            let changed = self.seen.get(&node).is_none_or(|s| s.renew_time != renew);
            if changed {
                self.seen.insert(
                    node,
                    Seen {
                        renew_time: renew,
                        revision: kv.mod_revision,
                        at: Instant::now(),
                        duration,
                    },
                );
            } else if let Some(s) = self.seen.get_mut(&node) {
                s.revision = kv.mod_revision;
            }
        }
        self.seen.retain(|n, _| present.contains(n));
        let nodes: HashSet<String> = crate::list_all::<flotilla_types::Node>(&self.objects, "Node")
            .await?
            .into_iter()
            .map(|n| n.metadata.name)
            .collect();
        let failed: HashSet<String> = self
            .seen
            .iter()
            .filter(|(_, s)| s.at.elapsed() > s.duration + self.margin)
            .map(|(n, _)| n.clone())
            .collect();
        // Reading every VM costs: only when a node failed, and now and then (for VMs of deleted
        // nodes, and to clear NodeLost once a node is back).
        self.passes += 1;
        if failed.is_empty() && !self.passes.is_multiple_of(20) {
            return Ok(0);
        }
        let vms: Vec<VirtualMachine> = crate::list_all(&self.objects, "VirtualMachine").await?;
        let mut shared: Option<HashSet<(String, String)>> = None;
        let mut changed = 0;
        for vm in &vms {
            let Some(node) = vm.spec.node_name.clone() else {
                continue;
            };
            let gone = !nodes.contains(&node);
            // A deleted Node whose agent still renews its lease is not failed yet: it is when
            // the lease expires (or is gone too).
            let lost = failed.contains(&node) || (gone && !self.seen.contains_key(&node));
            let marked = vm
                .status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "NodeLost"));
            if !lost {
                if marked {
                    changed += self.unmark(vm).await?;
                }
                continue;
            }
            if vm.metadata.deletion_timestamp.is_some() {
                if gone && vm.metadata.finalizers.iter().any(|f| f == AGENT_FINALIZER) {
                    changed += self.release(vm).await?;
                }
                continue;
            }
            if vm.spec.adopted_domain.is_none() && vm.spec.evacuation == Evacuation::Restart {
                if shared.is_none() {
                    shared = Some(self.shared_volumes().await?);
                }
                match restartable(vm, shared.as_ref().expect("loaded")) {
                    Ok(()) => {
                        changed += self.evacuate(vm, &node).await?;
                        continue;
                    }
                    Err(why) if !marked => {
                        let message = format!(
                            "node {node} failed and the VM cannot restart elsewhere: {why}"
                        );
                        changed += self.mark(vm, &message).await?;
                        continue;
                    }
                    Err(_) => continue,
                }
            }
            if !marked {
                let message = if gone {
                    format!(
                        "node {node} was deleted; the VM's disks were there (evacuation: Never)"
                    )
                } else {
                    format!("node {node} stopped renewing its lease; the VM is not restarted elsewhere (evacuation: Never) and may still run there")
                };
                changed += self.mark(vm, &message).await?;
            }
        }
        Ok(changed)
    }

    async fn shared_volumes(&self) -> Result<HashSet<(String, String)>, ApiError> {
        let pools: HashMap<String, bool> =
            crate::list_all::<StoragePool>(&self.objects, "StoragePool")
                .await?
                .into_iter()
                .map(|p| (p.metadata.name.clone(), p.spec.shared()))
                .collect();
        Ok(crate::list_all::<Volume>(&self.objects, "Volume")
            .await?
            .into_iter()
            .filter(|v| pools.get(&v.spec.pool).copied().unwrap_or(false))
            .map(|v| (v.metadata.namespace.unwrap_or_default(), v.metadata.name))
            .collect())
    }

    async fn evacuate(&self, vm: &VirtualMachine, node: &str) -> Result<usize, ApiError> {
        let lease_key = object_key(kind("Lease"), None, node);
        // A node without a lease was deleted with it: the guard is then that none appears.
        let (revision, message) = match self.seen.get(node) {
            Some(seen) => (seen.revision, format!(
                "node {node} failed: its lease was not renewed for {} s (lease {} s + margin {} s); the VM was fenced there and is placed again",
                seen.at.elapsed().as_secs(),
                seen.duration.as_secs(),
                self.margin.as_secs()
            )),
            None => (0, format!("node {node} was deleted with its lease; the VM is placed again")),
        };
        let status = json!({"phase": "Pending", "nodeName": null, "conditions": [
            {"type": "Evacuated", "status": "True", "reason": "NodeFailed", "message": message, "lastTransitionTime": now()}]});
        let moved = self
            .objects
            .unbind_from_failed_node(
                kind("VirtualMachine"),
                vm.metadata.namespace.as_deref(),
                &vm.metadata.name,
                vm.metadata.uid.as_deref().unwrap_or_default(),
                node,
                &lease_key,
                revision,
                status,
            )
            .await?;
        if moved {
            tracing::warn!(vm = %vm.metadata.name, node, "evacuated a VM of a failed node");
            self.event(vm, EventType::Warning, "Evacuated", &message)
                .await;
        }
        Ok(moved as usize)
    }

    /// The VM's conditions but NodeLost.
    fn without_node_lost(vm: &VirtualMachine) -> Vec<Value> {
        vm.status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .filter(|c| c.type_ != "NodeLost")
            .map(|c| serde_json::to_value(c).expect("serialises"))
            .collect()
    }

    async fn mark(&self, vm: &VirtualMachine, message: &str) -> Result<usize, ApiError> {
        let mut conditions = Self::without_node_lost(vm);
        conditions.push(json!({"type": "NodeLost", "status": "True", "reason": "NodeFailed", "message": message, "lastTransitionTime": now()}));
        self.patch_status(vm, json!({"conditions": conditions}))
            .await?;
        self.event(vm, EventType::Warning, "NodeLost", message)
            .await;
        Ok(1)
    }

    async fn unmark(&self, vm: &VirtualMachine) -> Result<usize, ApiError> {
        self.patch_status(vm, json!({"conditions": Self::without_node_lost(vm)}))
            .await?;
        Ok(1)
    }

    /// Drops the agent's finalizer of a VM being deleted whose node is gone for good.
    async fn release(&self, vm: &VirtualMachine) -> Result<usize, ApiError> {
        let finalizers: Vec<&String> = vm
            .metadata
            .finalizers
            .iter()
            .filter(|f| *f != AGENT_FINALIZER)
            .collect();
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": vm.metadata.resource_version}});
        match self
            .objects
            .patch(
                kind("VirtualMachine"),
                vm.metadata.namespace.as_deref(),
                &vm.metadata.name,
                PatchBody::Merge(patch),
                Subresource::Main,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(vm = %vm.metadata.name, "released a deleted VM whose node is gone");
                Ok(1)
            }
            Err(e) if e.code() == 409 || e.code() == 404 => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn patch_status(&self, vm: &VirtualMachine, status: Value) -> Result<(), ApiError> {
        let patch = json!({"metadata": {"resourceVersion": vm.metadata.resource_version}, "status": status});
        match self
            .objects
            .patch(
                kind("VirtualMachine"),
                vm.metadata.namespace.as_deref(),
                &vm.metadata.name,
                PatchBody::Merge(patch),
                Subresource::Status,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == 409 || e.code() == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn event(&self, vm: &VirtualMachine, type_: EventType, reason: &str, message: &str) {
        let object = serde_json::to_value(vm).unwrap_or_default();
        self.recorder
            .record(
                &crate::events::reference(kind("VirtualMachine"), &object),
                type_,
                reason,
                message,
            )
            .await;
    }
}

/// Runs a pass every `every` (leases change every few seconds; a watch would wake it as often).
pub async fn run(objects: Objects, margin: Duration, every: Duration) {
    let mut evacuation = Recovery::new(objects, margin);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = evacuation.sync().await {
            tracing::warn!(error = %e, "cannot recover the VMs of failed nodes; trying again");
        }
    }
}
