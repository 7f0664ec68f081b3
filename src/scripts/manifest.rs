//! Script manifests: a TOML file beside a script that says how to deploy it (tenant, name,
//! triggers, limits, retry policy), and optionally an example event for `scriptd dev`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::engine::LimitOverrides;
use crate::retry::RetryOverrides;
use crate::store::ScriptSpec;
use crate::subject;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The tenant that owns the script.
    pub tenant: String,
    /// The script's name.
    pub name: String,
    /// The script file, relative to the manifest.
    pub source: PathBuf,
    /// Tenant-relative subject patterns.
    #[serde(default)]
    pub on: Vec<String>,
    /// A schedule: six cron fields, seconds first (`0 */5 * * * *`).
    pub cron: Option<String>,
    /// The IANA time zone of the schedule; `UTC` when not given.
    #[serde(default = "utc")]
    pub timezone: String,
    /// When an occurrence comes while the previous run goes on: `skip` (the default), `allow` or
    /// `queue-one`.
    #[serde(default)]
    pub overlap: crate::domain::Overlap,
    /// Missed occurrences after downtime: `none` (the latest once, the default) or `all` (bounded).
    #[serde(default)]
    pub catch_up: crate::domain::CatchUp,
    /// The script's own limits (`[limits]`), over the global ones.
    #[serde(default)]
    pub limits: LimitOverrides,
    /// The script's own retry settings (`[retry]`), over the global policy.
    #[serde(default)]
    pub retry: RetryOverrides,
    /// An event `scriptd dev` publishes after deploying, to show the script at work.
    pub example: Option<ExampleEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleEvent {
    /// Tenant-relative event type (`order.created`).
    #[serde(rename = "type")]
    pub event_type: String,
    /// The event's payload, published as JSON.
    pub data: toml::Value,
}

fn utc() -> String {
    "UTC".into()
}

impl Manifest {
    pub fn load(path: &Path) -> anyhow::Result<(Manifest, ScriptSpec)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the manifest {}", path.display()))?;
        let manifest: Manifest = toml::from_str(&text)
            .with_context(|| format!("parsing the manifest {}", path.display()))?;
        let source_path = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(&manifest.source);
        let compiled = super::typescript::load(&source_path, None)?;
        let spec = ScriptSpec {
            tenant: manifest.tenant.clone(),
            name: manifest.name.clone(),
            source: compiled.javascript,
            typescript: compiled.typescript,
            subjects: manifest.on.clone(),
            cron: manifest.cron.clone(),
            timezone: manifest.timezone.clone(),
            overlap: manifest.overlap,
            catch_up: manifest.catch_up,
            limits: manifest.limits,
            retry: manifest.retry,
        };
        validate_spec(&spec)?;
        Ok((manifest, spec))
    }
}

/// The run that checks a deploy: the script loaded in a fresh isolate under its own
/// limits, its default export checked, nothing called.
pub fn draft_run(spec: &ScriptSpec, defaults: &crate::engine::Limits) -> crate::engine::ScriptRun {
    crate::engine::ScriptRun::new(
        &spec.tenant,
        &spec.name,
        crate::domain::Version::DRAFT,
        std::sync::Arc::<str>::from(spec.source.as_str()),
        &serde_json::Value::Null,
        defaults.with(&spec.limits),
    )
}

/// The event a test run of `tenant`'s script gets around `data`, made as the daemon makes
/// one from a message on `<events_prefix>.<tenant>.<event_type>`.
pub fn test_event(
    events_prefix: &str,
    tenant: &str,
    event_type: &str,
    data: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "id": format!("test-{:016x}", rand::random::<u64>()),
        "subject": format!("{events_prefix}.{tenant}.{event_type}"),
        "type": event_type,
        "tenant": tenant,
        "data": data,
        "encoding": "json",
        "headers": {},
        "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

/// Checks names and patterns of a deploy before anything is compiled or stored.
pub fn validate_spec(spec: &ScriptSpec) -> anyhow::Result<()> {
    subject::validate_name("tenant", &spec.tenant)?;
    subject::validate_name("script", &spec.name)?;
    for pattern in &spec.subjects {
        subject::validate_pattern(pattern)?;
        // `events.acme.order.created` for tenant acme: a whole subject where the type
        // relative to the tenant belongs; it would only match `<prefix>.acme.events.acme...`.
        let tokens: Vec<&str> = pattern.split('.').collect();
        if tokens.len() > 2 && tokens[1] == spec.tenant {
            anyhow::bail!(
                "{pattern:?} looks like a whole subject: give the event type relative to the \
                 tenant, as in {:?}",
                tokens[2..].join(".")
            );
        }
    }
    match &spec.cron {
        Some(cron) => {
            crate::schedule::Schedule::parse(cron, &spec.timezone).map_err(anyhow::Error::msg)?;
        }
        None if spec.timezone != "UTC" => anyhow::bail!(
            "a time zone ({}) is for a schedule, and {}/{} has none (--cron)",
            spec.timezone,
            spec.tenant,
            spec.name
        ),
        None => {}
    }
    let limits = &spec.limits;
    for (what, zero) in [
        ("timeout", limits.timeout.is_some_and(|t| t.is_zero())),
        ("cpu_time", limits.cpu_time.is_some_and(|t| t.is_zero())),
        ("heap", limits.heap.is_some_and(|h| h.0 == 0)),
        ("max_attempts", spec.retry.max_attempts == Some(0)),
    ] {
        if zero {
            anyhow::bail!(
                "{what} of {}/{} is 0: no run could succeed",
                spec.tenant,
                spec.name
            );
        }
    }
    if spec.subjects.is_empty() && spec.cron.is_none() {
        anyhow::bail!(
            "{}/{} has no trigger: give a subject pattern (--on 'order.*') or a schedule (--cron)",
            spec.tenant,
            spec.name
        );
    }
    Ok(())
}
