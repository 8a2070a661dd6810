//! The `sluice` command.
#![forbid(unsafe_code)]

use std::io::{Read as _, Write as _};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sluice_plugin::admin::{self, AdminClient};
use tracing_subscriber::EnvFilter;

/// sluice: a Docker network driver and IPAM plugin.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log level or filter (`info`, `debug`, `sluice_driver=trace`); RUST_LOG also works.
    #[arg(long, global = true, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Unix socket of the admin API. `sluice policy` uses /run/sluice/sluice.sock unless
    /// told otherwise; the daemon serves /run/sluice/<plugin name>.sock by default.
    #[arg(long, global = true, env = "SLUICE_ADMIN_SOCKET", value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Docker plugin socket and the admin API.
    Daemon(sluice_plugin::daemon::DaemonArgs),
    /// Apply, list and remove policies (docs/policy.md).
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Create or replace the policies of a YAML file: all of them, or none if any is invalid.
    Apply {
        /// The file (`-` for standard input); one or more documents separated by `---`.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// List the applied policies.
    #[command(visible_alias = "list")]
    Ls,
    /// Remove a policy.
    #[command(visible_alias = "remove")]
    Rm {
        /// The policy's name.
        name: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log_level.clone());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&filter)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Daemon(mut args) => {
            args.admin_socket = cli.admin_socket;
            runtime.block_on(sluice_plugin::daemon::run(args))
        }
        Command::Policy(cmd) => {
            let socket = cli
                .admin_socket
                .unwrap_or_else(|| PathBuf::from(admin::DEFAULT_ADMIN_SOCKET));
            match runtime.block_on(policy(&AdminClient::new(socket), cmd)) {
                Ok(output) => {
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(output.as_bytes())?;
                    stdout.flush()?;
                    Ok(())
                }
                // The server's or the client's message as it is: no backtrace, exit status 1.
                Err(e) => {
                    let _ = writeln!(std::io::stderr().lock(), "error: {e:#}");
                    std::process::exit(1);
                }
            }
        }
    }
}

/// Runs one `sluice policy` command; its output, or the error to print.
async fn policy(client: &AdminClient, cmd: PolicyCommand) -> anyhow::Result<String> {
    match cmd {
        PolicyCommand::Apply { file } => {
            let yaml = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading standard input")?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            Ok(admin::format_applied(&client.apply(yaml).await?))
        }
        PolicyCommand::Ls => Ok(admin::format_table(&client.list().await?)),
        PolicyCommand::Rm { name } => {
            client.remove(&name).await?;
            Ok(format!("policy {name:?} removed\n"))
        }
    }
}
