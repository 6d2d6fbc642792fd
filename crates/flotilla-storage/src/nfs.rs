//! An NFS pool: volume files (qcow2 or raw) on an NFS export that every node reaches and QEMU
//! opens itself (libnfs, package `qemu-block-extra`) — no kernel NFS client, no mount. QEMU's
//! tools make, copy, grow and describe the files through `nfs://` URLs; what they cannot do
//! (remove, rename, the export's space) goes through a small NFSv3 client. Every file is made
//! as the pool's uid and gid (QEMU's user, which libvirt does not chown network disks to).
//!
//! Files are made under a temporary name (`<name>.tmp`) and renamed into place; the pool is
//! shared, so nobody sweeps: the next create of a name and its delete remove what an
//! interrupted one left.

use std::time::Duration;

use nfs3_client::tokio::TokioConnector;
use nfs3_client::Nfs3ConnectionBuilder;
use nfs3_types::nfs3::{
    cookieverf3, diropargs3, filename3, nfsstat3, FSSTAT3args, Nfs3Result, READDIR3args,
    REMOVE3args, RENAME3args,
};
use nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_types::xdr_codec::Opaque;

use crate::{check_name, qemu_img, Capacity, Format, StorageError};

const TEMPORARY: &str = ".tmp";
/// How long one exchange with the server may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where an export is and who the nodes are to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfsConfig {
    pub server: String,
    /// The export's path (absolute).
    pub export: String,
    /// The owner of the volume files: QEMU's user and group on the nodes.
    pub uid: u32,
    pub gid: u32,
}

/// How a new volume file starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NfsSource {
    Blank,
    /// Every byte of a local file (an image from the node's cache).
    File {
        from: std::path::PathBuf,
        format: Format,
    },
    /// Every byte of another volume file of the export.
    Volume {
        name: String,
        format: Format,
    },
}

/// One volume file as the export has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfsVolume {
    pub name: String,
    pub virtual_size: u64,
    /// Bytes it takes on the server.
    pub allocation: u64,
}

#[derive(Clone, Debug)]
pub struct NfsPool {
    config: NfsConfig,
}

