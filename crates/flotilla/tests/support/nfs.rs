//! A throwaway NFS server for the NFS tests (scripts/nfs-server-up.sh: nfs-ganesha and rpcbind
//! in a network namespace joined to the host by a veth pair), stopped when dropped, and what
//! the tests read back from its export.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::repo;

/// The server's address, as pools name it.
pub const SERVER: &str = "198.18.253.2";

pub struct NfsServer(PathBuf);

impl NfsServer {
    pub fn start(dir: &Path) -> NfsServer {
        let out = Command::new(repo().join("scripts/nfs-server-up.sh"))
            .arg(dir)
            .output()
            .expect("scripts/nfs-server-up.sh runs");
        let server = NfsServer(dir.to_path_buf());
        assert!(
            out.status.success(),
            "the NFS server did not start (are nfs-ganesha and nfs-ganesha-vfs installed? make test installs them): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        server
    }

    /// The exported directory, on this host.
    pub fn export(&self) -> PathBuf {
        self.0.join("export")
    }

    /// The names of the files on the export, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.export())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// QEMU's URL of `file` on the export, as QEMU's user.
    pub fn url(&self, file: &str) -> String {
        format!("nfs://{SERVER}/export/{file}?uid=64055&gid=64055")
    }

    /// `len` bytes at `offset` of volume file `file` (of `format`), read through libnfs.
    pub fn read(&self, file: &str, format: &str, offset: u64, len: usize) -> Vec<u8> {
        let out_file = self.0.join("read.bin");
        let _ = std::fs::remove_file(&out_file);
        let out = Command::new("qemu-img")
            .args(["dd", "-f", format, "-O", "raw", "bs=512"])
            .arg(format!("count={}", (offset as usize + len).div_ceil(512)))
            .arg(format!("if={}", self.url(file)))
            .arg(format!("of={}", out_file.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(&out_file).unwrap()[offset as usize..offset as usize + len].to_vec()
    }
}

impl Drop for NfsServer {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/nfs-server-down.sh"))
            .arg(&self.0)
            .status();
    }
}
