//! Settings: built-in defaults, then an optional TOML file, then `SCRIPTD_*` environment
//! variables (`__` separates levels: `SCRIPTD_ENGINE__LIMITS__TIMEOUT=2s`). Loaded once at
//! start into typed structs; nothing reads the environment afterwards.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::bus::NatsConfig;
use crate::caps::CapabilitiesConfig;
use crate::engine::EngineConfig;
use crate::observe::telemetry::LogConfig;
use crate::retry::RetryPolicy;
use crate::store::DatabaseConfig;
use crate::units::duration_str;

/// Environment variables with this prefix are settings.
pub const ENV_PREFIX: &str = "SCRIPTD_";
/// Settings that are maps: the environment may add keys to them (lowercased, like every
/// name taken from a variable: `SCRIPTD_TENANTS__CONCURRENT_RUNS__ACME=16`).
const MAP_SETTINGS: [&str; 1] = ["tenants.concurrent_runs"];
/// Variables with the prefix that are not settings (read by the command line parser).
const NOT_SETTINGS: [&str; 2] = ["SCRIPTD_CONFIG", "SCRIPTD_LOG_FORMAT"];

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How the daemon logs (`[log]`).
    pub log: LogConfig,
    /// Where and how scripts run, and their default limits (`[engine]`).
    pub engine: EngineConfig,
    /// How failed runs are retried, unless a script says otherwise (`[retry]`).
    pub retry: RetryPolicy,
    /// The PostgreSQL connection (`[database]`).
    pub database: DatabaseConfig,
    /// The NATS connection, subjects and streams (`[nats]`).
    pub nats: NatsConfig,
    /// How much of a replica one tenant may take (`[tenants]`).
    pub tenants: crate::pipeline::tenants::TenantsConfig,
    /// Shutdown and script index reloads (`[daemon]`).
    pub daemon: DaemonConfig,
    /// What the script API allows (`[capabilities]`).
    pub capabilities: CapabilitiesConfig,
    /// Health and metrics endpoints and OTLP export (`[telemetry]`).
    pub telemetry: crate::observe::telemetry::TelemetryConfig,
    /// The HTTP API (`[api]`).
    pub api: ApiConfig,
    /// Variables with the `SCRIPTD_` prefix that name no section of the settings and were
    /// left alone (Kubernetes puts `SCRIPTD_PORT`, `SCRIPTD_SERVICE_HOST` and the like into
    /// every pod beside a Service named `scriptd`); the command warns of them once.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

/// The `[api]` settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address the API listens on (`127.0.0.1:8081`); empty (the default) serves none.
    pub listen: String,
}

/// The `[daemon]` settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// How long runs in flight may take to finish after a shutdown signal; what is still
    /// running then is handed back to JetStream for another replica.
    #[serde(with = "duration_str")]
    pub shutdown_grace: Duration,
    /// Full reload of the script index, the fallback for missed change notifications.
    #[serde(with = "duration_str")]
    pub index_reload_interval: Duration,
    /// Threads of the daemon's async runtime: NATS, PostgreSQL, the engine hosts' sockets,
    /// the API. Scripts do not run on them (they run in engine hosts, or on the engine's
    /// own threads). 0, the default, means one per four cores, at least one: one thread
    /// does the daemon's work per event with less CPU than two (BENCHMARKS.md).
    pub threads: usize,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            shutdown_grace: Duration::from_secs(20),
            index_reload_interval: Duration::from_secs(30),
            threads: 0,
        }
    }
}

impl DaemonConfig {
    /// The runtime's threads: `threads`, or for 0 one per four cores (at least one).
    pub fn runtime_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (cores / 4).max(1)
    }
}

impl Settings {
    /// The settings with credentials hidden, for printing.
    pub fn redacted(&self) -> Settings {
        let mut shown = self.clone();
        shown.database.url = crate::store::redact(&shown.database.url);
        if !shown.capabilities.secrets.key.is_empty() {
            shown.capabilities.secrets.key = "(set)".into();
        }
        shown
    }

