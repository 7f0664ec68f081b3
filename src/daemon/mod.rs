//! `scriptd run`: wires the store, the script index, NATS and the engine together and runs
//! until the shutdown token is cancelled, then stops in order: stop pulling, let runs in
//! flight finish within the grace period, hand back what remains, flush records.

mod caps;
pub mod readings;
pub mod supervisor;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::bus::lanes::{Kind as LaneKind, Lanes};
use crate::bus::{self, dlq, fanout::Fanout, fanout::FanoutStats, runner::Runner};
use crate::config::Settings;
use crate::daemon::supervisor::{Supervisor, TaskFailed};
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
use caps::Live;

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
    /// Where the HTTP API is served, once bound.
    pub api_listening: Arc<OnceLock<SocketAddr>>,
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

/// Runs the daemon until `shutdown` is cancelled or one of its tasks fails, telling
/// `stats` of its work as it goes.
pub async fn run_with_stats(
    settings: Settings,
    shutdown: CancellationToken,
    stats: DaemonStats,
) -> anyhow::Result<()> {
    match Daemon::start(settings, shutdown, stats).await? {
        Some(daemon) => daemon.run().await,
        None => Ok(()),
    }
}

/// A started daemon: its services connected and its tasks running under a supervisor.
pub struct Daemon {
    grace: Duration,
    stats: DaemonStats,
    supervisor: Supervisor,
    /// The caller's signal, or the daemon's own when one of its tasks fails.
    shutdown: CancellationToken,
    /// Ends runs still going at the end of the grace period.
    hard_stop: CancellationToken,
    /// Stops the index refresher and the ticker once the consumers have drained.
    background: CancellationToken,
    /// The event lanes and the job lanes: drained within the grace period.
    consumers: Vec<JoinHandle<()>>,
    /// The index refresher and the cron ticker.
    background_tasks: Vec<JoinHandle<()>>,
    /// The record writer and the claim takers: they end once the consumers are gone.
    writers: Vec<JoinHandle<()>>,
    engine: Arc<Engine>,
    client: async_nats::Client,
    _endpoint: DropGuard,
}

/// What the daemon's tasks share.
struct Wiring {
    index: Arc<ScriptIndex>,
    js: jetstream::Context,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

impl Daemon {
    /// Serves its endpoint, waits for PostgreSQL and the script index (none if `shutdown`
    /// comes first), connects to NATS, starts the engine and spawns every task.
    pub async fn start(
        settings: Settings,
        shutdown: CancellationToken,
        stats: DaemonStats,
    ) -> anyhow::Result<Option<Daemon>> {
        // The daemon stops on the caller's signal, or by itself when one of its tasks fails.
        let shutdown = shutdown.child_token();
        stats
            .metrics
            .set_tenant_labels(settings.telemetry.tenant_labels);
        let endpoint = serve_endpoint(&settings, &stats).await?;
        let Some((store, index)) = load(&settings, &shutdown, &stats).await? else {
            return Ok(None);
        };
        let what = format!("NATS at {}", settings.nats.url);
        let Some(client) = until_ready(&what, &shutdown, || bus::connect(&settings.nats)).await?
        else {
            return Ok(None);
        };
        let js = jetstream::new(client.clone());
        bus::ensure_streams(&js, &settings.nats).await?;
        let nats = &settings.nats;
        stats.readiness.attach(
            client.clone(),
            js.clone(),
            store.clone(),
            vec![nats.events_stream(), nats.jobs_stream(), nats.dlq_stream()],
        );
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

        let mut daemon = Daemon {
            grace: settings.daemon.shutdown_grace,
            stats,
            supervisor: Supervisor::default(),
            shutdown,
            hard_stop: CancellationToken::new(),
            background: CancellationToken::new(),
            consumers: Vec::new(),
            background_tasks: Vec::new(),
            writers: Vec::new(),
            engine,
            client,
            _endpoint: endpoint,
        };
        let wiring = Wiring {
            index,
            js,
            shutdown: daemon.shutdown.clone(),
            hard_stop: daemon.hard_stop.clone(),
        };
        let executor = daemon.executor(&settings, &wiring, &store).await?;
        if !settings.api.listen.is_empty() {
            let state = crate::api::ApiState {
                store: store.clone(),
                js: wiring.js.clone(),
                engine: daemon.engine.clone(),
                settings: Arc::new(settings.clone()),
                index: wiring.index.clone(),
                executor: executor.clone(),
                trial: Default::default(),
            };
            let bound =
                crate::api::serve(&settings.api.listen, state, wiring.shutdown.clone()).await?;
            tracing::info!(address = %bound, "Serving the HTTP API (/v1, /openapi.json).");
            let _ = daemon.stats.api_listening.set(bound);
        }
        daemon.spawn_background(&settings, &wiring, store);
        daemon.spawn_consumers(&settings, &wiring, executor);
        daemon.stats.readiness.consuming();
        tracing::info!(
            engine = crate::engine::ENGINE_NAME,
            workers = daemon.engine.workers(),
            events = %format!("{}.>", nats.events_prefix),
            "scriptd is running."
        );
        Ok(Some(daemon))
    }

