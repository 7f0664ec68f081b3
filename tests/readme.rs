//! The README's own commands, run as written against the real services: "Your first script"
//! and the tour, in order, with the bundled examples deployed and a daemon running as
//! `scripts/scriptd dev` would have them. Each must succeed.

mod support;

use std::time::Duration;

use support::{shell_words, TestEnv};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The README's `target/release/scriptd ...` commands in order (continued lines joined,
/// comments cut), and the body of the one file it writes with a here-document.
fn readme() -> (Vec<Vec<String>>, Option<(String, String)>) {
    let text = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    let mut commands = Vec::new();
    let mut file = None;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("cat > ") {
            let path = rest.split_whitespace().next().unwrap().to_owned();
            let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "JS").collect();
            file = Some((path, body.join("\n")));
            continue;
        }
        let Some(mut command) = line
            .strip_prefix("target/release/scriptd ")
            .map(str::to_owned)
        else {
            continue;
        };
        while command.ends_with('\\') {
            command.pop();
            command.push_str(lines.next().unwrap_or_default().trim());
            command.push(' ');
        }
        let command = command.split("  #").next().unwrap_or_default();
        commands.push(shell_words(command));
    }
    (commands, file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_commands_run_as_written() {
    let env = TestEnv::new().await;
    let (commands, file) = readme();
    assert!(commands.len() >= 10, "{commands:?}");
    let (path, body) = file.expect("the README writes a first script");
    std::fs::write(&path, body).unwrap();
    for manifest in [
        "order-created",
        "create-invoice",
        "flaky-payment",
        "audit-log",
    ] {
        env.cli_ok(&[
            "scripts",
            "deploy",
            &format!("scripts-examples/{manifest}.toml"),
        ]);
    }
    let daemon = env.start_daemon();
    for words in &commands {
        if words.first().is_some_and(|w| w == "runs") {
            // `runs show 1` and the lists look at what the daemon recorded by then.
            env.wait_for_runs(Duration::from_secs(30), |runs| !runs.is_empty())
                .await;
        }
        let words: Vec<String> = words
            .iter()
            .map(|w| if w == "ID" { "1".to_owned() } else { w.clone() })
            .collect();
        env.cli_ok(&words);
    }
    let _ = std::fs::remove_file(&path);
    daemon.shutdown().await;
    env.cleanup().await;
}
