//! Disks: images cached per node (downloaded or copied once, checksum-verified, stored as
//! qcow2), root disks as qcow2 overlays on the cached image (a linked clone: O(1) in the image's
//! size), and a bounded queue so that disk-heavy work cannot swamp a slow host.
//!
//! The image cache is safe under bursts and crashes:
//! - **One preparation per image.** Concurrent requests for the same image (keyed by its
//!   content: source, format and checksum) wait on a single in-flight preparation and share its
//!   result or its error; distinct images proceed in parallel within the disk queue.
//! - **Nothing half-written is ever used.** Downloads and conversions go to unique temporary
//!   files that are synced and renamed into place ([`flotilla_files`]); leftovers of a crash are
//!   swept at start ([`Disks::sweep_leftovers`]).
//! - **Verified before first use.** Each entry has a manifest (`<key>.json`: format, sizes and
//!   SHA-256 of the cached file) written before the file is renamed into place. The first time
//!   a process uses an entry, `qemu-img info` must agree with the manifest (and the file's hash
//!   too when the Image declares a checksum); an entry that does not is discarded, reported, and
//!   fetched again, so VMs waiting on it proceed without anyone's help.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flotilla_types::{ImageFormat, ImageSpec};
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::error::{io, AgentError};
use crate::tools;

/// Something about the cache worth telling a person (the agent records it as an Event).
#[derive(Clone, Debug)]
pub enum CacheNotice {
    /// A cached entry failed verification and was removed; it is being fetched again.
    Discarded {
        project: String,
        image: String,
        reason: String,
    },
    /// An image was fetched (or copied) and cached.
    Cached {
        project: String,
        image: String,
        bytes: u64,
        took: std::time::Duration,
    },
}

type Notify = Arc<dyn Fn(CacheNotice) + Send + Sync>;
type Preparation = Shared<BoxFuture<'static, Result<PathBuf, Arc<String>>>>;

#[derive(Clone)]
pub struct Disks {
    inner: Arc<Inner>,
}

struct Inner {
    images: PathBuf,
    queue: Semaphore,
    http: reqwest::Client,
    /// Preparations under way, by content key.
    inflight: Mutex<HashMap<String, Preparation>>,
    /// Keys whose cached file this process has verified.
    verified: Mutex<HashSet<String>>,
    notify: Mutex<Option<Notify>>,
    /// The API, for images uploaded to it (set once the agent has its client).
    api: std::sync::OnceLock<Arc<flotilla_client::Client>>,
}

/// What is recorded about a cached file when it is made, and checked before it is first used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    format: String,
    virtual_size: u64,
    bytes: u64,
    sha256: String,
}

fn image_err(image: &str, message: impl Into<String>) -> AgentError {
    AgentError::Image {
        image: image.to_string(),
        message: message.into(),
    }
}

/// The cache key of an image: its content, as far as the spec determines it.
fn content_key(spec: &ImageSpec) -> String {
    let source = spec
        .source
        .url
        .as_deref()
        .or(spec.source.path.as_deref())
        .unwrap_or_default();
    hex::encode(Sha256::digest(format!(
        "{source}\n{:?}\n{:?}",
        spec.format, spec.sha256
    )))
}

