//! The command line: what each subcommand does, on top of the library.

mod changes;
pub mod dev;
mod dlq;
pub mod exit;
mod inspect;
mod ops;
mod scripts;
mod tenants;
mod tokens;

pub use ops::cancel_on_signal;
pub use scripts::check_compiles;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::Settings;
use crate::engine::LimitOverrides;
use crate::observe::telemetry::LogFormat;
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
    #[arg(
        long,
        global = true,
        env = "SCRIPTD_CONFIG",
        help_heading = "Global options"
    )]
    pub config: Option<PathBuf>,
    /// Log format on standard error; overrides `log.format`.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "SCRIPTD_LOG_FORMAT",
        help_heading = "Global options"
    )]
    pub log_format: Option<LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: consume events and jobs from NATS and run tenant scripts.
    Run,
    /// Everything on one machine for trying scriptd: uses NATS and PostgreSQL when they
    /// answer at the configured URLs, otherwise starts them; migrates, deploys
    /// scripts-examples/ and runs the daemon.
    Dev(crate::cli::dev::DevArgs),
    /// Apply database migrations.
    Migrate,
    /// Work with tenant scripts.
    #[command(subcommand)]
    Scripts(ScriptsCommand),
    /// Publish to NATS.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Run history.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Dead letters: inspect, replay, purge.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Per-tenant secrets for `ctx.secrets` (stored encrypted).
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Per-tenant policy: the hosts `fetch` may call, and what a tenant uses.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// Bearer tokens of the HTTP API: create (shown once), list, revoke.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// The audit trail: who changed what, by API or command line.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Measure the engine and print the numbers.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print the effective configuration (defaults, file and environment merged) as TOML.
    Config,
    /// Print TypeScript declarations of the event, ctx, fetch and the API's errors, for an
    /// editor to check handlers with (`scriptd types > scriptd.d.ts`).
    Types,
    /// An engine host process; started by the daemon, not by hand.
    #[command(hide = true)]
    EngineHost {
        /// Native stack, in bytes, of the thread that runs isolates.
        #[arg(long, default_value_t = 8 << 20)]
        stack: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum ScriptsCommand {
    /// Run a script file once through the engine and print its result, logs and duration.
    #[command(after_help = "Examples:
  scriptd scripts test handler.js --tenant acme --type order.created --data '{\"id\":\"o-1\"}'
  scriptd scripts test handler.js --event @event.json --kv 'seen=3' --secret api-key=xyz
  scriptd scripts test handler.js --timeout 2s --cpu-time 1s --heap 32MiB --json")]
    Test(TestArgs),
    /// Store a new version of a script (checked in an isolate first; refused if it fails).
    #[command(after_help = "Examples:
  scriptd scripts deploy handler.js --tenant acme --name orders --on 'order.*'
  scriptd scripts deploy nightly.js --tenant acme --name nightly --cron '0 0 3 * * *' --tz Europe/Paris
  scriptd scripts deploy scripts-examples/order-created.toml   (a manifest names the rest)
A deploy states every setting: one left out goes back to its default, and the deploy says
which settings it changed.")]
    Deploy(scripts::DeployArgs),
    /// List scripts at their current version.
    List(scripts::ListArgs),
    /// Let a script run again.
    Enable(scripts::NameArgs),
    /// Stop running a script (queued jobs are skipped and recorded).
    Disable(scripts::NameArgs),
    /// Delete a script and all its versions.
    Delete(scripts::NameArgs),
    /// Show a script: current version, triggers, effective limits and retry policy.
    Show(inspect::ShowArgs),
    /// List a script's versions.
    Versions(inspect::VersionsArgs),
    /// Make an earlier version current again.
    Rollback(inspect::RollbackArgs),
    /// Check that a file compiles and exports a handler; errors with line and column.
    Validate(inspect::ValidateArgs),
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// One line per dead letter, newest first.
    List(dlq::ListArgs),
    /// Everything about one dead letter, with the run records of every attempt.
    Show(dlq::ShowArgs),
    /// Publish dead letters again as fresh jobs; each leaves the dead-letter stream once its
    /// replay is stored.
    #[command(after_help = "Examples:
  scriptd dlq replay 7 --dry-run            (run it here first: nothing is published or stored)
  scriptd dlq replay 7 8 9 --version pinned
  scriptd dlq replay --all-matching --tenant acme --kind timeout --rate 20")]
    Replay(dlq::ReplayArgs),
    /// Delete dead letters (counts only, unless --yes).
    Purge(dlq::PurgeArgs),
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Store a secret; the value is read from standard input (or --from-env).
    Set(tenants::SecretSetArgs),
    /// Names of a tenant's secrets (never values).
    List(tenants::TenantArgs),
    Delete(tenants::SecretNameArgs),
    /// Print a new random key for capabilities.secrets.key_file.
    GenerateKey,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Entries, newest first: when, tenant, who (token prefix or cli:<login>), action,
    /// target, HTTP status.
    List(tokens::AuditArgs),
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Make a token; it is printed once and stored only as a hash.
    #[command(after_help = "Examples:
  scriptd tokens create --tenant acme --expires 90d --label ci
  scriptd tokens create --role operator --label on-call")]
    Create(tokens::CreateArgs),
    /// Tokens with their prefix, tenant, role, expiry and state; never the token.
    List(tokens::ListArgs),
    /// Revoke a token by its prefix; it is refused from the next request on.
    Revoke(tokens::RevokeArgs),
}

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Set the hosts a tenant's scripts may fetch from (replaces the list).
    AllowFetch(tenants::AllowFetchArgs),
    /// A tenant's fetch allow list, key-value usage and secret names.
    Show(tenants::TenantArgs),
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Recorded runs, newest first.
    List(inspect::RunsListArgs),
    /// One run with its logs.
    Show(inspect::RunsShowArgs),
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Publish one event to `<events_prefix>.<tenant>.<type>` and wait for JetStream's ack.
    #[command(after_help = "Examples:
  scriptd events publish acme order.created '{\"id\":\"o-2\",\"items\":[{\"price\":3,\"qty\":2}]}'
  scriptd events publish acme order.created @order.json --header source=billing
  scriptd events publish acme note.added 'plain text' --raw")]
    Publish(ops::PublishArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Cold start, warm run latency and throughput of the engine.
    Engine(crate::bench::engine::EngineBenchArgs),
    /// Engine hosts beside in-process isolates: round trips, throughput, memory over
    /// isolate create/drop cycles with recycling.
    Hosts(crate::bench::hosts::HostsBenchArgs),
    /// Raw JetStream rate beside scriptd's end-to-end rate and latency (uses the
    /// configured NATS and PostgreSQL, with throw-away streams and database).
    Pipeline(crate::bench::pipeline::PipelineBenchArgs),
    /// The one-time TypeScript compile at deploy, for a 1 KiB and a 100 KiB handler.
    Typescript(crate::bench::typescript::TypeScriptBenchArgs),
    /// Requests/s and latency of a trivial HTTP-triggered script under wrk (uses the
    /// configured NATS and PostgreSQL, with throw-away streams and database).
    Hooks(crate::bench::hooks::HooksBenchArgs),
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The script: an ES module whose default export handles the event (JavaScript, or
    /// TypeScript for a `.ts` file or with --lang ts).
    pub file: PathBuf,
    /// The script's language, when its file name does not say (`.ts` is TypeScript).
    #[arg(long, value_enum)]
    pub lang: Option<crate::scripts::typescript::Lang>,
    /// The whole event the handler gets, as JSON (`{"type": ..., "data": {...}}`), or
    /// @FILE to read it from a file.
    #[arg(long, conflicts_with = "data")]
    pub event: Option<String>,
    /// Only the payload, as `events publish` takes it (JSON, or @FILE): the event around
    /// it is made as the daemon makes it (id, subject, type, tenant, time).
    #[arg(long)]
    pub data: Option<String>,
    /// The event type for --data (`order.created`).
    #[arg(long = "type", default_value = "test")]
    pub event_type: String,
    /// The tenant the script runs as.
    #[arg(long, default_value = "test")]
    pub tenant: String,
    /// Script name (defaults to the file name without extension).
    #[arg(long)]
    pub name: Option<String>,
    /// The attempt number the script sees in `ctx.attempt`.
    #[arg(long, default_value_t = 1)]
    pub attempt: u32,
    /// Limits of the run, over the configured defaults.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// A key-value entry the script finds (`KEY=JSON`); repeatable. Writes stay in memory
    /// and are printed after the run.
    #[arg(long = "kv", value_name = "KEY=JSON")]
    pub kv: Vec<String>,
    /// A secret the script can read (`NAME=VALUE`); repeatable.
    #[arg(long = "secret", value_name = "NAME=VALUE")]
    pub secrets: Vec<String>,
    /// A host `fetch` may call (as in a tenant's allow list); repeatable. None by default.
    #[arg(long = "allow-fetch", value_name = "HOST")]
    pub allow_fetch: Vec<String>,
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
    /// CPU-time limit of the run (e.g. 1s); waiting for fetch, kv or publish does not count.
    #[arg(long, value_parser = parse_duration)]
    pub cpu_time: Option<Duration>,
}

impl LimitArgs {
    pub fn overrides(&self) -> LimitOverrides {
        LimitOverrides {
            timeout: self.timeout,
            heap: self.heap,
            source: self.max_source,
            result: self.max_result,
            logs: self.max_logs,
            cpu_time: self.cpu_time,
        }
    }
}

/// Runs a parsed command line; the process exit code says how it went (`exit`: 0 done,
/// 1 failed, 2 usage or bad input, 69 a service unavailable).
pub fn run(cli: Cli) -> ExitCode {
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::code(&e)
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(format) = cli.log_format {
        settings.log.format = format;
    }
    // Spans and metrics are exported by the long-running commands only.
    let export = matches!(cli.command, Command::Run | Command::Dev(_));
    let telemetry = crate::observe::telemetry::init(&settings.log, &settings.telemetry, export)?;
    if !settings.ignored_env.is_empty() && !matches!(cli.command, Command::EngineHost { .. }) {
        tracing::warn!(
            variables = %settings.ignored_env.join(", "),
            "Environment variables with the SCRIPTD_ prefix that name no section of the settings are ignored."
        );
    }
    match cli.command {
        Command::EngineHost { stack } => {
            crate::engine::host_main(stack)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Types => {
            print!("{}", crate::scripts::typescript::DECLARATIONS);
            Ok(ExitCode::SUCCESS)
        }
        Command::Config => {
            print!("{}", toml::to_string_pretty(&settings.redacted())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Secrets(SecretsCommand::Set(args)) => {
            block_on(tenants::secret_set(&settings, args))
        }
        Command::Secrets(SecretsCommand::List(args)) => {
            block_on(tenants::secret_list(&settings, args))
        }
        Command::Secrets(SecretsCommand::Delete(args)) => {
            block_on(tenants::secret_delete(&settings, args))
        }
        Command::Secrets(SecretsCommand::GenerateKey) => {
            println!("{}", crate::caps::secrets::SecretBox::generate_key());
            Ok(ExitCode::SUCCESS)
        }
        Command::Tenants(TenantsCommand::AllowFetch(args)) => {
            block_on(tenants::allow_fetch(&settings, args))
        }
        Command::Tenants(TenantsCommand::Show(args)) => block_on(tenants::show(&settings, args)),
        Command::Tokens(TokensCommand::Create(args)) => block_on(tokens::create(&settings, args)),
        Command::Tokens(TokensCommand::List(args)) => block_on(tokens::list(&settings, args)),
        Command::Tokens(TokensCommand::Revoke(args)) => block_on(tokens::revoke(&settings, args)),
        Command::Audit(AuditCommand::List(args)) => block_on(tokens::audit_list(&settings, args)),
        Command::Run => block_on_daemon(
            &settings,
            ops::run_daemon(settings.clone(), telemetry.metrics()),
        ),
        Command::Dev(args) => block_on_daemon(
            &settings,
            crate::cli::dev::run(settings.clone(), args, telemetry.metrics()),
        ),
        Command::Migrate => block_on(ops::migrate(&settings)),
        Command::Events(EventsCommand::Publish(args)) => block_on(ops::publish(&settings, args)),
        Command::Scripts(ScriptsCommand::Test(args)) => block_on(scripts::test(&settings, args)),
        Command::Scripts(ScriptsCommand::Deploy(args)) => {
            block_on(scripts::deploy(&settings, args))
        }
        Command::Scripts(ScriptsCommand::List(args)) => block_on(scripts::list(&settings, args)),
        Command::Scripts(ScriptsCommand::Enable(args)) => {
            block_on(scripts::set_enabled(&settings, args, true))
        }
        Command::Scripts(ScriptsCommand::Disable(args)) => {
            block_on(scripts::set_enabled(&settings, args, false))
        }
        Command::Scripts(ScriptsCommand::Show(args)) => block_on(inspect::show(&settings, args)),
        Command::Scripts(ScriptsCommand::Versions(args)) => {
            block_on(inspect::versions(&settings, args))
        }
        Command::Scripts(ScriptsCommand::Rollback(args)) => {
            block_on(inspect::rollback(&settings, args))
        }
        Command::Scripts(ScriptsCommand::Validate(args)) => {
            block_on(inspect::validate(&settings, args))
        }
        Command::Dlq(DlqCommand::List(args)) => block_on(dlq::list(&settings, args)),
        Command::Dlq(DlqCommand::Show(args)) => block_on(dlq::show(&settings, args)),
        Command::Dlq(DlqCommand::Replay(args)) => block_on(dlq::replay(&settings, args)),
        Command::Dlq(DlqCommand::Purge(args)) => block_on(dlq::purge(&settings, args)),
        Command::Runs(RunsCommand::List(args)) => block_on(inspect::runs_list(&settings, args)),
        Command::Runs(RunsCommand::Show(args)) => block_on(inspect::runs_show(&settings, args)),
        Command::Scripts(ScriptsCommand::Delete(args)) => {
            block_on(scripts::delete(&settings, args))
        }
        Command::Bench(BenchCommand::Pipeline(args)) => {
            block_on_daemon(&settings, crate::bench::pipeline::pipeline(&settings, args))
        }
        Command::Bench(BenchCommand::Engine(args)) => {
            block_on(crate::bench::engine::engine(&settings.engine, args))
        }
        Command::Bench(BenchCommand::Hooks(args)) => {
            block_on_daemon(&settings, crate::bench::hooks::hooks(&settings, args))
        }
        Command::Bench(BenchCommand::Typescript(args)) => {
            crate::bench::typescript::typescript(args)
        }
        Command::Bench(BenchCommand::Hosts(args)) => {
            block_on(crate::bench::hosts::hosts(&settings.engine, args))
        }
    }
}

/// Prints `value` as pretty JSON on standard output (the `--json` of every command).
/// Records a command-line action in the audit trail beside the API's requests: the actor
/// is `cli:<login name>` (the command holds database credentials, not a token).
async fn audit(
    store: &crate::store::Store,
    tenant: &str,
    action: &str,
    target: &str,
) -> anyhow::Result<()> {
    let login = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    store
        .audit(&crate::store::AuditEntry {
            tenant: tenant.to_owned(),
            actor: format!("cli:{login}"),
            role: "cli".into(),
            action: action.to_owned(),
            target: target.to_owned(),
            status: 200,
            detail: None,
        })
        .await?;
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Runs a short command's `future` on a runtime of tokio's default size.
fn block_on<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(
    future: F,
) -> anyhow::Result<ExitCode> {
    runtime(None)?.block_on(future)
}

/// Runs the daemon's `future` (also under `dev` and the pipeline benchmarks) on as many
/// threads as `[daemon] threads` says.
fn block_on_daemon<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(
    settings: &Settings,
    future: F,
) -> anyhow::Result<ExitCode> {
    runtime(Some(settings.daemon.runtime_threads()))?.block_on(future)
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}
