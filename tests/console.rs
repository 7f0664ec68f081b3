//! The web console: served from the binary beside the API, the API routes it reads
//! (tenants, overview, a version's source, a job's attempts, every tenant's runs, trace ids),
//! and its main flows driven in Debian's Chromium by Playwright (`console/e2e/console.mjs`).

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::api::{token, Api, WAIT};
use support::TestEnv;

/// Deploys `source` at `/v1/tenants/<path>` on events `on`; the API answers once the
/// daemon runs it.
async fn deploy(api: &Api, token: &str, path: &str, source: &str, on: &str) {
    let (status, body) = api
        .call(
            Method::PUT,
            &format!("/v1/tenants/{path}"),
            Some(token),
            Some(json!({ "source": source, "on": [on] })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["live"], true, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_and_what_it_reads_are_served() {
    let env = TestEnv::new().await;
    let (daemon, api) = Api::start(&env).await;
    let (acme, _) = token(&env, &["--tenant", "acme"]);
    let (operator, _) = token(&env, &["--role", "operator"]);
    let (acme, operator) = (Some(acme.as_str()), Some(operator.as_str()));

    // The page and its assets, from this origin only.
    let page = api
        .http
        .get(format!("{}/console/", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("default-src 'self'"), "{policy}");
    assert!(page.text().await.unwrap().contains("app.js"));
    let script = api
        .http
        .get(format!("{}/console/app.js", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        script.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(script.bytes().await.unwrap().len() > 10_000);
    let root = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(root.headers()["location"], "/console/");

    // Two versions, a run with a trace, a failing script's dead letter.
    for source in [
        "export default (e) => e.data.n",
        "export default (e) => e.data.n * 2",
    ] {
        deploy(
            &api,
            acme.unwrap(),
            "acme/scripts/double",
            source,
            "number.*",
        )
        .await;
    }
    for (path, source, on) in [
        (
            "acme/scripts/broken",
            "export default () => { throw new Error('no') }",
            "number.*",
        ),
        ("globex/scripts/other", "export default () => 1", "thing.*"),
    ] {
        deploy(&api, operator.unwrap(), path, source, on).await;
    }
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    env.publish_traced(
        "acme",
        "number.one",
        r#"{"n": 21}"#,
        &format!("00-{trace}-00f067aa0ba902b7-01"),
    )
    .await;
    env.publish("globex", "thing.new", "{}").await;
    let runs = env
        .wait_for_runs(WAIT, |runs| {
            runs.iter().any(|r| r.status == "dead_lettered")
                && runs.iter().any(|r| r.script == "double")
                && runs.iter().any(|r| r.script == "other")
        })
        .await;
    let broken = runs.iter().find(|r| r.status == "dead_lettered").unwrap();

    // The tenant picker: an operator sees every tenant, a tenant itself.
    let (_, tenants) = api.call(Method::GET, "/v1/tenants", operator, None).await;
    let names = tenants["tenants"].as_array().unwrap();
    assert!(
        names.contains(&json!("acme")) && names.contains(&json!("globex")),
        "{tenants}"
    );
    let (_, tenants) = api.call(Method::GET, "/v1/tenants", acme, None).await;
    assert_eq!(tenants, json!({ "tenants": ["acme"] }));

    // Every tenant's runs for an operator; a tenant token cannot ask for them.
    let (status, all) = api
        .call(Method::GET, "/v1/tenants/*/runs", operator, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let of = |t: &str| {
        all["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["tenant"] == t)
    };
    assert!(of("acme") && of("globex"), "{all}");
    let (status, _) = api
        .call(Method::GET, "/v1/tenants/*/runs", acme, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A job's attempts, and the trace id its event came with.
    let path = format!("/v1/tenants/acme/runs?job={}", broken.job_id);
    let (_, attempts) = api.call(Method::GET, &path, acme, None).await;
    let attempts = attempts["runs"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "the retry policy's three attempts");
    assert!(attempts
        .iter()
        .all(|r| r["job_id"] == broken.job_id.as_str()));
    assert!(
        attempts.iter().all(|r| r["trace_id"] == trace),
        "{attempts:?}"
    );

    // A version's source, to compare two.
    let (_, first) = api
        .call(
            Method::GET,
            "/v1/tenants/acme/scripts/double/versions/1",
            acme,
            None,
        )
        .await;
    assert_eq!(first["source"], "export default (e) => e.data.n");
    let (status, _) = api
        .call(
            Method::GET,
            "/v1/tenants/acme/scripts/double/versions/9",
            acme,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The overview: this hour's runs by minute and status, and the dead letter waiting.
    let (status, overview) = api
        .call(Method::GET, "/v1/tenants/acme/overview", acme, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{overview}");
    assert_eq!(overview["minutes"].as_array().unwrap().len(), 60);
    let counted = |status: &str| -> i64 {
        overview["minutes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["runs"][status].as_i64())
            .sum()
    };
    assert_eq!(counted("dead_lettered"), 1, "{overview}");
    assert_eq!(counted("retrying"), 2, "{overview}");
    assert_eq!(counted("ok"), 1, "{overview}");
    assert_eq!(overview["runs"], 4);
    assert_eq!(overview["dead_letters"], 1);
    assert!(overview["p50_ms"].as_f64().unwrap() > 0.0, "{overview}");
    let (status, _) = api
        .call(Method::GET, "/v1/tenants/globex/overview", acme, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    daemon.shutdown().await;
    env.cleanup().await;
}

/// Runs `console/e2e/console.mjs` (Playwright with Debian's Chromium) against a daemon
/// with the API and a tenant token; the script drives the console and saves screenshots
/// in `target/console-screenshots`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_drives_the_main_flows_in_a_browser() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let console = root.join("console");
    assert!(
        console.join("node_modules/playwright-core").is_dir()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "the browser test needs console/node_modules and /usr/bin/chromium: run scripts/setup"
    );
    let env = TestEnv::new().await;
    let (daemon, api) = Api::start(&env).await;
    let (acme, _) = token(&env, &["--tenant", "acme"]);
    for (name, source, on) in [
        (
            "greet",
            "export default (e) => ({ hello: e.data.name })",
            "greet.*",
        ),
        (
            "charge",
            "export default (e) => { throw new Error('card declined for ' + e.data.order) }",
            "order.*",
        ),
    ] {
        deploy(&api, &acme, &format!("acme/scripts/{name}"), source, on).await;
    }
    let shots = root.join("target/console-screenshots");
    let out = tokio::process::Command::new("node")
        .arg(console.join("e2e/console.mjs"))
        .current_dir(&console)
        .env("CONSOLE_URL", format!("{}/console/", api.base))
        .env("CONSOLE_TOKEN", &acme)
        .env("CONSOLE_TENANT", "acme")
        .env("CONSOLE_SHOTS", &shots)
        .output()
        .await
        .expect("node runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{log}");
    assert!(out.status.success(), "the console flows failed:\n{log}");
    // What the browser did, as the daemon recorded it.
    let runs = env.runs().await;
    assert!(runs.iter().any(|r| r.script == "greet" && r.status == "ok"));
    let charge: Vec<_> = runs.iter().filter(|r| r.script == "charge").collect();
    assert!(
        charge
            .iter()
            .any(|r| r.status == "ok" && r.version == Some(2)),
        "the replay ran the fixed version: {charge:?}"
    );
    let (_, audit) = api
        .call(Method::GET, "/v1/tenants/acme/audit", Some(&acme), None)
        .await;
    let actions: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["action"])
        .collect();
    for action in ["scripts.deploy", "dead_letters.replay", "events.publish"] {
        assert!(
            actions.contains(&&json!(action)),
            "{action} audited: {audit}"
        );
    }
    assert!(shots.join("run.png").is_file());
    daemon.shutdown().await;
    env.cleanup().await;
}
