//! The node's network dataplane for overlay networks, Neutron's Linux-bridge layout without its
//! RPC: per network a Linux bridge `fb-<vni>` (libvirt plugs the VMs' taps into it) and a VXLAN
//! device `fx-<vni>` enslaved to it — unicast, no learning — with one flooding entry per other
//! node of the network (`bridge fdb append 00:00:00:00:00:00 dev fx-<vni> dst <node>`). Every
//! change goes through netlink ([`rtnetlink`]) in a chosen network namespace: the host's for the
//! agent (libvirt resolves bridges in its own), test namespaces in tests.
//!
//! Creating is cheap and deleting is slow (an RCU grace period per device, ~20–40 ms here), so
//! [`Netlink::ensure_overlay`] changes only what differs and never recreates what is right.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkVxlan};

mod firewall;
pub mod namespace;
mod port;
mod router;
mod service;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use firewall::{
    apply_firewall, firewall_rules, link_local, AddressSet, PortPolicy, Protocol, Rule,
};
pub use router::{
    external_peer_name, external_port_name, nat_rules, router_peer_name, router_port_name,
    uplink_nat_rules, External, ExternalPort, Router, RouterNetwork, UPLINK_LINKS,
    UPLINK_NODE_ADDRESS,
};
pub use service::{
    service_mac, service_peer_name, service_port_name, ServicePort, METADATA_ADDRESS,
};

/// The UDP port of VXLAN (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// What VXLAN adds to each frame over an IPv4 underlay (outer IP, UDP, VXLAN, inner Ethernet).
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cannot open netlink: {0}")]
    Open(std::io::Error),
    #[error("cannot enter the network namespace {path}: {error}")]
    Namespace { path: String, error: std::io::Error },
    #[error("netlink: {what}: {error}")]
    Netlink {
        what: String,
        error: rtnetlink::Error,
    },
    #[error("the underlay interface {0:?} does not exist")]
    NoUnderlay(String),
    #[error("the interface {0:?} does not exist")]
    NoInterface(String),
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let what = what.into();
    move |error| DataplaneError::Netlink { what, error }
}

/// The IPv4 destination of a forwarding entry (in the bridge family the parser cannot tell an
/// address's kind, so it arrives as four bytes).
fn destination(attribute: &NeighbourAttribute) -> Option<Ipv4Addr> {
    match attribute {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
            <[u8; 4]>::try_from(bytes.as_slice())
                .ok()
                .map(Ipv4Addr::from)
        }
        _ => None,
    }
}

/// One overlay network as a node carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub vni: u32,
    /// The MTU of the bridge and the VXLAN device (the VMs' NICs get the same).
    pub mtu: u32,
    /// This node's tunnel address.
    pub local: Ipv4Addr,
    /// The interface the tunnel address is on.
    pub underlay: String,
    /// The tunnel addresses of the other nodes of the network.
    pub remotes: BTreeSet<Ipv4Addr>,
}

pub fn bridge_name(vni: u32) -> String {
    format!("fb-{vni}")
}

pub fn vxlan_name(vni: u32) -> String {
    format!("fx-{vni}")
}

/// A netlink connection bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    /// The namespace's path; None: the calling process's own namespace.
    namespace: Option<std::path::PathBuf>,
}

