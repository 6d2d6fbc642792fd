//! The CPI's methods on the Flotilla API: VMs are VirtualMachines, persistent disks Volumes,
//! snapshots VolumeSnapshots, stemcells Images, metadata labels. Nothing is kept here between
//! calls: every method reads what Flotilla has, so every method may be called again.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_client::{Client, ClientError, ListParams};
use flotilla_types::registry::{lookup, KindInfo};
use serde_json::{json, Value};

use crate::config::Config;
use crate::protocol::{Arguments, CpiError};

/// The label every object the CPI makes carries, and the prefix of the director's metadata.
pub const MANAGED_BY: &str = "bosh.flotilla.dev/managed-by";
pub const LABEL_PREFIX: &str = "bosh.flotilla.dev/";
/// The label on a VM's other objects (floating IPs, ephemeral disk) naming the VM.
pub const VM_LABEL: &str = "bosh.flotilla.dev/vm";

pub struct Cloud {
    pub(crate) client: Client,
    pub(crate) config: Config,
    log: Mutex<String>,
}

pub(crate) fn kind(name: &str) -> &'static KindInfo {
    lookup(name).expect("a registered kind")
}

/// An API failure as the director should see it: unreachable or a server error may be
/// retried; a refusal says what Flotilla said.
pub(crate) fn api(what: &str, e: ClientError) -> CpiError {
    let ok_to_retry = match e.code() {
        None => true,
        Some(code) => code >= 500 || code == 409 || code == 429,
    };
    CpiError::Cloud {
        message: format!("{what}: {e}"),
        ok_to_retry,
    }
}

fn not_found(e: &ClientError) -> bool {
    e.code() == Some(404)
}

/// A name: `prefix` and random hex.
pub(crate) fn new_name(prefix: &str, hex_len: usize) -> String {
    let bytes: Vec<u8> = (0..hex_len.div_ceil(2)).map(|_| rand::random()).collect();
    let mut hex = hex::encode(bytes);
    hex.truncate(hex_len);
    format!("{prefix}{hex}")
}

/// A label value from any text: at most 63 letters, digits, `-`, `_` or `.`, starting and
/// ending with a letter or digit (empty when nothing is left).
pub fn label_value(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '-',
        })
        .take(63)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// The labels and annotations of the director's metadata: a sanitised label and the exact
/// value as an annotation, each under `bosh.flotilla.dev/`.
pub fn metadata_patch(metadata: &Value) -> Value {
    let (mut labels, mut annotations) = (serde_json::Map::new(), serde_json::Map::new());
    for (key, value) in metadata.as_object().into_iter().flatten() {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let name = label_value(key).to_lowercase();
        if name.is_empty() {
            continue;
        }
        labels.insert(format!("{LABEL_PREFIX}{name}"), json!(label_value(&text)));
        annotations.insert(format!("{LABEL_PREFIX}{name}"), json!(text));
    }
    json!({"metadata": {"labels": labels, "annotations": annotations}})
}

impl Cloud {
    pub fn new(config: Config) -> Result<Cloud, CpiError> {
        let client = Client::new(
            config.flotilla.api_urls.clone(),
            config.flotilla.ca_cert.as_deref(),
            Some(config.flotilla.token.clone()),
        )
        .map_err(|e| CpiError::Cpi(format!("the CPI config: {e}")))?;
        Ok(Cloud {
            client,
            config,
            log: Mutex::new(String::new()),
        })
    }

    /// Notes a step: in the response's `log` and on stderr.
    pub(crate) fn note(&self, line: impl AsRef<str>) {
        eprintln!("{}", line.as_ref());
        let mut log = self.log.lock().expect("log lock");
        log.push_str(line.as_ref());
        log.push('\n');
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    pub(crate) fn project(&self) -> &str {
        &self.config.flotilla.project
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.flotilla.timeout_seconds)
    }

