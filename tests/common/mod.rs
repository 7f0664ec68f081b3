//! Helpers shared by the engine tests: a one-worker engine and runs built from inline sources.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use scriptd::engine::{
    Engine, EngineConfig, FailureKind, HostsConfig, Isolation, Limits, RunResult, ScriptRun,
};
use scriptd::units::ByteSize;

/// One worker whose scripts reach `caps`: on a thread of this process, or in one engine
/// host (this package's `scriptd`, seccomp on) with `Isolation::Process`.
pub fn engine_in(isolation: Isolation, caps: scriptd::engine::SharedCapabilities) -> Engine {
    Engine::start_with(
        &EngineConfig {
            isolation,
            workers: 1,
            hosts: HostsConfig {
                count: 1,
                binary: env!("CARGO_BIN_EXE_scriptd").into(),
                ..HostsConfig::default()
            },
            ..EngineConfig::default()
        },
        caps,
    )
    .expect("engine starts")
}

/// One worker, so consecutive runs share a thread (and can share a warm isolate).
pub fn engine() -> Engine {
    engine_with(1)
}

pub fn engine_with(workers: usize) -> Engine {
    Engine::start(&EngineConfig {
        workers,
        ..Default::default()
    })
    .expect("engine starts")
}

pub fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(20),
        heap: ByteSize::mib(16),
        ..Limits::default()
    }
}

pub fn run(source: &str, event: serde_json::Value) -> ScriptRun {
    ScriptRun::new(
        "acme",
        "script",
        scriptd::domain::Version::FIRST,
        Arc::<str>::from(source),
        &event,
        limits(),
    )
}

pub fn failure_kind(result: &RunResult) -> FailureKind {
    match &result.outcome {
        Ok(v) => panic!("expected a failure, the run returned {v}"),
        Err(f) => f.kind,
    }
}

pub fn value(result: RunResult) -> serde_json::Value {
    match result.outcome {
        Ok(v) => v,
        Err(f) => panic!("expected a result, the run failed: {f} {:?}", f.stack),
    }
}

pub const TRIVIAL: &str = "export default (event) => ({ echo: event })";

/// A trivial run on the same engine succeeds: the engine (and its thread) survived.
pub async fn still_serves(engine: &Engine) {
    let mut r = run(TRIVIAL, serde_json::json!({ "after": true }));
    r.script = "trivial".into();
    let v = value(engine.run(r).await);
    assert_eq!(v, serde_json::json!({ "echo": { "after": true } }));
}
