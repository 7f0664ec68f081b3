//! Event lanes: each tenant with scripts has its own consumer of the events stream, which
//! starts at the tenant's first script (less `nats.lane_start_margin`), so no event of a
//! tenant is run that arrived while it had no scripts, and none that arrives once it has
//! is missed, whenever a daemon gets to make the lane.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::Config as PullConfig, Info};
use support::{RunningDaemon, TestEnv};

const WAIT: Duration = Duration::from_secs(60);
const ECHO: &str = "export default () => 1";

/// The last subject token (`in.<n>`) of every successful run of `tenant`, sorted (runs of
/// one lane may overlap).
async fn ran(env: &TestEnv, tenant: &str) -> Vec<String> {
    let mut ran: Vec<String> = env
        .runs()
        .await
        .into_iter()
        .filter(|r| r.tenant == tenant && r.status == "ok")
        .filter_map(|r| Some(r.subject?.rsplit('.').next()?.to_owned()))
        .collect();
    ran.sort();
    ran
}

/// Waits until `daemon` has `tenant`'s script `echo` in its index.
async fn wait_for_index(env: &TestEnv, daemon: &RunningDaemon, tenant: &str) {
    env.wait_until(WAIT, "the script index to follow the change", || async {
        daemon
            .stats
            .index
            .get()
            .is_some_and(|i| i.snapshot().get(tenant, "echo").is_some())
    })
    .await;
}

/// What the server says of consumer `name` of the events stream, if it is there.
async fn consumer(env: &TestEnv, name: &str) -> Option<Info> {
    let stream = env
        .js
        .get_stream(env.settings.nats.events_stream())
        .await
        .ok()?;
    let mut consumer = stream.get_consumer::<PullConfig>(name).await.ok()?;
    consumer.info().await.ok().cloned()
}

/// Whether `tenant`'s event lane has taken and settled every event it holds.
async fn lane_is_idle(env: &TestEnv, tenant: &str) -> bool {
    let lane = scriptd::bus::lanes::event_lane_consumer(tenant);
    consumer(env, &lane)
        .await
        .is_some_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
}

/// Deploys `tenant`'s script and runs a daemon until it has run one event of it.
async fn run_one_event_and_stop(env: &TestEnv, tenant: &str) {
    env.deploy(tenant, "echo", ECHO, &["in.*"]).await;
    let daemon = env.start_daemon();
    env.publish(tenant, "in.1", "{}").await;
    env.wait_for_runs(WAIT, |r| !r.is_empty()).await;
    daemon.shutdown().await;
}

