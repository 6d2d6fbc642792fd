//! Stemcells: the director unpacks a stemcell tarball and hands `create_stemcell` the path of
//! its `image` file, which for OpenStack stemcells is a gzipped tar holding `root.img` (qcow2
//! or raw). It becomes a Flotilla Image, streamed to the API (never held in memory) and
//! checked by its SHA-256 on arrival.

use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use serde_json::{json, Value};
use sha2::Digest;

use crate::cloud::{api, kind, labels, new_name, Cloud};
use crate::protocol::CpiError;

/// Bytes read from the stemcell per chunk sent.
const CHUNK: usize = 1 << 20;

/// Where the disk image is inside the file: the whole file (a bare image), or an entry of a
/// gzipped tar (`root.img`).
enum Source {
    Bare(std::fs::File, u64),
    Tarball(Box<tar::Archive<flate2::read::GzDecoder<std::fs::File>>>),
}

fn unreadable(path: &Path, e: impl std::fmt::Display) -> CpiError {
    CpiError::cloud(format!(
        "cannot read the stemcell image {}: {e}",
        path.display()
    ))
}

/// Streams the disk image at `path` into `sink` chunk by chunk, in a blocking thread, once it
/// has said its length on `sized`; returns the length sent and the SHA-256.
fn stream_image(
    path: &Path,
    sink: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    sized: tokio::sync::oneshot::Sender<u64>,
) -> Result<(u64, String), CpiError> {
    let mut file = std::fs::File::open(path).map_err(|e| unreadable(path, e))?;
    let mut magic = [0u8; 2];
    file.read_exact(&mut magic)
        .map_err(|e| unreadable(path, e))?;
    let file = std::fs::File::open(path).map_err(|e| unreadable(path, e))?;
    let source = if magic == [0x1f, 0x8b] {
        Source::Tarball(Box::new(tar::Archive::new(flate2::read::GzDecoder::new(
            file,
        ))))
    } else {
        let len = file.metadata().map_err(|e| unreadable(path, e))?.len();
        Source::Bare(file, len)
    };
    let send = |reader: &mut dyn Read, len: u64| -> Result<(u64, String), CpiError> {
        let _ = sized.send(len);
        let (mut hash, mut total) = (sha2::Sha256::new(), 0u64);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = reader.read(&mut buf).map_err(|e| unreadable(path, e))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            total += n as u64;
            if sink
                .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                .is_err()
            {
                return Err(CpiError::Cloud {
                    message: "the upload of the stemcell stopped".into(),
                    ok_to_retry: true,
                });
            }
        }
        Ok((total, hex::encode(hash.finalize())))
    };
    match source {
        Source::Bare(mut file, len) => send(&mut file, len),
        Source::Tarball(mut archive) => {
            for entry in archive.entries().map_err(|e| unreadable(path, e))? {
                let mut entry = entry.map_err(|e| unreadable(path, e))?;
                let name = entry.path().map_err(|e| unreadable(path, e))?.into_owned();
                if name.file_name().is_some_and(|n| n == "root.img") {
                    let len = entry.header().size().map_err(|e| unreadable(path, e))?;
                    return send(&mut entry, len);
                }
            }
            Err(CpiError::cloud(format!(
                "the stemcell image {} holds no root.img",
                path.display()
            )))
        }
    }
}

impl Cloud {
    /// Imports the stemcell image at `image_path` as an Image; returns its CID.
    pub async fn create_stemcell(
        &self,
        image_path: &str,
        cloud_properties: &Value,
    ) -> Result<String, CpiError> {
        let name = new_name("sc-", 32);
        let stemcell = format!(
            "{}/{}",
            cloud_properties["name"].as_str().unwrap_or("stemcell"),
            cloud_properties["version"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| cloud_properties["version"].to_string())
        );
        let path = std::path::PathBuf::from(image_path);
        // The format is read from the image itself once streaming starts; the Image needs one
        // now, so the first bytes are looked at first.
        let format = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || sniff_format(&path))
                .await
                .expect("sniffing does not panic")?
        };
        if let Some(said) = cloud_properties["disk_format"].as_str() {
            if said != format {
                self.note(format!(
                    "the stemcell says disk_format {said}; its image is {format}"
                ));
            }
        }
        let body = json!({
            "metadata": {"name": name, "labels": labels(&[]), "annotations": {"bosh.flotilla.dev/stemcell": stemcell}},
            "spec": {"source": {"upload": {}}, "format": format},
        });
        self.client
            .create(kind("image"), Some(self.project()), &body)
            .await
            .map_err(|e| api("making the stemcell's Image", e))?;
        self.note(format!("uploading stemcell {stemcell} as Image {name}"));
        match self.upload(&name, path).await {
            Ok(()) => Ok(name),
            Err(e) => {
                if let Err(cleanup) = self.remove("image", &name).await {
                    self.note(format!("removing Image {name} failed too: {cleanup}"));
                }
                Err(e)
            }
        }
    }

    async fn upload(&self, name: &str, path: std::path::PathBuf) -> Result<(), CpiError> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (sized_tx, sized_rx) = tokio::sync::oneshot::channel();
        let reader = tokio::task::spawn_blocking(move || stream_image(&path, tx, sized_tx));
        let Ok(len) = sized_rx.await else {
            return Err(reader
                .await
                .expect("reading does not panic")
                .err()
                .unwrap_or_else(|| CpiError::cloud("the stemcell image could not be read")));
        };
        let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        }));
        let uploaded = self
            .client
            .upload_image(self.project(), name, body, len)
            .await;
        // The server's refusal says more than the reader's "the upload stopped" it causes.
        let read = reader.await.expect("reading does not panic");
        let image = uploaded.map_err(|e| api("uploading the stemcell", e))?;
        let (sent, sha256) = read?;
        let upload = &image["status"]["upload"];
        if upload["sha256"] != sha256.as_str() || upload["bytes"] != sent {
            return Err(CpiError::Cloud {
                message: format!(
                    "the stemcell arrived damaged: {sent} bytes with SHA-256 {sha256} were sent, the server has {} bytes with {}",
                    upload["bytes"], upload["sha256"]
                ),
                ok_to_retry: true,
            });
        }
        self.note(format!("stemcell uploaded: {sent} bytes, SHA-256 {sha256}"));
        Ok(())
    }

    pub async fn delete_stemcell(&self, cid: &str) -> Result<(), CpiError> {
        self.remove("image", cid).await
    }
}

/// `qcow2` or `raw`, by the image's first bytes (inside the tarball when it is one).
fn sniff_format(path: &Path) -> Result<&'static str, CpiError> {
    let mut file = std::fs::File::open(path).map_err(|e| unreadable(path, e))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(|e| unreadable(path, e))?;
    let head = |r: &mut dyn Read| -> Result<&'static str, CpiError> {
        let mut m = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = r.read(&mut m[got..]).map_err(|e| unreadable(path, e))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(if m == *b"QFI\xfb" { "qcow2" } else { "raw" })
    };
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        let file = std::fs::File::open(path).map_err(|e| unreadable(path, e))?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        for entry in archive.entries().map_err(|e| unreadable(path, e))? {
            let mut entry = entry.map_err(|e| unreadable(path, e))?;
            if entry
                .path()
                .is_ok_and(|p| p.file_name().is_some_and(|n| n == "root.img"))
            {
                return head(&mut entry);
            }
        }
        return Err(CpiError::cloud(format!(
            "the stemcell image {} holds no root.img",
            path.display()
        )));
    }
    head(&mut &magic[..n])
}
