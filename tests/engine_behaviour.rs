//! What scripts can rely on: async handlers, ctx, console capture, JSON round trips, limit
//! overrides, warm isolates kept per (tenant, script, version) only, and parallel workers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use scriptd::engine::{FailureKind, ScriptRun};
use scriptd::units::ByteSize;
use serde_json::json;

#[tokio::test]
async fn async_handler_receives_event_and_ctx() {
    let engine = engine();
    let source = r#"export default async function (event, ctx) {
        const doubled = await Promise.resolve(event.n * 2);
        return { doubled, tenant: ctx.tenant, script: ctx.script, version: ctx.version, attempt: ctx.attempt };
    }"#;
    let mut r = run(source, json!({ "n": 21 }));
    r.attempt = 3;
    let v = value(engine.run(r).await);
    assert_eq!(
        v,
        json!({ "doubled": 42, "tenant": "acme", "script": "script", "version": 1, "attempt": 3 })
    );
}

#[tokio::test]
async fn a_warm_isolate_gives_each_attempt_its_own_frozen_ctx() {
    // The isolate keeps one ctx per attempt number between runs: a retry in the same warm
    // isolate must still see its own attempt, and no run can change what the next is given.
    let engine = engine();
    let source = r#"export default function (event, ctx) {
        let changed = true;
        try { ctx.attempt = 99; ctx.extra = 1; } catch { changed = false; }
        return { attempt: ctx.attempt, frozen: Object.isFrozen(ctx), changed, extra: ctx.extra ?? null };
    }"#;
    for (i, attempt) in [1, 2, 2, 1, 3].into_iter().enumerate() {
        let mut r = run(source, json!({}));
        r.attempt = attempt;
        let result = engine.run(r).await;
        assert_eq!(result.cold_start, i == 0, "run {i} in the warm isolate");
        assert_eq!(
            value(result),
            json!({ "attempt": attempt, "frozen": true, "changed": false, "extra": null }),
            "run {i}"
        );
    }
}

#[tokio::test]
async fn console_and_ctx_log_are_captured_with_levels() {
    let engine = engine();
    let source = r#"export default function (event, ctx) {
        console.log("plain", 1, { a: [1, 2] });
        console.warn("careful");
        console.error(new Error("boom"));
        console.debug(undefined, null, 5n);
        ctx.log("from ctx", ctx.tenant);
        return null;
    }"#;
    let result = engine.run(run(source, json!({}))).await;
    assert!(!result.logs_truncated);
    let lines: Vec<(String, String)> = result
        .logs
        .iter()
        .map(|l| (l.level.clone(), l.message.clone()))
        .collect();
    assert_eq!(lines[0], ("info".into(), "plain 1 {\"a\":[1,2]}".into()));
    assert_eq!(lines[1], ("warn".into(), "careful".into()));
    assert_eq!(lines[2].0, "error");
    assert!(lines[2].1.contains("boom"), "{}", lines[2].1);
    assert_eq!(lines[3], ("debug".into(), "undefined null 5n".into()));
    assert_eq!(lines[4], ("info".into(), "from ctx acme".into()));
    assert_eq!(value(result), serde_json::Value::Null);
}

#[tokio::test]
async fn captured_logs_are_truncated_with_a_visible_marker() {
    let engine = engine();
    let mut r = run(
        "export default () => { for (let i = 0; i < 1000; i++) console.log('line', i, 'x'.repeat(100)); return 'done'; }",
        json!({}),
    );
    r.limits.logs = ByteSize::kib(4);
    let result = engine.run(r).await;
    assert!(result.logs_truncated);
    let kept: usize = result.logs[..result.logs.len() - 1]
        .iter()
        .map(|l| l.message.len())
        .sum();
    assert!(kept <= 4096, "{kept} bytes kept");
    let marker = &result.logs.last().unwrap().message;
    assert!(marker.contains("log truncated at 4096 bytes"), "{marker}");
    assert_eq!(value(result), json!("done"));
}

