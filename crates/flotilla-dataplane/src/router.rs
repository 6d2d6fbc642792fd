//! A router, Neutron's L3 agent layout: a network namespace joined to each overlay network it
//! serves by a port holding the network's gateway address (`fq-<vni>` on the network's bridge,
//! `qr-<vni>` inside: a network has at most one router) and to an external bridge by a port
//! holding its external address (`fg-<id>` / `qg-<id>`), with IPv4 forwarding on, a default
//! route to the external gateway, and its networks' traffic to the outside translated to its
//! external address (SNAT) by an nftables table of its own namespace, replaced in one batch.
//! Nothing here touches the host's ruleset: the table lives in the router's namespace.
//!
//! A router may instead leave through the node's own uplink (no provider network): a veth pair
//! to the node's namespace (`fg-<id>` there, holding [`UPLINK_NODE_ADDRESS`]/32 and a route to
//! the router's link address; `qg-<id>` inside, holding its address of [`UPLINK_LINKS`], unique
//! on the node) and a default route over it. The router translates its networks to its link
//! address; the node forwards (its IPv4 forwarding is turned on) and translates the link
//! addresses to its own (masquerade) in one table of its own, `ip flotilla-uplink`, which only
//! ever holds that rule: traffic is translated twice, as Neutron's DVR does with its `fip`
//! namespace, because the tenants' networks overlap and the node can route only to distinct
//! link addresses.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::RouteMessageBuilder;

use crate::port::NamespacePort;
use crate::{bridge_name, netlink, DataplaneError, Netlink};

pub fn router_port_name(vni: u32) -> String {
    format!("fq-{vni}")
}

pub fn router_peer_name(vni: u32) -> String {
    format!("qr-{vni}")
}

pub fn external_port_name(id: u32) -> String {
    format!("fg-{id}")
}

pub fn external_peer_name(id: u32) -> String {
    format!("qg-{id}")
}

/// The router's side of one of its networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterNetwork {
    pub vni: u32,
    /// The network: its cidr's first address and prefix length.
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    /// The network's gateway address, which the router takes.
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// The router port's MAC (None: the kernel's).
    pub mac: Option<[u8; 6]>,
}

/// The router's way out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalPort {
    /// The bridge of the external network on this node.
    pub bridge: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The next hop for everything else.
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// The port's MAC (None: the kernel's): IPAM's, so it stays when the router moves.
    pub mac: Option<[u8; 6]>,
}

/// The node's end of every uplink router's link (each `fg-<id>` holds it as a /32).
pub const UPLINK_NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 64, 1);
/// The link addresses of uplink routers (link-local, clear of the metadata address).
pub const UPLINK_LINKS: (Ipv4Addr, u8) = (Ipv4Addr::new(169, 254, 64, 0), 18);

/// Where a router's networks leave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum External {
    /// A bridged external network, with an address of the router's own (floating IPs too).
    Bridge(ExternalPort),
    /// The node's uplink, through a link to the node's namespace: the router's address on
    /// that link (in [`UPLINK_LINKS`], unique on the node).
    Uplink(Ipv4Addr),
}

