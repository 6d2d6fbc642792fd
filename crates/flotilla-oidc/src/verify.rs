//! The server's side: is this bearer token an ID token (or JWT access token) of the configured
//! issuer, for this API, and whose? The issuer is discovered once; its signing keys are cached
//! by `kid` and fetched again when a token names a `kid` not seen yet (at most once per
//! [`REFETCH_EVERY`], so a flood of made-up `kid`s cannot make the server hammer the issuer).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::{discover, http_client, Discovery, OidcError};

/// How far `exp` and `nbf` may be off (clocks drift).
pub const LEEWAY: Duration = Duration::from_secs(10);
/// Keys are fetched again for an unknown `kid` at most this often.
pub const REFETCH_EVERY: Duration = Duration::from_secs(10);

/// Signing algorithms accepted: asymmetric only (never `none`, never HMAC with a public key).
pub const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What the server is told about its issuer.
#[derive(Clone, Debug)]
pub struct VerifierConfig {
    /// The issuer's URL, exactly as tokens carry it in `iss`.
    pub issuer: String,
    /// This API's client ID at the issuer: tokens must name it in `aud`.
    pub client_id: String,
    /// The claim naming the user (`email` by default; `sub` is always unique).
    pub username_claim: String,
    /// The claim listing the user's groups (`groups` by default).
    pub groups_claim: String,
    /// PEM of a CA for the issuer's TLS certificate, besides the system's.
    pub ca_pem: Option<String>,
}

impl VerifierConfig {
    pub fn new(issuer: &str, client_id: &str) -> Self {
        VerifierConfig {
            issuer: issuer.trim_end_matches('/').to_string(),
            client_id: client_id.to_string(),
            username_claim: "email".into(),
            groups_claim: "groups".into(),
            ca_pem: None,
        }
    }
}

/// Who a verified token says the caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub username: String,
    pub groups: Vec<String>,
    /// When the token stops being valid.
    pub expires: chrono::DateTime<chrono::Utc>,
}

struct Keys {
    discovery: Option<Discovery>,
    by_kid: HashMap<String, DecodingKey>,
    fetched: Option<Instant>,
}

pub struct Verifier {
    config: VerifierConfig,
    http: reqwest::Client,
    keys: std::sync::Mutex<Keys>,
    /// Held while the keys are fetched: one fetch at a time.
    fetching: Mutex<()>,
}

/// Whether `token` looks like a JWT (three base64url parts, the first a JSON header).
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

impl Verifier {
    pub fn new(config: VerifierConfig) -> Result<Self, OidcError> {
        crate::check_issuer_url(&config.issuer)?;
        Ok(Verifier {
            http: http_client(config.ca_pem.as_deref())?,
            config,
            keys: std::sync::Mutex::new(Keys {
                discovery: None,
                by_kid: HashMap::new(),
                fetched: None,
            }),
            fetching: Mutex::new(()),
        })
    }

    /// Discovers the issuer and fetches its keys now (the server does it at start, so that a
    /// misconfiguration shows in its log at once; verification tries again when it failed).
    pub async fn prefetch(&self) -> Result<(), OidcError> {
        let _fetching = self.fetching.lock().await;
        self.refresh().await
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fetches the issuer's keys (discovering it first if that has not worked yet). Callers
    /// hold `fetching`; the key table is locked only to read and replace it, never across the
    /// network, so verifications with known keys never wait for a fetch.
    async fn refresh(&self) -> Result<(), OidcError> {
        let known = {
            let mut keys = self.keys();
            keys.fetched = Some(Instant::now());
            keys.discovery.clone()
        };
        let discovery = match known {
            Some(d) => d,
            None => {
                let d = discover(&self.http, &self.config.issuer).await?;
                self.keys().discovery = Some(d.clone());
                d
            }
        };
        let set: JwkSet = crate::get_json(&self.http, &discovery.jwks_uri).await?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    by_kid.insert(kid, key);
                }
                Err(e) => {
                    tracing::debug!(%kid, error = %e, "skipping an issuer key this server cannot use")
                }
            }
        }
        tracing::info!(issuer = %self.config.issuer, keys = by_kid.len(), "fetched the OIDC issuer's signing keys");
        self.keys().by_kid = by_kid;
        Ok(())
    }

    /// The key for `kid`, fetching the issuer's keys again if it is new (one fetch at a time,
    /// at most every [`REFETCH_EVERY`]).
    async fn key(&self, kid: &str) -> Result<DecodingKey, OidcError> {
        if let Some(k) = self.keys().by_kid.get(kid) {
            return Ok(k.clone());
        }
        let _fetching = self.fetching.lock().await;
        let may_fetch = {
            let keys = self.keys();
            if let Some(k) = keys.by_kid.get(kid) {
                // Fetched while this one waited.
                return Ok(k.clone());
            }
            keys.fetched.is_none_or(|t| t.elapsed() >= REFETCH_EVERY)
        };
        if may_fetch {
            self.refresh().await?;
        }
        self.keys().by_kid.get(kid).cloned().ok_or_else(|| {
            OidcError::Rejected(format!(
                "the token is signed with key {kid:?}, which the issuer does not publish"
            ))
        })
    }

    /// Checks a token and says whose it is.
    pub async fn verify(&self, token: &str) -> Result<Identity, OidcError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| OidcError::Rejected(format!("not a JWT: {e}")))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(OidcError::Rejected(format!(
                "the token is signed with {:?}, which is not allowed",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| OidcError::Rejected("the token names no signing key (kid)".into()))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.client_id]);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| OidcError::Rejected(describe(&e)))?;
        let claims = data.claims;
        let username = match &claims[&self.config.username_claim] {
            Value::String(s) if !s.is_empty() => s.clone(),
            _ => {
                return Err(OidcError::Rejected(format!(
                    "the token has no {:?} claim to name the user",
                    self.config.username_claim
                )))
            }
        };
        if self.config.username_claim == "email" && claims["email_verified"] == Value::Bool(false) {
            return Err(OidcError::Rejected(
                "the token's email is not verified".into(),
            ));
        }
        if username.starts_with("system:") {
            return Err(OidcError::Rejected(
                "user names beginning with system: are reserved".into(),
            ));
        }
        let groups = match &claims[&self.config.groups_claim] {
            Value::Array(list) => list
                .iter()
                .filter_map(|g| g.as_str().map(str::to_string))
                .collect(),
            Value::String(g) => vec![g.clone()],
            _ => Vec::new(),
        };
        // Groups cannot smuggle in the server's own (system:masters and the like).
        let groups = groups
            .into_iter()
            .filter(|g: &String| !g.starts_with("system:"))
            .collect();
        let expires = claims["exp"]
            .as_i64()
            .and_then(|e| chrono::DateTime::from_timestamp(e, 0))
            .unwrap_or_else(chrono::Utc::now);
        Ok(Identity {
            username,
            groups,
            expires,
        })
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidIssuer => "the token is from another issuer".into(),
        K::InvalidAudience => "the token is for another client (aud)".into(),
        K::InvalidSignature => "the token's signature does not verify".into(),
        K::MissingRequiredClaim(c) => format!("the token has no {c:?} claim"),
        _ => format!("the token is not valid: {e}"),
    }
}