impl Disks {
    /// `concurrency` bounds simultaneous downloads, conversions, verifications and disk creations.
    pub fn new(data_dir: &Path, concurrency: usize) -> Self {
        Disks {
            inner: Arc::new(Inner {
                images: data_dir.join("images"),
                queue: Semaphore::new(concurrency.max(1)),
                http: reqwest::Client::builder()
                    .use_rustls_tls()
                    .build()
                    .expect("an HTTP client"),
                inflight: Mutex::new(HashMap::new()),
                verified: Mutex::new(HashSet::new()),
                notify: Mutex::new(None),
                api: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Fetches uploaded images (`source: {upload: {}}`) through `client`.
    pub fn fetch_uploads_with(&self, client: Arc<flotilla_client::Client>) {
        let _ = self.inner.api.set(client);
    }

    /// Calls `f` for every [`CacheNotice`].
    pub fn on_notice(&self, f: impl Fn(CacheNotice) + Send + Sync + 'static) {
        *self.inner.notify.lock().expect("notify lock") = Some(Arc::new(f));
    }

    /// Where the cached images live.
    pub fn images_dir(&self) -> &Path {
        &self.inner.images
    }

    /// Removes what interrupted downloads and conversions left in the cache. Call it at start,
    /// before any preparation runs.
    pub fn sweep_leftovers(&self) -> Result<Vec<PathBuf>, AgentError> {
        flotilla_files::sweep_temps(&self.inner.images, &[".download"])
            .map_err(io(&self.inner.images))
    }

    /// The cached qcow2 of the Image `project/name`, fetching and converting it on first use,
    /// and verifying it the first time this process uses it.
    pub async fn cached_image(
        &self,
        project: &str,
        name: &str,
        spec: &ImageSpec,
    ) -> Result<PathBuf, AgentError> {
        let key = content_key(spec);
        let cached = self.inner.images.join(format!("{key}.qcow2"));
        if self
            .inner
            .verified
            .lock()
            .expect("verified lock")
            .contains(&key)
            && tokio::fs::try_exists(&cached).await.unwrap_or(false)
        {
            return Ok(cached);
        }
        let preparation = {
            let mut inflight = self.inner.inflight.lock().expect("inflight lock");
            match inflight.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let inner = self.inner.clone();
                    let image = (project.to_string(), name.to_string());
                    let (key2, spec) = (key.clone(), spec.clone());
                    // A task of its own: a requester that gives up (its VM was deleted) does not
                    // abandon the preparation the others wait on.
                    let task = tokio::spawn(async move {
                        let result = inner.prepare(&key2, &image, &spec).await;
                        inner.inflight.lock().expect("inflight lock").remove(&key2);
                        result.map_err(|e| Arc::new(e.to_string()))
                    });
                    let p: Preparation = async move {
                        task.await
                            .unwrap_or_else(|e| Err(Arc::new(format!("preparation failed: {e}"))))
                    }
                    .boxed()
                    .shared();
                    inflight.insert(key.clone(), p.clone());
                    p
                }
            }
        };
        preparation.await.map_err(|message| AgentError::Image {
            image: name.to_string(),
            message: message.to_string(),
        })
    }

    /// Creates `dest` (once): an overlay on `backing` if given, else a blank disk. `size` grows
    /// the virtual disk (a size below the image's is an error from qemu-img, reported as such).
    /// A place in the node's disk queue: disk-heavy work (copies, conversions) holds one.
    pub async fn queued(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.inner.queue.acquire().await.expect("never closed")
    }

    pub async fn create_root_disk(
        &self,
        backing: Option<&Path>,
        dest: &Path,
        size: Option<u128>,
    ) -> Result<(), AgentError> {
        if tokio::fs::try_exists(dest).await.unwrap_or(false) {
            return Ok(());
        }
        let _permit = self.inner.queue.acquire().await.expect("never closed");
        let tmp = flotilla_files::temp_path(dest);
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
        args.push(tmp.display().to_string());
        match (backing, size) {
            (_, Some(s)) => args.push(s.to_string()),
            (None, None) => args.push((10u128 << 30).to_string()),
            (Some(_), None) => {}
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(e) = tools::run("qemu-img", &refs).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        commit(tmp, dest.to_path_buf()).await
    }
}

impl Inner {
    fn notify(&self, notice: CacheNotice) {
        let notify = self.notify.lock().expect("notify lock").clone();
        if let Some(notify) = notify {
            notify(notice);
        }
    }

    /// Verifies the cached entry (or discards it) and fetches it when there is none.
    async fn prepare(
        &self,
        key: &str,
        (project, name): &(String, String),
        spec: &ImageSpec,
    ) -> Result<PathBuf, AgentError> {
        let name = name.as_str();
        let started = std::time::Instant::now();
        let cached = self.images.join(format!("{key}.qcow2"));
        let manifest_path = self.images.join(format!("{key}.json"));
        let _permit = self.queue.acquire().await.expect("never closed");
        if tokio::fs::try_exists(&cached).await.unwrap_or(false) {
            match self.verify(&cached, &manifest_path, spec).await? {
                Checked::Sound => {
                    self.verified
                        .lock()
                        .expect("verified lock")
                        .insert(key.to_string());
                    return Ok(cached);
                }
                Checked::Bad(reason) => {
                    tracing::warn!(image = name, path = %cached.display(), %reason, "discarding a bad image cache entry; fetching it again");
                    remove_blocking(&cached).await?;
                    remove_blocking(&manifest_path).await?;
                    self.notify(CacheNotice::Discarded {
                        project: project.clone(),
                        image: name.to_string(),
                        reason,
                    });
                }
            }
        }
        tokio::fs::create_dir_all(&self.images)
            .await
            .map_err(io(&self.images))?;
        let remote = match (&spec.source.url, &spec.source.upload) {
            (Some(url), _) => Some(Remote::Url(url)),
            (None, Some(_)) => Some(Remote::Upload),
            (None, None) => None,
        };
        let (input, downloaded) = match (remote, &spec.source.path) {
            (Some(remote), _) => {
                let part = flotilla_files::temp_path(&self.images.join(format!("{key}.download")));
                // A failed or unverifiable download leaves nothing behind.
                let checked = match self.fetch(project, name, remote, &part).await {
                    Ok(sum) => verify_checksum(name, spec, &sum),
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
                    verify_checksum(name, spec, &hash_file(&path).await?)?;
                }
                (path, false)
            }
            (None, None) => return Err(image_err(name, "has no source")),
        };
        let fmt = match spec.format {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        };
        let tmp = flotilla_files::temp_path(&cached);
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
        let made = match converted {
            Ok(_) => describe(&tmp).await,
            Err(e) => Err(image_err(name, format!("is not a valid {fmt} image: {e}"))),
        };
        let manifest = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        // The manifest first: a crash before the rename leaves a manifest that no file matches,
        // which verification rejects; never a file without the manifest that vouches for it.
        write_manifest(&manifest_path, &manifest).await?;
        commit(tmp, cached.clone()).await?;
        self.verified
            .lock()
            .expect("verified lock")
            .insert(key.to_string());
        tracing::info!(image = name, path = %cached.display(), bytes = manifest.bytes, "image cached");
        self.notify(CacheNotice::Cached {
            project: project.clone(),
            image: name.to_string(),
            bytes: manifest.bytes,
            took: started.elapsed(),
        });
        Ok(cached)
    }

    /// Whether the entry at `cached` may be used. Only what the file itself shows makes it Bad
    /// (an unreadable image, another format, sizes or a hash that differ from its manifest);
    /// failing to check at all (qemu-img missing, an I/O error) is an error, and the entry stays.
    async fn verify(
        &self,
        cached: &Path,
        manifest_path: &Path,
        spec: &ImageSpec,
    ) -> Result<Checked, AgentError> {
        let info = match qemu_info(cached).await {
            Ok(info) => info,
            Err(AgentError::Command { message, .. }) => {
                return Ok(Checked::Bad(format!("qemu-img cannot read it: {message}")))
            }
            Err(e) => return Err(e),
        };
        if info.format != "qcow2" {
            return Ok(Checked::Bad(format!(
                "it is {} data, not qcow2",
                info.format
            )));
        }
        if info.corrupt {
            return Ok(Checked::Bad("qemu-img marks it corrupt".into()));
        }
        let recorded: Option<Manifest> = match tokio::fs::read(manifest_path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(manifest_path)(e)),
        };
        let Some(recorded) = recorded else {
            // Entries cached before manifests existed: adopted if qemu-img finds them sound.
            let checked = tools::run(
                "qemu-img",
                &["check", "-U", "-q", &cached.display().to_string()],
            )
            .await;
            return match checked {
                Ok(_) => {
                    write_manifest(manifest_path, &describe(cached).await?).await?;
                    Ok(Checked::Sound)
                }
                Err(AgentError::Command { message, .. }) => Ok(Checked::Bad(format!(
                    "it has no manifest and fails qemu-img check: {message}"
                ))),
                Err(e) => Err(e),
            };
        };
        let bytes = tokio::fs::metadata(cached).await.map_err(io(cached))?.len();
        if bytes != recorded.bytes || info.virtual_size != recorded.virtual_size {
            return Ok(Checked::Bad(format!(
                "it holds {bytes} bytes for a {} byte disk; its manifest says {} bytes for {}",
                info.virtual_size, recorded.bytes, recorded.virtual_size
            )));
        }
        if spec.sha256.is_some() {
            let actual = hash_file(cached).await?;
            if actual != recorded.sha256 {
                return Ok(Checked::Bad(format!(
                    "its SHA-256 is {actual}, not the {} recorded when it was cached",
                    recorded.sha256
                )));
            }
        }
        Ok(Checked::Sound)
    }

    /// Fetches an image's file into `dest` (from its URL, or the API for an upload); returns
    /// its SHA-256.
    async fn fetch(
        &self,
        project: &str,
        name: &str,
        remote: Remote<'_>,
        dest: &Path,
    ) -> Result<String, AgentError> {
        type Chunks =
            std::pin::Pin<Box<dyn futures::Stream<Item = Result<bytes::Bytes, String>> + Send>>;
        let body: Chunks = match remote {
            Remote::Url(url) => {
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
                Box::pin(resp.bytes_stream().map(|c| c.map_err(|e| e.to_string())))
            }
            Remote::Upload => {
                let Some(api) = self.api.get() else {
                    return Err(image_err(
                        name,
                        "is uploaded, and this agent has no API client to fetch it",
                    ));
                };
                let body = api
                    .image_data(project, name)
                    .await
                    .map_err(|e| image_err(name, format!("cannot fetch the upload: {e}")))?;
                Box::pin(body.map(|c| c.map_err(|e| e.to_string())))
            }
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .await
            .map_err(io(dest))?;
        let mut hasher = Sha256::new();
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| image_err(name, format!("download broke off: {e}")))?;
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io(dest))?;
        }
        file.sync_all().await.map_err(io(dest))?;
        Ok(hex::encode(hasher.finalize()))
    }
}

