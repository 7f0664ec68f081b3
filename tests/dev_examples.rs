//! `scriptd dev` on the bundled examples, as the README runs it: every example deploys, and
//! the order example's chain (key-value, publish, secret, fetch of the local billing API)
//! ends in an invoice.

mod support;

use std::time::Duration;

use support::{Child, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_run_their_whole_chain() {
    let env = TestEnv::new().await;
    let data = std::env::temp_dir().join(format!("scriptd-dev-{}", env.id));
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts-examples");
    let child = Child(
        env.daemon_command()
            .args(["dev", "--examples", examples, "--data"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn scriptd dev"),
    );
    let runs = env
        .wait_for_runs(Duration::from_secs(60), |runs| {
            runs.iter()
                .any(|r| r.script == "create-invoice" && r.status == "ok")
        })
        .await;
    let invoice = runs
        .iter()
        .find(|r| r.script == "create-invoice" && r.status == "ok")
        .unwrap();
    let logged = invoice.logs[0]["message"].as_str().unwrap();
    assert!(logged.starts_with("invoice inv-"), "{logged}");
    assert!(logged.ends_with("for order o-1"), "{logged}");
    let order = runs
        .iter()
        .find(|r| r.script == "order-created")
        .expect("order-created ran");
    assert_eq!(order.status, "ok", "{order:#?}");
    drop(child);
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
