//! The storage backends side by side, each on a real server started for the run — a `dir`
//! pool on this disk, an NFS export (nfs-ganesha in a namespace), a Ceph RBD pool (single-node,
//! memstore OSD) and an iSCSI target (tgt): make a blank 1 GiB volume, write a 1 GiB image with
//! 256 MiB of data into a new volume, copy a volume in full, clone it linked where the backend
//! can, grow it offline, delete it (for iSCSI: write the image into a LUN and zero the LUN).
//! Medians of three, in milliseconds; prints a JSON line. Needs root and the packages
//! `make test` installs; run with `make bench-storage`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use flotilla_storage::{
    DirPool, Format, IscsiConfig, IscsiPool, NewVolume, NfsConfig, NfsPool, NfsSource, RbdConfig,
    RbdPool, RbdSource, Source,
};
use serde_json::{json, Value};

const GIB: u64 = 1 << 30;
const RUNS: usize = 3;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn script(name: &str, args: &[&str]) {
    let out = Command::new(repo().join("scripts").join(name))
        .args(args)
        // The OSD keeps its data in RAM: room for the copies this bench makes.
        .env("CEPH_MEMSTORE_BYTES", (4 * GIB).to_string())
        .output()
        .expect("the script runs");
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Milliseconds `f` took, median of [`RUNS`] (`f` gets the run's number).
async fn median<F, Fut>(mut f: F) -> f64
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut times = Vec::new();
    for run in 0..RUNS {
        let started = Instant::now();
        f(run).await;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    (times[RUNS / 2] * 10.0).round() / 10.0
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run());
}

async fn run() {
    let scratch = tempfile::tempdir_in(
        std::env::var_os("FLOTILLA_BENCH_DIR")
            .unwrap_or_else(|| std::env::temp_dir().into_os_string()),
    )
    .expect("a scratch directory");
    std::fs::set_permissions(
        scratch.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let dir = scratch.path();
    // The image: 1 GiB virtual, 256 MiB written.
    let image = dir.join("image.qcow2");
    for args in [
        vec![
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            "1G",
        ],
        vec![
            "qemu-io",
            "-c",
            "write -q -P 0x5a 0 256M",
            image.to_str().unwrap(),
        ],
    ] {
        assert!(Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap()
            .success());
    }
    let mut figures = json!({});
    figures["dir"] = bench_dir(&dir.join("dir"), &image).await;
    figures["nfs"] = bench_nfs(&dir.join("nfs"), &image).await;
    figures["rbd"] = bench_rbd(&dir.join("flotilla-test-ceph"), &image).await;
    figures["iscsi"] = bench_iscsi(&dir.join("iscsi"), &image).await;
    println!(
        "{}",
        json!({"bench": "storage-backends", "unit": "ms", "median_of": RUNS, "volume": "1 GiB", "image_data": "256 MiB", "results": figures})
    );
}

async fn bench_dir(dir: &Path, image: &Path) -> Value {
    std::fs::create_dir_all(dir).unwrap();
    let pool = DirPool::open(dir).unwrap();
    let new = |name: String, source: Source| NewVolume {
        name,
        format: Format::Qcow2,
        size: GIB,
        source,
    };
    let blank = median(|i| {
        let pool = &pool;
        async move {
            pool.create(&new(format!("blank{i}"), Source::Blank))
                .await
                .unwrap();
        }
    })
    .await;
    let from_image = median(|i| {
        let source = Source::Clone {
            from: image.to_path_buf(),
            format: Format::Qcow2,
            linked: false,
        };
        let pool = &pool;
        async move {
            pool.create(&new(format!("img{i}"), source)).await.unwrap();
        }
    })
    .await;
    let base = pool.info("img0").await.unwrap().path;
    let full = median(|i| {
        let source = Source::Clone {
            from: base.clone(),
            format: Format::Qcow2,
            linked: false,
        };
        let pool = &pool;
        async move {
            pool.create(&new(format!("full{i}"), source)).await.unwrap();
        }
    })
    .await;
    let linked = median(|i| {
        let source = Source::Clone {
            from: base.clone(),
            format: Format::Qcow2,
            linked: true,
        };
        let pool = &pool;
        async move {
            pool.create(&new(format!("linked{i}"), source))
                .await
                .unwrap();
        }
    })
    .await;
    let grow = median(|i| {
        let pool = &pool;
        async move {
            pool.resize(&format!("full{i}"), 2 * GIB).await.unwrap();
        }
    })
    .await;
    for i in 0..RUNS {
        pool.delete(&format!("linked{i}")).await.unwrap();
    }
    let delete = median(|i| {
        let pool = &pool;
        async move {
            pool.delete(&format!("full{i}")).await.unwrap();
        }
    })
    .await;
    json!({"create": blank, "from_image": from_image, "full_clone": full, "linked_clone": linked, "grow": grow, "delete": delete})
}

async fn bench_nfs(dir: &Path, image: &Path) -> Value {
    script("nfs-server-up.sh", &[dir.to_str().unwrap()]);
    let pool = NfsPool::new(NfsConfig {
        server: "198.18.253.2".into(),
        export: "/export".into(),
        uid: 64055,
        gid: 64055,
    })
    .unwrap();
    let name = |what: &str, i: usize| format!("{what}{i}.qcow2");
    let blank = median(|i| {
        let pool = &pool;
        async move {
            pool.create(&name("blank", i), Format::Qcow2, GIB, &NfsSource::Blank)
                .await
                .unwrap();
        }
    })
    .await;
    let from_image = median(|i| {
        let pool = &pool;
        let source = NfsSource::File {
            from: image.to_path_buf(),
            format: Format::Qcow2,
        };
        async move {
            pool.create(&name("img", i), Format::Qcow2, GIB, &source)
                .await
                .unwrap();
        }
    })
    .await;
    let full = median(|i| {
        let pool = &pool;
        let source = NfsSource::Volume {
            name: name("img", 0),
            format: Format::Qcow2,
        };
        async move {
            pool.create(&name("full", i), Format::Qcow2, GIB, &source)
                .await
                .unwrap();
        }
    })
    .await;
    let grow = median(|i| {
        let pool = &pool;
        async move {
            pool.resize(&name("full", i), Format::Qcow2, 2 * GIB)
                .await
                .unwrap();
        }
    })
    .await;
    let delete = median(|i| {
        let pool = &pool;
        async move {
            pool.delete(&name("full", i)).await.unwrap();
        }
    })
    .await;
    script("nfs-server-down.sh", &[dir.to_str().unwrap()]);
    json!({"create": blank, "from_image": from_image, "full_clone": full, "grow": grow, "delete": delete})
}

async fn bench_rbd(dir: &Path, image: &Path) -> Value {
    let started = Instant::now();
    script("ceph-up.sh", &[dir.to_str().unwrap(), "flotilla"]);
    let up_ms = started.elapsed().as_millis() as u64;
    let pool = RbdPool::new(RbdConfig {
        monitors: vec!["127.0.0.1:6789".into()],
        pool: "flotilla".into(),
        user: "flotilla".into(),
        keyring: dir.join("ceph.client.flotilla.keyring"),
    })
    .unwrap();
    let blank = median(|i| {
        let pool = &pool;
        async move {
            pool.create(&format!("blank{i}"), GIB, &RbdSource::Blank)
                .await
                .unwrap();
        }
    })
    .await;
    let from_image = median(|i| {
        let pool = &pool;
        let source = RbdSource::File {
            from: image.to_path_buf(),
            format: Format::Qcow2,
        };
        async move {
            pool.create(&format!("img{i}"), GIB, &source).await.unwrap();
        }
    })
    .await;
    let full = median(|i| {
        let pool = &pool;
        async move {
            let source = RbdSource::Image {
                name: "img0".into(),
                linked: false,
            };
            pool.create(&format!("full{i}"), GIB, &source)
                .await
                .unwrap();
        }
    })
    .await;
    let linked = median(|i| {
        let pool = &pool;
        async move {
            let source = RbdSource::Image {
                name: "img1".into(),
                linked: true,
            };
            pool.create(&format!("linked{i}"), GIB, &source)
                .await
                .unwrap();
        }
    })
    .await;
    let grow = median(|i| {
        let pool = &pool;
        async move {
            pool.resize(&format!("full{i}"), 2 * GIB).await.unwrap();
        }
    })
    .await;
    let delete = median(|i| {
        let pool = &pool;
        async move {
            pool.delete(&format!("full{i}")).await.unwrap();
        }
    })
    .await;
    script("ceph-down.sh", &[dir.to_str().unwrap()]);
    json!({"cluster_up": up_ms, "create": blank, "from_image": from_image, "full_clone": full, "linked_clone": linked, "grow": grow, "delete": delete})
}

async fn bench_iscsi(dir: &Path, image: &Path) -> Value {
    let target = "iqn.2026-12.dev.flotilla:bench";
    script(
        "iscsi-target-up.sh",
        &[dir.to_str().unwrap(), target, "1G", "1G", "1G"],
    );
    let pool = IscsiPool::new(IscsiConfig {
        portal: "127.0.0.1:3261".into(),
        target: target.into(),
        initiator: None,
    })
    .unwrap();
    let list = median(|_| {
        let pool = &pool;
        async move {
            assert_eq!(pool.luns().await.unwrap().len(), 3);
        }
    })
    .await;
    let from_image = median(|i| {
        let pool = &pool;
        async move {
            pool.write(i as u32 + 1, image, Format::Qcow2)
                .await
                .unwrap();
        }
    })
    .await;
    let zero = median(|i| {
        let pool = &pool;
        async move {
            pool.zero(i as u32 + 1).await.unwrap();
        }
    })
    .await;
    script("iscsi-target-down.sh", &[dir.to_str().unwrap()]);
    json!({"list_luns": list, "from_image": from_image, "zero_on_delete": zero})
}
