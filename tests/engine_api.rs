//! The script API as the engine enforces it (argument checks, per-run limits, errors
//! scripts can catch, secrets kept out of records, the run's deadline while waiting), with
//! an in-memory capabilities backend. The real backends are tested in `capabilities.rs`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use scriptd::caps::{
    Call, CapResult, Capabilities, CapabilitiesConfig, FetchRequest, FetchResponse, KvOp, KvReply,
    Publish,
};
use scriptd::engine::{Engine, EngineConfig, FailureKind, Isolation};
use serde_json::json;

use common::{limits, run, value};

#[derive(Default)]
struct Recorder {
    config: CapabilitiesConfig,
    published: Mutex<Vec<(Call, Publish)>>,
    kv: Mutex<std::collections::BTreeMap<String, String>>,
}

impl Capabilities for Recorder {
    fn config(&self) -> &CapabilitiesConfig {
        &self.config
    }
    fn publish(&self, call: Call, message: Publish) -> BoxFuture<'static, CapResult<String>> {
        let subject = format!("events.{}.{}", call.tenant, message.event_type);
        self.published.lock().unwrap().push((call, message));
        Box::pin(async move { Ok(subject) })
    }
    fn kv(&self, _: Call, op: KvOp) -> BoxFuture<'static, CapResult<KvReply>> {
        let reply = op.apply_in_memory(&mut self.kv.lock().unwrap());
        Box::pin(async move { Ok(reply) })
    }
    fn fetch(&self, _: Call, _: FetchRequest) -> BoxFuture<'static, CapResult<FetchResponse>> {
        // A request that never answers: the run's deadline has to end it.
        Box::pin(futures::future::pending())
    }
    fn secret(&self, _: Call, name: String) -> BoxFuture<'static, CapResult<Option<String>>> {
        let value = (name == "api-key").then(|| "sk-live-0123456789".to_owned());
        Box::pin(async move { Ok(value) })
    }
}

fn engine(recorder: Arc<Recorder>) -> Engine {
    Engine::start_with(
        &EngineConfig {
            // The op layer in this process; the script API through engine hosts is covered
            // by the daemon tests in capabilities.rs.
            isolation: Isolation::Thread,
            workers: 1,
            ..Default::default()
        },
        recorder,
    )
    .unwrap()
}

#[tokio::test]
async fn publish_sends_as_the_runs_tenant_with_numbered_messages() {
    let recorder = Arc::new(Recorder::default());
    let engine = engine(recorder.clone());
    let source = r#"export default async (event, ctx) => {
        const a = await ctx.publish("order.shipped", { id: 1 }, { headers: { "x-reason": "test" } });
        const b = await ctx.publish("order.billed", null);
        return [a.subject, b.subject];
    }"#;
    let mut r = run(source, json!({}));
    r.job = "job-7".into();
    r.depth = 2;
    r.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let v = value(engine.run(r).await);
    assert_eq!(
        v,
        json!(["events.acme.order.shipped", "events.acme.order.billed"])
    );
    let published = recorder.published.lock().unwrap();
    assert_eq!(published.len(), 2);
    let (call, first) = &published[0];
    assert_eq!(
        (call.tenant.as_str(), call.job.as_str(), call.depth),
        ("acme", "job-7", 2)
    );
    assert!(call.traceparent.is_some());
    assert_eq!(first.data, r#"{"id":1}"#);
    assert_eq!(
        first.headers,
        vec![("x-reason".to_owned(), "test".to_owned())]
    );
    assert_eq!((first.sequence, published[1].1.sequence), (1, 2));
}

#[tokio::test]
async fn publish_refuses_escapes_reserved_headers_and_runaway_chains() {
    let recorder = Arc::new(Recorder::default());
    let engine = engine(recorder.clone());
    let attempt = |call: &str| {
        format!(
            "export default async (e, ctx) => {{
                try {{ await {call}; return 'published'; }}
                catch (e) {{ return e.name + ': ' + e.message; }}
            }}"
        )
    };
    for (call, expected) in [
        ("ctx.publish('order.*', {})", "TypeError"),
        ("ctx.publish('>', {})", "TypeError"),
        ("ctx.publish('a..b', {})", "TypeError"),
        ("ctx.publish('', {})", "TypeError"),
        (
            "ctx.publish('x', {}, { headers: { 'Nats-Msg-Id': 'forged' } })",
            "TypeError",
        ),
        (
            "ctx.publish('x', {}, { headers: { traceparent: 'x' } })",
            "TypeError",
        ),
        (
            "ctx.publish('x', {}, { headers: { 'x-a': 'v\\r\\nNats-Msg-Id: forged' } })",
            "TypeError",
        ),
        (
            "ctx.publish('x', {}, { headers: { 'bad name': 'v' } })",
            "TypeError",
        ),
        ("ctx.publish('x', 'y'.repeat(300 * 1024))", "LimitExceeded"),
    ] {
        let v = value(engine.run(run(&attempt(call), json!({}))).await);
        assert!(v.as_str().unwrap().starts_with(expected), "{call}: {v}");
    }
    let mut deep = run(&attempt("ctx.publish('x', 1)"), json!({}));
    deep.depth = CapabilitiesConfig::default().publish.max_chain_depth;
    let v = value(engine.run(deep).await);
    assert!(v.as_str().unwrap().contains("chains stop at"), "{v}");
    assert!(recorder.published.lock().unwrap().is_empty());

    let many = "export default async (e, ctx) => {
        let n = 0;
        try { for (;;) { await ctx.publish('tick', n); n++; } }
        catch (e) { return [n, e.name]; }
    }";
    let v = value(engine.run(run(many, json!({}))).await);
    assert_eq!(v, json!([100, "LimitExceeded"]));
}

