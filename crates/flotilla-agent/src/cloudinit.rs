//! The cloud-init NoCloud seed: an ISO9660 volume labelled `cidata` holding `meta-data`,
//! `user-data` and `network-config`.

use std::path::Path;

use crate::error::AgentError;

pub struct SeedInput<'a> {
    pub instance_id: &'a str,
    pub nics: &'a [SeedNic],
    pub hostname: &'a str,
    pub ssh_authorized_keys: &'a [String],
    pub user_data: Option<&'a str>,
}

pub fn meta_data(input: &SeedInput<'_>) -> String {
    // YAML-quoted with serde so no value can break the document.
    let doc =
        serde_json::json!({"instance-id": input.instance_id, "local-hostname": input.hostname});
    serde_yaml::to_string(&doc).expect("serialises")
}

/// What the guest is told about one NIC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeedNic {
    /// The NIC's name in the VM's spec (the key of its entry).
    pub name: String,
    pub mac: String,
    /// Static addresses with their prefix (10.0.0.3/24); none: DHCP.
    pub addresses: Vec<String>,
    pub gateway: Option<String>,
    pub nameservers: Vec<String>,
    pub search: Option<String>,
    pub mtu: u32,
    /// Where the metadata service (169.254.169.254) is reached: the network's DHCP server.
    pub metadata_via: Option<String>,
}

/// `network-config` v2: each NIC matched by its MAC, with its static addresses, MTU and DNS (the
/// first NIC with a gateway carries the default route), or DHCP where IPAM gave no address.
/// A VM without NICs gets DHCP on every `e*` interface.
pub fn network_config(nics: &[SeedNic]) -> String {
    if nics.is_empty() {
        return "version: 2\nethernets:\n  all:\n    match:\n      name: \"e*\"\n    dhcp4: true\n"
            .to_string();
    }
    let mut ethernets = serde_json::Map::new();
    let mut routed = false;
    for nic in nics {
        let mut entry = serde_json::json!({"match": {"macaddress": nic.mac}, "mtu": nic.mtu});
        if nic.addresses.is_empty() {
            entry["dhcp4"] = true.into();
        } else {
            entry["dhcp4"] = false.into();
            entry["addresses"] = serde_json::json!(nic.addresses);
            let mut routes = Vec::new();
            if let Some(gateway) = nic.gateway.as_ref().filter(|_| !routed) {
                routes.push(serde_json::json!({"to": "0.0.0.0/0", "via": gateway}));
                routed = true;
            }
            if let Some(via) = &nic.metadata_via {
                routes.push(serde_json::json!({"to": "169.254.169.254/32", "via": via}));
            }
            if !routes.is_empty() {
                entry["routes"] = serde_json::json!(routes);
            }
            if !nic.nameservers.is_empty() {
                let mut dns = serde_json::json!({"addresses": nic.nameservers});
                if let Some(search) = &nic.search {
                    dns["search"] = serde_json::json!([search]);
                }
                entry["nameservers"] = dns;
            }
        }
        ethernets.insert(nic.name.clone(), entry);
    }
    // YAML written by serde: no value can break the document.
    serde_yaml::to_string(&serde_json::json!({"version": 2, "ethernets": ethernets}))
        .expect("serialises")
}

