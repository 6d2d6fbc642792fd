//! SecurityGroup: a stateful firewall VM NICs belong to (project-scoped), as OpenStack's. A NIC
//! in groups may send and receive what one of its groups' rules allows, plus the answers to
//! that (connections are tracked); nothing else. Every project has a `default` group, made with
//! it: all egress, and ingress from the group's own members. NICs that name no groups are in it.

use std::net::Ipv4Addr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::Condition;
use crate::resource::Validate;
use crate::validation::FieldErrors;

/// The group every project has and NICs without `securityGroups` are in.
pub const DEFAULT_GROUP: &str = "default";

/// A port or an inclusive range of ports: `22`, `8000-8100`.
pub const PORTS_PATTERN: &str = r"^[0-9]{1,5}(-[0-9]{1,5})?$";
/// An IPv4 or IPv6 address or network (IPv6 in its hexadecimal forms; whether host bits are
/// zero, a pattern cannot say).
pub const IP_CIDR_PATTERN: &str = concat!(
    r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}(/([0-9]|[12][0-9]|3[0-2]))?",
    r"|(([0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}|([0-9a-fA-F]{1,4}:){1,7}:",
    r"|([0-9a-fA-F]{1,4}:){1,6}:[0-9a-fA-F]{1,4}|([0-9a-fA-F]{1,4}:){1,5}(:[0-9a-fA-F]{1,4}){1,2}",
    r"|([0-9a-fA-F]{1,4}:){1,4}(:[0-9a-fA-F]{1,4}){1,3}|([0-9a-fA-F]{1,4}:){1,3}(:[0-9a-fA-F]{1,4}){1,4}",
    r"|([0-9a-fA-F]{1,4}:){1,2}(:[0-9a-fA-F]{1,4}){1,5}|[0-9a-fA-F]{1,4}:(:[0-9a-fA-F]{1,4}){1,6}",
    r"|:((:[0-9a-fA-F]{1,4}){1,7}|:))(/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))?)$"
);
/// An IPv4 network (`10.0.0.0/8`, `0.0.0.0/0`) or address (`192.0.2.7`, read as a /32).
pub const IPV4_CIDR_PATTERN: &str = r"^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}(/([0-9]|[12][0-9]|3[0-2]))?$";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic to the NIC.
    #[default]
    Ingress,
    /// Traffic from the NIC.
    Egress,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    /// Every protocol, IPv4 and IPv6.
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// The other end of a rule: a network, or the NICs of a group (in the same project).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleRemote {
    /// An IPv4 or IPv6 network or address (`0.0.0.0/0`: all of IPv4, `::/0`: all of IPv6);
    /// the rule then covers that family only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "IP_CIDR_PATTERN")]
    pub cidr: Option<String>,
    /// A SecurityGroup of the project: the addresses of its members' NICs, followed as VMs come
    /// and go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "crate::validation::DNS_LABEL_PATTERN", length(max = 63))]
    pub security_group: Option<String>,
}

/// One allow rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroupRule {
    /// `ingress` (the default: to the NIC) or `egress` (from it).
    #[serde(default)]
    pub direction: Direction,
    /// `any` (the default), `tcp`, `udp` or `icmp` (ICMP for IPv4, ICMPv6 for IPv6).
    #[serde(default)]
    pub protocol: RuleProtocol,
    /// For tcp and udp: the destination port or range (`22`, `8000-8100`); absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "PORTS_PATTERN")]
    pub ports: Option<String>,
    /// Where the traffic comes from (ingress) or goes to (egress); absent: anywhere, in both
    /// IPv4 and IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RuleRemote>,
    /// What the rule is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroupSpec {
    /// What the group is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// What members may receive and send (allow rules; at most 500).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 500))]
    pub rules: Vec<SecurityGroupRule>,
}

/// A NIC in the group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroupMember {
    /// The VM.
    pub vm: String,
    /// Its NIC.
    pub nic: String,
    /// The NIC's addresses, IPv4 and IPv6 (and its allowed address pairs): what rules naming
    /// the group match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroupStatus {
    /// The NICs in the group, by VM and NIC name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<SecurityGroupMember>,
    /// How many NICs are in the group.
    #[serde(default)]
    pub member_count: u32,
    /// The group's conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Reads `22` or `8000-8100` into an inclusive range, when it is one (1 to 65535, start first).
