//! Hostile scripts, each in both modes (in process, and through an engine host with its
//! seccomp filter on): each ends in its failure kind within its bound, and the same engine
//! then serves the next run. Real isolates, no mocks.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use scriptd::engine::{Engine, FailureKind, HostsConfig, Isolation};
use scriptd::units::ByteSize;
use serde_json::json;

/// Where a test's isolates live: on a thread of the test process, or in an engine host
/// process with its seccomp filter on, as in the daemon.
#[derive(Clone, Copy, Debug)]
enum Mode {
    InProcess,
    Host,
}

async fn engine_for(mode: Mode) -> Engine {
    let engine = match mode {
        Mode::InProcess => engine(),
        Mode::Host => engine_in(
            Isolation::Process,
            Arc::new(scriptd::caps::NoCapabilities::default()),
        ),
    };
    assert!(engine.wait_ready(Duration::from_secs(30)).await);
    engine
}

/// Runs `source` (changed by `tweak`) in a new engine of `mode`: it fails as `kind` within
/// its timeout and the kill grace (plus slack for a busy machine), and the same engine then
/// serves a plain run.
async fn expect_failure(
    mode: Mode,
    source: &str,
    kind: FailureKind,
    tweak: impl FnOnce(&mut scriptd::engine::ScriptRun),
) -> scriptd::engine::Failure {
    let engine = engine_for(mode).await;
    let mut r = run(source, json!({}));
    tweak(&mut r);
    let bound = r.limits.timeout + HostsConfig::default().kill_grace + Duration::from_secs(2);
    let started = Instant::now();
    let result = engine.run(r).await;
    let took = started.elapsed();
    assert_eq!(
        failure_kind(&result),
        kind,
        "{mode:?}: {:?}",
        result.outcome
    );
    assert!(took < bound, "{mode:?}: ended after {took:?}");
    println!("{mode:?}: {kind} after {took:.2?}");
    still_serves(&engine).await;
    result.outcome.unwrap_err()
}

fn short_timeout(r: &mut scriptd::engine::ScriptRun) {
    r.limits.timeout = Duration::from_millis(300);
}

async fn infinite_loop_times_out(mode: Mode) {
    let f = expect_failure(
        mode,
        "export default function () { while (true) {} }",
        FailureKind::Timeout,
        short_timeout,
    )
    .await;
    assert!(f.retryable);
    assert!(f.message.contains("300ms"), "{}", f.message);
}

async fn infinite_loop_at_top_level_times_out(mode: Mode) {
    expect_failure(
        mode,
        "while (true) {}\nexport default () => 1;",
        FailureKind::Timeout,
        short_timeout,
    )
    .await;
}

async fn microtask_loop_times_out(mode: Mode) {
    expect_failure(
        mode,
        "export default async function () { for (;;) { await 0; } }",
        FailureKind::Timeout,
        short_timeout,
    )
    .await;
}

async fn promise_that_never_settles_is_unsettled(mode: Mode) {
    let f = expect_failure(
        mode,
        "export default function () { return new Promise(() => {}); }",
        FailureKind::Unsettled,
        |_| {},
    )
    .await;
    assert!(!f.retryable);
}

async fn heap_bomb_by_arrays_hits_the_heap_limit(mode: Mode) {
    let f = expect_failure(
        mode,
        "export default function () { const keep = []; for (;;) keep.push(new Array(10000).fill(1.5)); }",
        FailureKind::HeapLimit,
        |_| {},
    )
    .await;
    assert!(f.message.contains("16MiB"), "{}", f.message);
}

async fn heap_bomb_by_objects_hits_the_heap_limit(mode: Mode) {
    expect_failure(
        mode,
        "export default function () { const keep = []; for (;;) keep.push({ a: Math.random(), b: 'k' + Math.random() }); }",
        FailureKind::HeapLimit,
        |_| {},
    )
    .await;
}

async fn heap_bomb_by_string_doubling_hits_the_heap_limit(mode: Mode) {
    expect_failure(
        mode,
        "export default function () { let s = 'x'; const keep = []; for (;;) { s = s.repeat(2); keep.push(s); } }",
        FailureKind::HeapLimit,
        |_| {},
    )
    .await;
}

async fn string_concatenation_bomb_fails_without_harm(mode: Mode) {
    // `s + s` builds ropes that take no memory until the engine's string length cap; the
    // engine refuses it with an ordinary error (or the heap limit, if it flattens first).
    let engine = engine_for(mode).await;
    let result = engine
        .run(run(
            "export default function () { let s = 'x'; for (;;) s = s + s; }",
            json!({}),
        ))
        .await;
    let kind = failure_kind(&result);
    assert!(
        matches!(kind, FailureKind::Exception | FailureKind::HeapLimit),
        "{kind}"
    );
    still_serves(&engine).await;
}

async fn huge_array_buffer_hits_the_heap_limit(mode: Mode) {
    expect_failure(
        mode,
        "export default function () { return new ArrayBuffer(1024 * 1024 * 1024).byteLength; }",
        FailureKind::HeapLimit,
        |_| {},
    )
    .await;
}

