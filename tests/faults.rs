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

/// Waits until the events and jobs streams have drained (nothing waiting, nothing handed
/// out), then asserts exactly one ok run per job and no attempt recorded twice.
async fn assert_exactly_once(env: &TestEnv, jobs: usize) {
    env.wait_idle(WAIT).await;
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
    if ok_twice + attempts_twice > 0 {
        // What the runs of those jobs were, for whoever reads a failure of this test.
        let repeated = client
            .query(
                "SELECT r.id, r.job_id, r.attempt, r.status, r.started_at::text,
                        c.state || ' by ' || c.replica || CASE WHEN c.taken_over
                            THEN ' (taken over)' ELSE '' END
                 FROM runs r LEFT JOIN attempt_claims c USING (job_id)
                 WHERE r.job_id IN (SELECT job_id FROM runs GROUP BY job_id, attempt
                                    HAVING count(*) > 1)
                 ORDER BY r.job_id, r.id LIMIT 40",
                &[],
            )
            .await
            .unwrap();
        for r in &repeated {
            let (id, job, attempt): (i64, String, i32) = (r.get(0), r.get(1), r.get(2));
            let (status, started): (String, String) = (r.get(3), r.get(4));
            let claim: Option<String> = r.get(5);
            let claim = claim.unwrap_or_else(|| "no claim".into());
            eprintln!("repeated: run {id} of {job} attempt {attempt} {status}, started {started}, {claim}");
        }
    }
    assert_eq!(ok, jobs as i64, "jobs with an ok run");
    assert_eq!(ok_twice, 0, "jobs with more than one ok run");
    assert_eq!(attempts_twice, 0, "attempts recorded more than once");
}

fn replica(env: &TestEnv) -> Child {
    replica_with(env, &[])
}

/// The process id in a replica's name in attempt claims (`host:pid:random`).
fn pid_in(replica: &str) -> Option<u32> {
    replica.split(':').nth(1)?.parse().ok()
}

/// Every attempt claim: job id, state and the process id of the replica that holds (or
/// last held) it.
async fn claims(env: &TestEnv) -> Vec<(String, String, Option<u32>)> {
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    client
        .query("SELECT job_id, state, replica FROM attempt_claims", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), pid_in(r.get(2))))
        .collect()
}

/// The jobs whose attempt the replica with process id `pid` has claimed and not recorded.
async fn running_on(env: &TestEnv, pid: u32) -> Vec<String> {
    claims(env)
        .await
        .into_iter()
        .filter(|(_, state, holder)| state == "running" && *holder == Some(pid))
        .map(|(job, ..)| job)
        .collect()
}

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with plain integers, to a child this test started.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0, "signal {signal} to {pid}");
}

/// Statements running now in sessions named `application` (`pg_stat_activity`).
async fn statements_of(env: &TestEnv, application: &str) -> i64 {
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'",
            &[&application],
        )
        .await
        .unwrap()
        .get(0)
}

