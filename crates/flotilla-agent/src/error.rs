//! The agent's errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("API: {0}")]
    Api(#[from] flotilla_client::ClientError),
    #[error("libvirt: {0}")]
    Libvirt(String),
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The tool ran and failed.
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    /// The tool could not be run at all.
    #[error("cannot run {program}: {source} (is it installed?)")]
    Tool {
        program: String,
        source: std::io::Error,
    },
    #[error("image {image}: {message}")]
    Image { image: String, message: String },
    #[error("{0}")]
    Config(String),
}

impl From<virt::error::Error> for AgentError {
    fn from(e: virt::error::Error) -> Self {
        AgentError::Libvirt(e.to_string())
    }
}

pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::Io {
        path: path.to_path_buf(),
        source,
    }
}
