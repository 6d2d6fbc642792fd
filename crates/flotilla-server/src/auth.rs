//! Bearer-token authentication. Tokens look like `flt.<id>.<secret>`; the store keeps only the
//! SHA-256 of the secret (under `/flotilla/tokens/<id>`), so a copy of the store leaks no
//! credential, and every server replica sharing the store accepts the same tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_store::Store;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

const PREFIX: &str = "/flotilla/tokens/";
/// How long a verified token is trusted without looking at the store again (revocation delay).
const CACHE_FOR: Duration = Duration::from_secs(5);

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub groups: Vec<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TokenRecord {
    sha256: String,
    user: String,
    groups: Vec<String>,
    #[serde(default)]
    expires: Option<chrono::DateTime<chrono::Utc>>,
    /// The account a service-account token belongs to: the token works while that very
    /// account (same uid) exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_account: Option<AccountRef>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct AccountRef {
    project: String,
    name: String,
    uid: String,
}

/// Where the token of `id` is kept.
pub fn token_key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// A new service-account token: the token to show once, its id, and the record to store
/// under [`token_key`].
pub fn service_account_token(
    project: &str,
    name: &str,
    uid: &str,
    expires: chrono::DateTime<chrono::Utc>,
) -> (String, String, Vec<u8>) {
    let id = format!("sa-{}", random_hex(8));
    let secret = random_hex(32);
    let record = TokenRecord {
        sha256: hex::encode(sha256(secret.as_bytes())),
        user: crate::rbac::service_account_user(project, name),
        groups: vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{project}"),
        ],
        expires: Some(expires),
        service_account: Some(AccountRef {
            project: project.to_string(),
            name: name.to_string(),
            uid: uid.to_string(),
        }),
    };
    let token = format!("flt.{id}.{secret}");
    (token, id, serde_json::to_vec(&record).expect("serialises"))
}

pub struct Authenticator {
    store: Arc<dyn Store>,
    /// Verifies people's tokens from the OIDC issuer, when one is configured.
    oidc: Option<Arc<flotilla_oidc::Verifier>>,
    cache: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
    failures: Mutex<HashMap<std::net::IpAddr, Failures>>,
}

/// Failed authentications of one client address in the current window.
struct Failures {
    count: u32,
    since: Instant,
}

/// A client address may present this many wrong tokens per [`FAILURE_WINDOW`]; after that its
/// tokens are answered 429 without being looked up until the window ends — except tokens this
/// server verified moments ago (so a user behind the same address as a guesser keeps working).
/// Requests without any token are answered 401 and not counted: they guess nothing.
pub const MAX_FAILURES: u32 = 50;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(10);

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