/// Where an image's file is fetched from.
enum Remote<'a> {
    Url(&'a str),
    /// The API, which keeps uploaded images.
    Upload,
}

/// What verification found.
enum Checked {
    Sound,
    Bad(String),
}

struct QemuInfo {
    format: String,
    virtual_size: u64,
    corrupt: bool,
}

/// `qemu-img info` of a file; `-U` because a running QEMU may hold the image as a backing file.
async fn qemu_info(path: &Path) -> Result<QemuInfo, AgentError> {
    let out = tools::run(
        "qemu-img",
        &["info", "-U", "--output=json", &path.display().to_string()],
    )
    .await?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| AgentError::Command {
        command: "qemu-img info".into(),
        message: format!("unreadable answer: {e}"),
    })?;
    Ok(QemuInfo {
        format: v["format"].as_str().unwrap_or_default().to_string(),
        virtual_size: v["virtual-size"].as_u64().unwrap_or(0),
        corrupt: v["format-specific"]["data"]["corrupt"].as_bool() == Some(true),
    })
}

/// The manifest of a finished qcow2 file.
async fn describe(path: &Path) -> Result<Manifest, AgentError> {
    let info = qemu_info(path).await?;
    let bytes = tokio::fs::metadata(path).await.map_err(io(path))?.len();
    Ok(Manifest {
        format: info.format,
        virtual_size: info.virtual_size,
        bytes,
        sha256: hash_file(path).await?,
    })
}

