//! The script engine: owns every isolate. The rest of the daemon sees one call,
//! [`Engine::run`], which runs a script version's handler on an input under its limits.

mod failure;
mod guard;
mod host;
mod isolate;
mod limits;
mod ops;
mod pool;
mod redact;
mod sandbox;
pub mod source_map;
mod watchdog;
mod worker;

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

pub use failure::{Failure, FailureKind, Retried};
pub use host::{host_main, rss_of, HostsConfig};
pub use limits::{LimitOverrides, Limits};
pub use ops::SharedCapabilities;
pub use sandbox::LogLine;

use crate::domain::Version;
use crate::units::ByteSize;
use worker::{Task, WorkerHandle};

/// The engine compiled into this binary.
pub const ENGINE_NAME: &str = if cfg!(feature = "quickjs") {
    "quickjs (deno_core, offline engine)"
} else {
    "v8 (deno_core)"
};

/// Where the daemon's isolates live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// In engine host processes (`[engine.hosts]`): a crash or leak costs a host.
    #[default]
    Process,
    /// On worker threads of the daemon itself (`engine.workers`).
    Thread,
}

/// Engine settings (the `[engine]` table of the configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Where isolates run: the daemon's, and one host for the runs of `scripts test`,
    /// deploy checks and dry runs (`Engine::for_command`). Benchmarks pick their own.
    pub isolation: Isolation,
    /// The engine host processes used with `isolation = "process"` (`[engine.hosts]`).
    pub hosts: HostsConfig,
    /// Engine worker threads with `isolation = "thread"`, each running one isolate at a
    /// time. 0 means one per core.
    pub workers: usize,
    /// Runs handed to each worker at once (at least 1): one running, the rest queued
    /// behind it, so a worker that finishes a run finds the next one waiting instead of
    /// sleeping until the daemon sends it. The daemon admits this many runs per worker
    /// (`Engine::slots`); under load more runs in flight also batch the work around them
    /// (claims, records, acknowledgements) into fewer statements and messages. How long a
    /// run may wait in the queue is bounded apart from its length: three of its own
    /// timeouts, after which it is not started and its attempt comes back.
    pub runs_per_worker: usize,
    /// Warm isolates kept per worker.
    pub warm_isolates_per_worker: usize,
    /// Memory (JavaScript heap in use plus ArrayBuffers) of the warm isolates of one worker.
    pub warm_memory_per_worker: ByteSize,
    /// Whether a run stopped at its heap limit is retried.
    pub retry_heap_limit: bool,
    /// Whether a run stopped at its CPU-time limit is retried (off: CPU time is the
    /// script's own work, which another attempt would do again).
    pub retry_cpu_limit: bool,
    /// Native stack of each worker thread; bounds how deep scripts can recurse.
    pub thread_stack: ByteSize,
    /// Global defaults of the per-run limits; scripts may override each.
    pub limits: Limits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            isolation: Isolation::Process,
            hosts: HostsConfig::default(),
            workers: 0,
            runs_per_worker: 8,
            warm_isolates_per_worker: 64,
            warm_memory_per_worker: ByteSize::mib(256),
            retry_heap_limit: true,
            retry_cpu_limit: false,
            thread_stack: ByteSize::mib(8),
            limits: Limits::default(),
        }
    }
}

/// One run of one script version.
#[derive(Clone, Debug)]
pub struct ScriptRun {
    /// The tenant whose script runs; its script API calls act for this tenant.
    pub tenant: String,
    /// The script's name.
    pub script: String,
    /// The version that runs; with tenant and script, the key of its warm isolate.
    pub version: Version,
    /// The version's source.
    pub source: Arc<str>,
    /// The event given to the handler, as JSON text.
    pub input: Box<RawValue>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The limits the run is held to: the global ones with the script's overrides.
    pub limits: Limits,
    /// The job the run belongs to (the same on every attempt).
    pub job: String,
    /// The W3C trace context of the event, passed on to what the script publishes.
    pub traceparent: Option<String>,
    /// How many script publishes led to this run's event.
    pub depth: u32,
    /// The moment the run must have started by: a run still queued behind others in its
    /// worker then is not started and fails as `not_started` (so that an attempt is sure
    /// to have ended within its bound however long the runs ahead of it take). `None`:
    /// whenever its turn comes.
    pub start_by: Option<Instant>,
}

