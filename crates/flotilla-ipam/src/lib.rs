//! IP address management for Flotilla networks, without I/O: IPv4 CIDRs and the addresses a
//! network keeps for itself, picking addresses ([`Held`]), the ports of a network (one per VM
//! NIC, by MAC), the cluster's VNI record, and stable MAC addresses.
//!
//! The server keeps one store key per port and per address and creates them, compared absent,
//! in the same transaction as the VM (and the VNI record by compare-and-swap in a Network's),
//! so no two writers, on any replica, can hand out one address, MAC or VNI twice, and a crash
//! cannot leave an allocation without its holder.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("{0:?} is not an IPv4 CIDR such as 10.0.0.0/24")]
    BadCidr(String),
    #[error("{cidr} has host bits set: the network is {network}")]
    HostBits { cidr: String, network: String },
    #[error("/{0} is outside /16 to /29: a network holds 6 to 65,534 addresses here")]
    PrefixLength(u8),
    #[error("{0:?} is not an IPv4 address")]
    BadAddress(String),
    #[error("{0:?} is not an IPv6 /64 prefix such as fd00:10::/64 (each NIC's address comes from its MAC, as SLAAC makes it)")]
    BadPrefix6(String),
    #[error("{ip} is not inside {cidr}")]
    Outside { ip: Ipv4Addr, cidr: Ipv4Cidr },
    #[error("{ip} is reserved in {cidr} ({what})")]
    Reserved {
        ip: Ipv4Addr,
        cidr: Ipv4Cidr,
        what: &'static str,
    },
    #[error("{ip} is already held by {holder}")]
    Taken { ip: Ipv4Addr, holder: String },
    #[error("MAC address {mac} is already used on this network by {holder}")]
    MacTaken { mac: String, holder: String },
    #[error("{start}-{end} is not a range inside {cidr} (start first)")]
    BadRange {
        start: Ipv4Addr,
        end: Ipv4Addr,
        cidr: Ipv4Cidr,
    },
    #[error("no address is free in {0}")]
    Exhausted(Ipv4Cidr),
    #[error("no VNI is free")]
    VnisExhausted,
}

/// An IPv4 network: its first address and prefix length (host bits zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

/// Shortest and longest prefixes a Flotilla network may have.
pub const MIN_PREFIX: u8 = 16;
pub const MAX_PREFIX: u8 = 29;

impl FromStr for Ipv4Cidr {
    type Err = IpamError;

    fn from_str(s: &str) -> Result<Self, IpamError> {
        let bad = || IpamError::BadCidr(s.to_string());
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = len.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(IpamError::PrefixLength(prefix));
        }
        let cidr = Ipv4Cidr {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        };
        if cidr.network != addr {
            return Err(IpamError::HostBits {
                cidr: s.to_string(),
                network: cidr.to_string(),
            });
        }
        Ok(cidr)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

impl Ipv4Cidr {
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// The netmask, e.g. 255.255.255.0.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    /// The `n`-th address after the network address (1: the first host).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + n)
    }

    /// Addresses between the network and broadcast addresses.
    pub fn host_count(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }
}

/// The addresses a network keeps for itself: the gateway (by default the first host) and the
/// DHCP/DNS server (the first host that is not the gateway); with the network and broadcast
/// addresses, no VM is given them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub cidr: Ipv4Cidr,
    pub gateway: Ipv4Addr,
    pub dhcp_server: Ipv4Addr,
    /// Where addresses are picked from when a NIC asks for none (inclusive ranges, e.g. the part
    /// of a LAN its own DHCP server leaves alone); empty: the whole subnet. A NIC may still ask
    /// for any assignable address of the subnet.
    pub pool: Vec<(Ipv4Addr, Ipv4Addr)>,
}

impl Subnet {
    /// The subnet of `cidr` with `gateway` (None: the first host), checked to be a host of it.
    pub fn new(cidr: Ipv4Cidr, gateway: Option<Ipv4Addr>) -> Result<Self, IpamError> {
        let gateway = gateway.unwrap_or_else(|| cidr.host(1));
        check_host(cidr, gateway)?;
        let dhcp_server = if gateway == cidr.host(1) {
            cidr.host(2)
        } else {
            cidr.host(1)
        };
        Ok(Subnet {
            cidr,
            gateway,
            dhcp_server,
            pool: Vec::new(),
        })
    }

