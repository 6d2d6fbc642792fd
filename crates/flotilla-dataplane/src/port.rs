//! A namespace's port on a bridge: a veth pair whose host end is a port of a bridge in this
//! namespace and whose other end lives, with its addresses, in another namespace. The DHCP
//! server's service port and a router's ports are such ports.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::{LinkBridgePort, LinkUnspec, LinkVeth};

use crate::{netlink, DataplaneError, Netlink};

/// One namespace port.
pub(crate) struct NamespacePort<'a> {
    /// The bridge (in this namespace) the host end joins; None: the host end stays a plain
    /// link of this namespace (a router's link to the node).
    pub bridge: Option<&'a str>,
    /// The host end's name, and the name of the end inside the namespace.
    pub host: &'a str,
    pub peer: &'a str,
    pub namespace: &'a Path,
    pub mtu: u32,
    /// The inside end's MAC (None: the kernel's).
    pub mac: Option<[u8; 6]>,
    /// The inside end's addresses with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Whether the host end is an isolated bridge port.
    pub isolated: bool,
}

impl Netlink {
    /// Makes `port` present and up; returns netlink inside its namespace. Changes only what
    /// differs; the bridge must exist.
    pub(crate) async fn ensure_namespace_port(
        &self,
        port: &NamespacePort<'_>,
    ) -> Result<Netlink, DataplaneError> {
        let bridge_index = match port.bridge {
            Some(bridge) => Some(
                self.link(bridge)
                    .await?
                    .ok_or_else(|| DataplaneError::NoInterface(bridge.to_string()))?
                    .header
                    .index,
            ),
            None => None,
        };
        let inside = Netlink::in_namespace(port.namespace)?;
        let host_index = match self.link(port.host).await? {
            Some(link) => link.header.index,
            None => {
                self.handle
                    .link()
                    .add(LinkVeth::new(port.host, port.peer).mtu(port.mtu).build())
                    .execute()
                    .await
                    .map_err(netlink(format!("creating {}", port.host)))?;
                let namespace = std::fs::File::open(port.namespace).map_err(|error| {
                    DataplaneError::Namespace {
                        path: port.namespace.display().to_string(),
                        error,
                    }
                })?;
                let peer_index = self.link(port.peer).await?.expect("just made").header.index;
                self.handle
                    .link()
                    .set(
                        LinkUnspec::new_with_index(peer_index)
                            .setns_by_fd(namespace.as_raw_fd())
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(netlink(format!("moving {} into its namespace", port.peer)))?;
                self.link(port.host).await?.expect("just made").header.index
            }
        };
        let mut host = LinkUnspec::new_with_index(host_index).mtu(port.mtu).up();
        if let Some(bridge_index) = bridge_index {
            host = host.controller(bridge_index);
        }
        self.handle
            .link()
            .set(host.build())
            .execute()
            .await
            .map_err(netlink(format!(
                "putting {} on {}",
                port.host,
                port.bridge.unwrap_or("no bridge")
            )))?;
        if port.isolated {
            self.isolate(host_index, port.host).await?;
        }

        let lo = inside.link("lo").await?.expect("every namespace has lo");
        inside
            .handle
            .link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(netlink("setting lo up"))?;
        let peer_index = inside
            .link(port.peer)
            .await?
            .ok_or_else(|| DataplaneError::NoInterface(port.peer.to_string()))?
            .header
            .index;
        let mut settings = LinkUnspec::new_with_index(peer_index).mtu(port.mtu).up();
        if let Some(mac) = port.mac {
            settings = settings.address(mac.to_vec());
        }
        inside
            .handle
            .link()
            .set(settings.build())
            .execute()
            .await
            .map_err(netlink(format!("setting {} up", port.peer)))?;
        let mut listed = inside
            .handle
            .address()
            .get()
            .set_link_index_filter(peer_index)
            .execute();
        let mut present = Vec::new();
        while let Some(message) = listed
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
        for (ip, len) in &port.addresses {
            if present.contains(&(*ip, *len)) {
                continue;
            }
            let mut request = inside.handle.address().add(peer_index, *ip, *len);
            // No duplicate address detection: the address is this namespace's alone, and a
            // tentative address would keep servers from binding it for a second or two.
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            request
                .execute()
                .await
                .map_err(netlink(format!("giving {} {ip}", port.peer)))?;
        }
        Ok(inside)
    }

    /// Removes the addresses of interface `name` that `keep` does not want (a floating IP
    /// moved elsewhere). IPv6 link-local addresses are always kept.
    pub(crate) async fn retain_addresses(
        &self,
        name: &str,
        keep: impl Fn(IpAddr) -> bool,
    ) -> Result<(), DataplaneError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        let mut listed = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute();
        let mut gone = Vec::new();
        while let Some(message) = listed
            .try_next()
            .await
            .map_err(netlink("listing addresses"))?
        {
            let ip = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let link_local = matches!(ip, Some(IpAddr::V6(v6)) if v6.is_unicast_link_local());
            if ip.is_some_and(|ip| !link_local && !keep(ip)) {
                gone.push(message);
            }
        }
        for message in gone {
            self.handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(netlink(format!("removing an address of {name}")))?;
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

    /// Deletes the link `name` (a veth's peer goes with it); absent is fine.
    pub(crate) async fn delete_link(&self, name: &str) -> Result<(), DataplaneError> {
        if let Some(link) = self.link(name).await? {
            self.handle
                .link()
                .del(link.header.index)
                .execute()
                .await
                .map_err(netlink(format!("deleting {name}")))?;
        }
        Ok(())
    }
}
