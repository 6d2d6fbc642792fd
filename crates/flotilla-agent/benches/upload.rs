//! Image upload through the API against `cp` of the same file, in one run: a 1 GiB raw image
//! with 256 MiB of random data, streamed to a server on this machine (TLS, checksum, format
//! check) and copied with cp. `make bench-storage` runs it; prints one JSON line.

use std::time::Instant;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let cluster = flotilla_controllers::testkit::TestCluster::start().await;
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("disk.raw");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&file).unwrap();
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..256 {
            rand::Rng::fill(&mut rand::thread_rng(), chunk.as_mut_slice());
            f.write_all(&chunk).unwrap();
        }
        f.seek(SeekFrom::Start((1 << 30) - 1)).unwrap();
        f.write_all(&[0]).unwrap();
        f.sync_all().unwrap();
    }
    let len = std::fs::metadata(&file).unwrap().len();

    let copy = work.path().join("copy.raw");
    let started = Instant::now();
    let status = std::process::Command::new("cp")
        .arg(&file)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let cp_s = started.elapsed().as_secs_f64();

    let images = flotilla_types::registry::lookup("image").unwrap();
    let image = serde_json::json!({"metadata": {"name": "bench"},
        "spec": {"source": {"upload": {}}, "format": "raw"}});
    cluster
        .admin
        .create(images, Some("default"), &image)
        .await
        .unwrap();
    let opened = tokio::fs::File::open(&file).await.unwrap();
    let chunks = flotilla_files::chunks(opened, 1 << 20);
    let started = Instant::now();
    let uploaded = cluster
        .admin
        .upload_image("default", "bench", reqwest::Body::wrap_stream(chunks), len)
        .await
        .unwrap();
    let upload_s = started.elapsed().as_secs_f64();
    assert_eq!(uploaded["status"]["upload"]["phase"], "Ready");
    let mib = len as f64 / (1 << 20) as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "image-upload",
            "bytes": len,
            "upload_s": (upload_s * 100.0).round() / 100.0,
            "upload_mib_s": (mib / upload_s).round(),
            "cp_s": (cp_s * 100.0).round() / 100.0,
            "cp_mib_s": (mib / cp_s).round(),
        })
    );
}