/// The user's data with the VM's SSH keys merged in: into the document itself when it is a
/// cloud-config, else as a MIME multipart message whose first part is a cloud-config.
pub fn user_data(input: &SeedInput<'_>) -> Result<String, AgentError> {
    let keys = input.ssh_authorized_keys;
    let given = input.user_data.unwrap_or_default();
    if given.trim().is_empty() || given.starts_with("#cloud-config") {
        let mut doc: serde_yaml::Value = if given.trim().is_empty() {
            serde_yaml::Value::Mapping(Default::default())
        } else {
            serde_yaml::from_str(given).map_err(|e| {
                AgentError::Config(format!("userData is not valid cloud-config YAML: {e}"))
            })?
        };
        if doc.is_null() {
            doc = serde_yaml::Value::Mapping(Default::default());
        }
        let map = doc
            .as_mapping_mut()
            .ok_or_else(|| AgentError::Config("userData cloud-config must be a mapping".into()))?;
        if !keys.is_empty() {
            let entry = map
                .entry("ssh_authorized_keys".into())
                .or_insert_with(|| serde_yaml::Value::Sequence(Vec::new()));
            if let Some(list) = entry.as_sequence_mut() {
                for k in keys {
                    if !list.iter().any(|v| v.as_str() == Some(k.as_str())) {
                        list.push(k.clone().into());
                    }
                }
            }
        }
        return Ok(format!(
            "#cloud-config\n{}",
            serde_yaml::to_string(&doc).expect("serialises")
        ));
    }
    let content_type = if given.starts_with("#!") {
        "text/x-shellscript"
    } else if given.starts_with("#cloud-boothook") {
        "text/cloud-boothook"
    } else if given.starts_with("#include") {
        "text/x-include-url"
    } else {
        "text/plain"
    };
    let keys_doc = serde_yaml::to_string(&serde_json::json!({"ssh_authorized_keys": keys}))
        .expect("serialises");
    let boundary = format!("==flotilla-{}==", hex::encode(rand::random::<[u8; 8]>()));
    Ok(format!(
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n\
         --{boundary}\nContent-Type: text/cloud-config; charset=\"utf-8\"\nMIME-Version: 1.0\n\n#cloud-config\n{keys_doc}\n\
         --{boundary}\nContent-Type: {content_type}; charset=\"utf-8\"\nMIME-Version: 1.0\n\n{given}\n\
         --{boundary}--\n"
    ))
}

/// The files of an OpenStack config drive (label `config-2`), as Nova writes them: OpenStack's
/// `meta_data.json`, `network_data.json` and `user_data`, and EC2's `meta-data.json` and
/// `user-data`, under `latest/`. The user data goes as given (BOSH's agent reads its settings
/// JSON from `ec2/latest/user-data`; cloud-init's ConfigDrive source reads both); the SSH keys
/// are in the meta data, where both look for them.
pub fn config_drive(input: &SeedInput<'_>) -> Vec<(&'static str, Vec<u8>)> {
    use serde_json::json;
    let keys: Vec<(String, &String)> = input
        .ssh_authorized_keys
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("key-{i}"), k))
        .collect();
    let openstack_meta = json!({
        "uuid": input.instance_id,
        "name": input.hostname,
        "hostname": input.hostname,
        "launch_index": 0,
        "availability_zone": "flotilla",
        "public_keys": keys.iter().map(|(n, k)| (n.clone(), json!(k))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "keys": keys.iter().map(|(n, k)| json!({"name": n, "type": "ssh", "data": k})).collect::<Vec<_>>(),
        "meta": {},
    });
    let first_ip = input
        .nics
        .iter()
        .find_map(|n| n.addresses.first())
        .and_then(|a| a.split('/').next());
    let mut ec2_meta = json!({
        "instance-id": input.instance_id,
        "hostname": input.hostname,
        "local-hostname": input.hostname,
        "public-keys": keys.iter().enumerate()
            .map(|(i, (_, k))| (i.to_string(), json!({"openssh-key": k})))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
        "placement": {"availability-zone": "flotilla"},
    });
    if let Some(ip) = first_ip {
        ec2_meta["local-ipv4"] = ip.into();
    }
    let mut files = vec![
        (
            "ec2/latest/meta-data.json",
            ec2_meta.to_string().into_bytes(),
        ),
        (
            "openstack/latest/meta_data.json",
            openstack_meta.to_string().into_bytes(),
        ),
        (
            "openstack/latest/network_data.json",
            network_data(input.nics).to_string().into_bytes(),
        ),
    ];
    if let Some(data) = input.user_data {
        files.push(("ec2/latest/user-data", data.as_bytes().to_vec()));
        files.push(("openstack/latest/user_data", data.as_bytes().to_vec()));
    }
    files
}

