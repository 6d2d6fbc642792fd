//! Admission of what networks hand out: an overlay Network's VNI when it is made, and each NIC's
//! MAC and address when its VM is made. Every port (`/flotilla/ipam/ports/<project>/<network>/<mac>`)
//! and address (`/flotilla/ipam/addresses/<project>/<network>/<ip>`) is a key of its own, created
//! compared absent in the same transaction as the VM (the VNI record by compare-and-swap in the
//! Network's), so two creates on any replicas never get the same one, and a crash cannot leave
//! one taken without its holder. Ports of deleted VMs are released by the controllers' IPAM
//! sweeper.
//!
//! To pick the lowest free address without reading every address key on every create, a server
//! keeps what it knows to be held per network ([`flotilla_ipam::Held`]), read again when older than
//! [`HELD_FOR`], after a create lost a race, and when it seems full; creates of one network queue
//! in a server ([`lock_records`]) so they do not collide with each other.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_ipam::{Held, IpamError, Port, Vnis};
use flotilla_store::{Compare, KeyValue, Op, RangeRequest, Store};
use flotilla_types::kinds::{NetworkSpec, NetworkType, VirtualMachineSpec};
use flotilla_types::registry::{self, KindInfo};
use flotilla_types::validation::FieldErrors;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::objects::{object_key, parse_stored};

/// The cluster's VNI record.
pub const VNI_KEY: &str = "/flotilla/ipam/vnis";
/// Every network's ports, under `<project>/<network>/<mac>`.
pub const PORTS_PREFIX: &str = "/flotilla/ipam/ports/";
/// Every network's addresses, under `<project>/<network>/<ip>`.
pub const ADDRESSES_PREFIX: &str = "/flotilla/ipam/addresses/";

/// A Network keeps this finalizer until its VNI and records are released (the controllers' IPAM
/// sweeper does it once no VM uses the network).
pub const NETWORK_FINALIZER: &str = "flotilla.dev/ipam";

/// How long a server trusts what it knows of a network's held addresses (addresses freed by
/// another server are reused after this at the latest).
pub const HELD_FOR: Duration = Duration::from_secs(2);

/// The ports of a network, as a key prefix.
pub fn ports_prefix(project: &str, network: &str) -> String {
    format!("{PORTS_PREFIX}{project}/{network}/")
}

/// The addresses of a network, as a key prefix.
pub fn addresses_prefix(project: &str, network: &str) -> String {
    format!("{ADDRESSES_PREFIX}{project}/{network}/")
}

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AddressHolder {
    pub uid: String,
    pub vm: String,
    pub mac: String,
}

/// A server's own IPAM state (one per store, never shared between servers in a process):
/// locks per network, so that creates through this server that take from the same network queue
/// here instead of colliding in the store and retrying (replicas still meet at the compares,
/// which keep them correct); and what it knows to be held per network (by addresses prefix), and
/// since when.
#[derive(Default)]
pub struct IpamState {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    held: Mutex<HashMap<String, (Held, Instant)>>,
}

impl IpamState {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Held, Instant)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets what this server knew of the networks `admission` took from (its create did
    /// not land, or was a dry run).
    pub(crate) fn forget(&self, admission: &Admission) {
        let mut held = self.held();
        for prefix in &admission.networks {
            held.remove(prefix);
        }
    }

    /// Forgets everything this server knew of held addresses (the sweeper released some).
    pub fn forget_all(&self) {
        self.held().clear();
    }
}