impl NfsPool {
    /// Checks the configuration (plain host and path: they reach URLs); contacts nothing.
    pub fn new(config: NfsConfig) -> Result<Self, StorageError> {
        let host_ok = !config.server.is_empty()
            && config.server.len() <= 253
            && !config.server.starts_with('-')
            && config
                .server
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b));
        let export_ok = config.export.starts_with('/')
            && config.export.len() <= 1024
            && !config.export.split('/').any(|part| part == "..")
            && config
                .export
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
        if !host_ok || !export_ok {
            return Err(StorageError::Unusable {
                path: format!("{}:{}", config.server, config.export),
                message: "the server must be a host name or address and the export an absolute path of plain characters".into(),
            });
        }
        Ok(NfsPool { config })
    }

    pub fn config(&self) -> &NfsConfig {
        &self.config
    }

    fn export(&self) -> &str {
        self.config.export.trim_end_matches('/')
    }

    /// The file's path on the server, as libvirt names a network disk.
    pub fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.export())
    }

    /// The file as QEMU's tools open it, as the pool's uid and gid.
    pub fn url(&self, name: &str) -> String {
        format!(
            "nfs://{}{}?uid={}&gid={}",
            self.config.server,
            self.path(name),
            self.config.uid,
            self.config.gid
        )
    }

    async fn connect(
        &self,
    ) -> Result<
        nfs3_client::Nfs3Connection<nfs3_client::tokio::TokioIo<tokio::net::TcpStream>>,
        StorageError,
    > {
        let credential = opaque_auth::auth_unix(&auth_unix {
            uid: self.config.uid,
            gid: self.config.gid,
            ..Default::default()
        });
        let mount = Nfs3ConnectionBuilder::new(TokioConnector, &self.config.server, self.export())
            .credential(credential)
            .mount();
        match tokio::time::timeout(TIMEOUT, mount).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(self.unusable(format!("cannot mount it: {e}"))),
            Err(_) => Err(self.unusable(format!(
                "the server did not answer within {} s",
                TIMEOUT.as_secs()
            ))),
        }
    }

    fn unusable(&self, message: String) -> StorageError {
        StorageError::Unusable {
            path: format!("{}:{}", self.config.server, self.config.export),
            message,
        }
    }

    /// The export's space.
    pub async fn capacity(&self) -> Result<Capacity, StorageError> {
        let mut c = self.connect().await?;
        let root = c.root_nfs_fh3();
        let got = tokio::time::timeout(TIMEOUT, c.fsstat(&FSSTAT3args { fsroot: root })).await;
        let _ = c.unmount().await;
        match got {
            Ok(Ok(Nfs3Result::Ok(ok))) => Ok(Capacity {
                capacity: ok.tbytes,
                allocation: ok.tbytes.saturating_sub(ok.fbytes),
                available: ok.abytes,
            }),
            Ok(Ok(Nfs3Result::Err((status, _)))) => {
                Err(self.unusable(format!("FSSTAT: {status:?}")))
            }
            Ok(Err(e)) => Err(self.unusable(format!("FSSTAT: {e}"))),
            Err(_) => Err(self.unusable("FSSTAT timed out".into())),
        }
    }

    /// The names of the files in the export's top directory.
    pub async fn list(&self) -> Result<Vec<String>, StorageError> {
        let mut c = self.connect().await?;
        let root = c.root_nfs_fh3();
        let (mut names, mut cookie, mut verifier) = (Vec::new(), 0, cookieverf3::default());
        loop {
            let args = READDIR3args {
                dir: root.clone(),
                cookie,
                cookieverf: verifier,
                count: 65536,
            };
            let page = match tokio::time::timeout(TIMEOUT, c.readdir(&args)).await {
                Ok(Ok(Nfs3Result::Ok(ok))) => ok,
                Ok(Ok(Nfs3Result::Err((status, _)))) => {
                    return Err(self.unusable(format!("READDIR: {status:?}")))
                }
                Ok(Err(e)) => return Err(self.unusable(format!("READDIR: {e}"))),
                Err(_) => return Err(self.unusable("READDIR timed out".into())),
            };
            for entry in page.reply.entries.0.iter() {
                let name = String::from_utf8_lossy(entry.name.0.as_ref()).into_owned();
                if name != "." && name != ".." {
                    names.push(name);
                }
                cookie = entry.cookie;
            }
            verifier = page.cookieverf;
            if page.reply.eof || page.reply.entries.0.is_empty() {
                break;
            }
        }
        let _ = c.unmount().await;
        Ok(names)
    }

    pub async fn info(&self, name: &str, format: Format) -> Result<NfsVolume, StorageError> {
        check_name(name)?;
        let info = match qemu_img::info_of(&self.url(name), format).await {
            Err(StorageError::Command { message, .. })
                if message.contains("No such file") || message.contains("NOENT") =>
            {
                return Err(StorageError::NotFound(name.to_string()))
            }
            other => other?,
        };
        Ok(NfsVolume {
            name: name.to_string(),
            virtual_size: info.virtual_size,
            allocation: info.actual_size,
        })
    }

    /// Makes volume file `name` of `size` bytes (a copy may be larger than its source, never
    /// smaller); refuses a name in use.
    pub async fn create(
        &self,
        name: &str,
        format: Format,
        size: u64,
        source: &NfsSource,
    ) -> Result<NfsVolume, StorageError> {
        match self.info(name, format).await {
            Ok(_) => return Err(StorageError::Exists(name.to_string())),
            Err(StorageError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let tmp = format!("{name}{TEMPORARY}");
        self.remove(&tmp).await?;
        let made = async {
            match source {
                NfsSource::Blank => qemu_img::create_at(&self.url(&tmp), format, size).await?,
                NfsSource::File {
                    from,
                    format: from_format,
                } => {
                    qemu_img::convert_to(
                        &from.display().to_string(),
                        *from_format,
                        &self.url(&tmp),
                        format,
                    )
                    .await?
                }
                NfsSource::Volume {
                    name: from,
                    format: from_format,
                } => {
                    check_name(from)?;
                    qemu_img::convert_to(&self.url(from), *from_format, &self.url(&tmp), format)
                        .await?
                }
            }
            let made = self.info(&tmp, format).await?;
            if size > made.virtual_size {
                qemu_img::resize_at(&self.url(&tmp), format, size).await?;
            }
            Ok(())
        };
        if let Err(e) = made.await {
            let _ = self.remove(&tmp).await;
            return Err(e);
        }
        self.rename(&tmp, name).await?;
        self.info(name, format).await
    }

    /// Grows volume file `name`; refuses shrinking. Not for a file a running guest has open:
    /// its QEMU grows it (`blockresize`).
    pub async fn resize(
        &self,
        name: &str,
        format: Format,
        size: u64,
    ) -> Result<NfsVolume, StorageError> {
        let now = self.info(name, format).await?;
        if size < now.virtual_size {
            return Err(StorageError::Shrink {
                volume: name.to_string(),
                current: now.virtual_size,
                requested: size,
            });
        }
        if size > now.virtual_size {
            qemu_img::resize_at(&self.url(name), format, size).await?;
        }
        self.info(name, format).await
    }

    /// Removes volume file `name` and what an interrupted create of it left; nothing when they
    /// are gone.
    pub async fn delete(&self, name: &str) -> Result<(), StorageError> {
        check_name(name)?;
        self.remove(&format!("{name}{TEMPORARY}")).await?;
        self.remove(name).await
    }

    async fn remove(&self, name: &str) -> Result<(), StorageError> {
        let mut c = self.connect().await?;
        let root = c.root_nfs_fh3();
        let args = REMOVE3args {
            object: diropargs3 {
                dir: root,
                name: filename3(Opaque::borrowed(name.as_bytes())),
            },
        };
        let got = tokio::time::timeout(TIMEOUT, c.remove(&args)).await;
        let _ = c.unmount().await;
        match got {
            Ok(Ok(Nfs3Result::Ok(_))) => Ok(()),
            Ok(Ok(Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)))) => Ok(()),
            Ok(Ok(Nfs3Result::Err((status, _)))) => {
                Err(self.unusable(format!("cannot remove {name}: {status:?}")))
            }
            Ok(Err(e)) => Err(self.unusable(format!("cannot remove {name}: {e}"))),
            Err(_) => Err(self.unusable(format!("removing {name} timed out"))),
        }
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), StorageError> {
        let mut c = self.connect().await?;
        let root = c.root_nfs_fh3();
        let args = RENAME3args {
            from: diropargs3 {
                dir: root.clone(),
                name: filename3(Opaque::borrowed(from.as_bytes())),
            },
            to: diropargs3 {
                dir: root,
                name: filename3(Opaque::borrowed(to.as_bytes())),
            },
        };
        let got = tokio::time::timeout(TIMEOUT, c.rename(&args)).await;
        let _ = c.unmount().await;
        match got {
            Ok(Ok(Nfs3Result::Ok(_))) => Ok(()),
            Ok(Ok(Nfs3Result::Err((status, _)))) => {
                Err(self.unusable(format!("cannot rename {from} to {to}: {status:?}")))
            }
            Ok(Err(e)) => Err(self.unusable(format!("cannot rename {from}: {e}"))),
            Err(_) => Err(self.unusable(format!("renaming {from} timed out"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_the_owner_and_hostile_configurations_are_refused() {
        let good = NfsConfig {
            server: "10.0.0.5".into(),
            export: "/srv/vms/".into(),
            uid: 64055,
            gid: 64055,
        };
        let pool = NfsPool::new(good.clone()).unwrap();
        assert_eq!(pool.path("v.qcow2"), "/srv/vms/v.qcow2");
        assert_eq!(
            pool.url("v.qcow2"),
            "nfs://10.0.0.5/srv/vms/v.qcow2?uid=64055&gid=64055"
        );
        for bad in [
            NfsConfig {
                server: "a b".into(),
                ..good.clone()
            },
            NfsConfig {
                server: "-o".into(),
                ..good.clone()
            },
            NfsConfig {
                export: "relative".into(),
                ..good.clone()
            },
            NfsConfig {
                export: "/a/../etc".into(),
                ..good.clone()
            },
            NfsConfig {
                export: "/a?uid=0".into(),
                ..good.clone()
            },
        ] {
            assert!(NfsPool::new(bad.clone()).is_err(), "{bad:?} was taken");
        }
    }
}
