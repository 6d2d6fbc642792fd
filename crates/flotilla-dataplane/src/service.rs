//! A node's service port on an overlay network: a veth pair from the network's bridge
//! (`fd-<vni>`) into a namespace of its own (`fdn-<vni>`, holding the network's DHCP-server
//! address), where the node's DHCP and DNS server for the network listens.
//!
//! Every node of a network runs its own server on the same address and MAC, so the service port
//! and the VXLAN device are both *isolated* bridge ports: an isolated port exchanges frames with
//! the VMs' taps but never with another isolated port, so a node's server answers only its own
//! VMs and never hears, nor is heard by, the servers of the other nodes.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::{LinkBridgePort, LinkUnspec, LinkVeth};

use crate::{bridge_name, netlink, DataplaneError, Netlink};

pub fn service_port_name(vni: u32) -> String {
    format!("fd-{vni}")
}

/// The service port's end inside its namespace.
pub fn service_peer_name(vni: u32) -> String {
    format!("fdn-{vni}")
}

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
    /// bridge, its other end up in the namespace with the MAC, MTU and address. The overlay's
    /// bridge must exist. Changes only what differs.
    pub async fn ensure_service_port(&self, port: &ServicePort) -> Result<(), DataplaneError> {
        let (bridge, host, peer) = (
            bridge_name(port.vni),
            service_port_name(port.vni),
            service_peer_name(port.vni),
        );
        let bridge_index = self
            .link(&bridge)
            .await?
            .ok_or_else(|| DataplaneError::NoBridge(bridge.clone()))?
            .header
            .index;
        let inside = Netlink::in_namespace(&port.namespace)?;
        let host_index = match self.link(&host).await? {
            Some(link) => link.header.index,
            None => {
                self.handle
                    .link()
                    .add(LinkVeth::new(&host, &peer).mtu(port.mtu).build())
                    .execute()
                    .await
                    .map_err(netlink(format!("creating {host}")))?;
                let namespace = std::fs::File::open(&port.namespace).map_err(|error| {
                    DataplaneError::Namespace {
                        path: port.namespace.display().to_string(),
                        error,
                    }
                })?;
                let peer_index = self.link(&peer).await?.expect("just made").header.index;
                self.handle
                    .link()
                    .set(
                        LinkUnspec::new_with_index(peer_index)
                            .setns_by_fd(namespace.as_raw_fd())
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(netlink(format!("moving {peer} into its namespace")))?;
                self.link(&host).await?.expect("just made").header.index
            }
        };
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(host_index)
                    .controller(bridge_index)
                    .mtu(port.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("putting {host} on {bridge}")))?;
        self.isolate(host_index, &host).await?;

        let lo = inside.link("lo").await?.expect("every namespace has lo");
        inside
            .handle
            .link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(netlink("setting lo up"))?;
        let peer_index = inside
            .link(&peer)
            .await?
            .ok_or_else(|| DataplaneError::NoBridge(peer.clone()))?
            .header
            .index;
        inside
            .handle
            .link()
            .set(
                LinkUnspec::new_with_index(peer_index)
                    .address(service_mac(port.vni).to_vec())
                    .mtu(port.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("setting {peer} up")))?;
        let mut addresses = inside
            .handle
            .address()
            .get()
            .set_link_index_filter(peer_index)
            .execute();
        let mut present = Vec::new();
        while let Some(message) = addresses
            .try_next()
            .await
            .map_err(netlink("listing addresses"))?
        {
            for attribute in &message.attributes {
                if let AddressAttribute::Address(ip) = attribute {
                    present.push((*ip, message.header.prefix_len));
                }
            }
        }
        let wanted = [
            Some((IpAddr::V4(port.address), port.prefix_len)),
            port.address6.map(|a| (IpAddr::V6(a), 64)),
        ];
        for (ip, len) in wanted.into_iter().flatten() {
            if present.contains(&(ip, len)) {
                continue;
            }
            let mut request = inside.handle.address().add(peer_index, ip, len);
            // No duplicate address detection: the address is this namespace's alone, and a
            // tentative address would keep dnsmasq from binding it for a second or two.
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            request
                .execute()
                .await
                .map_err(netlink(format!("giving {peer} {ip}")))?;
        }
        Ok(())
    }

    /// Makes the bridge port `index` isolated (it never exchanges frames with another isolated
    /// port of its bridge).
    pub(crate) async fn isolate(&self, index: u32, name: &str) -> Result<(), DataplaneError> {
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).isolated(true).build())
            .execute()
            .await
            .map_err(netlink(format!("isolating the bridge port {name}")))
    }

    /// Removes the service port of `vni` (its namespace's end goes with it); absent is fine.
    pub async fn remove_service_port(&self, vni: u32) -> Result<(), DataplaneError> {
        let host = service_port_name(vni);
        if let Some(link) = self.link(&host).await? {
            self.handle
                .link()
                .del(link.header.index)
                .execute()
                .await
                .map_err(netlink(format!("deleting {host}")))?;
        }
        Ok(())
    }
}