#[tokio::test]
async fn logs_of_top_level_code_belong_to_the_first_run() {
    let engine = engine();
    let source =
        "console.log('module loaded'); export default () => { console.log('handled'); return 1; }";
    let first = engine.run(run(source, json!({}))).await;
    let messages: Vec<_> = first.logs.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(messages, ["module loaded", "handled"]);
    let second = engine.run(run(source, json!({}))).await;
    let messages: Vec<_> = second.logs.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(messages, ["handled"]);
}

#[tokio::test]
async fn json_round_trips_unicode_and_nesting() {
    let engine = engine();
    let event = json!({
        "text": "grüße 😀 日本語 \u{0000} \"quoted\" \\ back",
        "nested": { "list": [1, -2.5, 1e300, null, true, { "deep": [[[]]] }] },
        "big": 9007199254740991u64,
        "empty": {},
    });
    let v = value(
        engine
            .run(run("export default (event) => event", event.clone()))
            .await,
    );
    assert_eq!(v, event);
    let v = value(
        engine
            .run(run(
                "export default () => ({ s: '\\u{1F600}é', d: new Date(0), u: undefined, f() {} })",
                json!({}),
            ))
            .await,
    );
    assert_eq!(v, json!({ "s": "😀é", "d": "1970-01-01T00:00:00.000Z" }));
}

#[tokio::test]
async fn undefined_result_is_null() {
    let engine = engine();
    let v = value(engine.run(run("export default () => {}", json!({}))).await);
    assert_eq!(v, serde_json::Value::Null);
}

/// However a handler settles (a plain value, a promise settled at once or after microtasks,
/// a thenable), its value is the run's result; a result whose reading throws something
/// unreadable fails the run as not serialisable, not as a fault of the engine.
#[tokio::test]
async fn every_way_a_handler_settles_gives_its_value() {
    let engine = engine();
    for (source, expected) in [
        ("export default () => 1", json!(1)),
        ("export default async () => 2", json!(2)),
        (
            "export default async () => { await null; await null; return 3; }",
            json!(3),
        ),
        (
            "export default () => ({ then(resolve) { resolve(4); } })",
            json!(4),
        ),
        ("export default () => Promise.resolve(5)", json!(5)),
    ] {
        let v = value(engine.run(run(source, json!({}))).await);
        assert_eq!(v, expected, "{source}");
    }
    let hostile =
        "export default async () => ({ get x() { throw { get message() { throw 1; } }; } })";
    let f = engine
        .run(run(hostile, json!({})))
        .await
        .outcome
        .unwrap_err();
    assert_eq!(f.kind, FailureKind::ResultNotSerialisable, "{}", f.message);
}

#[tokio::test]
async fn thrown_errors_carry_message_and_stack() {
    let engine = engine();
    let source = "function inner() { throw new TypeError('bad order ' + 7); }\nexport default () => inner();";
    let result = engine.run(run(source, json!({}))).await;
    let f = result.outcome.unwrap_err();
    assert_eq!(f.kind, FailureKind::Exception);
    assert!(f.retryable);
    assert!(
        f.message.contains("TypeError: bad order 7"),
        "{}",
        f.message
    );
    let stack = f.stack.unwrap();
    assert!(
        stack.contains("inner") && stack.contains("acme/script@v1.js:1"),
        "{stack}"
    );
    let f = engine
        .run(run(
            "export default async () => { throw 'a string'; }",
            json!({}),
        ))
        .await
        .outcome
        .unwrap_err();
    assert_eq!(f.kind, FailureKind::Exception);
    assert!(f.message.contains("a string"), "{}", f.message);
}

#[tokio::test]
async fn per_script_limits_override_the_defaults() {
    let engine = engine();
    let spin = "export default () => { while (true) {} }";
    let mut r = run(spin, json!({}));
    r.limits.timeout = Duration::from_millis(150);
    let f = engine.run(r).await.outcome.unwrap_err();
    assert_eq!(f.kind, FailureKind::Timeout);
    assert!(f.message.contains("150ms"), "{}", f.message);

    let hungry = "export default () => { const a = []; for (let i = 0; i < 40; i++) a.push(new Array(65536).fill(i + 0.5)); return a.length; }";
    let mut small = run(hungry, json!({}));
    small.limits.heap = ByteSize::mib(8);
    assert_eq!(
        failure_kind(&engine.run(small).await),
        FailureKind::HeapLimit
    );
    let mut large = run(hungry, json!({}));
    large.script = "hungry-large".into();
    large.limits.heap = ByteSize::mib(128);
    assert_eq!(value(engine.run(large).await), json!(40));

    let mut r = run("export default () => 'x'.repeat(2000)", json!({}));
    r.limits.result = ByteSize::kib(1);
    assert_eq!(
        failure_kind(&engine.run(r).await),
        FailureKind::ResultTooLarge
    );
}

