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
use std::time::{Duration, Instant};

use flotilla_client::ListParams;
use flotilla_types::registry::lookup;
use flotilla_types::{EventType, Migration, MigrationMode, VirtualMachine};
use serde_json::{json, Value};

use crate::error::AgentError;
use crate::follow::{follow_selected, Mirror};
use crate::libvirt::{DomainState, Libvirt};
use crate::vm::{Context, Outcome};

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
                if let Err(e) = incoming_step(&ctx, &m).await {
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

/// The target's part, one step at a time (called again every second and at every change).
async fn incoming_step(ctx: &Context, m: &Migration) -> Result<(), AgentError> {
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

/// The libvirt side of a move.
struct Copy {
    uuid: String,
    dest_uri: String,
    params: virt::domain::MigrateParameters,
    flags: u32,
    max_downtime_ms: Option<u64>,
}

impl Libvirt {
    /// The running domain's XML as a migration destination takes it.
    pub async fn migratable_xml(&self, uuid: &str) -> Result<Option<String>, AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| match Self::lookup(c, &uuid) {
            None => Ok(None),
            Some(d) => Ok(Some(d.get_xml_desc(
                virt::sys::VIR_DOMAIN_XML_MIGRATABLE | virt::sys::VIR_DOMAIN_XML_SECURE,
            )?)),
        })
        .await
    }

    /// The host UUID libvirt reports (its capabilities' `<host><uuid>`).
    pub async fn host_uuid(&self) -> Result<Option<String>, AgentError> {
        self.run(|c| {
            let caps = c.get_capabilities()?;
            let doc = roxmltree::Document::parse(&caps)
                .map_err(|e| AgentError::Libvirt(format!("capabilities: {e}")))?;
            Ok(doc
                .descendants()
                .find(|n| n.has_tag_name("host"))
                .and_then(|h| h.children().find(|n| n.has_tag_name("uuid")))
                .and_then(|u| u.text())
                .map(str::to_string))
        })
        .await
    }

    pub async fn suspend(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                d.suspend()?;
            }
            Ok(())
        })
        .await
    }

    pub async fn resume(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                d.resume()?;
            }
            Ok(())
        })
        .await
    }

    /// Starts the defined domain with its CPUs stopped.
    pub async fn start_paused(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            let d = Self::lookup(c, &uuid)
                .ok_or_else(|| AgentError::Libvirt(format!("domain {uuid} is not defined")))?;
            if !d.is_active()? {
                d.create_with_flags(virt::sys::VIR_DOMAIN_START_PAUSED)?;
            }
            Ok(())
        })
        .await
    }

    /// The job under way on the domain (or, with `completed`, the one that ended last).
    pub async fn job_stats(
        &self,
        uuid: &str,
        completed: bool,
    ) -> Result<Option<virt::domain::JobStats>, AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            let Some(d) = Self::lookup(c, &uuid) else {
                return Ok(None);
            };
            let flags = if completed {
                virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED
            } else {
                0
            };
            // Not `Domain::get_job_stats`: without a job libvirt gives no parameters (a null
            // pointer), which that wrapper turns into a Vec (undefined behaviour).
            let (mut kind, mut params, mut count) = (0, std::ptr::null_mut(), 0);
            // SAFETY: valid out-pointers; `d` holds the domain for the call.
            let ret = unsafe {
                virt::sys::virDomainGetJobStats(
                    d.as_ptr(),
                    &mut kind,
                    &mut params,
                    &mut count,
                    flags,
                )
            };
            if ret == -1 {
                return Ok(None);
            }
            if params.is_null() || count <= 0 {
                return Ok(Some((kind, Vec::new()).into()));
            }
            // SAFETY: libvirt returned `count` parameters at `params`; they are copied (strings
            // included) before libvirt frees them.
            let stats: virt::domain::JobStats = unsafe {
                let copy = std::slice::from_raw_parts(params, count as usize).to_vec();
                (kind, copy).into()
            };
            // SAFETY: the array libvirt allocated, freed once.
            unsafe { virt::sys::virTypedParamsFree(params, count) };
            Ok(Some(stats))
        })
        .await
    }

    /// Aborts the job under way on the domain (a migration: the domain stays here).
    pub async fn abort_job(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                // SAFETY: a valid domain pointer, owned by `d` for the call.
                if unsafe { virt::sys::virDomainAbortJob(d.as_ptr()) } != 0 {
                    return Err(virt::error::Error::last_error().into());
                }
            }
            Ok(())
        })
        .await
    }

    /// Switches the migration under way to post-copy.
    pub async fn start_post_copy(&self, uuid: &str) -> Result<(), AgentError> {
        let uuid = uuid.to_string();
        self.run(move |c| {
            if let Some(d) = Self::lookup(c, &uuid) {
                // SAFETY: a valid domain pointer, owned by `d` for the call.
                if unsafe { virt::sys::virDomainMigrateStartPostCopy(d.as_ptr(), 0) } != 0 {
                    return Err(virt::error::Error::last_error().into());
                }
            }
            Ok(())
        })
        .await
    }

    /// Runs the migration; returns when libvirt has finished it (or failed).
    async fn migrate(&self, copy: Copy) -> Result<(), AgentError> {
        self.run(move |c| {
            let d = Self::lookup(c, &copy.uuid).ok_or_else(|| {
                AgentError::Libvirt(format!("domain {} is not defined", copy.uuid))
            })?;
            if let Some(ms) = copy.max_downtime_ms {
                d.migrate_set_max_downtime(ms, 0)?;
            }
            d.migrate_to_uri3(Some(&copy.dest_uri), copy.params, copy.flags)?;
            Ok(())
        })
        .await
    }
}

