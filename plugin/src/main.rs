//! The `sluice` command.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// sluice: a Docker network driver and IPAM plugin.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log level or filter (`info`, `debug`, `sluice_driver=trace`); RUST_LOG also works.
    #[arg(long, global = true, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Docker plugin socket.
    Daemon(sluice_plugin::daemon::DaemonArgs),
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
        Command::Daemon(args) => runtime.block_on(sluice_plugin::daemon::run(args)),
    }
}
