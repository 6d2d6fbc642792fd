//! VMs: `create_vm` (a VirtualMachine from the stemcell with the agent's settings on a config
//! drive), `delete_vm`, `has_vm`, `reboot_vm`, `get_disks`.

use std::collections::BTreeMap;

use flotilla_types::kinds::vm::{MAX_USER_DATA, RESTART_ANNOTATION};
use serde_json::{json, Value};

use crate::cloud::{api, kind, labels, new_name, Cloud, VM_LABEL};
use crate::protocol::CpiError;
use crate::settings::{AgentSettings, Disks, Network, Vm};

/// What `create_vm` is given.
pub struct VmRequest {
    pub agent_id: String,
    pub stemcell: String,
    pub cloud_properties: Value,
    pub networks: Value,
    pub disk_cids: Vec<String>,
    pub env: Value,
}

/// The ephemeral disk of VM `vm`.
pub fn ephemeral_name(vm: &str) -> String {
    format!("{vm}-eph")
}

/// The serial the guest sees for the ephemeral disk.
const EPHEMERAL_SERIAL: &str = "ephemeral";

fn random_mac() -> String {
    let b: [u8; 3] = rand::random();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn creation_failed(message: String, ok_to_retry: bool) -> CpiError {
    CpiError::VmCreationFailed {
        message,
        ok_to_retry,
    }
}

/// One BOSH network of the request, as a NIC (None for VIP networks) and the agent's view.
struct Nic {
    bosh_name: String,
    attachment: Option<Value>,
    settings: Network,
    /// A VIP network: a floating IP on this Flotilla network.
    vip_network: Option<String>,
}

fn nics(networks: &Value) -> Result<Vec<Nic>, CpiError> {
    let Some(map) = networks.as_object() else {
        return Err(CpiError::Cpi(
            "Arguments are not correct: create_vm takes the networks (an object) as argument 4"
                .into(),
        ));
    };
    let mut out = Vec::new();
    for (name, network) in map {
        let network_type = network["type"].as_str().unwrap_or("manual").to_string();
        let cloud = network["cloud_properties"].clone();
        let flotilla_network = cloud["network"].as_str().map(str::to_string);
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        let mut settings = Network {
            network_type: network_type.clone(),
            ip: network["ip"].as_str().map(str::to_string),
            netmask: network["netmask"].as_str().map(str::to_string),
            gateway: network["gateway"].as_str().map(str::to_string),
            dns: strings(&network["dns"]),
            default: strings(&network["default"]),
            mac: None,
            preconfigured: false,
            cloud_properties: cloud.clone(),
        };
        let Some(flotilla_network) = flotilla_network else {
            return Err(creation_failed(
                format!("network {name:?}: its cloud_properties must name the Flotilla network (cloud_properties.network)"),
                false,
            ));
        };
        match network_type.as_str() {
            "vip" => {
                if settings.ip.is_none() {
                    return Err(creation_failed(
                        format!("network {name:?}: a vip network needs the ip to float"),
                        false,
                    ));
                }
                out.push(Nic {
                    bosh_name: name.clone(),
                    attachment: None,
                    settings,
                    vip_network: Some(flotilla_network),
                });
            }
            "manual" | "dynamic" => {
                let mac = random_mac();
                let mut attachment = json!({"network": flotilla_network, "macAddress": mac});
                if network_type == "manual" {
                    let Some(ip) = &settings.ip else {
                        return Err(creation_failed(
                            format!("network {name:?}: a manual network needs its ip"),
                            false,
                        ));
                    };
                    attachment["ip"] = json!(ip);
                }
                if let Some(groups) = cloud.get("security_groups").filter(|g| !g.is_null()) {
                    attachment["securityGroups"] = groups.clone();
                }
                settings.mac = Some(mac);
                out.push(Nic {
                    bosh_name: name.clone(),
                    attachment: Some(attachment),
                    settings,
                    vip_network: None,
                });
            }
            other => {
                return Err(creation_failed(
                    format!("network {name:?}: type {other:?} is none of manual, dynamic and vip"),
                    false,
                ))
            }
        }
    }
    // The NIC of the default gateway first: it is eth0 in the guest.
    out.sort_by_key(|n| !n.settings.default.iter().any(|d| d == "gateway"));
    Ok(out)
}

/// The VM's size from its cloud properties: a VMClass, or CPUs and memory (MiB).
fn sizing(cloud: &Value, spec: &mut Value) -> Result<(), CpiError> {
    match (
        cloud["class"].as_str(),
        cloud["cpus"].as_u64(),
        cloud["memory"].as_u64(),
    ) {
        (Some(class), None, None) => spec["class"] = json!(class),
        (None, Some(cpus), Some(memory)) => {
            spec["resources"] = json!({"cpus": cpus, "memory": format!("{memory}Mi")})
        }
        _ => {
            return Err(creation_failed(
                "cloud_properties: set class (a VMClass), or cpus and memory (MiB)".into(),
                false,
            ))
        }
    }
    if let Some(size) = cloud["root_disk"]["size"].as_u64() {
        spec["rootDisk"] = json!({"size": format!("{size}Mi")});
    }
    if let Some(selector) = cloud.get("node_selector").filter(|s| !s.is_null()) {
        spec["nodeSelector"] = selector.clone();
    }
    if let Some(policy) = cloud["placement_policy"].as_str() {
        spec["placementPolicy"] = json!(policy);
    }
    Ok(())
}

impl Cloud {
    pub async fn create_vm(&self, request: VmRequest, version: u64) -> Result<Value, CpiError> {
        let name = new_name("vm-", 32);
        self.note(format!("creating VM {name} for agent {}", request.agent_id));
        match self.make_vm(&name, &request).await {
            Ok(()) => Ok(match version {
                1 => json!(name),
                _ => json!([name, request.networks]),
            }),
            Err(e) => {
                self.note(format!(
                    "creating VM {name} failed ({e}); removing what was made"
                ));
                if let Err(cleanup) = self.delete_vm(&name).await {
                    self.note(format!("removing VM {name} failed too: {cleanup}"));
                }
                let ok_to_retry = e.ok_to_retry();
                Err(match e {
                    e @ (CpiError::VmCreationFailed { .. } | CpiError::NetworkNotFound(_)) => e,
                    e => creation_failed(e.to_string(), ok_to_retry),
                })
            }
        }
    }

    async fn make_vm(&self, name: &str, request: &VmRequest) -> Result<(), CpiError> {
        let project = self.project().to_string();
        if self.find("image", &request.stemcell).await?.is_none() {
            return Err(creation_failed(
                format!("stemcell {} not found", request.stemcell),
                false,
            ));
        }
        let cloud = &request.cloud_properties;
        let nics = nics(&request.networks)?;
        for nic in &nics {
            let network = nic
                .attachment
                .as_ref()
                .and_then(|a| a["network"].as_str())
                .or(nic.vip_network.as_deref())
                .unwrap_or_default();
            if self.find("network", network).await?.is_none() {
                return Err(CpiError::NetworkNotFound(format!(
                    "network {:?}: project {project:?} has no Flotilla network {network:?}",
                    nic.bosh_name
                )));
            }
        }
        // Where its persistent disks are, if they are on one node's local storage.
        let mut node = None;
        for disk in &request.disk_cids {
            let Some(volume) = self.find("volume", disk).await? else {
                continue;
            };
            if volume["status"]["shared"] != true {
                if let Some(n) = volume["status"]["node"].as_str() {
                    self.note(format!("placing VM {name} on {n}, beside disk {disk}"));
                    node = Some(n.to_string());
                    break;
                }
            }
        }
        let mut spec = json!({
            "image": request.stemcell,
            "cloudInit": "configDrive",
            "networks": nics.iter().filter_map(|n| n.attachment.clone()).collect::<Vec<_>>(),
        });
        sizing(cloud, &mut spec)?;
        if let Some(node) = &node {
            spec["nodeName"] = json!(node);
        }
        let mut ephemeral = None;
        if let Some(size) = cloud["ephemeral_disk"]["size"].as_u64() {
            let pool = cloud["ephemeral_disk"]["pool"]
                .as_str()
                .unwrap_or(&self.config.flotilla.default_pool);
            let volume = ephemeral_name(name);
            let mut vspec = json!({"pool": pool, "size": format!("{size}Mi")});
            if let Some(node) = &node {
                vspec["nodeName"] = json!(node);
            }
            let body = json!({"metadata": {"name": volume, "labels": labels(&[(VM_LABEL, name)])}, "spec": vspec});
            self.client
                .create(kind("volume"), Some(&project), &body)
                .await
                .map_err(|e| {
                    creation_failed(
                        format!("making the ephemeral disk: {e}"),
                        e.code().is_none_or(|c| c >= 500),
                    )
                })?;
            spec["disks"] =
                json!([{"name": "ephemeral", "volume": volume, "serial": EPHEMERAL_SERIAL}]);
            ephemeral = Some(json!({"id": EPHEMERAL_SERIAL, "path": "/dev/vdb"}));
        }
        let settings = AgentSettings {
            agent_id: request.agent_id.clone(),
            blobstore: self.config.agent.blobstore.clone(),
            disks: Disks {
                system: "/dev/vda".into(),
                ephemeral,
                persistent: BTreeMap::new(),
            },
            env: request.env.clone(),
            mbus: self.config.agent.mbus.clone(),
            networks: nics
                .iter()
                .map(|n| (n.bosh_name.clone(), n.settings.clone()))
                .collect(),
            ntp: self.config.agent.ntp.clone(),
            vm: Vm {
                name: name.to_string(),
            },
        };
        let user_data = serde_json::to_string(&settings).expect("serialises");
        if user_data.len() > MAX_USER_DATA {
            return Err(creation_failed(
                format!(
                    "the agent's settings are {} bytes; a config drive takes at most {MAX_USER_DATA} (a smaller env?)",
                    user_data.len()
                ),
                false,
            ));
        }
        spec["userData"] = json!(user_data);
        let body = json!({
            "metadata": {"name": name, "labels": labels(&[("bosh.flotilla.dev/agent-id", &crate::cloud::label_value(&request.agent_id))])},
            "spec": spec,
        });
        self.client
            .create(kind("vm"), Some(&project), &body)
            .await
            .map_err(|e| {
                let retry = e.code().is_none_or(|c| c >= 500 || c == 409);
                creation_failed(format!("Flotilla refused the VM: {e}"), retry)
            })?;
        for (i, nic) in nics.iter().enumerate() {
            let Some(network) = &nic.vip_network else {
                continue;
            };
            let body = json!({
                "metadata": {"name": format!("{name}-vip-{i}"), "labels": labels(&[(VM_LABEL, name)])},
                "spec": {"network": network, "address": nic.settings.ip, "vm": name},
            });
            self.client
                .create(kind("floatingip"), Some(&project), &body)
                .await
                .map_err(|e| {
                    creation_failed(
                        format!("network {:?}: the floating IP: {e}", nic.bosh_name),
                        false,
                    )
                })?;
        }
        self.wait("vm", name, "the VM runs", |vm| {
            let vm = vm?;
            match vm["status"]["phase"].as_str() {
                Some("Running") => Some(Ok(())),
                Some("Failed") => Some(Err(creation_failed(
                    format!("the VM failed: {}", conditions(vm)),
                    true,
                ))),
                _ => None,
            }
        })
        .await
        .map_err(|e| match e {
            CpiError::Cloud { message, .. } => creation_failed(message, true),
            e => e,
        })?;
        self.note(format!("VM {name} runs"));
        Ok(())
    }

    /// Deletes VM `name` and what the CPI made for it, and waits until Flotilla has freed it
    /// (its disks are then free to attach elsewhere). A VM that is not there is deleted.
    pub async fn delete_vm(&self, name: &str) -> Result<(), CpiError> {
        let selector = format!("{VM_LABEL}={name}");
        for fip in self.list("floatingip", &selector).await? {
            let fip = fip["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            self.remove("floatingip", &fip).await?;
        }
        self.remove_and_wait("vm", name).await?;
        self.delete_disk(&ephemeral_name(name)).await?;
        self.note(format!("VM {name} deleted"));
        Ok(())
    }

    pub async fn has_vm(&self, name: &str) -> Result<bool, CpiError> {
        Ok(self
            .find("vm", name)
            .await?
            .is_some_and(|vm| vm["metadata"]["deletionTimestamp"].is_null()))
    }

    /// Restarts the VM (`flotilla vm restart`) and waits until its agent has.
    pub async fn reboot_vm(&self, name: &str) -> Result<(), CpiError> {
        let asked = format!("{}-bosh", now_stamp());
        let patch = json!({"metadata": {"annotations": {RESTART_ANNOTATION: asked}}});
        match self
            .client
            .patch(kind("vm"), Some(self.project()), name, &patch, false)
            .await
        {
            Ok(_) => {}
            Err(e) if e.code() == Some(404) => {
                return Err(CpiError::VmNotFound(format!("VM {name} not found")))
            }
            Err(e) => return Err(api(&format!("restarting VM {name}"), e)),
        }
        self.wait("vm", name, "the VM has restarted", |vm| match vm {
            None => Some(Err(CpiError::VmNotFound(format!("VM {name} not found")))),
            Some(vm) => (vm["status"]["lastRestartRequest"] == asked.as_str()
                && vm["status"]["phase"] == "Running")
                .then_some(Ok(())),
        })
        .await
    }

    /// The persistent disks attached to VM `name`.
    pub async fn get_disks(&self, name: &str) -> Result<Vec<String>, CpiError> {
        let Some(vm) = self.find("vm", name).await? else {
            return Err(CpiError::VmNotFound(format!("VM {name} not found")));
        };
        let ephemeral = ephemeral_name(name);
        Ok(vm["spec"]["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["volume"].as_str())
            .filter(|v| *v != ephemeral)
            .map(str::to_string)
            .collect())
    }
}

/// A VM's conditions, for a person.
fn conditions(vm: &Value) -> String {
    let parts: Vec<String> = vm["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{}={} ({})",
                c["type"].as_str().unwrap_or_default(),
                c["status"].as_str().unwrap_or_default(),
                c["message"].as_str().unwrap_or_default()
            )
        })
        .collect();
    parts.join("; ")
}

/// Seconds and nanoseconds since the epoch: unique per call.
fn now_stamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}
