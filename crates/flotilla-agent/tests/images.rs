//! Images from URLs: streamed download, SHA-256 verification, raw -> qcow2 conversion, caching.

use std::process::Command;

use flotilla_agent::disks::Disks;
use flotilla_types::{ImageFormat, ImageSource, ImageSpec};
use sha2::Digest;

/// Serves `body` at http://127.0.0.1:PORT/image.raw and counts requests.
async fn serve(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/image.raw",
        axum::routing::get(move || {
            let body = body.clone();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/image.raw"), hits)
}

fn qemu_format(path: &std::path::Path) -> String {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["format"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn downloads_verify_convert_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = vec![0u8; 4 << 20];
    raw[..11].copy_from_slice(b"flotilla-ok");
    let sum = hex::encode(sha2::Sha256::digest(&raw));
    let (url, hits) = serve(raw).await;
    let disks = Disks::new(dir.path(), 1);
    let spec = |sha: Option<String>| ImageSpec {
        source: ImageSource {
            url: Some(url.clone()),
            path: None,
        },
        format: ImageFormat::Raw,
        sha256: sha,
    };

    let wrong = disks
        .cached_image("default", "bad", &spec(Some("0".repeat(64))))
        .await
        .unwrap_err();
    assert!(wrong.to_string().contains("checksum mismatch"), "{wrong}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("images"))
        .unwrap()
        .collect();
    assert!(
        leftovers.is_empty(),
        "a failed download leaves nothing behind: {leftovers:?}"
    );

    let cached = disks
        .cached_image("default", "good", &spec(Some(sum.clone())))
        .await
        .unwrap();
    assert_eq!(
        qemu_format(&cached),
        "qcow2",
        "raw images are converted to qcow2"
    );
    let again = disks
        .cached_image("default", "good", &spec(Some(sum)))
        .await
        .unwrap();
    assert_eq!(cached, again);
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "a cached image is not downloaded again"
    );

    let overlay = dir.path().join("root.qcow2");
    disks
        .create_root_disk(Some(&cached), &overlay, Some(64 << 20))
        .await
        .unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&overlay)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["backing-filename"],
        cached.display().to_string(),
        "the root disk is a linked clone"
    );
    assert_eq!(info["virtual-size"], 64u64 << 20);
    assert!(
        std::fs::metadata(&overlay).unwrap().len() < 1 << 20,
        "a linked clone is small whatever the image's size"
    );
}

/// The per-node queue bounds concurrent disk-heavy work: with 1 slot, downloads run one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_queue_bounds_concurrent_work() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n2, m2) = (now.clone(), max.clone());
    let app = axum::Router::new().route(
        "/{name}",
        axum::routing::get(move || {
            let (now, max) = (n2.clone(), m2.clone());
            async move {
                let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                vec![0u8; 1 << 20]
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let disks = Disks::new(dir.path(), 1);
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let disks = disks.clone();
            let spec = ImageSpec {
                source: ImageSource {
                    url: Some(format!("http://{addr}/img-{i}")),
                    path: None,
                },
                format: ImageFormat::Raw,
                sha256: None,
            };
            tokio::spawn(async move {
                disks
                    .cached_image("default", &format!("img-{i}"), &spec)
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        max.load(Ordering::SeqCst),
        1,
        "one slot: never two downloads at once"
    );
}

/// Damaged cache entries are found by the next process that uses them (a new `Disks`), reported,
/// and made again: a truncated file by its size, a flipped byte by its hash when the Image has
/// one. An entry cached before manifests existed is adopted when qemu-img finds it sound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_entries_are_noticed_and_made_again() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    flotilla_controllers::testkit::blank_qcow2(&source, "64M");
    // Some data in it, so that a flipped byte lands in something that matters.
    let status = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 1M"])
        .arg(&source)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let sum = hex::encode(sha2::Sha256::digest(std::fs::read(&source).unwrap()));
    let spec = ImageSpec {
        source: ImageSource {
            url: None,
            path: Some(source.display().to_string()),
        },
        format: ImageFormat::Qcow2,
        sha256: Some(sum),
    };
    let fresh = |notices: &Arc<Mutex<Vec<String>>>| {
        let disks = Disks::new(dir.path(), 1);
        let seen = notices.clone();
        disks.on_notice(move |n| {
            if let flotilla_agent::disks::CacheNotice::Discarded { reason, .. } = n {
                seen.lock().unwrap().push(reason)
            }
        });
        disks
    };
    let notices: Arc<Mutex<Vec<String>>> = Default::default();
    let cached = fresh(&notices)
        .cached_image("default", "img", &spec)
        .await
        .unwrap();
    let good = std::fs::read(&cached).unwrap();
    assert!(notices.lock().unwrap().is_empty());

    // Truncated (a copy cut short, a full disk).
    std::fs::write(&cached, &good[..good.len() / 2]).unwrap();
    let again = fresh(&notices)
        .cached_image("default", "img", &spec)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), good, "made again, whole");
    assert_eq!(
        notices.lock().unwrap().len(),
        1,
        "{:?}",
        notices.lock().unwrap()
    );

    // One byte flipped in the data (bit rot): only the hash can tell.
    let mut rotten = good.clone();
    let at = rotten.len() - 4096;
    rotten[at] ^= 0xff;
    std::fs::write(&cached, &rotten).unwrap();
    fresh(&notices)
        .cached_image("default", "img", &spec)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&cached).unwrap(), good);
    let reasons = notices.lock().unwrap().clone();
    assert_eq!(reasons.len(), 2);
    assert!(reasons[1].contains("SHA-256"), "{reasons:?}");

    // No manifest (cached by an older agent): adopted, not fetched again, manifest written.
    let manifest = cached.with_extension("json");
    std::fs::remove_file(&manifest).unwrap();
    fresh(&notices)
        .cached_image("default", "img", &spec)
        .await
        .unwrap();
    assert_eq!(notices.lock().unwrap().len(), 2, "nothing discarded");
    assert!(
        manifest.exists(),
        "the manifest is written for the adopted entry"
    );
}
