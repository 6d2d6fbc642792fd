//! The cloud metadata service at 169.254.169.254, as OpenStack's and EC2's: cloud images whose
//! cloud-init reads those datasources get their instance id, hostname, SSH keys, user data and
//! network configuration without a seed ISO.
//!
//! Each overlay network's DHCP namespace on a node (`flotilla-dhcp-<vni>`, joined to the
//! network's bridge by an isolated port that only this node's VMs reach) also holds
//! 169.254.169.254, and the agent serves HTTP there, one listener per network. A request is
//! answered for the VM of this node whose NIC on *that* network holds the request's source
//! address: the namespace says the network (no other tenant's VM reaches it) and the
//! security-group anti-spoofing rules keep a VM from sending from an address that is not its
//! own, so a VM can read only its own data. Guests reach the address through the DHCP server
//! (DHCP's classless static routes, option 121, and a route in network-config). The serving
//! loop is the API server's hardened one (connection cap, header timeouts), in plain HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use flotilla_types::VirtualMachine;
use serde_json::json;

use crate::error::AgentError;

/// The link-local address of the metadata service.
pub use flotilla_dataplane::METADATA_ADDRESS;

/// The VMs bound to this node, by uid, as the agent last heard of them.
#[derive(Default)]
pub struct VmIndex(Mutex<BTreeMap<String, Arc<VirtualMachine>>>);

impl VmIndex {
    pub fn set(&self, vm: Arc<VirtualMachine>) {
        if let Some(uid) = vm.metadata.uid.clone() {
            self.0.lock().expect("vm index").insert(uid, vm);
        }
    }

    pub fn remove(&self, uid: &str) {
        self.0.lock().expect("vm index").remove(uid);
    }

    pub fn retain(&self, uids: &BTreeSet<String>) {
        self.0
            .lock()
            .expect("vm index")
            .retain(|uid, _| uids.contains(uid));
    }

    /// The VM of `project` whose NIC on `network` holds `address`, with that NIC's position.
    pub fn find(
        &self,
        project: &str,
        network: &str,
        address: Ipv4Addr,
    ) -> Option<(Arc<VirtualMachine>, usize)> {
        let vms = self.0.lock().expect("vm index");
        vms.values().find_map(|vm| {
            if vm.metadata.namespace.as_deref() != Some(project)
                || vm.metadata.deletion_timestamp.is_some()
            {
                return None;
            }
            let interfaces = &vm.status.as_ref()?.interfaces;
            let position = interfaces.iter().position(|i| {
                i.network == network
                    && i.ips
                        .iter()
                        .any(|ip| ip.split('/').next() == Some(&address.to_string()))
            })?;
            Some((vm.clone(), position))
        })
    }
}

struct Listener {
    /// The namespace it was bound in (a namespace made again needs a new socket).
    inode: Option<u64>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// This node's metadata listeners, one per overlay network with a DHCP server here.
pub struct MetadataServers {
    pub vms: Arc<VmIndex>,
    listeners: Mutex<BTreeMap<u32, Listener>>,
}

#[derive(Clone)]
struct Network {
    vms: Arc<VmIndex>,
    project: String,
    network: String,
}

impl MetadataServers {
    pub fn new(vms: Arc<VmIndex>) -> Self {
        MetadataServers {
            vms,
            listeners: Mutex::default(),
        }
    }

