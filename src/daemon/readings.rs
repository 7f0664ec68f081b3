//! The metrics read from the daemon's parts at each scrape and OTLP export: the fan-out's
//! and the attempts' counters, the engine's pool, the NATS connection and the PostgreSQL
//! pool. The parts count for themselves; this registers how their counts are read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bus::fanout::FanoutStats;
use crate::engine::Engine;
use crate::observe::metrics::{Kind, Metrics};
use crate::pipeline::report::AttemptStats;

/// The parts whose own counters and state the metrics read.
pub struct Parts {
    /// The fan-out's counters.
    pub fanout: Arc<FanoutStats>,
    /// The attempts' counters.
    pub attempts: Arc<AttemptStats>,
    /// The engine, for its isolate pool and workers.
    pub engine: Arc<Engine>,
    /// The NATS connection, for its state.
    pub nats: async_nats::Client,
    /// The PostgreSQL pool, for its connections and waiters.
    pub postgres: deadpool_postgres::Pool,
}

fn load(counter: &AtomicU64) -> f64 {
    counter.load(Ordering::Relaxed) as f64
}

/// Registers the readings of `parts` with `metrics`.
pub fn register(metrics: &Metrics, parts: Parts) {
    let Parts {
        fanout,
        attempts,
        engine,
        nats,
        postgres,
    } = parts;
    type FanoutCounter = fn(&FanoutStats) -> &AtomicU64;
    let fanout_counters: [(&'static str, &'static str, FanoutCounter); 6] = [
        (
            "scriptd_events_received_total",
            "Events taken from the tenants' event lanes.",
            |f| &f.events,
        ),
        (
            "scriptd_jobs_created_total",
            "Jobs published by the fan-out: runs queued in their lane, and retries of direct runs.",
            |f| &f.jobs,
        ),
        (
            "scriptd_events_returned_total",
            "Events handed back to JetStream unfinished, to be delivered again.",
            |f| &f.returned,
        ),
        (
            "scriptd_direct_runs_total",
            "First attempts run straight from the fan-out, without a job.",
            |f| &f.direct,
        ),
        (
            "scriptd_direct_runs_unclaimed_total",
            "Of the direct runs, those of an event's first delivery anywhere, run without an attempt claim.",
            |f| &f.unclaimed,
        ),
        (
            "scriptd_direct_overflows_total",
            "Runs queued in their lane because no permit or engine slot came within nats.direct_wait.",
            |f| &f.overflowed,
        ),
    ];
    for (name, help, counter) in fanout_counters {
        let fanout = fanout.clone();
        metrics.observe(Kind::Counter, name, help, move |r| {
            r.value(load(counter(&fanout)))
        });
    }
    let dropped = fanout.clone();
    metrics.observe(
        Kind::Counter,
        "scriptd_events_dropped_total",
        "Events that made no run, by reason.",
        move |r| {
            for (reason, counter) in [
                ("unmatched", &dropped.unmatched),
                ("bad_subject", &dropped.bad_subjects),
                ("too_large", &dropped.too_large),
            ] {
                r.labelled(&[("reason", reason)], load(counter));
            }
        },
    );

    type AttemptCounter = fn(&AttemptStats) -> &AtomicU64;
    let attempt_counters: [(&'static str, &'static str, AttemptCounter); 4] = [
        (
            "scriptd_retries_total",
            "Runs that failed and will be retried.",
            |a| &a.retried,
        ),
        (
            "scriptd_dead_letters_total",
            "Jobs sent to the dead-letter subject.",
            |a| &a.dead_lettered,
        ),
        (
            "scriptd_jobs_returned_total",
            "Jobs handed back unfinished (shutdown, unavailable database).",
            |a| &a.returned,
        ),
        (
            "scriptd_jobs_held_elsewhere_total",
            "Job deliveries handed back because another replica held the attempt's claim.",
            |a| &a.held_elsewhere,
        ),
    ];
    for (name, help, counter) in attempt_counters {
        let attempts = attempts.clone();
        metrics.observe(Kind::Counter, name, help, move |r| {
            r.value(load(counter(&attempts)))
        });
    }

    type EngineValue = fn(&Engine) -> u64;
    let engine_values: [(Kind, &'static str, &'static str, EngineValue); 7] = [
        (
            Kind::Counter,
            "scriptd_engine_warm_hits_total",
            "Runs served by a warm isolate.",
            |e| e.stats().warm_hits,
        ),
        (
            Kind::Counter,
            "scriptd_engine_cold_starts_total",
            "Runs that created an isolate (pool misses).",
            |e| e.stats().cold_starts,
        ),
        (
            Kind::Counter,
            "scriptd_engine_evictions_total",
            "Warm isolates evicted for room.",
            |e| e.stats().evictions,
        ),
        (
            Kind::Counter,
            "scriptd_engine_discarded_total",
            "Isolates dropped after a run left them unfit (timeout, heap limit).",
            |e| e.stats().discarded,
        ),
        (
            Kind::Gauge,
            "scriptd_engine_warm_isolates",
            "Warm isolates kept.",
            |e| e.stats().warm_isolates,
        ),
        (
            Kind::Gauge,
            "scriptd_engine_in_flight",
            "Runs queued on or running in an engine worker.",
            |e| e.stats().in_flight,
        ),
        (
            Kind::Gauge,
            "scriptd_engine_workers",
            "Engine worker threads.",
            |e| e.workers() as u64,
        ),
    ];
    for (kind, name, help, value) in engine_values {
        let engine = engine.clone();
        metrics.observe(kind, name, help, move |r| r.value(value(&engine) as f64));
    }

    metrics.observe(
        Kind::Gauge,
        "scriptd_nats_connected",
        "1 while connected to NATS.",
        move |r| {
            let connected = nats.connection_state() == async_nats::connection::State::Connected;
            r.value(f64::from(u8::from(connected)));
        },
    );
    let pool = postgres.clone();
    metrics.observe(
        Kind::Gauge,
        "scriptd_postgres_connections",
        "Pooled PostgreSQL connections, by state.",
        move |r| {
            let status = pool.status();
            r.labelled(&[("state", "idle")], status.available as f64);
            let in_use = status.size.saturating_sub(status.available);
            r.labelled(&[("state", "in_use")], in_use as f64);
        },
    );
    metrics.observe(
        Kind::Gauge,
        "scriptd_postgres_waiting",
        "Tasks waiting for a PostgreSQL connection.",
        move |r| r.value(postgres.status().waiting as f64),
    );
}
