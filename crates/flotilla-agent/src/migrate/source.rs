//! The source's side of a migration, run by the VM's actor: the copy (live, suspended or
//! cold), its progress and abort, and finding out how an interrupted copy ended.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_types::registry::lookup;
use flotilla_types::{EventType, Migration, MigrationMode, VirtualMachine};
use serde_json::{json, Value};

use super::jobs::Copy;
use super::{event, report};
use crate::error::AgentError;
use crate::libvirt::DomainState;
use crate::vm::{Context, Outcome};

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
    } else if !was_running {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targets_xml_has_the_targets_directory_and_node_only() {
        let xml = "<domain><metadata><flotilla:node>a</flotilla:node></metadata>\
            <disk><source file='/srv/a&amp;b/vms/u/root.qcow2'/></disk>\
            <serial><source mode='bind' path='/srv/a&amp;b/vms/u/serial.sock'/></serial>\
            <kernel>/srv/a&amp;b-kernels/vmlinuz</kernel></domain>";
        let moved = retarget_xml(xml, "/srv/a&b/vms/u", "/data/vms/u", "a", "b");
        assert_eq!(
            moved,
            "<domain><metadata><flotilla:node>b</flotilla:node></metadata>\
            <disk><source file='/data/vms/u/root.qcow2'/></disk>\
            <serial><source mode='bind' path='/data/vms/u/serial.sock'/></serial>\
            <kernel>/srv/a&amp;b-kernels/vmlinuz</kernel></domain>"
        );
    }
}
