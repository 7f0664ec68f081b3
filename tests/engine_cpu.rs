//! The CPU-time limit: a run that computes past its CPU time stops as `cpu_limit` (not
//! retried by default), in-process and through engine hosts, long before its wall-clock
//! limit; time spent waiting for the script API does not count against it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use scriptd::caps::{
    Call, CapError, CapResult, Capabilities, CapabilitiesConfig, FetchRequest, FetchResponse, KvOp,
    KvReply, Publish,
};
use scriptd::engine::{Engine, FailureKind, Isolation, Limits};
use serde_json::json;

use common::{run, value};

/// A key-value store that takes 300 ms to answer (and nothing else).
#[derive(Default)]
struct SlowKv {
    config: CapabilitiesConfig,
}

const KV_WAIT: Duration = Duration::from_millis(300);

impl Capabilities for SlowKv {
    fn config(&self) -> &CapabilitiesConfig {
        &self.config
    }
    fn publish(&self, _: Call, _: Publish) -> BoxFuture<'static, CapResult<String>> {
        Box::pin(async { Err(CapError::failed("no publish here")) })
    }
    fn kv(&self, _: Call, _: KvOp) -> BoxFuture<'static, CapResult<KvReply>> {
        Box::pin(async {
            tokio::time::sleep(KV_WAIT).await;
            Ok(KvReply::Value(None))
        })
    }
    fn fetch(&self, _: Call, _: FetchRequest) -> BoxFuture<'static, CapResult<FetchResponse>> {
        Box::pin(async { Err(CapError::failed("no fetch here")) })
    }
    fn secret(&self, _: Call, _: String) -> BoxFuture<'static, CapResult<Option<String>>> {
        Box::pin(async { Ok(None) })
    }
}

fn engine(isolation: Isolation) -> Engine {
    common::engine_in(isolation, Arc::new(SlowKv::default()))
}

fn limits(cpu_time: Duration) -> Limits {
    Limits {
        timeout: Duration::from_secs(10),
        cpu_time,
        ..Limits::default()
    }
}

async fn computing_stops_at_its_cpu_time(engine: &Engine) {
    assert!(engine.wait_ready(Duration::from_secs(30)).await);
    let mut busy = run("export default () => { for (;;) {} }", json!({}));
    busy.limits = limits(Duration::from_millis(300));
    let started = Instant::now();
    let result = engine.run(busy).await;
    let took = started.elapsed();
    let f = result.outcome.unwrap_err();
    assert_eq!(f.kind, FailureKind::CpuLimit, "{f}");
    assert!(!f.retryable, "not retried by default");
    assert!(f.message.contains("300ms"), "{f}");
    assert!(took < Duration::from_secs(2), "stopped after {took:?}");
    println!("busy loop, cpu_time 300ms: cpu_limit after {took:.2?}");
    let next = engine
        .run(run("export default () => 'next'", json!({})))
        .await;
    assert_eq!(value(next), json!("next"));
}

async fn waiting_does_not_count(engine: &Engine) {
    assert!(engine.wait_ready(Duration::from_secs(30)).await);
    let mut waiting = run(
        "export default async (e, ctx) => {
           for (let i = 0; i < 4; i++) await ctx.kv.get('k');
           return 'waited';
         }",
        json!({}),
    );
    waiting.limits = limits(Duration::from_millis(200));
    let started = Instant::now();
    let result = engine.run(waiting).await;
    assert_eq!(value(result), json!("waited"));
    assert!(started.elapsed() >= 4 * KV_WAIT, "it did wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_computing_stops_at_its_cpu_time() {
    computing_stops_at_its_cpu_time(&engine(Isolation::Thread)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_host_computing_stops_at_its_cpu_time() {
    computing_stops_at_its_cpu_time(&engine(Isolation::Process)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_waiting_for_the_script_api_does_not_count() {
    waiting_does_not_count(&engine(Isolation::Thread)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_host_waiting_for_the_script_api_does_not_count() {
    waiting_does_not_count(&engine(Isolation::Process)).await;
}
