//! Storage backends: where a node's volumes live, and how they are made, grown, cloned and
//! removed. A pool is one backend instance (a directory on a node, or an NFS export, a Ceph
//! RBD pool or an iSCSI target that every node reaches); the agent drives it and renders what [`Pool::disk`] says into the
//! domain. Everything runs external tools (`qemu-img`) with argument vectors, never a shell,
//! and volume names are checked before they reach a path.

mod dir;
mod iscsi;
mod nfs;
pub mod qemu_img;
mod rbd;

pub use dir::{volume_name, DirPool};
pub use iscsi::{IscsiConfig, IscsiPool, Lun};
pub use nfs::{NfsConfig, NfsPool, NfsSource, NfsVolume};
pub use qemu_img::{Format, ImageInfo};
pub use rbd::{keyring_key, RbdConfig, RbdImage, RbdPool, RbdSource};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "{0:?} is not a volume name: letters, digits, '-', '_' and '.', not starting with '.'"
    )]
    BadName(String),
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("volume {0:?} does not exist")]
    NotFound(String),
    #[error("volume {volume:?} backs {users:?}: delete or flatten those first")]
    InUse { volume: String, users: Vec<String> },
    #[error("volume {volume:?} is {current} bytes: shrinking to {requested} would lose data")]
    Shrink {
        volume: String,
        current: u64,
        requested: u64,
    },
    #[error("a shareable volume must be raw (qcow2 metadata cannot be written by two guests)")]
    SharedQcow2,
    #[error("{path}: {message}")]
    Unusable { path: String, message: String },
    #[error("cannot run {program}: {source}")]
    Tool {
        program: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// How a new volume starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Empty.
    Blank,
    /// A copy of a file (an image or another volume): `linked` keeps it as the backing file
    /// (copy-on-write, qcow2 only), otherwise every byte is copied.
    Clone {
        from: PathBuf,
        format: Format,
        linked: bool,
    },
}

/// A volume to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewVolume {
    /// Unique in the pool (the agent uses the Volume's uid).
    pub name: String,
    pub format: Format,
    /// Virtual size in bytes; a clone may be made larger than its source, never smaller.
    pub size: u64,
    pub source: Source,
}

/// A pool's space, in bytes, as its filesystem or backend reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub capacity: u64,
    /// Bytes the pool's volumes take on disk.
    pub allocation: u64,
    pub available: u64,
}

/// One volume as the pool sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes it takes on disk.
    pub allocation: u64,
    /// The file it is a copy-on-write overlay of, if any.
    pub backing: Option<PathBuf>,
}

/// Volume names reach file names and arguments only when they are plain names.
pub fn check_name(name: &str) -> Result<(), StorageError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StorageError::BadName(name.to_string()))
    }
}