/// The node's masquerade of uplink routers' link addresses, as one `nft -f` batch that
/// replaces the table; `None` removes it.
pub fn uplink_nat_rules(present: bool) -> String {
    let mut rules = String::from("table ip flotilla-uplink {}\ndelete table ip flotilla-uplink\n");
    if present {
        let (links, len) = UPLINK_LINKS;
        rules.push_str(&format!(
            "table ip flotilla-uplink {{\n  chain postrouting {{\n    \
             type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {links}/{len} oifname != \"fg-*\" masquerade\n  }}\n}}\n"
        ));
    }
    rules
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Router {
    /// Unique on the node (names its external port).
    pub id: u32,
    /// The router's namespace (`/run/netns/<name>`, made beforehand).
    pub namespace: PathBuf,
    pub networks: Vec<RouterNetwork>,
    pub external: Option<External>,
    /// Floating IPs: (external address, the inside address it stands for). Traffic to the
    /// external address is sent to the inside one (DNAT); the inside one leaves as it (SNAT).
    /// Only on a bridged external network.
    pub floating: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Static routes: (destination, prefix length, next hop on one of its networks).
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
}

/// The router's nftables table (in its namespace), as one `nft -f` batch that replaces it:
/// floating IPs in both directions, then its networks leaving through the external port
/// translated to the external address.
pub fn nat_rules(router: &Router) -> String {
    let mut rules = String::from(
        "table ip flotilla-router {}\ndelete table ip flotilla-router\ntable ip flotilla-router {\n",
    );
    let outside = external_peer_name(router.id);
    rules.push_str(
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n",
    );
    let bridged = matches!(router.external, Some(External::Bridge(_)));
    for (public, private) in router.floating.iter().filter(|_| bridged) {
        rules.push_str(&format!(
            "    iifname \"{outside}\" ip daddr {public} dnat to {private}\n"
        ));
    }
    rules.push_str("  }\n");
    rules.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    let translated = match &router.external {
        Some(External::Bridge(external)) => {
            for (public, private) in &router.floating {
                rules.push_str(&format!(
                    "    oifname \"{outside}\" ip saddr {private} snat to {public}\n"
                ));
            }
            Some(external.address)
        }
        Some(External::Uplink(address)) => Some(*address),
        None => None,
    };
    if let Some(address) = translated {
        for network in &router.networks {
            rules.push_str(&format!(
                "    oifname \"{}\" ip saddr {}/{} snat to {}\n",
                outside, network.network, network.prefix_len, address
            ));
        }
    }
    rules.push_str("  }\n}\n");
    rules
}

impl Netlink {
    /// Makes `router` present: its ports, addresses, default route, forwarding and NAT table.
    /// The networks' bridges and the external bridge must exist. Changes only what differs
    /// (the NAT table is replaced whole, atomically).
    pub async fn ensure_router(&self, router: &Router) -> Result<(), DataplaneError> {
        let mut inside = None;
        for network in &router.networks {
            let (bridge, host, peer) = (
                bridge_name(network.vni),
                router_port_name(network.vni),
                router_peer_name(network.vni),
            );
            inside = Some(
                self.ensure_namespace_port(&NamespacePort {
                    bridge: Some(&bridge),
                    host: &host,
                    peer: &peer,
                    namespace: &router.namespace,
                    mtu: network.mtu,
                    mac: network.mac,
                    addresses: vec![(IpAddr::V4(network.gateway), network.prefix_len)],
                    isolated: false,
                })
                .await?,
            );
        }
        if let Some(External::Uplink(address)) = &router.external {
            inside = Some(self.ensure_uplink_link(router, *address).await?);
        }
        if let Some(External::Bridge(external)) = &router.external {
            let (host, peer) = (external_port_name(router.id), external_peer_name(router.id));
            let netlink = self
                .ensure_namespace_port(&NamespacePort {
                    bridge: Some(&external.bridge),
                    host: &host,
                    peer: &peer,
                    namespace: &router.namespace,
                    mtu: external.mtu,
                    mac: external.mac,
                    // The floating IPs are the router's too: it answers ARP for them.
                    addresses: std::iter::once((IpAddr::V4(external.address), external.prefix_len))
                        .chain(
                            router
                                .floating
                                .iter()
                                .map(|(public, _)| (IpAddr::V4(*public), 32)),
                        )
                        .collect(),
                    isolated: false,
                })
                .await?;
            netlink
                .retain_addresses(&peer, |ip| {
                    ip == IpAddr::V4(external.address)
                        || router
                            .floating
                            .iter()
                            .any(|(public, _)| ip == IpAddr::V4(*public))
                })
                .await?;
            netlink.ensure_default_route(external.gateway).await?;
            inside = Some(netlink);
        }
        if inside.is_some() {
            set_forwarding(Some(&router.namespace))?;
        }
        ensure_routes(&router.namespace, &router.routes).await?;
        crate::namespace::run_in(
            "nft",
            &["-f", "-"],
            &router.namespace,
            Some(&nat_rules(router)),
        )
        .await
    }

    /// The link of an uplink router to this (the node's) namespace, `address` its end: the
    /// node's end holds UPLINK_NODE_ADDRESS/32 and routes `address` to the router, forwards,
    /// and masquerades the link addresses. Returns netlink inside the router's namespace.
    async fn ensure_uplink_link(
        &self,
        router: &Router,
        address: Ipv4Addr,
    ) -> Result<Netlink, DataplaneError> {
        let (host, peer) = (external_port_name(router.id), external_peer_name(router.id));
        // An old address goes first: removing a primary address takes its secondaries along.
        Netlink::in_namespace(&router.namespace)?
            .retain_addresses(&peer, |ip| ip == IpAddr::V4(address))
            .await?;
        let inside = self
            .ensure_namespace_port(&NamespacePort {
                bridge: None,
                host: &host,
                peer: &peer,
                namespace: &router.namespace,
                mtu: 1500,
                mac: None,
                addresses: vec![(IpAddr::V4(address), UPLINK_LINKS.1)],
                isolated: false,
            })
            .await?;
        inside.ensure_default_route(UPLINK_NODE_ADDRESS).await?;
        let index = self
            .link(&host)
            .await?
            .ok_or_else(|| DataplaneError::NoInterface(host.clone()))?
            .header
            .index;
        self.handle
            .address()
            .add(index, IpAddr::V4(UPLINK_NODE_ADDRESS), 32)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("giving {host} {UPLINK_NODE_ADDRESS}")))?;
        // The route to the router's address, and no other over its link (an address it had).
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut stale = Vec::new();
        while let Some(route) = routes.try_next().await.map_err(netlink("listing routes"))? {
            use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
            let on_link = route.attributes.contains(&RouteAttribute::Oif(index));
            let wanted = route.header.destination_prefix_length == 32
                && route
                    .attributes
                    .contains(&RouteAttribute::Destination(RouteAddress::Inet(address)));
            let local = route.header.kind != rtnetlink::packet_route::route::RouteType::Unicast;
            if on_link && !wanted && !local && route.header.destination_prefix_length == 32 {
                stale.push(route);
            }
        }
        for route in stale {
            self.handle
                .route()
                .del(route)
                .execute()
                .await
                .map_err(netlink(format!("removing a stale route over {host}")))?;
        }
        self.handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(address, 32)
                    .output_interface(index)
                    .scope(rtnetlink::packet_route::route::RouteScope::Link)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("routing {address} over {host}")))?;
        set_forwarding(self.namespace.as_deref())?;
        self.ensure_uplink_nat(true).await?;
        Ok(inside)
    }

    /// Makes the node's masquerade of uplink routers present or absent (`nft -f`, one batch).
    pub async fn ensure_uplink_nat(&self, present: bool) -> Result<(), DataplaneError> {
        crate::namespace::run_in_or_here(
            "nft",
            &["-f", "-"],
            self.namespace.as_deref(),
            Some(&uplink_nat_rules(present)),
        )
        .await
    }

    /// `ip route replace default via <gateway>` in this namespace (unless it is there already).
    async fn ensure_default_route(&self, gateway: Ipv4Addr) -> Result<(), DataplaneError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut routes = self.handle.route().get(query).execute();
        while let Some(route) = routes.try_next().await.map_err(netlink("listing routes"))? {
            let default = route.header.destination_prefix_length == 0
                && route.header.table == rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN;
            let via = route.attributes.iter().any(|a| {
                matches!(a, rtnetlink::packet_route::route::RouteAttribute::Gateway(
                    rtnetlink::packet_route::route::RouteAddress::Inet(g)) if *g == gateway)
            });
            if default && via {
                return Ok(());
            }
        }
        self.handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("routing by default via {gateway}")))
    }

    /// Removes the router's ports (their namespace ends go with them); absent is fine. The
    /// namespace itself is the caller's to remove.
    pub async fn remove_router_ports(&self, id: u32, vnis: &[u32]) -> Result<(), DataplaneError> {
        for vni in vnis {
            self.delete_link(&router_port_name(*vni)).await?;
        }
        self.delete_link(&external_port_name(id)).await
    }
}