    /// The same subnet picking addresses only from `ranges` (each inside it, start first).
    pub fn with_pool(mut self, ranges: Vec<(Ipv4Addr, Ipv4Addr)>) -> Result<Self, IpamError> {
        for (start, end) in &ranges {
            if start > end || !self.cidr.contains(*start) || !self.cidr.contains(*end) {
                return Err(IpamError::BadRange {
                    start: *start,
                    end: *end,
                    cidr: self.cidr,
                });
            }
        }
        self.pool = ranges;
        Ok(self)
    }

    /// Whether an address may be picked for a NIC that asks for none.
    pub fn in_pool(&self, ip: Ipv4Addr) -> bool {
        self.pool.is_empty() || self.pool.iter().any(|(a, b)| (*a..=*b).contains(&ip))
    }

    /// Why `ip` cannot be given to a VM, if it cannot (not counting who holds what).
    pub fn check_assignable(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        check_host(self.cidr, ip)?;
        let reserved = |what| IpamError::Reserved {
            ip,
            cidr: self.cidr,
            what,
        };
        if ip == self.gateway {
            return Err(reserved("the gateway"));
        }
        if ip == self.dhcp_server {
            return Err(reserved("the DHCP and DNS server"));
        }
        Ok(())
    }

    /// Addresses a VM may be given when it asks for none.
    pub fn assignable_count(&self) -> u32 {
        if self.pool.is_empty() {
            return self.cidr.host_count() - 2;
        }
        // The ranges merged, less the reserved addresses inside them.
        let mut ranges: Vec<(u32, u32)> = self
            .pool
            .iter()
            .map(|(a, b)| (u32::from(*a), u32::from(*b)))
            .collect();
        ranges.sort();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let size: u32 = merged.iter().map(|(a, b)| b - a + 1).sum();
        let reserved = [
            self.cidr.network(),
            self.cidr.broadcast(),
            self.gateway,
            self.dhcp_server,
        ]
        .into_iter()
        .filter(|ip| self.in_pool(*ip))
        .count() as u32;
        size - reserved
    }
}

fn check_host(cidr: Ipv4Cidr, ip: Ipv4Addr) -> Result<(), IpamError> {
    if !cidr.contains(ip) {
        return Err(IpamError::Outside { ip, cidr });
    }
    if ip == cidr.network() {
        return Err(IpamError::Reserved {
            ip,
            cidr,
            what: "the network address",
        });
    }
    if ip == cidr.broadcast() {
        return Err(IpamError::Reserved {
            ip,
            cidr,
            what: "the broadcast address",
        });
    }
    Ok(())
}

/// A network's IPv6 prefix: always a /64, because each NIC's address is derived from its MAC
/// (modified EUI-64, RFC 4291 appendix A), as SLAAC derives it. MACs are unique on a network,
/// so the addresses are too, without any record to allocate from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Prefix {
    network: Ipv6Addr,
}

impl FromStr for Ipv6Prefix {
    type Err = IpamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IpamError::BadPrefix6(s.to_string());
        let (address, length) = s.split_once('/').ok_or_else(bad)?;
        let network: Ipv6Addr = address.parse().map_err(|_| bad())?;
        if length != "64" || u128::from(network) & ((1u128 << 64) - 1) != 0 {
            return Err(bad());
        }
        Ok(Ipv6Prefix { network })
    }
}

impl fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/64", self.network)
    }
}

impl Ipv6Prefix {
    pub fn network(&self) -> Ipv6Addr {
        self.network
    }

    /// The address with interface identifier `n` (small numbers: the network's own services).
    pub fn host(&self, n: u64) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network) | u128::from(n))
    }

    /// The SLAAC (modified EUI-64) address of the NIC with `mac` (`aa:bb:cc:dd:ee:ff`).
    pub fn eui64(&self, mac: &str) -> Option<Ipv6Addr> {
        let bytes: Vec<u8> = mac
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).ok())
            .collect::<Option<_>>()?;
        let b: [u8; 6] = bytes.try_into().ok()?;
        let id = [b[0] ^ 0x02, b[1], b[2], 0xff, 0xfe, b[3], b[4], b[5]];
        Some(Ipv6Addr::from(
            u128::from(self.network) | u128::from(u64::from_be_bytes(id)),
        ))
    }
}

