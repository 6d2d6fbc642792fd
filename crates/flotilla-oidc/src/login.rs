//! The client's side: getting tokens from the issuer for a person at a terminal.
//!
//! - [`authorization_code`]: the browser flow with PKCE (RFC 7636) on a loopback redirect
//!   (RFC 8252): a one-shot listener on `127.0.0.1:<any port>` receives the code; `state` and
//!   the ID token's `nonce` tie the answer to this login.
//! - [`device`]: the device flow (RFC 8628) for a terminal without a browser, where the issuer
//!   offers it.
//! - [`refresh`]: a new ID token from the refresh token, without the person.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{discover, http_client, Discovery, OidcError};

/// How long the browser flow waits for the person.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Where and as whom to log in.
#[derive(Clone, Debug)]
pub struct LoginConfig {
    pub issuer: String,
    pub client_id: String,
    /// Only for issuers that insist on a confidential client.
    pub client_secret: Option<String>,
    pub scopes: Vec<String>,
    pub ca_pem: Option<String>,
}

impl LoginConfig {
    pub fn new(issuer: &str, client_id: &str) -> Self {
        LoginConfig {
            issuer: issuer.trim_end_matches('/').to_string(),
            client_id: client_id.to_string(),
            client_secret: None,
            scopes: ["openid", "email", "groups", "offline_access"]
                .map(String::from)
                .to_vec(),
            ca_pem: None,
        }
    }
}

/// What a login or refresh gives.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub id_token: String,
    pub refresh_token: Option<String>,
    /// When the ID token expires (its `exp`).
    pub expires: chrono::DateTime<chrono::Utc>,
}

