//! The migration controller: takes a Migration from its creation to its end.
//!
//! - **Pending**: checks the VM can move (bound, running for a live move, not adopted, not
//!   moving already), picks the target with the scheduler's rules (or checks the one named),
//!   and writes the two ends into the Migration's status, then the Migration's name into the
//!   VM's `status.migration` (which lets the target's agent read the VM): **Preparing**.
//! - **Preparing**: the target's agent prepares the VM's disks, seed and networks and sets
//!   `targetReady`; the source's agent then runs the copy (**Migrating**) and ends it with
//!   **Succeeded**, **Failed** or **Aborted**. This controller fails a preparation that takes
//!   too long or whose target stops being Ready.
//! - **Succeeded**: the VM is bound to the target (one transaction, [`Objects::rebind`]);
//!   **Failed**/**Aborted**: the VM's `status.migration` is cleared and it stays where it is.
//!   Then the finalizer goes.
//! - **Deleted** before the copy began: Aborted at once. Deleted while copying: the source's
//!   agent aborts the copy and reports how it ended; the finalizer holds the Migration until
//!   then, so that a VM never runs on a node it is not bound to.

use std::time::Duration;

use chrono::Utc;
use flotilla_server::objects::{object_key, Objects, PatchBody};
use flotilla_server::{ApiError, Subresource};
use flotilla_types::kinds::migration::MIGRATION_FINALIZER;
use flotilla_types::meta::now;
use flotilla_types::registry::{self, KindInfo};
use flotilla_types::{EventType, Migration, MigrationMode, Node};
use serde_json::{json, Value};

use crate::scheduler::Scheduler;

/// A preparation that takes longer than this fails (an image download, a busy disk queue).
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(900);
/// Migrations under way from one node at once (the others wait, Pending): copies share the
/// node's network and disks.
pub const PER_NODE: usize = 2;
/// Migrations under way in the whole cluster at once.
pub const PER_CLUSTER: usize = 8;

fn kinds() -> (&'static KindInfo, &'static KindInfo) {
    (
        registry::by_kind("Migration").expect("registered"),
        registry::by_kind("VirtualMachine").expect("registered"),
    )
}

async fn get(
    objects: &Objects,
    kind: &KindInfo,
    ns: &str,
    name: &str,
) -> Result<Option<Value>, ApiError> {
    match objects.get(kind, Some(ns), name).await {
        Ok(stored) => Ok(serde_json::from_slice(&stored.to_bytes()).ok()),
        Err(e) if e.code() == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

fn ready(node: &Node) -> bool {
    node.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == flotilla_types::ConditionStatus::True)
    })
}

/// One pass over every Migration; returns how many it changed.
pub async fn sync(objects: &Objects) -> Result<usize, ApiError> {
    let migrations: Vec<Migration> = crate::list_all(objects, "Migration").await?;
    if migrations
        .iter()
        .all(|m| m.status.as_ref().is_some_and(|s| s.finished()) && !holds(m))
    {
        return Ok(0);
    }
    let nodes: Vec<Node> = crate::list_all(objects, "Node").await?;
    let mut pass = Pass {
        objects,
        nodes,
        scheduler: None,
        sources: migrations
            .iter()
            .filter_map(|m| m.status.clone())
            .filter(|s| matches!(s.phase.as_str(), "Preparing" | "Migrating"))
            .filter_map(|s| s.source_node)
            .collect(),
        recorder: crate::events::Recorder::new(objects.clone()),
    };
    // Oldest first: a drain's migrations go in the order they were made.
    let mut migrations = migrations;
    migrations.sort_by_key(|m| m.metadata.creation_timestamp);
    let mut changed = 0;
    for m in &migrations {
        match pass.step(m).await {
            Ok(n) => changed += n,
            Err(e) if e.code() == 409 || e.code() == 404 => {}
            Err(e) => {
                tracing::warn!(migration = %m.metadata.name, error = %e, "cannot drive a migration")
            }
        }
    }
    Ok(changed)
}

/// Whether the Migration still holds its finalizer.
fn holds(m: &Migration) -> bool {
    m.metadata
        .finalizers
        .iter()
        .any(|f| f == MIGRATION_FINALIZER)
}

struct Pass<'a> {
    objects: &'a Objects,
    nodes: Vec<Node>,
    /// Loaded when a target must be chosen (once per pass).
    scheduler: Option<Scheduler>,
    /// The source node of each migration under way (for the concurrency limits).
    sources: Vec<String>,
    recorder: crate::events::Recorder,
}

