//! Images from URLs: streamed download, SHA-256 verification, raw -> qcow2 conversion, caching.

mod common;

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
            upload: None,
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
                    upload: None,
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
            upload: None,
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

fn qemu(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Uploaded images: streamed to the server, refused (and not kept) when the checksum, the
/// format or a backing file says the file is not what it should be, kept once, read back
/// byte for byte, fetched and cached by a node for a VM, and removed when the image goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_images_are_checked_kept_once_and_cached_by_the_nodes() {
    use flotilla_controllers::testkit::{eventually, TestCluster};
    use flotilla_types::registry::lookup;
    use futures::StreamExt;
    use serde_json::json;

    let cluster = TestCluster::start().await;
    let (admin, tmp) = (&cluster.admin, &cluster.dir);
    let _stop = common::test_driver_agent(&cluster, "up-node", tmp.path().join("agent")).await;

    // A 64 MiB qcow2 with 8 MiB of data, and a qcow2 on top of it (a backing file).
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("disk.qcow2");
    let file_text = file.display().to_string();
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", &file_text, "64M"]);
    qemu(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -q -P 0x5a 1M 8M",
        &file_text,
    ]);
    let overlay = work.path().join("overlay.qcow2");
    let overlay_text = overlay.display().to_string();
    qemu(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        &file_text,
        &overlay_text,
        "64M",
    ]);
    let bytes = std::fs::read(&file).unwrap();
    let sum = hex::encode(sha2::Sha256::digest(&bytes));
    let images = lookup("image").unwrap();
    let ns = Some("default");
    let upload = async |name: &str, spec: serde_json::Value, path: &std::path::Path| {
        let image = json!({"metadata": {"name": name}, "spec": spec});
        admin.create(images, ns, &image).await.unwrap();
        let data = std::fs::read(path).unwrap();
        let len = data.len() as u64;
        let started = std::time::Instant::now();
        let result = admin
            .upload_image("default", name, reqwest::Body::from(data), len)
            .await;
        (result, started.elapsed())
    };
    let uploads = tmp.path().join("server/uploads");
    let kept = || -> Vec<String> {
        std::fs::read_dir(&uploads)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };

    // Not what it says: refused at the field, nothing kept.
    let wrong = "0".repeat(64);
    let (refused, _) = upload(
        "bad-sum",
        json!({"source": {"upload": {}}, "sha256": wrong}),
        &file,
    )
    .await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(refused.to_string().contains("spec.sha256"), "{refused}");
    let status = admin.get(images, ns, "bad-sum").await.unwrap()["status"]["upload"].clone();
    assert_eq!(status["phase"], "Failed", "{status}");
    let (refused, _) = upload(
        "bad-format",
        json!({"source": {"upload": {}}, "format": "raw"}),
        &file,
    )
    .await;
    let refused = refused.unwrap_err();
    assert!(refused.to_string().contains("spec.format"), "{refused}");
    let (refused, _) = upload("backed", json!({"source": {"upload": {}}}), &overlay).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    assert!(refused.to_string().contains("backing file"), "{refused}");
    assert!(kept().is_empty(), "nothing refused is kept: {:?}", kept());
    // An image fetched from a URL has no file to upload.
    let fetched =
        json!({"metadata": {"name": "fetched"}, "spec": {"source": {"path": "/nope.qcow2"}}});
    admin.create(images, ns, &fetched).await.unwrap();
    let refused = admin
        .upload_image("default", "fetched", reqwest::Body::from(vec![0u8; 16]), 16)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");

    // One that says it will not fit is refused before a byte is read.
    let huge =
        json!({"metadata": {"name": "huge"}, "spec": {"source": {"upload": {}}, "format": "raw"}});
    admin.create(images, ns, &huge).await.unwrap();
    let never = futures::stream::pending::<Result<Vec<u8>, std::io::Error>>();
    let refused = admin
        .upload_image(
            "default",
            "huge",
            reqwest::Body::wrap_stream(never),
            1 << 60,
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(413), "{refused}");
    assert!(refused.to_string().contains("bytes free"), "{refused}");
    let status = admin.get(images, ns, "huge").await.unwrap()["status"].clone();
    assert!(status.get("upload").is_none(), "nothing started: {status}");

    // What it says: kept, once.
    let (uploaded, took) = upload("good", json!({"source": {"upload": {}}}), &file).await;
    let uploaded = uploaded.unwrap();
    assert_eq!(uploaded["status"]["upload"]["phase"], "Ready", "{uploaded}");
    assert_eq!(uploaded["status"]["upload"]["sha256"], sum.as_str());
    assert_eq!(uploaded["status"]["upload"]["bytes"], bytes.len() as u64);
    println!(
        "upload of a {} MiB qcow2 through the API: {:.2} s ({:.0} MiB/s)",
        bytes.len() >> 20,
        took.as_secs_f64(),
        bytes.len() as f64 / (1 << 20) as f64 / took.as_secs_f64()
    );
    let again = admin
        .upload_image(
            "default",
            "good",
            reqwest::Body::from(bytes.clone()),
            bytes.len() as u64,
        )
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(409), "{again}");
    let mut read = Vec::new();
    let mut stream = std::pin::pin!(admin.image_data("default", "good").await.unwrap());
    while let Some(chunk) = stream.next().await {
        read.extend_from_slice(&chunk.unwrap());
    }
    assert!(read == bytes, "read back byte for byte");

    // A VM's node fetches it with its own credentials and caches it.
    let vms = lookup("vm").unwrap();
    let vm = json!({"metadata": {"name": "from-upload"}, "spec": {
        "powerState": "Stopped", "resources": {"cpus": 1, "memory": "64Mi"}, "image": "good"}});
    admin.create(vms, ns, &vm).await.unwrap();
    eventually("the node caches the uploaded image", 60, async || {
        let image = admin.get(images, ns, "good").await.ok()?;
        (image["status"]["nodes"]["up-node"]["phase"] == "Ready").then_some(())
    })
    .await;
    let cached: Vec<_> = std::fs::read_dir(tmp.path().join("agent/images"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let cached_text = cached[0].display().to_string();
    qemu(&["qemu-img", "compare", "-q", "-U", &file_text, &cached_text]);

    // A raw image of 32 MiB with 1 MiB of data is kept sparse: its zeros take no room.
    let raw = work.path().join("disk.raw");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&raw).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&vec![0x5a; 1 << 20]).unwrap();
        f.set_len(32 << 20).unwrap();
    }
    let raw_bytes = std::fs::read(&raw).unwrap();
    let (sparse, _) = upload(
        "sparse",
        json!({"source": {"upload": {}}, "format": "raw"}),
        &raw,
    )
    .await;
    let sparse = sparse.unwrap();
    let kept_file = uploads.join(format!(
        "{}.img",
        sparse["metadata"]["uid"].as_str().unwrap()
    ));
    let meta = std::fs::metadata(&kept_file).unwrap();
    assert_eq!(meta.len(), 32 << 20);
    let dir_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&uploads).unwrap().permissions(),
    );
    assert_eq!(dir_mode & 0o777, 0o700, "uploads are the server's alone");
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 4 << 20,
        "the zeros are holes: {} bytes allocated",
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512
    );
    assert!(std::fs::read(&kept_file).unwrap() == raw_bytes);
    admin.delete(images, ns, "sparse").await.unwrap();
    eventually(
        "the sparse upload is removed with its image",
        30,
        async || (!kept_file.exists()).then_some(()),
    )
    .await;

    // A volume starts as a copy of it (not linked: the cache is not the clone's to keep).
    let volumes = lookup("volume").unwrap();
    let linked = json!({"metadata": {"name": "x"}, "spec": {"size": "64Mi",
        "source": {"image": "good", "mode": "linked"}}});
    let refused = admin.create(volumes, ns, &linked).await.unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused}");
    let missing =
        json!({"metadata": {"name": "x"}, "spec": {"size": "64Mi", "source": {"image": "nope"}}});
    let refused = admin.create(volumes, ns, &missing).await.unwrap_err();
    assert!(
        refused.to_string().contains("spec.source.image"),
        "{refused}"
    );
    let copy = json!({"metadata": {"name": "from-image"}, "spec": {"size": "96Mi", "source": {"image": "good"}}});
    admin.create(volumes, ns, &copy).await.unwrap();
    let made = eventually("the volume is made from the image", 60, async || {
        let v = admin.get(volumes, ns, "from-image").await.ok()?;
        (v["status"]["phase"] == "Available").then_some(v)
    })
    .await;
    assert_eq!(made["status"]["capacity"], 96u64 << 20, "{made}");
    let copied = made["status"]["path"].as_str().unwrap().to_string();
    // The first 64 MiB are the image's (the rest is the growth).
    qemu(&["qemu-img", "compare", "-q", "-U", &file_text, &copied]);

    // Gone with its image.
    admin.delete(vms, ns, "from-upload").await.unwrap();
    assert_eq!(kept().len(), 1, "{:?}", kept());
    admin.delete(images, ns, "good").await.unwrap();
    eventually("the uploaded file is removed", 30, async || {
        kept().is_empty().then_some(())
    })
    .await;
}
