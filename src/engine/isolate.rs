//! One script isolate: created from the snapshot with its heap limit, the script module
//! loaded and its handler found, then invoked once per run.

use std::sync::Arc;
use std::task::Poll;

use deno_core::error::{CoreError, CoreErrorKind};
use deno_core::{v8, JsRuntime, ModuleSpecifier, PollEventLoopOptions, RuntimeOptions};

use super::failure::{Failure, FailureKind};
use super::guard::Guard;
use super::ops::{RunScope, SharedCapabilities};
use super::sandbox::{self, LogBuffer, LogLine};
use super::ScriptRun;
use crate::units::ByteSize;

/// A live isolate. Created sealed and empty; `load` evaluates one script version's module
/// in it, after which `invoke` runs its handler once per run.
pub struct ScriptIsolate {
    // Handles into the isolate come first: fields drop in order, and they must go before it.
    host: Host,
    handler: Option<v8::Global<v8::Function>>,
    /// The `ctx` the last run's handler was given, kept for the next run of the same attempt.
    ctx: Option<RunCtx>,
    runtime: JsRuntime,
    guard: Arc<Guard>,
    /// The heap limit the isolate was created with; a warm isolate serves only runs of that limit.
    pub heap_limit: ByteSize,
    /// The source of the script loaded in the isolate; `None` until one is loaded. A warm isolate
    /// serves only runs of this exact source.
    pub source: Option<Arc<str>>,
    /// Whether this isolate is the thread's entered isolate (see `enter`).
    entered: bool,
    /// Runs since creation, and the memory measured at the last refresh.
    runs: u64,
    memory: usize,
}

/// Measuring the heap walks it on some engines (on QuickJS ~850 000 instructions for a
/// small isolate: every 32 runs, that was a tenth of a warm run's cost in an engine host).
/// The figure only sizes the warm pool; each run's heap stays held to its limit by the
/// engine itself. So it is measured after the first run and then every this many runs.
const MEMORY_REFRESH_RUNS: u64 = 256;

/// The host functions the sealed bootstrap hands over.
struct Host {
    start: v8::Global<v8::Function>,
    settle: v8::Global<v8::Function>,
    finish: v8::Global<v8::Function>,
    handler_of: v8::Global<v8::Function>,
    make_ctx: v8::Global<v8::Function>,
}

/// A handler's frozen `ctx` and whom it was made for. It holds nothing of one run (the script
/// API acts for the run in progress), so it is made once per isolate and attempt number, not
/// once per run.
struct RunCtx {
    tenant: String,
    script: String,
    version: crate::domain::Version,
    attempt: u32,
    value: v8::Global<v8::Value>,
}

impl RunCtx {
    fn serves(&self, run: &ScriptRun) -> bool {
        self.attempt == run.attempt
            && self.version == run.version
            && self.script == run.script
            && self.tenant == run.tenant
    }
}

/// What calling the handler (`call`) gave at once.
enum Called {
    /// The handler settled: the run's output (its JSON text, or `[kind, message]`).
    Fulfilled(v8::Global<v8::Value>),
    /// The promise of the run's output, pending or rejected: the event loop settles it.
    Pending(v8::Global<v8::Value>),
    /// A call threw: a termination (the sandbox's functions catch exceptions or turn them into
    /// rejections).
    Threw,
    /// The input could not be made a string of the engine.
    TooLarge,
}

impl ScriptIsolate {
    /// A fresh, sealed isolate from the snapshot, with its heap limit. Runs no user code.
    pub fn create(
        heap_limit: ByteSize,
        caps: &SharedCapabilities,
    ) -> Result<ScriptIsolate, Failure> {
        let heap = heap_limit.as_usize();
        let guard = Guard::new(heap);
        let params = v8::CreateParams::default()
            .heap_limits(0, heap)
            .array_buffer_allocator(guard.allocator().make_shared());
        let mut runtime = JsRuntime::try_new(RuntimeOptions {
            extensions: sandbox::extensions(),
            startup_snapshot: Some(sandbox::snapshot()),
            create_params: Some(params),
            ..Default::default()
        })
        .map_err(|e| engine_failure(format!("the isolate could not be created: {e}")))?;
        guard.attach(runtime.v8_isolate().thread_safe_handle());
        runtime.op_state().borrow_mut().put(caps.clone());
        let g = guard.clone();
        runtime.add_near_heap_limit_callback(move |current, initial| {
            g.on_heap_exhausted();
            headroom(current, initial)
        });
        let host = seal(&mut runtime).map_err(engine_failure)?;
        let mut isolate = ScriptIsolate {
            host,
            handler: None,
            ctx: None,
            runtime,
            guard,
            // A new isolate is entered on creation.
            entered: true,
            heap_limit,
            source: None,
            runs: 0,
            memory: 0,
        };
        isolate.exit();
        Ok(isolate)
    }