impl Pass<'_> {
    fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.metadata.name == name)
    }

    async fn step(&mut self, m: &Migration) -> Result<usize, ApiError> {
        let (kind, _) = kinds();
        let ns = m.metadata.namespace.clone().unwrap_or_default();
        let name = m.metadata.name.clone();
        let status = m.status.clone().unwrap_or_default();
        if m.metadata.deletion_timestamp.is_some() {
            if !holds(m) {
                return Ok(0);
            }
            match status.phase.as_str() {
                "Migrating" => return Ok(0), // the source's agent aborts and reports
                "Succeeded" | "Failed" | "Aborted" => {}
                _ => {
                    self.finish(
                        m,
                        "Aborted",
                        "Deleted",
                        "deleted before the copy began; the VM stays where it is",
                    )
                    .await?;
                }
            }
            let m = self.reread(m).await?;
            if let Some(m) = m {
                self.settle(&m).await?;
                self.drop_finalizer(&m).await?;
            }
            return Ok(1);
        }
        if status.finished() {
            if holds(m) {
                self.settle(m).await?;
                self.drop_finalizer(m).await?;
                return Ok(1);
            }
            return Ok(0);
        }
        if !holds(m) {
            let mut finalizers = m.metadata.finalizers.clone();
            finalizers.push(MIGRATION_FINALIZER.to_string());
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": m.metadata.resource_version}});
            self.objects
                .patch(
                    kind,
                    Some(&ns),
                    &name,
                    PatchBody::Merge(patch),
                    Subresource::Main,
                )
                .await?;
            return Ok(1);
        }
        match status.phase.as_str() {
            "" | "Pending" => self.start(m).await,
            "Preparing" => self.watch_preparation(m).await,
            _ => Ok(0),
        }
    }

    async fn reread(&self, m: &Migration) -> Result<Option<Migration>, ApiError> {
        let (kind, _) = kinds();
        let ns = m.metadata.namespace.as_deref().unwrap_or_default();
        Ok(get(self.objects, kind, ns, &m.metadata.name)
            .await?
            .and_then(|v| serde_json::from_value(v).ok()))
    }

    /// Checks the VM and picks the target: Preparing, or Failed with the reason.
    async fn start(&mut self, m: &Migration) -> Result<usize, ApiError> {
        let (_, vms) = kinds();
        let ns = m.metadata.namespace.clone().unwrap_or_default();
        let Some(vm) = get(self.objects, vms, &ns, &m.spec.vm).await? else {
            return self
                .finish(
                    m,
                    "Failed",
                    "VMNotFound",
                    &format!("VM {:?} does not exist in project {ns:?}", m.spec.vm),
                )
                .await;
        };
        let refuse = |reason: &'static str, message: String| Err((reason, message));
        let checked: Result<(), (&str, String)> = (|| {
            if vm["metadata"].get("deletionTimestamp").is_some() {
                return refuse("VMDeleting", "the VM is being deleted".into());
            }
            if vm["spec"]["adoptedDomain"].is_string() {
                return refuse(
                    "Adopted",
                    "the VM is an adopted domain: Flotilla drives its power only and does not move it".into(),
                );
            }
            if !vm["spec"]["nodeName"].is_string() {
                return refuse("NotPlaced", "the VM is not placed on a node yet".into());
            }
            let running =
                vm["status"]["phase"] == "Running" && vm["spec"]["powerState"] != "Stopped";
            if m.spec.mode == MigrationMode::Live && !running {
                return refuse(
                    "NotRunning",
                    "the VM is not running, so there is nothing to move live: use mode Cold (flotilla vm migrate --cold), or start it first".into(),
                );
            }
            Ok(())
        })();
        if let Err((reason, message)) = checked {
            return self.finish(m, "Failed", reason, &message).await;
        }
        if let Some(other) = vm["status"]["migration"]["name"].as_str() {
            if other != m.metadata.name {
                let (kind, _) = kinds();
                let busy = get(self.objects, kind, &ns, other).await?.is_some_and(|o| {
                    !matches!(
                        o["status"]["phase"].as_str(),
                        Some("Succeeded" | "Failed" | "Aborted")
                    )
                });
                if busy {
                    let message = format!("the VM is moving already (Migration {other:?})");
                    return self.finish(m, "Failed", "Busy", &message).await;
                }
            }
        }
        let source = vm["spec"]["nodeName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let from_source = self.sources.iter().filter(|s| **s == source).count();
        if from_source >= PER_NODE || self.sources.len() >= PER_CLUSTER {
            let message = format!(
                "queued: {from_source} migrations from {source} and {} in the cluster are under way (at most {PER_NODE} per node, {PER_CLUSTER} in all)",
                self.sources.len()
            );
            let status = m.status.clone().unwrap_or_default();
            if status.reason.as_deref() != Some("Queued") {
                self.write_status(
                    m,
                    json!({"status": {"phase": "Pending", "reason": "Queued", "message": message}}),
                )
                .await?;
                return Ok(1);
            }
            return Ok(0);
        }
        if !self.node(&source).is_some_and(ready) {
            let message = format!("the VM's node {source} is not Ready, so it cannot send the VM (a failed node's VMs are recovered, not migrated)");
            return self.finish(m, "Failed", "SourceNotReady", &message).await;
        }
        if let Some(target) = &m.spec.target_node {
            if self.node(target).is_none() {
                let message = format!("node {target:?} does not exist");
                return self.finish(m, "Failed", "NoTarget", &message).await;
            }
        }
        let key = object_key(kinds().1, Some(&ns), &m.spec.vm);
        if self.scheduler.is_none() {
            // Its cache counts VMs marked as migrating on their targets too; those this pass
            // chose are counted by `target_for`.
            let (scheduler, _) = Scheduler::load(self.objects.clone(), Default::default())
                .await
                .map_err(ApiError::from)?;
            self.scheduler = Some(scheduler);
        }
        let scheduler = self.scheduler.as_mut().expect("loaded above");
        let target = match scheduler.target_for(&key, m.spec.target_node.as_deref()) {
            Ok(node) => node,
            Err(why) => {
                let message = format!("no node can take the VM: {why}");
                return self.finish(m, "Failed", "NoTarget", &message).await;
            }
        };
        let info = |node: &str| {
            self.node(node)
                .and_then(|n| n.status.as_ref())
                .map(|s| (s.node_info.clone().unwrap_or_default(), s.addresses.clone()))
                .unwrap_or_default()
        };
        let (target_info, addresses) = info(&target);
        let (Some(uri), Some(address)) = (
            target_info.migration_uri.clone(),
            addresses.get("migration"),
        ) else {
            let message = format!("node {target} takes no migrations: its agent publishes no migration address (run it with --migration-address)");
            return self.finish(m, "Failed", "NoTarget", &message).await;
        };
        if target_info.host_uuid.is_some() && target_info.host_uuid == info(&source).0.host_uuid {
            let message = format!("nodes {source} and {target} have the same libvirt host UUID, so libvirt takes them for one host: give each its own (host_uuid in libvirtd.conf)");
            return self
                .finish(m, "Failed", "DuplicateHostUuid", &message)
                .await;
        }
        let uid = vm["metadata"]["uid"].as_str().unwrap_or_default();
        let message = format!(
            "moving from {source} to {target}; the target prepares the VM's disks and networks"
        );
        let patch = json!({"status": {"phase": "Preparing", "vmUid": uid, "sourceNode": source,
            "targetNode": target, "targetUri": uri, "targetAddress": address, "reason": "Preparing", "message": message}});
        self.write_status(m, patch).await?;
        self.sources.push(source.clone());
        self.mark_vm(m, uid, &target).await?;
        self.event(m, EventType::Normal, "Preparing", &message)
            .await;
        Ok(1)
    }

    /// Sets the VM's `status.migration` (again, after a crash in between).
    async fn mark_vm(&self, m: &Migration, uid: &str, target: &str) -> Result<(), ApiError> {
        let (_, vms) = kinds();
        let ns = m.metadata.namespace.as_deref().unwrap_or_default();
        let Some(vm) = get(self.objects, vms, ns, &m.spec.vm).await? else {
            return Ok(());
        };
        let wanted = json!({"name": m.metadata.name, "targetNode": target});
        if vm["metadata"]["uid"] != uid || vm["status"]["migration"] == wanted {
            return Ok(());
        }
        let patch = json!({"metadata": {"resourceVersion": vm["metadata"]["resourceVersion"]}, "status": {"migration": wanted}});
        self.objects
            .patch(
                vms,
                Some(ns),
                &m.spec.vm,
                PatchBody::Merge(patch),
                Subresource::Status,
            )
            .await?;
        Ok(())
    }

    async fn watch_preparation(&self, m: &Migration) -> Result<usize, ApiError> {
        let status = m.status.clone().unwrap_or_default();
        let target = status.target_node.clone().unwrap_or_default();
        self.mark_vm(m, &status.vm_uid, &target).await?;
        if !self.node(&target).is_some_and(ready) {
            let message = format!("the target node {target} stopped being Ready while preparing");
            return self.finish(m, "Failed", "TargetNotReady", &message).await;
        }
        let since = m.metadata.creation_timestamp.unwrap_or_else(Utc::now);
        if (Utc::now() - since).to_std().unwrap_or_default() > PREPARE_TIMEOUT {
            let message = format!(
                "the target node {target} did not get ready within {} minutes (see its events)",
                PREPARE_TIMEOUT.as_secs() / 60
            );
            return self.finish(m, "Failed", "PrepareTimeout", &message).await;
        }
        Ok(0)
    }

    /// Ends the migration as `phase` (unless it has ended already).
    async fn finish(
        &self,
        m: &Migration,
        phase: &str,
        reason: &str,
        message: &str,
    ) -> Result<usize, ApiError> {
        let patch = json!({"status": {"phase": phase, "reason": reason, "message": message, "completionTime": now()}});
        self.write_status(m, patch).await?;
        let type_ = if phase == "Failed" {
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.event(m, type_, reason, message).await;
        Ok(1)
    }

    async fn write_status(&self, m: &Migration, patch: Value) -> Result<(), ApiError> {
        let (kind, _) = kinds();
        let mut patch = patch;
        patch["metadata"] = json!({"resourceVersion": m.metadata.resource_version});
        self.objects
            .patch(
                kind,
                m.metadata.namespace.as_deref(),
                &m.metadata.name,
                PatchBody::Merge(patch),
                Subresource::Status,
            )
            .await?;
        Ok(())
    }

    /// After the end: the VM bound where it runs (Succeeded), or its mark cleared.
    async fn settle(&self, m: &Migration) -> Result<(), ApiError> {
        let (_, vms) = kinds();
        let status = m.status.clone().unwrap_or_default();
        let ns = m.metadata.namespace.as_deref().unwrap_or_default();
        if status.phase == "Succeeded" {
            let (Some(source), Some(target)) = (&status.source_node, &status.target_node) else {
                return Ok(());
            };
            let moved = self
                .objects
                .rebind(vms, Some(ns), &m.spec.vm, &status.vm_uid, source, target)
                .await?;
            if moved {
                tracing::info!(vm = %m.spec.vm, from = %source, to = %target, "the VM is bound to its new node");
            }
            return Ok(());
        }
        let Some(vm) = get(self.objects, vms, ns, &m.spec.vm).await? else {
            return Ok(());
        };
        if vm["status"]["migration"]["name"] == m.metadata.name.as_str() {
            let patch = json!({"metadata": {"resourceVersion": vm["metadata"]["resourceVersion"]}, "status": {"migration": null}});
            self.objects
                .patch(
                    vms,
                    Some(ns),
                    &m.spec.vm,
                    PatchBody::Merge(patch),
                    Subresource::Status,
                )
                .await?;
        }
        Ok(())
    }

    async fn drop_finalizer(&self, m: &Migration) -> Result<(), ApiError> {
        let (kind, _) = kinds();
        let Some(m) = self.reread(m).await? else {
            return Ok(());
        };
        let finalizers: Vec<&String> = m
            .metadata
            .finalizers
            .iter()
            .filter(|f| *f != MIGRATION_FINALIZER)
            .collect();
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": m.metadata.resource_version}});
        self.objects
            .patch(
                kind,
                m.metadata.namespace.as_deref(),
                &m.metadata.name,
                PatchBody::Merge(patch),
                Subresource::Main,
            )
            .await?;
        Ok(())
    }

    async fn event(&self, m: &Migration, type_: EventType, reason: &str, message: &str) {
        let (kind, _) = kinds();
        let object = serde_json::to_value(m).unwrap_or_default();
        self.recorder
            .record(
                &crate::events::reference(kind, &object),
                type_,
                reason,
                message,
            )
            .await;
    }
}

/// Drives every Migration at each change of a Migration or a Node, and every `resync`.
pub async fn run(objects: Objects, resync: Duration) {
    crate::on_changes(
        objects,
        &["Migration", "Node"],
        resync,
        "drive migrations",
        |objects| async move { sync(&objects).await },
    )
    .await
}
