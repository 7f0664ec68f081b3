//! The daemon's metrics: OpenTelemetry instruments in one meter provider, read by the
//! Prometheus exporter for `/metrics` and, when an OTLP endpoint is configured, by the OTLP
//! exporter, so both carry the same values. The daemon's parts report runs and schedules
//! here as they go; what they count themselves is read at collection time through the
//! readers the daemon registers (`observe`). Labels are bounded: statuses and failure kinds
//! are fixed sets; the tenant is a label only when `telemetry.tenant_labels` is set.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::metrics::{AsyncInstrument, Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::{MeterProviderBuilder, SdkMeterProvider};
use prometheus::{Registry, TextEncoder};

/// Upper bounds (seconds) of the run duration buckets.
const RUN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds (seconds) of the schedule start delay buckets.
const DELAY_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// A scheduled run starting later than this after its occurrence counts as a late start.
pub const LATE_START: Duration = Duration::from_secs(1);

/// What the daemon's parts report as they go, and what `/metrics` and OTLP export read.
pub struct Metrics {
    tenant_labels: AtomicBool,
    /// Owns the readers: the Prometheus exporter's and, when exporting, the OTLP one.
    provider: SdkMeterProvider,
    meter: Meter,
    /// Where the Prometheus exporter puts what it collects at each scrape.
    registry: Registry,
    runs_started: Counter<f64>,
    runs_finished: Counter<f64>,
    run_duration: Histogram<f64>,
    schedule_delay: Histogram<f64>,
    schedule_late_starts: Counter<f64>,
    schedule_skips: Counter<f64>,
    /// Names of the instruments read at collection time, registered once each.
    observed: Mutex<HashSet<&'static str>>,
}

/// What an instrument read at collection time measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A total that only grows; its name ends in `_total`.
    Counter,
    /// A level that goes up and down.
    Gauge,
}

/// Where a reader registered with [`Metrics::observe`] reports its values at one collection.
pub struct Reading<'a> {
    observer: &'a dyn AsyncInstrument<f64>,
}

impl Reading<'_> {
    /// The value of the series without labels.
    pub fn value(&self, value: f64) {
        self.observer.observe(value, &[]);
    }

    /// The value of the series with `labels` (a fixed set of names and values).
    pub fn labelled(&self, labels: &[(&'static str, &'static str)], value: f64) {
        let labels: Vec<KeyValue> = labels
            .iter()
            .map(|(name, value)| KeyValue::new(*name, *value))
            .collect();
        self.observer.observe(value, &labels);
    }
}

/// OpenTelemetry names counters without Prometheus' `_total`, which the Prometheus exporter
/// appends again.
fn otel_counter_name(name: &'static str) -> &'static str {
    name.strip_suffix("_total").unwrap_or(name)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(false)
    }
}

impl Metrics {
    /// Metrics served on `/metrics` only.
    pub fn new(tenant_labels: bool) -> Metrics {
        Metrics::with_provider(tenant_labels, SdkMeterProvider::builder())
    }

