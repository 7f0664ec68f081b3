//! Dead letters from the operator's side: list, show, replay (latest, pinned, dry run, by
//! filter at a rate) and purge, through the `scriptd` binary on real NATS and PostgreSQL.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use scriptd::caps::secrets::SecretBox;
use scriptd::retry::RetryOverrides;
use support::http::TestServer;
use support::{json, TestEnv};

const WAIT: Duration = Duration::from_secs(60);
const FAILS: &str = "export default (e) => { throw new Error('card declined ' + e.data.n); }";
const WORKS: &str = "export default (e) => ({ charged: e.data.n })";

fn run_cli(env: &TestEnv, args: &[&str]) -> std::process::Output {
    env.daemon_command().args(args).output().expect("scriptd")
}

/// The newest dead letter once there is one other than `not`; fails the test after 30 s.
async fn newest_letter_other_than(env: &TestEnv, not: Option<u64>) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seqs = sequences(&json(run_cli(env, &["dlq", "list", "--json"])));
        if let Some(s) = seqs.first().filter(|s| Some(**s) != not) {
            return *s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new dead letter within 30 s (have {seqs:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sequences(list: &serde_json::Value) -> Vec<u64> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|l| l["sequence"].as_u64().unwrap())
        .collect()
}

/// Deploys a failing script, starts a daemon (after the deploy, so the event cannot
/// race the daemon's index) and waits for the event's dead letter.
async fn one_dead_letter(env: &TestEnv) -> (support::RunningDaemon, u64) {
    env.deploy("acme", "charge", FAILS, &["pay"]).await;
    let daemon = env.start_daemon();
    env.publish("acme", "pay", r#"{"n": 7}"#).await;
    env.wait_for_runs(WAIT, |r| r.iter().any(|r| r.status == "dead_lettered"))
        .await;
    let list = json(run_cli(env, &["dlq", "list", "--json"]));
    let seqs = sequences(&list);
    assert_eq!(seqs.len(), 1);
    (daemon, seqs[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_script_replays_its_dead_letter_once_and_it_leaves_the_queue() {
    let env = TestEnv::new().await;
    let (daemon, seq) = one_dead_letter(&env).await;
    let shown = json(run_cli(&env, &["dlq", "show", &seq.to_string(), "--json"]));
    assert_eq!(shown["dead_letter"]["failure"]["kind"], "exception");
    assert_eq!(
        shown["runs"].as_array().unwrap().len(),
        3,
        "every attempt's run record"
    );

    env.deploy("acme", "charge", WORKS, &["pay"]).await;
    let out = run_cli(&env, &["dlq", "replay", &seq.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("version: latest"));
    let runs = env
        .wait_for_runs(WAIT, |r| r.iter().any(|r| r.status == "ok"))
        .await;
    let replayed: Vec<_> = runs.iter().filter(|r| r.status == "ok").collect();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].version, Some(2));
    assert!(replayed[0].job_id.starts_with(&format!("rp-{seq}-")));
    assert_eq!(
        sequences(&json(run_cli(&env, &["dlq", "list", "--json"]))),
        Vec::<u64>::new()
    );
    // Replaying what is gone is an error an operator can act on.
    let again = run_cli(&env, &["dlq", "replay", &seq.to_string()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr)
        .contains(&format!("no dead letter at sequence {seq}")));
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_replay_runs_the_old_version_and_keeps_the_chain() {
    let env = TestEnv::new().await;
    let (daemon, first) = one_dead_letter(&env).await;
    env.deploy("acme", "charge", WORKS, &["pay"]).await;
    json(run_cli(
        &env,
        &[
            "dlq",
            "replay",
            &first.to_string(),
            "--version",
            "pinned",
            "--json",
        ],
    ));
    // v1 fails again: a second dead letter, linked to the first.
    let second = newest_letter_other_than(&env, None).await;
    assert_ne!(second, first);
    let runs = env.runs().await;
    assert!(runs
        .iter()
        .filter(|r| r.job_id.starts_with("rp-"))
        .all(|r| r.version == Some(1)));
    let shown = json(run_cli(
        &env,
        &["dlq", "show", &second.to_string(), "--json"],
    ));
    assert_eq!(
        shown["message_headers"]["Scriptd-Replay-Chain"],
        first.to_string()
    );
    json(run_cli(
        &env,
        &[
            "dlq",
            "replay",
            &second.to_string(),
            "--version",
            "1",
            "--json",
        ],
    ));
    let third = newest_letter_other_than(&env, Some(second)).await;
    let shown = json(run_cli(
        &env,
        &["dlq", "show", &third.to_string(), "--json"],
    ));
    assert_eq!(
        shown["message_headers"]["Scriptd-Replay-Chain"],
        format!("{first},{second}")
    );
    assert!(shown["message_headers"]["Scriptd-Original-Job"]
        .as_str()
        .unwrap()
        .starts_with("ev-"));
    daemon.shutdown().await;
    env.cleanup().await;
}

/// A dry run of a script that publishes, writes a key, reads a secret and fetches: it
/// reads what a real run would read and reports what it would have done, and nothing
/// happens — checked with the daemon stopped, so nothing can consume the evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_publishes_writes_and_fetches_nothing() {
    let env = TestEnv::new().await;
    let server = TestServer::start().await;
    let (daemon, seq) = one_dead_letter(&env).await;
    daemon.shutdown().await;
    let key = SecretBox::generate_key();
    let secret_box = SecretBox::new(
        &base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &key).unwrap(),
    )
    .unwrap();
    env.store
        .secret_put("acme", "psp", &secret_box.seal("acme", "psp", "psp-token"))
        .await
        .unwrap();
    env.store
        .kv_set("acme", "count", "41", 1 << 20)
        .await
        .unwrap();
    env.store
        .set_fetch_allow_list("acme", &[format!("127.0.0.1:{}", server.port)])
        .await
        .unwrap();
    let url = server.url("/hello");
    let fixed = format!(
        "export default async (e, ctx) => {{
            await ctx.publish('charged', {{ n: e.data.n }});
            const count = (await ctx.kv.get('count')) + 1;
            await ctx.kv.set('count', count);
            const token = await ctx.secrets.get('psp');
            let fetched = 'made';
            try {{ await fetch('{url}'); }} catch (err) {{ fetched = err.name; }}
            return {{ charged: e.data.n, count, token: token === 'psp-token', fetched }};
        }}"
    );
    env.deploy("acme", "charge", &fixed, &["pay"]).await;
    let runs_before = env.runs().await.len();
    let jobs = env
        .js
        .get_stream(env.settings.nats.jobs_stream())
        .await
        .unwrap();
    let jobs_before = jobs.get_info().await.unwrap().state.messages;
    let dry_run = |json: bool| {
        let mut command = env.daemon_command();
        command
            .env("SCRIPTD_CAPABILITIES__SECRETS__KEY", &key)
            .args(["dlq", "replay", &seq.to_string(), "--dry-run"]);
        if json {
            command.arg("--json");
        }
        command.output().expect("scriptd")
    };
    let out = json(dry_run(true));
    assert_eq!(out[0]["dry_run"], true);
    assert_eq!(out[0]["version"], 2);
    assert_eq!(out[0]["outcome"], "ok", "{out}");
    assert_eq!(
        out[0]["run"]["result"],
        serde_json::json!({ "charged": 7, "count": 42, "token": true, "fetched": "NotSupported" })
    );
    let would = &out[0]["would"];
    let subject = format!("{}.acme.charged", env.settings.nats.events_prefix);
    assert_eq!(would["published"][0]["subject"], subject.as_str());
    assert_eq!(would["published"][0]["data"], serde_json::json!({ "n": 7 }));
    assert_eq!(would["kv_writes"], serde_json::json!({ "count": 42 }));
    assert_eq!(
        would["fetches_refused"],
        serde_json::json!([format!("GET {url}")])
    );
    // Without --json: a line for a person.
    let said = dry_run(false);
    let said = String::from_utf8_lossy(&said.stdout);
    assert!(
        said.contains(&format!(
            "dead letter {seq}: dry run of acme/charge v2: ok, returning {{"
        )) && said.contains("(1 event(s) to publish, 1 key(s) to write, 1 fetch(es) refused)"),
        "{said}"
    );
    assert!(!said.trim_start().starts_with('{'), "{said}");
    // Nothing happened: no message on the subject, the key as it was, no connection to
    // the server, no run recorded, no job queued, the dead letter still there.
    assert_eq!(env.messages_on(&subject).await, 0);
    assert_eq!(
        env.store.kv_get("acme", "count").await.unwrap().as_deref(),
        Some("41")
    );
    assert_eq!(server.connections.load(Ordering::SeqCst), 0);
    assert_eq!(env.runs().await.len(), runs_before);
    assert_eq!(jobs.get_info().await.unwrap().state.messages, jobs_before);
    assert_eq!(
        sequences(&json(run_cli(&env, &["dlq", "list", "--json"]))),
        vec![seq]
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_filter_keeps_its_rate_and_loses_nothing() {
    let env = TestEnv::new().await;
    env.deploy_with(
        "acme",
        "bulk",
        FAILS,
        &["bulk"],
        Default::default(),
        RetryOverrides {
            max_attempts: Some(1),
            ..Default::default()
        },
    )
    .await;
    env.deploy("acme", "other", FAILS, &["other"]).await;
    let daemon = env.start_daemon();
    for n in 0..100 {
        env.publish("acme", "bulk", format!(r#"{{"n": {n}}}"#))
            .await;
    }
    env.publish("acme", "other", r#"{"n": 1}"#).await;
    env.wait_for_runs(WAIT, |r| {
        r.iter().filter(|r| r.status == "dead_lettered").count() == 101
    })
    .await;
    env.deploy("acme", "bulk", WORKS, &["bulk"]).await;

    let started = Instant::now();
    let out = run_cli(
        &env,
        &[
            "dlq",
            "replay",
            "--all-matching",
            "--script",
            "bulk",
            "--rate",
            "200",
        ],
    );
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took >= Duration::from_millis(495),
        "100 replays at 200/s took only {took:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("replayed 100/100"));
    let runs = env
        .wait_for_runs(WAIT, |r| {
            r.iter().filter(|r| r.status == "ok").count() == 100
        })
        .await;
    let mut replayed: Vec<_> = runs
        .iter()
        .filter(|r| r.status == "ok")
        .map(|r| r.job_id.clone())
        .collect();
    replayed.sort();
    replayed.dedup();
    assert_eq!(replayed.len(), 100);
    // Only the other script's dead letter is left.
    let left = json(run_cli(&env, &["dlq", "list", "--json"]));
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["letter"]["script"], "other");
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_a_filter_and_confirmation() {
    let env = TestEnv::new().await;
    let (daemon, seq) = one_dead_letter(&env).await;
    let refused = run_cli(&env, &["dlq", "purge", "--yes"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refusing to purge without a filter"));
    let counted = run_cli(&env, &["dlq", "purge", "--script", "charge"]);
    assert_eq!(counted.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&counted.stdout).contains("1 dead letter(s) match"));
    assert_eq!(
        sequences(&json(run_cli(&env, &["dlq", "list", "--json"]))),
        vec![seq]
    );
    let done = run_cli(&env, &["dlq", "purge", "--script", "charge", "--yes"]);
    assert!(done.status.success());
    assert!(String::from_utf8_lossy(&done.stdout).contains("deleted 1"));
    assert_eq!(
        sequences(&json(run_cli(&env, &["dlq", "list", "--json"]))),
        Vec::<u64>::new()
    );
    daemon.shutdown().await;
    env.cleanup().await;
}