fn counter(tenant: &str, script: &str, version: u32) -> ScriptRun {
    let mut r = run(
        "globalThis.count = 0; export default () => ++globalThis.count;",
        json!({}),
    );
    r.tenant = tenant.into();
    r.script = script.into();
    r.version = scriptd::domain::Version::new(version);
    r
}

#[tokio::test]
async fn warm_isolates_are_reused_only_for_the_same_tenant_script_and_version() {
    let engine = engine();
    let first = engine.run(counter("acme", "count", 1)).await;
    assert!(first.cold_start);
    assert_eq!(value(first), json!(1));
    let second = engine.run(counter("acme", "count", 1)).await;
    assert!(!second.cold_start);
    assert_eq!(value(second), json!(2));
    // Another version, another tenant, another script: each starts from a fresh isolate.
    for (tenant, script, version) in [
        ("acme", "count", 2),
        ("globex", "count", 1),
        ("acme", "other", 1),
    ] {
        let r = engine.run(counter(tenant, script, version)).await;
        assert!(r.cold_start, "{tenant}/{script}@{version}");
        assert_eq!(value(r), json!(1), "{tenant}/{script}@{version}");
    }
    assert_eq!(
        value(engine.run(counter("acme", "count", 1)).await),
        json!(3)
    );
    let stats = engine.stats();
    assert_eq!((stats.cold_starts, stats.warm_hits), (4, 2));
}

#[tokio::test]
async fn a_tenants_global_state_is_invisible_to_another() {
    let engine = engine();
    let mut writer = run(
        "export default () => { globalThis.secret = 'acme-only'; Object.prototype.polluted = true; return 'set'; }",
        json!({}),
    );
    writer.script = "same".into();
    assert_eq!(value(engine.run(writer).await), json!("set"));
    let mut reader = run(
        "export default () => [typeof globalThis.secret, typeof ({}).polluted]",
        json!({}),
    );
    reader.tenant = "globex".into();
    reader.script = "same".into();
    assert_eq!(
        value(engine.run(reader).await),
        json!(["undefined", "undefined"])
    );
}

#[tokio::test]
async fn a_stopped_isolate_is_never_reused() {
    let engine = engine();
    let source =
        "let runs = 0; export default (e) => { runs++; if (e.spin) while (true) {} return runs; }";
    let mut r = run(source, json!({}));
    // Long enough for a cold start on a loaded machine; the spin ends by it.
    r.limits.timeout = Duration::from_secs(1);
    assert_eq!(value(engine.run(r.clone()).await), json!(1));
    assert_eq!(value(engine.run(r.clone()).await), json!(2));
    let mut spin = r.clone();
    spin.input = serde_json::value::to_raw_value(&json!({ "spin": true })).unwrap();
    assert_eq!(failure_kind(&engine.run(spin).await), FailureKind::Timeout);
    let after = engine.run(r).await;
    assert!(after.cold_start);
    assert_eq!(value(after), json!(1));
    assert_eq!(engine.stats().discarded, 1);
}

