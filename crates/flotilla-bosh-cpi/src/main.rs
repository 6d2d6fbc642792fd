//! `flotilla-bosh-cpi [CONFIG]`: one CPI call. The request is read from stdin, the response
//! written to stdout; logs go to stderr. The exit code is 0 whatever happened (bosh-cli fails a
//! call on any other), errors are in the response. CONFIG defaults to the
//! `FLOTILLA_BOSH_CPI_CONFIG` environment variable, then `/var/vcap/jobs/flotilla_cpi/config/cpi.json`.

use std::io::{Read, Write};

const DEFAULT_CONFIG: &str = "/var/vcap/jobs/flotilla_cpi/config/cpi.json";

fn main() {
    let path = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("FLOTILLA_BOSH_CPI_CONFIG").ok())
        .unwrap_or_else(|| DEFAULT_CONFIG.to_string());
    let mut input = Vec::new();
    let response = match std::io::stdin().read_to_end(&mut input) {
        Err(e) => flotilla_bosh_cpi::protocol::response(
            Err(flotilla_bosh_cpi::protocol::CpiError::Cpi(format!(
                "cannot read the request from stdin: {e}"
            ))),
            "",
        ),
        Ok(_) => {
            let config = flotilla_bosh_cpi::config::Config::load(std::path::Path::new(&path));
            // A bug must not cost the exit code either: a panic is answered as a CpiError.
            let run = std::panic::catch_unwind(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start: {e}"))?;
                Ok::<_, String>(runtime.block_on(flotilla_bosh_cpi::handle(&input, config)))
            });
            let failed = |message: String| {
                flotilla_bosh_cpi::protocol::response(
                    Err(flotilla_bosh_cpi::protocol::CpiError::Cpi(message)),
                    "",
                )
            };
            match run {
                Ok(Ok(response)) => response,
                Ok(Err(message)) => failed(message),
                Err(_) => failed("the CPI failed unexpectedly (a bug; see its stderr)".into()),
            }
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{response}");
    let _ = out.flush();
}