/// One VM NIC on a network, as its port record keeps it (one record per NIC, keyed by MAC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// The VM's uid: a port whose VM no longer exists is released.
    pub uid: String,
    /// The VM's name, for messages ("held by web").
    pub vm: String,
    /// The NIC's name on the VM.
    pub nic: String,
    /// Its address, when the network has IPAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
}

/// The addresses of a network known to be held, to pick from: the lowest free one, or a wanted
/// one checked. The store's per-address records decide in the end (a create compares each
/// address it takes as absent), so a stale view can only cost a retry, never a duplicate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    ips: BTreeSet<Ipv4Addr>,
    /// Every host number below this is held (or reserved): the search for the lowest free
    /// address starts here, so taking addresses one after another costs O(1) each.
    full_below: u32,
}

impl FromIterator<Ipv4Addr> for Held {
    fn from_iter<I: IntoIterator<Item = Ipv4Addr>>(ips: I) -> Self {
        Held {
            ips: ips.into_iter().collect(),
            full_below: 1,
        }
    }
}

impl Held {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.ips.contains(&ip)
    }

    /// Takes `want` (checked: assignable and not held) or the lowest free address.
    pub fn take(&mut self, subnet: &Subnet, want: Option<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
        let ip = match want {
            Some(ip) => {
                subnet.check_assignable(ip)?;
                if self.ips.contains(&ip) {
                    return Err(IpamError::Taken {
                        ip,
                        holder: "another NIC".into(),
                    });
                }
                ip
            }
            None => {
                let start = self.full_below.max(1);
                let n = (start..=subnet.cidr.host_count())
                    .find(|n| {
                        let ip = subnet.cidr.host(*n);
                        !self.ips.contains(&ip)
                            && subnet.in_pool(ip)
                            && subnet.check_assignable(ip).is_ok()
                    })
                    .ok_or(IpamError::Exhausted(subnet.cidr))?;
                self.full_below = n + 1;
                subnet.cidr.host(n)
            }
        };
        self.ips.insert(ip);
        Ok(ip)
    }

    pub fn release(&mut self, ip: Ipv4Addr, subnet: &Subnet) -> bool {
        let n = u32::from(ip).wrapping_sub(u32::from(subnet.cidr.network()));
        self.full_below = self.full_below.min(n);
        self.ips.remove(&ip)
    }
}

/// VXLAN network identifiers handed to overlay networks: from [`VNI_FIRST`] (lower ones are left
/// to the site) to the largest 24-bit value.
pub const VNI_FIRST: u32 = 4096;
pub const VNI_LAST: u32 = (1 << 24) - 1;

/// The cluster's VNI record: which network (by uid) holds which VNI.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vnis {
    pub held: BTreeMap<u32, String>,
}

impl Vnis {
    /// The lowest free VNI, now held by `network_uid`.
    pub fn take(&mut self, network_uid: &str) -> Result<u32, IpamError> {
        let mut vni = VNI_FIRST;
        for &held in self.held.keys() {
            if held > vni {
                break;
            }
            if held == vni {
                vni += 1;
            }
        }
        if vni > VNI_LAST {
            return Err(IpamError::VnisExhausted);
        }
        self.held.insert(vni, network_uid.to_string());
        Ok(vni)
    }

    /// Releases the VNI of `network_uid`; whether it held one.
    pub fn release(&mut self, network_uid: &str) -> bool {
        let before = self.held.len();
        self.held.retain(|_, uid| uid != network_uid);
        self.held.len() != before
    }
}

/// The prefix of generated MAC addresses: locally administered, unicast, `02:46:4c` ("FL").
pub const MAC_PREFIX: [u8; 3] = [0x02, 0x46, 0x4c];

