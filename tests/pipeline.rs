//! The event pipeline end to end on real NATS JetStream and PostgreSQL: fan-out to the
//! tenant's matching scripts, retries with backoff, dead letters, live deploys, shutdown.
//! Every test runs twice: with first attempts run straight from the fan-out (the default)
//! and with direct runs off, every run a job in its tenant's lane.

mod support;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use scriptd::retry::RetryOverrides;
use support::{busy_script, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

/// `name::direct_runs` and `name::jobs_only` run `name(true)` and `name(false)`.
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn direct_runs() {
                super::$name(true).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn jobs_only() {
                super::$name(false).await
            }
        }
    )*};
}

on_both_paths!(
    an_event_runs_the_tenants_matching_scripts_only,
    first_attempts_run_in_the_fan_out_or_as_jobs_and_retries_as_jobs,
    a_script_that_fails_twice_is_retried_with_growing_delays,
    a_script_that_always_throws_is_dead_lettered_with_everything,
    non_retryable_failures_go_straight_to_the_dead_letters,
    a_deploy_changes_the_next_event_without_restart,
    graceful_shutdown_loses_nothing,
);

/// A daemon in this world, with direct runs on or off.
fn start(env: &TestEnv, direct: bool) -> support::RunningDaemon {
    let mut settings = env.settings.clone();
    settings.nats.direct_runs = direct;
    env.start_daemon_with(settings)
}

/// What the fan-out did: first attempts it ran itself, first attempts it queued because
/// no engine slot came within `nats.direct_wait` (likelier on a loaded machine), and jobs
/// it published (those, and retries of its own runs).
fn paths(daemon: &support::RunningDaemon) -> (u64, u64, u64) {
    let fanout = &daemon.stats.fanout;
    (
        fanout.direct.load(Ordering::Relaxed),
        fanout.overflowed.load(Ordering::Relaxed),
        fanout.jobs.load(Ordering::Relaxed),
    )
}

/// With direct runs, `first` first attempts ran in the fan-out or overflowed into jobs, and
/// the jobs published are the overflows plus `retried` retries, less the retries of
/// overflowed ones (those retry in their lane without a new job). With direct runs off,
/// every first attempt is a job of its own and the fan-out runs nothing.
fn assert_paths(daemon: &support::RunningDaemon, direct: bool, first: u64, retried: u64) {
    let (ran, overflowed, jobs) = paths(daemon);
    let shown = format!(
        "(direct runs, overflowed, jobs published) = {:?}",
        (ran, overflowed, jobs)
    );
    if direct {
        assert_eq!(ran + overflowed, first, "{shown}");
        assert!((retried..=retried + overflowed).contains(&jobs), "{shown}");
    } else {
        assert_eq!((ran, overflowed, jobs), (0, 0, first), "{shown}");
    }
}

