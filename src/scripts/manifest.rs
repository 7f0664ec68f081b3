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
    /// An HTTP route (`[http]` with `method`, `path` and `auth`: `token`, the default, or
    /// `public`): requests to `/hooks/<tenant><path>` run the script.
    pub http: Option<crate::scripts::route::HttpRoute>,
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
            http: manifest.http.clone(),
        };
        validate_spec(&spec).with_context(|| format!("checking {}", path.display()))?;
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

/// A deploy refused before anything is compiled or stored, and the setting it is about
/// (`on[0]`, `cron`, `limits.timeout`, `http.path`; `tenant` and `name` for the names).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    /// The setting, as the API's deploy body names it.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn refuse(field: impl Into<String>, message: impl std::fmt::Display) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.to_string(),
    }
}

/// Checks names, patterns, the schedule, the route and the limits of a deploy before
/// anything is compiled or stored.
pub fn validate_spec(spec: &ScriptSpec) -> Result<(), SpecError> {
    subject::validate_name("tenant", &spec.tenant).map_err(|e| refuse("tenant", e))?;
    subject::validate_name("script", &spec.name).map_err(|e| refuse("name", e))?;
    for (i, pattern) in spec.subjects.iter().enumerate() {
        let field = format!("on[{i}]");
        subject::validate_pattern(pattern).map_err(|e| refuse(&field, e))?;
        // `events.acme.order.created` for tenant acme: a whole subject where the type
        // relative to the tenant belongs; it would only match `<prefix>.acme.events.acme...`.
        let tokens: Vec<&str> = pattern.split('.').collect();
        if tokens.len() > 2 && tokens[1] == spec.tenant {
            return Err(refuse(
                field,
                format!(
                    "{pattern:?} looks like a whole subject: give the event type relative to \
                     the tenant, as in {:?}",
                    tokens[2..].join(".")
                ),
            ));
        }
    }
    match &spec.cron {
        Some(cron) => {
            crate::schedule::Schedule::parse(cron, &spec.timezone).map_err(|e| {
                let field = if e.contains("time zone") {
                    "timezone"
                } else {
                    "cron"
                };
                refuse(field, e)
            })?;
        }
        None if spec.timezone != "UTC" => {
            return Err(refuse(
                "timezone",
                format!(
                    "a time zone ({}) is for a schedule, and {}/{} has none (--cron)",
                    spec.timezone, spec.tenant, spec.name
                ),
            ))
        }
        None => {}
    }
    if let Some(route) = &spec.http {
        route.validate().map_err(|e| {
            let field = if e.starts_with("http method") {
                "http.method"
            } else {
                "http.path"
            };
            refuse(field, e)
        })?;
    }
    let limits = &spec.limits;
    for (what, zero) in [
        (
            "limits.timeout",
            limits.timeout.is_some_and(|t| t.is_zero()),
        ),
        (
            "limits.cpu_time",
            limits.cpu_time.is_some_and(|t| t.is_zero()),
        ),
        ("limits.heap", limits.heap.is_some_and(|h| h.0 == 0)),
        ("retry.max_attempts", spec.retry.max_attempts == Some(0)),
    ] {
        if zero {
            let name = what.split_once('.').map_or(what, |(_, n)| n);
            return Err(refuse(
                what,
                format!(
                    "{name} of {}/{} is 0: no run could succeed",
                    spec.tenant, spec.name
                ),
            ));
        }
    }
    if spec.subjects.is_empty() && spec.cron.is_none() && spec.http.is_none() {
        return Err(refuse(
            "on",
            format!(
                "{}/{} has no trigger: give a subject pattern (--on 'order.*'), a schedule \
                 (--cron) or an HTTP route (--http 'POST /orders')",
                spec.tenant, spec.name
            ),
        ));
    }
    Ok(())
}