/// A MAC address for the NIC `seed` names (e.g. the VM's uid and the NIC's name) that `taken`
/// does not hold: the same seed gives the same address unless it is taken.
pub fn generate_mac(seed: &str, taken: impl Fn(&str) -> bool) -> String {
    (0u32..)
        .map(|attempt| {
            let digest = Sha256::digest(format!("{seed}/{attempt}").as_bytes());
            format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                MAC_PREFIX[0], MAC_PREFIX[1], MAC_PREFIX[2], digest[0], digest[1], digest[2]
            )
        })
        .find(|mac| !taken(mac))
        .expect("a free MAC among 2^24")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn subnet(cidr: &str) -> Subnet {
        Subnet::new(cidr.parse().unwrap(), None).unwrap()
    }

    #[test]
    fn ipv6_addresses_are_what_slaac_makes_of_the_mac() {
        let prefix: Ipv6Prefix = "fd00:10::/64".parse().unwrap();
        // As the kernel derives it: 02:46:4c:00:00:03 -> 0046:4cff:fe00:0003.
        assert_eq!(
            prefix.eui64("02:46:4c:00:00:03"),
            Some("fd00:10::46:4cff:fe00:3".parse().unwrap())
        );
        assert_eq!(prefix.host(2), "fd00:10::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(prefix.to_string(), "fd00:10::/64");
        for bad in [
            "fd00:10::/48",
            "fd00:10::1/64",
            "fd00:10::",
            "10.0.0.0/64",
            "x/64",
        ] {
            assert!(
                matches!(bad.parse::<Ipv6Prefix>(), Err(IpamError::BadPrefix6(_))),
                "{bad}"
            );
        }
        assert_eq!(prefix.eui64("02:46:4c:00:00"), None);
    }

    #[test]
    fn a_pool_limits_what_is_picked_but_not_what_is_asked_for() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let lan = subnet("192.168.1.0/24")
            .with_pool(vec![
                (ip("192.168.1.200"), ip("192.168.1.202")),
                (ip("192.168.1.201"), ip("192.168.1.203")),
            ])
            .unwrap();
        // .200 to .203 merged: four addresses.
        assert_eq!(lan.assignable_count(), 4);
        let mut held = Held::default();
        let picked: Vec<Ipv4Addr> = (0..4).map(|_| held.take(&lan, None).unwrap()).collect();
        assert_eq!(
            picked,
            [
                "192.168.1.200",
                "192.168.1.201",
                "192.168.1.202",
                "192.168.1.203"
            ]
            .map(ip)
        );
        assert_eq!(held.take(&lan, None), Err(IpamError::Exhausted(lan.cidr)));
        assert_eq!(
            held.take(&lan, Some(ip("192.168.1.50"))),
            Ok(ip("192.168.1.50"))
        );
        // A range holding the gateway counts it out; a range outside or backwards is refused.
        let with_gateway = subnet("10.0.0.0/29")
            .with_pool(vec![(ip("10.0.0.1"), ip("10.0.0.4"))])
            .unwrap();
        assert_eq!(with_gateway.assignable_count(), 2);
        for (a, b) in [("10.0.1.1", "10.0.1.4"), ("10.0.0.4", "10.0.0.3")] {
            assert!(matches!(
                subnet("10.0.0.0/29").with_pool(vec![(ip(a), ip(b))]),
                Err(IpamError::BadRange { .. })
            ));
        }
    }

    #[test]
    fn cidrs_are_read_strictly() {
        let c: Ipv4Cidr = "10.1.0.0/24".parse().unwrap();
        assert_eq!(
            (c.broadcast(), c.host_count(), c.netmask()),
            (
                "10.1.0.255".parse().unwrap(),
                254,
                "255.255.255.0".parse().unwrap()
            )
        );
        assert_eq!(
            "10.1.0.5/24".parse::<Ipv4Cidr>().unwrap_err().to_string(),
            "10.1.0.5/24 has host bits set: the network is 10.1.0.0/24"
        );
        for bad in [
            "10.1.0.0",
            "10.1.0.0/",
            "10.1.0.0/33",
            "10.1.0/24",
            "x/24",
            "10.1.0.0/+4",
        ] {
            assert!(
                matches!(bad.parse::<Ipv4Cidr>(), Err(IpamError::BadCidr(_))),
                "{bad}"
            );
        }
        assert_eq!(
            "10.0.0.0/8".parse::<Ipv4Cidr>(),
            Err(IpamError::PrefixLength(8))
        );
        assert_eq!(
            "10.0.0.0/30".parse::<Ipv4Cidr>(),
            Err(IpamError::PrefixLength(30))
        );
    }

    #[test]
    fn reserved_addresses_are_never_given() {
        let s = subnet("192.168.7.0/29");
        assert_eq!(
            (s.gateway.to_string(), s.dhcp_server.to_string()),
            ("192.168.7.1".into(), "192.168.7.2".into())
        );
        let mut held = Held::default();
        let got: Vec<String> = (0..4)
            .map(|_| held.take(&s, None).unwrap().to_string())
            .collect();
        assert_eq!(
            got,
            ["192.168.7.3", "192.168.7.4", "192.168.7.5", "192.168.7.6"]
        );
        assert_eq!(held.take(&s, None), Err(IpamError::Exhausted(s.cidr)));
        for (ip, what) in [
            ("192.168.7.0", "network address"),
            ("192.168.7.1", "gateway"),
            ("192.168.7.2", "DHCP"),
            ("192.168.7.7", "broadcast"),
        ] {
            let e = held.take(&s, Some(ip.parse().unwrap())).unwrap_err();
            assert!(e.to_string().contains(what), "{ip}: {e}");
        }
        // A gateway elsewhere moves the DHCP server to the first host.
        let moved = Subnet::new(
            "10.0.0.0/24".parse().unwrap(),
            Some("10.0.0.254".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(moved.dhcp_server.to_string(), "10.0.0.1");
    }

    #[test]
    fn wanted_addresses_are_checked_and_released_ones_come_back() {
        let s = subnet("10.0.0.0/24");
        let mut held = Held::default();
        let fifty: Ipv4Addr = "10.0.0.50".parse().unwrap();
        assert_eq!(held.take(&s, Some(fifty)).unwrap(), fifty);
        assert!(matches!(
            held.take(&s, Some(fifty)),
            Err(IpamError::Taken { .. })
        ));
        let e = held
            .take(&s, Some("10.0.1.5".parse().unwrap()))
            .unwrap_err();
        assert_eq!(e.to_string(), "10.0.1.5 is not inside 10.0.0.0/24");
        assert_eq!(held.take(&s, None).unwrap().to_string(), "10.0.0.3");
        assert!(held.release("10.0.0.3".parse().unwrap(), &s));
        assert_eq!(held.take(&s, None).unwrap().to_string(), "10.0.0.3");
    }

    #[test]
    fn vnis_are_unique_and_reused_after_release() {
        let mut v = Vnis::default();
        assert_eq!(v.take("a").unwrap(), VNI_FIRST);
        assert_eq!(v.take("b").unwrap(), VNI_FIRST + 1);
        assert_eq!(v.take("c").unwrap(), VNI_FIRST + 2);
        assert!(v.release("b"));
        assert_eq!(v.take("d").unwrap(), VNI_FIRST + 1);
        assert_eq!(v.take("e").unwrap(), VNI_FIRST + 3);
    }

    #[test]
    fn macs_are_stable_local_unicast_and_avoid_taken_ones() {
        let first = generate_mac("uid-1/nic0", |_| false);
        assert_eq!(first, generate_mac("uid-1/nic0", |_| false));
        assert!(first.starts_with("02:46:4c:"), "{first}");
        let other = generate_mac("uid-1/nic0", |m| m == first);
        assert_ne!(other, first);
        assert!(other.starts_with("02:46:4c:"));
    }

    proptest! {
        /// Whatever sequence of takes and releases, no address is held twice, every address given
        /// is assignable, and an address picked is the lowest free one.
        #[test]
        fn no_address_is_ever_given_twice(ops in proptest::collection::vec((any::<bool>(), proptest::option::of(0u32..40)), 1..200)) {
            let s = subnet("10.9.0.0/27");
            let mut held = Held::default();
            let mut given: Vec<Ipv4Addr> = Vec::new();
            for (take, n) in ops {
                if take {
                    let want = n.map(|n| s.cidr.host(n % 32));
                    if let Ok(ip) = held.take(&s, want) {
                        prop_assert!(!given.contains(&ip), "{} given twice", ip);
                        prop_assert!(s.check_assignable(ip).is_ok());
                        if want.is_none() {
                            // The lowest free one: every assignable address below is held.
                            for n in 1..(u32::from(ip) - u32::from(s.cidr.network())) {
                                let lower = s.cidr.host(n);
                                prop_assert!(s.check_assignable(lower).is_err() || given.contains(&lower), "{} was free below {}", lower, ip);
                            }
                        }
                        given.push(ip);
                    }
                } else if let Some(n) = n {
                    if !given.is_empty() {
                        let ip = given.remove(n as usize % given.len());
                        prop_assert!(held.release(ip, &s));
                    }
                }
                prop_assert!(given.len() as u32 <= s.assignable_count());
            }
        }
    }
}
