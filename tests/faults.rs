//! Replicas under load on the real services, as separate `scriptd` processes: one killed
//! with SIGKILL mid-load, a rolling restart of all of them, a NATS restart and a PostgreSQL
//! cut. Once the streams have drained, every (event, script) pair has exactly one
//! successful run and no attempt is recorded twice: attempt claims hold whatever the
//! server redelivers.

mod support;

use std::time::{Duration, Instant};

use support::{Child, TestEnv};

const EVENTS: usize = 10_000;
const WAIT: Duration = Duration::from_secs(180);

/// Jobs with a successful run, and run records in all.
async fn progress(env: &TestEnv) -> (i64, i64) {
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT count(DISTINCT job_id) FILTER (WHERE status = 'ok'), count(*) FROM runs",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn wait_for_ok_jobs(env: &TestEnv, at_least: i64) -> (i64, i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (ok, runs) = progress(env).await;
        if ok >= at_least {
            return (ok, runs);
        }
        assert!(
            Instant::now() < deadline,
            "only {ok} of {at_least} jobs succeeded ({runs} run records)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Messages of `stream` not yet delivered or delivered and not yet acknowledged, over all
/// its consumers.
async fn backlog(env: &TestEnv, stream: String) -> u64 {
    use futures::StreamExt;
    let stream = env.js.get_stream(stream).await.unwrap();
    let mut consumers = stream.consumers();
    let mut left = 0;
    while let Some(info) = consumers.next().await {
        let info = info.expect("consumer info");
        left += info.num_pending + info.num_ack_pending as u64;
    }
    left
}

/// Waits until the events and jobs streams have drained (nothing waiting, nothing handed
/// out), then asserts exactly one ok run per job and no attempt recorded twice.
async fn assert_exactly_once(env: &TestEnv, jobs: usize) {
    let nats = &env.settings.nats;
    env.wait_until(WAIT, "the streams to drain", || async {
        backlog(env, nats.events_stream()).await + backlog(env, nats.jobs_stream()).await == 0
    })
    .await;
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT
               (SELECT count(DISTINCT job_id) FROM runs WHERE status = 'ok'),
               (SELECT count(*) FROM (SELECT job_id FROM runs WHERE status = 'ok'
                                      GROUP BY job_id HAVING count(*) > 1) twice),
               (SELECT count(*) FROM (SELECT job_id, attempt FROM runs
                                      GROUP BY job_id, attempt HAVING count(*) > 1) again)",
            &[],
        )
        .await
        .unwrap();
    let (ok, ok_twice, attempts_twice): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(ok, jobs as i64, "jobs with an ok run");
    assert_eq!(ok_twice, 0, "jobs with more than one ok run");
    assert_eq!(attempts_twice, 0, "attempts recorded more than once");
}

fn replica(env: &TestEnv) -> Child {
    replica_with(env, &[])
}

/// A `scriptd run` replica with one engine host, and settings of its own on top.
fn replica_with(env: &TestEnv, settings: &[(&str, &str)]) -> Child {
    let mut command = env.daemon_command();
    command
        .arg("run")
        .env("SCRIPTD_ENGINE__HOSTS__COUNT", "1")
        .env("SCRIPTD_DAEMON__SHUTDOWN_GRACE", "20s")
        .envs(settings.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    Child(command.spawn().expect("spawn scriptd run"))
}

/// The script every fault test runs: one per `load.*` event of tenant acme.
async fn deploy_counter(env: &TestEnv) {
    env.deploy(
        "acme",
        "count",
        "export default (e) => e.data.n",
        &["load.*"],
    )
    .await;
}

async fn publish_load(env: &TestEnv) {
    publish_retrying(env, 0..EVENTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_lose_nothing_when_one_is_killed_mid_load() {
    let env = TestEnv::new().await;
    deploy_counter(&env).await;
    let mut replicas: Vec<Child> = (0..3).map(|_| replica(&env)).collect();
    let started = Instant::now();
    let publishing = {
        let env = &env;
        async move { publish_load(env).await }
    };
    let killing = async {
        wait_for_ok_jobs(&env, (EVENTS / 5) as i64).await;
        replicas[0].0.kill().expect("SIGKILL");
        replicas[0].0.wait().unwrap();
    };
    tokio::join!(publishing, killing);
    let (ok, runs) = wait_for_ok_jobs(&env, EVENTS as i64).await;
    let duplicates = runs - ok;
    println!(
        "{EVENTS} events, 3 replicas, one SIGKILLed: {ok} jobs ok, {runs} run records \
         ({duplicates} extra), {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(ok, EVENTS as i64, "every event ran");
    // A kill loses the acknowledgements of finished runs and strands claimed attempts;
    // the claims make the first ones acknowledged without running and the second ones
    // taken over once their lease ends.
    assert_exactly_once(&env, EVENTS).await;
    drop(replicas);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing_and_duplicates_nothing() {
    let env = TestEnv::new().await;
    deploy_counter(&env).await;
    let mut replicas: Vec<Child> = (0..3).map(|_| replica(&env)).collect();
    let publishing = {
        let env = &env;
        async move { publish_load(env).await }
    };
    let restarting = async {
        for (i, slot) in replicas.iter_mut().enumerate() {
            wait_for_ok_jobs(&env, ((i + 1) * EVENTS / 5) as i64).await;
            let mut old = std::mem::replace(slot, replica(&env));
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(old.0.id() as i32, libc::SIGTERM) };
            let status = old.0.wait().unwrap();
            assert!(status.success(), "graceful shutdown: {status}");
        }
    };
    tokio::join!(publishing, restarting);
    let (ok, runs) = wait_for_ok_jobs(&env, EVENTS as i64).await;
    println!(
        "{EVENTS} events through a rolling restart of 3 replicas: {ok} jobs ok, {runs} run records"
    );
    assert_eq!(ok, EVENTS as i64);
    // nats-server 2.9 sometimes hands one job to two replicas at once, both as its first
    // delivery (nats-server#4460): only one of them wins the attempt's claim.
    assert_exactly_once(&env, EVENTS).await;
    drop(replicas);
    env.cleanup().await;
}

/// Publishes `range` as events, retrying each until JetStream acknowledges it (the server
/// may be restarting).
async fn publish_retrying(env: &TestEnv, range: std::ops::Range<usize>) {
    let subject = format!("{}.acme.load.item", env.settings.nats.events_prefix);
    for n in range {
        let deadline = Instant::now() + WAIT;
        loop {
            let payload = format!(r#"{{"n": {n}}}"#);
            let acked = match env.js.publish(subject.clone(), payload.into()).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if acked {
                break;
            }
            assert!(Instant::now() < deadline, "event {n} was never accepted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reconnect_after_a_nats_restart_mid_load() {
    const N: usize = 3000;
    let mut nats = support::OwnNats::start();
    let env = TestEnv::with_nats(&nats.url()).await;
    deploy_counter(&env).await;
    let replicas: Vec<Child> = (0..3).map(|_| replica(&env)).collect();
    publish_retrying(&env, 0..N / 2).await;
    wait_for_ok_jobs(&env, (N / 6) as i64).await;
    nats.restart();
    publish_retrying(&env, N / 2..N).await;
    let (ok, runs) = wait_for_ok_jobs(&env, N as i64).await;
    println!("{N} events, NATS restarted mid-load: {ok} jobs ok, {runs} run records");
    assert_eq!(ok, N as i64);
    assert_exactly_once(&env, N).await;
    drop(replicas);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_record_every_run_after_a_database_outage_mid_load() {
    const N: usize = 3000;
    let env = TestEnv::new().await;
    deploy_counter(&env).await;
    let relay = support::Relay::start("127.0.0.1:5432").await;
    let database = env
        .settings
        .database
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    let replicas: Vec<Child> = (0..3)
        .map(|_| replica_with(&env, &[("SCRIPTD_DATABASE__URL", &database)]))
        .collect();
    let publishing = publish_retrying(&env, 0..N);
    let outage = async {
        wait_for_ok_jobs(&env, (N / 5) as i64).await;
        relay.cut();
        tokio::time::sleep(Duration::from_secs(3)).await;
        relay.restore();
    };
    tokio::join!(publishing, outage);
    let (ok, runs) = wait_for_ok_jobs(&env, N as i64).await;
    println!("{N} events, PostgreSQL cut for 3s mid-load: {ok} jobs ok, {runs} run records");
    assert_eq!(ok, N as i64);
    assert_exactly_once(&env, N).await;
    drop(replicas);
    env.cleanup().await;
}
