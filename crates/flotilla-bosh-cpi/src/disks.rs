//! Persistent disks (Volumes) and their snapshots (VolumeSnapshots): made, attached with the
//! disk's CID as the serial the guest sees, detached, grown, deleted.

use serde_json::{json, Value};

use crate::cloud::{kind, labels, new_name, Cloud};
use crate::protocol::CpiError;

fn disk_not_found(cid: &str) -> CpiError {
    CpiError::DiskNotFound(format!("disk {cid} not found"))
}

fn vm_not_found(cid: &str) -> CpiError {
    CpiError::VmNotFound(format!("VM {cid} not found"))
}

impl Cloud {
    /// A blank Volume of `size_mib` in the cloud properties' `pool` (or the default one); in a
    /// node-local pool, on the node of VM `vm` when one is named.
    pub async fn create_disk(
        &self,
        size_mib: u64,
        cloud: &Value,
        vm: Option<&str>,
    ) -> Result<String, CpiError> {
        let pool_name = cloud["pool"]
            .as_str()
            .unwrap_or(&self.config.flotilla.default_pool)
            .to_string();
        // StoragePools are cluster-wide: a CPI whose account may not read them is told by
        // Flotilla itself when the disk does not fit the pool.
        let pool = match self.client.get(kind("storagepool"), None, &pool_name).await {
            Ok(pool) => pool,
            Err(e) if e.code() == Some(404) => {
                return Err(CpiError::cloud(format!(
                    "there is no StoragePool {pool_name:?} (cloud_properties.pool)"
                )))
            }
            Err(e) if e.code() == Some(403) => json!({"spec": {"type": "unknown"}}),
            Err(e) => return Err(crate::cloud::api("reading the pool", e)),
        };
        let pool_type = pool["spec"]["type"].as_str().unwrap_or("dir");
        let format = match pool_type {
            "iscsi" => {
                return Err(CpiError::cloud(format!(
                    "StoragePool {pool_name:?} is an iscsi pool, whose volumes are LUNs an administrator makes: use a dir, nfs or rbd pool for BOSH disks"
                )))
            }
            _ if cloud["format"].is_string() => cloud["format"].as_str().unwrap_or_default(),
            "rbd" => "raw",
            _ => "qcow2",
        };
        let shared = matches!(pool_type, "rbd" | "nfs" | "iscsi");
        let name = new_name("disk", 16);
        let mut spec =
            json!({"pool": pool_name, "size": format!("{size_mib}Mi"), "format": format});
        if let (Some(vm), false) = (vm, shared) {
            match self.find("vm", vm).await? {
                Some(v) => {
                    let node = v["status"]["nodeName"]
                        .as_str()
                        .or(v["spec"]["nodeName"].as_str());
                    if let Some(node) = node {
                        self.note(format!("making disk {name} on {node}, beside VM {vm}"));
                        spec["nodeName"] = json!(node);
                    }
                }
                None => self.note(format!(
                    "VM {vm} is not there; disk {name} goes where there is room"
                )),
            }
        }
        let body = json!({"metadata": {"name": name, "labels": labels(&[])}, "spec": spec});
        self.client
            .create(kind("volume"), Some(self.project()), &body)
            .await
            .map_err(|e| crate::cloud::api("making the disk", e))?;
        let made = self
            .wait("volume", &name, "the disk is made", |v| {
                let Some(v) = v else {
                    return Some(Err(CpiError::cloud(format!(
                        "disk {name} went away while it was made"
                    ))));
                };
                let message = v["status"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                match v["status"]["phase"].as_str() {
                    Some("Available") => Some(Ok(())),
                    Some("Failed") => Some(Err(CpiError::cloud(format!(
                        "disk {name} failed: {message}"
                    )))),
                    // No node has room: said at once, not after the timeout.
                    Some("Pending")
                        if message.contains("bytes free")
                            || message.contains("fully allocated") =>
                    {
                        Some(Err(CpiError::NoDiskSpace {
                            message,
                            ok_to_retry: false,
                        }))
                    }
                    _ => None,
                }
            })
            .await;
        if let Err(e) = made {
            if let Err(cleanup) = self.remove("volume", &name).await {
                self.note(format!("removing disk {name} failed too: {cleanup}"));
            }
            return Err(e);
        }
        self.note(format!("disk {name} made"));
        Ok(name)
    }

    /// Deletes a disk (one not there is deleted) and waits until its space is freed.
    pub async fn delete_disk(&self, cid: &str) -> Result<(), CpiError> {
        self.remove_and_wait("volume", cid).await
    }

    pub async fn has_disk(&self, cid: &str) -> Result<bool, CpiError> {
        Ok(self
            .find("volume", cid)
            .await?
            .is_some_and(|v| v["metadata"]["deletionTimestamp"].is_null()))
    }

    /// Attaches disk `cid` to VM `vm` (the guest sees it as `/dev/disk/by-id/virtio-<cid>`)
    /// and answers the agent's hint for it.
    pub async fn attach_disk(&self, vm: &str, cid: &str) -> Result<Value, CpiError> {
        let Some(volume) = self.find("volume", cid).await? else {
            return Err(disk_not_found(cid));
        };
        let Some(current) = self.find("vm", vm).await? else {
            return Err(vm_not_found(vm));
        };
        if volume["status"]["phase"] != "Available" {
            return Err(CpiError::cloud(format!(
                "disk {cid} is not available yet ({}: {})",
                volume["status"]["phase"].as_str().unwrap_or("Pending"),
                volume["status"]["message"].as_str().unwrap_or_default()
            )));
        }
        let (disk_node, vm_node) = (
            volume["status"]["node"].as_str(),
            current["status"]["nodeName"].as_str(),
        );
        if volume["status"]["shared"] != true {
            if let (Some(disk_node), Some(vm_node)) = (disk_node, vm_node) {
                if disk_node != vm_node {
                    return Err(CpiError::cloud(format!(
                        "disk {cid} is on node {disk_node}'s local storage (pool {}) and VM {vm} runs on {vm_node}: a local disk attaches only on its node. Make disks in a shared pool (cloud_properties.pool: an nfs or rbd pool), or let create_disk have the VM's CID",
                        volume["spec"]["pool"].as_str().unwrap_or_default()
                    )));
                }
            }
        }
        let holders = volume["status"]["attachedTo"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(other) = holders.iter().find(|h| h["vm"] != vm) {
            if volume["spec"]["shareable"] != true {
                return Err(CpiError::cloud(format!(
                    "disk {cid} is attached to VM {} already",
                    other["vm"].as_str().unwrap_or_default()
                )));
            }
        }
        let updated = self
            .update("vm", vm, |object| {
                let disks = object["spec"]["disks"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if disks.iter().any(|d| d["volume"] == cid) {
                    return Ok(false);
                }
                let mut disks = disks;
                disks.push(json!({"name": cid, "volume": cid, "serial": cid}));
                object["spec"]["disks"] = json!(disks);
                Ok(true)
            })
            .await?;
        if updated.is_none() {
            return Err(vm_not_found(vm));
        }
        self.note(format!("attaching disk {cid} to VM {vm}"));
        let target = self
            .wait("vm", vm, "the disk is attached", |object| {
                let Some(object) = object else {
                    return Some(Err(vm_not_found(vm)));
                };
                let entry = object["status"]["disks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|d| {
                        d["volume"] == cid
                            && matches!(d["state"].as_str(), Some("Attached" | "Defined"))
                    })?;
                Some(Ok(entry["target"].as_str().unwrap_or_default().to_string()))
            })
            .await?;
        Ok(json!({"id": cid, "path": format!("/dev/{target}")}))
    }

    /// Detaches disk `cid` from VM `vm` and waits until the guest has let go of it.
    pub async fn detach_disk(&self, vm: &str, cid: &str) -> Result<(), CpiError> {
        let mut listed = false;
        let updated = self
            .update("vm", vm, |object| {
                let disks = object["spec"]["disks"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                listed = disks.iter().any(|d| d["volume"] == cid);
                object["spec"]["disks"] = json!(disks
                    .into_iter()
                    .filter(|d| d["volume"] != cid)
                    .collect::<Vec<_>>());
                Ok(listed)
            })
            .await?;
        if updated.is_none() {
            return Err(vm_not_found(vm));
        }
        if !listed && !self.held_by(cid, vm).await? {
            return Err(CpiError::DiskNotAttached(format!(
                "disk {cid} is not attached to VM {vm}"
            )));
        }
        self.note(format!("detaching disk {cid} from VM {vm}"));
        let uid = updated
            .as_ref()
            .and_then(|v| v["metadata"]["uid"].as_str())
            .unwrap_or_default()
            .to_string();
        self.wait(
            "volume",
            cid,
            "the guest has let go of the disk",
            |volume| {
                let Some(volume) = volume else {
                    return Some(Ok(()));
                };
                let held = volume["status"]["attachedTo"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|h| h["uid"] == uid.as_str());
                (!held).then_some(Ok(()))
            },
        )
        .await
    }

    /// Whether Volume `cid` still lists VM `vm` as holding it.
    async fn held_by(&self, cid: &str, vm: &str) -> Result<bool, CpiError> {
        let Some(volume) = self.find("volume", cid).await? else {
            return Err(disk_not_found(cid));
        };
        Ok(volume["status"]["attachedTo"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|h| h["vm"] == vm))
    }

    /// Grows disk `cid` to `size_mib` and waits until it has; shrinking is NotSupported.
    pub async fn resize_disk(&self, cid: &str, size_mib: u64) -> Result<(), CpiError> {
        let Some(volume) = self.find("volume", cid).await? else {
            return Err(disk_not_found(cid));
        };
        let bytes = size_mib << 20;
        let now = volume["spec"]["size"]
            .as_str()
            .and_then(|s| flotilla_types::Quantity::parse(s).ok())
            .map(|q| q.value() as u64)
            .unwrap_or(0);
        if bytes < now {
            return Err(CpiError::NotSupported(format!(
                "disk {cid} is {} MiB; disks only grow, not to {size_mib} MiB",
                now >> 20
            )));
        }
        if bytes > now {
            let patch = json!({"spec": {"size": format!("{size_mib}Mi")}});
            self.client
                .patch(kind("volume"), Some(self.project()), cid, &patch, false)
                .await
                .map_err(|e| crate::cloud::api(&format!("growing disk {cid}"), e))?;
        }
        self.wait("volume", cid, "the disk has grown", |v| {
            let Some(v) = v else {
                return Some(Err(disk_not_found(cid)));
            };
            (v["status"]["capacity"].as_u64().unwrap_or(0) >= bytes).then_some(Ok(()))
        })
        .await
    }

    /// A snapshot of disk `cid`, with the director's metadata as labels.
    pub async fn snapshot_disk(&self, cid: &str, metadata: &Value) -> Result<String, CpiError> {
        if self.find("volume", cid).await?.is_none() {
            return Err(disk_not_found(cid));
        }
        let name = new_name("snap-", 32);
        let mut body =
            json!({"metadata": {"name": name, "labels": labels(&[])}, "spec": {"volume": cid}});
        let meta = crate::cloud::metadata_patch(metadata);
        for (k, v) in meta["metadata"]["labels"].as_object().into_iter().flatten() {
            body["metadata"]["labels"][k] = v.clone();
        }
        body["metadata"]["annotations"] = meta["metadata"]["annotations"].clone();
        self.client
            .create(kind("volumesnapshot"), Some(self.project()), &body)
            .await
            .map_err(|e| crate::cloud::api(&format!("snapshotting disk {cid}"), e))?;
        let taken = self
            .wait("volumesnapshot", &name, "the snapshot is taken", |s| {
                let s = s?;
                match s["status"]["phase"].as_str() {
                    Some("Ready") => Some(Ok(())),
                    Some("Failed") => Some(Err(CpiError::cloud(format!(
                        "snapshot of disk {cid} failed: {}",
                        s["status"]["message"].as_str().unwrap_or_default()
                    )))),
                    _ => None,
                }
            })
            .await;
        if let Err(e) = taken {
            let _ = self.remove("volumesnapshot", &name).await;
            return Err(e);
        }
        self.note(format!("snapshot {name} of disk {cid} taken"));
        Ok(name)
    }

    pub async fn delete_snapshot(&self, cid: &str) -> Result<(), CpiError> {
        self.remove_and_wait("volumesnapshot", cid).await
    }
}
