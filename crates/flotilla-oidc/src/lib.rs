//! OpenID Connect for Flotilla. The server verifies tokens ([`verify`]); the CLI obtains and
//! refreshes them ([`login`]). Both discover the issuer from
//! `<issuer>/.well-known/openid-configuration`.

pub mod login;
pub mod verify;

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

pub use login::{LoginConfig, Tokens};
pub use verify::{Identity, Verifier, VerifierConfig};

/// Every exchange with the issuer is bounded by this.
pub const ISSUER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the token was refused: {0}")]
    Rejected(String),
    #[error("cannot reach the OIDC issuer at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the OIDC issuer answered {url} with {message}")]
    Issuer { url: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("the login did not finish: {0}")]
    Login(String),
}

/// What discovery tells about an issuer (the fields Flotilla uses).
#[derive(Clone, Debug, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
    #[serde(default)]
    pub code_challenge_methods_supported: Vec<String>,
}

/// An issuer must be https, except on loopback (a provider on the same machine, as in tests).
pub fn check_issuer_url(issuer: &str) -> Result<(), OidcError> {
    let url = url::Url::parse(issuer)
        .map_err(|e| OidcError::Config(format!("the OIDC issuer {issuer:?} is not a URL: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(OidcError::Config(format!(
            "the OIDC issuer {issuer:?} must use https (plain http only on loopback)"
        ))),
    }
}

/// An HTTP client for the issuer: the system's CAs, plus `ca_pem` if given.
pub fn http_client(ca_pem: Option<&str>) -> Result<reqwest::Client, OidcError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(ISSUER_TIMEOUT)
        .connect_timeout(ISSUER_TIMEOUT)
        // Never follow the issuer somewhere else with a token in hand.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pem) = ca_pem {
        let cert = reqwest::Certificate::from_pem(pem.as_bytes())
            .map_err(|e| OidcError::Config(format!("the issuer's CA is not PEM: {e}")))?;
        builder = builder.add_root_certificate(cert);
    }
    builder
        .build()
        .map_err(|e| OidcError::Config(format!("cannot make an HTTP client: {e}")))
}

fn unreachable(url: &str, e: reqwest::Error) -> OidcError {
    OidcError::Unreachable {
        url: url.to_string(),
        message: e.to_string(),
    }
}

/// GETs JSON from the issuer.
pub(crate) async fn get_json<T: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> Result<T, OidcError> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| unreachable(url, e))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| unreachable(url, e))?;
    if !status.is_success() {
        return Err(OidcError::Issuer {
            url: url.to_string(),
            message: format!("HTTP {status}"),
        });
    }
    serde_json::from_slice(&body).map_err(|e| OidcError::Issuer {
        url: url.to_string(),
        message: format!("a document this client cannot read: {e}"),
    })
}

/// Reads the issuer's discovery document and checks it is the issuer's own.
pub async fn discover(http: &reqwest::Client, issuer: &str) -> Result<Discovery, OidcError> {
    let issuer = issuer.trim_end_matches('/');
    let url = format!("{issuer}/.well-known/openid-configuration");
    let d: Discovery = get_json(http, &url).await?;
    if d.issuer.trim_end_matches('/') != issuer {
        return Err(OidcError::Issuer {
            url,
            message: format!("a document for another issuer ({:?})", d.issuer),
        });
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_use_https_except_on_loopback() {
        for ok in [
            "https://id.example.com",
            "http://127.0.0.1:5556/dex",
            "http://localhost:8080",
            "http://[::1]:80",
        ] {
            assert!(check_issuer_url(ok).is_ok(), "{ok}");
        }
        for bad in ["http://id.example.com", "ftp://127.0.0.1", "id.example.com"] {
            assert!(check_issuer_url(bad).is_err(), "{bad}");
        }
    }
}
