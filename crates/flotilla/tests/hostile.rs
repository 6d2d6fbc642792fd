//! Hostile clients: the server binary under an open-file limit of 1024 (the default soft limit
//! it would raise), 1,100 TCP connections that never say anything and 1,000 TLS connections
//! that send their request headers a line every few seconds and never finish. Meanwhile an
//! authenticated GET and /healthz on fresh connections answer within 1 s, the server does not
//! spin (its CPU time over an idle stretch of the attack), its log stays short, and every object
//! is intact afterwards.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_types::registry::lookup;
use serde_json::json;
use support::{traversable_tempdir, Server};
use tokio::io::AsyncWriteExt;

const IDLE: usize = 1_100;
const SLOWLORIS: usize = 1_000;

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn tls_client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_cannot_take_the_server_down() {
    // This test holds more than 2,100 sockets itself.
    flotilla_tls::raise_open_file_limit();
    let dir = traversable_tempdir();
    let server = Server::start_with_open_files(dir.path(), Some(1024));
    let admin = server.admin().await;
    let vms = lookup("vm").unwrap();
    for i in 0..10 {
        let vm = json!({"metadata": {"name": format!("keep-{i}")}, "spec": {
            "resources": {"cpus": 1, "memory": "64Mi"}, "image": "none"}});
        admin.create(vms, Some("default"), &vm).await.unwrap();
    }
    // What must survive: every object, its identity and its spec (the scheduler may still be
    // writing status meanwhile).
    let identity = |list: &serde_json::Value| -> Vec<(String, String, serde_json::Value)> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["metadata"]["name"].as_str().unwrap().to_string(),
                    v["metadata"]["uid"].as_str().unwrap().to_string(),
                    v["spec"].clone(),
                )
            })
            .collect()
    };
    let before = identity(
        &admin
            .list(vms, Some("default"), &Default::default())
            .await
            .unwrap(),
    );
    let ca = std::fs::read_to_string(server.data_dir.join("pki/ca.crt")).unwrap();
    let addr = format!("127.0.0.1:{}", server.port);
    let log_before = server.process.log_lines();

    // 1,100 connections that never say a word.
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            idle.push(s);
        }
    }
    // 1,000 TLS connections that start a request and never finish its headers.
    let connector = tls_client(&ca);
    let mut slow = Vec::new();
    for _ in 0..SLOWLORIS {
        let Ok(tcp) = tokio::net::TcpStream::connect(&addr).await else {
            continue;
        };
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let Ok(Ok(mut tls)) =
            tokio::time::timeout(Duration::from_secs(2), connector.connect(name, tcp)).await
        else {
            continue;
        };
        if tls
            .write_all(b"GET /apis HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .is_ok()
        {
            slow.push(tls);
        }
    }
    let keep_talking = tokio::spawn(async move {
        let mut alive = slow.len();
        for round in 0.. {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut still = Vec::new();
            for mut s in std::mem::take(&mut slow) {
                if s.write_all(format!("X-Slow-{round}: 1\r\n").as_bytes())
                    .await
                    .is_ok()
                {
                    still.push(s);
                }
            }
            alive = still.len();
            slow = still;
            if slow.is_empty() {
                break;
            }
        }
        alive
    });
    println!(
        "opened {} idle and {SLOWLORIS} slow connections",
        idle.len()
    );

    // The server stays quiet: no spinning accept loop while the attack sits there.
    let pid = server.process.pid().unwrap();
    let cpu_before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_idle = cpu_seconds(pid) - cpu_before;

    // Fresh clients are served at once.
    let fresh = server.admin().await;
    let t = Instant::now();
    let listed = fresh
        .list(vms, Some("default"), &Default::default())
        .await
        .unwrap();
    let get_ms = t.elapsed().as_millis();
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .build()
        .unwrap();
    let t = Instant::now();
    let health = http
        .get(format!("{}/healthz", server.url()))
        .send()
        .await
        .unwrap();
    let healthz_ms = t.elapsed().as_millis();
    assert_eq!(health.status(), 200);
    let log_lines = server.process.log_lines() - log_before;
    println!(
        "{{\"idle\":{},\"slowloris\":{SLOWLORIS},\"get_ms\":{get_ms},\"healthz_ms\":{healthz_ms},\"server_cpu_s_over_3s\":{cpu_idle:.2},\"log_lines\":{log_lines}}}",
        idle.len()
    );
    assert!(get_ms < 1000, "an authenticated GET took {get_ms} ms");
    assert!(healthz_ms < 1000, "/healthz took {healthz_ms} ms");
    assert!(
        cpu_idle < 1.0,
        "the server used {cpu_idle:.2} s of CPU in 3 s of attack: it spins"
    );
    assert!(
        log_lines < 50,
        "the log grew by {log_lines} lines:\n{}",
        server.process.tail(20)
    );
    assert_eq!(identity(&listed), before, "every object is intact");

    drop(idle);
    keep_talking.abort();
    let after = fresh
        .list(vms, Some("default"), &Default::default())
        .await
        .unwrap();
    assert_eq!(identity(&after), before);
}

/// A request refused before its body is read (no token; a body over the limit) still gets its
/// answer when the client writes its whole body before reading, as Python's `requests` does:
/// the server reads the rest first, instead of closing under a client still sending (the
/// kernel then resets the connection and the answer is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_their_body_still_get_their_answer() {
    let dir = traversable_tempdir();
    let server = Server::start(dir.path());
    server.admin().await;
    let ca = std::fs::read_to_string(server.data_dir.join("pki/ca.crt")).unwrap();
    let token = server.admin_token();
    let connector = tls_client(&ca);
    let send = |auth: Option<String>, size: usize| {
        let (connector, addr) = (connector.clone(), format!("127.0.0.1:{}", server.port));
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
            let head = format!(
                "POST /apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
            );
            tls.write_all(head.as_bytes()).await?;
            tls.write_all(&vec![b' '; size]).await?;
            tls.flush().await?;
            let mut answer = vec![0u8; 64];
            let n = tokio::io::AsyncReadExt::read(&mut tls, &mut answer).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer[..n]).into_owned())
        }
    };
    for _ in 0..3 {
        let answer = send(None, 3 << 20).await.expect("the 401 arrives");
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    let answer = send(Some(token), 7 << 19).await.expect("the 413 arrives");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}
