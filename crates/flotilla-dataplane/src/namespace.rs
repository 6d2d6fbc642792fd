//! Named network namespaces (`/run/netns/<name>`, as `ip netns` keeps them), made without
//! forking: a thread of its own unshares its network namespace and bind-mounts it onto the
//! name, then ends (`unshare(CLONE_NEWNET)` changes only the calling thread, never a runtime's
//! worker). The mount is made in the caller's mount namespace, so it outlives the call.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::DataplaneError;

/// Where named network namespaces live.
pub const NETNS_DIR: &str = "/run/netns";
/// `statfs` type of the namespace filesystem: a bind-mounted namespace reports it.
const NSFS_MAGIC: i64 = 0x6e73_6673;

pub fn namespace_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn error(path: &Path) -> impl Fn(std::io::Error) -> DataplaneError + '_ {
    move |error| DataplaneError::Namespace {
        path: path.display().to_string(),
        error,
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("namespace paths have no NUL")
}

/// Whether `path` holds a live namespace (not the empty file a lost mount leaves).
pub fn is_namespace(path: &Path) -> bool {
    let path = c_path(path);
    // SAFETY: statfs into a zeroed struct this function owns, with a NUL-terminated path.
    unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut fs) == 0 && fs.f_type as i64 == NSFS_MAGIC
    }
}

/// Makes the network namespace `name` (idempotent) and returns its path.
pub fn ensure_namespace(name: &str) -> Result<PathBuf, DataplaneError> {
    let path = namespace_path(name);
    if is_namespace(&path) {
        return Ok(path);
    }
    std::fs::create_dir_all(NETNS_DIR).map_err(error(&path))?;
    // A file left by a namespace whose mount went away is reused.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(error(&path))?;
    let target = c_path(&path);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let source = c"/proc/thread-self/ns/net";
                // SAFETY: both change only this short-lived thread's namespace and mount a file
                // this function created; the strings are NUL-terminated and outlive the calls.
                unsafe {
                    if libc::unshare(libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let bind = libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    );
                    if bind != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })
            .join()
            .expect("the namespace thread does not panic")
    })
    .map_err(error(&path))?;
    Ok(path)
}

/// Removes the namespace `name` (its devices go with it once nothing holds it); absent is fine.
pub fn remove_namespace(name: &str) -> Result<(), DataplaneError> {
    let path = namespace_path(name);
    // Mounted more than once (by two makers racing before this crate serialised them), it
    // takes as many unmounts.
    while is_namespace(&path) {
        let target = c_path(&path);
        // SAFETY: a lazy unmount of a NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(error(&path)(std::io::Error::last_os_error()));
        }
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(error(&path)(e)),
        _ => Ok(()),
    }
}

/// The names of the namespaces starting with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// The inode of a namespace file (`/run/netns/<name>` or `/proc/<pid>/ns/net`): equal inodes
/// are the same namespace.
pub fn namespace_inode(path: &Path) -> Option<u64> {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).ok()?).into()
}

fn open(path: &Path) -> Result<std::fs::File, DataplaneError> {
    std::fs::File::open(path).map_err(error(path))
}

/// Runs `f` on a thread of its own that entered the network namespace at `path` (`setns`
/// changes only the calling thread, so never a runtime's worker). What `f` opens there (a
/// socket, a file under /proc/sys/net) stays bound to that namespace.
pub fn on_thread_in<T: Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, DataplaneError> + Send,
) -> Result<T, DataplaneError> {
    use std::os::fd::AsRawFd;
    let file = open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this short-lived thread only, with a descriptor it borrows.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(error(path)(std::io::Error::last_os_error()));
                }
                f()
            })
            .join()
            .expect("the namespace thread does not panic")
    })
}

/// A command that enters the network namespace at `path` between fork and exec, with the
/// namespace's descriptor: keep it until the command is spawned.
pub fn command_in(
    program: &str,
    path: &Path,
) -> Result<(tokio::process::Command, std::fs::File), DataplaneError> {
    use std::os::fd::AsRawFd;
    let file = open(path)?;
    let fd = file.as_raw_fd();
    let mut command = tokio::process::Command::new(program);
    command.stdin(std::process::Stdio::null());
    // SAFETY: only setns, which is async-signal-safe, runs between fork and exec; the
    // descriptor stays open in the parent (returned with the command) until after the spawn.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok((command, file))
}

/// Runs `program args` in the namespace at `path`, `input` on its stdin; fails with its stderr.
pub async fn run_in(
    program: &str,
    args: &[&str],
    path: &Path,
    input: Option<&str>,
) -> Result<(), DataplaneError> {
    run_in_or_here(program, args, Some(path), input).await
}

/// As `run_in`, in the calling process's own namespace when `path` is None.
pub(crate) async fn run_in_or_here(
    program: &str,
    args: &[&str],
    path: Option<&Path>,
    input: Option<&str>,
) -> Result<(), DataplaneError> {
    use tokio::io::AsyncWriteExt;
    let failed = |message: String| DataplaneError::Command {
        command: format!("{program} {}", args.join(" ")),
        message,
    };
    let (mut command, namespace) = match path {
        Some(path) => {
            let (command, namespace) = command_in(program, path)?;
            (command, Some(namespace))
        }
        None => (tokio::process::Command::new(program), None),
    };
    command
        .args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().map_err(|e| failed(e.to_string()))?;
    drop(namespace);
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}
