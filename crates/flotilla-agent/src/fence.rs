//! Self-fencing: a node cut off from the control plane destroys the VMs that will be restarted
//! elsewhere (`spec.evacuation: Restart`) before the control plane may restart them.
//!
//! The agent renews its node's Lease every T/3 (T = the lease's duration). Each renewal the
//! server acknowledges is counted from the moment it was *sent*. When no renewal has been
//! acknowledged for T − δ, the agent destroys those VMs' domains (QEMU is killed outright if
//! libvirt does not answer within a second) and starts none until a renewal is acknowledged
//! again. The migration controller's side waits for T + margin after it last saw the lease
//! change (by its own clock), so the two never overlap: the agent counts from before the
//! server's write, the server from after it, and only durations are compared, never clocks.
//!
//! A hung agent (stopped, deadlocked) cannot fence itself: a watchdog process it starts beside
//! itself (`flotilla agent-watchdog`) reads the time of the last acknowledged renewal and the
//! list of fenceable domains from files the agent keeps in `<data-dir>/fence/`, and kills
//! those domains' QEMU processes itself when the renewal is too old. It survives the agent's
//! death on purpose: a dead agent renews nothing either.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::AgentError;
use crate::libvirt::Libvirt;

/// How long before the lease's end the agent fences (δ).
pub const MARGIN: Duration = Duration::from_secs(2);

/// The system-wide monotonic clock (CLOCK_MONOTONIC), in nanoseconds: the agent and its
/// watchdog, two processes, compare times on it.
pub fn monotonic_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct Fence {
    dir: PathBuf,
    /// T − δ: how long without an acknowledged renewal before fencing.
    limit: Duration,
    /// When the last acknowledged renewal was sent (None: none yet since the start).
    renewed: Mutex<Option<Instant>>,
    /// Set while fenced: nothing is started.
    fenced: AtomicBool,
    /// The UUIDs of the domains to destroy when fencing.
    fenceable: Mutex<Vec<String>>,
    /// Wakes every VM actor when fencing ends (their starts were refused meanwhile).
    pub lifted: tokio::sync::Notify,
    /// When the node was fenced (for the event once it is over).
    fenced_at: Mutex<Option<Instant>>,
}

