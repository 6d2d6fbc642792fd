//! The agent's data directory: one agent at a time (a lock), leftovers of interrupted writes
//! removed before anything runs, and a check that QEMU (another user under `qemu:///system`) can
//! reach the files the agent puts there.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{io, AgentError};

/// Held while the agent runs; the lock goes with the process, however it ends.
pub struct DirLock {
    _file: std::fs::File,
}

/// Creates the data directory (0711), takes its lock, removes leftovers of interrupted writes
/// (not those of the image cache, which [`crate::disks::Disks::sweep_leftovers`] handles) and
/// refuses, saying which directory to fix, when QEMU could not reach it.
pub fn prepare(data_dir: &Path, libvirt_uri: &str) -> Result<DirLock, AgentError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(data_dir)
        .map_err(io(data_dir))?;
    // The consoles are unix sockets in each VM's directory, and a socket path has at most
    // 107 bytes: a data directory deeper than that leaves every VM without a console.
    // (The serial socket's name is the longer of the two.)
    let socket = crate::consoles::serial_socket(&data_dir.join("vms").join(EXAMPLE_UID));
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(AgentError::Config(format!(
            "the data directory {} is too long for the VMs' console sockets ({} bytes of at most {MAX_SOCKET_PATH} in {}): choose a shorter --data-dir",
            data_dir.display(),
            socket.as_os_str().len(),
            socket.display()
        )));
    }
    let path = data_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(AgentError::Config(format!(
            "another agent is running with data directory {}; stop it first (or give this one its own --data-dir)",
            data_dir.display()
        )));
    }
    for dir in std::iter::once(data_dir.to_path_buf()).chain(vm_dirs(data_dir)) {
        for leftover in flotilla_files::sweep_temps(&dir, &[]).map_err(io(&dir))? {
            tracing::info!(path = %leftover.display(), "removed what an interrupted write left behind");
        }
    }
    if libvirt_uri.starts_with("qemu:///system") && !qemu_runs_as_root(QEMU_CONF) {
        if let Some(problem) = unreachable_by_others(data_dir) {
            // Every VM would fail to start with libvirt's "Permission denied": refuse now.
            return Err(AgentError::Config(problem));
        }
    }
    Ok(DirLock { _file: file })
}

/// A VM uid as long as any (the paths under a VM's directory are this long).
const EXAMPLE_UID: &str = "00000000-0000-4000-8000-000000000000";
/// `sun_path` holds 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Writes a file atomically and durably (see [`flotilla_files::write_atomic`]), off the async
/// workers. Every file the agent writes goes through here or [`flotilla_files`].
pub async fn write_file(path: &Path, contents: Vec<u8>, mode: u32) -> Result<(), AgentError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || flotilla_files::write_atomic(&p, &contents, mode))
        .await
        .map_err(|e| AgentError::Config(e.to_string()))?
        .map_err(io(path))
}

fn vm_dirs(data_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data_dir.join("vms"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// libvirt's QEMU driver configuration, where `user = "root"` makes QEMU run as root.
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";

/// Whether `qemu.conf` makes QEMU run as root (then every directory is reachable).
fn qemu_runs_as_root(conf: &str) -> bool {
    std::fs::read_to_string(conf).is_ok_and(|text| {
        text.lines().any(|line| {
            let line = line.trim();
            line.strip_prefix("user")
                .map(str::trim_start)
                .and_then(|rest| rest.strip_prefix('='))
                .is_some_and(|value| matches!(value.trim(), "\"root\"" | "\"+0\""))
        })
    })
}

/// The first directory from `/` down to `dir` that other users cannot traverse, as a sentence
/// saying what to fix. QEMU runs as `libvirt-qemu` under `qemu:///system` and opens disks and
/// seeds below the data directory itself.
pub fn unreachable_by_others(dir: &Path) -> Option<String> {
    let (ancestor, mode) = flotilla_files::first_untraversable(dir)?;
    Some(format!(
        "QEMU (user libvirt-qemu) cannot reach VM files under {}: {} is mode {mode:o}; \
         run `chmod o+x {}` or choose another --data-dir",
        dir.display(),
        ancestor.display(),
        ancestor.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn one_agent_per_directory_and_leftovers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("agent");
        std::fs::create_dir_all(data.join("vms/u1")).unwrap();
        std::fs::write(data.join("vms/u1/seed.iso.tmp"), b"half").unwrap();
        std::fs::write(data.join("vms/u1/root.qcow2"), b"kept").unwrap();
        std::fs::write(data.join("agent.yaml.123-0-ab.tmp"), b"half").unwrap();
        let lock = prepare(&data, "test:///default").unwrap();
        assert!(!data.join("vms/u1/seed.iso.tmp").exists());
        assert!(!data.join("agent.yaml.123-0-ab.tmp").exists());
        assert!(data.join("vms/u1/root.qcow2").exists());
        let second = prepare(&data, "test:///default").err().unwrap();
        assert!(second.to_string().contains("another agent"), "{second}");
        drop(lock);
        prepare(&data, "test:///default").unwrap();
    }

    #[test]
    fn a_private_parent_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let problem = unreachable_by_others(&dir.path().join("agent")).unwrap();
        assert!(
            problem.contains(&format!("chmod o+x {}", dir.path().display())),
            "{problem}"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        // Parents of a temporary directory (/tmp) are traversable.
        assert_eq!(unreachable_by_others(&dir.path().join("agent")), None);
    }

    #[test]
    fn under_the_system_libvirt_an_unreachable_data_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let data = dir.path().join("agent");
        if !qemu_runs_as_root(QEMU_CONF) {
            let refused = prepare(&data, "qemu:///system").err().unwrap();
            assert!(refused.to_string().contains("chmod o+x"), "{refused}");
        }
        // Other drivers run no QEMU as another user.
        drop(prepare(&data, "test:///default").unwrap());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        drop(prepare(&data, "qemu:///system").unwrap());
    }

    #[test]
    fn qemu_as_root_is_read_from_qemu_conf() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("qemu.conf");
        std::fs::write(&conf, "#user = \"root\"\ngroup = \"root\"\n").unwrap();
        assert!(!qemu_runs_as_root(conf.to_str().unwrap()));
        std::fs::write(&conf, "user = \"root\"\n").unwrap();
        assert!(qemu_runs_as_root(conf.to_str().unwrap()));
        assert!(!qemu_runs_as_root("/nonexistent/qemu.conf"));
    }
}