    /// Makes this the thread's current isolate. Several isolates live on one worker thread;
    /// the engines keep per-thread "current isolate" state that must name the isolate in
    /// use (the offline engine corrupts its atom tables otherwise, and V8 requires it to
    /// dispose an isolate). Every use of an isolate is bracketed by `enter` and `exit`.
    pub fn enter(&mut self) {
        if !self.entered {
            // SAFETY: balanced by `exit`, or by the isolate's own exit when it is dropped.
            unsafe { self.runtime.v8_isolate().enter() };
            self.entered = true;
        }
    }

    pub fn exit(&mut self) {
        if self.entered {
            // SAFETY: this isolate is the innermost entered one (uses do not nest).
            unsafe { self.runtime.v8_isolate().exit() };
            self.entered = false;
        }
    }

    /// Evaluates the script's module and finds its handler. The caller arms the watchdog
    /// around this: top-level code counts toward the run's timeout.
    pub async fn load(&mut self, run: &ScriptRun) -> Result<(), Failure> {
        let specifier = specifier(run);
        let runtime = &mut self.runtime;
        let loaded = async {
            let id = runtime
                .load_side_es_module_from_code(&specifier, run.source.to_string())
                .await
                .map_err(|e| (FailureKind::Syntax, e))?;
            let evaluation = runtime.mod_evaluate(id);
            runtime
                .run_event_loop(PollEventLoopOptions::default())
                .await
                .map_err(|e| (FailureKind::Exception, e))?;
            evaluation.await.map_err(|e| (FailureKind::Exception, e))?;
            runtime
                .get_module_namespace(id)
                .map_err(|e| (FailureKind::Engine, e))
        }
        .await;
        let namespace = loaded.map_err(|(kind, error)| classify(&self.guard, kind, &error, run))?;
        // The deadline may pass while the handler is looked up: a termination then is the
        // timeout's (or the heap limit's), not an engine fault.
        let handler = find_handler(runtime, &self.host, namespace).await;
        self.handler = Some(handler.map_err(|f| tripped(&self.guard, run).unwrap_or(f))?);
        self.source = Some(run.source.clone());
        Ok(())
    }

    /// Whether a script's handler was found: only then can the isolate serve runs.
    pub fn is_loaded(&self) -> bool {
        self.handler.is_some()
    }

    pub fn guard(&self) -> &Arc<Guard> {
        &self.guard
    }

    /// Why the isolate was stopped from outside during `run`, if it was.
    pub fn stopped(&self, run: &ScriptRun) -> Option<Failure> {
        tripped(&self.guard, run)
    }

    /// Starts a run: console output goes to a fresh buffer of `log_cap` bytes, and the
    /// script API acts for `scope`.
    pub fn begin_run(&mut self, log_cap: ByteSize, scope: RunScope) {
        let state = self.runtime.op_state();
        let mut state = state.borrow_mut();
        state.put(LogBuffer::new(log_cap.as_usize()));
        state.put(scope);
    }

    /// Ends the run: what was written (and whether it was cut), and what the run used of
    /// the script API.
    pub fn end_run(&mut self) -> ((Vec<LogLine>, bool), Option<RunScope>) {
        let state = self.runtime.op_state();
        let mut state = state.borrow_mut();
        let logs = state
            .try_take::<LogBuffer>()
            .map(LogBuffer::finish)
            .unwrap_or_default();
        (logs, state.try_take::<RunScope>())
    }

