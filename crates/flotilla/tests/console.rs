//! The consoles through the server: real server and agent binaries, real libvirtd and a real
//! tiny guest (TCG) whose serial console runs a shell. The serial console is interactive and
//! shared (a new viewer gets the recent output), VNC speaks RFB, `flotilla vm console` works
//! in a pipe, and nothing opens without credentials that allow it: no token, a viewer's token,
//! a used, foreign or forged ticket are refused; the agent's endpoint refuses anyone without
//! the server's client certificate; and QEMU listens on no TCP port.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::{ConsoleKind, ConsoleSocket};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{
    agent, guests::boot_tiny_vm, join_token, traversable_tempdir, DomainSweeper, Server,
};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

/// Reads the console until its output (from now on) contains `needle`; all it read.
async fn type_line(socket: &mut ConsoleSocket, line: &str) {
    socket
        .send(Message::Binary(format!("{line}\n").into_bytes().into()))
        .await
        .unwrap();
}

/// A WebSocket to `path` with only what is given (no token unless `token`).
async fn raw_socket(
    server: &Server,
    path: &str,
    token: Option<&str>,
) -> Result<ConsoleSocket, tungstenite::Error> {
    let ca = std::fs::read(server.data_dir.join("pki/ca.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let url = format!("wss://127.0.0.1:{}{path}", server.port);
    let mut request = url.into_client_request().unwrap();
    if let Some(t) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(tls));
    tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector))
        .await
        .map(|(s, _)| s)
}

