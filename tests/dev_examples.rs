//! `scriptd dev` on the bundled examples, as the README runs it: every example deploys, and
//! the order example's chain (key-value, publish, secret, fetch of the local billing API)
//! ends in an invoice; the HTTP API is on with an operator token, and the HTTP example
//! takes an order as printed.

mod support;

use std::time::Duration;

use support::{Child, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_run_their_whole_chain() {
    let env = TestEnv::new().await;
    let data = std::env::temp_dir().join(format!("scriptd-dev-{}", env.id));
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts-examples");
    let mut child = Child(
        env.daemon_command()
            .args(["dev", "--examples", examples, "--data"])
            .arg(&data)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn scriptd dev"),
    );
    // What dev prints, line by line, as it prints it.
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn({
        let printed = printed.clone();
        move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                printed.lock().unwrap().push(line);
            }
        }
    });
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
    // One line per run as it is recorded, and commands that run as printed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let lines = printed.lock().unwrap().clone();
        // Relative to the directory it runs in, as dev prints it.
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_scriptd"));
        let here = std::env::current_dir().unwrap();
        let bin = bin.strip_prefix(&here).unwrap_or(bin).display().to_string();
        let hints = lines
            .iter()
            .any(|l| l.contains(&format!("{bin} runs list --tenant acme")));
        let run = lines.iter().any(|l| {
            l.contains("acme/create-invoice v1 attempt 1 ok") && l.contains(": invoice inv-")
        });
        if hints && run {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dev printed:\n{}",
            lines.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The API is on, with an operator token, and the HTTP example takes an order that the
    // order and invoice scripts then handle, all as printed.
    let lines = printed.lock().unwrap().clone();
    let after = |start: &str, end: &str| -> String {
        let line = lines.iter().find(|l| l.contains(start)).expect(start);
        let rest = &line[line.find(start).unwrap() + start.len()..];
        rest.split(end).next().unwrap().to_owned()
    };
    let hook = after("curl -X POST ", " ");
    let token = after("export API_TOKEN=", " ");
    let runs_url = after("$API_TOKEN\" ", " ");
    let http = reqwest::Client::new();
    let taken = http
        .post(&hook)
        .header("content-type", "application/json")
        .body(r#"{"id":"o-3","items":[{"price":4,"qty":1}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(taken.status(), reqwest::StatusCode::ACCEPTED);
    let listed = http
        .get(&runs_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), reqwest::StatusCode::OK);
    env.wait_for_runs(Duration::from_secs(30), |runs| {
        runs.iter().any(|r| {
            r.script == "order-created" && r.status == "ok" && r.logs.to_string().contains("o-3")
        })
    })
    .await;
    drop(child);
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
