//! A Ceph RBD pool: raw images in a Ceph pool, shared by every node that reaches the cluster.
//! Driven through the `rbd` and `ceph` tools (package `ceph-common`) with the node's own keyring
//! file, so the key never passes through Flotilla; QEMU opens the images itself (librbd, package
//! `qemu-block-extra`), as network disks.
//!
//! Images are made under a temporary name (`<name>.tmp`) and renamed into place, so a crash
//! leaves only a temporary, which the next create or the delete of the name removes (the pool
//! is shared: no node may sweep what another is making). A linked clone is RBD's
//! own copy-on-write clone of a protected snapshot of its source named after the clone
//! (`flotilla-clone-<clone>`): the source cannot be removed while that snapshot exists, and
//! removing the clone removes the snapshot.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{check_name, qemu_img, Capacity, Format, StorageError};

const TEMPORARY: &str = ".tmp";
const CLONE_SNAPSHOT: &str = "flotilla-clone-";

/// Where a Ceph cluster is and who this node is to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdConfig {
    /// Monitor addresses, `host` or `host:port`.
    pub monitors: Vec<String>,
    /// The Ceph pool holding the images.
    pub pool: String,
    /// The cephx user (without `client.`).
    pub user: String,
    /// The keyring file holding the user's key, on this node.
    pub keyring: PathBuf,
}

/// How a new image starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RbdSource {
    Blank,
    /// Every byte of a local file (an image from the node's cache).
    File {
        from: PathBuf,
        format: Format,
    },
    /// Another image of the pool: RBD's copy-on-write clone when `linked`, else a full copy.
    Image {
        name: String,
        linked: bool,
    },
}

/// One image as the pool sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdImage {
    pub name: String,
    pub size: u64,
    /// The image and snapshot it is a copy-on-write clone of.
    pub parent: Option<(String, String)>,
}

/// An RBD pool on a Ceph cluster.
#[derive(Clone, Debug)]
pub struct RbdPool {
    config: RbdConfig,
}

fn plain(what: &str, value: &str) -> Result<(), StorageError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && !value.starts_with('-')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StorageError::Unusable {
            path: what.to_string(),
            message: format!("{value:?} is not a plain name (letters, digits, - _ .)"),
        })
    }
}

impl RbdPool {
    /// Checks the configuration (names plain, the keyring readable); contacts nothing.
    pub fn new(config: RbdConfig) -> Result<Self, StorageError> {
        plain("pool", &config.pool)?;
        plain("user", &config.user)?;
        let bad_monitor = |m: &String| {
            m.is_empty()
                || m.starts_with('-')
                || !m
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        };
        if config.monitors.is_empty() || config.monitors.iter().any(bad_monitor) {
            return Err(StorageError::Unusable {
                path: "monitors".into(),
                message: format!("{:?} are not monitor addresses", config.monitors),
            });
        }
        let keyring = config.keyring.display().to_string();
        if !config.keyring.is_absolute() || keyring.contains([':', '\\', '@', ',', '=']) {
            return Err(StorageError::Unusable {
                path: keyring,
                message: "the keyring must be an absolute path without : \\ @ , =".into(),
            });
        }
        std::fs::File::open(&config.keyring).map_err(|e| StorageError::Unusable {
            path: keyring.clone(),
            message: format!("cannot read the keyring: {e}"),
        })?;
        Ok(RbdPool { config })
    }

    pub fn config(&self) -> &RbdConfig {
        &self.config
    }

    /// The arguments every tool gets: no config file (everything is on the command line), and
    /// bounded waits.
    fn connection(&self) -> Vec<String> {
        vec![
            "-c".into(),
            "/dev/null".into(),
            "-m".into(),
            self.config.monitors.join(","),
            "--id".into(),
            self.config.user.clone(),
            "--keyring".into(),
            self.config.keyring.display().to_string(),
            // An unreachable cluster is an error in seconds, not a tool hanging for minutes.
            "--client_mount_timeout=10".into(),
            "--rados_mon_op_timeout=30".into(),
            "--rados_osd_op_timeout=120".into(),
        ]
    }

    fn spec(&self, name: &str) -> String {
        format!("{}/{name}", self.config.pool)
    }