/// A promise the handler rejects and leaves unhandled fails that run, even when the handler
/// returned a value, and nothing of it reaches the isolate's next run.
#[tokio::test]
async fn a_rejection_left_unhandled_fails_its_own_run_only() {
    let engine = engine();
    let source = "let runs = 0; export default async (e) => { runs++; \
        if (e.leave) Promise.reject(new RangeError('left behind')); return runs; }";
    let ok = run(source, json!({}));
    assert_eq!(value(engine.run(ok.clone()).await), json!(1));
    let mut leave = ok.clone();
    leave.input = serde_json::value::to_raw_value(&json!({ "leave": true })).unwrap();
    let f = engine.run(leave).await.outcome.unwrap_err();
    assert_eq!(f.kind, FailureKind::Exception);
    assert!(
        f.message.contains("RangeError: left behind"),
        "{}",
        f.message
    );
    assert_eq!(value(engine.run(ok.clone()).await), json!(3));
    assert_eq!(value(engine.run(ok).await), json!(4));
}

#[tokio::test]
async fn an_exception_keeps_the_isolate_warm() {
    let engine = engine();
    let source = "let runs = 0; export default (e) => { runs++; if (e.fail) throw new Error('no'); return runs; }";
    let ok = run(source, json!({}));
    assert_eq!(value(engine.run(ok.clone()).await), json!(1));
    let mut fail = ok.clone();
    fail.input = serde_json::value::to_raw_value(&json!({ "fail": true })).unwrap();
    assert_eq!(
        failure_kind(&engine.run(fail).await),
        FailureKind::Exception
    );
    assert_eq!(value(engine.run(ok).await), json!(3));
}

#[tokio::test]
async fn heap_limit_retry_follows_the_operator_setting() {
    let engine = scriptd::engine::Engine::start(&scriptd::engine::EngineConfig {
        workers: 1,
        retry_heap_limit: false,
        ..Default::default()
    })
    .unwrap();
    let r = run("export default () => new ArrayBuffer(1 << 30)", json!({}));
    let f = engine.run(r).await.outcome.unwrap_err();
    assert_eq!(f.kind, FailureKind::HeapLimit);
    assert!(!f.retryable);
}

#[tokio::test]
async fn a_runaway_script_does_not_hold_up_other_workers() {
    let engine = Arc::new(engine_with(2));
    let mut runaway = run("export default () => { while (true) {} }", json!({}));
    runaway.script = "runaway".into();
    runaway.limits.timeout = Duration::from_secs(3);
    let background = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.run(runaway).await })
    };
    // Both workers may be idle when the runaway is placed; wait until it is running.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.stats().cold_starts == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the runaway never started"
        );
        tokio::task::yield_now().await;
    }
    for i in 0..5 {
        let mut quick = run(TRIVIAL, json!({ "i": i }));
        quick.script = format!("quick-{i}");
        assert_eq!(
            value(engine.run(quick).await),
            json!({ "echo": { "i": i } })
        );
    }
    assert!(
        !background.is_finished(),
        "the runaway ended before the quick runs"
    );
    assert_eq!(
        failure_kind(&background.await.unwrap()),
        FailureKind::Timeout
    );
}

/// Several isolates on one thread, used in turn and evicted out of creation order: each
/// use must find the engine's per-thread state pointing at its own isolate.
#[tokio::test]
async fn interleaved_isolates_on_one_thread_stay_healthy() {
    let engine = scriptd::engine::Engine::start(&scriptd::engine::EngineConfig {
        workers: 1,
        warm_isolates_per_worker: 2,
        ..Default::default()
    })
    .unwrap();
    let throws = "export default async () => { throw new Error('declined'); }";
    let returns = "export default () => 'fine'";
    let steps = [
        ("a", throws),
        ("b", returns),
        ("a", throws),
        ("c", throws),
        ("b", returns),
        ("a", throws),
        ("d", returns),
        ("a", throws),
    ];
    for (i, (name, source)) in steps.into_iter().enumerate() {
        let mut r = run(source, json!({}));
        r.script = name.into();
        // A guard, not a wait: a regression here used to spin the engine thread forever.
        let result = tokio::time::timeout(Duration::from_secs(30), engine.run(r))
            .await
            .unwrap_or_else(|_| panic!("step {i} ({name}) never finished"));
        match source {
            s if s == throws => {
                let f = result.outcome.unwrap_err();
                assert!(f.message.contains("declined"), "step {i}: {}", f.message);
            }
            _ => assert_eq!(value(result), json!("fine"), "step {i}"),
        }
    }
    assert!(engine.stats().evictions > 0);
}