    /// The attempt path, with its record writer and claim takers (whose tasks the daemon
    /// awaits at the end).
    async fn executor(
        &mut self,
        settings: &Settings,
        wiring: &Wiring,
        store: &Store,
    ) -> anyhow::Result<Arc<Executor>> {
        let record_store = Store::connect_records(&settings.database).await?;
        let (records, writer) = RecordWriter::start(store.clone(), record_store);
        let replica: Arc<str> = Arc::from(replica_name());
        // Two batches at a time of claims and of hand-backs, for each of the two takers.
        let claim_store = Store::connect_claims(&settings.database, 8).await?;
        let (claims, claimer) =
            ClaimTaker::start(claim_store.clone(), replica.clone(), ClaimScope::Next);
        let (first_claims, first_claimer) =
            ClaimTaker::start(claim_store, replica, ClaimScope::FirstOnly);
        self.writers.extend([writer, claimer, first_claimer]);
        Ok(Arc::new(Executor::new(executor::Parts {
            index: wiring.index.clone(),
            engine: self.engine.clone(),
            store: store.clone(),
            records,
            claims,
            first_claims,
            letters: Arc::new(dlq::Publisher {
                js: wiring.js.clone(),
                config: settings.nats.clone(),
            }),
            defaults: Defaults {
                limits: settings.engine.limits,
                retry: settings.retry,
            },
            // By default a tenant may take every slot of the engine.
            tenant_slots: TenantSlots::new(settings.tenants.clone(), self.engine.slots()),
            stats: self.stats.attempts.clone(),
            metrics: self.stats.metrics.clone(),
            stop: wiring.shutdown.clone(),
        })))
    }

    /// The index refresher and the cron ticker.
    fn spawn_background(&mut self, settings: &Settings, wiring: &Wiring, store: Store) {
        let refresher = self.supervisor.spawn(
            "index refresher",
            index::keep_fresh(
                wiring.index.clone(),
                store.clone(),
                settings.daemon.index_reload_interval,
                self.background.clone(),
            ),
        );
        let ticker = crate::bus::ticker::Ticker {
            js: wiring.js.clone(),
            config: settings.nats.clone(),
            index: wiring.index.clone(),
            store,
            metrics: self.stats.metrics.clone(),
        };
        let ticker = self
            .supervisor
            .spawn("cron ticker", ticker.run(wiring.shutdown.clone()));
        self.background_tasks.extend([refresher, ticker]);
    }

    /// The event lanes (fan-out, with direct runs through `executor` when on) and the job
    /// lanes (the runner). They alone hold the executor: once they end, its record writer
    /// and claim takers can finish.
    fn spawn_consumers(&mut self, settings: &Settings, wiring: &Wiring, executor: Arc<Executor>) {
        let nats = &settings.nats;
        let runner = Arc::new(Runner {
            executor: executor.clone(),
            ack_wait: nats.ack_wait,
            in_flight: Default::default(),
        });
        let fanout = Arc::new(Fanout {
            js: wiring.js.clone(),
            config: nats.clone(),
            index: wiring.index.clone(),
            stats: self.stats.fanout.clone(),
            direct: nats.direct_runs.then_some(executor),
            in_flight: Default::default(),
        });
        let lanes = |kind| Lanes {
            js: wiring.js.clone(),
            config: nats.clone(),
            tenants: settings.tenants.clone(),
            index: wiring.index.clone(),
            kind,
            first_deliveries: !nats.claim_first_deliveries,
        };
        let hard_stop = wiring.hard_stop.clone();
        let fanning = self.supervisor.spawn(
            "event lanes",
            lanes(LaneKind::Events).run(wiring.shutdown.clone(), move |m, lane| {
                let (fanout, hard_stop) = (fanout.clone(), hard_stop.clone());
                Box::pin(async move { fanout.handle(m, lane, hard_stop).await })
            }),
        );
        let hard_stop = wiring.hard_stop.clone();
        let running = self.supervisor.spawn(
            "job lanes",
            lanes(LaneKind::Jobs).run(wiring.shutdown.clone(), move |m, _| {
                let (runner, hard_stop) = (runner.clone(), hard_stop.clone());
                Box::pin(async move { runner.handle(m, hard_stop).await })
            }),
        );
        self.consumers.extend([fanning, running]);
    }

