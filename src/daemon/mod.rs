//! `scriptd run`: wires the store, the script index, NATS and the engine together and runs
//! until the shutdown token is cancelled, then stops in order: stop pulling, let runs in
//! flight finish within the grace period, hand back what remains, flush records.

pub mod readings;
pub mod supervisor;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::bus::lanes::{Kind as LaneKind, Lanes};
use crate::bus::{
    self, catch_all::CatchAll, dlq, fanout::Fanout, fanout::FanoutStats, runner::Runner,
};
use crate::caps::Live;
use crate::config::Settings;
use crate::daemon::supervisor::Supervisor;
use crate::engine::Engine;
use crate::observe::health::Readiness;
use crate::observe::metrics::Metrics;
use crate::pipeline::attempt::Defaults;
use crate::pipeline::executor::{self, Executor};
use crate::pipeline::records::{ClaimTaker, RecordWriter};
use crate::pipeline::report::AttemptStats;
use crate::pipeline::tenants::TenantSlots;
use crate::scripts::index::{self, ScriptIndex};
use crate::store::{ClaimScope, Store};
use crate::units::duration_str;

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
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            shutdown_grace: Duration::from_secs(20),
            index_reload_interval: Duration::from_secs(30),
        }
    }
}

/// What a running daemon exposes: its counters and metrics, its readiness, and where its
/// HTTP endpoint listens (tests read these directly).
#[derive(Clone, Default)]
pub struct DaemonStats {
    /// The fan-out's counters.
    pub fanout: Arc<FanoutStats>,
    /// The attempts' counters.
    pub attempts: Arc<AttemptStats>,
    /// The metrics `/metrics` serves.
    pub metrics: Arc<Metrics>,
    /// What `/readyz` answers.
    pub readiness: Arc<Readiness>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served, once bound.
    pub listening: Arc<OnceLock<SocketAddr>>,
    /// The script index, once loaded.
    pub index: Arc<OnceLock<Arc<ScriptIndex>>>,
}

/// Runs the daemon until `shutdown` is cancelled, reporting to `metrics` (see
/// `telemetry::init`, which gives them their exporters).
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let stats = DaemonStats {
        metrics,
        ..DaemonStats::default()
    };
    run_with_stats(settings, shutdown, stats).await
}