#[derive(Deserialize)]
struct TokenResponse {
    id_token: Option<String>,
    refresh_token: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

fn random_b64(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// The claims of a JWT, read without verifying it (the server verifies; the client only needs
/// `exp` and `nonce`).
pub fn unverified_claims(jwt: &str) -> Option<Value> {
    let payload = jwt.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

fn expiry_of(jwt: &str) -> chrono::DateTime<chrono::Utc> {
    unverified_claims(jwt)
        .and_then(|c| c["exp"].as_i64())
        .and_then(|e| chrono::DateTime::from_timestamp(e, 0))
        .unwrap_or_else(chrono::Utc::now)
}

/// POSTs `form` to the issuer's `endpoint` as the client (its ID, and its secret if it has one).
async fn post_form(
    http: &reqwest::Client,
    config: &LoginConfig,
    endpoint: &str,
    mut form: Vec<(&str, String)>,
) -> Result<reqwest::Response, OidcError> {
    form.push(("client_id", config.client_id.clone()));
    if let Some(secret) = &config.client_secret {
        form.push(("client_secret", secret.clone()));
    }
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
        .finish();
    http.post(endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|e| OidcError::Unreachable {
            url: endpoint.to_string(),
            message: e.to_string(),
        })
}

async fn token_request(
    http: &reqwest::Client,
    config: &LoginConfig,
    endpoint: &str,
    form: Vec<(&str, String)>,
) -> Result<Result<Tokens, (String, String)>, OidcError> {
    let resp = post_form(http, config, endpoint, form).await?;
    let status = resp.status();
    let answer: TokenResponse = resp.json().await.map_err(|e| OidcError::Issuer {
        url: endpoint.to_string(),
        message: format!("HTTP {status} with a body this client cannot read: {e}"),
    })?;
    if let Some(error) = answer.error {
        return Ok(Err((error, answer.error_description.unwrap_or_default())));
    }
    let id_token = answer.id_token.ok_or_else(|| OidcError::Issuer {
        url: endpoint.to_string(),
        message: "no id_token (is the openid scope allowed for this client?)".into(),
    })?;
    Ok(Ok(Tokens {
        expires: expiry_of(&id_token),
        id_token,
        refresh_token: answer.refresh_token,
    }))
}

/// The browser flow. `show` gets the URL to open (print it, or start a browser with it).
pub async fn authorization_code(
    config: &LoginConfig,
    show: impl FnOnce(&str),
) -> Result<Tokens, OidcError> {
    let http = http_client(config.ca_pem.as_deref())?;
    let d: Discovery = discover(&http, &config.issuer).await?;
    if !d.code_challenge_methods_supported.is_empty()
        && !d
            .code_challenge_methods_supported
            .iter()
            .any(|m| m == "S256")
    {
        return Err(OidcError::Config(
            "the issuer does not offer PKCE with S256".into(),
        ));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| OidcError::Login(format!("cannot listen on loopback: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| OidcError::Login(e.to_string()))?
        .port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let (state, nonce, verifier) = (random_b64(16), random_b64(16), random_b64(32));
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let mut url = url::Url::parse(&d.authorization_endpoint)
        .map_err(|e| OidcError::Config(format!("the authorization endpoint is not a URL: {e}")))?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &config.client_id)
        .append_pair("redirect_uri", &redirect_uri)
        .append_pair("scope", &config.scopes.join(" "))
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256")
        // offline_access (a refresh token) needs consent at most issuers.
        .append_pair("prompt", "consent");
    show(url.as_str());
    let code = tokio::time::timeout(LOGIN_TIMEOUT, receive_code(&listener, &state))
        .await
        .map_err(|_| OidcError::Login("nobody logged in within 5 minutes".into()))??;
    let form = vec![
        ("grant_type", "authorization_code".to_string()),
        ("code", code),
        ("redirect_uri", redirect_uri),
        ("code_verifier", verifier),
    ];
    let tokens = token_request(&http, config, &d.token_endpoint, form)
        .await?
        .map_err(|(e, d)| OidcError::Login(format!("the issuer refused the code: {e} {d}")))?;
    let claims = unverified_claims(&tokens.id_token).unwrap_or_default();
    if claims["nonce"].as_str() != Some(nonce.as_str()) {
        return Err(OidcError::Login(
            "the ID token is not for this login (nonce)".into(),
        ));
    }
    Ok(tokens)
}

/// Answers requests on the loopback listener until the one carrying the code (with our
/// `state`) comes; anything else (a favicon, a stray request) gets 404.
async fn receive_code(
    listener: &tokio::net::TcpListener,
    state: &str,
) -> Result<String, OidcError> {
    loop {
        let (mut conn, _) = listener
            .accept()
            .await
            .map_err(|e| OidcError::Login(format!("the loopback listener failed: {e}")))?;
        let mut buf = vec![0u8; 8192];
        let mut n = 0;
        // The request line and headers; bounded in size and time.
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while n < buf.len() {
                let got = conn.read(&mut buf[n..]).await.unwrap_or(0);
                if got == 0 {
                    break;
                }
                n += got;
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        })
        .await;
        if read.is_err() {
            continue;
        }
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        let target = head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let parsed = url::Url::parse(&format!("http://127.0.0.1{target}")).ok();
        let Some(parsed) = parsed.filter(|u| u.path() == "/callback") else {
            let _ = conn
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
            continue;
        };
        let q: std::collections::HashMap<String, String> =
            parsed.query_pairs().into_owned().collect();
        let outcome = if q.get("state").map(String::as_str) != Some(state) {
            Err("the answer is not for this login (state); start the login again".to_string())
        } else if let Some(error) = q.get("error") {
            Err(format!(
                "the issuer said {error}: {}",
                q.get("error_description").cloned().unwrap_or_default()
            ))
        } else {
            q.get("code")
                .cloned()
                .ok_or_else(|| "the answer has no code".to_string())
        };
        let page = match &outcome {
            Ok(_) => "<!doctype html><title>Flotilla</title><p>You are logged in to Flotilla. You may close this window.</p>".to_string(),
            Err(e) => format!("<!doctype html><title>Flotilla</title><p>The login failed: {}</p>", html_escape(e)),
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{page}",
            page.len()
        );
        let _ = conn.write_all(response.as_bytes()).await;
        return outcome.map_err(OidcError::Login);
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// What the person is asked to do in the device flow.
#[derive(Clone, Debug, Deserialize)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    #[serde(default = "five")]
    pub interval: u64,
    pub expires_in: u64,
}

fn five() -> u64 {
    5
}

/// The device flow. `show` gets what to tell the person (a code and where to enter it).
pub async fn device(
    config: &LoginConfig,
    show: impl FnOnce(&DeviceAuthorization),
) -> Result<Tokens, OidcError> {
    let http = http_client(config.ca_pem.as_deref())?;
    let d = discover(&http, &config.issuer).await?;
    let endpoint = d
        .device_authorization_endpoint
        .ok_or_else(|| OidcError::Config("the issuer does not offer the device flow".into()))?;
    let form = vec![("scope", config.scopes.join(" "))];
    let resp = post_form(&http, config, &endpoint, form).await?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let auth: DeviceAuthorization = serde_json::from_str(&text).map_err(|_| OidcError::Issuer {
        url: endpoint.clone(),
        message: format!("HTTP {status}: {text}"),
    })?;
    show(&auth);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(auth.expires_in);
    let mut interval = Duration::from_secs(auth.interval.max(1));
    loop {
        if tokio::time::Instant::now() >= deadline {
            return Err(OidcError::Login(
                "the code expired before it was entered".into(),
            ));
        }
        tokio::time::sleep(interval).await;
        let form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:device_code".to_string(),
            ),
            ("device_code", auth.device_code.clone()),
        ];
        match token_request(&http, config, &d.token_endpoint, form).await? {
            Ok(tokens) => return Ok(tokens),
            Err((e, _)) if e == "authorization_pending" => {}
            Err((e, _)) if e == "slow_down" => interval += Duration::from_secs(5),
            Err((e, d)) => return Err(OidcError::Login(format!("{e} {d}").trim().to_string())),
        }
    }
}

/// A fresh ID token from a refresh token.
pub async fn refresh(config: &LoginConfig, refresh_token: &str) -> Result<Tokens, OidcError> {
    let http = http_client(config.ca_pem.as_deref())?;
    let d = discover(&http, &config.issuer).await?;
    let form = vec![
        ("grant_type", "refresh_token".to_string()),
        ("refresh_token", refresh_token.to_string()),
    ];
    let mut tokens = token_request(&http, config, &d.token_endpoint, form)
        .await?
        .map_err(|(e, d)| {
            OidcError::Login(format!(
                "the refresh was refused ({e} {d}); run flotilla login again"
            ))
        })?;
    // Issuers that do not rotate refresh tokens send none back: keep the one we have.
    if tokens.refresh_token.is_none() {
        tokens.refresh_token = Some(refresh_token.to_string());
    }
    Ok(tokens)
}
