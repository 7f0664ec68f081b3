//! An engine worker: one OS thread with a current-thread runtime, running one isolate at a
//! time, with its own warm pool and watchdog.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use futures::FutureExt;
use tokio::sync::oneshot;

use super::failure::{Failure, FailureKind};
use super::isolate::{failure, timeout_failure, ScriptIsolate};
use super::ops::{RunScope, SharedCapabilities};
use super::pool::WarmPool;
use super::redact;
use super::watchdog::Watchdog;
use super::{EngineConfig, EngineStats, RunResult, ScriptRun};

pub struct Task {
    pub run: ScriptRun,
    /// Only compile and evaluate the module and find its handler (a deploy's check).
    pub validate_only: bool,
    pub reply: oneshot::Sender<RunResult>,
}

/// The engine's side of a worker thread.
pub struct WorkerHandle {
    pub tx: mpsc::Sender<Task>,
    /// Runs queued on or running in this worker; used to place new runs.
    pub load: Arc<AtomicUsize>,
}

struct Worker {
    pool: WarmPool,
    watchdog: Watchdog,
    stats: Arc<EngineStats>,
    retry_heap_limit: bool,
    caps: SharedCapabilities,
}

pub fn spawn(
    index: usize,
    config: &EngineConfig,
    stats: Arc<EngineStats>,
    caps: SharedCapabilities,
) -> std::io::Result<WorkerHandle> {
    let (tx, rx) = mpsc::channel::<Task>();
    let load = Arc::new(AtomicUsize::new(0));
    let watchdog = Watchdog::spawn(format!("scriptd-watchdog-{index}"))?;
    let (max_warm, max_memory) = (
        config.warm_isolates_per_worker,
        config.warm_memory_per_worker.as_usize(),
    );
    let retry_heap_limit = config.retry_heap_limit;
    let their_load = load.clone();
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
            let mut worker = Worker {
                pool: WarmPool::new(max_warm, max_memory),
                watchdog,
                stats,
                retry_heap_limit,
                caps,
            };
            let mut warm = 0;
            while let Ok(task) = rx.recv() {
                let result =
                    runtime.block_on(worker.execute_guarded(&task.run, task.validate_only));
                let now = worker.pool.len() as u64;
                if now != warm {
                    let stats = &worker.stats.warm_isolates;
                    stats.fetch_add(now.wrapping_sub(warm), Ordering::Relaxed);
                    warm = now;
                }
                their_load.fetch_sub(1, Ordering::SeqCst);
                let _ = task.reply.send(result);
            }
        })?;
    Ok(WorkerHandle { tx, load })
}

impl Worker {
    /// Runs one script; a panic inside the engine fails this run and empties the pool
    /// instead of taking the worker down.
    async fn execute_guarded(&mut self, run: &ScriptRun, validate_only: bool) -> RunResult {
        let start = Instant::now();
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
            let _armed = self.watchdog.arm(isolate.guard().clone(), deadline);
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
            let _armed = self.watchdog.arm(isolate.guard().clone(), deadline);
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

    /// Applies the operator's retry setting for heap-limit failures.
    fn finish(&self, mut f: Failure) -> Failure {
        f.retryable = f.kind.retryable(self.retry_heap_limit);
        f
    }
}