pub async fn run_with_stats(
    settings: Settings,
    shutdown: CancellationToken,
    stats: DaemonStats,
) -> anyhow::Result<()> {
    // The daemon stops on the caller's signal, or by itself when one of its tasks fails.
    let shutdown = shutdown.child_token();
    let mut supervisor = Supervisor::default();
    stats
        .metrics
        .set_tenant_labels(settings.telemetry.tenant_labels);
    // The endpoint answers from the start: alive at once, ready once everything is.
    let endpoint = CancellationToken::new();
    let _stop_endpoint = endpoint.clone().drop_guard();
    if !settings.telemetry.listen.is_empty() {
        let bound = crate::observe::health::serve(
            &settings.telemetry.listen,
            stats.readiness.clone(),
            stats.metrics.clone(),
            endpoint,
        )
        .await?;
        tracing::info!(address = %bound, "Serving /healthz, /readyz and /metrics.");
        let _ = stats.listening.set(bound);
    }
    let Some(store) = until_ready("PostgreSQL", &shutdown, || {
        Store::connect_all_tenants(&settings.database)
    })
    .await
    else {
        return Ok(());
    };
    if settings.database.migrate_on_start {
        for applied in Store::migrate(&settings.database).await? {
            tracing::info!(migration = %applied, "Migration applied.");
        }
    }
    let index = Arc::new(ScriptIndex::default());
    if until_ready("the script index", &shutdown, || index.reload(&store))
        .await
        .is_none()
    {
        return Ok(());
    }
    tracing::info!(scripts = index.snapshot().len(), "Script index loaded.");
    stats.readiness.index_loaded();
    let _ = stats.index.set(index.clone());

    let client = bus::connect(&settings.nats).await?;
    let js = jetstream::new(client.clone());
    bus::ensure_streams(&js, &settings.nats).await?;
    let nats = &settings.nats;
    stats.readiness.attach(
        client.clone(),
        js.clone(),
        store.clone(),
        vec![nats.events_stream(), nats.jobs_stream(), nats.dlq_stream()],
    );
    let catch_all_consumer = bus::durable_consumer(
        &js,
        &nats.events_stream(),
        bus::FANOUT_CONSUMER,
        nats.ack_wait,
        nats.max_in_flight * 4,
        None,
    )
    .await?;

    let caps = Live::new(
        &settings.capabilities,
        js.clone(),
        &nats.events_prefix,
        store.clone(),
    )?;
    let engine = Arc::new(Engine::start_with(&settings.engine, Arc::new(caps))?);
    if !engine.wait_ready(Duration::from_secs(30)).await {
        tracing::warn!("Not every engine host is up after 30s; runs wait for those that are.");
    }
    readings::register(
        &stats.metrics,
        readings::Parts {
            fanout: stats.fanout.clone(),
            attempts: stats.attempts.clone(),
            engine: engine.clone(),
            nats: client.clone(),
            postgres: store.pool().clone(),
        },
    );
    let (records, writer) = RecordWriter::start(store.clone());
    let replica: Arc<str> = Arc::from(replica_name());
    // Two batches at a time of claims and of hand-backs, for each of the two takers.
    let claim_store = Store::connect_claims(&settings.database, 8).await?;
    let (claims, claimer) =
        ClaimTaker::start(claim_store.clone(), replica.clone(), ClaimScope::Next);
    let (first_claims, first_claimer) =
        ClaimTaker::start(claim_store, replica, ClaimScope::FirstOnly);
    let background = CancellationToken::new();
    let refresher = supervisor.spawn(
        "index refresher",
        index::keep_fresh(
            index.clone(),
            store.clone(),
            settings.daemon.index_reload_interval,
            background.clone(),
        ),
    );

    let executor = Arc::new(Executor::new(executor::Parts {
        index: index.clone(),
        engine: engine.clone(),
        store: store.clone(),
        records,
        claims,
        first_claims,
        letters: Arc::new(dlq::Publisher {
            js: js.clone(),
            config: nats.clone(),
        }),
        defaults: Defaults {
            limits: settings.engine.limits,
            retry: settings.retry,
        },
        // Two per worker, as the engine's own slots.
        tenant_slots: TenantSlots::new(settings.tenants.clone(), 2 * engine.workers()),
        stats: stats.attempts.clone(),
        metrics: stats.metrics.clone(),
        stop: shutdown.clone(),
    }));
    let runner = Arc::new(Runner {
        executor: executor.clone(),
        ack_wait: nats.ack_wait,
        in_flight: Default::default(),
    });
    let fanout = Arc::new(Fanout {
        js: js.clone(),
        config: nats.clone(),
        index: index.clone(),
        stats: stats.fanout.clone(),
        // The runner and the fan-out alone hold the executor: once their lanes end, its
        // record writer and claim takers can finish.
        direct: nats.direct_runs.then_some(executor),
        in_flight: Default::default(),
    });
    let ticker = supervisor.spawn(
        "cron ticker",
        crate::schedule::ticker::Ticker {
            js: js.clone(),
            config: nats.clone(),
            index: index.clone(),
            store: store.clone(),
            metrics: stats.metrics.clone(),
        }
        .run(shutdown.clone()),
    );
    let hard_stop = CancellationToken::new();
    let event_lanes = bus::lanes::Opened::default();
    let passing = {
        let catch_all = Arc::new(CatchAll {
            events_prefix: nats.events_prefix.clone(),
            ack_wait: nats.ack_wait,
            index: index.clone(),
            lanes: event_lanes.clone(),
            stats: stats.fanout.clone(),
            stop: shutdown.clone(),
        });
        supervisor.spawn(
            "events catch-all",
            bus::pull(
                catch_all_consumer,
                nats.max_in_flight,
                shutdown.clone(),
                move |m| {
                    let catch_all = catch_all.clone();
                    Box::pin(async move { catch_all.handle(m).await })
                },
            ),
        )
    };
    let lanes = |kind, opened| Lanes {
        js: js.clone(),
        config: nats.clone(),
        tenants: settings.tenants.clone(),
        index: index.clone(),
        kind,
        opened,
    };
    let fanning = {
        let hard_stop = hard_stop.clone();
        supervisor.spawn(
            "event lanes",
            lanes(LaneKind::Events, event_lanes).run(shutdown.clone(), move |m| {
                let fanout = fanout.clone();
                let hard_stop = hard_stop.clone();
                Box::pin(async move { fanout.handle(m, hard_stop).await })
            }),
        )
    };
    let running = {
        let hard_stop = hard_stop.clone();
        supervisor.spawn(
            "job lanes",
            lanes(LaneKind::Jobs, Default::default()).run(shutdown.clone(), move |m| {
                let runner = runner.clone();
                let hard_stop = hard_stop.clone();
                Box::pin(async move { runner.handle(m, hard_stop).await })
            }),
        )
    };
    tracing::info!(
        engine = crate::engine::ENGINE_NAME,
        workers = engine.workers(),
        events = %format!("{}.>", nats.events_prefix),
        "scriptd is running."
    );

    let failed = supervisor.watch(&shutdown).await;
    if let Some((task, how)) = &failed {
        tracing::error!(task, %how, "A daemon task stopped unexpectedly; shutting down.");
        stats
            .readiness
            .task_failed(format!("the {task} task {how}"));
        shutdown.cancel();
    }
    tracing::info!(grace = %humantime::format_duration(settings.daemon.shutdown_grace), "Shutting down: no new messages; waiting for runs in flight.");
    let mut consumers = tokio::spawn(async move {
        let _ = passing.await;
        let _ = fanning.await;
        let _ = running.await;
    });
    if tokio::time::timeout(settings.daemon.shutdown_grace, &mut consumers)
        .await
        .is_err()
    {
        tracing::warn!("Runs still in flight after the grace period are handed back to JetStream.");
        hard_stop.cancel();
        let _ = consumers.await;
    }
    background.cancel();
    let _ = refresher.await;
    let _ = ticker.await;
    drop(engine);
    let _ = writer.await;
    let _ = claimer.await;
    let _ = first_claimer.await;
    client.flush().await.ok();
    let failures: Vec<String> = failed
        .into_iter()
        .chain(supervisor.panics())
        .map(|(task, how)| format!("the {task} task {how}"))
        .collect();
    if !failures.is_empty() {
        return Err(crate::daemon::supervisor::TaskFailed(format!(
            "scriptd stopped because {}",
            failures.join("; ")
        ))
        .into());
    }
    tracing::info!("scriptd stopped.");
    Ok(())
}

/// This process's name in attempt claims: host, process id and a random part (a process
/// id may come back after a restart).
fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Calls `attempt` until it succeeds or `shutdown` is cancelled, logging each failure.
async fn until_ready<T, F, Fut>(what: &str, shutdown: &CancellationToken, attempt: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut delay = Duration::from_millis(250);
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "Waiting for {what}.");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