impl ScriptRun {
    pub fn new(
        tenant: impl Into<String>,
        script: impl Into<String>,
        version: Version,
        source: impl Into<Arc<str>>,
        input: &serde_json::Value,
        limits: Limits,
    ) -> ScriptRun {
        ScriptRun {
            tenant: tenant.into(),
            script: script.into(),
            version,
            source: source.into(),
            input: serde_json::value::to_raw_value(input).expect("a JSON value serialises"),
            attempt: 1,
            limits,
            job: format!("local-{:016x}", rand::random::<u64>()),
            traceparent: None,
            depth: 0,
            start_by: None,
        }
    }

    /// Who the run's script API calls act for.
    pub fn call(&self, deadline: Instant) -> crate::caps::Call {
        crate::caps::Call {
            tenant: self.tenant.clone(),
            script: self.script.clone(),
            job: self.job.clone(),
            traceparent: self.traceparent.clone(),
            depth: self.depth,
            deadline,
        }
    }
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// The handler's return value as JSON, or why there is none.
    pub outcome: Result<serde_json::Value, Failure>,
    /// `console.*` and `ctx.log` output, capped by the log limit.
    pub logs: Vec<LogLine>,
    /// Whether the log limit cut the output (the last line then says how much was dropped).
    pub logs_truncated: bool,
    /// How long the run took in its worker, isolate creation and module loading included.
    pub duration: Duration,
    /// Whether a new isolate was created for this run.
    pub cold_start: bool,
}

/// The JSON shape of a run's result: `{"status": "ok", "result": ...}` or
/// `{"status": "failed", "failure": {...}}`, with logs and timing.
impl Serialize for RunResult {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shape<'a> {
            status: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            result: Option<&'a serde_json::Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            failure: Option<&'a Failure>,
            logs: &'a [LogLine],
            logs_truncated: bool,
            duration_ms: f64,
            cold_start: bool,
        }
        Shape {
            status: if self.outcome.is_ok() { "ok" } else { "failed" },
            result: self.outcome.as_ref().ok(),
            failure: self.outcome.as_ref().err(),
            logs: &self.logs,
            logs_truncated: self.logs_truncated,
            duration_ms: self.duration.as_secs_f64() * 1000.0,
            cold_start: self.cold_start,
        }
        .serialize(serializer)
    }
}

impl RunResult {
    fn failed(failure: Failure, start: Instant, cold_start: bool) -> RunResult {
        RunResult {
            outcome: Err(failure),
            logs: Vec::new(),
            logs_truncated: false,
            duration: start.elapsed(),
            cold_start,
        }
    }
}

/// Counters of the engine since start.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Runs started, failed ones included.
    pub runs: AtomicU64,
    /// Runs that had to create a new isolate.
    pub cold_starts: AtomicU64,
    /// Runs served by a warm isolate of their script version.
    pub warm_hits: AtomicU64,
    /// Warm isolates dropped, least recently used first, to keep the pool within its budgets.
    pub evictions: AtomicU64,
    /// Isolates dropped after a run that left them unfit for reuse (timeout, heap limit, ...).
    pub discarded: AtomicU64,
    /// Warm isolates kept now, all workers together.
    pub warm_isolates: AtomicU64,
}

/// A point-in-time copy of [`EngineStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Runs started, failed ones included.
    pub runs: u64,
    /// Runs that had to create a new isolate.
    pub cold_starts: u64,
    /// Runs served by a warm isolate of their script version.
    pub warm_hits: u64,
    /// Warm isolates dropped, least recently used first, to keep the pool within its budgets.
    pub evictions: u64,
    /// Isolates dropped after a run that left them unfit for reuse.
    pub discarded: u64,
    /// Warm isolates kept now, all workers together.
    pub warm_isolates: u64,
    /// Runs queued on or running in a worker now.
    pub in_flight: u64,
    /// Engine hosts replaced after their isolate or memory budget.
    pub host_recycles: u64,
    /// Engine hosts that died.
    pub host_crashes: u64,
    /// Engine hosts killed to stop a run past its timeout and `hosts.kill_grace`.
    pub host_kills: u64,
}