/// Held while a create takes from the networks it names.
pub(crate) struct RecordLocks(#[allow(dead_code)] Vec<tokio::sync::OwnedMutexGuard<()>>);

/// Locks (in key order, so that two creates cannot wait on each other) what a create of `body`
/// will take from: its networks, or the VNI record, and its project's quota use.
pub(crate) async fn lock_records(
    state: &IpamState,
    kind: &KindInfo,
    namespace: Option<&str>,
    body: &Value,
) -> RecordLocks {
    let keys: BTreeSet<String> = match kind.kind {
        "Network" => [VNI_KEY.to_string()].into(),
        "VirtualMachine" => body["spec"]["networks"]
            .as_array()
            .map(|nics| {
                nics.iter()
                    .filter_map(|n| n["network"].as_str())
                    .map(|n| addresses_prefix(namespace.unwrap_or_default(), n))
                    .collect()
            })
            .unwrap_or_default(),
        // Their external addresses are picked like a VM's.
        "Router" => body["spec"]["external"]["network"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(|n| addresses_prefix(namespace.unwrap_or_default(), n))
            .into_iter()
            .collect(),
        "FloatingIP" => body["spec"]["network"]
            .as_str()
            .map(|n| addresses_prefix(namespace.unwrap_or_default(), n))
            .into_iter()
            .collect(),
        _ => BTreeSet::new(),
    };
    // Counted creates of one project queue here too: they all write the project's quota use.
    let mut keys = keys;
    if let (true, Some(ns)) = (crate::quota::counted(kind.kind), namespace) {
        keys.insert(format!("quota:{ns}"));
    }
    let mut guards = Vec::new();
    for key in keys {
        let lock = state
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        guards.push(lock.lock_owned().await);
    }
    RecordLocks(guards)
}

async fn held(
    state: &IpamState,
    store: &dyn Store,
    prefix: &str,
    fresh: bool,
) -> Result<Held, ApiError> {
    if !fresh {
        if let Some((held, at)) = state.held().get(prefix) {
            if at.elapsed() < HELD_FOR {
                return Ok(held.clone());
            }
        }
    }
    let kvs = store.range(RangeRequest::prefix(prefix)).await?.kvs;
    let held: Held = kvs
        .iter()
        .filter_map(|kv| kv.key[prefix.len()..].parse::<Ipv4Addr>().ok())
        .collect();
    state
        .held()
        .insert(prefix.to_string(), (held.clone(), Instant::now()));
    Ok(held)
}

fn remember(state: &IpamState, prefix: &str, held: Held) {
    state
        .held()
        .entry(prefix.to_string())
        .and_modify(|(h, _)| *h = held.clone())
        .or_insert((held, Instant::now()));
}

/// What an admission adds to the create's transaction.
#[derive(Default)]
pub(crate) struct Admission {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
    /// The networks (addresses prefixes) it took addresses from.
    pub networks: Vec<String>,
}

fn record<T: serde::de::DeserializeOwned + Default>(kv: Option<&KeyValue>) -> Result<T, ApiError> {
    match kv {
        None => Ok(T::default()),
        Some(kv) => serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::internal(format!("the record {} is damaged: {e}", kv.key))),
    }
}

fn encode<T: serde::Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialise")
}

/// Fills in what `object` (about to be created, validated) takes from the networks, and returns
/// the compares and writes that take it.
pub(crate) async fn admit(
    state: &IpamState,
    store: &dyn Store,
    kind: &KindInfo,
    namespace: Option<&str>,
    object: &mut Value,
) -> Result<Admission, ApiError> {
    match kind.kind {
        "Network" => admit_network(store, object).await,
        "VirtualMachine" => admit_vm(state, store, namespace.unwrap_or_default(), object).await,
        "Router" => admit_router(state, store, namespace.unwrap_or_default(), object).await,
        "FloatingIP" => {
            admit_floating_ip(state, store, namespace.unwrap_or_default(), object).await
        }
        _ => Ok(Admission::default()),
    }
}

