//! The `scriptd` binary as operators run it: two daemons sharing the streams, a daemon
//! killed with SIGKILL in the middle of a run, and deploys from the command line.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::{busy_script, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemon_processes_run_each_job_once() {
    let env = TestEnv::new().await;
    env.deploy(
        "acme",
        "echo",
        "export default (e) => e.data.n",
        &["work.*"],
    )
    .await;
    env.deploy(
        "acme",
        "second",
        "export default (e) => -e.data.n",
        &["work.b"],
    )
    .await;
    let a = env.spawn_daemon();
    let b = env.spawn_daemon();
    for n in 0..60 {
        let kind = if n % 2 == 0 { "a" } else { "b" };
        env.publish("acme", &format!("work.{kind}"), format!(r#"{{"n": {n}}}"#))
            .await;
    }
    // 60 events for `echo`, 30 of them also for `second`.
    let runs = env.wait_for_runs(WAIT, |r| r.len() >= 90).await;
    let jobs: HashSet<_> = runs.iter().map(|r| r.job_id.clone()).collect();
    assert_eq!(jobs.len(), 90);
    assert_eq!(runs.len(), 90, "a job ran twice");
    assert!(runs.iter().all(|r| r.status == "ok" && r.attempt == 1));
    drop((a, b));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_run_leaves_the_job_to_the_next() {
    let env = TestEnv::new().await;
    let slow = busy_script(1500, "'done'");
    env.deploy("acme", "slow", &slow, &["work"]).await;
    let mut first = env.spawn_daemon();
    env.publish("acme", "work", "{}").await;
    // The event's run starts straight from the fan-out: the event is what is held.
    env.wait_until(WAIT, "the event to be taken", || env.events_in_flight_is(1))
        .await;
    first.0.kill().expect("SIGKILL");
    first.0.wait().unwrap();
    assert!(
        env.runs().await.is_empty(),
        "the run finished before the kill"
    );
    let second = env.spawn_daemon();
    let runs = env.wait_for_runs(WAIT, |r| !r.is_empty()).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, "ok");
    drop(second);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_that_does_not_compile_is_refused_at_deploy() {
    let env = TestEnv::new().await;
    let bad = env.write_script("bad.js", "export default function () { return {a: }");
    let out = env
        .daemon_command()
        .args(["scripts", "deploy"])
        .arg(&bad)
        .args(["--tenant", "acme", "--name", "bad", "--on", "x.*"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("syntax") && stderr.contains("SyntaxError"),
        "{stderr}"
    );
    assert!(
        env.store.scripts("acme").await.unwrap().is_empty(),
        "something was stored"
    );

    let good = env.write_script("good.js", "export default () => 1");
    let out = env
        .daemon_command()
        .args(["scripts", "deploy"])
        .arg(&good)
        .args([
            "--tenant",
            "acme",
            "--name",
            "good",
            "--on",
            "x.*",
            "--timeout",
            "2s",
            "--heap",
            "32MiB",
            "--max-attempts",
            "4",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deployed acme/good v1"));
    let stored = env.store.scripts("acme").await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].limits.timeout, Some(Duration::from_secs(2)));
    assert_eq!(stored[0].retry.max_attempts, Some(4));
    let listed = env
        .daemon_command()
        .args(["scripts", "list", "--tenant", "acme"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("good"));
    env.cleanup().await;
}