async fn many_array_buffers_hit_the_heap_limit_even_when_caught(mode: Mode) {
    // Buffer memory lives outside the JavaScript heap; the allocator's budget stops it and
    // terminates the isolate, so catching the error does not help.
    expect_failure(
        mode,
        "export default function () { const keep = []; for (;;) { try { keep.push(new Uint8Array(1 << 20)); } catch {} } }",
        FailureKind::HeapLimit,
        |_| {},
    )
    .await;
}

async fn unbounded_recursion_is_an_exception(mode: Mode) {
    let f = expect_failure(
        mode,
        "export default function f() { return f() + 1; }",
        FailureKind::Exception,
        |_| {},
    )
    .await;
    assert!(f.message.contains("call stack"), "{}", f.message);
}

async fn a_huge_error_message_is_cut(mode: Mode) {
    let f = expect_failure(
        mode,
        "export default function () { throw new Error('é'.repeat(1024 * 1024)); }",
        FailureKind::Exception,
        |_| {},
    )
    .await;
    assert!(f.message.len() < 9 * 1024, "{} bytes", f.message.len());
    assert!(
        f.message.ends_with("more bytes cut]"),
        "{}",
        &f.message[..80]
    );
    let stack = f.stack.unwrap_or_default();
    assert!(stack.len() < 17 * 1024, "{} bytes", stack.len());
}

async fn fifty_mib_return_value_is_refused(mode: Mode) {
    let f = expect_failure(
        mode,
        "export default function () { return 'x'.repeat(50 * 1024 * 1024); }",
        FailureKind::ResultTooLarge,
        |r| r.limits.heap = ByteSize::mib(128),
    )
    .await;
    assert!(!f.retryable);
}

async fn syntax_error_is_reported_with_its_location(mode: Mode) {
    let f = expect_failure(
        mode,
        "export default function () { return {a: }",
        FailureKind::Syntax,
        |_| {},
    )
    .await;
    assert!(!f.retryable);
    let where_ = format!("{} {}", f.message, f.stack.unwrap_or_default());
    assert!(where_.contains("acme/script@v1.js:1"), "{where_}");
}

async fn module_without_default_export_has_no_handler(mode: Mode) {
    let f = expect_failure(mode, "export const x = 1;", FailureKind::NoHandler, |_| {}).await;
    assert!(f.message.contains("no default export"), "{}", f.message);
    let f = expect_failure(mode, "export default 42;", FailureKind::NoHandler, |_| {}).await;
    assert!(f.message.contains("number"), "{}", f.message);
}

async fn host_apis_are_absent(mode: Mode) {
    let engine = engine_for(mode).await;
    let probe = r#"export default function () {
        return {
            Deno: typeof Deno, process: typeof process, require: typeof require,
            WebAssembly: typeof WebAssembly, bootstrap: typeof __bootstrap,
            seal: typeof __scriptd_seal, infra: typeof __infra,
            atomicsWait: typeof Atomics.wait,
        };
    }"#;
    let v = value(engine.run(run(probe, json!({}))).await);
    for (name, kind) in v.as_object().unwrap() {
        assert_eq!(kind, "undefined", "{name} is reachable from scripts");
    }
    for call in [
        "Deno.readFile('/etc/passwd')",
        "process.env",
        "require('fs')",
    ] {
        let source = format!("export default function () {{ return {call}; }}");
        let result = engine.run(run(&source, json!({}))).await;
        let f = result.outcome.expect_err(call);
        assert_eq!(f.kind, FailureKind::Exception, "{call}");
        assert!(f.message.contains("not defined"), "{call}: {}", f.message);
    }
    still_serves(&engine).await;
}

async fn imports_are_refused(mode: Mode) {
    expect_failure(
        mode,
        "import fs from 'node:fs';\nexport default () => fs;",
        FailureKind::Syntax,
        |_| {},
    )
    .await;
}

async fn code_generation_from_strings_is_disabled(mode: Mode) {
    for code in [
        "eval('1 + 1')",
        "new Function('return 1')()",
        "(0, eval)('1')",
    ] {
        let source = format!("export default function () {{ return {code}; }}");
        let f = expect_failure(mode, &source, FailureKind::Exception, |_| {}).await;
        assert!(!f.message.is_empty(), "{code}");
    }
}

async fn oversized_source_is_refused_before_compiling(mode: Mode) {
    let source = format!("export default () => 1;\n//{}", "x".repeat(300 * 1024));
    expect_failure(mode, &source, FailureKind::SourceTooLarge, |_| {}).await;
}

async fn non_serialisable_results_are_refused(mode: Mode) {
    expect_failure(
        mode,
        "export default () => 10n",
        FailureKind::ResultNotSerialisable,
        |_| {},
    )
    .await;
    let f = expect_failure(
        mode,
        "export default () => { const a = {}; a.self = a; return a; }",
        FailureKind::ResultNotSerialisable,
        |_| {},
    )
    .await;
    assert!(f.message.contains("cycle"), "{}", f.message);
}