    /// Serves network `vni` (`project`/`network`) in its DHCP namespace, whose service port
    /// holds the metadata address, unless it is served already.
    pub fn ensure(
        &self,
        vni: u32,
        namespace: &Path,
        project: &str,
        network: &str,
    ) -> Result<(), AgentError> {
        let inode = flotilla_dataplane::namespace::namespace_inode(namespace);
        let mut listeners = self.listeners.lock().expect("listeners");
        if listeners
            .get(&vni)
            .is_some_and(|l| l.inode == inode && !l.task.is_finished())
        {
            return Ok(());
        }
        let socket = flotilla_dataplane::namespace::on_thread_in(namespace, || {
            let bind = || -> std::io::Result<std::net::TcpListener> {
                let socket = std::net::TcpListener::bind(SocketAddr::from((METADATA_ADDRESS, 80)))?;
                socket.set_nonblocking(true)?;
                Ok(socket)
            };
            bind().map_err(|error| flotilla_dataplane::DataplaneError::Namespace {
                path: namespace.display().to_string(),
                error,
            })
        })
        .map_err(|e| {
            AgentError::Config(format!("the metadata service of network {network:?}: {e}"))
        })?;
        let listener = tokio::net::TcpListener::from_std(socket).map_err(|e| {
            AgentError::Config(format!("the metadata service of network {network:?}: {e}"))
        })?;
        let app = router(Network {
            vms: self.vms.clone(),
            project: project.to_string(),
            network: network.to_string(),
        });
        // Guests are not trusted: few connections per network, short timeouts.
        let limits = flotilla_tls::Limits {
            max_connections: 64,
            header_read_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(30),
            ..flotilla_tls::Limits::for_open_files(1024)
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(flotilla_tls::serve_plain(listener, app, limits, stopped));
        if let Some(old) = listeners.insert(vni, Listener { inode, stop, task }) {
            let _ = old.stop.send(true);
            old.task.abort();
        }
        tracing::debug!(vni, %network, "serving the metadata service");
        Ok(())
    }

    /// Stops serving every network but `keep`.
    pub fn remove_all_but(&self, keep: &BTreeSet<u32>) {
        self.listeners.lock().expect("listeners").retain(|vni, l| {
            let kept = keep.contains(vni);
            if !kept {
                let _ = l.stop.send(true);
                l.task.abort();
            }
            kept
        });
    }
}

fn router(network: Network) -> axum::Router {
    axum::Router::new().fallback(answer).with_state(network)
}

/// The OpenStack metadata versions cloud-init may ask for; every one is answered as the latest.
const OPENSTACK_VERSIONS: &str =
    "2012-08-10\n2013-04-04\n2013-10-17\n2015-10-15\n2016-06-30\n2016-10-06\n2017-02-22\n2018-08-27\nlatest";

async fn answer(
    State(network): State<Network>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: axum::http::Method,
    uri: Uri,
) -> Response {
    if method != axum::http::Method::GET && method != axum::http::Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, "only GET\n").into_response();
    }
    let source = match peer.ip() {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(a) => a,
            None => return not_found(),
        },
    };
    let Some((vm, nic)) = network.vms.find(&network.project, &network.network, source) else {
        tracing::debug!(%source, network = %network.network, "metadata asked for by an address no VM here holds");
        return (
            StatusCode::NOT_FOUND,
            "no VM on this node holds the address this request comes from\n",
        )
            .into_response();
    };
    let path = uri.path().trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    match parts.as_slice() {
        [] => text("openstack\nlatest\n2009-04-04"),
        ["openstack"] => text(OPENSTACK_VERSIONS),
        ["openstack", version, rest @ ..] if is_version(version) => openstack(&vm, nic, rest),
        [version, rest @ ..] if is_version(version) => ec2(&vm, nic, rest),
        _ => not_found(),
    }
}

fn is_version(v: &str) -> bool {
    v == "latest" || (v.len() == 10 && v.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
}

fn text(body: impl Into<String>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain")],
        body.into(),
    )
        .into_response()
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

fn keys(vm: &VirtualMachine) -> Vec<(String, String)> {
    vm.spec
        .ssh_authorized_keys
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("key-{i}"), k.clone()))
        .collect()
}

fn openstack(vm: &VirtualMachine, _nic: usize, rest: &[&str]) -> Response {
    let uid = vm.metadata.uid.clone().unwrap_or_default();
    let name = vm.metadata.name.clone();
    match rest {
        [] => text(
            "meta_data.json\nnetwork_data.json\nuser_data\nvendor_data.json\nvendor_data2.json",
        ),
        ["meta_data.json"] => {
            let keys = keys(vm);
            axum::Json(json!({
                "uuid": uid,
                "name": name,
                "hostname": name,
                "launch_index": 0,
                "availability_zone": "flotilla",
                "project_id": vm.metadata.namespace,
                "public_keys": keys.iter().cloned().collect::<BTreeMap<String, String>>(),
                "keys": keys.iter().map(|(n, k)| json!({"name": n, "type": "ssh", "data": k})).collect::<Vec<_>>(),
                "meta": {},
            }))
            .into_response()
        }
        ["user_data"] => match &vm.spec.user_data {
            Some(data) => data.clone().into_response(),
            None => not_found(),
        },
        ["network_data.json"] => {
            // Every NIC by MAC; addresses over DHCP (which the network's server on this node
            // answers with IPAM's address, the gateway, DNS and the MTU).
            let interfaces = vm
                .status
                .as_ref()
                .map(|s| s.interfaces.clone())
                .unwrap_or_default();
            let links: Vec<_> = interfaces
                .iter()
                .map(
                    |i| json!({"id": i.name, "type": "phy", "ethernet_mac_address": i.mac_address}),
                )
                .collect();
            let networks: Vec<_> = interfaces
                .iter()
                .map(|i| json!({"id": format!("{}-ipv4", i.name), "link": i.name, "type": "ipv4_dhcp", "network_id": i.network}))
                .collect();
            axum::Json(json!({"links": links, "networks": networks, "services": []}))
                .into_response()
        }
        ["vendor_data.json"] | ["vendor_data2.json"] => axum::Json(json!({})).into_response(),
        _ => not_found(),
    }
}

