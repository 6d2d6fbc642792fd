//! `cpi.json`: where the Flotilla API is, who the CPI is there, and the agent defaults every
//! VM's settings carry.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub flotilla: FlotillaConfig,
    /// The BOSH agent's settings defaults: `mbus`, `ntp`, `blobstore` (as the director's
    /// manifest gives them).
    #[serde(default)]
    pub agent: AgentDefaults,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlotillaConfig {
    /// API server URLs, tried in order (replicas).
    pub api_urls: Vec<String>,
    /// PEM of the CA that signed the API server's certificate (absent: the system's CAs).
    #[serde(default)]
    pub ca_cert: Option<String>,
    /// A service account's token (`flotilla token create SA`).
    pub token: String,
    /// The project the CPI's VMs, disks, stemcells and snapshots live in.
    #[serde(default = "default_project")]
    pub project: String,
    /// The StoragePool of persistent disks without a `pool` cloud property.
    #[serde(default = "default_pool")]
    pub default_pool: String,
    /// How long a call waits for Flotilla to carry out what it asked (seconds).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

#[derive(Debug, Default, Deserialize)]
pub struct AgentDefaults {
    #[serde(default)]
    pub mbus: Option<String>,
    #[serde(default)]
    pub ntp: Vec<String>,
    #[serde(default)]
    pub blobstore: Option<Value>,
}

fn default_project() -> String {
    "default".into()
}

fn default_pool() -> String {
    "default".into()
}

fn default_timeout() -> u64 {
    600
}

impl Config {
    /// Reads and checks `cpi.json`.
    pub fn load(path: &std::path::Path) -> Result<Config, String> {
        let text = std::fs::read(path)
            .map_err(|e| format!("cannot read the CPI config {}: {e}", path.display()))?;
        let config: Config = serde_json::from_slice(&text)
            .map_err(|e| format!("the CPI config {} is not valid: {e}", path.display()))?;
        if config.flotilla.api_urls.is_empty() {
            return Err(format!(
                "the CPI config {} names no flotilla.api_urls",
                path.display()
            ));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in the release (what cpi.json.erb renders) is a config the CPI takes.
    #[test]
    fn the_release_example_loads() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("release/example-cpi.json");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.flotilla.api_urls.len(), 2);
        assert_eq!(config.flotilla.project, "bosh");
        assert!(config.agent.mbus.unwrap().starts_with("nats://"));
        let dir = tempfile::tempdir().unwrap();
        let typo = dir.path().join("cpi.json");
        std::fs::write(
            &typo,
            r#"{"flotilla": {"api_urls": ["https://a"], "token": "t", "projcet": "x"}}"#,
        )
        .unwrap();
        let refused = Config::load(&typo).unwrap_err();
        assert!(refused.contains("projcet"), "{refused}");
    }
}