    /// Runs until the shutdown signal or a task's failure, then stops in order: stop
    /// pulling, let runs in flight finish within the grace period, hand back what
    /// remains, flush records. A task's failure is an error naming it.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let failed = self.supervisor.watch(&self.shutdown).await;
        if let Some((task, how)) = &failed {
            tracing::error!(task, %how, "A daemon task stopped unexpectedly; shutting down.");
            self.stats
                .readiness
                .task_failed(format!("the {task} task {how}"));
            self.shutdown.cancel();
        }
        tracing::info!(grace = %humantime::format_duration(self.grace), "Shutting down: no new messages; waiting for runs in flight.");
        let mut consumers = tokio::spawn(futures::future::join_all(std::mem::take(
            &mut self.consumers,
        )));
        if tokio::time::timeout(self.grace, &mut consumers)
            .await
            .is_err()
        {
            tracing::warn!(
                "Runs still in flight after the grace period are handed back to JetStream."
            );
            self.hard_stop.cancel();
            let _ = consumers.await;
        }
        self.background.cancel();
        futures::future::join_all(std::mem::take(&mut self.background_tasks)).await;
        drop(self.engine);
        futures::future::join_all(std::mem::take(&mut self.writers)).await;
        self.client.flush().await.ok();
        let failures: Vec<String> = failed
            .into_iter()
            .chain(self.supervisor.panics())
            .map(|(task, how)| format!("the {task} task {how}"))
            .collect();
        if !failures.is_empty() {
            return Err(
                TaskFailed(format!("scriptd stopped because {}", failures.join("; "))).into(),
            );
        }
        tracing::info!("scriptd stopped.");
        Ok(())
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` from the start, when a listener is set:
/// alive at once, ready once everything is. The endpoint stops when the guard drops.
async fn serve_endpoint(settings: &Settings, stats: &DaemonStats) -> anyhow::Result<DropGuard> {
    let endpoint = CancellationToken::new();
    if !settings.telemetry.listen.is_empty() {
        let bound = crate::observe::health::serve(
            &settings.telemetry.listen,
            stats.readiness.clone(),
            stats.metrics.clone(),
            endpoint.clone(),
        )
        .await?;
        tracing::info!(address = %bound, "Serving /healthz, /readyz and /metrics.");
        let _ = stats.listening.set(bound);
    }
    Ok(endpoint.drop_guard())
}

/// Waits for PostgreSQL, applies migrations if asked to, and loads the script index;
/// none if `shutdown` comes first.
async fn load(
    settings: &Settings,
    shutdown: &CancellationToken,
    stats: &DaemonStats,
) -> anyhow::Result<Option<(Store, Arc<ScriptIndex>)>> {
    let connect = || Store::connect_all_tenants(&settings.database);
    let Some(store) = until_ready("PostgreSQL", shutdown, connect).await? else {
        return Ok(None);
    };
    if settings.database.migrate_on_start {
        for applied in Store::migrate(&settings.database).await? {
            tracing::info!(migration = %applied, "Migration applied.");
        }
    }
    let index = Arc::new(ScriptIndex::default());
    if until_ready("the script index", shutdown, || index.reload(&store))
        .await?
        .is_none()
    {
        return Ok(None);
    }
    tracing::info!(scripts = index.snapshot().len(), "Script index loaded.");
    stats.readiness.index_loaded();
    let _ = stats.index.set(index.clone());
    Ok(Some((store, index)))
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

/// Calls `attempt` until it succeeds (then its value) or `shutdown` is cancelled (then
/// none), logging each failure; an error that waiting cannot cure ends it at once.
async fn until_ready<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: F,
) -> anyhow::Result<Option<T>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: Into<anyhow::Error>,
{
    let mut delay = Duration::from_millis(250);
    loop {
        match attempt().await {
            Ok(value) => return Ok(Some(value)),
            Err(e) => {
                let e: anyhow::Error = e.into();
                if permanent(&e) {
                    return Err(e.context(format!("{what} refused")));
                }
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "Waiting for {what}.");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Whether an error will not go away by waiting: PostgreSQL answered and refused (a
/// database that does not exist, a failed login, a missing table) or its settings cannot
/// work. A service that cannot be reached is waited for.
fn permanent(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<crate::store::StoreError>()
            .is_some_and(|s| !s.is_unavailable())
    })
}