/// XML text as libvirt escapes it.
fn escaped(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The source's domain XML as the target runs it: the VM's directory is the target's, and the
/// domain says it was made by the target's node.
pub fn retarget_xml(
    xml: &str,
    source_dir: &str,
    target_dir: &str,
    source: &str,
    target: &str,
) -> String {
    xml.replace(&escaped(source_dir), &escaped(target_dir))
        .replace(
            &format!("<flotilla:node>{source}</flotilla:node>"),
            &format!("<flotilla:node>{target}</flotilla:node>"),
        )
}

/// Why copying a running guest live is unsafe on this node, if it is: QEMU before 9.0 under
/// TCG corrupts guests that write memory while they migrate (upstream fix 03bfc2188f, "physmem:
/// Fix migration dirty bitmap coherency with TCG memory access"; KVM is not affected). Such
/// copies suspend the guest instead.
async fn live_is_unsafe(ctx: &Context) -> Option<String> {
    if ctx.virt_type != crate::domain::VirtType::Qemu {
        return None;
    }
    let version = ctx.libvirt.host_info().await.ok()?.hypervisor_version;
    let major: u32 = version.split('.').next()?.parse().ok()?;
    (major < 9).then(|| {
        format!("QEMU {version} under TCG corrupts guests that migrate live (fixed in QEMU 9.0)")
    })
}

/// What the disks of a domain need: the local files in the VM's directory that are copied
/// (`incremental` when they are overlays on a cached image, `full` otherwise), or nothing
/// (`shared`: network disks and files both nodes reach).
async fn plan_storage(
    ctx: &Context,
    uid: &str,
    xml: &str,
) -> Result<(Vec<String>, &'static str), AgentError> {
    let dir = ctx.vm_dir(uid);
    let mut copied = Vec::new();
    let mut incremental = true;
    for disk in crate::libvirt::disks_of(xml) {
        let Some(source) = disk.source.as_deref() else {
            continue;
        };
        if !std::path::Path::new(source).starts_with(&dir) {
            continue;
        }
        let info = flotilla_storage::qemu_img::info(std::path::Path::new(source))
            .await
            .map_err(|e| AgentError::Config(e.to_string()))?;
        incremental &= info.backing.is_some();
        copied.push(disk.target);
    }
    let kind = match (copied.is_empty(), incremental) {
        (true, _) => "shared",
        (false, true) => "incremental",
        (false, false) => "full",
    };
    Ok((copied, kind))
}

/// The source's part, from the VM's actor: None when the migration does not concern this
/// reconcile (it failed, was aborted, or the target is not ready yet), else what the actor
/// does next.
pub async fn drive(
    ctx: &Context,
    vm: &VirtualMachine,
    m: &Migration,
) -> Result<Option<Outcome>, AgentError> {
    let status = m.status.clone().unwrap_or_default();
    let uid = vm.metadata.uid.clone().unwrap_or_default();
    if status.vm_uid != uid || status.source_node.as_deref() != Some(ctx.node.as_str()) {
        return Ok(None);
    }
    match status.phase.as_str() {
        // Until the controller binds the VM to the target, nothing here may start it again.
        "Succeeded" => Ok(Some(Outcome::Done)),
        "Preparing" if status.target_ready && m.metadata.deletion_timestamp.is_none() => {
            copy(ctx, vm, m).await.map(Some)
        }
        "Migrating" => recover(ctx, vm, m).await.map(Some),
        _ => Ok(None),
    }
}

/// The agent restarted (or the actor ran again) while the Migration says Migrating: find out
/// how the copy ended before anything else.
async fn recover(ctx: &Context, vm: &VirtualMachine, m: &Migration) -> Result<Outcome, AgentError> {
    let uid = vm.metadata.uid.clone().unwrap_or_default();
    let status = m.status.clone().unwrap_or_default();
    if ctx.migrating.lock().expect("migrating lock").contains(&uid) {
        return Ok(Outcome::Done); // this process is copying it right now
    }
    let job = ctx.libvirt.job_stats(&uid, false).await?;
    if job.is_some_and(|j| j.r#type != virt::sys::VIR_DOMAIN_JOB_NONE as i32) {
        // libvirtd still runs the copy a previous agent started: let it finish.
        return Ok(Outcome::Done);
    }
    match ctx.libvirt.state(&uid).await? {
        // Active here without a job: the copy did not complete (a completed one leaves the
        // domain shut off here). A paused one (a suspended or cold copy) is resumed or stopped
        // by the reconcile that follows, as its powerState says.
        Some(DomainState::Running | DomainState::Paused | DomainState::ShuttingDown) => {
            let message = format!(
                "the agent on {} restarted during the copy; the VM stays on {}",
                ctx.node, ctx.node
            );
            finish(ctx, m, "Failed", "Interrupted", &message, json!({})).await?;
            Ok(Outcome::Done)
        }
        _ if status.target_running => {
            ctx.libvirt.remove(&uid).await?;
            let message = format!(
                "the VM runs on {} (the copy ended while the agent on {} was down)",
                status.target_node.clone().unwrap_or_default(),
                ctx.node
            );
            finish(ctx, m, "Succeeded", "Migrated", &message, json!({})).await?;
            Ok(Outcome::Done)
        }
        // Paused or gone here and not running there yet: look again shortly.
        _ => Err(AgentError::Config(
            "waiting to learn how an interrupted migration ended".into(),
        )),
    }
}

async fn finish(
    ctx: &Context,
    m: &Migration,
    phase: &str,
    reason: &str,
    message: &str,
    extra: Value,
) -> Result<(), AgentError> {
    let mut status = json!({"phase": phase, "reason": reason, "message": message, "completionTime": flotilla_types::meta::now()});
    if let (Some(status), Some(extra)) = (status.as_object_mut(), extra.as_object()) {
        status.extend(extra.clone());
    }
    report(ctx, m, status).await?;
    let type_ = if phase == "Failed" {
        EventType::Warning
    } else {
        EventType::Normal
    };
    event(ctx, m, type_, reason, message).await;
    tracing::info!(migration = %m.metadata.name, phase, message, "migration ended");
    Ok(())
}

/// Copies the VM to the target and reports how it went.
async fn copy(ctx: &Context, vm: &VirtualMachine, m: &Migration) -> Result<Outcome, AgentError> {
    let uid = vm.metadata.uid.clone().unwrap_or_default();
    let status = m.status.clone().unwrap_or_default();
    let target = status.target_node.clone().unwrap_or_default();
    let fail = |reason: &'static str, message: String| async move {
        finish(ctx, m, "Failed", reason, &message, json!({}))
            .await
            .map(|_| Outcome::Done)
    };
    if crate::vmsnapshots::active_root(&ctx.vm_dir(&uid)).await != crate::vmsnapshots::ROOT
        || !ctx.vm_snapshots.of_vm(&uid).is_empty()
    {
        return fail(
            "HasSnapshots",
            "the VM has snapshots, whose files stay on this node: delete them first".into(),
        )
        .await;
    }
    let (Some(uri), Some(address), Some(target_dir)) = (
        status.target_uri.clone(),
        status.target_address.clone(),
        status.target_vm_dir.clone(),
    ) else {
        return fail(
            "NoTarget",
            "the Migration names no target URI, address or directory".into(),
        )
        .await;
    };
    let cold = m.spec.mode == MigrationMode::Cold;
    let stopped_at = Instant::now();
    let was_running = ctx.libvirt.state(&uid).await? == Some(DomainState::Running);
    if cold {
        if was_running {
            crate::vm::stop_domain(ctx, vm, &uid).await?;
        }
        // Its CPUs never run here: QEMU only holds the memory and disks for the copy.
        ctx.libvirt.start_paused(&uid).await?;
    } else if ctx.libvirt.state(&uid).await? != Some(DomainState::Running) {
        return fail(
            "NotRunning",
            "the VM is not running: nothing to move live (use a cold migration)".into(),
        )
        .await;
    }
    let Some(xml) = ctx.libvirt.migratable_xml(&uid).await? else {
        return fail("NotRunning", "the domain is gone".into()).await;
    };
    let source_dir = ctx.vm_dir(&uid).to_string_lossy().into_owned();
    let dest_xml = retarget_xml(&xml, &source_dir, &target_dir, &ctx.node, &target);
    let (disks, storage) = plan_storage(ctx, &uid, &xml).await?;
    let mut flags = virt::sys::VIR_MIGRATE_LIVE
        | virt::sys::VIR_MIGRATE_PEER2PEER
        | virt::sys::VIR_MIGRATE_PERSIST_DEST
        | virt::sys::VIR_MIGRATE_ABORT_ON_ERROR;
    match storage {
        "incremental" => flags |= virt::sys::VIR_MIGRATE_NON_SHARED_INC,
        "full" => flags |= virt::sys::VIR_MIGRATE_NON_SHARED_DISK,
        // Disks both nodes reach are not copied; libvirt would refuse those not opened with
        // cache=none. Flotilla's shared pools are network disks QEMU opens itself, or files on
        // a filesystem the admin declared shared.
        _ => flags |= virt::sys::VIR_MIGRATE_UNSAFE,
    }
    if m.spec.auto_converge {
        flags |= virt::sys::VIR_MIGRATE_AUTO_CONVERGE;
    }
    let params = virt::domain::MigrateParameters {
        dest_xml: Some(dest_xml),
        uri: Some(format!("tcp://{address}")),
        migrate_disks: disks,
        bandwidth: m.spec.bandwidth_mib,
        ..Default::default()
    };
    let unsafe_live = if cold || m.spec.suspend {
        None
    } else {
        live_is_unsafe(ctx).await
    };
    let suspended = !cold && (m.spec.suspend || unsafe_live.is_some());
    // libvirt refuses post-copy for a paused guest: a suspended copy converges in one pass.
    if m.spec.post_copy && !suspended {
        flags |= virt::sys::VIR_MIGRATE_POSTCOPY;
    }
    if let Some(why) = &unsafe_live {
        tracing::warn!(migration = %m.metadata.name, "suspending the guest for the copy: {why}");
        event(
            ctx,
            m,
            EventType::Warning,
            "Suspended",
            &format!("the guest is suspended for the copy: {why}"),
        )
        .await;
    }
    if suspended {
        ctx.libvirt.suspend(&uid).await?;
    }
    let started = Instant::now();
    let storage_kind = if cold { "cold" } else { storage };
    report(
        ctx,
        m,
        json!({"phase": "Migrating", "storage": storage_kind, "startTime": flotilla_types::meta::now(),
               "reason": "Migrating", "message": format!("copying to {target} ({storage} disks{})",
                   if suspended { ", guest suspended" } else { "" })}),
    )
    .await?;
    event(
        ctx,
        m,
        EventType::Normal,
        "Migrating",
        &format!("copying {} to {target}", vm.metadata.name),
    )
    .await;
    let _copying = Copying::start(ctx, &uid);
    let timeout = Duration::from_secs(m.spec.timeout_seconds.unwrap_or(600).into());
    let watcher = watch_copy(ctx, m, &uid, timeout);
    let copy = Copy {
        uuid: uid.clone(),
        dest_uri: uri,
        params,
        flags,
        max_downtime_ms: m.spec.max_downtime_ms.filter(|_| !cold && !suspended),
    };
    let result = tokio::select! {
        r = ctx.libvirt.migrate(copy) => r,
        never = watcher.run() => match never {},
    };
    let stop = watcher.stopped_for();
    match result {
        Ok(()) => {
            let took = started.elapsed();
            let done = ctx.libvirt.job_stats(&uid, true).await?;
            let downtime = if cold || suspended {
                // The guest was down from its stop (or pause) to its resume on the target.
                Some(if cold { stopped_at.elapsed() } else { took }.as_millis() as u64)
            } else {
                done.as_ref().and_then(|j| j.downtime)
            };
            let progress = done.as_ref().map(progress_of);
            // The domain here is only a definition now (PERSIST_DEST without UNDEFINE_SOURCE,
            // so that the completed job's figures could be read).
            ctx.libvirt.remove(&uid).await?;
            let message = format!(
                "{} runs on {target} now ({} ms{})",
                vm.metadata.name,
                took.as_millis(),
                if suspended {
                    ", the guest suspended for the copy"
                } else {
                    ""
                }
            );
            finish(
                ctx,
                m,
                "Succeeded",
                "Migrated",
                &message,
                json!({"downtimeMs": downtime, "durationMs": took.as_millis() as u64, "progress": progress}),
            )
            .await?;
            Ok(Outcome::Done)
        }
        Err(e) => {
            if suspended || cold {
                // The copy failed: the guest goes on here as it was.
                if cold && !was_running {
                    ctx.libvirt.destroy(&uid).await?;
                } else if cold {
                    ctx.libvirt.destroy(&uid).await?;
                    ctx.libvirt.start(&uid).await?;
                } else {
                    ctx.libvirt.resume(&uid).await?;
                }
            }
            let (phase, reason, message) = match stop {
                Some(StopReason::Deleted) => (
                    "Aborted",
                    "Aborted",
                    format!(
                        "aborted on request; {} stays on {}",
                        vm.metadata.name, ctx.node
                    ),
                ),
                Some(StopReason::Timeout) => (
                    "Failed",
                    "Timeout",
                    format!(
                        "not done within {} s; {} stays on {}",
                        timeout.as_secs(),
                        vm.metadata.name,
                        ctx.node
                    ),
                ),
                None => (
                    "Failed",
                    "MigrationFailed",
                    format!("{e}; {} stays on {}", vm.metadata.name, ctx.node),
                ),
            };
            finish(ctx, m, phase, reason, &message, json!({})).await?;
            Ok(Outcome::Done)
        }
    }
}

