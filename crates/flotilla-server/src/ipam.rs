//! Admission of what networks hand out: an overlay Network's VNI when it is made, and each NIC's
//! MAC and address when its VM is made. Each is taken from its record (`flotilla_ipam`) by
//! compare-and-swap in the same transaction as the object that holds it, so two creates on any
//! replicas never get the same one, and a crash cannot leave one taken without its holder.
//! Ports of deleted VMs are released by the controllers' IPAM sweeper.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex};

use flotilla_ipam::{Allocations, Port, Vnis};
use flotilla_store::{Compare, KeyValue, Op, Store};
use flotilla_types::kinds::{NetworkSpec, NetworkType, VirtualMachineSpec};
use flotilla_types::registry::{self, KindInfo};
use flotilla_types::validation::FieldErrors;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::objects::{object_key, parse_stored};

/// The cluster's VNI record.
pub const VNI_KEY: &str = "/flotilla/ipam/vnis";

/// The allocation record of a network.
pub fn ports_key(project: &str, network: &str) -> String {
    format!("/flotilla/ipam/ports/{project}/{network}")
}

/// A Network keeps this finalizer until its VNI and record are released (the controllers' IPAM
/// sweeper does it once no VM uses the network).
pub const NETWORK_FINALIZER: &str = "flotilla.dev/ipam";

/// Prefix of every network's allocation record.
pub const PORTS_PREFIX: &str = "/flotilla/ipam/ports/";

/// In-process locks of records: creates through one server that take from the same record
/// queue here instead of colliding in the store and retrying (replicas still meet at the
/// compare-and-swap, which keeps them correct).
static RECORD_LOCKS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Default::default);

/// Held while a create takes from the records it names.
pub(crate) struct RecordLocks(#[allow(dead_code)] Vec<tokio::sync::OwnedMutexGuard<()>>);

/// Locks (in key order, so that two creates cannot wait on each other) the records a create of
/// `body` will take from.
pub(crate) async fn lock_records(
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
                    .map(|n| ports_key(namespace.unwrap_or_default(), n))
                    .collect()
            })
            .unwrap_or_default(),
        _ => BTreeSet::new(),
    };
    let mut guards = Vec::new();
    for key in keys {
        let lock = RECORD_LOCKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        guards.push(lock.lock_owned().await);
    }
    RecordLocks(guards)
}

/// What an admission adds to the create's transaction.
#[derive(Default)]
pub(crate) struct Admission {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

/// Compare-and-swap of a record read as `kv` (None: it did not exist).
fn swap(admission: &mut Admission, key: &str, kv: Option<&KeyValue>, value: Vec<u8>) {
    admission.compares.push(match kv {
        Some(kv) => Compare::mod_revision(key, kv.mod_revision),
        None => Compare::absent(key),
    });
    admission.ops.push(Op::put(key, value));
}

fn read<T: serde::de::DeserializeOwned + Default>(kv: Option<&KeyValue>) -> Result<T, ApiError> {
    match kv {
        None => Ok(T::default()),
        Some(kv) => serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::internal(format!("the record {} is damaged: {e}", kv.key))),
    }
}