/// The test's settings with `margin` as `nats.lane_start_margin`.
fn with_margin(env: &TestEnv, margin: Duration) -> scriptd::config::Settings {
    let mut settings = env.settings.clone();
    settings.nats.lane_start_margin = margin;
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_first_script_runs_for_events_after_it_and_none_before() {
    let env = TestEnv::new().await;
    env.deploy("acme", "echo", ECHO, &["in.*"]).await;
    // One clock for both servers here: no margin is needed.
    let daemon = env.start_daemon_with(with_margin(&env, Duration::ZERO));
    env.publish("globex", "in.1", "{}").await;
    // Published as soon as the daemon knows the script: its lane may not be open yet, and
    // must still get it.
    env.deploy("globex", "echo", ECHO, &["in.*"]).await;
    wait_for_index(&env, &daemon, "globex").await;
    env.publish("globex", "in.2", "{}").await;
    env.publish("globex", "in.3", "{}").await;
    env.wait_for_runs(WAIT, |r| {
        r.iter().filter(|r| r.tenant == "globex").count() >= 2
    })
    .await;
    env.wait_until(WAIT, "globex's lane to settle all it has", || {
        lane_is_idle(&env, "globex")
    })
    .await;
    assert_eq!(ran(&env, "globex").await, ["2", "3"]);
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_script_deployed_while_no_daemon_runs_gets_the_events_since() {
    let env = TestEnv::new().await;
    run_one_event_and_stop(&env, "acme").await;

    // No daemon runs: globex's event just before its first script is within the margin,
    // the one after it is past the deploy.
    env.publish("globex", "in.1", "{}").await;
    env.deploy("globex", "echo", ECHO, &["in.*"]).await;
    env.publish("globex", "in.2", "{}").await;
    let daemon = env.start_daemon_with(with_margin(&env, Duration::from_secs(300)));
    env.wait_for_runs(WAIT, |r| r.len() >= 3).await;
    env.wait_until(WAIT, "globex's lane to settle all it has", || {
        lane_is_idle(&env, "globex")
    })
    .await;
    assert_eq!(ran(&env, "globex").await, ["1", "2"]);
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_arrive_while_a_tenant_has_no_scripts_never_run_later() {
    let env = TestEnv::new().await;
    run_one_event_and_stop(&env, "globex").await;

    // The tenant loses its scripts while no daemon runs; the one started next has no
    // script of it in its index, but keeps its lane going from where it stood.
    assert!(env.store.delete_script("globex", "echo").await.unwrap());
    let daemon = env.start_daemon();
    env.publish("globex", "in.2", "{}").await;
    env.wait_until(WAIT, "globex's lane to settle event 2", || {
        lane_is_idle(&env, "globex")
    })
    .await;
    env.deploy("globex", "echo", ECHO, &["in.*"]).await;
    wait_for_index(&env, &daemon, "globex").await;
    env.publish("globex", "in.3", "{}").await;
    env.wait_for_runs(WAIT, |r| r.len() >= 2).await;
    assert_eq!(ran(&env, "globex").await, ["1", "3"]);
    assert!(daemon.stats.fanout.unmatched.load(Ordering::SeqCst) >= 1);
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_deliveries_run_unclaimed_and_a_remade_lane_runs_none_of_them_again() {
    let env = TestEnv::new().await;
    env.deploy("acme", "echo", ECHO, &["in.*"]).await;
    // A run goes without a claim if it is sure to end within the ack wait: the test's
    // 5 s is shorter than a run's bound (5 s timeout x 4 runs per worker, + 5 s).
    let mut settings = env.settings.clone();
    settings.nats.ack_wait = Duration::from_secs(30);
    let daemon = env.start_daemon_with(settings.clone());
    env.wait_for_event_lane("acme", WAIT).await;
    for n in 1..=3 {
        env.publish("acme", &format!("in.{n}"), "{}").await;
    }
    env.wait_for_runs(WAIT, |r| r.len() >= 3).await;
    env.wait_until(WAIT, "acme's lane to settle all it has", || {
        lane_is_idle(&env, "acme")
    })
    .await;
    let version = env.js.client().server_info().version;
    let truly = scriptd::bus::lanes::counts_deliveries_truly(&version);
    assert_eq!(
        daemon.stats.fanout.unclaimed.load(Ordering::Relaxed),
        if truly { 3 } else { 0 },
        "runs without a claim on nats-server {version}"
    );
    daemon.shutdown().await;

    // The lane is deleted. Made again from the first script, it hands out the three
    // events again, each as its first delivery by the new consumer: stored before the
    // consumer was made, they are claimed, found ended and acknowledged without running.
    let lane = scriptd::bus::lanes::event_lane_consumer("acme");
    env.js
        .get_stream(env.settings.nats.events_stream())
        .await
        .unwrap()
        .delete_consumer(&lane)
        .await
        .unwrap();
    let daemon = env.start_daemon_with(settings);
    env.publish("acme", "in.4", "{}").await;
    env.wait_for_runs(WAIT, |r| r.len() >= 4).await;
    env.wait_until(WAIT, "acme's remade lane to settle all it has", || {
        lane_is_idle(&env, "acme")
    })
    .await;
    assert_eq!(ran(&env, "acme").await, ["1", "2", "3", "4"]);
    assert_eq!(env.runs().await.len(), 4, "no event ran twice");
    assert_eq!(daemon.stats.fanout.events.load(Ordering::Relaxed), 4);
    // Only the new event can be a first delivery anywhere (if stored well after the lane
    // was made).
    assert!(daemon.stats.fanout.unclaimed.load(Ordering::Relaxed) <= 1);
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_made_after_an_upgrade_start_after_what_the_earlier_fan_out_consumer_settled() {
    use futures::StreamExt;
    let env = TestEnv::new().await;
    scriptd::bus::ensure_streams(&env.js, &env.settings.nats)
        .await
        .unwrap();
    // What an earlier version leaves: its fan-out consumer, which fanned out (and
    // acknowledged) acme's first two events and not the third.
    env.deploy("acme", "echo", ECHO, &["in.*"]).await;
    for n in 1..=3 {
        env.publish("acme", &format!("in.{n}"), "{}").await;
    }
    let old = scriptd::bus::durable_consumer(
        &env.js,
        &env.settings.nats.events_stream(),
        scriptd::bus::FANOUT_CONSUMER,
        Duration::from_secs(30),
        1024,
        None,
    )
    .await
    .unwrap();
    let mut batch = old.fetch().max_messages(2).messages().await.unwrap();
    while let Some(message) = batch.next().await {
        message.unwrap().double_ack().await.unwrap();
    }
    // A tenant whose first script comes after everything that consumer settled starts at
    // that script, not at the consumer's floor.
    env.publish("globex", "in.1", "{}").await;
    env.deploy("globex", "echo", ECHO, &["in.*"]).await;
    // An ack wait long enough for runs without a claim (see the test above).
    let mut settings = with_margin(&env, Duration::ZERO);
    settings.nats.ack_wait = Duration::from_secs(30);
    let daemon = env.start_daemon_with(settings);
    // Once the lanes are made, the next events would go without a claim, were it not for
    // that consumer.
    env.wait_for_event_lane("acme", WAIT).await;
    env.wait_for_event_lane("globex", WAIT).await;
    env.publish("acme", "in.4", "{}").await;
    env.publish("globex", "in.2", "{}").await;
    env.wait_for_runs(WAIT, |r| r.len() >= 3).await;
    for tenant in ["acme", "globex"] {
        env.wait_until(WAIT, "the lane to settle all it has", || {
            lane_is_idle(&env, tenant)
        })
        .await;
    }
    assert_eq!(ran(&env, "acme").await, ["3", "4"]);
    assert_eq!(ran(&env, "globex").await, ["2"]);
    // While the earlier version's consumer is there, its replicas may run the same events
    // (claiming them): every run here claims its attempt too.
    assert_eq!(daemon.stats.fanout.unclaimed.load(Ordering::Relaxed), 0);
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_idle_lane_waits_at_the_server_whatever_the_number_of_tenants() {
    let env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    settings.tenants.pull_window = 2;
    let tenants = ["t1", "t2", "t3", "t4", "t5"];
    for tenant in tenants {
        env.deploy(tenant, "echo", ECHO, &["in.*"]).await;
    }
    let daemon = env.start_daemon_with(settings);
    env.wait_until(
        WAIT,
        "every idle lane to have a pull request at the server",
        || async {
            let mut waiting = 0;
            for tenant in tenants {
                let lane = scriptd::bus::lanes::event_lane_consumer(tenant);
                if let Some(info) = consumer(&env, &lane).await {
                    waiting += usize::from(info.num_waiting > 0);
                }
            }
            waiting == tenants.len()
        },
    )
    .await;
    for tenant in tenants {
        env.publish(tenant, "in.1", "{}").await;
    }
    env.wait_for_runs(WAIT, |r| r.len() == tenants.len()).await;
    daemon.shutdown().await;
    env.cleanup().await;
}
