//! `compose.yaml` as an operator meets it (no Docker engine here): it follows the Compose
//! specification (read and validated by the `compose_spec` crate), the files it mounts and
//! builds from exist, every `SCRIPTD_` variable it sets is a setting, and every `scriptd`
//! command in it and in its comments runs as written against the real services.

mod support;

use std::path::Path;

use support::TestEnv;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn compose() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("compose.yaml")).expect("compose.yaml")
}

/// The words of each `scriptd ...` command the file gives: in `command: [...]` lists and
/// after `docker compose exec scriptd` in its comments.
fn commands(text: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for line in text.lines() {
        if let Some(list) = line.trim().strip_prefix("command: [\"scriptd\"") {
            let words = list
                .trim_end_matches(']')
                .split(',')
                .map(|w| w.trim().trim_matches('"').to_owned())
                .filter(|w| !w.is_empty())
                .collect();
            found.push(words);
        }
        if let Some(rest) = line.split("docker compose exec scriptd scriptd ").nth(1) {
            found.push(support::shell_words(rest));
        }
    }
    found
}

/// compose.yaml as a Compose implementation reads it.
fn parsed(text: &str) -> Result<compose_spec::Compose, String> {
    let compose = compose_spec::Compose::options()
        .from_yaml_str(text)
        .map_err(|e| e.to_string())?;
    compose.validate_all().map_err(|e| e.to_string())?;
    Ok(compose)
}

#[test]
fn compose_yaml_follows_the_compose_specification() {
    let text = compose();
    let compose = parsed(&text).unwrap_or_else(|e| panic!("compose.yaml: {e}"));
    let services: Vec<&str> = compose.services.keys().map(|k| k.as_str()).collect();
    assert_eq!(services, ["nats", "postgres", "scriptd"]);
    let scriptd = &compose.services["scriptd"];
    let compose_spec::ShortOrLong::Long(depends_on) = &scriptd.depends_on else {
        panic!("scriptd's depends_on has no conditions");
    };
    let on: Vec<&str> = depends_on.keys().map(|k| k.as_str()).collect();
    assert_eq!(on, ["postgres", "nats"]);
    // The check can fail: a misspelt key is refused.
    let typo = text.replace(
        "    environment:\n      SCRIPTD_",
        "    enviroment:\n      SCRIPTD_",
    );
    assert_ne!(typo, text);
    assert!(parsed(&typo).is_err(), "a misspelt key passed");
}

#[test]
fn what_compose_mounts_and_builds_from_exists() {
    let text = compose();
    for path in ["Dockerfile", "nats/nats-server.conf", "scripts-examples"] {
        assert!(Path::new(ROOT).join(path).exists(), "{path} is missing");
    }
    assert!(text.contains("./nats/nats-server.conf:/etc/nats/nats-server.conf"));
    assert!(text.contains("./scripts-examples:/srv/scripts-examples"));
}

#[test]
fn every_variable_compose_sets_is_a_setting() {
    let text = compose();
    let vars: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(k, _)| k.starts_with("SCRIPTD_"))
        .collect();
    assert!(vars.len() >= 3, "{vars:?}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scriptd"))
        .arg("config")
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("are ignored"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_compose_gives_runs_as_written() {
    let env = TestEnv::new().await;
    let found = commands(&compose());
    assert!(found.len() >= 3, "{found:?}");
    for words in found {
        if words == ["run"] {
            // The daemon: it parses and starts (its readiness is the other tests' work).
            env.cli_ok(&["run", "--help"]);
            continue;
        }
        env.cli_ok(&words);
    }
    env.cleanup().await;
}