/// Marks a VM as being copied by this process (see `recover`) for as long as it lives, also
/// when the reconcile is dropped half-way.
struct Copying<'a> {
    ctx: &'a Context,
    uid: String,
}

impl<'a> Copying<'a> {
    fn start(ctx: &'a Context, uid: &str) -> Self {
        ctx.migrating
            .lock()
            .expect("migrating lock")
            .insert(uid.to_string());
        Copying {
            ctx,
            uid: uid.to_string(),
        }
    }
}

impl Drop for Copying<'_> {
    fn drop(&mut self) {
        self.ctx
            .migrating
            .lock()
            .expect("migrating lock")
            .remove(&self.uid);
    }
}

fn progress_of(j: &virt::domain::JobStats) -> Value {
    json!({"dataProcessed": j.data_processed.unwrap_or(0), "dataRemaining": j.data_remaining.unwrap_or(0),
           "dataTotal": j.data_total.unwrap_or(0), "diskProcessed": j.disk_processed.unwrap_or(0),
           "iteration": j.mem_iteration.unwrap_or(0)})
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopReason {
    Deleted,
    Timeout,
}

/// Reports the copy's progress every second, and aborts it when the Migration is deleted or
/// the copy takes too long; switches to post-copy when asked and pre-copy does not converge.
struct CopyWatcher<'a> {
    ctx: &'a Context,
    m: &'a Migration,
    uid: &'a str,
    timeout: Duration,
    stopped: Mutex<Option<StopReason>>,
}