impl Authenticator {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_oidc(store, None)
    }

    pub fn with_oidc(store: Arc<dyn Store>, oidc: Option<Arc<flotilla_oidc::Verifier>>) -> Self {
        Authenticator {
            store,
            oidc,
            cache: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Issues a token; `id` replaces an existing token of that id (rotation).
    pub async fn issue(
        &self,
        id: Option<&str>,
        user: &str,
        groups: &[&str],
        ttl: Option<Duration>,
    ) -> Result<String, ApiError> {
        let id = id.map(str::to_string).unwrap_or_else(|| random_hex(8));
        let secret = random_hex(32);
        let record = TokenRecord {
            sha256: hex::encode(sha256(secret.as_bytes())),
            user: user.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            expires: ttl.map(|t| {
                chrono::Utc::now()
                    + chrono::Duration::from_std(t).unwrap_or(chrono::Duration::days(3650))
            }),
            service_account: None,
        };
        self.store
            .put(
                &format!("{PREFIX}{id}"),
                serde_json::to_vec(&record).expect("serialises"),
            )
            .await?;
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(format!("flt.{id}.{secret}"))
    }

    /// Checks the token of a request from `peer` (None when unknown), limiting the failures
    /// each client address may have.
    pub async fn authenticate_from(
        &self,
        peer: Option<std::net::IpAddr>,
        token: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let Some(token) = token else {
            return Err(ApiError::unauthorized(
                "authentication required: send \"Authorization: Bearer <token>\" (the admin token is in the server's admin.yaml)",
            ));
        };
        if let Some(principal) = self.recently_verified(token) {
            return Ok(principal);
        }
        if let Some(ip) = peer {
            let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = failures.get(&ip) {
                let left = FAILURE_WINDOW.saturating_sub(f.since.elapsed());
                if f.count >= MAX_FAILURES && !left.is_zero() {
                    return Err(ApiError::too_many_requests(
                        format!(
                            "too many failed authentications from {ip}; try again in {} s",
                            left.as_secs() + 1
                        ),
                        left.as_secs() as u32 + 1,
                    ));
                }
            }
        }
        let result = self.authenticate(token).await;
        if let (Err(e), Some(ip)) = (&result, peer) {
            if e.code() == 401 {
                self.count_failure(ip);
            }
        }
        result
    }

    /// The principal of `token` if it was verified within [`CACHE_FOR`].
    fn recently_verified(&self, token: &str) -> Option<Principal> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (principal, at) = cache.get(&sha256(token.as_bytes()))?;
        (at.elapsed() < CACHE_FOR).then(|| principal.clone())
    }

    fn count_failure(&self, ip: std::net::IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Forget finished windows now and then, so that many addresses cannot grow the map.
        if failures.len() > 10_000 {
            failures.retain(|_, f| f.since.elapsed() < FAILURE_WINDOW);
        }
        let f = failures.entry(ip).or_insert(Failures {
            count: 0,
            since: Instant::now(),
        });
        if f.since.elapsed() >= FAILURE_WINDOW {
            *f = Failures {
                count: 0,
                since: Instant::now(),
            };
        }
        f.count += 1;
    }

    /// Checks a token (without the `Bearer ` prefix).
    pub async fn authenticate(&self, token: &str) -> Result<Principal, ApiError> {
        if let Some(principal) = self.recently_verified(token) {
            return Ok(principal);
        }
        let digest = sha256(token.as_bytes());
        let invalid = || {
            ApiError::unauthorized("the bearer token is not valid (unknown, revoked or expired)")
        };
        if let (Some(oidc), true) = (&self.oidc, flotilla_oidc::verify::looks_like_jwt(token)) {
            return self.authenticate_oidc(oidc, token, digest).await;
        }
        let mut parts = token.splitn(3, '.');
        let (Some("flt"), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(invalid());
        }
        let Some(kv) = self.store.get(&format!("{PREFIX}{id}")).await? else {
            return Err(invalid());
        };
        let record: TokenRecord = serde_json::from_slice(&kv.value).map_err(|_| invalid())?;
        let expected = hex::decode(&record.sha256).map_err(|_| invalid())?;
        if !bool::from(expected.ct_eq(&sha256(secret.as_bytes()))) {
            return Err(invalid());
        }
        if record.expires.is_some_and(|e| e < chrono::Utc::now()) {
            return Err(invalid());
        }
        if let Some(account) = &record.service_account {
            let kind = flotilla_types::registry::by_kind("ServiceAccount").expect("registered");
            let key = crate::objects::object_key(kind, Some(&account.project), &account.name);
            let current = self.store.get(&key).await?;
            let uid = current
                .as_ref()
                .and_then(|kv| serde_json::from_slice::<serde_json::Value>(&kv.value).ok())
                .and_then(|v| v["metadata"]["uid"].as_str().map(str::to_string));
            if uid.as_deref() != Some(account.uid.as_str()) {
                return Err(invalid());
            }
        }
        let principal = Principal {
            user: record.user,
            groups: record.groups,
        };
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest, (principal.clone(), Instant::now()));
        Ok(principal)
    }

    /// A person's token from the OIDC issuer.
    async fn authenticate_oidc(
        &self,
        oidc: &flotilla_oidc::Verifier,
        token: &str,
        digest: [u8; 32],
    ) -> Result<Principal, ApiError> {
        use flotilla_oidc::OidcError;
        match oidc.verify(token).await {
            Ok(identity) => {
                let principal = Principal {
                    user: identity.username,
                    groups: identity.groups,
                };
                // Trusted without a check until CACHE_FOR passes, never past its expiry.
                let left = (identity.expires - chrono::Utc::now())
                    .to_std()
                    .unwrap_or_default();
                if left > CACHE_FOR {
                    self.cache
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(digest, (principal.clone(), Instant::now()));
                }
                Ok(principal)
            }
            Err(OidcError::Rejected(why)) => Err(ApiError::unauthorized(format!(
                "the bearer token is not valid: {why}"
            ))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot verify an OIDC token");
                Err(ApiError::new(
                    503,
                    "ServiceUnavailable",
                    format!("cannot verify the token now: {e}"),
                ))
            }
        }
    }
}
