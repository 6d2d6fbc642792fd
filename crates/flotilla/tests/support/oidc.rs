//! A real OpenID provider for tests (panva's oidc-provider, `tests/oidc/provider.mjs`, its npm
//! packages installed by `scripts/install-deps.sh test`), and a browser played by the test:
//! it follows redirects with a cookie jar and fills in the provider's forms (login, device code,
//! confirmation) as a person would.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_store::etcd_cluster::free_port;

/// Users of the provider: (login, email, group).
pub const ALICE: (&str, &str, &str) = ("alice", "alice@example.com", "dev");
pub const BOB: (&str, &str, &str) = ("bob", "bob@example.com", "ops");

pub struct Provider {
    pub issuer: String,
    port: u16,
    id_token_ttl: u64,
    child: Option<Child>,
}

impl Provider {
    /// Starts a provider whose ID tokens live `id_token_ttl` seconds.
    pub fn start(id_token_ttl: u64) -> Provider {
        let port = free_port();
        let mut p = Provider {
            issuer: format!("http://127.0.0.1:{port}"),
            port,
            id_token_ttl,
            child: None,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let dir = super::repo().join("tests/oidc");
        assert!(
            dir.join("node_modules/oidc-provider").exists(),
            "the test OpenID provider is not installed: run scripts/install-deps.sh test"
        );
        let mut child = Command::new("node")
            .arg("provider.mjs")
            .current_dir(&dir)
            .env("PORT", self.port.to_string())
            .env("ID_TOKEN_TTL", self.id_token_ttl.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("ready") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the OpenID provider starts within 30 s");
        self.child = Some(child);
    }

    /// Stops and starts it again on the same port: a new signing key with a new `kid`, and
    /// every token and session of before forgotten.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The inputs of the first form in `html` (name → value), its action and the submit button.
fn form(html: &str) -> Option<(String, Vec<(String, String)>)> {
    let start = html.find("<form")?;
    let html = &html[start..];
    let attr = |tag: &str, name: &str| -> Option<String> {
        let key = format!("{name}=\"");
        let i = tag.find(&key)? + key.len();
        Some(tag[i..].split('"').next()?.replace("&amp;", "&"))
    };
    let head = &html[..html.find('>')?];
    let action = attr(head, "action").unwrap_or_default();
    let mut fields = Vec::new();
    for tag in html.split('<').skip(1) {
        let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
        if tag.starts_with("input") || (tag.starts_with("button") && tag.contains("name=")) {
            if let Some(name) = attr(tag, "name") {
                fields.push((name, attr(tag, "value").unwrap_or_default()));
            }
        }
        if tag.starts_with("/form") {
            break;
        }
    }
    Some((action, fields))
}

/// Plays a browser from `url` as `user` until the provider sends it to a page that is not its
/// own (the client's redirect, which is then fetched) or shows a final page. `user_code` fills
/// the device flow's code form. Returns the last page's text.
pub async fn play_browser(url: &str, user: &str, user_code: Option<&str>) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut cookies: HashMap<String, String> = HashMap::new();
    let mut current = reqwest::Url::parse(url).unwrap();
    let mut post: Option<Vec<(String, String)>> = None;
    let provider_origin = current.origin();
    for _ in 0..30 {
        let mut req = match &post {
            Some(fields) => http.post(current.clone()).form(fields),
            None => http.get(current.clone()),
        };
        let jar: Vec<String> = cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !jar.is_empty() {
            req = req.header("cookie", jar.join("; "));
        }
        let resp = req.send().await.unwrap();
        for c in resp.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap();
            let pair = c.split(';').next().unwrap();
            let (k, v) = pair.split_once('=').unwrap();
            if v.is_empty() || c.contains("expires=Thu, 01 Jan 1970") {
                cookies.remove(k);
            } else {
                cookies.insert(k.to_string(), v.to_string());
            }
        }
        let status = resp.status();
        if status.is_redirection() {
            let location = resp.headers()["location"].to_str().unwrap().to_string();
            current = current.join(&location).unwrap();
            post = None;
            continue;
        }
        let body = resp.text().await.unwrap();
        assert!(status.is_success(), "{status} at {current}: {body}");
        if current.origin() != provider_origin {
            return body;
        }
        let Some((action, fields)) = form(&body) else {
            return body;
        };
        let fields = fields
            .into_iter()
            .map(|(k, v)| match k.as_str() {
                "login" => (k, user.to_string()),
                "password" => (k, "any".to_string()),
                "user_code" => (k, user_code.unwrap_or_default().to_string()),
                // The device flow's confirmation has "yes" and "abort" buttons.
                "confirm" => (k, "yes".to_string()),
                "abort" => (k, String::new()),
                _ => (k, v),
            })
            .filter(|(k, v)| k != "abort" || !v.is_empty())
            .collect();
        current = current.join(&action).unwrap();
        post = Some(fields);
    }
    panic!("the login took more than 30 pages");
}

/// Tokens for `user` from the provider, through Flotilla's own PKCE login with this browser.
pub async fn login(issuer: &str, client_id: &str, user: &str) -> flotilla_oidc::Tokens {
    let config = flotilla_oidc::LoginConfig::new(issuer, client_id);
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    let user = user.to_string();
    let browser = tokio::spawn(async move {
        let url = rx.await.unwrap();
        play_browser(&url, &user, None).await
    });
    let tokens = flotilla_oidc::login::authorization_code(&config, move |url| {
        tx.send(url.to_string()).unwrap();
    })
    .await
    .unwrap();
    let page = browser.await.unwrap();
    assert!(page.contains("You are logged in"), "{page}");
    tokens
}
