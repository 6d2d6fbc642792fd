//! `qemu-img`, typed: create (qcow2 as compat 1.1), info, resize and convert. Argument vectors
//! only; file names come from the pool, never from users.

use std::path::{Path, PathBuf};

use crate::StorageError;

/// A volume's on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    fn parse(s: &str) -> Option<Format> {
        match s {
            "qcow2" => Some(Format::Qcow2),
            "raw" => Some(Format::Raw),
            _ => None,
        }
    }
}

/// What `qemu-img info` says of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes on disk.
    pub actual_size: u64,
    /// The backing file, as an absolute path.
    pub backing: Option<PathBuf>,
    /// qcow2's corrupt flag.
    pub corrupt: bool,
}

/// Runs `qemu-img args`; fails with its stderr.
async fn run(args: &[&str]) -> Result<String, StorageError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| StorageError::Tool {
            program: "qemu-img".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(StorageError::Command {
            command: format!("qemu-img {}", args.first().copied().unwrap_or_default()),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

/// Makes `path`: `size` bytes of `format`, blank or over `backing` (copy-on-write, qcow2 only).
pub async fn create(
    path: &Path,
    format: Format,
    size: u64,
    backing: Option<(&Path, Format)>,
) -> Result<(), StorageError> {
    let size = size.to_string();
    let path = text(path);
    let mut args = vec!["create", "-q", "-f", format.as_str()];
    if format == Format::Qcow2 {
        // compat 1.1 (qcow2 v3): lazy refcounts, zero clusters; what every QEMU since 1.1 reads.
        args.extend(["-o", "compat=1.1"]);
    }
    let backing_text;
    if let Some((file, backing_format)) = backing {
        backing_text = text(file);
        args.extend(["-b", &backing_text, "-F", backing_format.as_str()]);
    }
    args.extend([path.as_str(), size.as_str()]);
    run(&args).await.map(drop)
}

/// Copies `from` (of `from_format`) into a new file `to` of `format`, every byte: a full clone.
pub async fn convert(
    from: &Path,
    from_format: Format,
    to: &Path,
    format: Format,
) -> Result<(), StorageError> {
    let (from, to) = (text(from), text(to));
    let mut args = vec![
        "convert",
        "-q",
        "-f",
        from_format.as_str(),
        "-O",
        format.as_str(),
    ];
    if format == Format::Qcow2 {
        args.extend(["-o", "compat=1.1"]);
    }
    args.extend([from.as_str(), to.as_str()]);
    run(&args).await.map(drop)
}

/// Writes every byte of `from` (of `from_format`) into `target`, which exists already and is
/// at least as large: a raw volume of another backend, named as QEMU's block layer names it
/// (`rbd:pool/image:...`).
pub async fn convert_into(
    from: &Path,
    from_format: Format,
    target: &str,
) -> Result<(), StorageError> {
    let from = text(from);
    let args = [
        "convert",
        "-q",
        "-n",
        "-f",
        from_format.as_str(),
        "-O",
        "raw",
        from.as_str(),
        target,
    ];
    run(&args).await.map(drop)
}

/// Grows `path` to `size` bytes (the caller refuses shrinking: data would be lost).
pub async fn resize(path: &Path, format: Format, size: u64) -> Result<(), StorageError> {
    let (path, size) = (text(path), size.to_string());
    run(&["resize", "-q", "-f", format.as_str(), &path, &size])
        .await
        .map(drop)
}

/// Writes what the overlay `top` (qcow2) holds into its backing file; `top` still reads the
/// same afterwards (its clusters stay, now equal to the backing file's), so a commit cut short
/// and run again loses nothing. Only with nothing else open on either file.
pub async fn commit(top: &Path) -> Result<(), StorageError> {
    run(&["commit", "-q", "-d", "-f", "qcow2", &text(top)])
        .await
        .map(drop)
}

/// `qemu-img info` of `path` (`-U`: a running QEMU may hold it).
pub async fn info(path: &Path) -> Result<ImageInfo, StorageError> {
    let out = run(&["info", "-U", "--output=json", &text(path)]).await?;
    let unreadable = |what: &str| StorageError::Command {
        command: "qemu-img info".into(),
        message: format!("{}: {what}", path.display()),
    };
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| unreadable(&format!("unreadable answer: {e}")))?;
    let format = v["format"]
        .as_str()
        .and_then(Format::parse)
        .ok_or_else(|| unreadable(&format!("format {} is neither qcow2 nor raw", v["format"])))?;
    Ok(ImageInfo {
        format,
        virtual_size: v["virtual-size"].as_u64().unwrap_or(0),
        actual_size: v["actual-size"].as_u64().unwrap_or(0),
        backing: v["full-backing-filename"]
            .as_str()
            .or(v["backing-filename"].as_str())
            .map(PathBuf::from),
        corrupt: v["format-specific"]["data"]["corrupt"].as_bool() == Some(true),
    })
}

/// `qemu-img info` of a file QEMU's block layer names by URL (`nfs://...`), read as `format`
/// (never probed: a raw file could claim to be anything).
pub async fn info_of(target: &str, format: Format) -> Result<ImageInfo, StorageError> {
    let out = run(&["info", "-U", "--output=json", "-f", format.as_str(), target]).await?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| StorageError::Command {
        command: "qemu-img info".into(),
        message: format!("unreadable answer: {e}"),
    })?;
    Ok(ImageInfo {
        format,
        virtual_size: v["virtual-size"].as_u64().unwrap_or(0),
        actual_size: v["actual-size"].as_u64().unwrap_or(0),
        backing: v["backing-filename"].as_str().map(PathBuf::from),
        corrupt: v["format-specific"]["data"]["corrupt"].as_bool() == Some(true),
    })
}

/// Makes a blank file at a URL (qcow2 as compat 1.1).
pub async fn create_at(target: &str, format: Format, size: u64) -> Result<(), StorageError> {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", format.as_str()];
    if format == Format::Qcow2 {
        args.extend(["-o", "compat=1.1"]);
    }
    args.extend([target, size.as_str()]);
    run(&args).await.map(drop)
}

/// Copies every byte of `from` (a path or URL) into a new file `to` (a URL) of `format`.
pub async fn convert_to(
    from: &str,
    from_format: Format,
    to: &str,
    format: Format,
) -> Result<(), StorageError> {
    let mut args = vec![
        "convert",
        "-q",
        "-f",
        from_format.as_str(),
        "-O",
        format.as_str(),
    ];
    if format == Format::Qcow2 {
        args.extend(["-o", "compat=1.1"]);
    }
    args.extend([from, to]);
    run(&args).await.map(drop)
}

/// Grows the file at a URL to `size` bytes.
pub async fn resize_at(target: &str, format: Format, size: u64) -> Result<(), StorageError> {
    let size = size.to_string();
    run(&["resize", "-q", "-f", format.as_str(), target, &size])
        .await
        .map(drop)
}