impl Netlink {
    /// Netlink in the calling process's network namespace. Needs a Tokio runtime.
    pub fn current() -> Result<Self, DataplaneError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(DataplaneError::Open)?;
        tokio::spawn(connection);
        Ok(Netlink {
            handle,
            namespace: None,
        })
    }

    /// Netlink in the network namespace at `path` (e.g. `/run/netns/<name>`). The socket is
    /// opened on a thread of its own that entered the namespace (`setns` changes only the
    /// calling thread, so never a runtime's worker); a netlink socket stays bound to the
    /// namespace it was opened in, and is then driven from the runtime. Needs a Tokio runtime.
    pub fn in_namespace(path: &Path) -> Result<Self, DataplaneError> {
        let socket = namespace::on_thread_in(path, || {
            let mut socket = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)
                .map_err(DataplaneError::Open)?;
            socket.bind_auto().map_err(DataplaneError::Open)?;
            socket
                .connect(&rtnetlink::sys::SocketAddr::new(0, 0))
                .map_err(DataplaneError::Open)?;
            Ok(socket)
        })?;
        // SAFETY: the descriptor comes from a socket this function owns and gives up here.
        let socket = unsafe {
            <rtnetlink::sys::TokioSocket as std::os::fd::FromRawFd>::from_raw_fd(
                std::os::fd::IntoRawFd::into_raw_fd(socket),
            )
        };
        let (connection, handle, _) = rtnetlink::from_socket(socket);
        tokio::spawn(connection);
        Ok(Netlink {
            handle,
            namespace: Some(path.to_path_buf()),
        })
    }

    async fn link(&self, name: &str) -> Result<Option<LinkMessage>, DataplaneError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(netlink(format!("looking up {name}"))(e)),
        }
    }

    /// Makes the node carry `overlay`: its bridge and VXLAN device exist, are up, have its MTU,
    /// and flood to exactly its remotes. Changes only what differs.
    pub async fn ensure_overlay(&self, overlay: &Overlay) -> Result<(), DataplaneError> {
        let (bridge, vxlan) = (bridge_name(overlay.vni), vxlan_name(overlay.vni));
        let bridge_index = match self.link(&bridge).await? {
            Some(link) => link.header.index,
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(&bridge).mtu(overlay.mtu).up().build())
                    .execute()
                    .await
                    .map_err(netlink(format!("creating {bridge}")))?;
                self.link(&bridge).await?.expect("just made").header.index
            }
        };
        let vxlan_index = match self.link(&vxlan).await? {
            Some(link) => link.header.index,
            None => {
                let underlay = self
                    .link(&overlay.underlay)
                    .await?
                    .ok_or_else(|| DataplaneError::NoUnderlay(overlay.underlay.clone()))?;
                self.handle
                    .link()
                    .add(
                        LinkVxlan::new(&vxlan, overlay.vni)
                            .dev(underlay.header.index)
                            .local(overlay.local)
                            .port(VXLAN_PORT)
                            .learning(false)
                            .mtu(overlay.mtu)
                            .controller(bridge_index)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(netlink(format!("creating {vxlan}")))?;
                self.link(&vxlan).await?.expect("just made").header.index
            }
        };
        // Someone may have taken them down or changed their MTU: set both, cheaply.
        for (name, index) in [(&bridge, bridge_index), (&vxlan, vxlan_index)] {
            self.handle
                .link()
                .set(
                    rtnetlink::LinkUnspec::new_with_index(index)
                        .mtu(overlay.mtu)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(netlink(format!("setting {name} up")))?;
        }
        // Node-local services (the DHCP server) are isolated ports too: the tunnel never
        // carries their frames to another node's copy of them.
        self.isolate(vxlan_index, &vxlan).await?;
        let have = self.flood_list(vxlan_index).await?;
        for remote in overlay.remotes.difference(&have) {
            self.flood_to(vxlan_index, *remote).await?;
        }
        for gone in have.difference(&overlay.remotes) {
            self.stop_flooding_to(vxlan_index, *gone).await?;
        }
        Ok(())
    }

    /// The remotes the VXLAN device floods to (its all-zero forwarding entries).
    async fn flood_list(&self, vxlan_index: u32) -> Result<BTreeSet<Ipv4Addr>, DataplaneError> {
        let mut dump = self.bridge_fdb();
        let mut remotes = BTreeSet::new();
        while let Some(message) = dump
            .try_next()
            .await
            .map_err(netlink("listing forwarding entries"))?
        {
            if message.header.ifindex != vxlan_index {
                continue;
            }
            let zero = message
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(mac) if mac.iter().all(|b| *b == 0)));
            let destination = message.attributes.iter().find_map(destination);
            if let (true, Some(ip)) = (zero, destination) {
                remotes.insert(ip);
            }
        }
        Ok(remotes)
    }

    fn bridge_fdb(
        &self,
    ) -> impl futures::Stream<
        Item = Result<rtnetlink::packet_route::neighbour::NeighbourMessage, rtnetlink::Error>,
    > {
        self.handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
    }

    /// `bridge fdb append 00:00:00:00:00:00 dev <vxlan> dst <remote>`: an all-zero entry per
    /// remote makes the flood list (rtnetlink's add request cannot append, so it is sent by hand).
    async fn flood_to(&self, vxlan_index: u32, remote: Ipv4Addr) -> Result<(), DataplaneError> {
        let mut request = self
            .handle
            .neighbours()
            .add_bridge(vxlan_index, &[0; 6])
            .destination(IpAddr::V4(remote))
            .flags(NeighbourFlags::Own);
        let message = request.message_mut().clone();
        let mut netlink_message = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(message));
        netlink_message.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        let mut handle = self.handle.clone();
        let mut responses = handle
            .request(netlink_message)
            .map_err(netlink(format!("flooding to {remote}")))?;
        while let Some(message) = futures::StreamExt::next(&mut responses).await {
            if let NetlinkPayload::Error(error) = message.payload {
                // EEXIST: someone appended it meanwhile.
                if error.code.is_some() && error.raw_code() != -libc::EEXIST {
                    return Err(netlink(format!("flooding to {remote}"))(
                        rtnetlink::Error::NetlinkError(error),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn stop_flooding_to(
        &self,
        vxlan_index: u32,
        remote: Ipv4Addr,
    ) -> Result<(), DataplaneError> {
        let mut dump = self.bridge_fdb();
        while let Some(message) = dump
            .try_next()
            .await
            .map_err(netlink("listing forwarding entries"))?
        {
            let ours = message.header.ifindex == vxlan_index
                && message.attributes.iter().find_map(destination) == Some(remote);
            if ours {
                self.handle
                    .neighbours()
                    .del(message)
                    .execute()
                    .await
                    .map_err(netlink(format!("no longer flooding to {remote}")))?;
            }
        }
        Ok(())
    }

    /// The interface of the IPv4 default route and its first IPv4 address: where a node's
    /// tunnel ends by default (`flotilla agent --tunnel-address` overrides it).
    pub async fn default_route(&self) -> Result<Option<(String, Ipv4Addr)>, DataplaneError> {
        let query = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut routes = self.handle.route().get(query).execute();
        let mut oif = None;
        while let Some(route) = routes.try_next().await.map_err(netlink("listing routes"))? {
            let main =
                route.header.table == rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN;
            if main && route.header.destination_prefix_length == 0 {
                oif = route.attributes.iter().find_map(|a| match a {
                    rtnetlink::packet_route::route::RouteAttribute::Oif(index) => Some(*index),
                    _ => None,
                });
                if oif.is_some() {
                    break;
                }
            }
        }
        let Some(index) = oif else {
            return Ok(None);
        };
        let mut addresses = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut address = None;
        while let Some(message) = addresses
            .try_next()
            .await
            .map_err(netlink("listing addresses"))?
        {
            address = address.or(message.attributes.iter().find_map(|a| match a {
                rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) => {
                    Some(*ip)
                }
                _ => None,
            }));
        }
        let mut links = self.handle.link().get().match_index(index).execute();
        let name = links
            .try_next()
            .await
            .map_err(netlink("looking up the default route's interface"))?
            .and_then(|link| {
                link.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some(name),
                    _ => None,
                })
            });
        Ok(name.zip(address))
    }

    /// The interface holding `address`, if one does.
    pub async fn interface_with(
        &self,
        address: Ipv4Addr,
    ) -> Result<Option<String>, DataplaneError> {
        let mut addresses = self
            .handle
            .address()
            .get()
            .set_address_filter(IpAddr::V4(address))
            .execute();
        let Some(message) = addresses
            .try_next()
            .await
            .map_err(netlink("listing addresses"))?
        else {
            return Ok(None);
        };
        let mut links = self
            .handle
            .link()
            .get()
            .match_index(message.header.index)
            .execute();
        Ok(links
            .try_next()
            .await
            .map_err(netlink("looking up an interface"))?
            .and_then(|link| {
                link.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some(name),
                    _ => None,
                })
            }))
    }

    /// Removes the overlay's devices (whatever of them exists), its service port too.
    pub async fn remove_overlay(&self, vni: u32) -> Result<(), DataplaneError> {
        for name in [service_port_name(vni), vxlan_name(vni), bridge_name(vni)] {
            if let Some(link) = self.link(&name).await? {
                self.handle
                    .link()
                    .del(link.header.index)
                    .execute()
                    .await
                    .map_err(netlink(format!("deleting {name}")))?;
            }
        }
        Ok(())
    }

    /// The VNIs of the overlays this namespace carries (bridges named `fb-<vni>`).
    pub async fn overlays(&self) -> Result<BTreeSet<u32>, DataplaneError> {
        let mut links = self.handle.link().get().execute();
        let mut vnis = BTreeSet::new();
        while let Some(link) = links.try_next().await.map_err(netlink("listing links"))? {
            for attribute in &link.attributes {
                if let LinkAttribute::IfName(name) = attribute {
                    if let Some(vni) = name.strip_prefix("fb-").and_then(|v| v.parse().ok()) {
                        vnis.insert(vni);
                    }
                }
            }
        }
        Ok(vnis)
    }
}
