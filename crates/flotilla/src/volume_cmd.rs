//! `flotilla volume ...`: volumes and what is done with them — made, attached to and detached
//! from VMs (the VM's `spec.disks`), grown, snapshotted and reverted. Each verb is one API
//! change; the agents do the rest, and `flotilla get` shows where it stands.

use anyhow::{anyhow, Context as _};
use flotilla_client::Client;
use flotilla_types::kinds::volume_snapshot::REVERT_ANNOTATION;
use flotilla_types::registry;
use serde_json::{json, Value};

use crate::client_cmds::{not_found_hint, project};
use crate::config::{self, ConnectionArgs};

#[derive(clap::Subcommand)]
pub enum VolumeCommand {
    /// Make a volume: blank, a clone of a volume or snapshot (--from, --from-snapshot), or a
    /// copy of an image (--from-image).
    Create {
        name: String,
        /// Its size, e.g. 10Gi (a clone: at least its source's).
        #[arg(long)]
        size: String,
        /// The StoragePool (default: `default`).
        #[arg(long)]
        pool: Option<String>,
        /// qcow2 (default) or raw.
        #[arg(long)]
        format: Option<String>,
        /// Several VMs may attach it (raw only).
        #[arg(long)]
        shareable: bool,
        /// Clone this volume.
        #[arg(long, conflicts_with_all = ["from_snapshot", "from_image"])]
        from: Option<String>,
        /// Clone this VolumeSnapshot.
        #[arg(long, conflicts_with = "from_image")]
        from_snapshot: Option<String>,
        /// Start as a copy of this Image.
        #[arg(long, conflicts_with = "linked")]
        from_image: Option<String>,
        /// A linked clone (an overlay of its source) rather than a full copy.
        #[arg(long)]
        linked: bool,
        /// In an iscsi pool: the target's LUN it is.
        #[arg(long)]
        lun: Option<u32>,
        #[arg(short = 'p', long)]
        project: Option<String>,
    },
    /// Attach a volume to a VM (hot-plugged when it runs).
    Attach {
        volume: String,
        /// The VM.
        #[arg(long)]
        to: String,
        /// The disk's name in the VM (default: the volume's).
        #[arg(long)]
        name: Option<String>,
        /// virtio (default) or scsi.
        #[arg(long)]
        bus: Option<String>,
        #[arg(long)]
        read_only: bool,
        #[arg(short = 'p', long)]
        project: Option<String>,
    },
    /// Detach a volume from a VM (unplugged when it runs; the guest lets go first).
    Detach {
        volume: String,
        /// The VM.
        #[arg(long)]
        from: String,
        #[arg(short = 'p', long)]
        project: Option<String>,
    },
    /// Grow a volume (a running guest sees the new size at once); shrinking is refused.
    Resize {
        volume: String,
        /// The new size, e.g. 20Gi.
        size: String,
        #[arg(short = 'p', long)]
        project: Option<String>,
    },
    /// Take a snapshot of a volume (also while a guest writes it).
    Snapshot {
        volume: String,
        /// The snapshot's name.
        snapshot: String,
        #[arg(short = 'p', long)]
        project: Option<String>,
    },
    /// Put a volume back to a snapshot (what was written since is lost; no running VM may
    /// have it).
    Revert {
        volume: String,
        snapshot: String,
        #[arg(short = 'p', long)]
        project: Option<String>,
    },
    /// Make a volume from a disk image file (qcow2 or raw) on this machine: the file is
    /// uploaded as a temporary Image, the volume made from it (in any pool), the Image deleted.
    Upload {
        volume: String,
        file: std::path::PathBuf,
        /// Its size (default: the file's virtual size; never less).
        #[arg(long)]
        size: Option<String>,
        /// The StoragePool (default: `default`).
        #[arg(long)]
        pool: Option<String>,
        /// The volume's format: qcow2 (default) or raw (the file's is found from its header).
        #[arg(long)]
        format: Option<String>,
        /// In an iscsi pool: the target's LUN it is.
        #[arg(long)]
        lun: Option<u32>,
        #[arg(short = 'p', long)]
        project: Option<String>,
    },
    /// Download a volume's content as one standalone file (no running VM may write it).
    Download {
        volume: String,
        /// Where to write it (- for stdout).
        file: String,
        /// qcow2 (default) or raw.
        #[arg(long, default_value = "qcow2")]
        format: String,
        #[arg(short = 'p', long)]
        project: Option<String>,
    },
}

