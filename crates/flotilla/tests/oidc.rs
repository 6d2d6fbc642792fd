//! People sign in through a real OpenID provider (panva's oidc-provider on loopback): the
//! server verifies its real tokens and maps their groups to RBAC bindings; expired, tampered,
//! wrong-algorithm, wrong-audience and wrong-issuer tokens are 401; a key rotation at the issuer
//! is followed; `flotilla login` runs the PKCE flow (and the device flow) against it with a
//! browser played by the test, and refreshes the token silently.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use flotilla_server::{RunningServer, ServerConfig};
use serde_json::{json, Value};
use support::oidc::{login, play_browser, Provider, ALICE, BOB};
use support::BIN;

const API: &str = "/apis/flotilla.dev/v1alpha1";

async fn server(dir: &Path, issuer: &str) -> RunningServer {
    let mut config = ServerConfig::new(dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.oidc = Some(flotilla_oidc::VerifierConfig::new(issuer, "flotilla"));
    flotilla_server::start(config)
        .await
        .expect("the server starts")
}

fn http(server: &RunningServer) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn call(
    server: &RunningServer,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http(server)
        .request(method.parse().unwrap(), format!("{}{path}", server.url))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap_or(Value::Null))
}

/// Projects dev and ops; group dev are members of dev, group ops viewers of ops.
async fn projects_for_groups(server: &RunningServer) {
    let admin = &server.admin_token;
    for (project, group, role) in [("dev", "dev", "member"), ("ops", "ops", "viewer")] {
        let (code, v) = call(
            server,
            admin,
            "POST",
            &format!("{API}/projects"),
            Some(json!({"metadata": {"name": project}})),
        )
        .await;
        assert_eq!(code, 201, "{v}");
        let binding = json!({"metadata": {"name": format!("{group}-{role}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": group}]});
        let path = format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{project}/rolebindings");
        let (code, v) = call(server, admin, "POST", &path, Some(binding)).await;
        assert_eq!(code, 201, "{v}");
    }
}

fn vm(name: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {"resources": {"cpus": 1, "memory": "256Mi"}, "image": "img", "powerState": "Stopped"}})
}

/// The claims of a JWT with one claim changed, keeping the issuer's signature.
fn tampered(token: &str, claim: &str, value: Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims[claim] = value;
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuers_tokens_sign_people_in_and_nothing_else_does() {
    let mut issuer = Provider::start(300);
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("data"), &issuer.issuer).await;
    projects_for_groups(&server).await;
    let alice = login(&issuer.issuer, "flotilla", ALICE.0).await.id_token;
    let bob = login(&issuer.issuer, "flotilla", BOB.0).await.id_token;

    // Groups from the token meet the bindings: alice is a member of dev, bob a viewer of ops.
    let (code, v) = call(
        &server,
        &alice,
        "POST",
        &format!("{API}/namespaces/dev/virtualmachines"),
        Some(vm("web")),
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let (code, v) = call(
        &server,
        &alice,
        "GET",
        &format!("{API}/namespaces/ops/virtualmachines"),
        None,
    )
    .await;
    assert_eq!(code, 403, "{v}");
    assert_eq!(
        v["message"],
        "alice@example.com may not list virtualmachines in project \"ops\""
    );
    assert_eq!(
        call(
            &server,
            &bob,
            "GET",
            &format!("{API}/namespaces/ops/virtualmachines"),
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        call(
            &server,
            &bob,
            "POST",
            &format!("{API}/namespaces/ops/virtualmachines"),
            Some(vm("x"))
        )
        .await
        .0,
        403
    );
    assert_eq!(
        call(
            &server,
            &bob,
            "GET",
            &format!("{API}/namespaces/dev/virtualmachines"),
            None
        )
        .await
        .0,
        403
    );
    // A binding to the user by name works as well as one to the group.
    let binding = json!({"metadata": {"name": "bob"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "viewer"},
        "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": BOB.1}]});
    let path = "/apis/rbac.authorization.k8s.io/v1/namespaces/dev/rolebindings";
    assert_eq!(
        call(&server, &server.admin_token, "POST", path, Some(binding))
            .await
            .0,
        201
    );
    assert_eq!(
        call(
            &server,
            &bob,
            "GET",
            &format!("{API}/namespaces/dev/virtualmachines"),
            None
        )
        .await
        .0,
        200
    );

    // Tokens that are not the issuer's own, for this API, are refused.
    let other_audience = login(&issuer.issuer, "other", ALICE.0).await.id_token;
    let mut stranger = Provider::start(300);
    let other_issuer = login(&stranger.issuer, "flotilla", ALICE.0).await.id_token;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT","kid":"k"}"#);
    let hmac = format!(
        "{header}.{}",
        alice.split('.').skip(1).collect::<Vec<_>>().join(".")
    );
    let cases = [
        ("another audience", other_audience, "for another client"),
        ("another issuer", other_issuer.clone(), "not valid"),
        (
            "a changed claim",
            tampered(&alice, "groups", json!(["ops", "dev"])),
            "signature does not verify",
        ),
        ("a symmetric algorithm", hmac, "not allowed"),
        (
            "a reserved user name",
            tampered(&alice, "email", json!("system:admin")),
            "not valid",
        ),
    ];
    for (what, token, why) in cases {
        let (code, v) = call(
            &server,
            &token,
            "GET",
            &format!("{API}/namespaces/dev/virtualmachines"),
            None,
        )
        .await;
        assert_eq!(code, 401, "{what}: {v}");
        assert!(v["message"].as_str().unwrap().contains(why), "{what}: {v}");
    }
    stranger.restart(); // (keeps the stranger alive until here)

    // The issuer rotates its key: new tokens carry a new kid, which the server fetches (at
    // most every 10 s), and old ones stop working when their key is gone.
    issuer.restart();
    let rotated = login(&issuer.issuer, "flotilla", ALICE.0).await.id_token;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, v) = call(
            &server,
            &rotated,
            "GET",
            &format!("{API}/namespaces/dev/virtualmachines"),
            None,
        )
        .await;
        if code == 200 {
            break;
        }
        assert_eq!(code, 401, "{v}");
        assert!(
            Instant::now() < deadline,
            "the new key was not fetched: {v}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() {
    let issuer = Provider::start(2);
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("data"), &issuer.issuer).await;
    projects_for_groups(&server).await;
    let tokens = login(&issuer.issuer, "flotilla", ALICE.0).await;
    let path = format!("{API}/namespaces/dev/virtualmachines");
    assert_eq!(
        call(&server, &tokens.id_token, "GET", &path, None).await.0,
        200
    );
    // Past its expiry and the 10 s leeway.
    let past = tokens.expires + chrono::Duration::seconds(11);
    while chrono::Utc::now() < past {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (code, v) = call(&server, &tokens.id_token, "GET", &path, None).await;
    assert_eq!(
        (code, v["message"].as_str()),
        (
            401,
            Some("the bearer token is not valid: the token has expired")
        )
    );
    server.shutdown().await;
}