    /// Runs the loaded handler once on the run's input.
    pub async fn invoke(&mut self, run: &ScriptRun) -> Result<serde_json::Value, Failure> {
        self.runs += 1;
        let Some(handler) = &self.handler else {
            return Err(engine_failure("no script is loaded in this isolate".into()));
        };
        if !self.ctx.as_ref().is_some_and(|ctx| ctx.serves(run)) {
            self.ctx = None;
            self.ctx = Some(make_ctx(&mut self.runtime, &self.host, run).ok_or_else(|| {
                tripped(&self.guard, run).unwrap_or_else(|| {
                    engine_failure("the sandbox could not make the handler's ctx".into())
                })
            })?);
        }
        let ctx = &self.ctx.as_ref().expect("made above").value;
        let value = match call(&mut self.runtime, &self.host, handler, ctx, run) {
            Called::Fulfilled(value) => {
                // What the handler left behind (a promise rejected with no handler) fails
                // the run, as it does when the event loop settles the handler's promise.
                let polled = std::future::poll_fn(|cx| {
                    Poll::Ready(
                        self.runtime
                            .poll_event_loop(cx, PollEventLoopOptions::default()),
                    )
                })
                .await;
                if let Poll::Ready(Err(e)) = polled {
                    return Err(classify(&self.guard, FailureKind::Exception, &e, run));
                }
                value
            }
            Called::Pending(promise) => {
                let settled = self.runtime.resolve(promise);
                self.runtime
                    .with_event_loop_promise(settled, PollEventLoopOptions::default())
                    .await
                    .map_err(|e| classify(&self.guard, FailureKind::Exception, &e, run))?
            }
            Called::Threw => {
                return Err(tripped(&self.guard, run).unwrap_or_else(|| {
                    engine_failure("the sandbox's call threw outside the handler's promise".into())
                }))
            }
            Called::TooLarge => {
                return Err(engine_failure(
                    "the input is too large to pass to the engine".into(),
                ))
            }
        };
        let json = {
            deno_core::scope!(scope, &mut self.runtime);
            let local = v8::Local::new(scope, value);
            if local.is_string() {
                local.to_rust_string_lossy(scope)
            } else {
                let (kind, message): (FailureKind, String) = serde_v8::from_v8(scope, local)
                    .map_err(|e| engine_failure(format!("unexpected host output: {e}")))?;
                return Err(failure(kind, message, None));
            }
        };
        if json.len() > run.limits.result.as_usize() {
            return Err(failure(
                FailureKind::ResultTooLarge,
                format!(
                    "the return value is {} bytes as JSON, over the {} limit",
                    json.len(),
                    run.limits.result
                ),
                None,
            ));
        }
        serde_json::from_str(&json).map_err(|e| {
            failure(
                FailureKind::ResultNotSerialisable,
                format!("the return value is not valid JSON: {e}"),
                None,
            )
        })
    }

    /// JavaScript heap in use plus ArrayBuffer contents, for the warm pool's budget. The
    /// heap figure is measured after the first run and then every few runs.
    pub fn memory_used(&mut self) -> usize {
        if self.runs % MEMORY_REFRESH_RUNS == 1 {
            self.memory = self
                .runtime
                .v8_isolate()
                .get_heap_statistics()
                .used_heap_size();
        }
        self.memory + self.guard.buffers_used()
    }
}

/// Calls the run's handler through the sandbox. A handler that awaits nothing outside the
/// isolate has settled by the time its call returns, or once the microtasks have run: its
/// value is then turned into the run's output at once (`finish`), with no promise of the
/// sandbox's own to wait for and no promise watch of deno_core's (which makes two functions
/// per call). A promise still pending, or rejected, goes to `settle`, whose promise the event
/// loop settles and whose rejection it reports, as the handler's own.
fn call(
    runtime: &mut JsRuntime,
    host: &Host,
    handler: &v8::Global<v8::Function>,
    ctx: &v8::Global<v8::Value>,
    run: &ScriptRun,
) -> Called {
    deno_core::scope!(scope, runtime);
    v8::tc_scope!(let scope, scope);
    let handler = v8::Local::new(scope, handler);
    let Some(event) = v8::String::new(scope, run.input.get()) else {
        return Called::TooLarge;
    };
    let ctx = v8::Local::new(scope, ctx);
    let limit = v8::Number::new(scope, run.limits.result.0 as f64).into();
    let undefined = v8::undefined(scope).into();
    let start = v8::Local::new(scope, &host.start);
    let args = [handler.into(), event.into(), ctx];
    let Some(returned) = start.call(scope, undefined, &args) else {
        return Called::Threw;
    };
    if let Ok(promise) = v8::Local::<v8::Promise>::try_from(returned) {
        if promise.state() == v8::PromiseState::Pending {
            scope.perform_microtask_checkpoint();
        }
        if promise.state() == v8::PromiseState::Fulfilled && !scope.is_execution_terminating() {
            let value = promise.result(scope);
            let finish = v8::Local::new(scope, &host.finish);
            return match finish.call(scope, undefined, &[value, limit]) {
                Some(output) => Called::Fulfilled(v8::Global::new(scope, output)),
                None => Called::Threw,
            };
        }
    }
    let settle = v8::Local::new(scope, &host.settle);
    match settle.call(scope, undefined, &[returned, limit]) {
        Some(settled) => Called::Pending(v8::Global::new(scope, settled)),
        None => Called::Threw,
    }
}

