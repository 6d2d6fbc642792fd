//! Disks: images cached per node (downloaded or copied once, checksum-verified, stored as
//! qcow2), root disks as qcow2 overlays on the cached image (a linked clone: O(1) in the image's
//! size), and a bounded queue so that disk-heavy work cannot swamp a slow host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_types::{ImageFormat, ImageSpec};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::error::{io, AgentError};
use crate::tools;

#[derive(Clone)]
pub struct Disks {
    images: PathBuf,
    queue: Arc<Semaphore>,
    http: reqwest::Client,
}

fn image_err(image: &str, message: impl Into<String>) -> AgentError {
    AgentError::Image {
        image: image.to_string(),
        message: message.into(),
    }
}

impl Disks {
    /// `concurrency` bounds simultaneous downloads, conversions and disk creations.
    pub fn new(data_dir: &Path, concurrency: usize) -> Self {
        Disks {
            images: data_dir.join("images"),
            queue: Arc::new(Semaphore::new(concurrency.max(1))),
            http: reqwest::Client::builder()
                .use_rustls_tls()
                .build()
                .expect("an HTTP client"),
        }
    }

    /// The cached qcow2 of an image, fetching and converting it on first use.
    pub async fn cached_image(&self, name: &str, spec: &ImageSpec) -> Result<PathBuf, AgentError> {
        let source = spec
            .source
            .url
            .as_deref()
            .or(spec.source.path.as_deref())
            .unwrap_or_default();
        let key = hex::encode(Sha256::digest(format!(
            "{source}\n{:?}\n{:?}",
            spec.format, spec.sha256
        )));
        let cached = self.images.join(format!("{key}.qcow2"));
        if tokio::fs::try_exists(&cached).await.unwrap_or(false) {
            return Ok(cached);
        }
        let _permit = self
            .queue
            .acquire()
            .await
            .expect("the queue is never closed");
        if tokio::fs::try_exists(&cached).await.unwrap_or(false) {
            return Ok(cached);
        }
        tokio::fs::create_dir_all(&self.images)
            .await
            .map_err(io(&self.images))?;
        let (input, downloaded) = match (&spec.source.url, &spec.source.path) {
            (Some(url), _) => {
                let part = self.images.join(format!("{key}.download"));
                // A failed or unverifiable download leaves nothing behind.
                let checked = match self.download(name, url, &part).await {
                    Ok(sum) => verify(name, spec, &sum),
                    Err(e) => Err(e),
                };
                if let Err(e) = checked {
                    let _ = tokio::fs::remove_file(&part).await;
                    return Err(e);
                }
                (part, true)
            }
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                if spec.sha256.is_some() {
                    verify(name, spec, &hash_file(&path).await?)?;
                }
                (path, false)
            }
            (None, None) => return Err(image_err(name, "has no source")),
        };
        let fmt = match spec.format {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        };
        let tmp = self.images.join(format!("{key}.tmp"));
        let converted = tools::run(
            "qemu-img",
            &[
                "convert",
                "-f",
                fmt,
                "-O",
                "qcow2",
                &input.display().to_string(),
                &tmp.display().to_string(),
            ],
        )
        .await;
        if downloaded {
            let _ = tokio::fs::remove_file(&input).await;
        }
        if let Err(e) = converted {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(image_err(name, format!("is not a valid {fmt} image: {e}")));
        }
        tokio::fs::rename(&tmp, &cached)
            .await
            .map_err(io(&cached))?;
        tracing::info!(image = name, path = %cached.display(), "image cached");
        Ok(cached)
    }

    async fn download(&self, name: &str, url: &str, dest: &Path) -> Result<String, AgentError> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| image_err(name, format!("download failed: {e}")))?;
        if !resp.status().is_success() {
            return Err(image_err(
                name,
                format!("download failed: {url} answered {}", resp.status()),
            ));
        }
        let mut file = tokio::fs::File::create(dest).await.map_err(io(dest))?;
        let mut hasher = Sha256::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| image_err(name, format!("download broke off: {e}")))?;
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io(dest))?;
        }
        file.sync_all().await.map_err(io(dest))?;
        Ok(hex::encode(hasher.finalize()))
    }

    /// Creates `dest` (once): an overlay on `backing` if given, else a blank disk. `size` grows
    /// the virtual disk (a size below the image's is an error from qemu-img, reported as such).
    pub async fn create_root_disk(
        &self,
        backing: Option<&Path>,
        dest: &Path,
        size: Option<u128>,
    ) -> Result<(), AgentError> {
        if tokio::fs::try_exists(dest).await.unwrap_or(false) {
            return Ok(());
        }
        let _permit = self
            .queue
            .acquire()
            .await
            .expect("the queue is never closed");
        let tmp = dest.with_extension("qcow2.tmp");
        let tmp_s = tmp.display().to_string();
        let mut args = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
        ];
        if let Some(b) = backing {
            args.extend([
                "-F".into(),
                "qcow2".into(),
                "-b".into(),
                b.display().to_string(),
            ]);
        }
        args.push(tmp_s);
        match (backing, size) {
            (_, Some(s)) => args.push(s.to_string()),
            (None, None) => args.push((10u128 << 30).to_string()),
            (Some(_), None) => {}
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        tools::run("qemu-img", &refs).await?;
        tokio::fs::rename(&tmp, dest).await.map_err(io(dest))
    }
}

fn verify(name: &str, spec: &ImageSpec, actual: &str) -> Result<(), AgentError> {
    match &spec.sha256 {
        Some(want) if !want.eq_ignore_ascii_case(actual) => Err(image_err(
            name,
            format!("checksum mismatch: expected sha256 {want}, got {actual}"),
        )),
        _ => Ok(()),
    }
}

async fn hash_file(path: &Path) -> Result<String, AgentError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path).map_err(io(&path))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).map_err(io(&path))?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(|e| AgentError::Config(e.to_string()))?
}