    /// Defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Settings> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Settings> {
        let mut merged = toml::Table::try_from(Settings::default())
            .context("serialising the default settings")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the configuration file {}", path.display()))?;
            let table: toml::Table = toml::from_str(&text)
                .with_context(|| format!("parsing the configuration file {}", path.display()))?;
            Settings::deserialize(toml::Value::Table(table.clone()))
                .with_context(|| format!("in the configuration file {}", path.display()))?;
            merge(&mut merged, table);
        }
        let mut vars: Vec<_> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !NOT_SETTINGS.contains(&k.as_str()))
            .collect();
        vars.sort();
        let mut ignored = Vec::new();
        for (name, raw) in vars {
            // A variable whose first part names no section is someone else's; one that names
            // a section but no setting in it is a typo, and an error.
            let section = name[ENV_PREFIX.len()..]
                .split("__")
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            if !merged.get(&section).is_some_and(toml::Value::is_table) {
                ignored.push(name);
                continue;
            }
            set_from_env(&mut merged, &name, &raw)?;
        }
        let mut settings =
            Settings::deserialize(toml::Value::Table(merged)).context("in the settings")?;
        settings.ignored_env = ignored;
        Ok(settings)
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Sets the setting an environment variable names; the setting must exist.
fn set_from_env(settings: &mut toml::Table, name: &str, raw: &str) -> anyhow::Result<()> {
    let path: Vec<String> = name[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    let dotted = path.join(".");
    let (last, parents) = path.split_last().context("empty variable name")?;
    let mut table = &mut *settings;
    for key in parents {
        table = match table.get_mut(key) {
            Some(toml::Value::Table(t)) => t,
            _ => bail!("{name} names no setting ({dotted} does not exist)"),
        };
    }
    let in_map = MAP_SETTINGS.contains(&parents.join(".").as_str());
    if !table.contains_key(last) && !in_map {
        bail!("{name} names no setting ({dotted} does not exist)");
    }
    // A list setting takes comma-separated items. Otherwise a value that reads as a TOML
    // scalar (number, boolean) is taken as one; anything else is a string ("2s", "json").
    let value = if table.get(last).is_some_and(toml::Value::is_array) {
        toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| toml::Value::String(item.to_owned()))
                .collect(),
        )
    } else {
        toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(|v| !v.is_table() && !v.is_array())
            .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
    };
    table.insert(last.clone(), value);
    Settings::deserialize(toml::Value::Table(settings.clone()))
        .with_context(|| format!("in the environment variable {name}={raw:?}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::units::ByteSize;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_documented_values() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.engine.limits.timeout, Duration::from_secs(5));
        assert_eq!(s.engine.limits.heap, ByteSize::mib(64));
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let dir = std::env::temp_dir().join(format!("scriptd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("scriptd.toml");
        std::fs::write(
            &file,
            "[engine]\nworkers = 3\n[engine.limits]\ntimeout = \"2s\"\nheap = \"32MiB\"\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&file),
            env(&[
                ("SCRIPTD_ENGINE__LIMITS__HEAP", "16MiB"),
                ("SCRIPTD_LOG__FORMAT", "json"),
                ("SCRIPTD_CONFIG", "ignored"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(s.engine.workers, 3);
        assert_eq!(s.engine.limits.timeout, Duration::from_secs(2));
        assert_eq!(s.engine.limits.heap, ByteSize::mib(16));
        assert_eq!(s.log.format, crate::observe::telemetry::LogFormat::Json);
    }

    #[test]
    fn map_settings_take_new_keys_from_the_environment() {
        let s = Settings::load_from(
            None,
            env(&[
                ("SCRIPTD_TENANTS__CONCURRENT_RUNS__ACME", "16"),
                ("SCRIPTD_TENANTS__MAX_CONCURRENT_RUNS", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.tenants.concurrent_runs.get("acme"), Some(&16));
        assert_eq!(s.tenants.cap("acme", 4), 16);
        assert_eq!(s.tenants.cap("other", 4), 2);
        assert!(Settings::load_from(None, env(&[("SCRIPTD_TENANTS__NOPE", "1")])).is_err());
    }

    #[test]
    fn variables_naming_no_section_are_left_alone_and_typos_in_a_section_are_errors() {
        let s = Settings::load_from(
            None,
            env(&[
                ("SCRIPTD_PORT", "tcp://10.0.0.7:8080"),
                ("SCRIPTD_SERVICE_HOST", "10.0.0.7"),
                ("SCRIPTD_ENGINE__WORKERS", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(s.engine.workers, 3);
        assert_eq!(s.ignored_env, ["SCRIPTD_PORT", "SCRIPTD_SERVICE_HOST"]);
        let typo = Settings::load_from(None, env(&[("SCRIPTD_ENGINE__LIMITS__TIMOUT", "1s")]));
        let message = format!("{:#}", typo.unwrap_err());
        assert!(
            message.contains("engine.limits.timout does not exist"),
            "{message}"
        );
    }

    #[test]
    fn list_settings_take_comma_separated_items_and_keys_are_not_printed() {
        let s = Settings::load_from(
            None,
            env(&[
                (
                    "SCRIPTD_CAPABILITIES__FETCH__ALLOW_PRIVATE",
                    "10.0.0.0/8, 127.0.0.1/32",
                ),
                ("SCRIPTD_CAPABILITIES__SECRETS__KEY", "c2VjcmV0"),
            ]),
        )
        .unwrap();
        let nets: Vec<String> = s
            .capabilities
            .fetch
            .allow_private
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "127.0.0.1/32"]);
        let shown = toml::to_string(&s.redacted()).unwrap();
        assert!(
            !shown.contains("c2VjcmV0") && shown.contains("(set)"),
            "{shown}"
        );
        let err = Settings::load_from(
            None,
            env(&[(
                "SCRIPTD_CAPABILITIES__FETCH__ALLOW_PRIVATE",
                "not-a-network",
            )]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("ALLOW_PRIVATE"), "{err:#}");
    }

    #[test]
    fn unknown_or_malformed_settings_are_refused_with_their_name() {
        let err = Settings::load_from(None, env(&[("SCRIPTD_ENGINE__WROKERS", "2")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SCRIPTD_ENGINE__WROKERS"), "{err}");
        let err = Settings::load_from(None, env(&[("SCRIPTD_ENGINE__LIMITS__HEAP", "lots")]))
            .unwrap_err();
        assert!(format!("{err:#}").contains("lots"), "{err:#}");
    }
}
