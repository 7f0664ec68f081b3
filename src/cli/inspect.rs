//! Looking at what is stored: `scripts show|versions|rollback|validate` and
//! `runs list|show`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::scripts::NameArgs;
use crate::config::Settings;
use crate::domain::Version;
use crate::scripts::typescript::{self, Lang};
use crate::store::{RunFilter, ScriptSpec, Store, StoredRun};
use crate::units::parse_duration;

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The script to show.
    #[command(flatten)]
    pub script: NameArgs,
    /// Also print the source of the current version.
    #[arg(long)]
    pub source: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VersionsArgs {
    /// The script whose versions to list.
    #[command(flatten)]
    pub script: NameArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The script to roll back.
    #[command(flatten)]
    pub script: NameArgs,
    /// The version to make current again.
    pub version: Version,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The script file.
    pub file: PathBuf,
    /// The script's language, when its file name does not say (`.ts` is TypeScript).
    #[arg(long, value_enum)]
    pub lang: Option<Lang>,
}

#[derive(Debug, Args)]
pub struct RunsListArgs {
    /// Only this tenant's runs.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only runs of scripts with this name.
    #[arg(long)]
    pub script: Option<String>,
    /// ok, retrying, dead_lettered or skipped.
    #[arg(long)]
    pub status: Option<crate::domain::RunStatus>,
    /// Only runs started within this long (e.g. 1h, 30m).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// List at most this many.
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunsShowArgs {
    /// The run's id (from `runs list`).
    pub id: i64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn show(settings: &Settings, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    let NameArgs { tenant, name } = &args.script;
    let script = store
        .script(tenant, name)
        .await?
        .with_context(|| format!("no script {tenant}/{name}"))?;
    if args.json {
        let mut value = serde_json::to_value(&script)?;
        value["language"] = language(&script.typescript).into();
        if args.source {
            value["source"] = script.source.clone().into();
            if let Some(typescript) = &script.typescript {
                value["typescript"] = typescript.clone().into();
            }
        }
        super::print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let effective = settings.engine.limits.with(&script.limits);
    let retry = settings.retry.with(&script.retry);
    println!(
        "{tenant}/{name} v{} ({})",
        script.version,
        if script.enabled {
            "enabled"
        } else {
            "disabled"
        }
    );
    println!("  on:        {}", script.subjects.join(", "));
    if let Some(cron) = &script.cron {
        println!(
            "  schedule:  {cron} ({}), overlap {}, catch-up {}",
            script.timezone,
            script.overlap.as_str(),
            script.catch_up.as_str()
        );
    }
    println!("  language:  {}", language(&script.typescript));
    println!("  sha256:    {}", script.sha256);
    println!(
        "  limits:    timeout {}, cpu_time {}, heap {}, source {}, result {}, logs {}",
        humantime::format_duration(effective.timeout),
        humantime::format_duration(effective.cpu_time),
        effective.heap,
        effective.source,
        effective.result,
        effective.logs
    );
    println!(
        "  retry:     {} attempts, first delay {}, x{}, at most {}",
        retry.max_attempts,
        humantime::format_duration(retry.initial),
        retry.multiplier,
        humantime::format_duration(retry.max_interval)
    );
    if args.source {
        // What the tenant wrote: the TypeScript, not what it compiled to.
        println!(
            "---\n{}",
            script.typescript.as_deref().unwrap_or(&script.source)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn language(typescript: &Option<String>) -> &'static str {
    match typescript {
        Some(_) => "typescript",
        None => "javascript",
    }
}

pub async fn versions(settings: &Settings, args: VersionsArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    let NameArgs { tenant, name } = &args.script;
    let versions = store.versions(tenant, name).await?;
    anyhow::ensure!(!versions.is_empty(), "no script {tenant}/{name}");
    if args.json {
        super::print_json(&versions)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:>7}  {:<25}  {:<16}", "VERSION", "CREATED", "SHA256");
    for v in versions {
        println!(
            "{:>7}  {:<25}  {:<16}{}",
            v.version,
            v.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
            &v.sha256[..16],
            if v.current { "  (current)" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rollback(settings: &Settings, args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    let NameArgs { tenant, name } = &args.script;
    if !store.rollback(tenant, name, args.version).await? {
        anyhow::bail!(
            "no version {} of {tenant}/{name} (see `scriptd scripts versions --tenant {tenant} --name {name}`)",
            args.version
        );
    }
    let target = format!("{name} v{}", args.version);
    super::audit(&store, tenant, "scripts.rollback", &target).await?;
    println!("{tenant}/{name} is at v{} again", args.version);
    Ok(ExitCode::SUCCESS)
}

/// Loads the file in an isolate and reports what the engine says, with line and column.
pub async fn validate(settings: &Settings, args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let compiled = match typescript::load(&args.file, args.lang) {
        Ok(compiled) => compiled,
        // A syntax error is the answer, not a failure to answer.
        Err(e) if e.is::<typescript::SyntaxError>() => {
            println!("{e:#}");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e),
    };
    let spec = ScriptSpec {
        tenant: "validate".into(),
        name: "script".into(),
        source: compiled.javascript,
        typescript: compiled.typescript,
        timezone: "UTC".into(),
        ..Default::default()
    };
    match super::check_compiles(settings, &spec).await? {
        Ok(()) => {
            println!(
                "{}: ok (compiles, evaluates, exports a default function)",
                args.file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            let place = f
                .stack
                .as_deref()
                .and_then(|s| s.split("script@v0.").nth(1))
                .and_then(|s| s.split_once(':'))
                .map(|(_, rest)| rest)
                .map(|rest| {
                    rest.trim_end_matches(')')
                        .split_whitespace()
                        .next()
                        .unwrap_or(rest)
                        .to_owned()
                });
            match place {
                Some(line_col) => println!(
                    "{}:{line_col}: {} ({})",
                    args.file.display(),
                    f.message,
                    f.kind
                ),
                None => println!("{}: {} ({})", args.file.display(), f.message, f.kind),
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

pub async fn runs_list(settings: &Settings, args: RunsListArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    let since = match args.since {
        Some(d) => Some(chrono::Utc::now() - chrono::Duration::from_std(d)?),
        None => None,
    };
    let runs = store
        .list_runs(&RunFilter {
            tenant: args.tenant,
            script: args.script,
            status: args.status.map(|s| s.as_str().to_owned()),
            since,
            limit: args.limit,
            ..Default::default()
        })
        .await?;
    if args.json {
        super::print_json(&runs)?;
        return Ok(ExitCode::SUCCESS);
    }
    if runs.is_empty() {
        println!("no runs match");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>8}  {:<20}  {:<12}  {:<24}  {:>3}  {:<13}  {:>9}  FAILURE",
        "ID", "STARTED", "TENANT", "SCRIPT", "TRY", "STATUS", "MS"
    );
    for r in &runs {
        println!(
            "{:>8}  {:<20}  {:<12}  {:<24}  {:>3}  {:<13}  {:>9.1}  {}",
            r.id,
            r.started_at.format("%Y-%m-%d %H:%M:%S"),
            r.tenant,
            format!(
                "{}@v{}",
                r.script,
                r.version.map_or("-".into(), |v| v.to_string())
            ),
            r.attempt,
            r.status,
            r.duration_ms,
            excerpt(r)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn excerpt(r: &StoredRun) -> String {
    match (&r.failure_kind, &r.failure_message) {
        (Some(kind), Some(message)) => {
            let short: String = message.chars().take(60).collect();
            format!("{kind}: {short}")
        }
        (Some(kind), None) => kind.clone(),
        _ => String::new(),
    }
}

pub async fn runs_show(settings: &Settings, args: RunsShowArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    let run = store
        .run_by_id(args.id)
        .await?
        .with_context(|| format!("no run {} (see `scriptd runs list`)", args.id))?;
    if args.json {
        super::print_json(&run)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "run {} of {}/{}@v{}",
        run.id,
        run.tenant,
        run.script,
        run.version.map_or("-".into(), |v| v.to_string())
    );
    println!(
        "  job:      {} (attempt {}, {})",
        run.job_id, run.attempt, run.trigger
    );
    if let Some(subject) = &run.subject {
        println!("  subject:  {subject}");
    }
    if let Some(event) = &run.event_id {
        println!("  event:    {event}");
    }
    if let Some(input) = &run.input {
        println!("  input:    {input}");
    }
    if let Some(input) = &run.input_ref {
        println!("  input:    {input} (stream:sequence; `nats stream get` shows it while the stream keeps it)");
    }
    println!(
        "  started:  {} for {:.1} ms{}",
        run.started_at,
        run.duration_ms,
        if run.cold_start { " (cold start)" } else { "" }
    );
    if let Some(scheduled) = run.scheduled_at {
        println!("  scheduled: {scheduled}");
    }
    println!("  status:   {}", run.status);
    if let Some(result) = &run.result {
        println!("  result:   {result}");
    }
    if let Some(kind) = &run.failure_kind {
        println!(
            "  failure:  {kind}: {}",
            run.failure_message.as_deref().unwrap_or("")
        );
    }
    if let Some(stack) = &run.failure_stack {
        println!("  stack:\n{stack}");
    }
    println!(
        "  logs:{}",
        if run.logs_truncated {
            " (truncated)"
        } else {
            ""
        }
    );
    for line in run.logs.as_array().into_iter().flatten() {
        println!(
            "    [{}] {}",
            line["level"].as_str().unwrap_or("?"),
            line["message"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}
