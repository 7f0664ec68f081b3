//! `scriptd scripts ...`: test a file in the engine, deploy, list, enable, disable, delete.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::{LimitArgs, TestArgs};
use crate::caps::local::Local;
use crate::caps::net::HostRule;
use crate::config::Settings;
use crate::engine::{Engine, ScriptRun, ENGINE_NAME};
use crate::retry::RetryOverrides;
use crate::scripts::manifest::{self, draft_run, validate_spec, Manifest};
use crate::scripts::route::HttpRoute;
use crate::scripts::typescript::{self, Lang};
use crate::store::{ScriptSpec, Store, ALL_TENANTS};
use crate::subject;
use crate::units::parse_duration;

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The script file, or a manifest (.toml) that names it and its settings.
    pub file: PathBuf,
    /// The tenant that owns the script (needed for a script file; a manifest names its own).
    #[arg(long)]
    pub tenant: Option<String>,
    /// The script's name (needed for a script file; a manifest names its own).
    #[arg(long)]
    pub name: Option<String>,
    /// Tenant-relative subject pattern the script handles (`order.*`, `user.>`); repeatable.
    #[arg(long = "on")]
    pub on: Vec<String>,
    /// Cron schedule, six fields with seconds first (`0 */5 * * * *`).
    #[arg(long)]
    pub cron: Option<String>,
    /// IANA time zone of the schedule.
    #[arg(long = "tz", default_value = "UTC")]
    pub timezone: String,
    /// When an occurrence comes while the previous run goes on: skip, allow or queue-one.
    #[arg(long, default_value = "skip")]
    pub overlap: crate::domain::Overlap,
    /// Missed occurrences after downtime: none (the latest once) or all (bounded).
    #[arg(long, default_value = "none")]
    pub catch_up: crate::domain::CatchUp,
    /// An HTTP route, `METHOD /path` (`POST /orders/{id}`): requests to
    /// `/hooks/<tenant>/orders/42` run the script and get its answer.
    #[arg(long)]
    pub http: Option<String>,
    /// Who may call the HTTP route: token (a bearer token acting for the tenant) or public.
    #[arg(long, default_value = "token", requires = "http")]
    pub http_auth: crate::scripts::route::Auth,
    /// The script's own limits, over the configured defaults.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Attempts in all before the job is dead-lettered.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Delay before the first retry.
    #[arg(long, value_parser = parse_duration)]
    pub retry_initial: Option<Duration>,
    /// Treat FILE as a manifest even without the .toml extension.
    #[arg(long = "manifest", id = "manifest_file")]
    pub manifest: bool,
    /// The script's language, when its file name does not say (`.ts` is TypeScript).
    #[arg(long, value_enum)]
    pub lang: Option<Lang>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this tenant's scripts.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The tenant that owns the script.
    #[arg(long)]
    pub tenant: String,
    /// The script's name.
    #[arg(long)]
    pub name: String,
}