#[tokio::test]
async fn kv_round_trips_json_and_checks_sizes() {
    let recorder = Arc::new(Recorder::default());
    let engine = engine(recorder);
    let source = r#"export default async (e, ctx) => {
        await ctx.kv.set("user:1", { name: "Ada", tags: ["x"] });
        await ctx.kv.set("user:2", 2);
        await ctx.kv.set("other", true);
        const got = await ctx.kv.get("user:1");
        const missing = await ctx.kv.get("nope");
        const keys = await ctx.kv.list("user:");
        const deleted = [await ctx.kv.delete("user:2"), await ctx.kv.delete("user:2")];
        const errors = [];
        for (const f of [
            () => ctx.kv.set("big", "x".repeat(70 * 1024)),
            () => ctx.kv.set("", 1),
            () => ctx.kv.set("k", undefined),
            () => ctx.kv.get(42),
        ]) {
            try { await f(); errors.push("stored"); } catch (e) { errors.push(e.name); }
        }
        return { got, missing: missing === undefined, keys, deleted, errors };
    }"#;
    let v = value(engine.run(run(source, json!({}))).await);
    assert_eq!(
        v,
        json!({
            "got": { "name": "Ada", "tags": ["x"] },
            "missing": true,
            "keys": ["user:1", "user:2"],
            "deleted": [true, false],
            "errors": ["LimitExceeded", "TypeError", "TypeError", "TypeError"],
        })
    );
}

#[tokio::test]
async fn secrets_read_by_a_run_are_kept_out_of_its_record() {
    let engine = engine(Arc::new(Recorder::default()));
    let source = r#"export default async (e, ctx) => {
        const key = await ctx.secrets.get("api-key");
        console.log("using", key);
        if (e.fail) throw new Error("bad key " + key);
        return { key, none: await ctx.secrets.get("nope") ?? "absent" };
    }"#;
    let result = engine.run(run(source, json!({}))).await;
    assert_eq!(result.logs[0].message, "using [secret]");
    assert_eq!(
        result.outcome.unwrap(),
        json!({ "key": "[secret]", "none": "absent" })
    );
    let failed = engine.run(run(source, json!({ "fail": true }))).await;
    let f = failed.outcome.unwrap_err();
    assert!(!f.message.contains("sk-live"), "{}", f.message);
    assert!(!format!("{:?}", f.stack).contains("sk-live"));
    assert!(!failed.logs.iter().any(|l| l.message.contains("sk-live")));
}

#[tokio::test]
async fn a_call_that_never_answers_ends_at_the_runs_deadline() {
    let engine = engine(Arc::new(Recorder::default()));
    let mut r = run(
        "export default async () => { const r = await fetch('https://example.com'); return r.status; }",
        json!({}),
    );
    r.limits.timeout = Duration::from_millis(300);
    let start = Instant::now();
    let result = engine.run(r).await;
    let f = result.outcome.unwrap_err();
    assert_eq!(f.kind, FailureKind::Timeout, "{f}");
    assert!(start.elapsed() < Duration::from_secs(5));
    common::still_serves(&engine).await;
}

#[tokio::test]
async fn without_a_daemon_the_api_says_so() {
    let engine = common::engine();
    let source = r#"export default async (e, ctx) => {
        const out = [];
        for (const f of [() => fetch("https://example.com"), () => ctx.publish("x", 1),
                         () => ctx.kv.get("k"), () => ctx.secrets.get("s")]) {
            try { await f(); out.push("ok"); } catch (e) { out.push(e.name); }
        }
        return out;
    }"#;
    let mut r = run(source, json!({}));
    r.limits = limits();
    let v = value(engine.run(r).await);
    assert_eq!(
        v,
        json!([
            "NotSupported",
            "NotSupported",
            "NotSupported",
            "NotSupported"
        ])
    );
}