pub fn parse_ports(ports: &str) -> Option<(u16, u16)> {
    let (a, b) = ports.split_once('-').unwrap_or((ports, ports));
    let (a, b): (u16, u16) = (a.parse().ok()?, b.parse().ok()?);
    (a >= 1 && a <= b).then_some((a, b))
}

/// Reads an IPv4 or IPv6 network or address (a /32 or /128) into its address and prefix
/// length, with host bits zero.
pub fn parse_ip_cidr(cidr: &str) -> Option<(std::net::IpAddr, u8)> {
    if let Some(v4) = parse_cidr(cidr) {
        return Some((v4.0.into(), v4.1));
    }
    let (address, len) = match cidr.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().ok()?),
        None => (cidr, 128),
    };
    let address: std::net::Ipv6Addr = address.parse().ok()?;
    if len > 128 {
        return None;
    }
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    (u128::from(address) & !mask == 0).then_some((address.into(), len))
}

/// Reads an IPv4 network or address (a /32) into its address and prefix length, with host bits
/// zero (`10.0.0.5/8` is refused: it is not the network it looks like).
pub fn parse_cidr(cidr: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, len) = match cidr.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().ok()?),
        None => (cidr, 32),
    };
    let address: Ipv4Addr = address.parse().ok()?;
    if len > 32 {
        return None;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(address) & !mask == 0).then_some((address, len))
}

impl Validate for SecurityGroupSpec {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        if self
            .description
            .as_ref()
            .is_some_and(|d| d.chars().count() > 1024)
        {
            errs.push(
                format!("{path}.description"),
                "must be at most 1024 characters",
            );
        }
        if self.rules.len() > 500 {
            errs.push(
                format!("{path}.rules"),
                format!("{} rules: at most 500", self.rules.len()),
            );
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("{path}.rules[{i}]");
            if let Some(ports) = &rule.ports {
                if !matches!(rule.protocol, RuleProtocol::Tcp | RuleProtocol::Udp) {
                    errs.push(
                        format!("{at}.ports"),
                        "only tcp and udp rules have ports; set protocol: tcp or udp",
                    );
                } else if parse_ports(ports).is_none() {
                    errs.push(
                        format!("{at}.ports"),
                        format!("{ports:?} is not a port (1 to 65535) or a range like 8000-8100"),
                    );
                }
            }
            if rule
                .description
                .as_ref()
                .is_some_and(|d| d.chars().count() > 256)
            {
                errs.push(
                    format!("{at}.description"),
                    "must be at most 256 characters",
                );
            }
            let Some(remote) = &rule.remote else {
                continue;
            };
            match (&remote.cidr, &remote.security_group) {
                (Some(_), Some(_)) | (None, None) => errs.push(
                    format!("{at}.remote"),
                    "name either a cidr or a securityGroup, not both and not neither",
                ),
                (Some(cidr), None) => {
                    if parse_ip_cidr(cidr).is_none() {
                        errs.push(
                            format!("{at}.remote.cidr"),
                            format!(
                                "{cidr:?} is not an IPv4 or IPv6 network with its host bits zero, e.g. 10.0.0.0/8, 192.0.2.7 or fd00:1::/64"
                            ),
                        );
                    }
                }
                (None, Some(group)) => {
                    if !crate::validation::is_dns_label(group) {
                        errs.push(
                            format!("{at}.remote.securityGroup"),
                            format!("{group:?} is not a group name (a DNS label)"),
                        );
                    }
                }
            }
        }
    }
}

impl Validate for SecurityGroupStatus {
    fn validate(&self, _: &str, _: &mut FieldErrors) {}
}

