//! Hostile scripts: each ends in its failure kind, and the same engine thread then serves the
//! next run. Real isolates, no mocks.

mod common;

use std::time::Duration;

use common::*;
use scriptd::engine::FailureKind;
use scriptd::units::ByteSize;
use serde_json::json;

async fn expect_failure(
    source: &str,
    kind: FailureKind,
    tweak: impl FnOnce(&mut scriptd::engine::ScriptRun),
) -> scriptd::engine::Failure {
    let engine = engine();
    let mut r = run(source, json!({}));
    tweak(&mut r);
    let result = engine.run(r).await;
    assert_eq!(failure_kind(&result), kind, "{:?}", result.outcome);
    still_serves(&engine).await;
    result.outcome.unwrap_err()
}

fn short_timeout(r: &mut scriptd::engine::ScriptRun) {
    r.limits.timeout = Duration::from_millis(300);
}

#[tokio::test]
async fn infinite_loop_times_out() {
    let f = expect_failure(
        "export default function () { while (true) {} }",
        FailureKind::Timeout,
        short_timeout,
    )
    .await;
    assert!(f.retryable);
    assert!(f.message.contains("300ms"), "{}", f.message);
}

#[tokio::test]
async fn infinite_loop_at_top_level_times_out() {
    expect_failure(
        "while (true) {}\nexport default () => 1;",
        FailureKind::Timeout,
        short_timeout,
    )
    .await;
}

#[tokio::test]
async fn microtask_loop_times_out() {
    expect_failure(
        "export default async function () { for (;;) { await 0; } }",
        FailureKind::Timeout,
        short_timeout,
    )
    .await;
}

#[tokio::test]
async fn promise_that_never_settles_is_unsettled() {
    let f = expect_failure(
        "export default function () { return new Promise(() => {}); }",
        FailureKind::Unsettled,
        |_| {},
    )
    .await;
    assert!(!f.retryable);
}

#[tokio::test]
async fn heap_bomb_by_arrays_hits_the_heap_limit() {
    let f = expect_failure(
        "export default function () { const keep = []; for (;;) keep.push(new Array(10000).fill(1.5)); }",
        FailureKind::HeapLimit,
        |_| {},
    )
    .await;
    assert!(f.message.contains("16MiB"), "{}", f.message);
}

#[tokio::test]
async fn heap_bomb_by_objects_hits_the_heap_limit() {
    expect_failure(
        "export default function () { const keep = []; for (;;) keep.push({ a: Math.random(), b: 'k' + Math.random() }); }",
        FailureKind::HeapLimit,
        |_| {},
    )
    .await;
}

#[tokio::test]
async fn heap_bomb_by_string_doubling_hits_the_heap_limit() {
    expect_failure(
        "export default function () { let s = 'x'; const keep = []; for (;;) { s = s.repeat(2); keep.push(s); } }",
        FailureKind::HeapLimit,
        |_| {},
    )
    .await;
}

#[tokio::test]
async fn string_concatenation_bomb_fails_without_harm() {
    // `s + s` builds ropes that take no memory until the engine's string length cap; the
    // engine refuses it with an ordinary error (or the heap limit, if it flattens first).
    let engine = engine();
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

#[tokio::test]
async fn huge_array_buffer_hits_the_heap_limit() {
    expect_failure(
        "export default function () { return new ArrayBuffer(1024 * 1024 * 1024).byteLength; }",
        FailureKind::HeapLimit,
        |_| {},
    )
    .await;
}

#[tokio::test]
async fn many_array_buffers_hit_the_heap_limit_even_when_caught() {
    // Buffer memory lives outside the JavaScript heap; the allocator's budget stops it and
    // terminates the isolate, so catching the error does not help.
    expect_failure(
        "export default function () { const keep = []; for (;;) { try { keep.push(new Uint8Array(1 << 20)); } catch {} } }",
        FailureKind::HeapLimit,
        |_| {},
    )
    .await;
}

#[tokio::test]
async fn unbounded_recursion_is_an_exception() {
    let f = expect_failure(
        "export default function f() { return f() + 1; }",
        FailureKind::Exception,
        |_| {},
    )
    .await;
    assert!(f.message.contains("call stack"), "{}", f.message);
}

#[tokio::test]
async fn fifty_mib_return_value_is_refused() {
    let f = expect_failure(
        "export default function () { return 'x'.repeat(50 * 1024 * 1024); }",
        FailureKind::ResultTooLarge,
        |r| r.limits.heap = ByteSize::mib(128),
    )
    .await;
    assert!(!f.retryable);
}

#[tokio::test]
async fn syntax_error_is_reported_with_its_location() {
    let f = expect_failure(
        "export default function () { return {a: }",
        FailureKind::Syntax,
        |_| {},
    )
    .await;
    assert!(!f.retryable);
    let where_ = format!("{} {}", f.message, f.stack.unwrap_or_default());
    assert!(where_.contains("acme/script@v1.js:1"), "{where_}");
}

#[tokio::test]
async fn module_without_default_export_has_no_handler() {
    let f = expect_failure("export const x = 1;", FailureKind::NoHandler, |_| {}).await;
    assert!(f.message.contains("no default export"), "{}", f.message);
    let f = expect_failure("export default 42;", FailureKind::NoHandler, |_| {}).await;
    assert!(f.message.contains("number"), "{}", f.message);
}

#[tokio::test]
async fn host_apis_are_absent() {
    let engine = engine();
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

#[tokio::test]
async fn imports_are_refused() {
    expect_failure(
        "import fs from 'node:fs';\nexport default () => fs;",
        FailureKind::Syntax,
        |_| {},
    )
    .await;
}

#[tokio::test]
async fn code_generation_from_strings_is_disabled() {
    for code in [
        "eval('1 + 1')",
        "new Function('return 1')()",
        "(0, eval)('1')",
    ] {
        let source = format!("export default function () {{ return {code}; }}");
        let f = expect_failure(&source, FailureKind::Exception, |_| {}).await;
        assert!(!f.message.is_empty(), "{code}");
    }
}

#[tokio::test]
async fn oversized_source_is_refused_before_compiling() {
    let source = format!("export default () => 1;\n//{}", "x".repeat(300 * 1024));
    expect_failure(&source, FailureKind::SourceTooLarge, |_| {}).await;
}

#[tokio::test]
async fn non_serialisable_results_are_refused() {
    expect_failure(
        "export default () => 10n",
        FailureKind::ResultNotSerialisable,
        |_| {},
    )
    .await;
    let f = expect_failure(
        "export default () => { const a = {}; a.self = a; return a; }",
        FailureKind::ResultNotSerialisable,
        |_| {},
    )
    .await;
    assert!(f.message.contains("cycle"), "{}", f.message);
}

#[tokio::test]
async fn a_module_that_throws_at_top_level_is_not_kept() {
    let engine = engine();
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