impl Fence {
    /// `lease` is the node lease's duration (T). Starts fenced: nothing that restarts
    /// elsewhere starts before the first acknowledged renewal. The last renewal a previous
    /// agent wrote is kept (the watchdog goes on counting from it).
    pub fn new(data_dir: &Path, lease: Duration) -> Result<Self, AgentError> {
        let dir = data_dir.join("fence");
        std::fs::create_dir_all(&dir).map_err(crate::error::io(&dir))?;
        let fence = Fence {
            limit: lease.saturating_sub(MARGIN),
            renewed: Mutex::new(None),
            fenced: AtomicBool::new(true),
            fenceable: Mutex::new(Vec::new()),
            lifted: tokio::sync::Notify::new(),
            fenced_at: Mutex::new(None),
            dir,
        };
        if last_renewal(&fence.dir).is_none() {
            // Never renewed on this boot: the watchdog counts from now.
            fence.write("renewed", stamp(monotonic_nanos()));
        }
        Ok(fence)
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    fn write(&self, name: &str, content: String) {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        if std::fs::write(&tmp, content)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .is_err()
        {
            tracing::warn!(path = %path.display(), "cannot write the fencing watchdog's file");
        }
    }

    /// A renewal sent at `sent` (and `sent_nanos` on the monotonic clock) was acknowledged.
    /// Returns how long the node was fenced, if it was (not counting the start).
    pub fn renewed(&self, sent: Instant, sent_nanos: u64) -> Option<Duration> {
        let first = self
            .renewed
            .lock()
            .expect("fence lock")
            .replace(sent)
            .is_none();
        self.write("renewed", stamp(sent_nanos));
        if self.fenced.swap(false, Ordering::SeqCst) {
            self.lifted.notify_waiters();
            let since = self.fenced_at.lock().expect("fence lock").take();
            if !first {
                tracing::warn!("the lease is renewed again: VMs may start");
                return since.map(|at| at.elapsed());
            }
        }
        None
    }

    /// Whether starting domains is refused right now.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// The domains fencing destroys (those of VMs with `evacuation: Restart`).
    pub fn set_fenceable(&self, mut uuids: Vec<String>) {
        uuids.sort();
        let mut current = self.fenceable.lock().expect("fence lock");
        if *current != uuids {
            self.write("domains", uuids.join("\n"));
            *current = uuids;
        }
    }

    /// Whether the last acknowledged renewal (this agent's, or the one a previous agent
    /// wrote) is older than the limit.
    pub fn due(&self) -> bool {
        match *self.renewed.lock().expect("fence lock") {
            Some(last) => last.elapsed() > self.limit,
            None => last_renewal(&self.dir).is_none_or(|renewed| {
                Duration::from_nanos(monotonic_nanos().saturating_sub(renewed)) > self.limit
            }),
        }
    }

    /// Fences: refuses starts from now on, and destroys the fenceable domains.
    pub async fn fence(&self, libvirt: &Libvirt) {
        let first = !self.fenced.swap(true, Ordering::SeqCst);
        if first {
            *self.fenced_at.lock().expect("fence lock") = Some(Instant::now());
        }
        let uuids = self.fenceable.lock().expect("fence lock").clone();
        for uuid in uuids {
            let destroyed =
                tokio::time::timeout(Duration::from_secs(1), libvirt.destroy(&uuid)).await;
            if !matches!(destroyed, Ok(Ok(()))) {
                let killed = kill_qemu(&uuid);
                tracing::warn!(
                    uuid,
                    killed,
                    "libvirt did not destroy the domain in time; killed its QEMU"
                );
            } else if first {
                tracing::warn!(uuid, "fenced: the domain is destroyed");
            }
        }
        if first {
            tracing::error!(limit_ms = self.limit.as_millis() as u64, "no lease renewal acknowledged in time: this node is fenced (VMs that restart elsewhere are destroyed; none starts until the lease is renewed)");
        }
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_default()
}

/// A point on the monotonic clock, with the boot it belongs to (the clock starts again at
/// every boot).
fn stamp(nanos: u64) -> String {
    format!("{nanos} {}", boot_id())
}

/// The last acknowledged renewal written in `dir`, on this boot's monotonic clock.
fn last_renewal(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("renewed")).ok()?;
    let (nanos, boot) = text.trim().split_once(' ')?;
    (boot == boot_id()).then(|| nanos.parse().ok()).flatten()
}

/// Kills (SIGKILL) the QEMU process of domain `uuid`, found by its `-uuid` argument; how many.
pub fn kill_qemu(uuid: &str) -> usize {
    let mut killed = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_qemu = args
            .first()
            .is_some_and(|a| String::from_utf8_lossy(a).contains("qemu-system"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"-uuid" && w[1] == uuid.as_bytes());
        if is_qemu && ours {
            // SAFETY: sending a signal to a process id is memory-safe.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    killed
}

/// The watchdog process (`flotilla agent-watchdog`): kills the QEMU processes of the domains
/// listed in `<data-dir>/fence/domains` when `<data-dir>/fence/renewed` is older than `limit`
/// on the monotonic clock. Replaces a watchdog already running for this data directory.
pub fn watchdog(data_dir: &Path, limit: Duration) -> ! {
    let dir = data_dir.join("fence");
    let pid_file = dir.join("watchdog.pid");
    if let Ok(old) = std::fs::read_to_string(&pid_file) {
        if let Ok(old) = old.trim().parse::<i32>() {
            let cmdline = std::fs::read(format!("/proc/{old}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("agent-watchdog")
                && old != std::process::id() as i32
            {
                // SAFETY: sending a signal to a process id is memory-safe.
                unsafe { libc::kill(old, libc::SIGKILL) };
            }
        }
    }
    let _ = std::fs::write(&pid_file, std::process::id().to_string());
    let mut fenced = false;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        if !dir.is_dir() {
            // The data directory is gone (the node was taken down for good): nothing to guard.
            std::process::exit(0);
        }
        // None: written on another boot, or unreadable: as old as can be.
        let age = last_renewal(&dir)
            .map(|renewed| Duration::from_nanos(monotonic_nanos().saturating_sub(renewed)))
            .unwrap_or(Duration::MAX);
        if age <= limit {
            fenced = false;
            continue;
        }
        let domains = std::fs::read_to_string(dir.join("domains")).unwrap_or_default();
        let mut killed = 0;
        for uuid in domains.lines().filter(|l| !l.trim().is_empty()) {
            killed += kill_qemu(uuid.trim());
        }
        if !fenced || killed > 0 {
            eprintln!(
                "flotilla agent-watchdog: no lease renewal acknowledged for {} ms (limit {} ms): fenced, {killed} QEMU processes killed",
                age.as_millis().min(u64::MAX as u128),
                limit.as_millis()
            );
        }
        fenced = true;
    }
}
