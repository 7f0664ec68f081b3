//! The command line: what each subcommand does, on top of the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{LogFormat, Settings};
use crate::engine::{Engine, EngineConfig, LimitOverrides, ScriptRun, ENGINE_NAME};
use crate::units::{parse_duration, ByteSize};

const VERSION: &str = if cfg!(feature = "quickjs") {
    concat!(env!("CARGO_PKG_VERSION"), " (engine: quickjs)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (engine: v8)")
};

#[derive(Debug, Parser)]
#[command(name = "scriptd", version = VERSION, about = "Event-driven scripting worker daemon")]
pub struct Cli {
    /// TOML configuration file (settings not in it keep their defaults).
    #[arg(long, global = true, env = "SCRIPTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format on standard error; overrides `log.format`.
    #[arg(long, global = true, value_enum, env = "SCRIPTD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with tenant scripts.
    #[command(subcommand)]
    Scripts(ScriptsCommand),
    /// Measure the engine and print the numbers.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print the effective configuration (defaults, file and environment merged) as TOML.
    Config,
}

#[derive(Debug, Subcommand)]
pub enum ScriptsCommand {
    /// Run a script file once through the engine and print its result, logs and duration.
    Test(TestArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Cold start, warm run latency and throughput of the engine.
    Engine(crate::bench::EngineBenchArgs),
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The script: an ES module whose default export handles the event.
    pub file: PathBuf,
    /// The event as JSON, or @FILE to read it from a file.
    #[arg(long, default_value = "{}")]
    pub event: String,
    #[arg(long, default_value = "test")]
    pub tenant: String,
    /// Script name (defaults to the file name without extension).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub attempt: u32,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Print the whole result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Per-script limit overrides on the command line.
#[derive(Debug, Args, Default)]
pub struct LimitArgs {
    /// Wall-clock limit of the run (e.g. 2s, 500ms).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Heap limit of the isolate (e.g. 32MiB).
    #[arg(long)]
    pub heap: Option<ByteSize>,
    /// Maximum source size.
    #[arg(long)]
    pub max_source: Option<ByteSize>,
    /// Maximum size of the return value as JSON.
    #[arg(long)]
    pub max_result: Option<ByteSize>,
    /// Maximum captured log output.
    #[arg(long)]
    pub max_logs: Option<ByteSize>,
}

impl LimitArgs {
    pub fn overrides(&self) -> LimitOverrides {
        LimitOverrides {
            timeout: self.timeout,
            heap: self.heap,
            source: self.max_source,
            result: self.max_result,
            logs: self.max_logs,
        }
    }
}

/// Runs a parsed command line; the process exit code says how it went.
pub fn run(cli: Cli) -> ExitCode {
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(format) = cli.log_format {
        settings.log.format = format;
    }
    crate::telemetry::init(&settings.log)?;
    match cli.command {
        Command::Config => {
            print!("{}", toml::to_string_pretty(&settings)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Scripts(ScriptsCommand::Test(args)) => block_on(scripts_test(&settings, args)),
        Command::Bench(BenchCommand::Engine(args)) => {
            block_on(crate::bench::engine(&settings.engine, args))
        }
    }
}

fn block_on<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(
    future: F,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

async fn scripts_test(settings: &Settings, args: TestArgs) -> anyhow::Result<ExitCode> {
    let source = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading the script {}", args.file.display()))?;
    let event_text = match args.event.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the event file {path}"))?,
        None => args.event.clone(),
    };
    let event: serde_json::Value =
        serde_json::from_str(&event_text).context("--event is not valid JSON")?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "script".into())
    });
    let engine = Engine::start(&EngineConfig {
        workers: 1,
        ..settings.engine.clone()
    })?;
    let limits = settings.engine.limits.with(&args.limits.overrides());
    let mut run = ScriptRun::new(
        &args.tenant,
        name,
        1,
        Arc::<str>::from(source),
        &event,
        limits,
    );
    run.attempt = args.attempt;
    let result = engine.run(run).await;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &result)?;
        writeln!(out)?;
    } else {
        match &result.outcome {
            Ok(value) => writeln!(out, "result: {}", serde_json::to_string_pretty(value)?)?,
            Err(f) => {
                let retry = if f.retryable {
                    "retryable"
                } else {
                    "not retryable"
                };
                writeln!(out, "failed: {} ({retry}): {}", f.kind, f.message)?;
                if let Some(stack) = &f.stack {
                    writeln!(out, "stack:\n{stack}")?;
                }
            }
        }
        if result.logs.is_empty() {
            writeln!(out, "logs: (none)")?;
        } else {
            writeln!(out, "logs:")?;
            for line in &result.logs {
                writeln!(out, "  [{}] {}", line.level, line.message)?;
            }
        }
        writeln!(
            out,
            "duration: {:.1?} ({}, engine: {ENGINE_NAME})",
            result.duration,
            if result.cold_start {
                "cold start"
            } else {
                "warm isolate"
            }
        )?;
    }
    Ok(if result.outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