pub async fn run(conn: &ConnectionArgs, cmd: VolumeCommand) -> anyhow::Result<()> {
    let (client, ctx) = config::client(conn).await?;
    let volumes = registry::by_kind("Volume").expect("registered");
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            pool,
            format,
            shareable,
            from,
            from_snapshot,
            from_image,
            linked,
            lun,
            project: p,
        } => {
            let proj = project(&p, &ctx).to_string();
            let mut spec = json!({"size": size});
            if let Some(lun) = lun {
                spec["lun"] = json!(lun);
            }
            if let Some(pool) = pool {
                spec["pool"] = json!(pool);
            }
            if let Some(format) = format {
                spec["format"] = json!(format);
            }
            if shareable {
                spec["shareable"] = json!(true);
            }
            let mode = if linked { "linked" } else { "full" };
            if let Some(image) = from_image {
                spec["source"] = json!({"image": image});
            }
            match (from, from_snapshot) {
                (Some(v), _) => spec["source"] = json!({"volume": v, "mode": mode}),
                (None, Some(s)) => spec["source"] = json!({"snapshot": s, "mode": mode}),
                (None, None) if linked => {
                    return Err(anyhow!("--linked needs --from or --from-snapshot"))
                }
                (None, None) => {}
            }
            let body = json!({"metadata": {"name": name}, "spec": spec});
            client.create(volumes, Some(&proj), &body).await?;
            println!("volume/{name} created");
        }
        VolumeCommand::Attach {
            volume,
            to,
            name,
            bus,
            read_only,
            project: p,
        } => {
            let proj = project(&p, &ctx).to_string();
            let mut disk =
                json!({"name": name.unwrap_or_else(|| volume.clone()), "volume": volume});
            if let Some(bus) = bus {
                disk["bus"] = json!(bus);
            }
            if read_only {
                disk["readOnly"] = json!(true);
            }
            edit_disks(&client, &proj, &to, |disks| {
                if disks.iter().any(|d| d["volume"] == volume.as_str()) {
                    return Err(anyhow!("volume {volume} is attached to {to} already"));
                }
                disks.push(disk.clone());
                Ok(())
            })
            .await?;
            println!("volume/{volume} attached to virtualmachine/{to}");
        }
        VolumeCommand::Detach {
            volume,
            from,
            project: p,
        } => {
            let proj = project(&p, &ctx).to_string();
            edit_disks(&client, &proj, &from, |disks| {
                let before = disks.len();
                disks.retain(|d| d["volume"] != volume.as_str());
                if disks.len() == before {
                    return Err(anyhow!("virtualmachine/{from} has no volume {volume}"));
                }
                Ok(())
            })
            .await?;
            println!(
                "volume/{volume} detached from virtualmachine/{from} (it is free once the guest lets go: see status.attachedTo)"
            );
        }
        VolumeCommand::Resize {
            volume,
            size,
            project: p,
        } => {
            let proj = project(&p, &ctx).to_string();
            let patch = json!({"spec": {"size": size}});
            client
                .patch(volumes, Some(&proj), &volume, &patch, false)
                .await
                .map_err(|e| not_found_hint(e, volumes, &proj))?;
            println!("volume/{volume} resized to {size}");
        }
        VolumeCommand::Snapshot {
            volume,
            snapshot,
            project: p,
        } => {
            let proj = project(&p, &ctx).to_string();
            let snapshots = registry::by_kind("VolumeSnapshot").expect("registered");
            let body = json!({"metadata": {"name": snapshot}, "spec": {"volume": volume}});
            client.create(snapshots, Some(&proj), &body).await?;
            println!("volumesnapshot/{snapshot} of volume/{volume} created");
        }
        VolumeCommand::Download {
            volume,
            file,
            format,
            project: p,
        } => {
            use futures::StreamExt;
            use tokio::io::AsyncWriteExt;
            let proj = project(&p, &ctx).to_string();
            let stream = client
                .volume_data(&proj, &volume, &format)
                .await
                .map_err(|e| not_found_hint(e, volumes, &proj))?;
            let mut stream = std::pin::pin!(stream);
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin> = if file == "-" {
                Box::new(tokio::io::stdout())
            } else {
                Box::new(tokio::fs::File::create(&file).await?)
            };
            let mut bytes = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                bytes += chunk.len() as u64;
                out.write_all(&chunk).await?;
            }
            out.flush().await?;
            if file != "-" {
                println!("volume/{volume} downloaded to {file} ({bytes} bytes, {format})");
            }
        }
        VolumeCommand::Upload {
            volume,
            file,
            size,
            pool,
            format,
            lun,
            project: p,
        } => {
            let proj = project(&p, &ctx).to_string();
            let (file_format, virtual_size) = disk_file(&file)?;
            let images = registry::by_kind("Image").expect("registered");
            // A name of its own: never an Image someone else made.
            let suffix = rand::random::<u32>() % 1_000_000;
            let image = format!("upload-{}-{suffix}", &volume[..volume.len().min(48)]);
            let uploaded = crate::image_cmd::upload(
                &client,
                &proj,
                &image,
                &file,
                Some(file_format.to_string()),
                None,
            )
            .await;
            if let Err(e) = uploaded {
                let _ = client.delete(images, Some(&proj), &image).await;
                return Err(e);
            }
            let mut spec = json!({
                "size": size.unwrap_or_else(|| virtual_size.to_string()),
                "source": {"image": image},
            });
            for (key, value) in [
                ("pool", pool.map(|v| json!(v))),
                ("format", format.map(|v| json!(v))),
                ("lun", lun.map(|v| json!(v))),
            ] {
                if let Some(value) = value {
                    spec[key] = value;
                }
            }
            let body = json!({"metadata": {"name": volume}, "spec": spec});
            let made = async {
                client.create(volumes, Some(&proj), &body).await?;
                loop {
                    let v = client.get(volumes, Some(&proj), &volume).await?;
                    match v["status"]["phase"].as_str() {
                        Some("Available") => return Ok(()),
                        Some("Failed") => {
                            return Err(anyhow!(
                                "volume/{volume} failed: {}",
                                v["status"]["message"].as_str().unwrap_or_default()
                            ))
                        }
                        _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
                    }
                }
            };
            let result: anyhow::Result<()> = made.await;
            // The Image was only the way in: the volume holds its own copy.
            let _ = client.delete(images, Some(&proj), &image).await;
            result?;
            println!("volume/{volume} made from {}", file.display());
        }
        VolumeCommand::Revert {
            volume,
            snapshot,
            project: p,
        } => {
            let proj = project(&p, &ctx).to_string();
            // A new value each time, so that reverting to the same snapshot again is a request.
            let request = format!("{snapshot} {}", flotilla_types::meta::now());
            let patch = json!({"metadata": {"annotations": {REVERT_ANNOTATION: request}}});
            client
                .patch(volumes, Some(&proj), &volume, &patch, false)
                .await
                .map_err(|e| not_found_hint(e, volumes, &proj))?;
            println!("volume/{volume} revert to {snapshot} requested (done when status.lastRevert says {request:?})");
        }
    }
    Ok(())
}