    async fn tool(&self, program: &str, args: &[&str]) -> Result<String, StorageError> {
        let out = tokio::process::Command::new(program)
            .args(self.connection())
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| StorageError::Tool {
                program: program.into(),
                source,
            })?;
        if !out.status.success() {
            let message = String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.contains("did not load config file"))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(StorageError::Command {
                command: format!("{program} {}", args.first().copied().unwrap_or_default()),
                message,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn rbd(&self, args: &[&str]) -> Result<String, StorageError> {
        self.tool("rbd", args).await
    }

    /// The image as QEMU's block layer names it, for `qemu-img` on this node (the keyring
    /// read from its file; nothing secret in the string).
    pub fn qemu_target(&self, name: &str) -> String {
        let mons: Vec<String> = self
            .config
            .monitors
            .iter()
            .map(|m| m.replace(':', "\\:"))
            .collect();
        format!(
            "rbd:{}:id={}:keyring={}:mon_host={}:conf=/dev/null",
            self.spec(name),
            self.config.user,
            self.config.keyring.display(),
            mons.join(";")
        )
    }

    /// The cluster's space as this pool sees it: what it stores and what it may still take.
    pub async fn capacity(&self) -> Result<Capacity, StorageError> {
        let out = self.tool("ceph", &["df", "--format", "json"]).await?;
        let df: Value = serde_json::from_str(&out).map_err(|e| StorageError::Command {
            command: "ceph df".into(),
            message: format!("unreadable answer: {e}"),
        })?;
        let stats = df["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == self.config.pool.as_str())
            .map(|p| p["stats"].clone())
            .ok_or_else(|| StorageError::Unusable {
                path: self.config.pool.clone(),
                message: "the Ceph cluster has no such pool".into(),
            })?;
        let stored = stats["stored"].as_u64().unwrap_or(0);
        let available = stats["max_avail"].as_u64().unwrap_or(0);
        Ok(Capacity {
            capacity: stored + available,
            allocation: stored,
            available,
        })
    }

    /// The names of the pool's images.
    pub async fn list(&self) -> Result<Vec<String>, StorageError> {
        let out = self
            .rbd(&["ls", "--format", "json", &self.config.pool])
            .await?;
        serde_json::from_str(&out).map_err(|e| StorageError::Command {
            command: "rbd ls".into(),
            message: format!("unreadable answer: {e}"),
        })
    }

    pub async fn info(&self, name: &str) -> Result<RbdImage, StorageError> {
        check_name(name)?;
        let out = match self
            .rbd(&["info", "--format", "json", &self.spec(name)])
            .await
        {
            Err(StorageError::Command { message, .. })
                if message.contains("No such file or directory") =>
            {
                return Err(StorageError::NotFound(name.to_string()))
            }
            other => other?,
        };
        let info: Value = serde_json::from_str(&out).map_err(|e| StorageError::Command {
            command: "rbd info".into(),
            message: format!("unreadable answer: {e}"),
        })?;
        let parent = info["parent"]["image"].as_str().map(|image| {
            (
                image.to_string(),
                info["parent"]["snapshot"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        });
        Ok(RbdImage {
            name: name.to_string(),
            size: info["size"].as_u64().unwrap_or(0),
            parent,
        })
    }

    /// Makes image `name` of `size` bytes (a clone may be made larger than its source, never
    /// smaller); refuses a name in use.
    pub async fn create(
        &self,
        name: &str,
        size: u64,
        source: &RbdSource,
    ) -> Result<RbdImage, StorageError> {
        check_name(name)?;
        match self.info(name).await {
            Ok(_) => return Err(StorageError::Exists(name.to_string())),
            Err(StorageError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let tmp = format!("{name}{TEMPORARY}");
        // A temporary of an earlier attempt goes first.
        self.remove(&tmp).await?;
        let bytes = format!("{size}B");
        let made = async {
            match source {
                RbdSource::Blank => {
                    self.rbd(&["create", "--size", &bytes, &self.spec(&tmp)])
                        .await?;
                }
                RbdSource::File { from, format } => {
                    let source = qemu_img::info(from).await?;
                    let size = format!("{}B", size.max(source.virtual_size));
                    self.rbd(&["create", "--size", &size, &self.spec(&tmp)])
                        .await?;
                    qemu_img::convert_into(from, *format, &self.qemu_target(&tmp)).await?;
                }
                RbdSource::Image {
                    name: from,
                    linked: true,
                } => {
                    check_name(from)?;
                    let snap = format!("{}@{CLONE_SNAPSHOT}{name}", self.spec(from));
                    if !self.snapshots(from).await?.contains(&clone_snapshot(name)) {
                        self.rbd(&["snap", "create", &snap]).await?;
                    }
                    // Protecting twice fails ("already protected"); a retry finds it so.
                    if let Err(e) = self.rbd(&["snap", "protect", &snap]).await {
                        if !e.to_string().contains("protected") {
                            return Err(e);
                        }
                    }
                    self.rbd(&["clone", &snap, &self.spec(&tmp)]).await?;
                }
                RbdSource::Image {
                    name: from,
                    linked: false,
                } => {
                    check_name(from)?;
                    self.rbd(&["cp", "--no-progress", &self.spec(from), &self.spec(&tmp)])
                        .await?;
                }
            }
            let made = self.info(&tmp).await?;
            if size > made.size {
                self.rbd(&[
                    "resize",
                    "--no-progress",
                    "--size",
                    &bytes,
                    &self.spec(&tmp),
                ])
                .await?;
            }
            Ok(())
        };
        if let Err(e) = made.await {
            let _ = self.remove(&tmp).await;
            return Err(e);
        }
        self.rbd(&["rename", &self.spec(&tmp), &self.spec(name)])
            .await?;
        self.info(name).await
    }

    /// The names of an image's snapshots.
    async fn snapshots(&self, name: &str) -> Result<Vec<String>, StorageError> {
        let out = self
            .rbd(&["snap", "ls", "--format", "json", &self.spec(name)])
            .await?;
        let snaps: Vec<Value> = serde_json::from_str(&out).map_err(|e| StorageError::Command {
            command: "rbd snap ls".into(),
            message: format!("unreadable answer: {e}"),
        })?;
        Ok(snaps
            .iter()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect())
    }

    /// Grows image `name` to `size` bytes; refuses shrinking. Not for an image a running guest
    /// has open: its QEMU must grow it (`blockresize`) for the guest to see the size.
    pub async fn resize(&self, name: &str, size: u64) -> Result<RbdImage, StorageError> {
        let now = self.info(name).await?;
        if size < now.size {
            return Err(StorageError::Shrink {
                volume: name.to_string(),
                current: now.size,
                requested: size,
            });
        }
        if size > now.size {
            let bytes = format!("{size}B");
            self.rbd(&[
                "resize",
                "--no-progress",
                "--size",
                &bytes,
                &self.spec(name),
            ])
            .await?;
        }
        self.info(name).await
    }

    /// Removes image `name` and what an interrupted create of it left (nothing when all is
    /// gone); refuses while linked clones of it exist. A clone's removal takes its snapshot of
    /// the source with it.
    pub async fn delete(&self, name: &str) -> Result<(), StorageError> {
        check_name(name)?;
        let tmp = format!("{name}{TEMPORARY}");
        self.delete_one(&tmp).await?;
        self.delete_one(name).await
    }

    async fn delete_one(&self, name: &str) -> Result<(), StorageError> {
        let image = match self.info(name).await {
            Ok(image) => image,
            Err(StorageError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut clones = Vec::new();
        for snapshot in self.snapshots(name).await? {
            let Some(clone) = snapshot.strip_prefix(CLONE_SNAPSHOT) else {
                continue;
            };
            let exists = |n: String| async move {
                !matches!(self.info(&n).await, Err(StorageError::NotFound(_)))
            };
            if exists(clone.to_string()).await || exists(format!("{clone}{TEMPORARY}")).await {
                clones.push(clone.to_string());
            } else {
                // A create cut short between the snapshot and the clone.
                self.drop_clone_snapshot(name, &snapshot).await?;
            }
        }
        if !clones.is_empty() {
            return Err(StorageError::InUse {
                volume: name.to_string(),
                users: clones,
            });
        }
        self.remove(name).await?;
        if let Some((parent, snapshot)) = image.parent {
            self.drop_clone_snapshot(&parent, &snapshot).await?;
        }
        Ok(())
    }

    /// Bytes image `name` takes in the cluster (before replication).
    pub async fn used(&self, name: &str) -> Result<u64, StorageError> {
        check_name(name)?;
        let out = self
            .rbd(&["du", "--format", "json", &self.spec(name)])
            .await?;
        let du: Value = serde_json::from_str(&out).map_err(|e| StorageError::Command {
            command: "rbd du".into(),
            message: format!("unreadable answer: {e}"),
        })?;
        Ok(du["total_used_size"].as_u64().unwrap_or(0))
    }

    /// Removes an image and its own snapshots, if it exists.
    async fn remove(&self, name: &str) -> Result<(), StorageError> {
        let gone = |e: &StorageError| e.to_string().contains("No such file or directory");
        match self
            .rbd(&["snap", "purge", "--no-progress", &self.spec(name)])
            .await
        {
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        match self.rbd(&["rm", "--no-progress", &self.spec(name)]).await {
            Err(e) if gone(&e) => Ok(()),
            other => other.map(drop),
        }
    }

    async fn drop_clone_snapshot(&self, parent: &str, snapshot: &str) -> Result<(), StorageError> {
        if !snapshot.starts_with(CLONE_SNAPSHOT) {
            return Ok(());
        }
        let snap = format!("{}@{snapshot}", self.spec(parent));
        let tolerated = |e: &StorageError| {
            e.to_string().contains("No such file") || e.to_string().contains("not protected")
        };
        match self.rbd(&["snap", "unprotect", &snap]).await {
            Err(e) if !tolerated(&e) => return Err(e),
            _ => {}
        }
        match self.rbd(&["snap", "rm", "--no-progress", &snap]).await {
            Err(e) if !tolerated(&e) => Err(e),
            _ => Ok(()),
        }
    }
}

fn clone_snapshot(clone: &str) -> String {
    format!("{CLONE_SNAPSHOT}{clone}")
}

/// The key of `user` in a Ceph keyring file (`key = ...` under `[client.<user>]`), for the
/// libvirt secret QEMU authenticates with. Never logged.
pub fn keyring_key(keyring: &Path, user: &str) -> Result<String, StorageError> {
    let text = std::fs::read_to_string(keyring).map_err(|source| StorageError::Io {
        path: keyring.display().to_string(),
        source,
    })?;
    let wanted = format!("[client.{user}]");
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == wanted;
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == "key" {
                    return Ok(v.trim().to_string());
                }
            }
        }
    }
    Err(StorageError::Unusable {
        path: keyring.display().to_string(),
        message: format!("has no key for client.{user}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_read_from_the_users_section_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keyring");
        std::fs::write(
            &file,
            "[client.admin]\n\tkey = ADMINKEY==\n[client.flotilla]\n\tkey = AQBfl0ti==\n\tcaps mon = \"profile rbd\"\n",
        )
        .unwrap();
        assert_eq!(keyring_key(&file, "flotilla").unwrap(), "AQBfl0ti==");
        assert_eq!(keyring_key(&file, "admin").unwrap(), "ADMINKEY==");
        let missing = keyring_key(&file, "other").unwrap_err().to_string();
        assert!(missing.contains("no key for client.other"), "{missing}");
    }

    #[test]
    fn configurations_that_could_reach_a_command_line_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("k");
        std::fs::write(&keyring, "").unwrap();
        let good = RbdConfig {
            monitors: vec!["127.0.0.1:6789".into(), "[::1]:3300".into()],
            pool: "rbd".into(),
            user: "flotilla".into(),
            keyring: keyring.clone(),
        };
        let pool = RbdPool::new(good.clone()).unwrap();
        assert_eq!(
            pool.qemu_target("v1"),
            format!(
                "rbd:rbd/v1:id=flotilla:keyring={}:mon_host=127.0.0.1\\:6789;[\\:\\:1]\\:3300:conf=/dev/null",
                keyring.display()
            )
        );
        for bad in [
            RbdConfig {
                pool: "--help".into(),
                ..good.clone()
            },
            RbdConfig {
                user: "a:b".into(),
                ..good.clone()
            },
            RbdConfig {
                monitors: vec!["1.2.3.4,5.6.7.8".into()],
                ..good.clone()
            },
            RbdConfig {
                monitors: vec![],
                ..good.clone()
            },
            RbdConfig {
                keyring: "relative".into(),
                ..good.clone()
            },
            RbdConfig {
                keyring: dir.path().join("a:b"),
                ..good.clone()
            },
            RbdConfig {
                keyring: dir.path().join("missing"),
                ..good.clone()
            },
        ] {
            assert!(RbdPool::new(bad.clone()).is_err(), "{bad:?} was taken");
        }
    }
}