/// Makes the static routes in `namespace` (marked `proto static`) exactly `routes`.
async fn ensure_routes(
    namespace: &Path,
    routes: &[(Ipv4Addr, u8, Ipv4Addr)],
) -> Result<(), DataplaneError> {
    let (mut command, _namespace) = crate::namespace::command_in("ip", namespace)?;
    let listed = command
        .args(["-o", "route", "show", "proto", "static"])
        .output()
        .await
        .map_err(|error| DataplaneError::Namespace {
            path: namespace.display().to_string(),
            error,
        })?;
    let wanted: Vec<(String, String)> = routes
        .iter()
        .map(|(dst, len, via)| (format!("{dst}/{len}"), via.to_string()))
        .collect();
    // Lines read `192.168.50.0/24 via 10.0.0.5 dev qr-4096 ...` (a /32 without its length).
    let mut present = Vec::new();
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(dst), Some(via)) = (
            words.first(),
            words
                .iter()
                .position(|w| *w == "via")
                .and_then(|i| words.get(i + 1)),
        ) else {
            continue;
        };
        if *dst == "default" {
            // The default route (to the external gateway) is ensure_default_route's.
            continue;
        }
        let dst = if dst.contains('/') {
            dst.to_string()
        } else {
            format!("{dst}/32")
        };
        present.push((dst, via.to_string()));
    }
    for (dst, via) in &present {
        if !wanted.contains(&(dst.clone(), via.clone())) {
            crate::namespace::run_in(
                "ip",
                &["route", "del", dst, "proto", "static"],
                namespace,
                None,
            )
            .await?;
        }
    }
    for (dst, via) in &wanted {
        if !present.contains(&(dst.clone(), via.clone())) {
            crate::namespace::run_in(
                "ip",
                &["route", "replace", dst, "via", via, "proto", "static"],
                namespace,
                None,
            )
            .await?;
        }
    }
    Ok(())
}