impl Drop for ScriptIsolate {
    fn drop(&mut self) {
        // Disposing an isolate requires it to be the current one; dropping the runtime
        // exits it again.
        if !self.entered {
            // SAFETY: balanced by the exit in the isolate's own drop.
            unsafe { self.runtime.v8_isolate().enter() };
            self.entered = true;
        }
    }
}

fn seal(runtime: &mut JsRuntime) -> Result<Host, String> {
    let host = runtime
        .execute_script("ext:scriptd/seal.js", "globalThis.__scriptd_seal()")
        .map_err(|e| format!("the sandbox could not be sealed: {e}"))?;
    deno_core::scope!(scope, runtime);
    // Scripts may not compile code from strings (`eval`, `new Function`).
    scope
        .get_current_context()
        .set_allow_generation_from_strings(false);
    let host = v8::Local::new(scope, host);
    let host = v8::Local::<v8::Object>::try_from(host).map_err(|e| e.to_string())?;
    let function = |name: &str| -> Result<v8::Global<v8::Function>, String> {
        let key = v8::String::new(scope, name).ok_or("string allocation failed")?;
        let value = host
            .get(scope, key.into())
            .ok_or_else(|| format!("the sandbox has no {name}"))?;
        let f = v8::Local::<v8::Function>::try_from(value).map_err(|e| e.to_string())?;
        Ok(v8::Global::new(scope, f))
    };
    Ok(Host {
        start: function("start")?,
        settle: function("settle")?,
        finish: function("finish")?,
        handler_of: function("handlerOf")?,
        make_ctx: function("makeCtx")?,
    })
}

/// The `ctx` for runs like `run` (`RunCtx`); none if the call was stopped.
fn make_ctx(runtime: &mut JsRuntime, host: &Host, run: &ScriptRun) -> Option<RunCtx> {
    deno_core::scope!(scope, runtime);
    let tenant = v8::String::new(scope, &run.tenant)?;
    let script = v8::String::new(scope, &run.script)?;
    let version = v8::Number::new(scope, f64::from(run.version.get()));
    let attempt = v8::Number::new(scope, f64::from(run.attempt));
    let undefined = v8::undefined(scope).into();
    let make = v8::Local::new(scope, &host.make_ctx);
    let args = [tenant.into(), script.into(), version.into(), attempt.into()];
    let value = make.call(scope, undefined, &args)?;
    Some(RunCtx {
        tenant: run.tenant.clone(),
        script: run.script.clone(),
        version: run.version,
        attempt: run.attempt,
        value: v8::Global::new(scope, value),
    })
}

async fn find_handler(
    runtime: &mut JsRuntime,
    host: &Host,
    namespace: v8::Global<v8::Object>,
) -> Result<v8::Global<v8::Function>, Failure> {
    let arg = {
        deno_core::scope!(scope, runtime);
        let ns = v8::Local::new(scope, namespace);
        v8::Global::new(scope, v8::Local::<v8::Value>::from(ns))
    };
    let found = runtime
        .call_with_args(&host.handler_of, &[arg])
        .await
        .map_err(|e| failure(FailureKind::Engine, e.to_string(), None))?;
    deno_core::scope!(scope, runtime);
    let found = v8::Local::new(scope, found);
    match v8::Local::<v8::Function>::try_from(found) {
        Ok(f) => Ok(v8::Global::new(scope, f)),
        Err(_) => Err(failure(
            FailureKind::NoHandler,
            found.to_rust_string_lossy(scope),
            None,
        )),
    }
}

/// `scriptd:///<tenant>/<script>@v<version>.js`: what stack traces show.
fn specifier(run: &ScriptRun) -> ModuleSpecifier {
    let mut url = ModuleSpecifier::parse("scriptd:///").expect("static URL");
    if let Ok(mut path) = url.path_segments_mut() {
        path.clear()
            .push(&run.tenant)
            .push(&format!("{}@v{}.js", run.script, run.version));
    }
    url
}

