//! The `sluice` command.
#![forbid(unsafe_code)]

use std::io::{Read as _, Write as _};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sluice_plugin::admin::{self, AdminClient};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

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
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; the daemon's flags are the bulk"
)]
enum Command {
    /// Serve the Docker plugin socket and the admin API.
    Daemon(sluice_plugin::daemon::DaemonArgs),
    /// Apply, list and remove policies (docs/policy.md).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// List the endpoints with their container, addresses, identity, flags and packet counts.
    Endpoints {
        /// Print the full status as JSON (bytes included).
        #[arg(long)]
        json: bool,
    },
    /// Show packets the datapath dropped: the recent ones, or a live stream with --follow.
    Flows {
        /// Keep printing new drops as they happen (Ctrl-C to stop).
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the Prometheus metrics (as `GET /metrics` on the admin socket serves them).
    Metrics,
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
    // Before any thread exists: one arena per thread would keep the peaks of big policy
    // applies resident (docs/benchmarks.md, daemon RSS).
    sluice_driver::memory::limit_malloc_arenas();
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log_level.clone());
    // SLUICE_LOG_SPAN_TIMES=1: one more line per protocol call when its span closes, with
    // its time (`time.busy`, `time.idle`); `cargo xtask bench docker` reads them.
    let span_events = if std::env::var_os("SLUICE_LOG_SPAN_TIMES").is_some_and(|v| v == "1") {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&filter)?)
        .with_span_events(span_events)
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
        cmd => {
            let socket = cli
                .admin_socket
                .unwrap_or_else(|| PathBuf::from(admin::DEFAULT_ADMIN_SOCKET));
            let client = AdminClient::new(socket);
            let result = runtime.block_on(async {
                match cmd {
                    Command::Policy(cmd) => policy(&client, cmd).await,
                    other => observe(&client, other).await,
                }
            });
            match result {
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

/// Runs `sluice endpoints`, `flows` or `metrics`; the output still to print.
async fn observe(client: &AdminClient, cmd: Command) -> anyhow::Result<String> {
    use sluice_plugin::observe::{format_endpoints, format_flow};
    let line = |r: &sluice_driver::status::FlowRecord, json: bool| {
        if json {
            serde_json::to_string(r).unwrap_or_default()
        } else {
            format_flow(r)
        }
    };
    match cmd {
        Command::Endpoints { json: true } => {
            let mut text = serde_json::to_string_pretty(&client.endpoints().await?)?;
            text.push('\n');
            Ok(text)
        }
        Command::Endpoints { json: false } => Ok(format_endpoints(&client.endpoints().await?)),
        Command::Flows {
            follow: false,
            json,
        } => {
            let mut out = String::new();
            for r in client.flows().await? {
                out.push_str(&line(&r, json));
                out.push('\n');
            }
            Ok(out)
        }
        Command::Flows { follow: true, json } => {
            let mut failed = None;
            client
                .follow_flows(|r| {
                    let mut stdout = std::io::stdout().lock();
                    if let Err(e) =
                        writeln!(stdout, "{}", line(&r, json)).and_then(|()| stdout.flush())
                    {
                        failed = Some(e);
                        return false;
                    }
                    true
                })
                .await?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            Ok(String::new())
        }
        Command::Metrics => Ok(client.metrics().await?),
        Command::Daemon(_) | Command::Policy(_) => Ok(String::new()),
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
