//! `flotilla volume upload` and `flotilla volume download`, end to end with the real binaries: a
//! qcow2 file on this machine becomes a raw volume (uploaded as a temporary Image, copied by the
//! node's agent, the Image deleted), and the volume downloaded again holds the file's bytes.

mod support;

use flotilla_types::registry::lookup;
use support::{agent, agent_dir, cli, join_token, ok, traversable_tempdir, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_becomes_a_volume_and_comes_back() {
    let tmp = traversable_tempdir();
    let server = Server::start(tmp.path());
    let admin = server.admin().await;
    let token = join_token(&admin).await;
    let _agent = agent(&server.url(), &token, "upload-node", tmp.path());
    let config = server.data_dir.join("admin.yaml");

    let file = tmp.path().join("disk.qcow2");
    let path = file.to_str().unwrap();
    for args in [
        vec!["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"],
        vec!["qemu-io", "-c", "write -P 0x5a 0 1M", path],
    ] {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = ok(cli(
        &config,
        &["volume", "upload", "data", path, "--format", "raw"],
    ));
    assert!(out.contains("volume/data made from"), "{out}");
    let volume = admin
        .get(lookup("volume").unwrap(), Some("default"), "data")
        .await
        .unwrap();
    assert_eq!(volume["status"]["phase"], "Available", "{volume}");
    assert_eq!(
        volume["status"]["capacity"],
        16u64 << 20,
        "the file's virtual size: {volume}"
    );
    assert_eq!(volume["spec"]["format"], "raw", "{volume}");
    let images = admin
        .list(
            lookup("image").unwrap(),
            Some("default"),
            &Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        images["items"],
        serde_json::json!([]),
        "the temporary Image is gone"
    );

    let back = tmp.path().join("back.raw");
    ok(cli(
        &config,
        &[
            "volume",
            "download",
            "data",
            back.to_str().unwrap(),
            "--format",
            "raw",
        ],
    ));
    let bytes = std::fs::read(&back).unwrap();
    assert_eq!(bytes.len(), 16 << 20);
    assert!(bytes[..1 << 20].iter().all(|b| *b == 0x5a));
    assert!(bytes[1 << 20..].iter().all(|b| *b == 0));

    // A file that is not there is an error before anything is made.
    let missing = cli(
        &config,
        &["volume", "upload", "other", "/nonexistent.qcow2"],
    );
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("cannot open /nonexistent.qcow2"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    ok(cli(&config, &["delete", "volume", "data"]));
    let pool = agent_dir(tmp.path(), "upload-node").join("pools/default");
    support::eventually("the volume's file is gone", 60, || {
        std::fs::read_dir(&pool)
            .map(|d| d.count() == 0)
            .unwrap_or(true)
            .then_some(())
    });
}
