//! The daemon rides out a NATS server restart: it reconnects, reopens its consumers and
//! runs the events published after the restart. Uses a nats-server of its own.

mod support;

use std::time::Duration;

use support::{OwnNats, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_loses_nothing() {
    let mut nats = OwnNats::start();
    let env = TestEnv::with_nats(&nats.url()).await;
    env.deploy("acme", "echo", "export default (e) => e.data.n", &["tick"])
        .await;
    let daemon = env.start_daemon();
    env.publish("acme", "tick", r#"{"n": 1}"#).await;
    env.wait_for_runs(Duration::from_secs(30), |r| r.len() == 1)
        .await;

    nats.restart();
    // The publisher's client reconnects too; its first publish after the restart may
    // still fail while it does, so publish until the stream has the event.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sent = env
            .js
            .publish(
                format!("{}.acme.tick", env.settings.nats.events_prefix),
                r#"{"n": 2}"#.into(),
            )
            .await;
        if let Ok(ack) = sent {
            if ack.await.is_ok() {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "could not publish after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs = env
        .wait_for_runs(Duration::from_secs(60), |r| {
            r.iter().filter(|r| r.status == "ok").count() >= 2
        })
        .await;
    assert!(runs.iter().all(|r| r.status == "ok"));
    daemon.shutdown().await;
    env.cleanup().await;
}