/// OpenStack's `network_data.json`: each NIC by MAC with its MTU, its static address (with the
/// gateway as the default route on the first NIC that has one) or DHCP, and the DNS servers.
pub fn network_data(nics: &[SeedNic]) -> serde_json::Value {
    use serde_json::json;
    let (mut links, mut networks, mut services) = (Vec::new(), Vec::new(), Vec::new());
    let mut routed = false;
    for nic in nics {
        links.push(
            json!({"id": nic.name, "type": "phy", "ethernet_mac_address": nic.mac, "mtu": nic.mtu}),
        );
        let Some((ip, prefix)) = nic.addresses.first().and_then(|a| a.split_once('/')) else {
            networks.push(
                json!({"id": format!("{}-ipv4", nic.name), "link": nic.name, "type": "ipv4_dhcp"}),
            );
            continue;
        };
        let bits = prefix.parse::<u32>().unwrap_or(32).min(32);
        let mask = std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0));
        let mut network = json!({
            "id": format!("{}-ipv4", nic.name), "link": nic.name, "type": "ipv4",
            "ip_address": ip, "netmask": mask.to_string(), "routes": [],
        });
        if let Some(gateway) = nic.gateway.as_ref().filter(|_| !routed) {
            network["routes"] =
                json!([{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": gateway}]);
            routed = true;
        }
        networks.push(network);
        for dns in &nic.nameservers {
            if !services.contains(&json!({"type": "dns", "address": dns})) {
                services.push(json!({"type": "dns", "address": dns}));
            }
        }
    }
    json!({"links": links, "networks": networks, "services": services})
}

/// Writes a config drive (see [`config_drive`]) to `iso` (atomically and durably).
pub async fn write_config_drive(input: &SeedInput<'_>, iso: &Path) -> Result<(), AgentError> {
    let files = config_drive(input);
    let files: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    let image = crate::iso9660::image("config-2", &files, chrono::Utc::now());
    crate::datadir::write_file(iso, image, 0o644).await
}

/// Writes the seed ISO to `iso` (atomically and durably).
pub async fn write_seed(input: &SeedInput<'_>, iso: &Path) -> Result<(), AgentError> {
    let (meta, user, network) = (
        meta_data(input),
        user_data(input)?,
        network_config(input.nics),
    );
    let image = crate::iso9660::image(
        "cidata",
        &[
            ("meta-data", meta.as_bytes()),
            ("user-data", user.as_bytes()),
            ("network-config", network.as_bytes()),
        ],
        chrono::Utc::now(),
    );
    crate::datadir::write_file(iso, image, 0o644).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(keys: &'a [String], data: Option<&'a str>) -> SeedInput<'a> {
        SeedInput {
            instance_id: "uid-1",
            nics: &[],
            hostname: "web",
            ssh_authorized_keys: keys,
            user_data: data,
        }
    }

    #[test]
    fn keys_merge_into_a_cloud_config() {
        let keys = vec!["ssh-ed25519 AAAA k@h".to_string()];
        let out = user_data(&input(
            &keys,
            Some("#cloud-config\nruncmd: [echo hi]\nssh_authorized_keys: [ssh-rsa BBBB x@y]\n"),
        ))
        .unwrap();
        assert!(out.starts_with("#cloud-config\n"));
        let doc: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(doc["ssh_authorized_keys"].as_sequence().unwrap().len(), 2);
        assert_eq!(doc["runcmd"][0], "echo hi");
        let none = user_data(&input(&keys, None)).unwrap();
        assert!(none.contains("ssh-ed25519 AAAA k@h"));
    }

    #[test]
    fn a_config_drive_keeps_the_user_data_as_given_and_describes_each_nic() {
        let keys = vec!["ssh-ed25519 AAAA k@h".to_string()];
        let nics = [
            SeedNic {
                name: "nic0".into(),
                mac: "52:54:00:00:00:01".into(),
                addresses: vec!["10.0.0.5/24".into()],
                gateway: Some("10.0.0.1".into()),
                nameservers: vec!["10.0.0.2".into()],
                mtu: 1450,
                ..Default::default()
            },
            SeedNic {
                name: "nic1".into(),
                mac: "52:54:00:00:00:02".into(),
                mtu: 1450,
                ..Default::default()
            },
        ];
        let settings = r#"{"agent_id":"a","vm":{"name":"vm-1"}}"#;
        let mut seed = input(&keys, Some(settings));
        seed.nics = &nics;
        let files: std::collections::BTreeMap<_, _> = config_drive(&seed).into_iter().collect();
        let text = |name: &str| String::from_utf8(files[name].clone()).unwrap();
        let json = |name: &str| serde_json::from_str::<serde_json::Value>(&text(name)).unwrap();
        // The settings go as they are: no cloud-config merged into them.
        assert_eq!(text("ec2/latest/user-data"), settings);
        assert_eq!(text("openstack/latest/user_data"), settings);
        let ec2 = json("ec2/latest/meta-data.json");
        assert_eq!(ec2["instance-id"], "uid-1");
        assert_eq!(
            ec2["public-keys"]["0"]["openssh-key"],
            "ssh-ed25519 AAAA k@h"
        );
        assert_eq!(ec2["local-ipv4"], "10.0.0.5");
        assert_eq!(
            json("openstack/latest/meta_data.json")["public_keys"]["key-0"],
            "ssh-ed25519 AAAA k@h"
        );
        let net = json("openstack/latest/network_data.json");
        assert_eq!(net["links"][1]["ethernet_mac_address"], "52:54:00:00:00:02");
        assert_eq!(net["networks"][0]["netmask"], "255.255.255.0");
        assert_eq!(net["networks"][0]["routes"][0]["gateway"], "10.0.0.1");
        assert_eq!(net["networks"][1]["type"], "ipv4_dhcp");
        assert_eq!(
            net["services"],
            serde_json::json!([{"type": "dns", "address": "10.0.0.2"}])
        );
        // Without user data there is no user-data file (as Nova writes it).
        assert!(!config_drive(&input(&keys, None))
            .iter()
            .any(|(n, _)| n.ends_with("user-data")));
    }

    #[test]
    fn scripts_become_multipart() {
        let keys = vec!["ssh-ed25519 AAAA k@h".to_string()];
        let out = user_data(&input(&keys, Some("#!/bin/sh\necho hello\n"))).unwrap();
        assert!(out.starts_with("Content-Type: multipart/mixed"));
        assert!(
            out.contains("text/x-shellscript")
                && out.contains("text/cloud-config")
                && out.contains("echo hello")
        );
    }

    #[test]
    fn network_config_gives_each_nic_its_address_mtu_and_dns() {
        let nics = [
            SeedNic {
                name: "nic0".into(),
                mac: "02:46:4c:00:00:01".into(),
                addresses: vec!["10.0.0.3/24".into()],
                gateway: Some("10.0.0.1".into()),
                nameservers: vec!["10.0.0.2".into()],
                search: Some("back.default.flotilla.internal".into()),
                mtu: 1450,
                metadata_via: Some("10.0.0.2".into()),
            },
            SeedNic {
                name: "nic1".into(),
                mac: "02:46:4c:00:00:02".into(),
                addresses: vec!["10.1.0.3/24".into()],
                gateway: Some("10.1.0.1".into()),
                mtu: 1450,
                ..Default::default()
            },
            SeedNic {
                name: "lan".into(),
                mac: "52:54:00:00:00:03".into(),
                mtu: 1500,
                ..Default::default()
            },
        ];
        let doc: serde_yaml::Value = serde_yaml::from_str(&network_config(&nics)).unwrap();
        let doc = serde_json::to_value(doc).unwrap();
        assert_eq!(doc["version"], 2);
        let nic0 = &doc["ethernets"]["nic0"];
        assert_eq!(nic0["match"]["macaddress"], "02:46:4c:00:00:01");
        assert_eq!(nic0["addresses"], serde_json::json!(["10.0.0.3/24"]));
        assert_eq!(nic0["mtu"], 1450);
        assert_eq!(nic0["dhcp4"], false);
        assert_eq!(nic0["routes"][0]["via"], "10.0.0.1");
        // The metadata service through the network's DHCP server.
        assert_eq!(
            nic0["routes"][1],
            serde_json::json!({"to": "169.254.169.254/32", "via": "10.0.0.2"})
        );
        assert_eq!(nic0["nameservers"]["addresses"][0], "10.0.0.2");
        assert_eq!(
            nic0["nameservers"]["search"][0],
            "back.default.flotilla.internal"
        );
        // One default route: the first NIC with a gateway carries it.
        assert!(doc["ethernets"]["nic1"].get("routes").is_none());
        // No address from IPAM: DHCP.
        assert_eq!(doc["ethernets"]["lan"]["dhcp4"], true);
        // Without NICs, DHCP on every e* interface as before.
        assert!(network_config(&[]).contains("dhcp4: true"));
    }

    #[test]
    fn meta_data_quotes_everything() {
        let m = meta_data(&SeedInput {
            instance_id: "a: b",
            nics: &[],
            hostname: "web",
            ssh_authorized_keys: &[],
            user_data: None,
        });
        let doc: serde_yaml::Value = serde_yaml::from_str(&m).unwrap();
        assert_eq!(doc["instance-id"], "a: b");
        assert_eq!(doc["local-hostname"], "web");
    }

    #[test]
    fn invalid_cloud_config_is_reported() {
        assert!(user_data(&input(&[], Some("#cloud-config\n: [\n"))).is_err());
    }
}
