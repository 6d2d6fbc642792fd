//! Clones of a 1 GiB qcow2 volume (every byte written, so a full copy has all of it to move) in
//! a `dir` pool: linked (an overlay: constant time) against full (`qemu-img convert`), with
//! `cp` of the same file beside them in the same run, so the figures compare on this disk.
//! Prints a JSON line. Run with `make bench-storage` (or `cargo bench -p flotilla-storage`).

use std::time::Instant;

use flotilla_storage::{DirPool, Format, NewVolume, Source};

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir_in(
        std::env::var_os("FLOTILLA_BENCH_DIR")
            .unwrap_or_else(|| std::env::temp_dir().into_os_string()),
    )
    .expect("a scratch directory");
    let pool = DirPool::open(dir.path()).expect("a pool");
    let size = 1u64 << 30;
    let base = pool
        .create(&NewVolume {
            name: "base".into(),
            format: Format::Qcow2,
            size,
            source: Source::Blank,
        })
        .await
        .expect("the base volume");
    // Every byte written, as a used disk would be.
    let written = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -q -P 0x5a 0 1G"])
        .arg(&base.path)
        .status()
        .expect("qemu-io runs");
    assert!(written.success(), "qemu-io filled the base volume");
    let clone = |name: &str, linked: bool| NewVolume {
        name: name.into(),
        format: Format::Qcow2,
        size,
        source: Source::Clone {
            from: base.path.clone(),
            format: Format::Qcow2,
            linked,
        },
    };
    let started = Instant::now();
    pool.create(&clone("linked", true))
        .await
        .expect("a linked clone");
    let linked_ms = started.elapsed().as_secs_f64() * 1000.0;
    let started = Instant::now();
    pool.create(&clone("full", false))
        .await
        .expect("a full clone");
    let full_ms = started.elapsed().as_secs_f64() * 1000.0;
    let started = Instant::now();
    let copied = std::process::Command::new("cp")
        .arg(&base.path)
        .arg(dir.path().join("copy.bin"))
        .status()
        .expect("cp runs");
    assert!(copied.success());
    let cp_ms = started.elapsed().as_secs_f64() * 1000.0;
    println!(
        "{{\"bench\":\"volume_clones\",\"size_bytes\":{size},\"linked_ms\":{linked_ms:.1},\"full_ms\":{full_ms:.1},\"cp_ms\":{cp_ms:.1}}}"
    );
}