/// IPv4 forwarding on in `namespace`, or in the calling process's (sysctls under
/// /proc/sys/net belong to the namespace of whoever opens them). Writes only when it is off.
fn set_forwarding(namespace: Option<&Path>) -> Result<(), DataplaneError> {
    let set = || {
        const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
        let failed = |error| DataplaneError::Namespace {
            path: namespace.map_or("(this process's)".into(), |p| p.display().to_string()),
            error,
        };
        if std::fs::read_to_string(PATH).map_err(failed)?.trim() != "1" {
            std::fs::write(PATH, "1").map_err(failed)?;
        }
        Ok(())
    };
    match namespace {
        Some(namespace) => crate::namespace::on_thread_in(namespace, set),
        None => set(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nat_table_replaces_itself_and_translates_each_network() {
        let router = Router {
            id: 7,
            namespace: PathBuf::from("/run/netns/r"),
            networks: vec![RouterNetwork {
                vni: 4096,
                network: "10.0.0.0".parse().unwrap(),
                prefix_len: 24,
                gateway: "10.0.0.1".parse().unwrap(),
                mtu: 1450,
                mac: None,
            }],
            external: Some(External::Bridge(ExternalPort {
                bridge: "br-ex".into(),
                address: "203.0.113.2".parse().unwrap(),
                prefix_len: 24,
                gateway: "203.0.113.1".parse().unwrap(),
                mtu: 1500,
                mac: None,
            })),
            floating: vec![(
                "203.0.113.10".parse().unwrap(),
                "10.0.0.50".parse().unwrap(),
            )],
            routes: Vec::new(),
        };
        assert_eq!(
            nat_rules(&router),
            "table ip flotilla-router {}\ndelete table ip flotilla-router\ntable ip flotilla-router {\n  \
             chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    \
             iifname \"qg-7\" ip daddr 203.0.113.10 dnat to 10.0.0.50\n  }\n  \
             chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"qg-7\" ip saddr 10.0.0.50 snat to 203.0.113.10\n    \
             oifname \"qg-7\" ip saddr 10.0.0.0/24 snat to 203.0.113.2\n  }\n}\n"
        );
    }
}

#[cfg(test)]
mod uplink_tests {
    use super::*;

    #[test]
    fn an_uplink_router_translates_to_its_link_address_and_carries_no_floating_ip() {
        let router = Router {
            id: 9,
            namespace: PathBuf::from("/run/netns/r"),
            networks: vec![RouterNetwork {
                vni: 4097,
                network: "10.1.0.0".parse().unwrap(),
                prefix_len: 24,
                gateway: "10.1.0.1".parse().unwrap(),
                mtu: 1450,
                mac: None,
            }],
            external: Some(External::Uplink("169.254.64.7".parse().unwrap())),
            floating: vec![("203.0.113.10".parse().unwrap(), "10.1.0.5".parse().unwrap())],
            routes: Vec::new(),
        };
        let rules = nat_rules(&router);
        assert!(rules.contains("oifname \"qg-9\" ip saddr 10.1.0.0/24 snat to 169.254.64.7\n"));
        assert!(!rules.contains("203.0.113.10"), "{rules}");
        assert!(uplink_nat_rules(true)
            .contains("ip saddr 169.254.64.0/18 oifname != \"fg-*\" masquerade"));
        assert!(!uplink_nat_rules(false).contains("masquerade"));
    }
}
