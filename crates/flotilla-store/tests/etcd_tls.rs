//! The etcd backend over TLS with a client certificate, against a real etcd that requires one.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_store::etcd_cluster::{free_port, KillOnDrop};
use flotilla_store::{EtcdOptions, EtcdStore, EtcdTls, Store};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "etcd test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issue = |purpose: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.extended_key_usages = vec![purpose];
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue(ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = issue(ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let ca_file = write("ca.pem", &ca.pem());
    let cert_file = write("server.pem", &server_cert);
    let key_file = write("server-key.pem", &server_key);
    let (client, peer) = (free_port(), free_port());
    let _etcd = KillOnDrop(
        Command::new("etcd")
            .arg("--name=tls")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls=https://127.0.0.1:{client}"))
            .arg(format!(
                "--advertise-client-urls=https://127.0.0.1:{client}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=tls=http://127.0.0.1:{peer}"))
            .arg(format!("--cert-file={}", cert_file.display()))
            .arg(format!("--key-file={}", key_file.display()))
            .arg("--client-cert-auth")
            .arg(format!("--trusted-ca-file={}", ca_file.display()))
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs"),
    );
    let options = |with_client: bool| EtcdOptions {
        endpoints: vec![format!("https://127.0.0.1:{client}")],
        tls: Some(EtcdTls {
            ca_pem: ca.pem(),
            client: with_client.then(|| (client_cert.clone(), client_key.clone())),
        }),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let store = loop {
        if let Ok(store) = EtcdStore::connect(options(true)).await {
            if store.put("/tls", b"yes".to_vec()).await.is_ok() {
                break store;
            }
        }
        assert!(Instant::now() < deadline, "etcd over TLS answers");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(store.get("/tls").await.unwrap().unwrap().value, b"yes");
    // Without a client certificate etcd refuses the connection.
    let refused = async {
        let store = EtcdStore::connect(options(false)).await?;
        store.get("/tls").await
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(20), refused)
            .await
            .map_or(true, |r| r.is_err()),
        "etcd must refuse a client without a certificate"
    );
}