/// The format of a disk image file and its virtual size: qcow2 by its header (the size at
/// byte 24, big-endian), else raw (its length).
fn disk_file(file: &std::path::Path) -> anyhow::Result<(&'static str, u64)> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let len = f.metadata()?.len();
    let mut header = [0u8; 32];
    let read = f.read(&mut header)?;
    if read == 32 && header[..4] == *b"QFI\xfb" {
        let size = u64::from_be_bytes(header[24..32].try_into().expect("8 bytes"));
        return Ok(("qcow2", size));
    }
    Ok(("raw", len))
}

/// Changes a VM's `spec.disks` on its latest version, guarded by its resourceVersion (a
/// conflict is retried with the newer one).
async fn edit_disks(
    client: &Client,
    project: &str,
    vm: &str,
    edit: impl Fn(&mut Vec<Value>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let vms = registry::by_kind("VirtualMachine").expect("registered");
    for _ in 0..10 {
        let current = client
            .get(vms, Some(project), vm)
            .await
            .map_err(|e| not_found_hint(e, vms, project))?;
        let mut disks: Vec<Value> = current["spec"]["disks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        edit(&mut disks)?;
        let patch = json!({"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                           "spec": {"disks": disks}});
        match client.patch(vms, Some(project), vm, &patch, false).await {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some(409) && !e.to_string().contains("attached to") => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(anyhow!("virtualmachine/{vm} kept changing; try again"))
}
