//! Hard deadlines through engine hosts: scripts that spend their time inside the engine's
//! native code (sorts, JSON, regular expressions, string and array building) end within
//! their timeout plus `hosts.kill_grace`, as `timeout` (or `heap_limit` when memory runs
//! out first); a host killed to stop one is replaced, and a run that waited behind it runs
//! on without using an attempt. `scripts test` runs its script in a host of its own and
//! gets the same bound.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use scriptd::engine::{Engine, EngineConfig, FailureKind, HostsConfig, Isolation, Limits};
use serde_json::json;

use common::{run, value};

const TIMEOUT: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(1);
/// What the bound allows beyond timeout and grace: the deadline check's period, the kill,
/// and the replacement noticed on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// The default limits (64 MiB of heap) with a short timeout.
fn limits() -> Limits {
    Limits {
        timeout: TIMEOUT,
        ..Limits::default()
    }
}

fn hosts(workers_per_host: usize) -> Engine {
    Engine::start_with(
        &EngineConfig {
            isolation: Isolation::Process,
            hosts: HostsConfig {
                count: 1,
                workers_per_host,
                binary: env!("CARGO_BIN_EXE_scriptd").into(),
                kill_grace: GRACE,
                ..HostsConfig::default()
            },
            ..EngineConfig::default()
        },
        Arc::new(scriptd::caps::NoCapabilities::default()),
    )
    .expect("hosts start")
}

/// Scripts that keep the engine busy in native code, by name.
const HOGS: &[(&str, &str)] = &[
    (
        "sort strings",
        "export default () => { const a = []; for (let i = 0; i < 300000; i++) a.push(String(Math.random()));
           for (;;) a.slice().sort(); }",
    ),
    (
        "json round trip",
        "export default () => { let o = { a: Array.from({ length: 200000 }, (_, i) => ({ i, s: 'x'.repeat(8) })) };
           for (;;) o = JSON.parse(JSON.stringify(o)); }",
    ),
    (
        "regex backtracking",
        "export default () => /^(a+)+$/.test('a'.repeat(40) + 'b')",
    ),
    (
        "array fill",
        "export default () => { const xs = []; for (;;) xs.push(new Array(100000).fill(xs.length)); }",
    ),
    (
        "string building",
        "export default () => { let s = ''; for (;;) s += 'abcdefgh'.repeat(1000); }",
    ),
    (
        "deep json",
        "export default () => { const o = Array.from({ length: 2000 }, (_, i) => {
             let x = { i }; for (let d = 0; d < 50; d++) x = { x }; return x; });
           for (;;) JSON.stringify(o); }",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_work_past_the_timeout_ends_within_the_grace() {
    let engine = hosts(1);
    assert!(engine.wait_ready(Duration::from_secs(30)).await);
    let mut measured = Vec::new();
    for (name, source) in HOGS {
        let mut hog = run(source, json!({}));
        hog.limits = limits();
        let started = Instant::now();
        let result = engine.run(hog).await;
        let took = started.elapsed();
        let f = result.outcome.expect_err(name);
        assert!(
            matches!(f.kind, FailureKind::Timeout | FailureKind::HeapLimit),
            "{name}: {f}"
        );
        assert!(
            took < TIMEOUT + GRACE + SLACK,
            "{name} ended after {took:?}: {f}"
        );
        measured.push(format!("{name}: {} after {took:.2?}", f.kind));
        let next = engine
            .run(run("export default () => 'next'", json!({})))
            .await;
        assert_eq!(value(next), json!("next"), "after {name}");
    }
    println!("{}", measured.join("\n"));
    println!("hosts killed: {}", engine.stats().host_kills);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_behind_a_killed_one_runs_on_the_replacement() {
    let engine = Arc::new(hosts(1));
    assert!(engine.wait_ready(Duration::from_secs(30)).await);
    let before = engine.host_pids();
    // Sorting a large array of strings without a comparator does not look at the
    // watchdog's flag: the host is killed to stop it.
    let mut hog = run(HOGS[0].1, json!({}));
    hog.limits = limits();
    let hogging = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run(hog).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().in_flight == 0 {
        assert!(Instant::now() < deadline, "the hog never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Placed on the same host (the only one), behind the hog.
    let waiting = engine.run(run("export default (e) => e.n + 1", json!({ "n": 41 })));
    let (waited, hogged) = tokio::join!(waiting, hogging);
    assert_eq!(value(waited), json!(42));
    let f = hogged.unwrap().outcome.unwrap_err();
    assert_eq!(f.kind, FailureKind::Timeout, "{f}");
    let stats = engine.stats();
    if stats.host_kills == 1 {
        assert!(f.message.contains("engine host was killed"), "{f}");
        assert_ne!(engine.host_pids(), before, "a new host took the slot");
    }
    assert_eq!(stats.host_crashes, 0);
}

#[test]
fn scripts_test_gets_the_same_bound_through_its_own_host() {
    let dir = std::env::temp_dir().join(format!("scriptd-deadline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hog.js");
    std::fs::write(&file, HOGS[0].1).unwrap();
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scriptd"))
        .args([
            "scripts",
            "test",
            "--tenant",
            "acme",
            "--timeout",
            "1s",
            "--json",
        ])
        .arg(&file)
        .env("SCRIPTD_ENGINE__HOSTS__KILL_GRACE", "1s")
        .output()
        .expect("scriptd runs");
    let took = started.elapsed();
    std::fs::remove_dir_all(&dir).unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(shown["failure"]["kind"], "timeout", "{shown}");
    assert_eq!(out.status.code(), Some(1), "a failed run is exit code 1");
    // The host's start-up comes on top of the run's bound.
    assert!(
        took < TIMEOUT + GRACE + SLACK + Duration::from_secs(2),
        "took {took:?}"
    );
}
