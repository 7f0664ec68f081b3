//! Resource limits of one script run: global defaults with per-script overrides.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{duration_str, ByteSize};

/// The limits a run is held to. Every field has a documented default (docs/scripts.md#limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock time for one run, module evaluation included, enforced from outside the
    /// isolate's thread.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// Maximum JavaScript heap of the isolate, ArrayBuffer contents included.
    pub heap: ByteSize,
    /// Maximum size of the script's source.
    pub source: ByteSize,
    /// Maximum size of the handler's return value, serialised as JSON.
    pub result: ByteSize,
    /// Maximum size of the console output captured per run; the rest is cut with a marker.
    pub logs: ByteSize,
    /// CPU time of the run's thread, module evaluation included; time spent waiting for the
    /// script API (fetch, kv, publish) does not count.
    #[serde(with = "duration_str")]
    pub cpu_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(5),
            heap: ByteSize::mib(64),
            source: ByteSize::kib(256),
            result: ByteSize::mib(1),
            logs: ByteSize::kib(64),
            // As long as the default timeout: a script given a longer timeout to wait on a
            // slow service does not also get to compute longer on a shared worker.
            cpu_time: Duration::from_secs(5),
        }
    }
}

/// A script's own limits; each field left empty falls back to the global value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitOverrides {
    /// The script's wall-clock limit; `None` for the global one.
    #[serde(
        with = "crate::units::opt_duration_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// The script's heap limit; `None` for the global one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap: Option<ByteSize>,
    /// The script's source size limit; `None` for the global one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<ByteSize>,
    /// The script's limit on its return value as JSON; `None` for the global one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ByteSize>,
    /// The script's limit on captured console output; `None` for the global one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<ByteSize>,
    /// The script's CPU-time limit; `None` for the global one.
    #[serde(
        with = "crate::units::opt_duration_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_time: Option<Duration>,
}

impl Limits {
    /// These limits with a script's overrides applied.
    pub fn with(self, o: &LimitOverrides) -> Limits {
        Limits {
            timeout: o.timeout.unwrap_or(self.timeout),
            heap: o.heap.unwrap_or(self.heap),
            source: o.source.unwrap_or(self.source),
            result: o.result.unwrap_or(self.result),
            logs: o.logs.unwrap_or(self.logs),
            cpu_time: o.cpu_time.unwrap_or(self.cpu_time),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_what_they_set() {
        let global = Limits::default();
        let o = LimitOverrides {
            timeout: Some(Duration::from_millis(200)),
            heap: Some(ByteSize::mib(16)),
            ..Default::default()
        };
        let l = global.with(&o);
        assert_eq!(l.timeout, Duration::from_millis(200));
        assert_eq!(l.heap, ByteSize::mib(16));
        assert_eq!(l.source, global.source);
        assert_eq!(l.result, global.result);
        assert_eq!(l.logs, global.logs);
    }

    #[test]
    fn overrides_read_from_toml() {
        let o: LimitOverrides = toml::from_str("timeout = \"2s\"\nheap = \"32MiB\"").unwrap();
        assert_eq!(o.timeout, Some(Duration::from_secs(2)));
        assert_eq!(o.heap, Some(ByteSize::mib(32)));
        assert!(toml::from_str::<LimitOverrides>("heap_size = 3").is_err());
    }
}
