//! The `browserfleet` binary: parses the command line and wires the library.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use browserfleet::config::{LogFormat, Settings};
use browserfleet::{enqueue, task, worker};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "A RabbitMQ-fed fleet of ChromeDriver workers that never loses a browser task"
)]
struct Cli {
    /// A TOML file overriding the built-in defaults (config/default.toml);
    /// BROWSERFLEET__SECTION__KEY environment variables override both.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a worker: consume tasks, drive browsers, publish results.
    Run,
    /// Publish tasks from FILE (or - for stdin): one JSON object, a JSON
    /// array, or JSON lines. Exits 1 if any awaited result failed.
    Enqueue {
        /// The task file, or - for standard input.
        file: String,
        /// Wait for every result on a private reply queue and print each as a JSON line.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit 2).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Print the effective configuration (secrets redacted) as JSON and exit.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("browserfleet: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&settings);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(dispatch(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("browserfleet: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::CheckConfig => {
            println!("{}", serde_json::to_string_pretty(&settings)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let shutdown = CancellationToken::new();
            tokio::spawn(signal_on(shutdown.clone()));
            worker::run(settings, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Enqueue {
            file,
            wait,
            timeout,
        } => {
            let mut input = String::new();
            if file == "-" {
                std::io::stdin()
                    .read_to_string(&mut input)
                    .context("reading stdin")?;
            } else {
                input =
                    std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
            }
            let limits = task::Limits {
                max_timeout_ms: settings.task.max_timeout_ms,
            };
            let tasks = enqueue::parse_tasks(&input, limits)?;
            let wait = wait.then(|| Duration::from_secs(timeout));
            match enqueue::enqueue(&settings, tasks, wait, std::io::stdout().lock()).await {
                Ok(s) => {
                    eprintln!(
                        "published {} task(s){}",
                        s.published,
                        if wait.is_some() {
                            format!("; {} ok, {} failed", s.ok, s.failed)
                        } else {
                            String::new()
                        }
                    );
                    Ok(if s.failed > 0 {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    })
                }
                Err(e @ enqueue::EnqueueError::Timeout { .. }) => {
                    eprintln!("browserfleet: {e}");
                    Ok(ExitCode::from(2))
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT.
async fn signal_on(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    token.cancel();
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match settings.log.format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}
