//! The client configuration file (kubeconfig-style contexts), shared by the CLI, which reads it,
//! and the server, which writes `<data-dir>/admin.yaml` on first start.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Context {
    pub name: String,
    /// The API server's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// More server URLs (replicas), tried in order when one does not answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    /// PEM of the CA that signed the server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The project used when a command does not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Set by `flotilla login`: `token` is this login's ID token, refreshed when it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcLogin>,
}

/// A person's OIDC login, kept so that the CLI can refresh its token without asking again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OidcLogin {
    pub issuer: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// Kept secret like the token (the file is 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// When the ID token expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<String>,
}

impl Context {
    pub fn urls(&self) -> Vec<String> {
        self.server
            .iter()
            .chain(self.servers.iter())
            .cloned()
            .collect()
    }
}

impl ClientConfig {
    /// The context named `name`, or the current one, or the only one.
    pub fn context(&self, name: Option<&str>) -> Option<&Context> {
        let wanted = name.or(self.current_context.as_deref());
        match wanted {
            Some(n) => self.contexts.iter().find(|c| c.name == n),
            None if self.contexts.len() == 1 => self.contexts.first(),
            None => None,
        }
    }
}
