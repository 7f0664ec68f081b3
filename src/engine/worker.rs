//! An engine worker: one isolate at a time, with its own warm pool and watchdog, on its own
//! OS thread with a current-thread runtime or (in an engine host) on the caller's thread.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::future::LocalBoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use super::failure::Retried;
use super::failure::{Failure, FailureKind};
use super::isolate::{failure, timeout_failure, ScriptIsolate};
use super::ops::{RunScope, SharedCapabilities};
use super::pool::WarmPool;
use super::redact;
use super::watchdog::{CpuBudget, Watchdog};
use super::{EngineConfig, EngineStats, RunResult, ScriptRun};

pub struct Task {
    /// The run to execute.
    pub run: ScriptRun,
    /// Only compile and evaluate the module and find its handler (a deploy's check).
    pub validate_only: bool,
    /// Where the result goes.
    pub reply: oneshot::Sender<RunResult>,
}

/// The engine's side of a worker thread.
pub struct WorkerHandle {
    /// Sends runs to the worker.
    pub tx: mpsc::UnboundedSender<Task>,
    /// Runs queued on or running in this worker; used to place new runs.
    pub load: Arc<AtomicUsize>,
}

struct Worker {
    pool: WarmPool,
    watchdog: Watchdog,
    stats: Arc<EngineStats>,
    retried: Retried,
    caps: SharedCapabilities,
    /// Warm isolates last counted into the engine's gauge.
    warm: u64,
}

/// A worker on a thread of its own.
pub fn spawn(
    index: usize,
    config: &EngineConfig,
    stats: Arc<EngineStats>,
    caps: SharedCapabilities,
) -> std::io::Result<WorkerHandle> {
    let (handle, mut rx, parts) = prepare(index, config, stats, caps)?;
    let load = handle.load.clone();
    std::thread::Builder::new()
        .name(format!("scriptd-engine-{index}"))
        .stack_size(config.thread_stack.as_usize())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, worker = index, "Engine worker could not start its runtime.");
                    return;
                }
            };
            // Isolates are not Send: the pool is made on, and never leaves, this thread.
            let mut worker = parts.build();
            while let Some(task) = rx.blocking_recv() {
                let result =
                    runtime.block_on(worker.execute_guarded(&task.run, task.validate_only));
                worker.complete(task, result, &load);
            }
        })?;
    Ok(handle)
}

/// A worker that runs on the thread polling the returned future (to be spawned as a local
/// task): an engine host's only worker runs there, so a run costs no hand-over between
/// threads on the way in or out. Scripts that run long hold up that thread's other tasks,
/// so only a thread that has nothing else to do while a run is under way should host one.
pub fn local(
    config: &EngineConfig,
    stats: Arc<EngineStats>,
    caps: SharedCapabilities,
) -> std::io::Result<(WorkerHandle, LocalBoxFuture<'static, ()>)> {
    let (handle, mut rx, parts) = prepare(0, config, stats, caps)?;
    let load = handle.load.clone();
    let serve = async move {
        let mut worker = parts.build();
        while let Some(task) = rx.recv().await {
            let result = worker.execute_guarded(&task.run, task.validate_only).await;
            worker.complete(task, result, &load);
            // Let the result leave before the next queued run starts: without this, a
            // queued run began at once and held its predecessor's answer until it ended.
            tokio::task::yield_now().await;
        }
    };
    Ok((handle, Box::pin(serve)))
}

/// What a worker is made of before it reaches its thread (isolates are not Send, so the
/// pool itself is made there).
struct Parts {
    watchdog: Watchdog,
    stats: Arc<EngineStats>,
    retried: Retried,
    caps: SharedCapabilities,
    max_warm: usize,
    max_memory: usize,
}

impl Parts {
    fn build(self) -> Worker {
        Worker {
            pool: WarmPool::new(self.max_warm, self.max_memory),
            watchdog: self.watchdog,
            stats: self.stats,
            retried: self.retried,
            caps: self.caps,
            warm: 0,
        }
    }
}

fn prepare(
    index: usize,
    config: &EngineConfig,
    stats: Arc<EngineStats>,
    caps: SharedCapabilities,
) -> std::io::Result<(WorkerHandle, mpsc::UnboundedReceiver<Task>, Parts)> {
    let (tx, rx) = mpsc::unbounded_channel::<Task>();
    let load = Arc::new(AtomicUsize::new(0));
    let parts = Parts {
        watchdog: Watchdog::spawn(format!("scriptd-watchdog-{index}"))?,
        stats,
        retried: Retried {
            heap_limit: config.retry_heap_limit,
            cpu_limit: config.retry_cpu_limit,
        },
        caps,
        max_warm: config.warm_isolates_per_worker,
        max_memory: config.warm_memory_per_worker.as_usize(),
    };
    Ok((WorkerHandle { tx, load }, rx, parts))
}

impl Worker {
    /// Counts the run out of the worker's load and answers its caller.
    fn complete(&mut self, task: Task, result: RunResult, load: &AtomicUsize) {
        let now = self.pool.len() as u64;
        if now != self.warm {
            let gauge = &self.stats.warm_isolates;
            gauge.fetch_add(now.wrapping_sub(self.warm), Ordering::Relaxed);
            self.warm = now;
        }
        load.fetch_sub(1, Ordering::SeqCst);
        let _ = task.reply.send(result);
    }

