//! Bad input and bad timing on the event pipeline: odd payloads and subjects, events
//! nobody handles, oversized events, scripts that change while jobs wait, and a database
//! outage while events arrive. Real NATS and PostgreSQL.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::{busy_script, Relay, TestEnv};

const WAIT: Duration = Duration::from_secs(30);
const PROBE: &str = "export default (event) => { console.log(event.encoding, typeof event.data, JSON.stringify(event.data)); return null; }";

fn first_log(run: &support::Run) -> String {
    run.logs[0]["message"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_that_are_not_json_arrive_as_text_or_base64() {
    let env = TestEnv::new().await;
    env.deploy("acme", "probe", PROBE, &["in.*"]).await;
    let daemon = env.start_daemon();
    env.publish("acme", "in.text", "hello, not json").await;
    let runs = env.wait_for_runs(WAIT, |r| r.len() == 1).await;
    assert_eq!(first_log(&runs[0]), "text string \"hello, not json\"");
    env.publish("acme", "in.binary", vec![0xffu8, 0x00, 0xfe])
        .await;
    let runs = env.wait_for_runs(WAIT, |r| r.len() == 2).await;
    assert_eq!(first_log(&runs[1]), "base64 string \"/wD+\"");
    env.publish("acme", "in.json", r#"{"a":[1,"é"]}"#).await;
    let runs = env.wait_for_runs(WAIT, |r| r.len() == 3).await;
    assert_eq!(first_log(&runs[2]), "json object {\"a\":[1,\"é\"]}");
    assert!(runs.iter().all(|r| r.status == "ok"));
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_no_script_handles_are_acknowledged_and_counted_and_no_ones_left_alone() {
    let env = TestEnv::new().await;
    env.deploy("acme", "probe", PROBE, &["in.*"]).await;
    let daemon = env.start_daemon();
    let stats = daemon.stats.fanout.clone();
    // Events of a tenant without scripts, or whose subject names no tenant and type, are
    // in no tenant's lane: no replica pulls them (they age out with the stream).
    env.publish("globex", "in.x", "{}").await;
    let prefix = env.settings.nats.events_prefix.clone();
    env.publish_subject(&format!("{prefix}.acme"), "{}").await;
    // An event of a tenant with scripts that none of them handles is settled as no one's.
    env.publish("acme", "other.type", "{}").await;
    env.publish("acme", "in.1", "{}").await;
    env.wait_for_runs(WAIT, |r| r.len() == 1).await;
    let lane = scriptd::bus::lanes::event_lane_consumer("acme");
    let events = env
        .js
        .get_stream(env.settings.nats.events_stream())
        .await
        .unwrap();
    env.wait_until(WAIT, "acme's lane to settle both events", || {
        let (events, lane) = (events.clone(), lane.clone());
        async move {
            let mut c = events
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&lane)
                .await
                .unwrap();
            let info = c.info().await.unwrap();
            info.num_pending == 0 && info.num_ack_pending == 0
        }
    })
    .await;
    assert_eq!(stats.events.load(Ordering::SeqCst), 2);
    assert_eq!(stats.settled.load(Ordering::SeqCst), 2);
    assert_eq!(stats.unmatched.load(Ordering::SeqCst), 1);
    assert_eq!(stats.bad_subjects.load(Ordering::SeqCst), 0);
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_events_are_refused_or_dead_lettered_never_a_crash() {
    let env = TestEnv::new().await;
    env.deploy("acme", "probe", PROBE, &["in.*"]).await;
    let mut settings = env.settings.clone();
    settings.nats.max_event_size = scriptd::units::ByteSize::kib(64);
    let daemon = env.start_daemon_with(settings);
    // 10 MiB is over the server's max_payload: the publish itself is refused.
    let huge = vec![b'x'; 10 * 1024 * 1024];
    let refused = env
        .js
        .publish(
            format!("{}.acme.in.huge", env.settings.nats.events_prefix),
            huge.into(),
        )
        .await;
    assert!(
        refused.is_err(),
        "a 10 MiB publish should be refused by the server's max_payload"
    );
    // Over the daemon's own limit: dead-lettered as bad_input for each matching script.
    env.publish("acme", "in.big", vec![b'y'; 100 * 1024]).await;
    env.publish("acme", "in.small", "{}").await;
    env.wait_for_runs(WAIT, |r| r.len() == 1).await;
    let letters = env.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1["failure"]["kind"], "bad_input");
    assert!(letters[0].1["failure"]["message"]
        .as_str()
        .unwrap()
        .contains("102400 bytes"));
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_script_disabled_or_deleted_while_they_wait_are_skipped() {
    let env = TestEnv::new().await;
    let slow = busy_script(150, "1");
    env.deploy("acme", "slow", &slow, &["work"]).await;
    env.deploy("acme", "doomed", &slow, &["doom"]).await;
    // One run per engine worker: two of the 24 jobs get an engine slot at a time, and
    // what a job runs is decided when it gets its slot, so most are still waiting for
    // one when the scripts change.
    let mut settings = env.settings.clone();
    settings.engine.runs_per_worker = 1;
    let daemon = env.start_daemon_with(settings);
    for _ in 0..12 {
        env.publish("acme", "work", "{}").await;
        env.publish("acme", "doom", "{}").await;
    }
    env.wait_for_runs(WAIT, |r| {
        r.iter().any(|r| r.script == "slow") && r.iter().any(|r| r.script == "doomed")
    })
    .await;
    assert!(env.store.set_enabled("acme", "slow", false).await.unwrap());
    assert!(env.store.delete_script("acme", "doomed").await.unwrap());
    let runs = env.wait_for_runs(WAIT, |r| r.len() == 24).await;
    for script in ["slow", "doomed"] {
        let of: Vec<_> = runs.iter().filter(|r| r.script == script).collect();
        assert_eq!(of.len(), 12, "{script}");
        let skipped = of.iter().filter(|r| r.status == "skipped").count();
        let ok = of.iter().filter(|r| r.status == "ok").count();
        assert_eq!(skipped + ok, 12, "{script}: {of:#?}");
        assert!(skipped > 0, "{script}: every job ran before the change");
    }
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_while_events_arrive_loses_nothing() {
    let env = TestEnv::new().await;
    env.deploy(
        "acme",
        "counter",
        "export default (e) => e.data.n",
        &["tick"],
    )
    .await;
    let relay = Relay::start("127.0.0.1:5432").await;
    let mut settings = env.settings.clone();
    settings.database.url = format!(
        "postgres://postgres@127.0.0.1:{}/scriptd_{}",
        relay.port, env.id
    );
    let daemon = env.start_daemon_with(settings);
    env.publish("acme", "tick", r#"{"n": 0}"#).await;
    env.wait_for_runs(WAIT, |r| r.len() == 1).await;

    relay.cut();
    for n in 1..=5 {
        env.publish("acme", "tick", format!(r#"{{"n": {n}}}"#))
            .await;
    }
    // While the database is away, events cannot be checked against their jobs' records,
    // nor runs recorded: they go back to JetStream (as events, or as jobs in a lane).
    let stats = daemon.stats.clone();
    env.wait_until(WAIT, "events or jobs handed back during the outage", || {
        let stats = stats.clone();
        async move {
            stats.fanout.returned.load(Ordering::SeqCst)
                + stats.attempts.returned.load(Ordering::SeqCst)
                > 0
        }
    })
    .await;
    relay.restore();
    // An event whose claim reached the database but whose answer was lost in the cut finds
    // its attempt claimed under this replica's name when it comes back: holding no attempt
    // of it, the replica takes the claim back at once, not after its lease (35 s with the
    // defaults, past this wait).
    let runs = env
        .wait_for_runs(WAIT, |r| r.iter().filter(|r| r.status == "ok").count() == 6)
        .await;
    let mut jobs: Vec<_> = runs.iter().map(|r| r.job_id.clone()).collect();
    jobs.sort();
    jobs.dedup();
    assert_eq!(jobs.len(), 6, "{runs:#?}");
    daemon.shutdown().await;
    env.cleanup().await;
}