async fn write_manifest(path: &Path, manifest: &Manifest) -> Result<(), AgentError> {
    let json = serde_json::to_vec(manifest).expect("serialises");
    crate::datadir::write_file(path, json, 0o644).await
}

fn verify_checksum(name: &str, spec: &ImageSpec, actual: &str) -> Result<(), AgentError> {
    match &spec.sha256 {
        Some(want) if !want.eq_ignore_ascii_case(actual) => Err(image_err(
            name,
            format!("checksum mismatch: expected sha256 {want}, got {actual}"),
        )),
        _ => Ok(()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Config(e.to_string()))?
}

/// Syncs a finished temporary file and renames it over `dest`, durably.
async fn commit(tmp: PathBuf, dest: PathBuf) -> Result<(), AgentError> {
    blocking(move || flotilla_files::commit(&tmp, &dest).map_err(io(&dest))).await
}

async fn remove_blocking(path: &Path) -> Result<(), AgentError> {
    let p = path.to_path_buf();
    blocking(move || flotilla_files::remove(&p).map_err(io(&p))).await
}

async fn hash_file(path: &Path) -> Result<String, AgentError> {
    let path = path.to_path_buf();
    blocking(move || {
        let mut f = std::fs::File::open(&path).map_err(io(&path))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).map_err(io(&path))?;
        Ok(hex::encode(h.finalize()))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_content_not_the_name() {
        let spec = |url: &str, sha: Option<&str>| ImageSpec {
            source: flotilla_types::ImageSource {
                url: Some(url.into()),
                path: None,
                upload: None,
            },
            format: ImageFormat::Qcow2,
            sha256: sha.map(str::to_string),
        };
        assert_eq!(
            content_key(&spec("http://a/x", None)),
            content_key(&spec("http://a/x", None))
        );
        assert_ne!(
            content_key(&spec("http://a/x", None)),
            content_key(&spec("http://a/y", None))
        );
        assert_ne!(
            content_key(&spec("http://a/x", None)),
            content_key(&spec("http://a/x", Some("ab")))
        );
    }
}