    /// Runs one script; a panic inside the engine fails this run and empties the pool
    /// instead of taking the worker down.
    async fn execute_guarded(&mut self, run: &ScriptRun, validate_only: bool) -> RunResult {
        let start = Instant::now();
        if run.start_by.is_some_and(|by| start >= by) {
            let late = failure(
                FailureKind::NotStarted,
                "the run waited behind longer runs in its worker past the moment it had to start by, and was not started".into(),
                None,
            );
            return RunResult::failed(late, start, false);
        }
        let work = async {
            if validate_only {
                self.validate(run, start).await
            } else {
                self.execute(run, start).await
            }
        };
        match AssertUnwindSafe(work).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(tenant = %run.tenant, script = %run.script, %message, "Engine panicked during a run; warm isolates of this worker dropped.");
                self.pool.clear();
                RunResult::failed(
                    failure(
                        FailureKind::Engine,
                        format!("engine panic: {message}"),
                        None,
                    ),
                    start,
                    false,
                )
            }
        }
    }

    async fn execute(&mut self, run: &ScriptRun, start: Instant) -> RunResult {
        self.stats.runs.fetch_add(1, Ordering::Relaxed);
        if let Err(f) = self.check_source(run) {
            return RunResult::failed(f, start, false);
        }
        let deadline = start + run.limits.timeout;
        let warm = self.pool.take(run);
        let cold_start = warm.is_none();
        let mut isolate = match warm {
            Some(isolate) => {
                self.stats.warm_hits.fetch_add(1, Ordering::Relaxed);
                isolate
            }
            None => {
                self.stats.cold_starts.fetch_add(1, Ordering::Relaxed);
                match ScriptIsolate::create(run.limits.heap, &self.caps) {
                    Ok(isolate) => isolate,
                    Err(f) => return RunResult::failed(self.finish(f), start, true),
                }
            }
        };
        isolate.enter();
        isolate.begin_run(run.limits.logs, RunScope::new(run.call(deadline)));
        let mut outcome = {
            let budget = CpuBudget::of_this_thread(run.limits.cpu_time);
            let _armed = self.watchdog.arm(isolate.guard().clone(), deadline, budget);
            let work = async {
                if cold_start {
                    isolate.load(run).await?;
                }
                isolate.invoke(run).await
            };
            // The watchdog stops JavaScript that runs too long; this stops a run waiting
            // too long for the script API.
            let waited = tokio::time::timeout_at(deadline.into(), work).await;
            waited.unwrap_or_else(|_| {
                isolate.guard().timed_out.store(true, Ordering::SeqCst);
                Err(timeout_failure(run))
            })
        };
        // A termination that surfaced as an engine error is still the timeout's.
        if matches!(&outcome, Err(f) if f.kind == FailureKind::Engine) {
            if let Some(stopped) = isolate.stopped(run) {
                outcome = Err(stopped);
            }
        }
        let ((mut logs, logs_truncated), scope) = isolate.end_run();
        if let Some(scope) = &scope {
            redact::secrets(&scope.secrets_read, &mut logs, &mut outcome);
        }
        let reusable = isolate.is_loaded()
            && !isolate.guard().tripped()
            && match &outcome {
                Ok(_) => true,
                Err(f) => f.kind == FailureKind::Exception,
            };
        if reusable {
            let memory = isolate.memory_used();
            isolate.exit();
            let evicted = self.pool.put(run, isolate, memory);
            self.stats
                .evictions
                .fetch_add(evicted as u64, Ordering::Relaxed);
        } else {
            self.stats.discarded.fetch_add(1, Ordering::Relaxed);
        }
        RunResult {
            outcome: outcome.map_err(|f| self.finish(f)),
            logs,
            logs_truncated,
            duration: start.elapsed(),
            cold_start,
        }
    }

    /// Loads the script in a fresh isolate that is dropped afterwards.
    async fn validate(&mut self, run: &ScriptRun, start: Instant) -> RunResult {
        if let Err(f) = self.check_source(run) {
            return RunResult::failed(f, start, false);
        }
        let mut isolate = match ScriptIsolate::create(run.limits.heap, &self.caps) {
            Ok(isolate) => isolate,
            Err(f) => return RunResult::failed(self.finish(f), start, true),
        };
        let deadline = start + run.limits.timeout;
        isolate.enter();
        isolate.begin_run(run.limits.logs, RunScope::new(run.call(deadline)));
        let loaded = {
            let budget = CpuBudget::of_this_thread(run.limits.cpu_time);
            let _armed = self.watchdog.arm(isolate.guard().clone(), deadline, budget);
            let waited = tokio::time::timeout_at(deadline.into(), isolate.load(run)).await;
            waited.unwrap_or_else(|_| {
                isolate.guard().timed_out.store(true, Ordering::SeqCst);
                Err(timeout_failure(run))
            })
        };
        let ((logs, logs_truncated), _) = isolate.end_run();
        RunResult {
            outcome: loaded
                .map(|()| serde_json::Value::Null)
                .map_err(|f| self.finish(f)),
            logs,
            logs_truncated,
            duration: start.elapsed(),
            cold_start: true,
        }
    }

    fn check_source(&self, run: &ScriptRun) -> Result<(), Failure> {
        if run.source.len() <= run.limits.source.as_usize() {
            return Ok(());
        }
        Err(failure(
            FailureKind::SourceTooLarge,
            format!(
                "the source is {} bytes, over the {} limit",
                run.source.len(),
                run.limits.source
            ),
            None,
        ))
    }

    /// Applies the operator's retry settings for the limits.
    fn finish(&self, mut f: Failure) -> Failure {
        f.retryable = f.kind.retryable(self.retried);
        f
    }
}
