//! The `dir` pool against the real `qemu-img`, in temporary directories: blank volumes (qcow2 as
//! compat 1.1, raw sparse), full and linked clones with the source's bytes, growing and the
//! refusal to shrink, the backing graph guarding deletes, names that could escape the pool, the
//! space report, and a pool QEMU could not reach refused with what to run.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use flotilla_storage::{DirPool, Format, NewVolume, Source, StorageError};

const MIB: u64 = 1 << 20;

/// A temporary directory QEMU could reach (tempfile makes 0700 ones).
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn blank(name: &str, format: Format, size: u64) -> NewVolume {
    NewVolume {
        name: name.into(),
        format,
        size,
        source: Source::Blank,
    }
}

/// Whether two images hold the same guest-visible bytes (`qemu-img compare`).
fn same_content(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

#[tokio::test]
async fn volumes_are_made_cloned_grown_and_removed_as_files() {
    let dir = scratch();
    let pool = DirPool::open(&dir.path().join("pool")).unwrap();
    let mode = std::fs::metadata(pool.root()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o711, "QEMU may open files, not list them");

    // Blank: qcow2 as compat 1.1, raw sparse.
    let q = pool
        .create(&blank("data", Format::Qcow2, 64 * MIB))
        .await
        .unwrap();
    assert_eq!((q.format, q.virtual_size), (Format::Qcow2, 64 * MIB));
    assert_eq!(q.path, pool.root().join("data.qcow2"));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&q.path)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
    let r = pool
        .create(&blank("scratch", Format::Raw, 32 * MIB))
        .await
        .unwrap();
    assert_eq!((r.format, r.virtual_size), (Format::Raw, 32 * MIB));
    assert!(
        r.allocation < MIB,
        "a blank raw volume is sparse: {}",
        r.allocation
    );

    // A source with bytes in it: full clones copy them, into either format, larger if asked.
    let source = dir.path().join("image.raw");
    let mut bytes = vec![0u8; 8 * MIB as usize];
    for (i, b) in bytes.iter_mut().enumerate().take(MIB as usize) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&source, &bytes).unwrap();
    let full = pool
        .create(&NewVolume {
            name: "full".into(),
            format: Format::Qcow2,
            size: 16 * MIB,
            source: Source::Clone {
                from: source.clone(),
                format: Format::Raw,
                linked: false,
            },
        })
        .await
        .unwrap();
    assert_eq!(full.virtual_size, 16 * MIB, "grown to the size asked");
    assert_eq!(full.backing, None, "a full clone stands alone");
    let back = dir.path().join("back.raw");
    assert!(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&full.path)
        .arg(&back)
        .status()
        .unwrap()
        .success());
    assert_eq!(
        &std::fs::read(&back).unwrap()[..bytes.len()],
        &bytes[..],
        "the clone holds the source's bytes"
    );
    // A linked clone of it: copy-on-write over the volume, the same content.
    let linked = pool
        .create(&NewVolume {
            name: "linked".into(),
            format: Format::Qcow2,
            size: 0,
            source: Source::Clone {
                from: full.path.clone(),
                format: Format::Qcow2,
                linked: true,
            },
        })
        .await
        .unwrap();
    assert_eq!(linked.backing.as_deref(), Some(full.path.as_path()));
    assert_eq!(linked.virtual_size, 16 * MIB, "at least its source's size");
    assert!(same_content(&linked.path, &full.path));
    assert!(
        linked.allocation < MIB,
        "nothing copied: {}",
        linked.allocation
    );
    // A raw file cannot have a backing file.
    let refused = pool
        .create(&NewVolume {
            name: "linked-raw".into(),
            format: Format::Raw,
            size: 0,
            source: Source::Clone {
                from: full.path.clone(),
                format: Format::Qcow2,
                linked: true,
            },
        })
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("needs qcow2"), "{refused}");
    assert!(!pool.path("linked-raw", Format::Raw).exists());

    // Names: taken, or able to escape the pool, are refused before any file is touched.
    assert!(matches!(
        pool.create(&blank("data", Format::Raw, MIB)).await,
        Err(StorageError::Exists(_))
    ));
    for bad in ["../x", "a/b", ".hidden", "", "x y"] {
        assert!(
            matches!(
                pool.create(&blank(bad, Format::Raw, MIB)).await,
                Err(StorageError::BadName(_))
            ),
            "{bad:?}"
        );
    }

    // Grow; the same size is nothing; shrinking is refused and changes nothing.
    assert_eq!(
        pool.resize("data", 128 * MIB).await.unwrap().virtual_size,
        128 * MIB
    );
    assert_eq!(
        pool.resize("data", 128 * MIB).await.unwrap().virtual_size,
        128 * MIB
    );
    let shrink = pool.resize("data", 64 * MIB).await.unwrap_err();
    assert!(matches!(shrink, StorageError::Shrink { .. }), "{shrink}");
    assert!(shrink.to_string().contains("would lose data"), "{shrink}");
    assert_eq!(pool.info("data").await.unwrap().virtual_size, 128 * MIB);
    assert_eq!(
        pool.resize("scratch", 48 * MIB).await.unwrap().virtual_size,
        48 * MIB
    );

    // The space report counts the volumes' bytes on disk.
    let space = pool.capacity().await.unwrap();
    let listed = pool.list().await.unwrap();
    assert_eq!(
        listed.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["data", "full", "linked", "scratch"]
    );
    assert_eq!(
        space.allocation,
        listed.iter().map(|v| v.allocation).sum::<u64>()
    );
    assert!(space.capacity > 0 && space.available <= space.capacity);

    // A volume another is an overlay of stays until that one goes.
    let in_use = pool.delete("full").await.unwrap_err();
    match &in_use {
        StorageError::InUse { users, .. } => assert_eq!(users, &["linked".to_string()]),
        other => panic!("{other}"),
    }
    assert!(full.path.exists());
    pool.delete("linked").await.unwrap();
    pool.delete("full").await.unwrap();
    pool.delete("full").await.unwrap();
    assert!(matches!(
        pool.info("full").await,
        Err(StorageError::NotFound(_))
    ));
    for name in ["data", "scratch"] {
        pool.delete(name).await.unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(pool.root()).unwrap().collect();
    assert!(left.is_empty(), "nothing is left: {left:?}");
}

#[tokio::test]
async fn a_pool_qemu_cannot_reach_is_refused_and_leftovers_are_swept() {
    let dir = scratch();
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let refused = DirPool::open(&closed.join("pool")).err().expect("refused");
    let message = refused.to_string();
    assert!(
        message.contains(&format!("chmod o+x {}", closed.display())),
        "{message}"
    );

    // A create that died half-way leaves a temporary file: a sweep removes it, and only it.
    let root = dir.path().join("pool");
    let pool = DirPool::open(&root).unwrap();
    pool.create(&blank("kept", Format::Qcow2, MIB))
        .await
        .unwrap();
    let half = root.join("gone.qcow2.123-0-abcdef01.tmp");
    std::fs::write(&half, b"half").unwrap();
    drop(pool);
    let pool = DirPool::open(&root).unwrap();
    assert!(half.exists(), "opening alone touches nothing");
    assert_eq!(pool.sweep_temporaries().unwrap(), vec![half.clone()]);
    assert!(!half.exists());
    assert_eq!(pool.list().await.unwrap().len(), 1);
}
