//! How Flotilla writes files: never seen half-written, never lost after a crash, never clobbered
//! by a concurrent writer of the same file.
//!
//! Every write goes to a temporary file with a name no other writer uses ([`temp_path`]), is
//! synced, renamed over the destination, and the directory is synced so that the rename itself
//! survives a power loss. A crash leaves at worst a `*.tmp` file behind, which [`sweep_temps`]
//! removes at the next start. Files made by other programs (qemu-img writes its own output) are
//! committed the same way with [`commit`].

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The suffix of every temporary file; [`sweep_temps`] removes files ending in it.
pub const TEMP_SUFFIX: &str = ".tmp";

/// A temporary path next to `dest` that no other writer (thread, task or process) uses:
/// `<dest>.<pid>-<counter>-<random>.tmp`, in the same directory so the rename is atomic.
pub fn temp_path(dest: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut name: OsString = dest.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".{}-{}-{:08x}{TEMP_SUFFIX}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    ));
    dest.with_file_name(name)
}

/// Syncs a directory, so that renames and removals inside it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `contents` to `path` with `mode`: a unique temporary file, synced, renamed over
/// `path`, then the directory synced. Readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(parent(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes a finished temporary file (written by another program) the file at `dest`: syncs its
/// data, renames it over `dest` and syncs the directory. On failure the temporary file is removed.
pub fn commit(tmp: &Path, dest: &Path) -> std::io::Result<()> {
    let result = (|| {
        File::open(tmp)?.sync_all()?;
        std::fs::rename(tmp, dest)?;
        sync_dir(parent(dest))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Removes a file and syncs its directory; a file already gone is not an error.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the leftovers of interrupted writes in `dir` (not below it): files whose names end in
/// one of `suffixes` ([`TEMP_SUFFIX`] is always included). Call it before any writer starts.
/// Returns what was removed; a missing directory has nothing to sweep.
pub fn sweep_temps(dir: &Path, suffixes: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let leftover = std::iter::once(TEMP_SUFFIX)
            .chain(suffixes.iter().copied())
            .any(|s| name.ends_with(s));
        if leftover && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// The first directory from `/` down to `dir` that other users cannot traverse (no `o+x`),
/// with its mode: QEMU runs as `libvirt-qemu` and must reach the files it opens below `dir`.
pub fn first_untraversable(dir: &Path) -> Option<(PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::path::absolute(dir).ok()?;
    for ancestor in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let mode = std::fs::metadata(ancestor).ok()?.mode();
        if mode & 0o001 == 0 {
            return Some((ancestor.to_path_buf(), mode & 0o777));
        }
    }
    None
}

/// The size of the filesystem holding `path` and the bytes an unprivileged writer may still
/// use there.
pub fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte"))?;
    // SAFETY: a valid C string and a zeroed struct the call fills.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = s.f_frsize;
    Ok((s.f_blocks * block, s.f_bavail * block))
}

/// An open file as a stream of chunks of at most `size` bytes, for a response or request
/// body (the file is read as the stream is, never whole into memory).
pub fn chunks(
    file: tokio::fs::File,
    size: usize,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    futures::stream::unfold(file, move |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; size];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_replace_whole_files_with_the_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.yaml");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn concurrent_writers_of_one_file_never_mix_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        write_atomic(&path, &vec![b'a' + i; 64 * 1024], 0o644).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 64 * 1024);
        assert!(
            bytes.iter().all(|b| *b == bytes[0]),
            "one writer's bytes only"
        );
    }

    #[test]
    fn temp_paths_are_unique_and_beside_the_destination() {
        let dest = Path::new("/var/lib/flotilla/images/abc.qcow2");
        let (a, b) = (temp_path(dest), temp_path(dest));
        assert_ne!(a, b);
        assert_eq!(a.parent(), dest.parent());
        assert!(a.to_string_lossy().ends_with(TEMP_SUFFIX));
    }

    #[test]
    fn commit_moves_a_finished_file_and_sweep_removes_only_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("image.qcow2");
        let tmp = temp_path(&dest);
        std::fs::write(&tmp, b"data").unwrap();
        commit(&tmp, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"data");
        assert!(!tmp.exists());

        std::fs::write(temp_path(&dest), b"half").unwrap();
        std::fs::write(dir.path().join("x.download"), b"half").unwrap();
        std::fs::create_dir(dir.path().join("keep.tmp")).unwrap();
        let removed = sweep_temps(dir.path(), &[".download"]).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(dest.exists(), "finished files stay");
        assert!(dir.path().join("keep.tmp").is_dir(), "directories stay");
        assert!(sweep_temps(&dir.path().join("missing"), &[])
            .unwrap()
            .is_empty());
    }
}
