//! A node's service port on an overlay network: a veth pair from the network's bridge
//! (`fd-<vni>`) into a namespace of its own (`fdn-<vni>`, holding the network's DHCP-server
//! address), where the node's DHCP and DNS server for the network listens.
//!
//! Every node of a network runs its own server on the same address and MAC, so the service port
//! and the VXLAN device are both *isolated* bridge ports: an isolated port exchanges frames with
//! the VMs' taps but never with another isolated port, so a node's server answers only its own
//! VMs and never hears, nor is heard by, the servers of the other nodes.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use crate::port::NamespacePort;
use crate::{bridge_name, DataplaneError, Netlink};

pub fn service_port_name(vni: u32) -> String {
    format!("fd-{vni}")
}

/// The service port's end inside its namespace.
pub fn service_peer_name(vni: u32) -> String {
    format!("fdn-{vni}")
}

/// The cloud metadata service's address, held by every service port.
pub const METADATA_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The MAC of every node's service port on the network `vni` (the same on all: a VM that
/// moves keeps a valid ARP entry): 02:46:4d followed by the VNI.
pub fn service_mac(vni: u32) -> [u8; 6] {
    let v = vni.to_be_bytes();
    [0x02, 0x46, 0x4d, v[1], v[2], v[3]]
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub vni: u32,
    /// The namespace the server runs in (`/run/netns/<name>`, made beforehand).
    pub namespace: PathBuf,
    /// The network's DHCP-server address and the prefix length of its subnet.
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The server's IPv6 address (in the network's /64), for its router advertisements.
    pub address6: Option<std::net::Ipv6Addr>,
    pub mtu: u32,
}

impl Netlink {
    /// Makes `port` present: the veth pair, its host end an isolated port of the network's
    /// bridge, its other end up in the namespace with the MAC, MTU and addresses. The overlay's
    /// bridge must exist. Changes only what differs.
    pub async fn ensure_service_port(&self, port: &ServicePort) -> Result<(), DataplaneError> {
        let (bridge, host, peer) = (
            bridge_name(port.vni),
            service_port_name(port.vni),
            service_peer_name(port.vni),
        );
        // The metadata service's link-local address is the port's too (the agent serves it).
        let mut addresses = vec![
            (IpAddr::V4(port.address), port.prefix_len),
            (IpAddr::V4(METADATA_ADDRESS), 32),
        ];
        if let Some(v6) = port.address6 {
            addresses.push((IpAddr::V6(v6), 64));
        }
        self.ensure_namespace_port(&NamespacePort {
            bridge: Some(&bridge),
            host: &host,
            peer: &peer,
            namespace: &port.namespace,
            mtu: port.mtu,
            mac: Some(service_mac(port.vni)),
            addresses,
            isolated: true,
        })
        .await?;
        Ok(())
    }

    /// Removes the service port of `vni` (its namespace's end goes with it); absent is fine.
    pub async fn remove_service_port(&self, vni: u32) -> Result<(), DataplaneError> {
        self.delete_link(&service_port_name(vni)).await
    }
}
