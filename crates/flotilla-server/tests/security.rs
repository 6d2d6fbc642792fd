//! Secure by default: every endpoint but health needs a valid token; TLS with the server's CA.

mod common;

use common::start;

#[tokio::test]
async fn health_is_open_and_everything_else_needs_a_token() {
    let t = start().await;
    let http = t.http();
    for open in ["/healthz", "/readyz", "/livez"] {
        assert_eq!(
            http.get(t.url(open)).send().await.unwrap().status(),
            200,
            "{open}"
        );
    }
    for closed in [
        "/apis",
        "/apis/flotilla.dev/v1alpha1",
        "/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines",
        "/apis/flotilla.dev/v1alpha1/nodes",
        "/openapi/v3",
        "/metrics",
        "/version",
        "/no/such/path",
    ] {
        let resp = http.get(t.url(closed)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{closed} without a token");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["kind"], "Status");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{body}"
        );
        let wrong = http
            .get(t.url(closed))
            .bearer_auth("flt.admin.0000")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{closed} with a wrong token");
        let garbage = http
            .get(t.url(closed))
            .bearer_auth("not-a-token")
            .send()
            .await
            .unwrap();
        assert_eq!(garbage.status(), 401);
    }
    let ok = http
        .get(t.url("/apis"))
        .bearer_auth(t.token())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn the_server_is_only_trusted_through_its_ca() {
    let t = start().await;
    let untrusting = reqwest::Client::builder().use_rustls_tls().build().unwrap();
    let e = untrusting.get(t.url("/healthz")).send().await.unwrap_err();
    assert!(
        e.is_connect() || e.is_request(),
        "a client without the CA must refuse the certificate: {e}"
    );
    let plain = t.server.url.replace("https://", "http://");
    let resp = reqwest::get(format!("{plain}/healthz")).await;
    assert!(
        resp.is_err() || !resp.unwrap().status().is_success(),
        "plain HTTP is not served"
    );
}

#[tokio::test]
async fn admin_config_is_private_and_reused_across_restarts() {
    let t = start().await;
    let path = t.server.admin_config_path.clone();
    let mode = std::fs::metadata(&path).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let yaml = std::fs::read_to_string(&path).unwrap();
    assert!(yaml.contains(&t.server.admin_token));
    assert!(yaml.contains("BEGIN CERTIFICATE"));
    let (data, token) = (t.dir.path().join("data"), t.server.admin_token.clone());
    t.server.shutdown().await;
    let mut config = flotilla_server::ServerConfig::new(data);
    config.listen = "127.0.0.1:0".parse().unwrap();
    let again = flotilla_server::start(config).await.unwrap();
    assert_eq!(again.admin_token, token, "a restart keeps the admin token");
    let listed = std::fs::read_to_string(&again.admin_config_path).unwrap();
    assert!(
        listed.contains(&again.url),
        "admin.yaml names the new address"
    );
}

#[tokio::test]
async fn the_default_listen_address_is_loopback() {
    assert!(flotilla_server::DEFAULT_LISTEN.ip().is_loopback());
    assert_eq!(flotilla_server::DEFAULT_LISTEN.port(), 7443);
}

/// A client address that keeps presenting wrong tokens is answered 429 (with Retry-After)
/// without its tokens being looked at, until its window ends; health checks stay open, and so
/// does a token verified just before (a user behind the same address as the guesser).
/// Requests without a token guess nothing and are not counted.
#[tokio::test]
async fn failed_authentication_is_rate_limited_per_client() {
    let t = start().await;
    let http = t.http();
    let vms = t.url("/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines");
    let max = flotilla_server::auth::MAX_FAILURES;
    for _ in 0..2 * max {
        assert_eq!(http.get(&vms).send().await.unwrap().status(), 401);
    }
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth(&t.server.admin_token);
    assert_eq!(admin(http.get(&vms)).send().await.unwrap().status(), 200);
    for i in 0..max {
        let resp = http
            .get(&vms)
            .bearer_auth(format!("flt.guess{i}.wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "attempt {i}");
    }
    let resp = http
        .get(&vms)
        .bearer_auth("flt.one.more")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=flotilla_server::auth::FAILURE_WINDOW.as_secs()).contains(&retry));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "TooManyRequests");
    assert!(
        body["message"].as_str().unwrap().contains("127.0.0.1"),
        "{body}"
    );
    assert_eq!(
        http.get(t.url("/healthz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        admin(http.get(&vms)).send().await.unwrap().status(),
        200,
        "a token verified moments ago still works from the limited address"
    );
}
