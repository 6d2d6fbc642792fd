//! The web UI's browser suite (`ui/tests`, run by `node --test`) in the test run: Debian's
//! Chromium driven by playwright-core against a real `flotilla up` of this build, with real
//! QEMU tiny guests. `make test` installs Chromium and the npm packages and builds `ui/dist`
//! first; elsewhere the test says what is missing (and fails under FLOTILLA_REQUIRE_CLIENTS).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_web_ui_works_in_a_real_browser() {
    let ui = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../ui");
    let missing: Vec<&str> = [
        (
            "/usr/bin/chromium",
            "chromium (scripts/install-deps.sh test)",
        ),
        (
            "node_modules/playwright-core",
            "the UI's npm packages (scripts/build-ui.sh)",
        ),
        ("dist/index.html", "the built UI (scripts/build-ui.sh)"),
    ]
    .into_iter()
    .filter(|(path, _)| !ui.join(path).exists())
    .map(|(_, what)| what)
    .collect();
    if !missing.is_empty() {
        let message = format!("the browser suite needs {}", missing.join(", "));
        assert!(
            std::env::var_os("FLOTILLA_REQUIRE_CLIENTS").is_none(),
            "{message}"
        );
        eprintln!("skipped: {message}");
        return;
    }
    let status = Command::new("node")
        .args(["--test", "--test-concurrency=1", "tests/"])
        .current_dir(&ui)
        .env("FLOTILLA_BIN", env!("CARGO_BIN_EXE_flotilla"))
        .status()
        .expect("node runs");
    assert!(
        status.success(),
        "the browser suite failed (its report is above)"
    );
}
