//! The daemon's metrics: counters, gauges and histograms kept in atomics (cheap whether or
//! not anyone reads them), rendered as Prometheus text for `/metrics` and read by the
//! OpenTelemetry exporter when one is configured. Labels are bounded: statuses and failure
//! kinds are fixed sets; the tenant is a label only when `telemetry.tenant_labels` is set.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::bus::fanout::FanoutStats;
use crate::engine::Engine;
use crate::pipeline::report::AttemptStats;

/// Upper bounds (seconds) of the run duration buckets.
const RUN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds (seconds) of the schedule start delay buckets.
const DELAY_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// A scheduled run starting later than this after its occurrence counts as a late start.
pub const LATE_START: Duration = Duration::from_secs(1);

pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// (status, failure kind or "none", tenant if labelled).
type RunKey = (&'static str, String, Option<String>);

/// What the daemon parts report as they go; the rest is read from them when rendered.
pub struct Metrics {
    tenant_labels: AtomicBool,
    runs_started: AtomicU64,
    runs_finished: Mutex<BTreeMap<RunKey, u64>>,
    pub run_duration: Histogram,
    pub schedule_delay: Histogram,
    schedule_late_starts: AtomicU64,
    schedule_skips: Mutex<BTreeMap<&'static str, u64>>,
    sources: OnceLock<Sources>,
    /// The histograms' OpenTelemetry twins, when metrics are exported.
    otel: OnceLock<OtelHistograms>,
}

struct OtelHistograms {
    run_duration: opentelemetry::metrics::Histogram<f64>,
    schedule_delay: opentelemetry::metrics::Histogram<f64>,
}

/// The parts whose own counters and state are read at render time.
pub struct Sources {
    pub fanout: Arc<FanoutStats>,
    pub runner: Arc<AttemptStats>,
    pub engine: Arc<Engine>,
    pub nats: async_nats::Client,
    pub postgres: deadpool_postgres::Pool,
}

/// One value of a counter or gauge, for the exporters.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub help: &'static str,
    pub counter: bool,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(false)
    }
}

impl Metrics {
    pub fn new(tenant_labels: bool) -> Metrics {
        Metrics {
            tenant_labels: AtomicBool::new(tenant_labels),
            runs_started: AtomicU64::new(0),
            runs_finished: Mutex::new(BTreeMap::new()),
            run_duration: Histogram::new(RUN_BUCKETS),
            schedule_delay: Histogram::new(DELAY_BUCKETS),
            schedule_late_starts: AtomicU64::new(0),
            schedule_skips: Mutex::new(BTreeMap::new()),
            sources: OnceLock::new(),
            otel: OnceLock::new(),
        }
    }

    /// Records the histograms through `meter` from now on as well.
    pub fn export_histograms(&self, meter: &opentelemetry::metrics::Meter) {
        let _ = self.otel.set(OtelHistograms {
            run_duration: meter
                .f64_histogram("scriptd_run_duration")
                .with_unit("s")
                .with_description("Run duration in the engine.")
                .with_boundaries(RUN_BUCKETS.to_vec())
                .build(),
            schedule_delay: meter
                .f64_histogram("scriptd_schedule_start_delay")
                .with_unit("s")
                .with_description("Time from a schedule occurrence to its run's start.")
                .with_boundaries(DELAY_BUCKETS.to_vec())
                .build(),
        });
    }

    pub fn set_tenant_labels(&self, on: bool) {
        self.tenant_labels.store(on, Ordering::Relaxed);
    }

    /// Called once the daemon has its parts.
    pub fn attach(&self, sources: Sources) {
        let _ = self.sources.set(sources);
    }

    pub fn run_started(&self) {
        self.runs_started.fetch_add(1, Ordering::Relaxed);
    }

    /// A run ended with `status` (`ok`, `retrying`, `dead_lettered`, `skipped`) and, when it
    /// failed, its failure kind.
    pub fn run_finished(
        &self,
        tenant: &str,
        status: &'static str,
        kind: Option<&str>,
        took: Option<Duration>,
    ) {
        let key = (
            status,
            kind.unwrap_or("none").to_owned(),
            self.tenant_labels
                .load(Ordering::Relaxed)
                .then(|| tenant.to_owned()),
        );
        *self
            .runs_finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
        if let Some(took) = took {
            self.run_duration.observe(took);
            if let Some(otel) = self.otel.get() {
                otel.run_duration.record(took.as_secs_f64(), &[]);
            }
        }
    }

