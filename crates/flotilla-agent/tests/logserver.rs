//! The agent's log endpoint accepts only clients with a certificate from the Flotilla CA.

#[tokio::test]
async fn only_ca_signed_clients_read_logs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = flotilla_server::pki::load_or_create(&dir.path().join("pki"), &["localhost".into()])
        .unwrap();
    let uid = "0a1b2c3d-0000-4000-8000-000000000001";
    std::fs::create_dir_all(dir.path().join("vms").join(uid)).unwrap();
    std::fs::write(
        dir.path().join("vms").join(uid).join("console.log"),
        "hello from the console\n",
    )
    .unwrap();
    let server = flotilla_agent::logserver::start(
        "127.0.0.1:0".parse().unwrap(),
        None,
        &pki.ca_pem,
        dir.path().to_path_buf(),
        Default::default(),
    )
    .await
    .unwrap();
    let url = format!("{}/v1/vms/{uid}/log", server.endpoint);

    let trusted = flotilla_server::pinned::agent_client(
        &server.cert_sha256,
        &pki.client_cert_pem,
        &pki.client_key_pem,
    )
    .unwrap();
    let body = trusted
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "hello from the console\n");
    let missing = trusted
        .get(format!("{}/v1/vms/../../etc/log", server.endpoint))
        .send()
        .await
        .unwrap();
    assert!(
        missing.status().is_client_error(),
        "paths outside VM directories are refused"
    );

    let anonymous = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    assert!(
        anonymous.get(&url).send().await.is_err(),
        "a client without a certificate is refused during the handshake"
    );
    let wrong_pin = flotilla_server::pinned::agent_client(
        &"0".repeat(64),
        &pki.client_cert_pem,
        &pki.client_key_pem,
    )
    .unwrap();
    assert!(
        wrong_pin.get(&url).send().await.is_err(),
        "the server refuses an agent whose certificate is not the published one"
    );
}