fn watch_copy<'a>(
    ctx: &'a Context,
    m: &'a Migration,
    uid: &'a str,
    timeout: Duration,
) -> CopyWatcher<'a> {
    CopyWatcher {
        ctx,
        m,
        uid,
        timeout,
        stopped: Mutex::new(None),
    }
}

impl CopyWatcher<'_> {
    fn stopped_for(&self) -> Option<StopReason> {
        *self.stopped.lock().expect("stopped lock")
    }

    async fn run(&self) -> std::convert::Infallible {
        let started = Instant::now();
        let mut post_copy = false;
        let kind = lookup("migration").expect("registered");
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut stop = None;
            match self
                .ctx
                .client
                .get(
                    kind,
                    self.m.metadata.namespace.as_deref(),
                    &self.m.metadata.name,
                )
                .await
            {
                Ok(now) if now["metadata"].get("deletionTimestamp").is_some() => {
                    stop = Some(StopReason::Deleted)
                }
                Err(e) if e.code() == Some(404) => stop = Some(StopReason::Deleted),
                _ => {}
            }
            if started.elapsed() > self.timeout {
                stop = Some(StopReason::Timeout);
            }
            if let Some(reason) = stop {
                if self
                    .stopped
                    .lock()
                    .expect("stopped lock")
                    .replace(reason)
                    .is_none()
                {
                    tracing::info!(migration = %self.m.metadata.name, ?reason, "aborting the copy");
                }
                if let Err(e) = self.ctx.libvirt.abort_job(self.uid).await {
                    tracing::debug!(error = %e, "cannot abort the copy (it may have ended)");
                }
                continue;
            }
            let Ok(Some(job)) = self.ctx.libvirt.job_stats(self.uid, false).await else {
                continue;
            };
            if self.m.spec.post_copy && !post_copy && job.mem_iteration.unwrap_or(0) >= 3 {
                post_copy = self.ctx.libvirt.start_post_copy(self.uid).await.is_ok();
                if post_copy {
                    tracing::info!(migration = %self.m.metadata.name, "switched to post-copy");
                }
            }
            let _ = report(self.ctx, self.m, json!({"progress": progress_of(&job)})).await;
        }
    }
}