fn refused_with(result: Result<ConsoleSocket, tungstenite::Error>) -> (u16, String) {
    match result {
        Err(tungstenite::Error::Http(answer)) => (
            answer.status().as_u16(),
            String::from_utf8_lossy(answer.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("refused without an HTTP answer: {e}"),
        Ok(_) => panic!("the console opened"),
    }
}

/// A service account in project `default` bound to `role`; its token.
async fn account(server: &Server, name: &str, role: &str) -> String {
    let http = server.http();
    let admin = server.admin_token();
    let base = server.url();
    let post = |path: String, body: Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };
    let r = post(
        "/api/v1/namespaces/default/serviceaccounts".into(),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = post(
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings".into(),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": name}]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r: Value = post(
        format!("/api/v1/namespaces/default/serviceaccounts/{name}/token"),
        json!({"spec": {"expirationSeconds": 3600}}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    r["status"]["token"].as_str().unwrap().to_string()
}

/// POSTs for a console ticket; the status and the answer.
async fn ticket(server: &Server, token: &str, path: &str) -> (u16, Value) {
    let r = server
        .http()
        .post(format!("{}{path}", server.url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consoles_are_interactive_shared_and_only_for_those_allowed() {
    let dir = traversable_tempdir();
    let tag = format!("c{:04x}", rand::random::<u16>());
    let _sweeper = DomainSweeper(format!("_{tag}-"));
    let server = Server::start(dir.path());
    let admin = server.admin().await;
    let token = join_token(&admin).await;
    let node = format!("console-{tag}");
    let _agent = agent(&server.url(), &token, &node, dir.path());
    let name = format!("{tag}-vm");
    boot_tiny_vm(&admin, &name, &node).await;
    let vm_path = format!("/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines/{name}");
    let console_path = format!("{vm_path}/console");

    // The serial console: recent output first, then a shell that answers.
    let mut first = admin
        .console("default", &name, ConsoleKind::Serial)
        .await
        .unwrap();
    support::read_until(&mut first, "FLOTILLA-BOOTED", 30).await;
    type_line(&mut first, "echo first-$((6*7))").await;
    support::read_until(&mut first, "first-42", 60).await;

    // A second viewer (a project member) sees what was typed before it came, and what either
    // types afterwards reaches both.
    let member = account(&server, "operator", "member").await;
    let mut second = raw_socket(&server, &console_path, Some(&member))
        .await
        .expect("a member opens the console");
    support::read_until(&mut second, "first-42", 10).await;
    type_line(&mut second, "echo second-$((2+3))").await;
    support::read_until(&mut second, "second-5", 30).await;
    support::read_until(&mut first, "second-5", 30).await;
    drop(first);
    drop(second);

    // Without credentials, or with a viewer's: refused, and the same for VNC.
    let viewer = account(&server, "auditor", "viewer").await;
    for path in [console_path.clone(), format!("{vm_path}/vnc")] {
        let (code, body) = refused_with(raw_socket(&server, &path, None).await);
        assert_eq!(code, 401, "{path} without a token: {body}");
        let (code, body) = refused_with(raw_socket(&server, &path, Some(&viewer)).await);
        assert_eq!(code, 403, "{path} for a viewer: {body}");
        assert!(body.contains("virtualmachines/"), "{body}");
    }
    let (code, _) = ticket(&server, &viewer, &console_path).await;
    assert_eq!(code, 403, "a viewer gets no ticket");

    // A ticket opens the console once, without a token; then never again.
    let (code, t) = ticket(&server, &member, &console_path).await;
    assert_eq!(code, 201, "{t}");
    let with_ticket = t["path"].as_str().unwrap().to_string();
    assert!(with_ticket.starts_with(&console_path), "{with_ticket}");
    // A plain GET is told to use a WebSocket, and does not use the ticket up.
    let plain = server
        .http()
        .get(format!("{}{with_ticket}", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);
    assert!(plain.text().await.unwrap().contains("WebSocket"));
    let mut by_ticket = raw_socket(&server, &with_ticket, None)
        .await
        .expect("the ticket opens the console");
    type_line(&mut by_ticket, "echo ticket-$((10+1))").await;
    support::read_until(&mut by_ticket, "ticket-11", 30).await;
    let (code, body) = refused_with(raw_socket(&server, &with_ticket, None).await);
    assert_eq!(code, 401, "a used ticket: {body}");
    assert!(body.contains("ticket"), "{body}");
    // A VNC ticket does not open the serial console, a forged one nothing.
    let (_, t) = ticket(&server, &member, &format!("{vm_path}/vnc")).await;
    let secret = t["ticket"].as_str().unwrap();
    let (code, _) =
        refused_with(raw_socket(&server, &format!("{console_path}?ticket={secret}"), None).await);
    assert_eq!(code, 401, "a VNC ticket on the serial console");
    let forged = "0".repeat(64);
    let (code, _) =
        refused_with(raw_socket(&server, &format!("{console_path}?ticket={forged}"), None).await);
    assert_eq!(code, 401, "a forged ticket");
    drop(by_ticket);
    // Opening a console is in the audit log, under the caller the ticket was for; the ticket
    // itself is not.
    let audit = std::fs::read_to_string(server.data_dir.join("audit.log")).unwrap();
    let opened: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"code\":101") && l.contains("virtualmachines/console"))
        .collect();
    assert!(
        opened
            .iter()
            .any(|l| l.contains("serviceaccount:default:operator")),
        "the member's console sessions are audited:\n{}",
        opened.join("\n")
    );
    let secret_used = with_ticket.rsplit('=').next().unwrap();
    assert!(!audit.contains(secret_used), "no ticket in the audit log");

    // VNC: the RFB handshake of QEMU's VNC server, through the server and the agent.
    let mut vnc = admin
        .console("default", &name, ConsoleKind::Vnc)
        .await
        .unwrap();
    let hello = tokio::time::timeout(Duration::from_secs(10), vnc.next())
        .await
        .expect("VNC speaks first")
        .unwrap()
        .unwrap();
    assert!(
        hello.into_data().starts_with(b"RFB 003.00"),
        "the RFB protocol version"
    );
    drop(vnc);

    // `flotilla vm console` in a pipe: what it reads goes to the guest, Ctrl-] leaves.
    let mut cli = Command::new(support::BIN)
        .args(["vm", "console", &name])
        .env("FLOTILLA_CONFIG", server.data_dir.join("admin.yaml"))
        .env("HOME", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = cli.stdin.take().unwrap();
    let stdout = cli.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdout = stdout;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0
                || lines_tx
                    .send(String::from_utf8_lossy(&buf[..n]).into())
                    .is_err()
            {
                return;
            }
        }
    });
    stdin.write_all(b"echo cli-$((3*4))\n").unwrap();
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !seen.contains("cli-12") {
        assert!(
            std::time::Instant::now() < deadline,
            "the CLI console said:\n{seen}"
        );
        if let Ok(chunk) = lines_rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&chunk);
        }
    }
    stdin.write_all(&[0x1d]).unwrap();
    let status = support::eventually("the CLI leaves on Ctrl-]", 10, || cli.try_wait().unwrap());
    assert!(status.success());

    // QEMU listens on no TCP port: VNC is a unix socket in the live definition.
    let uid = admin
        .get(
            flotilla_types::registry::lookup("vm").unwrap(),
            Some("default"),
            &name,
        )
        .await
        .unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let xml = support::domain_xml(&uid);
    let graphics = xml
        .lines()
        .find(|l| l.contains("<graphics"))
        .expect("the domain has VNC");
    assert!(graphics.contains("socket="), "{graphics}");
    assert!(!graphics.contains("port="), "{graphics}");
    assert!(!xml.contains("type='pty'"), "no pty console");

    // The agent's endpoint takes only the server's client certificate.
    let nodes = flotilla_types::registry::lookup("node").unwrap();
    let n = admin.get(nodes, None, &node).await.unwrap();
    let endpoint = n["status"]["nodeInfo"]["agentEndpoint"].as_str().unwrap();
    let anyone = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let attempt = anyone
        .get(format!("{endpoint}/v1/vms/{uid}/serial"))
        .send()
        .await;
    assert!(
        attempt.is_err(),
        "the agent answered a client without a certificate: {:?}",
        attempt.map(|r| r.status())
    );
}