    /// Metrics served on `/metrics` and read by the readers already on `provider` (the OTLP
    /// exporter's, with its resource).
    pub fn with_provider(tenant_labels: bool, provider: MeterProviderBuilder) -> Metrics {
        let registry = Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            // The exposition stays what scrapers knew: no `target_info` series of resource
            // attributes and no `otel_scope_*` labels on every series.
            .without_target_info()
            .without_scope_info()
            .build()
            .expect("a new registry takes the exporter's collector");
        let provider = provider.with_reader(exporter).build();
        let meter = provider.meter("scriptd");
        let counter = |name: &'static str, help: &'static str| {
            meter
                .f64_counter(otel_counter_name(name))
                .with_description(help)
                .build()
        };
        let runs_started = counter("scriptd_runs_started_total", "Runs started.");
        let runs_finished = counter(
            "scriptd_runs_finished_total",
            "Runs ended, by status and failure kind.",
        );
        let schedule_late_starts = counter(
            "scriptd_schedule_late_starts_total",
            "Scheduled runs that started over 1 s after their occurrence.",
        );
        let schedule_skips = counter(
            "scriptd_schedule_skips_total",
            "Schedule occurrences not run, by reason.",
        );
        // Series without labels are there from the start, at zero.
        runs_started.add(0.0, &[]);
        schedule_late_starts.add(0.0, &[]);
        // The Prometheus exporter appends the unit: `scriptd_run_duration_seconds`.
        let run_duration = meter
            .f64_histogram("scriptd_run_duration")
            .with_unit("s")
            .with_description("Run duration in the engine.")
            .with_boundaries(RUN_BUCKETS.to_vec())
            .build();
        let schedule_delay = meter
            .f64_histogram("scriptd_schedule_start_delay")
            .with_unit("s")
            .with_description("Time from a schedule occurrence to its run's start.")
            .with_boundaries(DELAY_BUCKETS.to_vec())
            .build();
        Metrics {
            tenant_labels: AtomicBool::new(tenant_labels),
            provider,
            meter,
            registry,
            runs_started,
            runs_finished,
            run_duration,
            schedule_delay,
            schedule_late_starts,
            schedule_skips,
            observed: Mutex::new(HashSet::new()),
        }
    }

    pub fn set_tenant_labels(&self, on: bool) {
        self.tenant_labels.store(on, Ordering::Relaxed);
    }

    /// Registers `name` (with its `_total` for a counter), whose values `read` reports at
    /// each scrape and each OTLP export. A name already registered is left as it was.
    pub fn observe(
        &self,
        kind: Kind,
        name: &'static str,
        help: &'static str,
        read: impl Fn(&Reading<'_>) + Send + Sync + 'static,
    ) {
        if !self
            .observed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name)
        {
            return;
        }
        let callback = move |observer: &dyn AsyncInstrument<f64>| read(&Reading { observer });
        match kind {
            Kind::Counter => {
                debug_assert!(name.ends_with("_total"), "{name}");
                self.meter
                    .f64_observable_counter(otel_counter_name(name))
                    .with_description(help)
                    .with_callback(callback)
                    .build();
            }
            Kind::Gauge => {
                self.meter
                    .f64_observable_gauge(name)
                    .with_description(help)
                    .with_callback(callback)
                    .build();
            }
        }
    }

    pub fn run_started(&self) {
        self.runs_started.add(1.0, &[]);
    }

    /// A run ended with `status` (`ok`, `retrying`, `dead_lettered`, `skipped`, `failed`,
    /// `not_started`) and, when it failed, its failure kind.
    pub fn run_finished(
        &self,
        tenant: &str,
        status: &'static str,
        kind: Option<&str>,
        took: Option<Duration>,
    ) {
        let mut labels = vec![
            KeyValue::new("status", status),
            KeyValue::new("kind", kind.unwrap_or("none").to_owned()),
        ];
        if self.tenant_labels.load(Ordering::Relaxed) {
            labels.push(KeyValue::new("tenant", tenant.to_owned()));
        }
        self.runs_finished.add(1.0, &labels);
        if let Some(took) = took {
            self.run_duration.record(took.as_secs_f64(), &[]);
        }
    }

    /// A scheduled run started `delay` after its occurrence.
    pub fn schedule_started(&self, delay: Duration) {
        self.schedule_delay.record(delay.as_secs_f64(), &[]);
        if delay > LATE_START {
            self.schedule_late_starts.add(1.0, &[]);
        }
    }

    /// Occurrences not run: `overlap` (the previous run was going) or `missed` (downtime,
    /// not caught up).
    pub fn schedule_skipped(&self, reason: &'static str, n: u64) {
        self.schedule_skips
            .add(n as f64, &[KeyValue::new("reason", reason)]);
    }

    /// Prometheus text exposition format 0.0.4, collected now.
    pub fn render(&self) -> anyhow::Result<String> {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .context("encoding the metrics")
    }

    /// Sends what the OTLP exporter has not sent yet and stops it; `/metrics` is empty
    /// from then on.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("scriptd: flushing metrics failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
