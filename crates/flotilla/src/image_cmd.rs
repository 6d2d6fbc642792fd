//! `flotilla image upload NAME FILE`: makes an Image whose source is an upload (unless it
//! exists) and streams the file to the server, printing progress; the server checks it (size,
//! SHA-256, format) before the nodes may use it.

use std::time::Instant;

use anyhow::{anyhow, Context as _};
use flotilla_types::registry;
use futures::StreamExt;
use serde_json::json;

use crate::client_cmds::project;
use crate::config::{self, ConnectionArgs};

#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Upload a disk image file (qcow2 or raw) as an Image of the project.
    Upload {
        name: String,
        file: std::path::PathBuf,
        /// qcow2 (default) or raw: what the file is (the server checks).
        #[arg(long)]
        format: Option<String>,
        /// The file's expected SHA-256 (hex); the server refuses another.
        #[arg(long)]
        sha256: Option<String>,
        #[arg(short = 'p', long)]
        project: Option<String>,
    },
}

pub async fn run(conn: &ConnectionArgs, cmd: ImageCommand) -> anyhow::Result<()> {
    let (client, ctx) = config::client(conn).await?;
    let ImageCommand::Upload {
        name,
        file,
        format,
        sha256,
        project: p,
    } = cmd;
    let proj = project(&p, &ctx).to_string();
    upload(&client, &proj, &name, &file, format, sha256).await
}

/// Makes Image `name` of project `proj` from an upload (unless it exists) and streams `file`
/// into it, printing progress.
pub async fn upload(
    client: &flotilla_client::Client,
    proj: &str,
    name: &str,
    file: &std::path::Path,
    format: Option<String>,
    sha256: Option<String>,
) -> anyhow::Result<()> {
    let images = registry::by_kind("Image").expect("registered");
    let opened = tokio::fs::File::open(&file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let len = opened.metadata().await?.len();
    let mut spec = json!({"source": {"upload": {}}});
    if let Some(f) = format {
        spec["format"] = json!(f);
    }
    if let Some(s) = sha256 {
        spec["sha256"] = json!(s);
    }
    let body = json!({"metadata": {"name": name}, "spec": spec});
    match client.create(images, Some(proj), &body).await {
        Ok(_) => eprintln!("image/{name} created"),
        Err(e) if e.code() == Some(409) => {}
        Err(e) => return Err(e.into()),
    }
    let started = Instant::now();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    let chunks = flotilla_files::chunks(opened, 1 << 20).inspect(move |chunk| {
        if let Ok(c) = chunk {
            counter.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let progress = tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let done = sent.load(std::sync::atomic::Ordering::Relaxed);
            eprint!(
                "\r{:>5.1}%  {} of {} MiB",
                done as f64 * 100.0 / len.max(1) as f64,
                done >> 20,
                len >> 20
            );
        }
    });
    let result = client
        .upload_image(proj, name, reqwest::Body::wrap_stream(chunks), len)
        .await;
    progress.abort();
    let image = result.map_err(|e| anyhow!("{e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!();
    println!(
        "image/{name} uploaded: {} bytes in {seconds:.1} s ({:.0} MiB/s), sha256 {}",
        image["status"]["upload"]["bytes"],
        len as f64 / (1 << 20) as f64 / seconds.max(1e-3),
        image["status"]["upload"]["sha256"]
            .as_str()
            .unwrap_or_default()
    );
    Ok(())
}
