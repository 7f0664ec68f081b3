//! The script index follows deploys, disables and deletes through LISTEN/NOTIFY, without
//! waiting for its periodic reload.

mod support;

use std::sync::Arc;
use std::time::Duration;

use scriptd::scripts::index::{keep_fresh, ScriptIndex};
use support::TestEnv;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_a_running_index_through_notifications() {
    let env = TestEnv::new().await;
    let index = Arc::new(ScriptIndex::default());
    let stop = CancellationToken::new();
    // The periodic reload is an hour away: only notifications can explain a change.
    let task = tokio::spawn(keep_fresh(
        index.clone(),
        env.store.clone(),
        Duration::from_secs(3600),
        stop.clone(),
    ));
    env.wait_until(Duration::from_secs(10), "the first load", || {
        let index = index.clone();
        async move { index.is_loaded() }
    })
    .await;
    // Give the listener its subscription: it reloads once LISTEN is in place, which the
    // version counter below observes as a second load.
    env.deploy("acme", "greeter", "export default () => 1", &["hello"])
        .await;
    env.wait_until(Duration::from_secs(5), "the deploy", || {
        let index = index.clone();
        async move {
            index
                .snapshot()
                .get("acme", "greeter")
                .is_some_and(|s| s.version.get() == 1)
        }
    })
    .await;
    env.deploy("acme", "greeter", "export default () => 2", &["hello"])
        .await;
    env.wait_until(Duration::from_secs(5), "the new version", || {
        let index = index.clone();
        async move {
            index
                .snapshot()
                .get("acme", "greeter")
                .is_some_and(|s| s.version.get() == 2)
        }
    })
    .await;
    env.store
        .set_enabled("acme", "greeter", false)
        .await
        .unwrap();
    env.wait_until(Duration::from_secs(5), "the disable", || {
        let index = index.clone();
        async move {
            index
                .snapshot()
                .get("acme", "greeter")
                .is_some_and(|s| !s.enabled)
        }
    })
    .await;
    env.store.delete_script("acme", "greeter").await.unwrap();
    env.wait_until(Duration::from_secs(5), "the delete", || {
        let index = index.clone();
        async move { index.snapshot().get("acme", "greeter").is_none() }
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    env.cleanup().await;
}
