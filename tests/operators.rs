//! What operators do from the command line: look at scripts and their versions, roll back,
//! validate a file, read the run history. The `scriptd` binary against real services.

mod support;

use std::time::Duration;

use support::{json, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_show_and_rollback_restore_the_old_behaviour() {
    let env = TestEnv::new().await;
    env.deploy(
        "acme",
        "greeter",
        "export default () => { console.log('v1 here'); return 'v1'; }",
        &["hello"],
    )
    .await;
    env.deploy("acme", "greeter", "export default () => 'v2'", &["hello"])
        .await;
    let versions = json(
        env.daemon_command()
            .args([
                "scripts", "versions", "--tenant", "acme", "--name", "greeter", "--json",
            ])
            .output()
            .unwrap(),
    );
    let listed: Vec<(i64, bool)> = versions
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_i64().unwrap(),
                v["current"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed, [(2, true), (1, false)]);
    let shown = json(
        env.daemon_command()
            .args([
                "scripts", "show", "--tenant", "acme", "--name", "greeter", "--json", "--source",
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(shown["version"], 2);
    assert_eq!(shown["source"], "export default () => 'v2'");

    let daemon = env.start_daemon();
    env.publish("acme", "hello", "{}").await;
    let runs = env
        .wait_for_runs(Duration::from_secs(30), |r| r.len() == 1)
        .await;
    assert_eq!(runs[0].version, Some(2));

    let out = env
        .daemon_command()
        .args([
            "scripts", "rollback", "--tenant", "acme", "--name", "greeter", "1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let before = env.runs().await.len();
        env.publish("acme", "hello", "{}").await;
        let runs = env
            .wait_for_runs(Duration::from_secs(30), |r| r.len() > before)
            .await;
        if runs.last().unwrap().version == Some(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rollback did not take effect"
        );
    }
    let missing = env
        .daemon_command()
        .args([
            "scripts", "rollback", "--tenant", "acme", "--name", "greeter", "7",
        ])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no version 7"));

    // The run history: list, filter, show with logs.
    let listed = json(
        env.daemon_command()
            .args([
                "runs", "list", "--tenant", "acme", "--script", "greeter", "--json",
            ])
            .output()
            .unwrap(),
    );
    let runs = listed.as_array().unwrap();
    assert!(runs.len() >= 2);
    assert!(runs.iter().all(|r| r["status"] == "ok"));
    let newest = &runs[0];
    assert_eq!(newest["version"], 1);
    let id = newest["id"].as_i64().unwrap().to_string();
    let shown = json(
        env.daemon_command()
            .args(["runs", "show", &id, "--json"])
            .output()
            .unwrap(),
    );
    assert_eq!(shown["logs"][0]["message"], "v1 here");
    // What it was given and what it returned.
    assert_eq!(shown["result"], "v1");
    let input = shown["input_ref"].as_str().unwrap();
    assert!(
        input.starts_with(&format!("{}:", env.settings.nats.events_stream())),
        "{input}"
    );
    let text = env
        .daemon_command()
        .args(["runs", "show", &id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("  result:   \"v1\""), "{text}");
    assert!(text.contains(&format!("  input:    {input}")), "{text}");
    let none = json(
        env.daemon_command()
            .args(["runs", "list", "--status", "dead_lettered", "--json"])
            .output()
            .unwrap(),
    );
    assert_eq!(none, serde_json::json!([]));
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_reports_errors_with_line_and_column() {
    let env = TestEnv::new().await;
    let bad = env.write_script(
        "bad.js",
        "// a comment\nexport default function () {\n  return {a: };\n}\n",
    );
    let out = env
        .daemon_command()
        .args(["scripts", "validate"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("bad.js:3:"), "{stdout}");
    assert!(stdout.contains("syntax"), "{stdout}");
    let good = env.write_script("good.js", "export default () => 1;\n");
    let out = env
        .daemon_command()
        .args(["scripts", "validate"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    env.cleanup().await;
}

/// A port on loopback with nothing listening: bound, then closed.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_bad_input_from_an_unavailable_service() {
    let env = TestEnv::new().await;
    let code = |args: &[&str], envs: &[(&str, String)]| {
        env.daemon_command()
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap()
            .status
            .code()
    };
    let no_database = [(
        "SCRIPTD_DATABASE__URL",
        format!("postgres://postgres@127.0.0.1:{}/x", closed_port()),
    )];
    assert_eq!(code(&["scripts", "list"], &no_database), Some(69));
    let no_nats = [(
        "SCRIPTD_NATS__URL",
        format!("nats://127.0.0.1:{}", closed_port()),
    )];
    assert_eq!(code(&["dlq", "list"], &no_nats), Some(69));
    // Bad input stays 2, whatever the services do.
    assert_eq!(
        code(
            &["scripts", "show", "--tenant", "acme", "--name", "none"],
            &[]
        ),
        Some(2)
    );
    assert_eq!(code(&["scripts", "list"], &[]), Some(0));
    env.cleanup().await;
}

#[test]
fn variables_of_other_programs_are_left_alone_and_a_typo_is_refused() {
    let config = |envs: &[(&str, &str)]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_scriptd"))
            .arg("config")
            .envs(envs.iter().copied())
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    // What Kubernetes puts into every pod beside a Service named `scriptd`.
    let out = config(&[
        ("SCRIPTD_PORT", "tcp://10.0.0.7:8080"),
        ("SCRIPTD_SERVICE_HOST", "10.0.0.7"),
        ("SCRIPTD_ENGINE__WORKERS", "3"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("workers = 3"));
    assert_eq!(stderr.matches("are ignored").count(), 1, "{stderr}");
    assert!(
        stderr.contains("SCRIPTD_PORT, SCRIPTD_SERVICE_HOST"),
        "{stderr}"
    );
    let out = config(&[("SCRIPTD_ENGINE__LIMITS__TIMOUT", "1s")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SCRIPTD_ENGINE__LIMITS__TIMOUT names no setting"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_deploys_as_the_readme_says_and_a_bare_file_asks_for_its_owner() {
    let env = TestEnv::new().await;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts-examples");
    let out = env
        .daemon_command()
        .args(["scripts", "deploy"])
        .arg(examples.join("order-created.toml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("deployed acme/order-created v1"), "{said}");
    let out = env
        .daemon_command()
        .args(["scripts", "deploy"])
        .arg(examples.join("order-created.js"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("needs --tenant and --name"), "{stderr}");
    env.cleanup().await;
}

#[test]
fn input_that_cannot_work_is_refused_with_what_to_do_instead() {
    let js =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts-examples/order-created.js");
    let js = js.to_str().unwrap();
    let refused = |args: &[&str], says: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_scriptd"))
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    refused(
        &[
            "events",
            "publish",
            "acme",
            "order.created",
            r#"{"id":"o-3","#,
        ],
        "the payload is not JSON",
    );
    let deploy = |extra: &[&str]| {
        let mut args = vec![
            "scripts", "deploy", js, "--tenant", "acme", "--name", "orders",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    for (extra, says) in [
        (
            &["--on", "events.acme.order.created"][..],
            "give the event type relative to the tenant, as in \"order.created\"",
        ),
        (
            &["--on", "order.created", "--max-attempts", "0"][..],
            "max_attempts of acme/orders is 0",
        ),
        (
            &["--on", "order.created", "--timeout", "0s"][..],
            "timeout of acme/orders is 0",
        ),
        (
            &["--on", "order.created", "--tz", "Europe/Paris"][..],
            "a time zone (Europe/Paris) is for a schedule",
        ),
    ] {
        let args = deploy(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&args, says);
    }
    refused(
        &["runs", "list", "--status", "crashed"],
        "one of ok, retrying, dead_lettered, skipped, failed",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_script_shows_its_schedule() {
    let env = TestEnv::new().await;
    env.deploy_scheduled(
        "nightly",
        "export default () => 1",
        "0 0 3 * * *",
        scriptd::domain::Overlap::Skip,
        Default::default(),
    )
    .await;
    let said = |args: &[&str]| {
        let out = env.daemon_command().args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = said(&["scripts", "list", "--tenant", "acme"]);
    assert!(listed.contains("cron 0 0 3 * * * (UTC)"), "{listed}");
    let shown = said(&["scripts", "show", "--tenant", "acme", "--name", "nightly"]);
    assert!(
        shown.contains("schedule:  0 0 3 * * * (UTC), overlap skip, catch-up none"),
        "{shown}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_log_plainly_and_without_the_nats_clients_chatter() {
    let env = TestEnv::new().await;
    let out = env
        .daemon_command()
        .args(["events", "publish", "acme", "order.created", "{}"])
        .env("SCRIPTD_LOG__FILTER", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("connected successfully"), "{stderr}");
    assert!(!stderr.contains("event: closed"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr:?}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_waits_for_nats_naming_it_and_stops_on_a_database_that_does_not_exist() {
    let env = TestEnv::new().await;
    // NATS not there: the daemon says what it waits for, and keeps waiting.
    let url = format!("nats://127.0.0.1:{}", closed_port());
    let mut waiting = env
        .daemon_command()
        .arg("run")
        .env("SCRIPTD_NATS__URL", &url)
        .env("SCRIPTD_LOG__FILTER", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = waiting.stderr.take().unwrap();
    let said = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("Waiting for NATS at"))
    });
    let line = said.join().unwrap().expect("a line about waiting for NATS");
    assert!(line.contains(&url), "{line}");
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "it waits rather than exits"
    );
    waiting.kill().unwrap();
    let _ = waiting.wait();
    // A database that does not exist is not waited for.
    let started = std::time::Instant::now();
    let out = env
        .daemon_command()
        .arg("run")
        .env(
            "SCRIPTD_DATABASE__URL",
            format!("postgres://postgres@127.0.0.1:5432/scriptd_none_{}", env.id),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "gave up after {:?}",
        started.elapsed()
    );
    env.cleanup().await;
}

#[test]
fn scripts_test_takes_a_payload_as_events_publish_does_or_a_whole_event() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts-examples/order-created.js"
    );
    let test = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_scriptd"))
            .args(["scripts", "test", example, "--tenant", "acme", "--json"])
            .args(extra)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let payload = r#"{"id": "o-9", "items": [{"price": 2, "qty": 3}]}"#;
    let out = test(&["--data", payload, "--type", "order.created"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(shown["status"], "ok", "{shown}");
    assert_eq!(shown["result"]["total"], 6, "{shown}");
    // A payload given as the whole event ran with `event.data` undefined; now it is refused.
    let out = test(&["--event", payload]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("use --data"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_says_which_settings_it_changed() {
    let env = TestEnv::new().await;
    let js = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts-examples/order-created.js"
    );
    let deploy = |extra: &[&str]| {
        let out = env
            .daemon_command()
            .args([
                "scripts", "deploy", js, "--tenant", "acme", "--name", "orders",
            ])
            .args(["--on", "order.created"])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = deploy(&["--timeout", "30s"]);
    assert!(!first.contains("settings changed"), "{first}");
    let again = deploy(&[]);
    assert!(again.contains("source unchanged, still v1"), "{again}");
    assert!(
        again.contains("settings changed: limits.timeout 30s → default (5s)"),
        "{again}"
    );
    let same = deploy(&[]);
    assert!(!same.contains("settings changed"), "{same}");
    env.cleanup().await;
}

#[test]
fn without_a_secrets_key_the_error_points_at_the_one_dev_made() {
    let dir = std::env::temp_dir().join(format!("scriptd-devkey-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("target/dev")).unwrap();
    std::fs::write(dir.join("target/dev/secrets.key"), "x").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scriptd"))
        .args(["secrets", "set", "acme", "api-key", "--from-env", "HOME"])
        .current_dir(&dir)
        .env_remove("SCRIPTD_CAPABILITIES__SECRETS__KEY")
        .env_remove("SCRIPTD_CAPABILITIES__SECRETS__KEY_FILE")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SCRIPTD_CAPABILITIES__SECRETS__KEY_FILE=target/dev/secrets.key"),
        "{stderr}"
    );
}

#[test]
fn help_describes_every_argument_keeps_global_options_apart_and_shows_examples() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_scriptd"))
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for command in [
        &["scripts", "deploy"][..],
        &["scripts", "test"],
        &["events", "publish"],
        &["dlq", "replay"],
    ] {
        let text = help(command);
        assert!(
            text.contains("Examples:\n  scriptd "),
            "{command:?}:\n{text}"
        );
        let (own, global) = text
            .split_once("Global options:")
            .expect("a heading of their own");
        assert!(!own.contains("--config"), "{command:?}:\n{text}");
        assert!(global.contains("--config"), "{command:?}:\n{text}");
    }
    // Every argument says what it is, positional ones included: in the long help each
    // argument's line is followed by its description.
    let deploy = help(&["scripts", "deploy"]);
    let lines: Vec<&str> = deploy.lines().collect();
    let start = lines.iter().position(|l| *l == "Arguments:").unwrap();
    for (i, line) in lines.iter().enumerate().skip(start) {
        let item = line.trim_start();
        if line.starts_with("  ") && (item.starts_with("--") || item.starts_with('<')) {
            let next = lines.get(i + 1).map_or("", |n| n.trim());
            assert!(!next.is_empty(), "{item} has no description:\n{deploy}");
        }
    }
}