impl SecurityGroupSpec {
    /// The rules of a project's `default` group: all egress, ingress from the group's members.
    pub fn default_group() -> Self {
        SecurityGroupSpec {
            description: Some(
                "All egress; ingress only from NICs in this group (made with the project)".into(),
            ),
            rules: vec![
                SecurityGroupRule {
                    direction: Direction::Egress,
                    ..Default::default()
                },
                SecurityGroupRule {
                    direction: Direction::Ingress,
                    remote: Some(RuleRemote {
                        cidr: None,
                        security_group: Some(DEFAULT_GROUP.into()),
                    }),
                    ..Default::default()
                },
            ],
        }
    }
}

crate::define_kind! {
    /// A stateful firewall for VM NICs: allow rules by direction, protocol, ports and remote.
    SecurityGroup {
        spec: SecurityGroupSpec, spec_default: true,
        status: SecurityGroupStatus,
        plural: "securitygroups",
        singular: "securitygroup",
        short_names: ["sg"],
        namespaced: true,
        field_selectors: [],
        columns: [
            "MEMBERS" => "status.memberCount",
            "DESCRIPTION" => "spec.description"
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_cidrs_read_as_users_write_them() {
        assert_eq!(parse_ports("22"), Some((22, 22)));
        assert_eq!(parse_ports("8000-8100"), Some((8000, 8100)));
        for bad in ["0", "100-99", "65536", "1-", "-1", "a"] {
            assert_eq!(parse_ports(bad), None, "{bad}");
        }
        assert_eq!(parse_cidr("0.0.0.0/0"), Some((Ipv4Addr::UNSPECIFIED, 0)));
        assert_eq!(
            parse_cidr("192.0.2.7"),
            Some(("192.0.2.7".parse().unwrap(), 32))
        );
        for bad in ["10.0.0.5/8", "10.0.0.0/33", "10.0.0/8", "::/0"] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
        assert_eq!(
            parse_ip_cidr("fd00:1::/64"),
            Some(("fd00:1::".parse().unwrap(), 64))
        );
        assert_eq!(
            parse_ip_cidr("fd00::7"),
            Some(("fd00::7".parse().unwrap(), 128))
        );
        assert_eq!(
            parse_ip_cidr("10.0.0.0/8"),
            Some(("10.0.0.0".parse().unwrap(), 8))
        );
        for bad in ["fd00:1::1/64", "::/129", "fd00::g", "10.0.0.5/8"] {
            assert_eq!(parse_ip_cidr(bad), None, "{bad}");
        }
        let pattern = regex::Regex::new(IP_CIDR_PATTERN).unwrap();
        for good in [
            "10.0.0.0/8",
            "192.0.2.7",
            "fd00:1::/64",
            "::/0",
            "fe80::1",
            "1:2:3:4:5:6:7:8/128",
        ] {
            assert!(pattern.is_match(good), "{good}");
        }
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "1.2.3.4.5",
            ":::",
            "fd00::1::2",
            "g::1",
        ] {
            assert!(!pattern.is_match(bad), "{bad}");
        }
    }

    #[test]
    fn a_rule_names_one_remote_and_ports_only_for_tcp_and_udp() {
        let spec = SecurityGroupSpec {
            description: None,
            rules: vec![
                SecurityGroupRule {
                    protocol: RuleProtocol::Icmp,
                    ports: Some("22".into()),
                    ..Default::default()
                },
                SecurityGroupRule {
                    remote: Some(RuleRemote {
                        cidr: Some("10.0.0.0/8".into()),
                        security_group: Some("web".into()),
                    }),
                    ..Default::default()
                },
                SecurityGroupRule {
                    protocol: RuleProtocol::Tcp,
                    ports: Some("80-79".into()),
                    remote: Some(RuleRemote {
                        cidr: Some("10.1.2.3/8".into()),
                        security_group: None,
                    }),
                    ..Default::default()
                },
            ],
        };
        let mut errs = FieldErrors::default();
        spec.validate("spec", &mut errs);
        let fields: Vec<String> = errs.0.iter().map(|e| e.field.clone()).collect();
        assert_eq!(
            fields,
            [
                "spec.rules[0].ports",
                "spec.rules[1].remote",
                "spec.rules[2].ports",
                "spec.rules[2].remote.cidr"
            ]
        );
        let mut errs = FieldErrors::default();
        SecurityGroupSpec::default_group().validate("spec", &mut errs);
        assert!(errs.0.is_empty());
    }
}