async fn an_event_runs_the_tenants_matching_scripts_only(direct: bool) {
    let env = TestEnv::new().await;
    let echo = "export default (event, ctx) => ({ script: ctx.script, type: event.type, data: event.data })";
    env.deploy("acme", "exact", echo, &["order.created"]).await;
    env.deploy("acme", "star", echo, &["order.*"]).await;
    env.deploy("acme", "deep", echo, &["order.>"]).await;
    env.deploy("acme", "other-type", echo, &["user.*"]).await;
    env.deploy("globex", "same-pattern", echo, &["order.created"])
        .await;
    let daemon = start(&env, direct);

    env.publish("acme", "order.created", r#"{"id": 1}"#).await;
    env.publish("acme", "order.created.v2", r#"{"id": 2}"#)
        .await;
    env.wait_for_runs(WAIT, |runs| {
        runs.iter().filter(|r| r.status == "ok").count() >= 4
    })
    .await;
    env.wait_idle(WAIT).await;
    let runs = env.runs().await;
    let mut ran: Vec<(String, String)> = runs
        .iter()
        .map(|r| {
            (
                r.script.clone(),
                r.subject
                    .clone()
                    .unwrap()
                    .rsplit_once(".events.")
                    .unwrap()
                    .1
                    .to_owned(),
            )
        })
        .collect();
    ran.sort();
    assert_eq!(
        ran,
        [
            ("deep".to_string(), "acme.order.created".to_string()),
            ("deep".to_string(), "acme.order.created.v2".to_string()),
            ("exact".to_string(), "acme.order.created".to_string()),
            ("star".to_string(), "acme.order.created".to_string()),
        ]
    );
    assert!(runs.iter().all(|r| r.tenant == "acme" && r.attempt == 1));
    // Each ran straight from the fan-out, without a job, or as a job of its own.
    assert_paths(&daemon, direct, 4, 0);
    daemon.shutdown().await;
    env.cleanup().await;
}

async fn first_attempts_run_in_the_fan_out_or_as_jobs_and_retries_as_jobs(direct: bool) {
    let env = TestEnv::new().await;
    let flaky = "export default (event, ctx) => { if (ctx.attempt < 2) throw new Error('once'); return 1; }";
    env.deploy("acme", "flaky", flaky, &["pay.*"]).await;
    env.deploy("acme", "fine", "export default () => 2", &["pay.*"])
        .await;
    let daemon = start(&env, direct);
    for i in 0..5 {
        env.publish("acme", "pay.in", format!("{{\"i\":{i}}}"))
            .await;
    }
    env.wait_for_runs(WAIT, |runs| {
        runs.iter().filter(|r| r.status == "ok").count() == 10
    })
    .await;
    env.wait_idle(WAIT).await;
    let runs = env.runs().await;
    assert_eq!(
        runs.len(),
        15,
        "5 ok + 5 failed first attempts + 5 ok: {runs:#?}"
    );
    // Ten first attempts; with direct runs, the five that failed come back as jobs.
    assert_paths(&daemon, direct, 10, 5);
    daemon.shutdown().await;
    env.cleanup().await;
}

async fn a_script_that_fails_twice_is_retried_with_growing_delays(direct: bool) {
    let env = TestEnv::new().await;
    let flaky = "export default (event, ctx) => { if (ctx.attempt < 3) throw new Error('not yet ' + ctx.attempt); return 'third time'; }";
    env.deploy_with(
        "acme",
        "flaky",
        flaky,
        &["pay.*"],
        Default::default(),
        RetryOverrides {
            max_attempts: Some(5),
            initial: Some(Duration::from_millis(200)),
            multiplier: Some(3.0),
            ..Default::default()
        },
    )
    .await;
    let daemon = start(&env, direct);
    env.publish("acme", "pay.in", "{}").await;
    let runs = env
        .wait_for_runs(WAIT, |runs| runs.iter().any(|r| r.status == "ok"))
        .await;
    let attempts: Vec<(i32, &str)> = runs
        .iter()
        .map(|r| (r.attempt, r.status.as_str()))
        .collect();
    assert_eq!(attempts, [(1, "retrying"), (2, "retrying"), (3, "ok")]);
    assert!(runs.iter().all(|r| r.job_id == runs[0].job_id));
    let first_gap = runs[1].started_at - runs[0].started_at;
    let second_gap = runs[2].started_at - runs[1].started_at;
    // Delays of 200 ms then 600 ms (no randomisation): the order, and the floor, must hold.
    assert!(first_gap.num_milliseconds() >= 200, "{first_gap}");
    assert!(second_gap > first_gap, "{first_gap} then {second_gap}");
    assert!(second_gap.num_milliseconds() >= 600, "{second_gap}");
    env.wait_idle(WAIT).await;
    assert_eq!(env.runs().await.len(), 3);
    assert!(env.dead_letters().await.is_empty());
    // The retries went through one job in the lane; the first attempt ran in the fan-out
    // or in that job.
    assert_paths(&daemon, direct, 1, 1);
    daemon.shutdown().await;
    env.cleanup().await;
}

async fn a_script_that_always_throws_is_dead_lettered_with_everything(direct: bool) {
    let env = TestEnv::new().await;
    let version = env
        .deploy(
            "acme",
            "broken",
            "export default () => { throw new TypeError('cannot charge'); }",
            &["pay.*"],
        )
        .await;
    let daemon = start(&env, direct);
    env.publish("acme", "pay.in", r#"{"amount": 42}"#).await;
    let runs = env
        .wait_for_runs(WAIT, |runs| {
            runs.iter().any(|r| r.status == "dead_lettered")
        })
        .await;
    env.wait_idle(WAIT).await;
    assert_eq!(env.runs().await.len(), 3, "max_attempts is 3: {runs:#?}");
    let letters = env.dead_letters().await;
    assert_eq!(letters.len(), 1);
    let (headers, letter) = &letters[0];
    assert_eq!(letter["tenant"], "acme");
    assert_eq!(letter["script"], "broken");
    assert_eq!(letter["script_version"], version);
    assert_eq!(letter["attempts"], 3);
    assert_eq!(letter["failure"]["kind"], "exception");
    assert!(letter["failure"]["message"]
        .as_str()
        .unwrap()
        .contains("cannot charge"));
    assert!(letter["failure"]["stack"]
        .as_str()
        .unwrap()
        .contains("broken@v1.js"));
    assert_eq!(letter["job"]["event"]["data"]["amount"], 42);
    assert_eq!(letter["job_id"], runs[0].job_id.as_str());
    let first: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(letter["first_attempt_at"].clone()).unwrap();
    let last: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(letter["last_attempt_at"].clone()).unwrap();
    assert!(first < last, "{first} {last}");
    assert_eq!(
        headers.get("Scriptd-Failure-Kind").map(|v| v.as_str()),
        Some("exception")
    );
    daemon.shutdown().await;
    env.cleanup().await;
}

async fn non_retryable_failures_go_straight_to_the_dead_letters(direct: bool) {
    let env = TestEnv::new().await;
    env.deploy("acme", "bigint", "export default () => 10n", &["x"])
        .await;
    let daemon = start(&env, direct);
    env.publish("acme", "x", "{}").await;
    env.wait_for_runs(WAIT, |runs| {
        runs.iter().any(|r| r.status == "dead_lettered")
    })
    .await;
    env.wait_idle(WAIT).await;
    let runs = env.runs().await;
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].failure_kind.as_deref(),
        Some("result_not_serialisable")
    );
    daemon.shutdown().await;
    env.cleanup().await;
}

async fn a_deploy_changes_the_next_event_without_restart(direct: bool) {
    let env = TestEnv::new().await;
    env.deploy("acme", "greeter", "export default () => 'v1'", &["hello"])
        .await;
    let daemon = start(&env, direct);
    env.publish("acme", "hello", "{}").await;
    env.wait_for_runs(WAIT, |runs| runs.len() == 1).await;
    let v2 = env
        .deploy("acme", "greeter", "export default () => 'v2'", &["hello"])
        .await;
    assert_eq!(v2, 2);
    // The notification reaches the daemon within moments; publish until an event meets v2
    // (bounded), which proves the running daemon picked up the deploy.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let before = env.runs().await.len();
        env.publish("acme", "hello", "{}").await;
        let runs = env.wait_for_runs(WAIT, |runs| runs.len() > before).await;
        if runs.last().unwrap().version == Some(2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the deploy did not take effect: {runs:#?}"
        );
    }
    daemon.shutdown().await;
    env.cleanup().await;
}

async fn graceful_shutdown_loses_nothing(direct: bool) {
    let env = TestEnv::new().await;
    let slow = busy_script(50, "e.data.n");
    env.deploy("acme", "slow", &slow, &["work"]).await;
    let daemon = start(&env, direct);
    for n in 0..40 {
        env.publish("acme", "work", format!(r#"{{"n": {n}}}"#))
            .await;
    }
    env.wait_for_runs(WAIT, |runs| !runs.is_empty()).await;
    daemon.shutdown().await;
    let before_restart = env.runs().await;
    assert!(
        before_restart.len() < 40,
        "the stop came after everything had run"
    );
    assert!(before_restart.iter().all(|r| r.status == "ok"));

    let daemon = start(&env, direct);
    let runs = env
        .wait_for_runs(WAIT, |runs| {
            runs.iter().map(|r| &r.job_id).collect::<HashSet<_>>().len() == 40
        })
        .await;
    // Every job ran once: the ones stopped before they started were handed back unrun.
    assert_eq!(runs.len(), 40, "{runs:#?}");
    let mut seen: Vec<i64> = Vec::new();
    for r in &runs {
        assert_eq!(r.status, "ok");
        seen.push(r.job_id.rsplit('-').nth(1).unwrap().parse().unwrap());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 40);
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_run_cut_off_at_the_end_of_the_grace_period_comes_back_after_the_ack_wait() {
    let env = TestEnv::new().await;
    env.deploy("acme", "slow", &busy_script(3_000, "1"), &["work"])
        .await;
    // A run that may go without a claim: a 4 s timeout, up to three of them waiting to
    // start + 5 s, within the 22 s ack wait. The stop comes 1 s into it.
    let mut settings = env.settings.clone();
    settings.daemon.shutdown_grace = Duration::from_secs(1);
    settings.nats.ack_wait = Duration::from_secs(22);
    settings.engine.limits.timeout = Duration::from_secs(4);
    let daemon = env.start_daemon_with(settings.clone());
    env.wait_for_event_lane("acme", WAIT).await;
    env.publish("acme", "work", "{}").await;
    env.wait_until(WAIT, "the direct run to start", || async {
        daemon.stats.fanout.direct.load(Ordering::Relaxed) == 1
    })
    .await;
    let version = env.js.client().server_info().version;
    let unclaimed = daemon.stats.fanout.unclaimed.load(Ordering::Relaxed);
    if scriptd::bus::lanes::counts_deliveries_truly(&version) {
        assert_eq!(unclaimed, 1, "the run went without a claim");
    }
    daemon.shutdown().await;
    let stopped = chrono::Utc::now();
    assert!(env.runs().await.is_empty(), "the run was cut off");
    // The cut-off run goes on in its engine host for a while: the event is not handed
    // back at once (a nak would bring it back after 1 s) but left to come back after the
    // ack wait since its last progress acknowledgement (at most a third of it before the
    // stop), or, claimed, once the claim's lease has ended (31 s).
    let daemon = env.start_daemon_with(settings);
    let runs = env
        .wait_for_runs(Duration::from_secs(60), |runs| !runs.is_empty())
        .await;
    let after = (runs[0].started_at - stopped).to_std().unwrap_or_default();
    assert!(
        after >= Duration::from_secs(5),
        "the event came back {after:?} after the stop"
    );
    assert_eq!(runs.len(), 1);
    daemon.shutdown().await;
    env.cleanup().await;
}

/// PostgreSQL stores no NUL character in text or jsonb. A script that puts one in its
/// result, its logs or its error message still has its run recorded (the character kept
/// as U+FFFD), and the other runs written in the same batch are not held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_a_run_leaves_are_recorded_without_harm() {
    let env = TestEnv::new().await;
    let scripts = [
        (
            "nul-result",
            r#"export default () => ({ "k\u0000": "a\u0000b" })"#,
        ),
        (
            "nul-log",
            r#"export default () => { console.log("x\u0000y"); return 1; }"#,
        ),
        (
            "nul-throw",
            r#"export default () => { throw new Error("e\u0000f"); }"#,
        ),
        ("fine", "export default () => 2"),
    ];
    for (name, source) in scripts {
        env.deploy("acme", name, source, &[name]).await;
    }
    let daemon = env.start_daemon();
    for (name, _) in scripts {
        env.publish("acme", name, "{}").await;
    }
    let runs = env
        .wait_for_runs(WAIT, |runs| {
            scripts
                .iter()
                .all(|(name, _)| runs.iter().any(|r| r.script == *name))
        })
        .await;
    let of = |name: &str| runs.iter().find(|r| r.script == name).unwrap();
    assert_eq!(of("fine").status, "ok");
    assert_eq!(of("nul-result").status, "ok");
    assert_eq!(of("nul-log").status, "ok");
    assert_eq!(of("nul-log").logs[0]["message"], "x\u{fffd}y");
    let thrown = of("nul-throw");
    assert_eq!(thrown.failure_kind.as_deref(), Some("exception"));
    assert!(
        thrown
            .failure_message
            .as_deref()
            .unwrap()
            .contains("e\u{fffd}f"),
        "{:?}",
        thrown.failure_message
    );
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    let result: serde_json::Value = client
        .query_one("SELECT result FROM runs WHERE script = 'nul-result'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(result, serde_json::json!({ "k\u{fffd}": "a\u{fffd}b" }));
    daemon.shutdown().await;
    env.cleanup().await;
}

/// A run queued in its engine worker behind runaways past the moment it had to start by
/// (three of its timeouts) is not started: no record of it, its event comes back, and its
/// job runs once, later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_cannot_start_in_time_comes_back_and_runs_once() {
    let env = TestEnv::new().await;
    env.deploy(
        "acme",
        "spin",
        "export default () => { for (;;) {} }",
        &["spin"],
    )
    .await;
    env.deploy("acme", "quick", "export default () => 7", &["quick"])
        .await;
    // One engine worker, 500 ms timeouts: a run must start within 1.5 s. Five runaways
    // ahead of it hold the worker 2 - 2.5 s. With a 30 s ack wait the quick run, a first
    // delivery, holds no claim (on a nats-server that counts deliveries truly).
    let mut settings = env.settings.clone();
    settings.nats.ack_wait = Duration::from_secs(30);
    settings.engine.hosts.count = 1;
    settings.engine.runs_per_worker = 8;
    settings.engine.limits.timeout = Duration::from_millis(500);
    let daemon = env.start_daemon_with(settings);
    env.wait_for_event_lane("acme", WAIT).await;
    for _ in 0..5 {
        env.publish("acme", "spin", "{}").await;
    }
    env.wait_until(WAIT, "the runaways to be handed to the engine", || async {
        daemon.stats.fanout.direct.load(Ordering::Relaxed) == 5
    })
    .await;
    env.publish("acme", "quick", "{}").await;
    let runs = env
        .wait_for_runs(Duration::from_secs(60), |runs| {
            runs.iter().any(|r| r.script == "quick")
        })
        .await;
    let quick: Vec<_> = runs.iter().filter(|r| r.script == "quick").collect();
    assert_eq!(quick.len(), 1, "{quick:?}");
    assert_eq!(quick[0].status, "ok", "{quick:?}");
    assert!(
        daemon.stats.fanout.returned.load(Ordering::Relaxed) >= 1,
        "the quick run's event was handed back"
    );
    let version = env.js.client().server_info().version;
    if scriptd::bus::lanes::counts_deliveries_truly(&version) {
        assert!(
            daemon.stats.fanout.unclaimed.load(Ordering::Relaxed) >= 6,
            "the first deliveries ran without a claim"
        );
    }
    assert!(
        runs.iter()
            .all(|r| r.failure_kind.as_deref() != Some("not_started")),
        "a run that did not start leaves no record"
    );
    daemon.shutdown().await;
    env.cleanup().await;
}
