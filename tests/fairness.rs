//! Tenants share a replica fairly: one tenant's backlog does not hold back another tenant's
//! job, and a tenant's cap bounds how many of its runs execute at once.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::{busy_script, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

/// (tenant, start, end) of every successful run.
async fn run_spans(env: &TestEnv) -> Vec<(String, f64, f64)> {
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    client
        .query(
            "SELECT tenant, extract(epoch FROM started_at)::float8 * 1000, duration_ms
             FROM runs WHERE status = 'ok'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let start: f64 = r.get(1);
            let took: f64 = r.get(2);
            (r.get(0), start, start + took)
        })
        .collect()
}

/// The most runs of `tenant` that were executing at the same instant.
fn most_at_once(spans: &[(String, f64, f64)], tenant: &str) -> usize {
    let mut edges: Vec<(f64, i32)> = spans
        .iter()
        .filter(|s| s.0 == tenant)
        .flat_map(|s| [(s.1, 1), (s.2, -1)])
        .collect();
    // Ends before starts at the same instant: back-to-back runs do not overlap.
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0, 0);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    most as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_backlog_does_not_hold_back_another_tenants_job() {
    let env = TestEnv::new().await;
    const BACKLOG: usize = 1500;
    env.deploy("noisy", "busy", &busy_script(4, "1"), &["work"])
        .await;
    env.deploy("quiet", "one", "export default () => 1", &["ping"])
        .await;
    for i in 0..BACKLOG {
        env.publish("noisy", "work", format!("{{\"i\":{i}}}")).await;
    }
    let daemon = env.start_daemon();
    // Every noisy event is fanned out (run, or queued as a job) before the quiet tenant's
    // event arrives.
    let stats = daemon.stats.clone();
    env.wait_until(WAIT, "the backlog to be fanned out", || {
        let stats = stats.clone();
        async move { stats.fanout.settled.load(Ordering::Relaxed) >= BACKLOG as u64 }
    })
    .await;
    let published_at = chrono::Utc::now();
    let published = Instant::now();
    env.publish("quiet", "ping", "{}").await;
    let runs = env
        .wait_for_runs(WAIT, |runs| runs.iter().any(|r| r.tenant == "quiet"))
        .await;
    let waited = published.elapsed();
    let quiet = runs.iter().find(|r| r.tenant == "quiet").unwrap();
    let noisy: Vec<_> = runs.iter().filter(|r| r.tenant == "noisy").collect();
    // How far the noisy tenant had got when the quiet event came depends on how fast its
    // runs went while the backlog was fanned out; what counts is how many of the jobs
    // still queued then went before the quiet one.
    let queued = BACKLOG - noisy.iter().filter(|r| r.started_at < published_at).count();
    let ahead = noisy
        .iter()
        .filter(|r| r.started_at >= published_at && r.started_at < quiet.started_at)
        .count();
    println!(
        "quiet job done {waited:?} after its event; {ahead} of the {queued} noisy jobs still \
         queued then started before it"
    );
    assert!(
        ahead < queued / 2,
        "the quiet tenant's job waited for {ahead} of the noisy tenant's {queued} queued jobs"
    );
    // Runs that could not start soon were queued in the noisy tenant's lane: that is what
    // let the quiet tenant's event through.
    let (direct, overflowed) = (
        stats.fanout.direct.load(Ordering::Relaxed),
        stats.fanout.overflowed.load(Ordering::Relaxed),
    );
    println!("{direct} runs direct, {overflowed} queued in the lane");
    assert!(
        direct > 0 && overflowed > 0,
        "{direct} direct, {overflowed} queued"
    );
    env.wait_for_runs(WAIT, |runs| runs.len() > BACKLOG).await;
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_right_behind_another_tenants_flood_is_not_held_back() {
    let env = TestEnv::new().await;
    const FLOOD: usize = 1500;
    env.deploy("noisy", "busy", &busy_script(4, "1"), &["work"])
        .await;
    env.deploy("quiet", "one", "export default () => 1", &["ping"])
        .await;
    // The quiet tenant's event stands right behind the whole flood in the events stream.
    for i in 0..FLOOD {
        env.publish("noisy", "work", format!("{{\"i\":{i}}}")).await;
    }
    env.publish("quiet", "ping", "{}").await;
    let daemon = env.start_daemon();
    let runs = env
        .wait_for_runs(WAIT, |runs| runs.iter().any(|r| r.tenant == "quiet"))
        .await;
    let quiet = runs.iter().find(|r| r.tenant == "quiet").unwrap();
    let noisy_before = runs
        .iter()
        .filter(|r| r.tenant == "noisy" && r.started_at < quiet.started_at)
        .count();
    println!("{noisy_before} of {FLOOD} noisy runs started before the quiet one");
    // Its own lane delivers it at once; it waits for an engine slot behind at most the
    // noisy tenant's cap of runs, plus what started while the lanes were being opened.
    assert!(
        noisy_before < 50,
        "the quiet tenant's event waited for {noisy_before} of the noisy tenant's {FLOOD} events"
    );
    env.wait_for_runs(WAIT, |runs| runs.len() > FLOOD).await;
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_cap_bounds_its_runs_at_once() {
    let env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    settings.tenants.concurrent_runs.insert("capped".into(), 1);
    let busy = busy_script(20, "1");
    env.deploy("capped", "busy", &busy, &["work"]).await;
    env.deploy("free", "busy", &busy, &["work"]).await;
    // The uncapped tenant has more to do, so it has both engine workers at the end.
    for i in 0..60 {
        if i < 30 {
            env.publish("capped", "work", format!("{{\"i\":{i}}}"))
                .await;
        }
        env.publish("free", "work", format!("{{\"i\":{i}}}")).await;
    }
    let daemon = env.start_daemon_with(settings);
    env.wait_for_runs(WAIT, |runs| {
        runs.iter().filter(|r| r.status == "ok").count() == 90
    })
    .await;
    let spans = run_spans(&env).await;
    let (capped, free) = (most_at_once(&spans, "capped"), most_at_once(&spans, "free"));
    println!("most runs at once: capped {capped}, free {free}");
    assert_eq!(
        capped, 1,
        "the tenant capped at 1 had {capped} runs at once"
    );
    // The measure can see overlap: the uncapped tenant uses both engine workers.
    assert!(free >= 2, "the uncapped tenant never ran two at once");
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_tenant_without_scripts_still_get_a_lane() {
    let env = TestEnv::new().await;
    // A job queued for a tenant that has no script (deleted, or a replay of an old dead
    // letter): no lane opens for it from the script index, only from the queued jobs.
    let job = scriptd::pipeline::job::Job {
        id: format!("{}-orphan-1", env.id),
        tenant: "gone".into(),
        script: "old".into(),
        trigger: scriptd::domain::Trigger::Replay,
        subject: None,
        event_id: None,
        event: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        version: None,
        scheduled_at: None,
        input_ref: None,
        catch_up: false,
    };
    scriptd::bus::ensure_streams(&env.js, &env.settings.nats)
        .await
        .unwrap();
    env.js
        .publish(
            env.settings.nats.job_subject("gone", "old"),
            serde_json::to_vec(&job).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let daemon = env.start_daemon();
    let runs = env.wait_for_runs(WAIT, |runs| !runs.is_empty()).await;
    assert_eq!(
        (runs[0].tenant.as_str(), runs[0].status.as_str()),
        ("gone", "skipped")
    );
    daemon.shutdown().await;
    env.cleanup().await;
}