/// The engine: worker threads with their own warm isolates, here or in host processes.
pub struct Engine {
    workers: Vec<WorkerHandle>,
    hosts: Option<host::HostPool>,
    stats: Arc<EngineStats>,
    /// `EngineConfig::runs_per_worker`, at least 1.
    runs_per_worker: usize,
}

/// Builds what every isolate starts from (the startup snapshot) now rather than at the
/// first run.
pub fn prepare() {
    sandbox::snapshot();
}

impl Engine {
    /// An engine whose scripts have no script API (every call fails clearly): for checks
    /// and benchmarks outside the daemon.
    /// Always on threads of this process.
    pub fn start(config: &EngineConfig) -> std::io::Result<Engine> {
        let threads = EngineConfig {
            isolation: Isolation::Thread,
            ..config.clone()
        };
        Self::start_with(&threads, Arc::new(crate::caps::NoCapabilities::default()))
    }

    /// An engine for one command's runs (`scripts test`, deploy checks, dry runs): with
    /// `isolation = "process"` (the default) one engine host, so a run that does not stop at
    /// its timeout is killed as in the daemon and a crash costs only the host; otherwise one
    /// worker thread. Waits until it can run. Must be called within a runtime.
    pub async fn for_command(
        config: &EngineConfig,
        caps: SharedCapabilities,
    ) -> std::io::Result<Engine> {
        let one = EngineConfig {
            workers: 1,
            hosts: HostsConfig {
                count: 1,
                workers_per_host: 1,
                ..config.hosts.clone()
            },
            ..config.clone()
        };
        let engine = Self::start_with(&one, caps)?;
        if !engine.wait_ready(Duration::from_secs(30)).await {
            return Err(std::io::Error::other(
                "the engine host did not start within 30 s",
            ));
        }
        Ok(engine)
    }

    /// Starts the worker threads, whose scripts reach `caps`. The startup snapshot is
    /// built on first use.
    /// With `isolation = "process"` the isolates run in host processes started here
    /// (within a tokio runtime); otherwise on threads of this process.
    pub fn start_with(config: &EngineConfig, caps: SharedCapabilities) -> std::io::Result<Engine> {
        if config.isolation == Isolation::Process {
            return Ok(Engine {
                workers: Vec::new(),
                hosts: Some(host::HostPool::start(config, caps)?),
                stats: Arc::default(),
                runs_per_worker: config.runs_per_worker.max(1),
            });
        }
        let count = if config.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.workers
        };
        let stats = Arc::new(EngineStats::default());
        let workers = (0..count)
            .map(|i| worker::spawn(i, config, stats.clone(), caps.clone()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Engine {
            workers,
            hosts: None,
            stats,
            runs_per_worker: config.runs_per_worker.max(1),
        })
    }

    /// An engine of one worker that runs on the thread polling the returned future (spawn
    /// it as a local task): what an engine host with one worker uses, so its runs never
    /// change threads.
    pub fn start_local(
        config: &EngineConfig,
        caps: SharedCapabilities,
    ) -> std::io::Result<(Engine, futures::future::LocalBoxFuture<'static, ()>)> {
        let stats = Arc::new(EngineStats::default());
        let (worker, serve) = worker::local(config, stats.clone(), caps)?;
        let engine = Engine {
            workers: vec![worker],
            hosts: None,
            stats,
            runs_per_worker: config.runs_per_worker.max(1),
        };
        Ok((engine, serve))
    }

    /// Runs the engine can execute at once.
    pub fn workers(&self) -> usize {
        match &self.hosts {
            Some(hosts) => hosts.capacity(),
            None => self.workers.len(),
        }
    }

    /// Runs the engine takes at once, running and queued: `runs_per_worker` per worker.
    pub fn slots(&self) -> usize {
        self.workers() * self.runs_per_worker
    }

