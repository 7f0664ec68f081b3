//! The heap limit against allocation loops: arrays, typed arrays, Maps and Sets, strings
//! and objects grown without end stop as `heap_limit` long before the wall-clock limit, in
//! process and through an engine host, and the next run succeeds.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use scriptd::engine::{Engine, FailureKind, Isolation, Limits};
use serde_json::json;

use common::{run, value};

const TIMEOUT: Duration = Duration::from_secs(10);
/// Well before the timeout: the loops reach 64 MiB within a fraction of a second.
const BOUND: Duration = Duration::from_secs(3);

const BOMBS: &[(&str, &str)] = &[
    (
        "arrays",
        "export default () => { const xs = []; for (;;) xs.push(new Array(100000).fill(xs.length)); }",
    ),
    (
        "typed arrays",
        "export default () => { const xs = []; for (;;) xs.push(new Float64Array(100000)); }",
    ),
    (
        "maps and sets",
        "export default () => { const m = new Map(), s = new Set();
           for (let i = 0; ; i++) { m.set(i, { i }); s.add('k' + i); } }",
    ),
    (
        "strings",
        "export default () => { const xs = []; for (let i = 0; ; i++) xs.push('abcdefgh'.repeat(1000) + i); }",
    ),
    (
        "objects",
        "export default () => { let o = null; for (let i = 0; ; i++) o = { i, next: o, pad: [i, i, i, i] }; }",
    ),
];

fn engine(isolation: Isolation) -> Engine {
    common::engine_in(
        isolation,
        Arc::new(scriptd::caps::NoCapabilities::default()),
    )
}

async fn bombs_stop_at_the_heap_limit(engine: &Engine, mode: &str) {
    assert!(engine.wait_ready(Duration::from_secs(30)).await);
    for (name, source) in BOMBS {
        let mut bomb = run(source, json!({}));
        bomb.limits = Limits {
            timeout: TIMEOUT,
            cpu_time: TIMEOUT,
            ..Limits::default()
        };
        let started = Instant::now();
        let result = engine.run(bomb).await;
        let took = started.elapsed();
        let f = result.outcome.expect_err(name);
        assert_eq!(f.kind, FailureKind::HeapLimit, "{mode}, {name}: {f}");
        assert!(took < BOUND, "{mode}, {name}: stopped after {took:?}");
        println!("{mode}, {name}: heap_limit after {took:.2?}");
        let next = engine
            .run(run("export default () => 'next'", json!({})))
            .await;
        assert_eq!(value(next), json!("next"), "{mode}, after {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_loops_stop_at_the_heap_limit_in_process() {
    bombs_stop_at_the_heap_limit(&engine(Isolation::Thread), "in process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_loops_stop_at_the_heap_limit_through_a_host() {
    bombs_stop_at_the_heap_limit(&engine(Isolation::Process), "through a host").await;
}
