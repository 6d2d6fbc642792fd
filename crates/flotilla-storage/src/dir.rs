//! The `dir` pool: volumes are files in a directory of the node (`<name>.qcow2` or
//! `<name>.raw`), made through a temporary name and renamed into place, so a crash leaves either
//! nothing or a whole volume (and temporaries [`DirPool::sweep_temporaries`] removes). A volume another one
//! is an overlay of cannot be deleted: the pool reads the backing files itself, whatever the
//! control plane believes.

use std::path::{Path, PathBuf};

use crate::qemu_img::{self, Format};
use crate::{check_name, Capacity, NewVolume, Source, StorageError, VolumeInfo};

pub struct DirPool {
    root: PathBuf,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl DirPool {
    /// The pool at `root`, made if missing (mode 0711: QEMU, as libvirt-qemu, opens the files
    /// but need not list them). Every directory above must let others through; if one does
    /// not, the error says which and what to run.
    pub fn open(root: &Path) -> Result<Self, StorageError> {
        let root = std::path::absolute(root).map_err(io(root))?;
        if !root.exists() {
            std::fs::create_dir_all(&root).map_err(io(&root))?;
            std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o711))
                .map_err(io(&root))?;
        }
        if !root.is_dir() {
            return Err(StorageError::Unusable {
                path: root.display().to_string(),
                message: "is not a directory".into(),
            });
        }
        if let Some((dir, mode)) = flotilla_files::first_untraversable(&root) {
            return Err(StorageError::Unusable {
                path: root.display().to_string(),
                message: format!(
                    "QEMU (user libvirt-qemu) cannot reach volumes here: {} is mode {mode:o}; run `chmod o+x {}`",
                    dir.display(),
                    dir.display()
                ),
            });
        }
        Ok(DirPool { root })
    }

    /// Removes what creates interrupted by a crash left (temporary files). Only while no create
    /// of this pool runs: call it once, before the first.
    pub fn sweep_temporaries(&self) -> Result<Vec<PathBuf>, StorageError> {
        flotilla_files::sweep_temps(&self.root, &[]).map_err(io(&self.root))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where volume `name` of `format` lives (see [`volume_name`] for the way back).
    pub fn path(&self, name: &str, format: Format) -> PathBuf {
        self.root.join(format!("{name}.{}", format.as_str()))
    }

    /// The file of volume `name`, whichever its format.
    fn find(&self, name: &str) -> Result<Option<(PathBuf, Format)>, StorageError> {
        check_name(name)?;
        for format in [Format::Qcow2, Format::Raw] {
            let path = self.path(name, format);
            if path.exists() {
                return Ok(Some((path, format)));
            }
        }
        Ok(None)
    }

    /// Makes a volume (a blank disk, or a linked or full clone of a file); refuses a name in use.
    pub async fn create(&self, volume: &NewVolume) -> Result<VolumeInfo, StorageError> {
        if self.find(&volume.name)?.is_some() {
            return Err(StorageError::Exists(volume.name.clone()));
        }
        let dest = self.path(&volume.name, volume.format);
        let tmp = flotilla_files::temp_path(&dest);
        let made = async {
            match &volume.source {
                Source::Blank => qemu_img::create(&tmp, volume.format, volume.size, None).await,
                Source::Clone {
                    from,
                    format,
                    linked: true,
                } => {
                    if volume.format != Format::Qcow2 {
                        return Err(StorageError::Command {
                            command: "a linked clone".into(),
                            message: "needs qcow2: a raw file cannot have a backing file".into(),
                        });
                    }
                    let source = qemu_img::info(from).await?;
                    let size = volume.size.max(source.virtual_size);
                    qemu_img::create(&tmp, Format::Qcow2, size, Some((from, *format))).await
                }
                Source::Clone {
                    from,
                    format,
                    linked: false,
                } => {
                    qemu_img::convert(from, *format, &tmp, volume.format).await?;
                    let copied = qemu_img::info(&tmp).await?;
                    if volume.size > copied.virtual_size {
                        qemu_img::resize(&tmp, volume.format, volume.size).await?;
                    }
                    Ok(())
                }
            }
        };
        if let Err(e) = made.await {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        flotilla_files::commit(&tmp, &dest).map_err(io(&dest))?;
        self.info(&volume.name).await
    }

    pub async fn info(&self, name: &str) -> Result<VolumeInfo, StorageError> {
        let (path, _) = self
            .find(name)?
            .ok_or_else(|| StorageError::NotFound(name.to_string()))?;
        let info = qemu_img::info(&path).await?;
        Ok(VolumeInfo {
            name: name.to_string(),
            path,
            format: info.format,
            virtual_size: info.virtual_size,
            allocation: info.actual_size,
            backing: info.backing,
        })
    }

    /// Every volume in the pool (files other than volumes are left alone).
    pub async fn list(&self) -> Result<Vec<VolumeInfo>, StorageError> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io(&self.root))? {
            let entry = entry.map_err(io(&self.root))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file
                .strip_suffix(".qcow2")
                .or_else(|| file.strip_suffix(".raw"))
            {
                if check_name(name).is_ok() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        let mut out = Vec::new();
        for name in names {
            out.push(self.info(&name).await?);
        }
        Ok(out)
    }

    /// Grows volume `name` to `size` bytes; the same size is nothing to do; smaller is refused.
    pub async fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo, StorageError> {
        let current = self.info(name).await?;
        if size < current.virtual_size {
            return Err(StorageError::Shrink {
                volume: name.to_string(),
                current: current.virtual_size,
                requested: size,
            });
        }
        if size > current.virtual_size {
            qemu_img::resize(&current.path, current.format, size).await?;
        }
        self.info(name).await
    }

    /// Files of the pool whose name starts with `prefix` (a volume's uid: its file, and its
    /// snapshots' overlays, `<uid>.<snapshot uid>`).
    pub async fn family(&self, prefix: &str) -> Result<Vec<VolumeInfo>, StorageError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|v| v.name.starts_with(prefix))
            .collect())
    }

    /// Merges the overlay `top` into its backing file (see [`qemu_img::commit`]), which then
    /// holds everything `top` reads; `top` stays for the caller to delete once nothing uses it.
    pub async fn commit(&self, top: &str) -> Result<VolumeInfo, StorageError> {
        let info = self.info(top).await?;
        let Some(backing) = info.backing.clone() else {
            return Err(StorageError::Command {
                command: format!("committing {top}"),
                message: "it has no backing file".into(),
            });
        };
        qemu_img::commit(&info.path).await?;
        let base = qemu_img::info(&backing).await?;
        let name = volume_name(&backing);
        Ok(VolumeInfo {
            name,
            path: backing,
            format: base.format,
            virtual_size: base.virtual_size,
            allocation: base.actual_size,
            backing: base.backing,
        })
    }

    /// Removes volume `name` (absent is fine); refused while another volume of the pool is an
    /// overlay of it.
    pub async fn delete(&self, name: &str) -> Result<(), StorageError> {
        let Some((path, _)) = self.find(name)? else {
            return Ok(());
        };
        let users: Vec<String> = self
            .list()
            .await?
            .into_iter()
            .filter(|v| v.backing.as_deref() == Some(path.as_path()))
            .map(|v| v.name)
            .collect();
        if !users.is_empty() {
            return Err(StorageError::InUse {
                volume: name.to_string(),
                users,
            });
        }
        flotilla_files::remove(&path).map_err(io(&path))
    }

    /// The filesystem's space and what the pool's volumes take of it.
    pub async fn capacity(&self) -> Result<Capacity, StorageError> {
        let (capacity, available) = statvfs(&self.root)?;
        let allocation = self.list().await?.iter().map(|v| v.allocation).sum();
        Ok(Capacity {
            capacity,
            allocation,
            available,
        })
    }
}

/// Total and available bytes of the filesystem holding `path`.
fn statvfs(path: &Path) -> Result<(u64, u64), StorageError> {
    flotilla_files::space(path).map_err(io(path))
}

/// The name of the volume a file of a pool holds: its file name without the format's extension
/// (empty for a path that is not a file name).
pub fn volume_name(path: &Path) -> String {
    path.file_name()
        .and_then(|f| f.to_str())
        .map(|f| f.rsplit_once('.').map_or(f, |(name, _)| name))
        .unwrap_or_default()
        .to_string()
}