fn ec2(vm: &VirtualMachine, nic: usize, rest: &[&str]) -> Response {
    let uid = vm.metadata.uid.clone().unwrap_or_default();
    let name = vm.metadata.name.clone();
    let address = vm
        .status
        .as_ref()
        .and_then(|s| s.interfaces.get(nic))
        .and_then(|i| i.ips.first())
        .and_then(|ip| ip.split('/').next())
        .unwrap_or_default()
        .to_string();
    let keys = keys(vm);
    match rest {
        [] => text("meta-data\nuser-data"),
        ["user-data"] => match &vm.spec.user_data {
            Some(data) => data.clone().into_response(),
            None => not_found(),
        },
        ["meta-data"] => text(
            "ami-id\nhostname\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nplacement/\npublic-keys/",
        ),
        ["meta-data", "instance-id"] => text(uid),
        ["meta-data", "ami-id"] => text(vm.spec.image.clone().unwrap_or_default()),
        ["meta-data", "instance-type"] => {
            text(vm.spec.class.clone().unwrap_or_else(|| "custom".into()))
        }
        ["meta-data", "hostname"] | ["meta-data", "local-hostname"] => text(name),
        ["meta-data", "local-ipv4"] => text(address),
        ["meta-data", "placement"] => text("availability-zone"),
        ["meta-data", "placement", "availability-zone"] => text("flotilla"),
        ["meta-data", "public-keys"] => text(
            keys.iter()
                .enumerate()
                .map(|(i, (n, _))| format!("{i}={n}"))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        ["meta-data", "public-keys", i] => match i.parse::<usize>().ok().and_then(|i| keys.get(i)) {
            Some(_) => text("openssh-key"),
            None => not_found(),
        },
        ["meta-data", "public-keys", i, "openssh-key"] => {
            match i.parse::<usize>().ok().and_then(|i| keys.get(i)) {
                Some((_, key)) => text(key.clone()),
                None => not_found(),
            }
        }
        _ => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, uid: &str, ip: &str) -> Arc<VirtualMachine> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "p", "uid": uid},
                "spec": {"resources": {"cpus": 1, "memory": "64Mi"}, "userData": format!("#cloud-config\nhostname: {name}\n"),
                         "sshAuthorizedKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBGuR2FAqB8Rk3kbvM6SQXqDY8C1l0O8Cjz3F3wE2UMf a@b"],
                         "networks": [{"network": "net"}]},
                "status": {"interfaces": [{"name": "nic0", "network": "net", "macAddress": "02:46:4c:00:00:01", "ips": [format!("{ip}/24")]}]}
            }))
            .unwrap(),
        )
    }

    async fn get(index: &Arc<VmIndex>, from: &str, path: &str) -> (StatusCode, String) {
        let app = router(Network {
            vms: index.clone(),
            project: "p".into(),
            network: "net".into(),
        });
        let mut req = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from((
            from.parse::<Ipv4Addr>().unwrap(),
            40000,
        ))));
        let resp = tower::ServiceExt::oneshot(app, req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn each_vm_reads_its_own_data_and_nobody_else_reads_any() {
        let index = Arc::new(VmIndex::default());
        index.set(vm("web", "u-web", "10.0.0.5"));
        index.set(vm("db", "u-db", "10.0.0.6"));
        let (status, body) = get(&index, "10.0.0.5", "/openstack/latest/meta_data.json").await;
        assert_eq!(status, StatusCode::OK);
        let meta: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (meta["uuid"].as_str(), meta["name"].as_str()),
            (Some("u-web"), Some("web"))
        );
        assert!(meta["public_keys"]["key-0"]
            .as_str()
            .unwrap()
            .starts_with("ssh-ed25519 "));
        let (_, body) = get(&index, "10.0.0.6", "/openstack/2018-08-27/user_data").await;
        assert_eq!(body, "#cloud-config\nhostname: db\n");
        let (_, body) = get(&index, "10.0.0.6", "/latest/meta-data/instance-id").await;
        assert_eq!(body, "u-db");
        let (_, body) = get(&index, "10.0.0.5", "/2009-04-04/meta-data/local-ipv4").await;
        assert_eq!(body, "10.0.0.5");
        let (_, body) = get(
            &index,
            "10.0.0.5",
            "/latest/meta-data/public-keys/0/openssh-key",
        )
        .await;
        assert!(body.starts_with("ssh-ed25519 "));
        let (_, body) = get(&index, "10.0.0.5", "/openstack/latest/network_data.json").await;
        let net: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(net["links"][0]["ethernet_mac_address"], "02:46:4c:00:00:01");
        assert_eq!(net["networks"][0]["type"], "ipv4_dhcp");
        // An address no VM holds (the DHCP server's own, another tenant's) gets nothing.
        let (status, _) = get(&index, "10.0.0.99", "/openstack/latest/meta_data.json").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // A VM that is gone gets nothing either.
        index.remove("u-db");
        let (status, _) = get(&index, "10.0.0.6", "/latest/meta-data/instance-id").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
