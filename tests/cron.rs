//! Cron schedules end to end on real NATS and PostgreSQL: occurrences run once each, also
//! with two daemons; overlap, redeploys, disables, retries and dead letters.

mod support;

use std::time::Duration;

use scriptd::domain::Overlap;
use scriptd::retry::RetryOverrides;
use support::{busy_script, TestEnv};

const WAIT: Duration = Duration::from_secs(30);
const EVERY_SECOND: &str = "* * * * * *";
const RECORD: &str = "export default (event) => ({ scheduledAt: event.scheduledAt, missed: event.missed, type: event.type })";

/// Waits until at least `n` runs with `status` are recorded for schedules.
async fn wait_scheduled(
    env: &TestEnv,
    status: &str,
    n: usize,
) -> Vec<(chrono::DateTime<chrono::Utc>, String)> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let runs = env.scheduled_runs(status).await;
        if runs.len() >= n {
            return runs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} {status} scheduled runs",
            runs.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the schedule until one occurrence is recorded, stops the daemon for 3 s (the
/// schedule misses occurrences), starts it again. Returns the new daemon, the last
/// occurrence before the downtime, the restart time and the count of ok runs then.
async fn run_then_restart_after_downtime(
    env: &TestEnv,
) -> (
    support::RunningDaemon,
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::Utc>,
    usize,
) {
    let daemon = env.start_daemon();
    wait_scheduled(env, "ok", 1).await;
    daemon.shutdown().await;
    let last = env.scheduled_runs("ok").await.last().unwrap().0;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted = chrono::Utc::now();
    let daemon = env.start_daemon();
    let before = env.scheduled_runs("ok").await.len();
    (daemon, last, restarted, before)
}

fn assert_consecutive_seconds(runs: &[(chrono::DateTime<chrono::Utc>, String)]) {
    for pair in runs.windows(2) {
        assert_eq!((pair[1].0 - pair[0].0).num_milliseconds(), 1000, "{runs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_second_schedule_runs_once_a_second() {
    let env = TestEnv::new().await;
    env.deploy_scheduled(
        "tick",
        RECORD,
        EVERY_SECOND,
        Overlap::Skip,
        Default::default(),
    )
    .await;
    let daemon = env.start_daemon();
    let runs = wait_scheduled(&env, "ok", 4).await;
    assert_consecutive_seconds(&runs[..4]);
    let all = env.runs().await;
    assert!(all.iter().all(|r| r.status == "ok"), "{all:#?}");
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_run_each_occurrence_once() {
    let env = TestEnv::new().await;
    env.deploy_scheduled(
        "tick",
        RECORD,
        EVERY_SECOND,
        Overlap::Allow,
        Default::default(),
    )
    .await;
    let a = env.start_daemon();
    let b = env.start_daemon();
    let runs = wait_scheduled(&env, "ok", 4).await;
    a.shutdown().await;
    b.shutdown().await;
    let runs_after = env.scheduled_runs("ok").await;
    let mut ids: Vec<_> = runs_after.iter().map(|r| r.1.clone()).collect();
    ids.dedup();
    assert_eq!(
        ids.len(),
        runs_after.len(),
        "an occurrence ran twice: {runs_after:?}"
    );
    assert_consecutive_seconds(&runs[..4]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_script_under_skip_records_skips_not_overlaps() {
    let env = TestEnv::new().await;
    let slow = busy_script(2500, "1");
    env.deploy_scheduled(
        "slow",
        &slow,
        EVERY_SECOND,
        Overlap::Skip,
        Default::default(),
    )
    .await;
    let daemon = env.start_daemon();
    wait_scheduled(&env, "ok", 2).await;
    let skipped = env.scheduled_runs("skipped").await;
    assert!(!skipped.is_empty(), "no occurrence was skipped");
    let runs = env.runs().await;
    let mut ok: Vec<_> = runs.iter().filter(|r| r.status == "ok").collect();
    ok.sort_by_key(|r| r.started_at);
    for pair in ok.windows(2) {
        assert!(
            pair[1].started_at - pair[0].started_at >= chrono::Duration::milliseconds(2500),
            "two runs overlapped: {pair:#?}"
        );
    }
    assert!(runs
        .iter()
        .filter(|r| r.status == "skipped")
        .all(|r| r.failure_kind.as_deref() == Some("overlap")));
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeploying_or_disabling_a_schedule_takes_effect_without_restart() {
    let env = TestEnv::new().await;
    env.deploy_scheduled(
        "tick",
        RECORD,
        EVERY_SECOND,
        Overlap::Skip,
        Default::default(),
    )
    .await;
    let daemon = env.start_daemon();
    wait_scheduled(&env, "ok", 2).await;
    // Every two seconds from now on: even seconds only.
    env.deploy_scheduled(
        "tick",
        RECORD,
        "*/2 * * * * *",
        Overlap::Skip,
        Default::default(),
    )
    .await;
    let before = env.scheduled_runs("ok").await.len();
    let runs = wait_scheduled(&env, "ok", before + 3).await;
    let last_two = &runs[runs.len() - 2..];
    assert_eq!((last_two[1].0 - last_two[0].0).num_seconds(), 2, "{runs:?}");
    assert!(last_two.iter().all(|r| r.0.timestamp() % 2 == 0));

    env.store.set_enabled("acme", "tick", false).await.unwrap();
    // Absence cannot be awaited: give the schedule time it would need for two more runs.
    let at_disable = env.scheduled_runs("ok").await.len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = env.scheduled_runs("ok").await.len();
    assert!(
        after <= at_disable + 1,
        "still ticking: {at_disable} then {after}"
    );
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_scheduled_run_is_retried_then_dead_lettered() {
    let env = TestEnv::new().await;
    env.deploy_scheduled(
        "broken",
        "export default (e) => { throw new Error('report failed for ' + e.scheduledAt); }",
        "*/3 * * * * *",
        Overlap::Skip,
        RetryOverrides {
            max_attempts: Some(3),
            ..Default::default()
        },
    )
    .await;
    let daemon = env.start_daemon();
    let dead = wait_scheduled(&env, "dead_lettered", 1).await;
    let runs = env.runs().await;
    let of_job: Vec<_> = runs.iter().filter(|r| r.job_id == dead[0].1).collect();
    assert_eq!(
        of_job.iter().map(|r| r.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let letters = env.dead_letters().await;
    assert!(!letters.is_empty());
    assert_eq!(letters[0].1["job"]["trigger"], "schedule");
    assert_eq!(letters[0].1["job"]["event"]["type"], "schedule");
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_occurrences_are_caught_up_once_after_downtime() {
    let env = TestEnv::new().await;
    let logs_missed = "export default (event) => { console.log('missed=' + event.missed); }";
    env.deploy_scheduled(
        "tick",
        logs_missed,
        EVERY_SECOND,
        Overlap::Skip,
        Default::default(),
    )
    .await;
    let (daemon, last, restarted, _) = run_then_restart_after_downtime(&env).await;
    let missed_some = |r: &support::Run| {
        r.logs[0]["message"]
            .as_str()
            .is_some_and(|m| m != "missed=0")
    };
    // The caught-up job is published before the first regular occurrence, but both are
    // queued jobs and the regular one may run first: wait for the caught-up one itself.
    env.wait_for_runs(WAIT, |runs| runs.iter().any(missed_some))
        .await;
    daemon.shutdown().await;
    let runs = env.runs().await;
    let caught_up: Vec<_> = runs.iter().filter(|r| missed_some(r)).collect();
    // Catch-up `none`: one run for all that was missed, the latest missed occurrence,
    // telling the script how many were missed.
    assert_eq!(caught_up.len(), 1, "{runs:#?}");
    let missed: i64 = caught_up[0].logs[0]["message"].as_str().unwrap()["missed=".len()..]
        .parse()
        .unwrap();
    assert!(missed >= 2, "{missed}");
    // The caught-up occurrence is the latest one missed when the new daemon's ticker
    // started (engine hosts start first, so possibly a little after `restarted`); no
    // occurrence between the last run before the downtime and it ran.
    let scheduled = env.scheduled_runs("ok").await;
    let caught_up_at = scheduled
        .iter()
        .find(|r| r.1 == caught_up[0].job_id)
        .unwrap()
        .0;
    assert!(caught_up_at > last && caught_up_at > restarted - chrono::Duration::seconds(1));
    let in_between: Vec<_> = scheduled
        .iter()
        .filter(|r| r.0 > last && r.0 < caught_up_at)
        .collect();
    assert!(
        in_between.is_empty(),
        "only the latest missed occurrence runs: {in_between:?}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_all_runs_every_missed_occurrence() {
    let env = TestEnv::new().await;
    let spec = scriptd::store::ScriptSpec {
        tenant: "acme".into(),
        name: "tick".into(),
        source: "export default () => 1".into(),
        cron: Some(EVERY_SECOND.into()),
        timezone: "UTC".into(),
        catch_up: scriptd::domain::CatchUp::All,
        // With `skip`, a regular occurrence arriving while a caught-up one runs is skipped.
        overlap: Overlap::Allow,
        ..Default::default()
    };
    env.store.deploy(&spec).await.unwrap();
    let (daemon, last, restarted, before) = run_then_restart_after_downtime(&env).await;
    let missed = (restarted - last).num_seconds() as usize;
    wait_scheduled(&env, "ok", before + missed).await;
    daemon.shutdown().await;
    let scheduled = env.scheduled_runs("ok").await;
    let after_last: Vec<_> = scheduled.iter().filter(|r| r.0 > last).cloned().collect();
    assert!(after_last.len() >= missed, "{after_last:?}");
    assert_consecutive_seconds(&after_last);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_one_runs_one_waiting_occurrence_after_the_running_one() {
    let env = TestEnv::new().await;
    let slow = busy_script(2000, "1");
    env.deploy_scheduled(
        "slow",
        &slow,
        EVERY_SECOND,
        Overlap::QueueOne,
        Default::default(),
    )
    .await;
    let daemon = env.start_daemon();
    wait_scheduled(&env, "ok", 3).await;
    daemon.shutdown().await;
    let runs = env.runs().await;
    let mut ok: Vec<_> = runs.iter().filter(|r| r.status == "ok").collect();
    ok.sort_by_key(|r| r.started_at);
    for pair in ok.windows(2) {
        let gap = pair[1].started_at - pair[0].started_at;
        assert!(
            gap >= chrono::Duration::milliseconds(2000),
            "two runs overlapped: {pair:#?}"
        );
        // The queued occurrence starts soon after the running one ends, not at a later tick.
        assert!(
            gap < chrono::Duration::milliseconds(3500),
            "the queued occurrence waited too long: {gap}"
        );
    }
    assert!(
        runs.iter().any(|r| r.status == "skipped"),
        "later occurrences should be skipped"
    );
    env.cleanup().await;
}