    /// Object `name` of `kind`, or None when there is none.
    pub(crate) async fn find(
        &self,
        kind_name: &str,
        name: &str,
    ) -> Result<Option<Value>, CpiError> {
        match self
            .client
            .get(kind(kind_name), Some(self.project()), name)
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(api(&format!("reading {kind_name} {name}"), e)),
        }
    }

    /// Deletes object `name` of `kind`; one that is not there is fine.
    pub(crate) async fn remove(&self, kind_name: &str, name: &str) -> Result<(), CpiError> {
        match self
            .client
            .delete(kind(kind_name), Some(self.project()), name)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(api(&format!("deleting {kind_name} {name}"), e)),
        }
    }

    /// Deletes object `name` of `kind` and waits until it is gone (its finalizers done: its
    /// node has freed what it held). One not there is deleted.
    pub(crate) async fn remove_and_wait(
        &self,
        kind_name: &str,
        name: &str,
    ) -> Result<(), CpiError> {
        self.remove(kind_name, name).await?;
        let what = format!("{kind_name} {name} is deleted");
        self.wait(kind_name, name, &what, |o| o.is_none().then_some(Ok(())))
            .await
    }

    /// Reads `name` until `done` says how it ended (it sees None once the object is gone), or
    /// the configured timeout passes (a retryable CloudError saying what was awaited).
    pub(crate) async fn wait<T>(
        &self,
        kind_name: &str,
        name: &str,
        what: &str,
        mut done: impl FnMut(Option<&Value>) -> Option<Result<T, CpiError>>,
    ) -> Result<T, CpiError> {
        let deadline = Instant::now() + self.timeout();
        loop {
            let object = self.find(kind_name, name).await?;
            if let Some(outcome) = done(object.as_ref()) {
                return outcome;
            }
            if Instant::now() > deadline {
                let status = object.as_ref().map(|o| o["status"].to_string());
                return Err(CpiError::Cloud {
                    message: format!(
                        "timed out after {} s waiting until {what} (its status: {})",
                        self.timeout().as_secs(),
                        status.unwrap_or_else(|| "gone".into())
                    ),
                    ok_to_retry: true,
                });
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Changes object `name` with `change` (read, changed, written back at that version; again
    /// when something else wrote in between). None from `change`: nothing to write.
    pub(crate) async fn update(
        &self,
        kind_name: &str,
        name: &str,
        mut change: impl FnMut(&mut Value) -> Result<bool, CpiError>,
    ) -> Result<Option<Value>, CpiError> {
        for _ in 0..10 {
            let Some(mut object) = self.find(kind_name, name).await? else {
                return Ok(None);
            };
            if !change(&mut object)? {
                return Ok(Some(object));
            }
            match self
                .client
                .replace(kind(kind_name), Some(self.project()), name, &object)
                .await
            {
                Ok(v) => return Ok(Some(v)),
                Err(e) if e.code() == Some(409) => continue,
                Err(e) if not_found(&e) => return Ok(None),
                Err(e) => return Err(api(&format!("updating {kind_name} {name}"), e)),
            }
        }
        Err(CpiError::Cloud {
            message: format!("{kind_name} {name} kept changing while it was updated"),
            ok_to_retry: true,
        })
    }

    /// Lists a kind's objects with `selector`.
    pub(crate) async fn list(
        &self,
        kind_name: &str,
        selector: &str,
    ) -> Result<Vec<Value>, CpiError> {
        let params = ListParams {
            label_selector: Some(selector.to_string()),
            ..Default::default()
        };
        let list = self
            .client
            .list(kind(kind_name), Some(self.project()), &params)
            .await
            .map_err(|e| api(&format!("listing {kind_name}"), e))?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// `calculate_vm_cloud_properties`: the cloud properties of a VM of `cpu` CPUs, `ram` MiB
    /// and an ephemeral disk of `ephemeral_disk_size` MiB.
    pub fn calculate_vm_cloud_properties(args: &Arguments<'_>) -> Result<Value, CpiError> {
        let wanted = args.object(0, "the VM's requirements", false)?;
        let number = |key: &str| {
            wanted[key].as_u64().ok_or_else(|| {
                CpiError::Cpi(format!(
                    "Arguments are not correct: calculate_vm_cloud_properties needs {key} (a whole number)"
                ))
            })
        };
        Ok(json!({
            "cpus": number("cpu")?,
            "memory": number("ram")?,
            "ephemeral_disk": {"size": number("ephemeral_disk_size")?},
        }))
    }

    /// `set_vm_metadata` and `set_disk_metadata`: the director's metadata as labels.
    pub async fn set_metadata(
        &self,
        kind_name: &str,
        name: &str,
        metadata: &Value,
    ) -> Result<(), CpiError> {
        let patch = metadata_patch(metadata);
        match self
            .client
            .patch(kind(kind_name), Some(self.project()), name, &patch, false)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e) => Err(match kind_name {
                "vm" => CpiError::VmNotFound(format!("VM {name} not found")),
                _ => CpiError::DiskNotFound(format!("disk {name} not found")),
            }),
            Err(e) => Err(api(&format!("labelling {kind_name} {name}"), e)),
        }
    }
}

/// The labels of an object the CPI makes, with more.
pub(crate) fn labels(more: &[(&str, &str)]) -> Value {
    let mut map: BTreeMap<String, String> = more
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    map.insert(MANAGED_BY.into(), "bosh-cpi".into());
    json!(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_becomes_valid_labels_and_exact_annotations() {
        let patch = metadata_patch(&json!({
            "director": "my director", "deployment": "cf", "index": 0,
            "created_at": "2026-12-02T10:00:00Z", "name": "router/0f1e-2d3c",
            "long": "x".repeat(100), "!!": "dropped",
        }));
        let labels = &patch["metadata"]["labels"];
        assert_eq!(labels["bosh.flotilla.dev/director"], "my-director");
        assert_eq!(labels["bosh.flotilla.dev/index"], "0");
        assert_eq!(labels["bosh.flotilla.dev/name"], "router-0f1e-2d3c");
        assert_eq!(
            labels["bosh.flotilla.dev/created_at"],
            "2026-12-02T10-00-00Z"
        );
        assert_eq!(labels["bosh.flotilla.dev/long"].as_str().unwrap().len(), 63);
        assert_eq!(
            patch["metadata"]["annotations"]["bosh.flotilla.dev/name"],
            "router/0f1e-2d3c"
        );
        assert!(labels.get("bosh.flotilla.dev/").is_none());
    }

    #[test]
    fn names_fit_the_virtio_serial() {
        let disk = new_name("disk", 16);
        assert_eq!(disk.len(), 20);
        assert!(disk.chars().all(|c| c.is_ascii_alphanumeric()), "{disk}");
    }
}