/// Fills in what `object` (about to be created, validated) takes from the networks' records,
/// and returns the compares and writes that take it.
pub(crate) async fn admit(
    store: &dyn Store,
    kind: &KindInfo,
    namespace: Option<&str>,
    object: &mut Value,
) -> Result<Admission, ApiError> {
    match kind.kind {
        "Network" => admit_network(store, object).await,
        "VirtualMachine" => admit_vm(store, namespace.unwrap_or_default(), object).await,
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
    let mut vnis: Vnis = read(kv.as_ref())?;
    let vni = vnis
        .take(&uid)
        .map_err(|e| ApiError::new(409, "Conflict", e.to_string()))?;
    swap(&mut admission, VNI_KEY, kv.as_ref(), encode(&vnis));
    object["status"]["vni"] = json!(vni);
    Ok(admission)
}

async fn admit_vm(
    store: &dyn Store,
    project: &str,
    object: &mut Value,
) -> Result<Admission, ApiError> {
    let mut admission = Admission::default();
    let spec: VirtualMachineSpec = serde_json::from_value(object["spec"].clone())
        .map_err(|e| ApiError::internal(format!("a validated VM did not decode: {e}")))?;
    if spec.networks.is_empty() {
        return Ok(admission);
    }
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let uid = object["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let network_kind = registry::by_kind("Network").expect("registered");
    // Records read once each, changed for every NIC on their network.
    let mut records: BTreeMap<String, (Option<KeyValue>, Allocations)> = BTreeMap::new();
    let mut interfaces = Vec::new();
    let mut ips = Vec::new();
    let mut errs = FieldErrors::default();
    for (i, nic) in spec.networks.iter().enumerate() {
        let field = format!("spec.networks[{i}]");
        let network_key = object_key(network_kind, Some(project), &nic.network);
        let Some(network_kv) = store.get(&network_key).await? else {
            errs.push(
                format!("{field}.network"),
                format!("no network {:?} in project {project:?}", nic.network),
            );
            continue;
        };
        let network = parse_stored(&network_kv)?;
        if network["metadata"].get("deletionTimestamp").is_some() {
            errs.push(
                format!("{field}.network"),
                format!("network {:?} is being deleted", nic.network),
            );
            continue;
        }
        let network_spec: NetworkSpec = serde_json::from_value(network["spec"].clone())
            .map_err(|e| ApiError::internal(format!("a stored Network did not decode: {e}")))?;
        let subnet = network_spec
            .subnet()
            .map_err(|e| ApiError::internal(format!("a stored Network's cidr: {e}")))?;
        let network_uid = network["metadata"]["uid"].as_str().unwrap_or_default();
        let key = ports_key(project, &nic.network);
        if !records.contains_key(&key) {
            // The network's revision guards against its deletion meanwhile.
            admission
                .compares
                .push(Compare::mod_revision(&network_key, network_kv.mod_revision));
            let kv = store.get(&key).await?;
            let mut record: Allocations = read(kv.as_ref())?;
            if record.network_uid != network_uid {
                // Left by an earlier network of the same name: none of it holds here.
                record = Allocations::new(network_uid);
            }
            records.insert(key.clone(), (kv, record));
        }
        let (_, record) = records.get_mut(&key).expect("inserted above");
        let nic_name = nic.nic_name(i);
        let mac = match &nic.mac_address {
            Some(mac) => mac.to_ascii_lowercase(),
            None => flotilla_ipam::generate_mac(&format!("{uid}/{nic_name}"), |m| {
                record.ports.contains_key(m)
            }),
        };
        let wanted = nic.ip.as_ref().and_then(|ip| ip.parse().ok());
        let port = Port {
            uid: uid.clone(),
            vm: name.clone(),
            nic: nic_name.clone(),
            ip: wanted,
        };
        match record.add(subnet.as_ref(), &mac, port) {
            Ok(ip) => {
                let addresses: Vec<String> = ip
                    .zip(subnet.as_ref())
                    .map(|(ip, s)| format!("{ip}/{}", s.cidr.prefix()))
                    .into_iter()
                    .collect();
                ips.extend(ip.map(|ip| ip.to_string()));
                let mut interface = json!({
                    "name": nic_name, "network": nic.network, "macAddress": mac,
                });
                if !addresses.is_empty() {
                    interface["ips"] = json!(addresses);
                    interface["source"] = json!("ipam");
                }
                interfaces.push(interface);
            }
            Err(e @ flotilla_ipam::IpamError::MacTaken { .. }) => {
                errs.push(format!("{field}.macAddress"), e.to_string())
            }
            Err(e @ flotilla_ipam::IpamError::Exhausted(_)) => {
                errs.push(format!("{field}.network"), e.to_string())
            }
            Err(e) => errs.push(format!("{field}.ip"), e.to_string()),
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid("VirtualMachine", &name, &errs));
    }
    for (key, (kv, record)) in &records {
        swap(&mut admission, key, kv.as_ref(), encode(record));
    }
    object["status"]["interfaces"] = json!(interfaces);
    if !ips.is_empty() {
        object["status"]["ips"] = json!(ips);
    }
    Ok(admission)
}

fn encode<T: serde::Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialise")
}

/// The VMs holding ports on a network, by name (empty when none or no record).
pub(crate) async fn holders(
    store: &dyn Store,
    project: &str,
    network: &str,
) -> Result<Vec<String>, ApiError> {
    let kv = store.get(&ports_key(project, network)).await?;
    let record: Allocations = read(kv.as_ref())?;
    Ok(record.holders())
}
