//! `flotilla`: the server and the command-line client in one binary.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod agent_cmd;
mod client_cmds;
mod config;
mod console_cmd;
mod drain_cmd;
mod image_cmd;
mod login_cmd;
mod output;
mod server_cmd;
mod volume_cmd;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Declarative VM orchestration for libvirt fleets",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The daemons take their own flags; the client commands take the connection flags
/// ([`config::ConnectionArgs`]), anywhere after the command's name.
#[derive(Subcommand)]
enum Command {
    /// Run the API server (SQLite in the data directory).
    Server(server_cmd::ServerArgs),
    /// Run a node agent: joins the cluster and runs the VMs bound to this host.
    Agent(agent_cmd::AgentArgs),
    /// Run everything in one process: server, controllers and a local agent.
    Up(agent_cmd::UpArgs),
    #[command(hide = true)]
    AgentWatchdog(agent_cmd::WatchdogArgs),
    /// Node operations.
    Node {
        #[command(subcommand)]
        cmd: client_cmds::NodeCommand,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// VM operations: start, stop, restart.
    Vm {
        #[command(subcommand)]
        cmd: client_cmds::VmCommand,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// Image operations: upload.
    Image {
        #[command(subcommand)]
        cmd: image_cmd::ImageCommand,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// Volume operations: create, attach, detach, resize, snapshot, revert.
    Volume {
        #[command(subcommand)]
        cmd: volume_cmd::VolumeCommand,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// Create or update objects from YAML files (multi-document), a directory, or - for stdin.
    Apply {
        #[command(flatten)]
        args: client_cmds::ApplyArgs,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// List objects, or show one.
    Get {
        #[command(flatten)]
        args: client_cmds::GetArgs,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// Show one object in detail.
    Describe {
        #[command(flatten)]
        args: client_cmds::DescribeArgs,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// Delete an object.
    Delete {
        #[command(flatten)]
        args: client_cmds::DeleteArgs,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// Sign in as a person through the server's OIDC issuer (browser with PKCE, or --device).
    Login {
        #[command(flatten)]
        args: login_cmd::LoginArgs,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// Credentials: kubectl's exec plugin, and whether you may do something.
    Auth {
        #[command(subcommand)]
        cmd: login_cmd::AuthCommand,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// Service-account tokens: create, list, revoke.
    Token {
        #[command(subcommand)]
        cmd: login_cmd::TokenCommand,
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// Print the client and server versions.
    Version {
        #[command(flatten)]
        conn: config::ConnectionArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("FLOTILLA_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if matches!(
        cli.command,
        Command::Server(_) | Command::Agent(_) | Command::Up(_)
    ) {
        // Daemons hold many connections; the soft limit of 1024 is meant for shells.
        let limit = flotilla_tls::raise_open_file_limit();
        tracing::debug!(open_files = limit, "open-file limit");
    }
    if let Command::AgentWatchdog(args) = cli.command {
        agent_cmd::watchdog(args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => server_cmd::run(args).await,
            Command::Agent(args) => agent_cmd::agent(args).await,
            Command::Up(args) => agent_cmd::up(args).await,
            Command::AgentWatchdog(args) => agent_cmd::watchdog(args),
            Command::Node { cmd, conn } => client_cmds::node(&conn, cmd).await,
            Command::Vm { cmd, conn } => client_cmds::vm(&conn, cmd).await,
            Command::Volume { cmd, conn } => volume_cmd::run(&conn, cmd).await,
            Command::Image { cmd, conn } => image_cmd::run(&conn, cmd).await,
            Command::Completion { shell } => {
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "flotilla",
                    &mut std::io::stdout(),
                );
                Ok(())
            }
            Command::Version { conn } => client_cmds::version(&conn).await,
            Command::Login { args, conn } => login_cmd::login(&conn, args).await,
            Command::Auth { cmd, conn } => login_cmd::auth(&conn, cmd).await,
            Command::Token { cmd, conn } => login_cmd::token(&conn, cmd).await,
            Command::Apply { args, conn } => client_cmds::apply(&conn, args).await,
            Command::Get { args, conn } => client_cmds::get(&conn, args).await,
            Command::Describe { args, conn } => client_cmds::describe(&conn, args).await,
            Command::Delete { args, conn } => client_cmds::delete(&conn, args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The default data directory: /var/lib/flotilla for root, else ~/.local/share/flotilla.
pub fn default_data_dir() -> PathBuf {
    // The owner of /proc/self is the effective user.
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if root {
        return PathBuf::from("/var/lib/flotilla");
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) => PathBuf::from(d).join("flotilla"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
            .join(".local/share/flotilla"),
    }
}