fn cli(config: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("FLOTILLA_CONFIG", config)
        .env_remove("FLOTILLA_TOKEN");
    c
}

/// Runs `flotilla login` with a browser played by the test: the CLI prints the URL (or the
/// device code), the browser signs in as `user`, the CLI writes the context.
async fn cli_login(config: &Path, user: &str, device: bool) -> String {
    let mut cmd = cli(config);
    cmd.arg("login").arg("--no-browser");
    if device {
        cmd.arg("--device");
    }
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    let mut url = None;
    let mut code = None;
    while url.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the CLI prints where to sign in");
        if let Some(rest) = line.strip_prefix("To sign in, open ") {
            if let Some((uri, c)) = rest.split_once(" and enter the code ") {
                url = Some(uri.to_string());
                code = Some(c.trim().to_string());
            }
        } else if line.starts_with("http") {
            url = Some(line.trim().to_string());
        }
    }
    let page = play_browser(&url.unwrap(), user, code.as_deref()).await;
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let output = reader.join().unwrap();
    assert!(
        status.success(),
        "flotilla login failed: {output}\n(last page: {page})"
    );
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flotilla_login_signs_in_with_pkce_or_a_device_code_and_refreshes_silently() {
    // ID tokens of 20 s: inside the CLI's 30 s margin, so every command refreshes first.
    let issuer = Provider::start(20);
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("data"), &issuer.issuer).await;
    projects_for_groups(&server).await;
    // A config that knows the server but holds no credentials: all `flotilla login` needs.
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        serde_yaml::to_string(
            &json!({"currentContext": "plain", "contexts": [{"name": "plain",
            "server": server.url, "certificateAuthorityData": server.ca_pem, "project": "dev"}]}),
        )
        .unwrap(),
    )
    .unwrap();
    let said = cli_login(&config, ALICE.0, false).await;
    assert!(
        said.contains("Logged in as alice@example.com, groups dev"),
        "{said}"
    );
    let written: Value = serde_yaml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(written["currentContext"], "alice@example.com@127.0.0.1");
    let ctx = written["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == written["currentContext"])
        .unwrap()
        .clone();
    assert!(ctx["oidc"]["refreshToken"].is_string(), "{ctx}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the config holds secrets");

    // The CLI works as alice, refreshing her token on the way.
    let out = cli(&config).args(["get", "vm"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: Value = serde_yaml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let now = after["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == ctx["name"])
        .unwrap()
        .clone();
    assert_ne!(now["token"], ctx["token"], "the ID token was refreshed");
    let out = cli(&config)
        .args(["get", "vm", "-p", "ops"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("may not list virtualmachines in project \"ops\""));
    // "May I?" through the CLI.
    let out = cli(&config)
        .args(["auth", "can-i", "create", "vm"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes");
    let out = cli(&config)
        .args(["auth", "can-i", "delete", "vm", "-p", "ops"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no");
    // kubectl's exec plugin gets a token the server accepts.
    let out = cli(&config)
        .args(["auth", "exec-credential"])
        .output()
        .unwrap();
    let credential: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(credential["kind"], "ExecCredential");
    let token = credential["status"]["token"].as_str().unwrap();
    assert_eq!(
        call(
            &server,
            token,
            "GET",
            &format!("{API}/namespaces/dev/virtualmachines"),
            None
        )
        .await
        .0,
        200
    );

    // The device flow, as bob, into another context.
    let said = cli_login(&config, BOB.0, true).await;
    assert!(
        said.contains("Logged in as bob@example.com, groups ops"),
        "{said}"
    );
    let out = cli(&config)
        .args(["get", "vm", "-p", "ops"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.shutdown().await;
}
