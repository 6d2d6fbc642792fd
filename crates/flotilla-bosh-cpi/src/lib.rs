//! A BOSH CPI (API v2) on the Flotilla API. The director (or `bosh create-env`) runs the binary
//! once per call with one JSON request on stdin; the answer is one JSON document on stdout and
//! the process always exits 0 (bosh-cli fails a call on any other exit). It keeps nothing
//! between calls: VMs are VirtualMachines, persistent disks Volumes, snapshots
//! VolumeSnapshots, stemcells Images, the director's metadata labels; waiting, placement and
//! throttling happen in Flotilla. The agent's settings reach the VM on an OpenStack config
//! drive (`cloudInit: configDrive`), so no registry is needed.

pub mod cloud;
pub mod config;
pub mod disks;
pub mod protocol;
pub mod settings;
pub mod stemcell;
pub mod vms;

use serde_json::{json, Value};

use crate::cloud::Cloud;
use crate::protocol::{Arguments, CpiError, Request, API_VERSION};

/// What `info` answers.
pub fn info() -> Value {
    json!({"api_version": API_VERSION, "stemcell_formats": ["openstack-qcow2", "openstack-raw"]})
}

/// One call: the request's bytes in, the response document out (never a failure: errors are
/// in the document).
pub async fn handle(input: &[u8], config: Result<config::Config, String>) -> Value {
    let request = match Request::parse(input) {
        Ok(r) => r,
        Err(e) => return protocol::response(Err(e), ""),
    };
    if request.method == "info" {
        return protocol::response(Ok(info()), "");
    }
    if !KNOWN.contains(&request.method.as_str()) {
        let e = CpiError::NotImplemented(format!(
            "Must call implemented method: unknown method {:?}",
            request.method
        ));
        return protocol::response(Err(e), "");
    }
    let cloud = match config.map_err(CpiError::Cpi).and_then(Cloud::new) {
        Ok(c) => c,
        Err(e) => return protocol::response(Err(e), ""),
    };
    let result = call(&cloud, &request).await;
    protocol::response(result, &cloud.log())
}

/// Every method of CPI API v2.
pub const KNOWN: &[&str] = &[
    "info",
    "create_stemcell",
    "delete_stemcell",
    "create_vm",
    "delete_vm",
    "has_vm",
    "reboot_vm",
    "set_vm_metadata",
    "set_disk_metadata",
    "calculate_vm_cloud_properties",
    "create_disk",
    "delete_disk",
    "attach_disk",
    "detach_disk",
    "has_disk",
    "get_disks",
    "resize_disk",
    "update_disk",
    "snapshot_disk",
    "delete_snapshot",
];

async fn call(cloud: &Cloud, request: &Request) -> Result<Value, CpiError> {
    let a = Arguments {
        method: &request.method,
        values: &request.arguments,
    };
    let version = request.version();
    let null = |r: Result<(), CpiError>| r.map(|()| Value::Null);
    match request.method.as_str() {
        "create_stemcell" => {
            let properties = a.object(1, "the stemcell's cloud properties", true)?;
            let path = a.string(0, "the image's path")?;
            cloud
                .create_stemcell(&path, &properties)
                .await
                .map(Value::from)
        }
        "delete_stemcell" => null(
            cloud
                .delete_stemcell(&a.string(0, "the stemcell CID")?)
                .await,
        ),
        "create_vm" => {
            let request = vms::VmRequest {
                agent_id: a.string(0, "the agent id")?,
                stemcell: a.string(1, "the stemcell CID")?,
                cloud_properties: a.object(2, "the cloud properties", true)?,
                networks: a.object(3, "the networks", false)?,
                disk_cids: a.strings(4, "the disk CIDs")?,
                env: a.object(5, "the environment", true)?,
            };
            cloud.create_vm(request, version).await
        }
        "delete_vm" => null(cloud.delete_vm(&a.string(0, "the VM CID")?).await),
        "has_vm" => cloud
            .has_vm(&a.string(0, "the VM CID")?)
            .await
            .map(Value::from),
        "reboot_vm" => null(cloud.reboot_vm(&a.string(0, "the VM CID")?).await),
        "set_vm_metadata" => {
            let metadata = a.object(1, "the metadata", true)?;
            null(
                cloud
                    .set_metadata("vm", &a.string(0, "the VM CID")?, &metadata)
                    .await,
            )
        }
        "set_disk_metadata" => {
            let metadata = a.object(1, "the metadata", true)?;
            null(
                cloud
                    .set_metadata("volume", &a.string(0, "the disk CID")?, &metadata)
                    .await,
            )
        }
        "calculate_vm_cloud_properties" => Cloud::calculate_vm_cloud_properties(&a),
        "create_disk" => {
            let size = a.number(0, "the size in MiB")?;
            let properties = a.object(1, "the cloud properties", true)?;
            let vm = a.optional_string(2, "the VM CID")?;
            cloud
                .create_disk(size, &properties, vm.as_deref())
                .await
                .map(Value::from)
        }
        "delete_disk" => null(cloud.delete_disk(&a.string(0, "the disk CID")?).await),
        "attach_disk" => {
            let hint = cloud
                .attach_disk(&a.string(0, "the VM CID")?, &a.string(1, "the disk CID")?)
                .await?;
            Ok(if version >= 2 { hint } else { Value::Null })
        }
        "detach_disk" => null(
            cloud
                .detach_disk(&a.string(0, "the VM CID")?, &a.string(1, "the disk CID")?)
                .await,
        ),
        "has_disk" => cloud
            .has_disk(&a.string(0, "the disk CID")?)
            .await
            .map(Value::from),
        "get_disks" => cloud
            .get_disks(&a.string(0, "the VM CID")?)
            .await
            .map(Value::from),
        "resize_disk" => null(
            cloud
                .resize_disk(
                    &a.string(0, "the disk CID")?,
                    a.number(1, "the new size in MiB")?,
                )
                .await,
        ),
        "update_disk" => Err(CpiError::NotSupported(
            "update_disk is not supported: the director makes a new disk and copies the data"
                .into(),
        )),
        "snapshot_disk" => {
            let metadata = a.object(1, "the metadata", true)?;
            cloud
                .snapshot_disk(&a.string(0, "the disk CID")?, &metadata)
                .await
                .map(Value::from)
        }
        "delete_snapshot" => null(
            cloud
                .delete_snapshot(&a.string(0, "the snapshot CID")?)
                .await,
        ),
        other => Err(CpiError::NotImplemented(format!(
            "Must call implemented method: unknown method {other:?}"
        ))),
    }
}
