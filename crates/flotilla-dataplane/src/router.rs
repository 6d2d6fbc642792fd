//! A router, Neutron's L3 agent layout: a network namespace joined to each overlay network it
//! serves by a port holding the network's gateway address (`fq-<vni>` on the network's bridge,
//! `qr-<vni>` inside: a network has at most one router) and to an external bridge by a port
//! holding its external address (`fg-<id>` / `qg-<id>`), with IPv4 forwarding on, a default
//! route to the external gateway, and its networks' traffic to the outside translated to its
//! external address (SNAT) by an nftables table of its own namespace, replaced in one batch.
//! Nothing here touches the host's ruleset: the table lives in the router's namespace.

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Router {
    /// Unique on the node (names its external port).
    pub id: u32,
    /// The router's namespace (`/run/netns/<name>`, made beforehand).
    pub namespace: PathBuf,
    pub networks: Vec<RouterNetwork>,
    pub external: Option<ExternalPort>,
    /// Floating IPs: (external address, the inside address it stands for). Traffic to the
    /// external address is sent to the inside one (DNAT); the inside one leaves as it (SNAT).
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
    for (public, private) in router.floating.iter().filter(|_| router.external.is_some()) {
        rules.push_str(&format!(
            "    iifname \"{outside}\" ip daddr {public} dnat to {private}\n"
        ));
    }
    rules.push_str("  }\n");
    rules.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    if let Some(external) = &router.external {
        for (public, private) in &router.floating {
            rules.push_str(&format!(
                "    oifname \"{outside}\" ip saddr {private} snat to {public}\n"
            ));
        }
        for network in &router.networks {
            rules.push_str(&format!(
                "    oifname \"{}\" ip saddr {}/{} snat to {}\n",
                outside, network.network, network.prefix_len, external.address
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
                    bridge: &bridge,
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
        if let Some(external) = &router.external {
            let (host, peer) = (external_port_name(router.id), external_peer_name(router.id));
            let netlink = self
                .ensure_namespace_port(&NamespacePort {
                    bridge: &external.bridge,
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
            set_forwarding(&router.namespace)?;
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

/// IPv4 forwarding on in `namespace` (sysctls under /proc/sys/net belong to the namespace of
/// whoever opens them).
fn set_forwarding(namespace: &Path) -> Result<(), DataplaneError> {
    crate::namespace::on_thread_in(namespace, || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|error| {
            DataplaneError::Namespace {
                path: namespace.display().to_string(),
                error,
            }
        })
    })
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
            external: Some(ExternalPort {
                bridge: "br-ex".into(),
                address: "203.0.113.2".parse().unwrap(),
                prefix_len: 24,
                gateway: "203.0.113.1".parse().unwrap(),
                mtu: 1500,
                mac: None,
            }),
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