/// A job's event sequence, from its id (`ev-<stream>-<sequence>-<script id>`).
fn event_sequence(job_id: &str) -> u64 {
    job_id
        .rsplit('-')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an event job id: {job_id}"))
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
    // The victim's database sessions carry a name of their own, so the test can tell
    // when none of its statements is still running.
    let victim_url = format!("{}?application_name=victim", env.settings.database.url);
    // Every run claims its attempt, first deliveries too: what the victim holds is then
    // in its claims (the test of runs without a claim is the next one).
    let claiming = ("SCRIPTD_NATS__CLAIM_FIRST_DELIVERIES", "true");
    let mut replicas: Vec<Child> = vec![
        replica_with(&env, &[("SCRIPTD_DATABASE__URL", &victim_url), claiming]),
        replica_with(&env, &[claiming]),
        replica_with(&env, &[claiming]),
    ];
    let started = Instant::now();
    let publishing = {
        let env = &env;
        async move { publish_load(env).await }
    };
    let victim = replicas[0].0.id();
    let killing = async {
        wait_for_ok_jobs(&env, (EVENTS / 5) as i64).await;
        // Killed while it holds attempts, so the kill strands work rather than an idle
        // process. It is frozen first (SIGSTOP) and, once none of its statements is still
        // running in PostgreSQL, what it holds can no longer change: counted, then killed.
        // Holding nothing at that moment, it is thawed and frozen again later.
        let deadline = Instant::now() + WAIT;
        loop {
            signal(victim, libc::SIGSTOP);
            env.wait_until(WAIT, "the frozen replica's statements to end", || async {
                statements_of(&env, "victim").await == 0
            })
            .await;
            let held = running_on(&env, victim).await;
            if !held.is_empty() {
                replicas[0].0.kill().expect("SIGKILL");
                replicas[0].0.wait().unwrap();
                break held;
            }
            signal(victim, libc::SIGCONT);
            assert!(
                Instant::now() < deadline,
                "the replica never held an attempt when frozen"
            );
            env.wait_until(WAIT, "the replica to hold running attempts", || async {
                !running_on(&env, victim).await.is_empty()
            })
            .await;
        }
    };
    let ((), stranded) = tokio::join!(publishing, killing);
    assert!(!stranded.is_empty(), "the killed replica held no attempts");
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
    // Every attempt it stranded was taken over by a survivor and ended there.
    let ended_elsewhere = claims(&env)
        .await
        .into_iter()
        .filter(|(job, state, holder)| {
            stranded.contains(job) && state == "ended" && *holder != Some(victim)
        })
        .count();
    println!(
        "the killed replica held {} attempts in flight",
        stranded.len()
    );
    assert_eq!(
        ended_elsewhere,
        stranded.len(),
        "stranded attempts taken over"
    );
    drop(replicas);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_loses_and_repeats_none_of_its_unclaimed_runs() {
    let env = TestEnv::new().await;
    deploy_counter(&env).await;
    // Runs of first deliveries go without a claim when they are sure to end within the ack
    // wait: a 1 s timeout, up to three of them waiting to start, + 5 s margin, within 10 s.
    // A 10 s ack wait brings what the victim held to a survivor 10 s after the kill.
    let settings = [
        ("SCRIPTD_NATS__ACK_WAIT", "10s"),
        ("SCRIPTD_ENGINE__LIMITS__TIMEOUT", "1s"),
    ];
    let mut replicas: Vec<Child> = (0..3).map(|_| replica_with(&env, &settings)).collect();
    // Events stored before the event lane was made count as possibly handed out before
    // (`Lane::first_delivery`) and are claimed: published while the replicas were still
    // starting, on a busy machine every one could be, failing the last assertion.
    env.wait_for_event_lane("acme", WAIT).await;
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
    println!("{EVENTS} events, 3 replicas, one SIGKILLed: {ok} jobs ok, {runs} run records");
    assert_eq!(ok, EVENTS as i64, "every event ran");
    assert_exactly_once(&env, EVENTS).await;
    // Runs without a claim did happen: the jobs they ended have no claim row.
    let version = env.js.client().server_info().version;
    if scriptd::bus::lanes::counts_deliveries_truly(&version) {
        let claimed: std::collections::HashSet<String> = claims(&env)
            .await
            .into_iter()
            .map(|(job, ..)| job)
            .collect();
        assert!(claimed.len() < EVENTS, "no run went without a claim");
    }
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
    // Every replica runs events published after the restart: none stayed disconnected.
    // (The events stream's sequences go on across the restart: its store is on disk.) A
    // replica whose client reconnected after the others' may find the second half run by
    // them already, so events go on being published, a few at a time, until each replica
    // has run some (for at most WAIT).
    let mut sequences: Vec<u64> = claims(&env)
        .await
        .iter()
        .map(|(job, ..)| event_sequence(job))
        .collect();
    sequences.sort_unstable();
    let first_after = sequences[N / 2];
    let mut expected: Vec<u32> = replicas.iter().map(|r| r.0.id()).collect();
    expected.sort_unstable();
    let mut published = N;
    let deadline = Instant::now() + WAIT;
    loop {
        let mut after: Vec<u32> = claims(&env)
            .await
            .into_iter()
            .filter(|(job, ..)| event_sequence(job) >= first_after)
            .filter_map(|(.., holder)| holder)
            .collect();
        after.sort_unstable();
        after.dedup();
        if after == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas that ran events after the restart: {after:?} of {expected:?}"
        );
        publish_retrying(&env, published..published + 30).await;
        published += 30;
        wait_for_ok_jobs(&env, published as i64).await;
    }
    drop(replicas);
    env.cleanup().await;
}

/// A replica whose log lines are kept (and passed on to the test's output).
struct Logged {
    _child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Logged {
    fn start(env: &TestEnv, settings: &[(&str, &str)]) -> Logged {
        let mut command = env.daemon_command();
        command
            .arg("run")
            .env("SCRIPTD_ENGINE__HOSTS__COUNT", "1")
            .envs(settings.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("spawn scriptd run");
        let stderr = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                kept.lock().unwrap().push(line);
            }
        });
        Logged {
            _child: Child(child),
            lines,
        }
    }

    /// Lines logged so far that contain `text`.
    fn count(&self, text: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_record_every_run_after_a_database_outage_mid_load() {
    const N: usize = 3000;
    // What replicas log when a write of theirs to PostgreSQL fails: run records, and the
    // attempt claims taken before a run (fan-out and job lanes).
    const FAILED: [&str; 3] = [
        "Writing run records failed.",
        "Cannot claim the job's attempt",
        "cannot claim the first attempt",
    ];
    let env = TestEnv::new().await;
    deploy_counter(&env).await;
    let relay = support::Relay::start("127.0.0.1:5432").await;
    let database = env
        .settings
        .database
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    let replicas: Vec<Logged> = (0..3)
        .map(|_| Logged::start(&env, &[("SCRIPTD_DATABASE__URL", &database)]))
        .collect();
    let failed = || {
        replicas
            .iter()
            .map(|r| FAILED.iter().map(|f| r.count(f)).sum::<usize>())
            .sum::<usize>()
    };
    let publishing = publish_retrying(&env, 0..N);
    let outage = async {
        wait_for_ok_jobs(&env, (N / 5) as i64).await;
        relay.cut();
        // The cut is held until replicas have tried to write claims or records and failed:
        // the outage hit work in flight, not idle pools.
        env.wait_until(WAIT, "a replica to fail writing to PostgreSQL", || async {
            failed() > 0
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (ok_at_restore, _) = progress(&env).await;
        relay.restore();
        ok_at_restore
    };
    let ((), ok_at_restore) = tokio::join!(publishing, outage);
    let (ok, runs) = wait_for_ok_jobs(&env, N as i64).await;
    println!(
        "{N} events, PostgreSQL cut mid-load: {} claim or record writes failed, {ok_at_restore} \
         jobs ok when it came back, then {ok} jobs ok, {runs} run records",
        failed()
    );
    assert!(ok_at_restore < N as i64, "the outage came after the work");
    assert_eq!(ok, N as i64);
    assert_exactly_once(&env, N).await;
    drop(replicas);
    env.cleanup().await;
}