    /// A scheduled run started `delay` after its occurrence.
    pub fn schedule_started(&self, delay: Duration) {
        self.schedule_delay.observe(delay);
        if let Some(otel) = self.otel.get() {
            otel.schedule_delay.record(delay.as_secs_f64(), &[]);
        }
        if delay > LATE_START {
            self.schedule_late_starts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Occurrences not run: `overlap` (the previous run was going) or `missed` (downtime,
    /// not caught up).
    pub fn schedule_skipped(&self, reason: &'static str, n: u64) {
        *self
            .schedule_skips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += n;
    }

    /// Every counter and gauge with its current value.
    pub fn samples(&self) -> Vec<Sample> {
        let mut out = Vec::new();
        let mut push = |name, help, counter, labels: Vec<(&'static str, String)>, value: f64| {
            out.push(Sample {
                name,
                help,
                counter,
                labels,
                value,
            })
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        push(
            "scriptd_runs_started_total",
            "Runs started.",
            true,
            vec![],
            load(&self.runs_started),
        );
        for ((status, kind, tenant), n) in self
            .runs_finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let mut labels = vec![("status", status.to_string()), ("kind", kind.clone())];
            if let Some(t) = tenant {
                labels.push(("tenant", t.clone()));
            }
            push(
                "scriptd_runs_finished_total",
                "Runs ended, by status and failure kind.",
                true,
                labels,
                *n as f64,
            );
        }
        push(
            "scriptd_schedule_late_starts_total",
            "Scheduled runs that started over 1 s after their occurrence.",
            true,
            vec![],
            load(&self.schedule_late_starts),
        );
        for (reason, n) in self
            .schedule_skips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            push(
                "scriptd_schedule_skips_total",
                "Schedule occurrences not run, by reason.",
                true,
                vec![("reason", reason.to_string())],
                *n as f64,
            );
        }
        let Some(s) = self.sources.get() else {
            return out;
        };
        for (name, help, counter) in [
            (
                "scriptd_events_received_total",
                "Events taken from the events stream.",
                &s.fanout.events,
            ),
            (
                "scriptd_jobs_created_total",
                "Jobs published by the fan-out: runs queued in their lane, and retries of direct runs.",
                &s.fanout.jobs,
            ),
            (
                "scriptd_events_returned_total",
                "Events handed back to JetStream unfinished, to be delivered again.",
                &s.fanout.returned,
            ),
            (
                "scriptd_direct_runs_total",
                "First attempts run straight from the fan-out, without a job.",
                &s.fanout.direct,
            ),
            (
                "scriptd_direct_overflows_total",
                "Runs queued in their lane because no permit or engine slot came within nats.direct_wait.",
                &s.fanout.overflowed,
            ),
        ] {
            push(name, help, true, vec![], load(counter));
        }
        for (reason, counter) in [
            ("unmatched", &s.fanout.unmatched),
            ("bad_subject", &s.fanout.bad_subjects),
            ("too_large", &s.fanout.too_large),
        ] {
            push(
                "scriptd_events_dropped_total",
                "Events that made no run, by reason.",
                true,
                vec![("reason", reason.into())],
                load(counter),
            );
        }
        push(
            "scriptd_retries_total",
            "Runs that failed and will be retried.",
            true,
            vec![],
            load(&s.runner.retried),
        );
        push(
            "scriptd_dead_letters_total",
            "Jobs sent to the dead-letter subject.",
            true,
            vec![],
            load(&s.runner.dead_lettered),
        );
        push(
            "scriptd_jobs_returned_total",
            "Jobs handed back unfinished (shutdown, unavailable database).",
            true,
            vec![],
            load(&s.runner.returned),
        );
        push(
            "scriptd_jobs_held_elsewhere_total",
            "Job deliveries handed back because another replica held the attempt's claim.",
            true,
            vec![],
            load(&s.runner.held_elsewhere),
        );
        let e = s.engine.stats();
        push(
            "scriptd_engine_warm_hits_total",
            "Runs served by a warm isolate.",
            true,
            vec![],
            e.warm_hits as f64,
        );
        push(
            "scriptd_engine_cold_starts_total",
            "Runs that created an isolate (pool misses).",
            true,
            vec![],
            e.cold_starts as f64,
        );
        push(
            "scriptd_engine_evictions_total",
            "Warm isolates evicted for room.",
            true,
            vec![],
            e.evictions as f64,
        );
        push(
            "scriptd_engine_discarded_total",
            "Isolates dropped after a run left them unfit (timeout, heap limit).",
            true,
            vec![],
            e.discarded as f64,
        );
        push(
            "scriptd_engine_warm_isolates",
            "Warm isolates kept.",
            false,
            vec![],
            e.warm_isolates as f64,
        );
        push(
            "scriptd_engine_in_flight",
            "Runs queued on or running in an engine worker.",
            false,
            vec![],
            e.in_flight as f64,
        );
        push(
            "scriptd_engine_workers",
            "Engine worker threads.",
            false,
            vec![],
            s.engine.workers() as f64,
        );
        let connected = s.nats.connection_state() == async_nats::connection::State::Connected;
        push(
            "scriptd_nats_connected",
            "1 while connected to NATS.",
            false,
            vec![],
            f64::from(u8::from(connected)),
        );
        let pool = s.postgres.status();
        push(
            "scriptd_postgres_connections",
            "Pooled PostgreSQL connections, by state.",
            false,
            vec![("state", "idle".into())],
            pool.available as f64,
        );
        push(
            "scriptd_postgres_connections",
            "Pooled PostgreSQL connections, by state.",
            false,
            vec![("state", "in_use".into())],
            pool.size.saturating_sub(pool.available) as f64,
        );
        push(
            "scriptd_postgres_waiting",
            "Tasks waiting for a PostgreSQL connection.",
            false,
            vec![],
            pool.waiting as f64,
        );
        out
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut announced = std::collections::HashSet::new();
        for sample in self.samples() {
            if announced.insert(sample.name) {
                let kind = if sample.counter { "counter" } else { "gauge" };
                let _ = writeln!(
                    out,
                    "# HELP {} {}\n# TYPE {} {kind}",
                    sample.name, sample.help, sample.name
                );
            }
            out.push_str(sample.name);
            if !sample.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in sample.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let v = v
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    let _ = write!(out, "{k}=\"{v}\"");
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", sample.value);
        }
        self.run_duration.render(
            &mut out,
            "scriptd_run_duration_seconds",
            "Run duration in the engine.",
        );
        self.schedule_delay.render(
            &mut out,
            "scriptd_schedule_start_delay_seconds",
            "Time from a schedule occurrence to its run's start.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_counted_by_status_and_kind_and_rendered() {
        let m = Metrics::new(false);
        m.run_started();
        m.run_finished("acme", "ok", None, Some(Duration::from_millis(3)));
        m.run_finished(
            "acme",
            "retrying",
            Some("timeout"),
            Some(Duration::from_secs(2)),
        );
        m.run_finished("globex", "retrying", Some("timeout"), None);
        m.schedule_started(Duration::from_secs(3));
        m.schedule_skipped("overlap", 2);
        let text = m.render();
        assert!(
            text.contains("scriptd_runs_finished_total{status=\"retrying\",kind=\"timeout\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("scriptd_runs_finished_total{status=\"ok\",kind=\"none\"} 1\n"));
        assert!(text.contains("scriptd_run_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("scriptd_run_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("scriptd_run_duration_seconds_count 2\n"));
        assert!(text.contains("scriptd_schedule_late_starts_total 1\n"));
        assert!(text.contains("scriptd_schedule_skips_total{reason=\"overlap\"} 2\n"));
        assert!(!text.contains("tenant="));
        // Every sample line is `name{labels} value` with a number.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn tenants_are_labels_only_when_configured() {
        let m = Metrics::new(true);
        m.run_finished("acme", "ok", None, None);
        assert!(m.render().contains("tenant=\"acme\""));
    }
}