async fn admit_network(store: &dyn Store, object: &mut Value) -> Result<Admission, ApiError> {
    let mut admission = Admission::default();
    let spec: NetworkSpec = serde_json::from_value(object["spec"].clone())
        .map_err(|e| ApiError::internal(format!("a validated Network did not decode: {e}")))?;
    let finalizers = object["metadata"]
        .as_object_mut()
        .expect("validated")
        .entry("finalizers")
        .or_insert_with(|| json!([]));
    if let Some(list) = finalizers.as_array_mut() {
        if !list.iter().any(|f| f == NETWORK_FINALIZER) {
            list.push(json!(NETWORK_FINALIZER));
        }
    }
    if spec.network_type != NetworkType::Overlay {
        return Ok(admission);
    }
    let uid = object["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kv = store.get(VNI_KEY).await?;
    let mut vnis: Vnis = record(kv.as_ref())?;
    let vni = vnis
        .take(&uid)
        .map_err(|e| ApiError::new(409, "Conflict", e.to_string()))?;
    admission.compares.push(match &kv {
        Some(kv) => Compare::mod_revision(VNI_KEY, kv.mod_revision),
        None => Compare::absent(VNI_KEY),
    });
    admission.ops.push(Op::put(VNI_KEY, encode(&vnis)));
    object["status"]["vni"] = json!(vni);
    Ok(admission)
}

/// One port an object asks for on a network.
struct PortRequest {
    /// Where errors point (`spec.networks[0]`, `spec.external`).
    field: String,
    /// The port's name on its holder (a VM's NIC name, `external`, a router's network).
    name: String,
    network: String,
    /// A wanted address (the field `<field>.<ip_field>` holds it).
    ip: Option<String>,
    ip_field: &'static str,
    mac: Option<String>,
    /// A router's port on one of its networks: it holds the network's gateway address (no
    /// other holder may), and needs a network with a cidr.
    gateway: bool,
    /// The network must be an overlay (a router's networks) or bridged with a cidr (an
    /// external network).
    wants: Option<NetworkType>,
}

/// The ports `requests` of the object `holder` (a VM, router or floating IP) with `uid` ask
/// for: a MAC and an address each, as keys created compared absent in the object's create.
/// Returns the admission, the interfaces (for the object's status) and the addresses.
async fn admit_ports(
    state: &IpamState,
    store: &dyn Store,
    project: &str,
    (kind, holder, uid): (&str, &str, &str),
    requests: &[PortRequest],
) -> Result<(Admission, Vec<Value>, Vec<String>), ApiError> {
    let mut admission = Admission::default();
    let network_kind = registry::by_kind("Network").expect("registered");
    let mut checked = BTreeSet::new();
    let mut macs = BTreeSet::new();
    let (mut interfaces, mut ips) = (Vec::new(), Vec::new());
    let mut errs = FieldErrors::default();
    for nic in requests {
        let field = &nic.field;
        let network_field = if nic.field.ends_with(']') && nic.gateway {
            nic.field.clone()
        } else {
            format!("{field}.network")
        };
        let network_key = object_key(network_kind, Some(project), &nic.network);
        let Some(network_kv) = store.get(&network_key).await? else {
            errs.push(
                network_field,
                format!("no network {:?} in project {project:?}", nic.network),
            );
            continue;
        };
        let network = parse_stored(&network_kv)?;
        if network["metadata"].get("deletionTimestamp").is_some() {
            errs.push(
                network_field,
                format!("network {:?} is being deleted", nic.network),
            );
            continue;
        }
        if checked.insert(network_key.clone()) {
            // The network's revision guards against its deletion meanwhile.
            admission
                .compares
                .push(Compare::mod_revision(&network_key, network_kv.mod_revision));
        }
        let network_spec: NetworkSpec = serde_json::from_value(network["spec"].clone())
            .map_err(|e| ApiError::internal(format!("a stored Network did not decode: {e}")))?;
        let subnet = network_spec
            .subnet()
            .map_err(|e| ApiError::internal(format!("a stored Network's cidr: {e}")))?;
        match nic.wants {
            Some(NetworkType::Overlay) if network_spec.network_type != NetworkType::Overlay => {
                errs.push(
                    network_field,
                    format!("{:?} is a bridged network; a router connects overlay networks (and takes a bridged one as its external network)", nic.network),
                );
                continue;
            }
            Some(NetworkType::Bridged)
                if network_spec.network_type != NetworkType::Bridged || subnet.is_none() =>
            {
                errs.push(
                    network_field,
                    format!("{:?} is not a bridged network with a cidr: external addresses come from one", nic.network),
                );
                continue;
            }
            _ => {}
        }
        let ports = ports_prefix(project, &nic.network);

        // The MAC: the one asked for, or a stable one; each port is a key of its own.
        let mac = match &nic.mac {
            Some(mac) => {
                let mac = mac.to_ascii_lowercase();
                if let Some(kv) = store.get(&format!("{ports}{mac}")).await? {
                    let holder: Port = serde_json::from_slice(&kv.value)
                        .map_err(|e| ApiError::internal(format!("a port record: {e}")))?;
                    errs.push(
                        format!("{field}.macAddress"),
                        IpamError::MacTaken {
                            mac,
                            holder: holder.vm,
                        }
                        .to_string(),
                    );
                    continue;
                }
                mac
            }
            None => {
                let mut attempt = 0;
                loop {
                    let seed = format!("{uid}/{}/{attempt}", nic.name);
                    let mac = flotilla_ipam::generate_mac(&seed, |m| macs.contains(m));
                    if store.get(&format!("{ports}{mac}")).await?.is_none() {
                        break mac;
                    }
                    attempt += 1;
                }
            }
        };
        macs.insert(mac.clone());

        // The address: from what this server knows is held, checked against the store.
        let mut ip = None;
        if let Some(subnet) = &subnet {
            let prefix = addresses_prefix(project, &nic.network);
            let want: Option<Ipv4Addr> = nic.ip.as_ref().and_then(|ip| ip.parse().ok());
            let taken = if nic.gateway {
                // The gateway is reserved from IPAM's picks; its key says which router holds it.
                match store.get(&format!("{prefix}{}", subnet.gateway)).await? {
                    None => Ok(subnet.gateway),
                    Some(kv) => Err(IpamError::Taken {
                        ip: subnet.gateway,
                        holder: record::<Option<AddressHolder>>(Some(&kv))?
                            .map_or_else(|| "another router".into(), |h| h.vm),
                    }),
                }
            } else {
                let mut known = held(state, store, &prefix, false).await?;
                if want.is_some_and(|w| known.contains(w)) {
                    // Perhaps freed since: ask the store.
                    known = held(state, store, &prefix, true).await?;
                }
                let taken = match known.take(subnet, want) {
                    Err(IpamError::Exhausted(_)) => {
                        known = held(state, store, &prefix, true).await?;
                        known.take(subnet, want)
                    }
                    other => other,
                };
                if taken.is_ok() {
                    remember(state, &prefix, known);
                    admission.networks.push(prefix.clone());
                }
                taken
            };
            match taken {
                Ok(address) => {
                    let key = format!("{prefix}{address}");
                    admission.compares.push(Compare::absent(&key));
                    let holder = AddressHolder {
                        uid: uid.to_string(),
                        vm: holder.to_string(),
                        mac: mac.clone(),
                    };
                    admission.ops.push(Op::put(key, encode(&holder)));
                    ip = Some(address);
                }
                Err(IpamError::Taken { ip, holder }) if nic.gateway => {
                    errs.push(
                        network_field,
                        format!("the gateway {ip} of network {:?} is held by {holder}: a network has at most one router", nic.network),
                    );
                    continue;
                }
                Err(IpamError::Taken { ip, .. }) => {
                    let holder = store
                        .get(&format!("{prefix}{ip}"))
                        .await?
                        .and_then(|kv| serde_json::from_slice::<AddressHolder>(&kv.value).ok())
                        .map_or_else(|| "another VM".to_string(), |h| h.vm);
                    errs.push(
                        format!("{field}.{}", nic.ip_field),
                        IpamError::Taken { ip, holder }.to_string(),
                    );
                    continue;
                }
                Err(e @ IpamError::Exhausted(_)) => {
                    errs.push(network_field, e.to_string());
                    continue;
                }
                Err(e) => {
                    errs.push(format!("{field}.{}", nic.ip_field), e.to_string());
                    continue;
                }
            }
        } else if nic.gateway {
            errs.push(
                network_field,
                format!("network {:?} has no cidr, so no gateway", nic.network),
            );
            continue;
        }
        let port_key = format!("{ports}{mac}");
        admission.compares.push(Compare::absent(&port_key));
        let port = Port {
            uid: uid.to_string(),
            vm: holder.to_string(),
            nic: nic.name.clone(),
            ip,
        };
        admission.ops.push(Op::put(port_key, encode(&port)));
        let mut interface = json!({"name": nic.name, "network": nic.network, "macAddress": mac});
        if let (Some(address), Some(subnet)) = (ip, &subnet) {
            let mut nic_ips = vec![format!("{address}/{}", subnet.cidr.prefix())];
            ips.push(address.to_string());
            // The IPv6 address SLAAC makes of the MAC: unique because the MAC is.
            if let Some(v6) = network_spec
                .prefix6()
                .filter(|_| !nic.gateway)
                .and_then(|p| p.eui64(&mac.to_ascii_lowercase()))
            {
                nic_ips.push(format!("{v6}/64"));
                ips.push(v6.to_string());
            }
            interface["ips"] = json!(nic_ips);
            interface["source"] = json!("ipam");
        }
        interfaces.push(interface);
    }
    if !errs.is_empty() {
        state.forget(&admission);
        return Err(ApiError::invalid(kind, holder_name(holder), &errs));
    }
    Ok((admission, interfaces, ips))
}

/// The object's own name in a holder's name (`Router/gw` -> `gw`).
fn holder_name(holder: &str) -> &str {
    holder.rsplit('/').next().unwrap_or(holder)
}

/// A validated object's spec as `T`, with its name and uid.
fn decoded<T: serde::de::DeserializeOwned>(
    object: &Value,
    kind: &str,
) -> Result<(T, String, String), ApiError> {
    let spec = serde_json::from_value(object["spec"].clone())
        .map_err(|e| ApiError::internal(format!("a validated {kind} did not decode: {e}")))?;
    let text = |field: &str| {
        object["metadata"][field]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    Ok((spec, text("name"), text("uid")))
}

async fn admit_vm(
    state: &IpamState,
    store: &dyn Store,
    project: &str,
    object: &mut Value,
) -> Result<Admission, ApiError> {
    let (spec, name, uid): (VirtualMachineSpec, _, _) = decoded(object, "VirtualMachine")?;
    if spec.networks.is_empty() {
        return Ok(Admission::default());
    }
    let requests: Vec<PortRequest> = spec
        .networks
        .iter()
        .enumerate()
        .map(|(i, nic)| PortRequest {
            field: format!("spec.networks[{i}]"),
            name: nic.nic_name(i),
            network: nic.network.clone(),
            ip: nic.ip.clone(),
            ip_field: "ip",
            mac: nic.mac_address.clone(),
            gateway: false,
            wants: None,
        })
        .collect();
    let (admission, interfaces, ips) = admit_ports(
        state,
        store,
        project,
        ("VirtualMachine", &name, &uid),
        &requests,
    )
    .await?;
    object["status"]["interfaces"] = json!(interfaces);
    if !ips.is_empty() {
        object["status"]["ips"] = json!(ips);
    }
    Ok(admission)
}

/// A router's ports: one on its external network (an address from its IPAM) and one on each
/// of its networks holding the network's gateway.
async fn admit_router(
    state: &IpamState,
    store: &dyn Store,
    project: &str,
    object: &mut Value,
) -> Result<Admission, ApiError> {
    let (spec, name, uid): (flotilla_types::kinds::RouterSpec, _, _) = decoded(object, "Router")?;
    let mut requests = Vec::new();
    if let Some(external) = spec.external.as_ref().filter(|e| !e.uplink) {
        requests.push(PortRequest {
            field: "spec.external".into(),
            name: "external".into(),
            network: external.network.clone(),
            ip: external.ip.clone(),
            ip_field: "ip",
            mac: None,
            gateway: false,
            wants: Some(NetworkType::Bridged),
        });
    }
    for (i, network) in spec.networks.iter().enumerate() {
        requests.push(PortRequest {
            field: format!("spec.networks[{i}]"),
            name: network.clone(),
            network: network.clone(),
            ip: None,
            ip_field: "ip",
            mac: None,
            gateway: true,
            wants: Some(NetworkType::Overlay),
        });
    }
    let holder = format!("Router/{name}");
    let (admission, interfaces, ips) =
        admit_ports(state, store, project, ("Router", &holder, &uid), &requests).await?;
    object["status"]["interfaces"] = json!(interfaces);
    if spec.external.as_ref().is_some_and(|e| !e.uplink) {
        object["status"]["externalAddress"] = json!(ips.first());
    }
    Ok(admission)
}

/// A floating IP's address: a port on its external network.
async fn admit_floating_ip(
    state: &IpamState,
    store: &dyn Store,
    project: &str,
    object: &mut Value,
) -> Result<Admission, ApiError> {
    let (spec, name, uid): (flotilla_types::kinds::FloatingIPSpec, _, _) =
        decoded(object, "FloatingIP")?;
    let request = PortRequest {
        field: "spec".into(),
        name: "address".into(),
        network: spec.network.clone(),
        ip: spec.address.clone(),
        ip_field: "address",
        mac: None,
        gateway: false,
        wants: Some(NetworkType::Bridged),
    };
    let holder = format!("FloatingIP/{name}");
    let (admission, interfaces, ips) = admit_ports(
        state,
        store,
        project,
        ("FloatingIP", &holder, &uid),
        &[request],
    )
    .await?;
    object["status"]["interfaces"] = json!(interfaces);
    object["status"]["address"] = json!(ips.first());
    Ok(admission)
}

/// Whether objects of `kind` hold ports (and addresses) in their `status.interfaces`, released
/// in the transaction that finally deletes them.
pub fn holds_ports(kind: &str) -> bool {
    matches!(kind, "VirtualMachine" | "Router" | "FloatingIP")
}

/// "VirtualMachines a, b, Router gw" from holder names (a VM's name; `Kind/name` otherwise).
pub(crate) fn describe_holders(holders: &[String]) -> String {
    let vms: Vec<&str> = holders
        .iter()
        .filter(|h| !h.contains('/'))
        .map(String::as_str)
        .collect();
    let mut parts = Vec::new();
    if !vms.is_empty() {
        parts.push(format!(
            "VirtualMachine{} {}",
            if vms.len() == 1 { "" } else { "s" },
            vms.join(", ")
        ));
    }
    parts.extend(
        holders
            .iter()
            .filter(|h| h.contains('/'))
            .map(|h| h.replacen('/', " ", 1)),
    );
    parts.join(", ")
}

/// The VMs holding ports on a network, by name (empty when none).
pub(crate) async fn holders(
    store: &dyn Store,
    project: &str,
    network: &str,
) -> Result<Vec<String>, ApiError> {
    let prefix = ports_prefix(project, network);
    let kvs = store.range(RangeRequest::prefix(&prefix)).await?.kvs;
    let names: BTreeSet<String> = kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Port>(&kv.value).ok())
        .map(|p| p.vm)
        .collect();
    Ok(names.into_iter().collect())
}

/// What deleting the VM `vm` (its last finalizer gone) adds to its delete: the ports and
/// addresses its NICs hold, each compared unchanged and held by this VM's uid (a status someone
/// edited cannot release another VM's), so that they are free the moment the VM is gone. What
/// this misses (a server that died in between) the controllers' sweeper releases.
pub(crate) async fn release_with(
    store: &dyn Store,
    vm: &Value,
) -> Result<(Vec<Compare>, Vec<Op>), ApiError> {
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    let (Some(project), Some(uid)) = (
        vm["metadata"]["namespace"].as_str(),
        vm["metadata"]["uid"].as_str(),
    ) else {
        return Ok((compares, ops));
    };
    for nic in vm["status"]["interfaces"].as_array().into_iter().flatten() {
        let (Some(network), Some(mac)) = (nic["network"].as_str(), nic["macAddress"].as_str())
        else {
            continue;
        };
        let mut keys = vec![format!("{}{mac}", ports_prefix(project, network))];
        for ip in nic["ips"].as_array().into_iter().flatten() {
            if let Some(ip) = ip.as_str().and_then(|a| a.split('/').next()) {
                keys.push(format!("{}{ip}", addresses_prefix(project, network)));
            }
        }
        for key in keys {
            let Some(kv) = store.get(&key).await? else {
                continue;
            };
            let holder: Option<Value> = serde_json::from_slice(&kv.value).ok();
            if holder.as_ref().and_then(|h| h["uid"].as_str()) == Some(uid) {
                compares.push(Compare::mod_revision(&key, kv.mod_revision));
                ops.push(Op::delete(&key));
            }
        }
    }
    Ok((compares, ops))
}

/// `GET .../namespaces/<project>/networks/<name>/addresses`: the addresses NICs hold on a
/// network, with their VMs and MACs, in address order — what each node's DHCP and DNS server
/// for the network serves. Readable by whoever may read the Network (nodes too).
pub(crate) async fn network_addresses(
    objects: &crate::objects::Objects,
    project: &str,
    network: &str,
) -> Result<Value, ApiError> {
    let kind = registry::by_kind("Network").expect("registered");
    // 404 for a network that does not exist, as for the object itself.
    objects.get(kind, Some(project), network).await?;
    let prefix = addresses_prefix(project, network);
    let range = objects.store().range(RangeRequest::prefix(&prefix)).await?;
    let mut items: Vec<(Ipv4Addr, AddressHolder)> = Vec::new();
    for kv in &range.kvs {
        let Ok(ip) = kv.key[prefix.len()..].parse::<Ipv4Addr>() else {
            continue;
        };
        items.push((
            ip,
            record::<Option<AddressHolder>>(Some(kv))?
                .ok_or_else(|| ApiError::internal(format!("the record {} is empty", kv.key)))?,
        ));
    }
    items.sort_by_key(|(ip, _)| *ip);
    let items: Vec<Value> = items
        .into_iter()
        .map(|(ip, h)| json!({"address": ip.to_string(), "vm": h.vm, "uid": h.uid, "macAddress": h.mac}))
        .collect();
    Ok(json!({
        "apiVersion": flotilla_types::API_VERSION,
        "kind": "NetworkAddressList",
        "metadata": {"resourceVersion": range.revision.to_string()},
        "items": items,
    }))
}