async fn a_module_that_throws_at_top_level_is_not_kept(mode: Mode) {
    let engine = engine_for(mode).await;
    let source = "if (globalThis.loaded) throw new Error('evaluated twice'); throw new Error('top-level');\nexport default () => 1;";
    for _ in 0..2 {
        let result = engine.run(run(source, json!({}))).await;
        assert!(result.cold_start);
        let f = result.outcome.unwrap_err();
        assert_eq!(f.kind, FailureKind::Exception);
        assert!(f.message.contains("top-level"), "{}", f.message);
    }
    still_serves(&engine).await;
}

/// The global object's own names, ECMAScript's (ES2026 with Annex B's `escape` and
/// `unescape`) and the documented script API's, on every engine. Anything an engine adds is
/// removed when the sandbox is sealed; anything new that reaches scripts fails here.
const ECMASCRIPT_GLOBALS: &[&str] = &[
    "AggregateError",
    "Array",
    "ArrayBuffer",
    "AsyncDisposableStack",
    "Atomics",
    "BigInt",
    "BigInt64Array",
    "BigUint64Array",
    "Boolean",
    "DataView",
    "Date",
    "DisposableStack",
    "Error",
    "EvalError",
    "FinalizationRegistry",
    "Float16Array",
    "Float32Array",
    "Float64Array",
    "Function",
    "Infinity",
    "Int16Array",
    "Int32Array",
    "Int8Array",
    "Intl",
    "Iterator",
    "JSON",
    "Map",
    "Math",
    "NaN",
    "Number",
    "Object",
    "Promise",
    "Proxy",
    "RangeError",
    "ReferenceError",
    "Reflect",
    "RegExp",
    "Set",
    "SharedArrayBuffer",
    "String",
    "SuppressedError",
    "Symbol",
    "SyntaxError",
    "TypeError",
    "URIError",
    "Uint16Array",
    "Uint32Array",
    "Uint8Array",
    "Uint8ClampedArray",
    "WeakMap",
    "WeakRef",
    "WeakSet",
    "decodeURI",
    "decodeURIComponent",
    "encodeURI",
    "encodeURIComponent",
    "escape",
    "eval",
    "globalThis",
    "isFinite",
    "isNaN",
    "parseFloat",
    "parseInt",
    "undefined",
    "unescape",
];
/// The script API on the global object, as docs/scripts.md documents it ("The sandbox").
const SCRIPT_API_GLOBALS: &[&str] = &[
    "DOMException",
    "atob",
    "btoa",
    "console",
    "fetch",
    "performance",
    "queueMicrotask",
];

async fn the_global_object_holds_the_language_and_the_documented_api_only(mode: Mode) {
    let engine = engine_for(mode).await;
    let probe = "export default () => {
        const chain = [];
        for (let p = Object.getPrototypeOf(globalThis); p; p = Object.getPrototypeOf(p)) {
            chain.push(p === Object.prototype ? 'Object.prototype' : Object.getOwnPropertyNames(p));
        }
        return { own: Object.getOwnPropertyNames(globalThis), chain,
                 atomics: Object.getOwnPropertyNames(Atomics).filter(n => /wait|notify/.test(n)) };
    }";
    let v = value(engine.run(run(probe, json!({}))).await);
    let mut own: Vec<&str> = v["own"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    own.sort_unstable();
    let mut expected: Vec<&str> = ECMASCRIPT_GLOBALS
        .iter()
        .chain(SCRIPT_API_GLOBALS)
        .copied()
        .collect();
    expected.sort_unstable();
    let extra: Vec<_> = own.iter().filter(|n| !expected.contains(n)).collect();
    let missing: Vec<_> = expected.iter().filter(|n| !own.contains(n)).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{mode:?}: extra {extra:?}, missing {missing:?}"
    );
    assert_eq!(
        v["chain"],
        json!(["Object.prototype"]),
        "{mode:?}: the global's prototypes"
    );
    assert_eq!(
        v["atomics"],
        json!([]),
        "{mode:?}: Atomics can still wait or notify"
    );
}

macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod in_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Mode::InProcess).await
                }
            )*
        }
        mod through_a_host {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Mode::Host).await
                }
            )*
        }
    };
}

in_both_modes!(
    infinite_loop_times_out,
    infinite_loop_at_top_level_times_out,
    microtask_loop_times_out,
    promise_that_never_settles_is_unsettled,
    heap_bomb_by_arrays_hits_the_heap_limit,
    heap_bomb_by_objects_hits_the_heap_limit,
    heap_bomb_by_string_doubling_hits_the_heap_limit,
    string_concatenation_bomb_fails_without_harm,
    huge_array_buffer_hits_the_heap_limit,
    many_array_buffers_hit_the_heap_limit_even_when_caught,
    unbounded_recursion_is_an_exception,
    fifty_mib_return_value_is_refused,
    a_huge_error_message_is_cut,
    syntax_error_is_reported_with_its_location,
    module_without_default_export_has_no_handler,
    host_apis_are_absent,
    imports_are_refused,
    code_generation_from_strings_is_disabled,
    oversized_source_is_refused_before_compiling,
    non_serialisable_results_are_refused,
    a_module_that_throws_at_top_level_is_not_kept,
    the_global_object_holds_the_language_and_the_documented_api_only,
);