    /// Waits until every engine host is up (at once with thread isolation); whether they
    /// came up within `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let Some(hosts) = &self.hosts else {
            return true;
        };
        let deadline = Instant::now() + limit;
        while !hosts.all_ready() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Engine host processes started and not yet gone (0 in-process).
    pub fn host_processes(&self) -> usize {
        self.hosts.as_ref().map_or(0, |h| h.processes())
    }

    /// Process ids of the engine hosts (none with thread isolation).
    pub fn host_pids(&self) -> Vec<u32> {
        self.hosts.as_ref().map(|h| h.pids()).unwrap_or_default()
    }

    /// Each engine host's process id and the system calls it tried once confined and saw
    /// refused with EPERM (none without the seccomp filter, or with thread isolation).
    pub fn host_confinement(&self) -> Vec<(u32, Vec<String>)> {
        self.hosts
            .as_ref()
            .map(|h| h.confinement())
            .unwrap_or_default()
    }

    /// Runs a script. Never panics on script behaviour: every way a script can fail ends in
    /// a [`Failure`].
    pub async fn run(&self, run: ScriptRun) -> RunResult {
        self.submit(run, false).await
    }

    /// Compiles and evaluates the module in a fresh isolate and checks its default export,
    /// without calling it. The isolate is not kept.
    pub async fn validate(&self, run: ScriptRun) -> Result<(), Failure> {
        self.submit(run, true).await.outcome.map(|_| ())
    }

    /// Runs `run`, or with `validate_only` only loads it; the whole result either way. A
    /// failure of a script compiled from TypeScript names the TypeScript's lines.
    pub(crate) async fn submit(&self, run: ScriptRun, validate_only: bool) -> RunResult {
        let source = run.source.clone();
        let file = format!("{}@v{}", run.script, run.version);
        let mut result = self.submit_compiled(run, validate_only).await;
        if let Err(failure) = &mut result.outcome {
            source_map::map_failure(&source, &file, failure);
        }
        result
    }

    async fn submit_compiled(&self, run: ScriptRun, validate_only: bool) -> RunResult {
        if let Some(hosts) = &self.hosts {
            return hosts.submit(run, validate_only).await;
        }
        let start = Instant::now();
        let worker = self.place(&run);
        let (reply, receive) = oneshot::channel();
        worker.load.fetch_add(1, Ordering::SeqCst);
        let task = Task {
            run,
            validate_only,
            reply,
        };
        if worker.tx.send(task).is_err() {
            worker.load.fetch_sub(1, Ordering::SeqCst);
            return RunResult::failed(gone(), start, false);
        }
        receive
            .await
            .unwrap_or_else(|_| RunResult::failed(gone(), start, false))
    }

    /// The worker that holds (or would hold) this script's warm isolate when it is idle;
    /// otherwise the least busy worker, so a runaway script delays only runs placed behind
    /// it while every worker is busy.
    fn place(&self, run: &ScriptRun) -> &WorkerHandle {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&run.tenant, &run.script, run.version).hash(&mut hasher);
        let home = &self.workers[(hasher.finish() % self.workers.len() as u64) as usize];
        if home.load.load(Ordering::SeqCst) == 0 {
            return home;
        }
        self.workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::SeqCst))
            .unwrap_or(home)
    }

    pub fn stats(&self) -> StatsSnapshot {
        if let Some(hosts) = &self.hosts {
            return hosts.stats();
        }
        let s = &self.stats;
        StatsSnapshot {
            runs: s.runs.load(Ordering::Relaxed),
            cold_starts: s.cold_starts.load(Ordering::Relaxed),
            warm_hits: s.warm_hits.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            discarded: s.discarded.load(Ordering::Relaxed),
            warm_isolates: s.warm_isolates.load(Ordering::Relaxed),
            in_flight: self
                .workers
                .iter()
                .map(|w| w.load.load(Ordering::Relaxed) as u64)
                .sum(),
            host_recycles: 0,
            host_crashes: 0,
            host_kills: 0,
        }
    }
}

fn gone() -> Failure {
    Failure {
        kind: FailureKind::Engine,
        message: "the engine worker stopped".into(),
        stack: None,
        retryable: true,
    }
}
