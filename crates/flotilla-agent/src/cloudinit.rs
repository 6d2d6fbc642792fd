//! The cloud-init NoCloud seed: an ISO9660 volume labelled `cidata` holding `meta-data`,
//! `user-data` and `network-config`.

use std::path::Path;

use crate::error::AgentError;

pub struct SeedInput<'a> {
    pub instance_id: &'a str,
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

/// `network-config` v2: DHCP on every NIC until static addressing lands with networks.
pub fn network_config() -> String {
    "version: 2\nethernets:\n  all:\n    match:\n      name: \"e*\"\n    dhcp4: true\n".to_string()
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
    let (meta, user, network) = (meta_data(input), user_data(input)?, network_config());
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
    fn meta_data_quotes_everything() {
        let m = meta_data(&SeedInput {
            instance_id: "a: b",
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
