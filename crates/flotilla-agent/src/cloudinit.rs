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
