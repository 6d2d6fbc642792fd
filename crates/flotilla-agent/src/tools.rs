//! External tools the agent runs (qemu-img, xorriso): always with argument vectors, never a shell.

use tokio::process::Command;

use crate::error::AgentError;

pub async fn run(program: &str, args: &[&str]) -> Result<String, AgentError> {
    let out = Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| AgentError::Tool {
            program: program.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(AgentError::Command {
            command: format!("{program} {}", args.first().copied().unwrap_or_default()),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
