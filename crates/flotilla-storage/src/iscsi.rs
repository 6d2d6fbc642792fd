//! An iSCSI pool: the LUNs of one target, which every node reaches and QEMU opens itself
//! (libiscsi, package `qemu-block-extra`) — no kernel initiator. Flotilla does not make LUNs
//! (that is the target's administrator's, or an array's API); a volume is one LUN, sized on the
//! target. Listed with `iscsi-ls` (package `libiscsi-bin`), sized, written and zeroed through
//! QEMU's tools.

use crate::{Format, StorageError};

/// Where a target is and who the nodes are to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IscsiConfig {
    /// `host` or `host:port`.
    pub portal: String,
    /// The target's IQN.
    pub target: String,
    /// The initiator name to log in as (absent: the tools' defaults).
    pub initiator: Option<String>,
}

/// One LUN of the target that can hold data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lun {
    pub number: u32,
    pub size: u64,
}

#[derive(Clone, Debug)]
pub struct IscsiPool {
    config: IscsiConfig,
}

fn plain(value: &str, extra: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= 255
        && !value.starts_with('-')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b) || extra.contains(&b))
}

impl IscsiPool {
    /// Checks the configuration (plain names: they reach QEMU's option syntax); contacts nothing.
    pub fn new(config: IscsiConfig) -> Result<Self, StorageError> {
        let ok = plain(&config.portal, b"[]")
            && plain(&config.target, b"_")
            && config.initiator.as_deref().is_none_or(|i| plain(i, b"_"));
        if !ok {
            return Err(StorageError::Unusable {
                path: config.target.clone(),
                message: "the portal, target and initiator must be plain names".into(),
            });
        }
        Ok(IscsiPool { config })
    }

    pub fn config(&self) -> &IscsiConfig {
        &self.config
    }

    /// The portal with its port.
    pub fn portal(&self) -> String {
        let p = &self.config.portal;
        let has_port = match p.rsplit_once(':') {
            Some((host, port)) => {
                port.bytes().all(|b| b.is_ascii_digit())
                    && (!host.contains(':') || host.ends_with(']'))
            }
            None => false,
        };
        if has_port {
            p.clone()
        } else {
            format!("{p}:3260")
        }
    }

    /// QEMU's options for LUN `lun` as a raw block device (for `--image-opts`).
    pub fn image_opts(&self, lun: u32) -> String {
        let mut opts = format!(
            "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal={},file.target={},file.lun={lun}",
            self.portal(),
            self.config.target
        );
        if let Some(initiator) = &self.config.initiator {
            opts.push_str(&format!(",file.initiator-name={initiator}"));
        }
        opts
    }

    /// The LUNs that hold data (not the controller LUN), with their sizes.
    pub async fn luns(&self) -> Result<Vec<Lun>, StorageError> {
        let mut cmd = tokio::process::Command::new("iscsi-ls");
        cmd.arg("-s");
        if let Some(initiator) = &self.config.initiator {
            cmd.args(["-i", initiator]);
        }
        let url = format!("iscsi://{}/", self.portal());
        let out = run(cmd.arg(&url), "iscsi-ls").await?;
        let mut luns = Vec::new();
        let (mut in_target, mut found) = (false, false);
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("Target:") {
                let name = rest.split_whitespace().next().unwrap_or_default();
                in_target = name == self.config.target;
                found |= in_target;
                continue;
            }
            let Some(rest) = line.trim().strip_prefix("Lun:") else {
                continue;
            };
            let mut parts = rest.split_whitespace();
            let number = parts.next().and_then(|n| n.parse::<u32>().ok());
            if let (true, Some(number), true) = (in_target, number, rest.contains("DIRECT_ACCESS"))
            {
                luns.push(Lun {
                    number,
                    size: self.size(number).await?,
                });
            }
        }
        if !found {
            return Err(StorageError::Unusable {
                path: url,
                message: format!("the portal offers no target {}", self.config.target),
            });
        }
        Ok(luns)
    }

    /// LUN `lun`'s size in bytes.
    pub async fn size(&self, lun: u32) -> Result<u64, StorageError> {
        let mut cmd = tokio::process::Command::new("qemu-img");
        cmd.args(["info", "--output", "json", "--image-opts"])
            .arg(self.image_opts(lun));
        let out = run(&mut cmd, "qemu-img info").await?;
        let info: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| StorageError::Command {
                command: "qemu-img info".into(),
                message: format!("unreadable answer: {e}"),
            })?;
        Ok(info["virtual-size"].as_u64().unwrap_or(0))
    }

    /// Writes every byte of a local file into LUN `lun` (at least as large).
    pub async fn write(
        &self,
        lun: u32,
        from: &std::path::Path,
        format: Format,
    ) -> Result<(), StorageError> {
        let mut cmd = tokio::process::Command::new("qemu-img");
        cmd.args(["convert", "-q", "-n", "-f", format.as_str()])
            .arg(from)
            .args(["--target-image-opts"])
            .arg(self.image_opts(lun));
        run(&mut cmd, "qemu-img convert").await.map(drop)
    }

    /// Zeroes LUN `lun` (unmapping where the target can), so that whoever is given it next
    /// reads nothing of what it held.
    pub async fn zero(&self, lun: u32) -> Result<(), StorageError> {
        let size = self.size(lun).await?;
        let mut cmd = tokio::process::Command::new("qemu-io");
        cmd.args(["-c", &format!("write -z -u 0 {size}"), "--image-opts"])
            .arg(self.image_opts(lun));
        run(&mut cmd, "qemu-io write -z").await.map(drop)
    }
}

async fn run(cmd: &mut tokio::process::Command, what: &str) -> Result<String, StorageError> {
    let out = cmd
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| StorageError::Tool {
            program: what.split_whitespace().next().unwrap_or(what).into(),
            source,
        })?;
    if !out.status.success() {
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if message.is_empty() {
            message = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        return Err(StorageError::Command {
            command: what.into(),
            message,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portals_get_the_default_port_and_names_stay_plain() {
        let pool = |portal: &str| {
            IscsiPool::new(IscsiConfig {
                portal: portal.into(),
                target: "iqn.2026-12.dev.flotilla:t".into(),
                initiator: Some("iqn.2026-12.dev.flotilla:i".into()),
            })
        };
        assert_eq!(pool("10.0.0.1").unwrap().portal(), "10.0.0.1:3260");
        assert_eq!(pool("10.0.0.1:3261").unwrap().portal(), "10.0.0.1:3261");
        assert_eq!(pool("[fd00::1]").unwrap().portal(), "[fd00::1]:3260");
        assert_eq!(pool("[fd00::1]:3261").unwrap().portal(), "[fd00::1]:3261");
        assert_eq!(
            pool("10.0.0.1").unwrap().image_opts(3),
            "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=10.0.0.1:3260,file.target=iqn.2026-12.dev.flotilla:t,file.lun=3,file.initiator-name=iqn.2026-12.dev.flotilla:i"
        );
        for bad in ["10.0.0.1,file.driver=file", "-h", "a b", ""] {
            assert!(pool(bad).is_err(), "{bad:?} was taken");
        }
    }
}
