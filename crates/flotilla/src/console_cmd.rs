//! `flotilla vm console NAME`: the VM's serial console in this terminal, through the server
//! (the same WebSocket the web UI uses). Ctrl-] leaves, as with `virsh console`.

use anyhow::Context as _;
use flotilla_client::{Client, ConsoleKind};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Ctrl-]: typed, it closes the console instead of reaching the guest.
pub const ESCAPE: u8 = 0x1d;

pub async fn run(client: &Client, project: &str, name: &str) -> anyhow::Result<()> {
    let socket = client
        .console(project, name, ConsoleKind::Serial)
        .await
        .with_context(|| format!("cannot open the console of virtualmachine/{name}"))?;
    eprintln!("Connected to the serial console of virtualmachine/{name}; Ctrl-] leaves.\r");
    let _raw = RawTerminal::enter();
    let (mut to_vm, mut from_vm) = socket.split();
    let typed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = stdin.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                // Input ended (a pipe): keep showing output until the console closes.
                return std::future::pending::<()>().await;
            }
            let input = &buf[..n];
            let (input, leave) = match input.iter().position(|b| *b == ESCAPE) {
                Some(at) => (&input[..at], true),
                None => (input, false),
            };
            if !input.is_empty()
                && to_vm
                    .send(Message::Binary(input.to_vec().into()))
                    .await
                    .is_err()
            {
                return;
            }
            if leave {
                let _ = to_vm.send(Message::Close(None)).await;
                return;
            }
        }
    };
    let shown = async {
        let mut stdout = tokio::io::stdout();
        while let Some(message) = from_vm.next().await {
            match message {
                Ok(Message::Binary(b)) => {
                    stdout.write_all(&b).await?;
                    stdout.flush().await?;
                }
                Ok(Message::Text(t)) => {
                    stdout.write_all(t.as_bytes()).await?;
                    stdout.flush().await?;
                }
                Ok(Message::Close(frame)) => {
                    if let Some(f) = frame.filter(|f| !f.reason.is_empty()) {
                        eprintln!("\r\n[{}]\r", f.reason);
                    }
                    break;
                }
                Ok(_) => {}
                Err(e) => anyhow::bail!("the console connection broke: {e}"),
            }
        }
        Ok(())
    };
    tokio::select! {
        _ = typed => {}
        result = shown => result?,
    }
    eprintln!("\r\nDisconnected from virtualmachine/{name}.\r");
    Ok(())
}

/// The terminal in raw mode (keys go to the guest as typed, Ctrl-C included) until dropped;
/// nothing when stdin is not a terminal.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        // SAFETY: termios calls on fd 0 with a zero-initialised struct they fill.
        unsafe {
            if libc::isatty(0) != 1 {
                return RawTerminal(None);
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return RawTerminal(None);
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return RawTerminal(None);
            }
            RawTerminal(Some(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the settings read in `enter`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, saved);
            }
        }
    }
}