/// Why the isolate was stopped from outside, if it was.
fn tripped(guard: &Guard, run: &ScriptRun) -> Option<Failure> {
    if guard.timed_out.load(std::sync::atomic::Ordering::SeqCst) {
        return Some(timeout_failure(run));
    }
    if guard
        .heap_exceeded
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Some(failure(
            FailureKind::HeapLimit,
            format!("the isolate reached its heap limit of {}", run.limits.heap),
            None,
        ));
    }
    if guard.cpu_exceeded.load(std::sync::atomic::Ordering::SeqCst) {
        return Some(failure(
            FailureKind::CpuLimit,
            format!(
                "the run used more than its CPU-time limit of {}",
                humantime::format_duration(run.limits.cpu_time)
            ),
            None,
        ));
    }
    None
}

/// The heap limit to grant an isolate that reached its limit and is being terminated, so
/// the termination can unwind instead of the process aborting. V8 calls for more once, near
/// the limit, and a single allocation may need a lot: each call doubles. The offline
/// engine calls on every allocation past the limit until the termination lands at its next
/// interrupt check, which an allocation loop reaches only every few thousand allocations:
/// doubling there let `xs.push(new Array(1e5).fill(0))` grow to gigabytes in 11 s before it
/// stopped. There the grant is twice the initial limit, once; allocations past it fail.
fn headroom(current: usize, initial: usize) -> usize {
    if cfg!(feature = "quickjs") {
        current.max(initial.saturating_mul(2))
    } else {
        current.saturating_mul(2)
    }
}

/// The run reached its wall-clock limit (in JavaScript, or waiting for the script API).
pub fn timeout_failure(run: &ScriptRun) -> Failure {
    failure(
        FailureKind::Timeout,
        format!(
            "the run exceeded its wall-clock limit of {}",
            humantime::format_duration(run.limits.timeout)
        ),
        None,
    )
}

fn engine_failure(message: String) -> Failure {
    failure(FailureKind::Engine, message, None)
}

/// The most of a failure's message and of its stack a run keeps, in bytes. A script decides
/// what it throws: a many-megabyte message would otherwise travel into every record of the
/// attempt, the dead letter (past NATS's payload limit) and the API.
const FAILURE_MESSAGE_KEPT: usize = 8 * 1024;
/// See `FAILURE_MESSAGE_KEPT`.
const FAILURE_STACK_KEPT: usize = 16 * 1024;

/// `text` up to `max` bytes (cut at a character boundary), saying how much was cut.
fn cut_to(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let end = sandbox::char_floor(&text, max);
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!(" … [{cut} more bytes cut]"));
    text
}

pub fn failure(kind: FailureKind, message: String, stack: Option<String>) -> Failure {
    Failure {
        kind,
        message: cut_to(message, FAILURE_MESSAGE_KEPT),
        stack: stack.map(|s| cut_to(s, FAILURE_STACK_KEPT)),
        // The operator's limit settings are applied by the engine before returning.
        retryable: kind.retryable(crate::engine::failure::Retried::ALL),
    }
}

/// Turns an engine error into a failure. A termination we caused says why by the guard's
/// flags; otherwise the error's own shape decides, with `default` for JavaScript errors.
fn classify(guard: &Guard, default: FailureKind, error: &CoreError, run: &ScriptRun) -> Failure {
    if let Some(f) = tripped(guard, run) {
        return f;
    }
    match &*error.0 {
        // QuickJS refuses a single allocation past the limit with a catchable OOM error
        // before the near-heap-limit callback runs; uncaught, it is the heap limit.
        CoreErrorKind::Js(js)
            if js.name.as_deref() == Some("InternalError")
                && js.message.as_deref() == Some("out of memory") =>
        {
            failure(
                FailureKind::HeapLimit,
                format!("the isolate reached its heap limit of {}", run.limits.heap),
                None,
            )
        }
        CoreErrorKind::Js(js) => failure(default, js.exception_message.clone(), js.stack.clone()),
        CoreErrorKind::PendingPromiseResolution => failure(
            FailureKind::Unsettled,
            "the handler's promise can never settle: nothing is left that could resolve it".into(),
            None,
        ),
        CoreErrorKind::ExecutionTerminated => failure(
            FailureKind::Engine,
            "the engine terminated the run".into(),
            None,
        ),
        _ if default == FailureKind::Syntax => failure(default, error.to_string(), None),
        _ => failure(FailureKind::Engine, error.print_with_cause(), None),
    }
}