pub async fn deploy(settings: &Settings, args: DeployArgs) -> anyhow::Result<ExitCode> {
    let is_manifest = args.manifest || args.file.extension().is_some_and(|e| e == "toml");
    let spec = if is_manifest {
        Manifest::load(&args.file)?.1
    } else {
        let (Some(tenant), Some(name)) = (&args.tenant, &args.name) else {
            anyhow::bail!(
                "deploying the script file {} needs --tenant and --name (a manifest, .toml or \
                 --manifest, names its own)",
                args.file.display()
            );
        };
        let compiled = typescript::load(&args.file, args.lang)?;
        let http = args
            .http
            .as_deref()
            .map(|text| HttpRoute::parse(text, args.http_auth))
            .transpose()
            .map_err(|e| anyhow::anyhow!("--http: {e}"))?;
        let spec = ScriptSpec {
            tenant: tenant.clone(),
            name: name.clone(),
            source: compiled.javascript,
            typescript: compiled.typescript,
            subjects: args.on.clone(),
            cron: args.cron.clone(),
            timezone: args.timezone.clone(),
            overlap: args.overlap,
            catch_up: args.catch_up,
            limits: args.limits.overrides(),
            retry: RetryOverrides {
                max_attempts: args.max_attempts,
                initial: args.retry_initial,
                ..Default::default()
            },
            http,
        };
        validate_spec(&spec)?;
        spec
    };
    if let Err(failure) = check_compiles(settings, &spec).await? {
        eprintln!(
            "refused: {}/{} does not load ({}): {}",
            spec.tenant, spec.name, failure.kind, failure.message
        );
        if let Some(stack) = failure.stack {
            eprintln!("{stack}");
        }
        return Ok(ExitCode::FAILURE);
    }
    let store = Store::connect(&settings.database).await?;
    let before = store.script(&spec.tenant, &spec.name).await?;
    let deployed = store.deploy(&spec).await?;
    super::audit(&store, &spec.tenant, "scripts.deploy", &spec.name).await?;
    if deployed.unchanged_source {
        println!(
            "{}/{}: source unchanged, still v{}",
            spec.tenant, spec.name, deployed.version
        );
    } else {
        println!(
            "deployed {}/{} v{} (sha256 {})",
            spec.tenant,
            spec.name,
            deployed.version,
            &deployed.sha256[..16]
        );
    }
    // A deploy states every setting: one left out goes back to its default. Say so.
    if let Some(changed) = before.and_then(|b| super::changes::describe(settings, &b, &spec)) {
        println!("settings changed: {changed}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads the script in an isolate under its own limits; nothing is stored if this fails.
pub async fn check_compiles(
    settings: &Settings,
    spec: &ScriptSpec,
) -> anyhow::Result<Result<(), crate::engine::Failure>> {
    let none = Arc::new(crate::caps::NoCapabilities::default());
    let engine = Engine::for_command(&settings.engine, none).await?;
    Ok(engine
        .validate(draft_run(spec, &settings.engine.limits))
        .await)
}

pub async fn list(settings: &Settings, args: ListArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    let scripts = store
        .scripts(args.tenant.as_deref().unwrap_or(ALL_TENANTS))
        .await?;
    if args.json {
        super::print_json(&scripts)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    if scripts.is_empty() {
        writeln!(out, "no scripts")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<16} {:<24} {:>7} {:<8} {:<30} SHA256",
        "TENANT", "NAME", "VERSION", "ENABLED", "TRIGGERS"
    )?;
    for s in scripts {
        writeln!(
            out,
            "{:<16} {:<24} {:>7} {:<8} {:<30} {}",
            s.tenant,
            s.name,
            s.version,
            if s.enabled { "yes" } else { "no" },
            s.triggers(),
            &s.sha256[..12]
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn set_enabled(
    settings: &Settings,
    args: NameArgs,
    enabled: bool,
) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    if !store.set_enabled(&args.tenant, &args.name, enabled).await? {
        anyhow::bail!("no script {}/{}", args.tenant, args.name);
    }
    let action = if enabled {
        "scripts.enable"
    } else {
        "scripts.disable"
    };
    super::audit(&store, &args.tenant, action, &args.name).await?;
    let state = if enabled { "enabled" } else { "disabled" };
    println!("{}/{} {state}", args.tenant, args.name);
    Ok(ExitCode::SUCCESS)
}

pub async fn delete(settings: &Settings, args: NameArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    if !store.delete_script(&args.tenant, &args.name).await? {
        anyhow::bail!("no script {}/{}", args.tenant, args.name);
    }
    super::audit(&store, &args.tenant, "scripts.delete", &args.name).await?;
    println!("{}/{} deleted", args.tenant, args.name);
    Ok(ExitCode::SUCCESS)
}

/// The event `scripts test` hands the handler: the one given whole (`--event`), or one made
/// around a payload (`--data`) as the daemon makes it.
fn test_event(settings: &Settings, args: &TestArgs) -> anyhow::Result<serde_json::Value> {
    let read = |flag: &str, text: &str| -> anyhow::Result<serde_json::Value> {
        let text = match text.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the {flag} file {path}"))?,
            None => text.to_owned(),
        };
        serde_json::from_str(&text).with_context(|| format!("{flag} is not valid JSON"))
    };
    if let Some(event) = &args.event {
        let event = read("--event", event)?;
        if event.get("data").is_none() {
            anyhow::bail!(
                "--event takes the whole event, as the handler gets it ({{\"type\": ..., \"data\": {{...}}}}); \
                 this one has no \"data\". To give only the payload, as `events publish` \
                 takes it, use --data (and --type)"
            );
        }
        return Ok(event);
    }
    let data = match &args.data {
        Some(data) => read("--data", data)?,
        None => serde_json::json!({}),
    };
    subject::validate_event_type(&args.event_type)?;
    Ok(manifest::test_event(
        &settings.nats.events_prefix,
        &args.tenant,
        &args.event_type,
        data,
    ))
}

pub async fn test(settings: &Settings, args: TestArgs) -> anyhow::Result<ExitCode> {
    let source = typescript::load(&args.file, args.lang)?.javascript;
    let event = test_event(settings, &args)?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "script".into())
    });
    let local = Arc::new(local_api(settings, &args)?);
    let engine = Engine::for_command(&settings.engine, local.clone()).await?;
    let limits = settings.engine.limits.with(&args.limits.overrides());
    let mut run = ScriptRun::new(
        &args.tenant,
        name,
        crate::domain::Version::FIRST,
        Arc::<str>::from(source),
        &event,
        limits,
    );
    run.attempt = args.attempt;
    let result = engine.run(run).await;
    let (published, kv) = (local.published(), local.kv());
    if args.json {
        let mut shown = serde_json::to_value(&result)?;
        shown["published"] = serde_json::to_value(&published)?;
        shown["kv"] = serde_json::to_value(&kv)?;
        super::print_json(&shown)?;
    } else {
        let mut out = std::io::stdout().lock();
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
        for message in &published {
            writeln!(
                out,
                "published (not sent): {} {}",
                message.subject, message.data
            )?;
        }
        if !kv.is_empty() {
            writeln!(out, "kv after the run (in memory):")?;
            for (key, value) in &kv {
                writeln!(out, "  {key} = {value}")?;
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

/// The script API of `scripts test`, from its command line.
fn local_api(settings: &Settings, args: &TestArgs) -> anyhow::Result<Local> {
    let pair = |flag: &str, item: &str| {
        item.split_once('=')
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .with_context(|| format!("--{flag} {item:?}: expected NAME=VALUE"))
    };
    let mut kv = std::collections::BTreeMap::new();
    for item in &args.kv {
        let (key, value) = pair("kv", item)?;
        let value: serde_json::Value = serde_json::from_str(&value).with_context(|| {
            format!("--kv {key}: the value is not JSON (quote strings: '\"text\"')")
        })?;
        kv.insert(key, value.to_string());
    }
    let secrets = args
        .secrets
        .iter()
        .map(|item| pair("secret", item))
        .collect::<anyhow::Result<_>>()?;
    let allow = args
        .allow_fetch
        .iter()
        .map(|h| HostRule::parse(h).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Local::new(
        &settings.capabilities,
        &settings.nats.events_prefix,
        allow,
        kv,
        secrets,
    )
}
