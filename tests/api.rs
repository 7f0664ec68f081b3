//! The HTTP API against a real daemon, NATS and PostgreSQL: tokens made with the CLI,
//! 401 / 403 / 404 as documented, a tenant's whole loop (deploy, publish, runs, dead
//! letter, replay) over HTTP, the audit trail, and every operation of `/openapi.json`
//! served and guarded.

mod support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::api::{start_with, token, Api, WAIT};
use support::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_may_do_what() {
    let env = TestEnv::new().await;
    let (daemon, api) = Api::start(&env).await;
    let (acme, acme_prefix) = token(&env, &["--tenant", "acme", "--label", "acme ci"]);
    let (operator, _) = token(&env, &["--role", "operator"]);
    let (revoked, revoked_prefix) = token(&env, &["--tenant", "acme"]);
    env.cli_ok(&["tokens", "revoke", &revoked_prefix]);
    let (expired, _) = env
        .store
        .create_token(
            "acme",
            scriptd::store::Role::Tenant,
            "",
            Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
        )
        .await
        .unwrap();
    let scripts = "/v1/tenants/acme/scripts";
    let wrong_secret = format!("sd_{acme_prefix}_not-the-secret");
    for (why, presented) in [
        ("no token", None),
        ("not a token", Some("hello")),
        ("a wrong secret", Some(wrong_secret.as_str())),
        ("a revoked token", Some(revoked.as_str())),
        ("an expired token", Some(expired.as_str())),
    ] {
        let (status, body) = api.call(Method::GET, scripts, presented, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}: {body}");
        assert_eq!(body["code"], "unauthenticated", "{why}");
    }
    assert_eq!(
        api.call(Method::GET, scripts, Some(&acme), None).await.0,
        StatusCode::OK
    );
    // Another tenant's resources: refused before anything is looked up, and a change is
    // refused into the audit trail.
    let (status, body) = api
        .call(Method::GET, "/v1/tenants/globex/scripts", Some(&acme), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = api
        .call(
            Method::PUT,
            "/v1/tenants/globex/scripts/x",
            Some(&acme),
            Some(json!({ "source": "export default () => 1" })),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(env.store.script("globex", "x").await.unwrap().is_none());
    let (status, trail) = api
        .call(
            Method::GET,
            "/v1/tenants/globex/audit",
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(trail["entries"][0]["actor"], acme_prefix.as_str());
    assert_eq!(trail["entries"][0]["action"], "scripts.deploy");
    assert_eq!(trail["entries"][0]["status"], 403);
    // An operator acts for every tenant.
    let (status, _) = api
        .call(
            Method::GET,
            "/v1/tenants/globex/scripts",
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // What the command line did is in the trail too, by login name.
    let (_, trail) = api
        .call(Method::GET, "/v1/tenants/acme/audit", Some(&operator), None)
        .await;
    let by_cli: Vec<(&str, &str)> = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["role"] == "cli")
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    assert!(
        by_cli.contains(&("tokens.revoke", revoked_prefix.as_str())),
        "{by_cli:?}"
    );
    assert!(
        by_cli.contains(&("tokens.create", acme_prefix.as_str())),
        "{by_cli:?}"
    );
    let listed: Value = serde_json::from_slice(
        &env.cli_ok(&["audit", "list", "--tenant", "acme", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(listed[0]["action"], "tokens.revoke", "{listed}");
    assert_eq!(listed[0]["target"], revoked_prefix.as_str());
    let text = String::from_utf8(env.cli_ok(&["audit", "list"]).stdout).unwrap();
    assert!(
        text.contains("scripts.deploy") && text.contains("globex"),
        "{text}"
    );
    // Tokens are listed without their secret, and stored only as a hash.
    let listed = String::from_utf8(env.cli_ok(&["tokens", "list", "--json"]).stdout).unwrap();
    assert!(listed.contains(&acme_prefix));
    assert!(!listed.contains(&acme[16..]), "a secret in the listing");
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_works_its_scripts_runs_and_dead_letters_over_http() {
    let env = TestEnv::new().await;
    let (daemon, api) = Api::start(&env).await;
    let (acme, _) = token(&env, &["--tenant", "acme"]);
    let (globex, _) = token(&env, &["--tenant", "globex"]);
    let acme = Some(acme.as_str());

    // Deploy TypeScript; a syntax error is refused with its line and column.
    let (status, deployed) = api
        .call(
            Method::PUT,
            "/v1/tenants/acme/scripts/double",
            acme,
            Some(json!({
                "source": "export default (e: { data: { n: number } }): number => e.data.n * 2;",
                "lang": "ts",
                "on": ["number.*"],
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{deployed}");
    assert_eq!(deployed["version"], 1);
    assert_eq!(deployed["live"], true, "answered once the daemon runs it");
    // Requests that are not what a route takes get the API's own JSON errors.
    let (status, wrong) = api
        .call(
            Method::PUT,
            "/v1/tenants/acme/scripts/double",
            acme,
            Some(json!({ "sauce": "x" })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{wrong}");
    assert_eq!(wrong["code"], "bad_request");
    // A problem document (RFC 9457) naming the member that is wrong.
    assert_eq!(wrong["status"], 400);
    assert_eq!(wrong["errors"][0]["pointer"], "/sauce", "{wrong}");
    let (status, wrong) = api
        .call(
            Method::PUT,
            "/v1/tenants/acme/scripts/double",
            acme,
            Some(json!({ "source": "export default () => 1", "on": ["ok", "bad..pattern"] })),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{wrong}");
    assert_eq!(wrong["errors"][0]["pointer"], "/on/1", "{wrong}");
    let (status, wrong) = api
        .call(
            Method::PUT,
            "/v1/tenants/acme/scripts/double",
            acme,
            Some(json!({ "source": "export default () => 1", "limits": { "timeout": 5 } })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{wrong}");
    assert_eq!(wrong["errors"][0]["pointer"], "/limits/timeout", "{wrong}");
    let huge = json!({ "source": "x".repeat(2 << 20) });
    let (status, wrong) = api
        .once()
        .call(
            Method::PUT,
            "/v1/tenants/acme/scripts/double",
            acme,
            Some(huge),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{wrong}");
    assert_eq!(wrong["code"], "too_large");
    let (status, wrong) = api
        .call(Method::GET, "/v1/tenants/acme/runs/latest", acme, None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{wrong}");
    assert_eq!(wrong["code"], "bad_request");
    assert_eq!(wrong["errors"][0]["parameter"], "id", "{wrong}");
    let (status, refused) = api
        .call(
            Method::PUT,
            "/v1/tenants/acme/scripts/double",
            acme,
            Some(json!({ "source": "export default (e: number) => e *;", "lang": "ts" })),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert!(refused["detail"].as_str().unwrap().contains("1:"));
    assert_eq!(refused["errors"][0]["pointer"], "/source", "{refused}");
    let (_, shown) = api
        .call(
            Method::GET,
            "/v1/tenants/acme/scripts/double?source=true",
            acme,
            None,
        )
        .await;
    assert_eq!(shown["language"], "typescript");
    assert_eq!(shown["version"], 1, "the refused deploy made no version");

    // Events in over HTTP, runs out, a page at a time.
    for n in 1..=3 {
        let (status, published) = api
            .call(
                Method::POST,
                "/v1/tenants/acme/events",
                acme,
                Some(json!({ "type": "number.in", "data": { "n": n } })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{published}");
    }
    env.wait_for_runs(WAIT, |runs| runs.len() == 3).await;
    let (_, page) = api
        .call(Method::GET, "/v1/tenants/acme/runs?limit=2", acme, None)
        .await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 2, "{page}");
    let next = page["next"].as_i64().expect("a next page");
    let (_, rest) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/acme/runs?limit=2&before={next}"),
            acme,
            None,
        )
        .await;
    assert_eq!(rest["runs"].as_array().unwrap().len(), 1, "{rest}");
    assert_eq!(rest["next"], Value::Null);
    let id = page["runs"][0]["id"].as_i64().unwrap();
    let (status, run) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/acme/runs/{id}"),
            acme,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(run["status"], "ok");
    assert!(run["result"].is_number(), "{run}");
    // Globex cannot see it, not even under its own name: 404, as if it did not exist.
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/globex/runs/{id}"),
            Some(&globex),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A dead letter, replayed over HTTP after a fix.
    let (status, _) = api
        .call(
            Method::PUT,
            "/v1/tenants/acme/scripts/charge",
            acme,
            Some(json!({
                "source": "export default () => { throw new Error('declined'); }",
                "on": ["pay"],
                "retry": { "max_attempts": 1 },
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    api.call(
        Method::POST,
        "/v1/tenants/acme/events",
        acme,
        Some(json!({ "type": "pay", "data": {} })),
    )
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    let sequence = loop {
        let (_, letters) = api
            .call(Method::GET, "/v1/tenants/acme/dead-letters", acme, None)
            .await;
        if let Some(first) = letters["dead_letters"].as_array().and_then(|l| l.first()) {
            break first["sequence"].as_u64().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter: {letters}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (status, _) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/globex/dead-letters/{sequence}/replay"),
            Some(&globex),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another tenant's letter");
    api.call(
        Method::PUT,
        "/v1/tenants/acme/scripts/charge",
        acme,
        Some(json!({ "source": "export default () => 'charged'", "on": ["pay"] })),
    )
    .await;
    let (status, shown) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/acme/dead-letters/{sequence}"),
            acme,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["runs"].as_array().unwrap().len(), 1, "{shown}");
    assert_eq!(
        shown["dead_letter"]["letter"]["failure"]["kind"],
        "exception"
    );
    let (status, tried) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/acme/dead-letters/{sequence}/replay"),
            acme,
            Some(json!({ "dry_run": true })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{tried}");
    assert_eq!(
        (tried["outcome"].as_str(), tried["version"].as_i64()),
        (Some("ok"), Some(2))
    );
    let (status, replayed) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/acme/dead-letters/{sequence}/replay"),
            acme,
            Some(json!({ "version": "latest" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    env.wait_for_runs(WAIT, |runs| {
        runs.iter()
            .any(|r| r.script == "charge" && r.status == "ok")
    })
    .await;
    let (_, letters) = api
        .call(Method::GET, "/v1/tenants/acme/dead-letters", acme, None)
        .await;
    assert_eq!(letters["dead_letters"], json!([]));

    // A purge counts first and deletes only when confirmed.
    api.call(
        Method::PUT,
        "/v1/tenants/acme/scripts/charge",
        acme,
        Some(json!({ "source": "export default () => { throw new Error('no'); }", "on": ["pay"], "retry": { "max_attempts": 1 } })),
    )
    .await;
    api.call(
        Method::POST,
        "/v1/tenants/acme/events",
        acme,
        Some(json!({ "type": "pay", "data": {} })),
    )
    .await;
    env.wait_for_runs(WAIT, |runs| {
        runs.iter()
            .any(|r| r.status == "dead_lettered" && r.version == Some(3))
    })
    .await;
    let purge = |confirm: bool| json!({ "script": "charge", "confirm": confirm });
    let (_, counted) = api
        .call(
            Method::POST,
            "/v1/tenants/acme/dead-letters/purge",
            acme,
            Some(purge(false)),
        )
        .await;
    assert_eq!(counted, json!({ "matching": 1, "deleted": 0 }));
    let (_, purged) = api
        .call(
            Method::POST,
            "/v1/tenants/acme/dead-letters/purge",
            acme,
            Some(purge(true)),
        )
        .await;
    assert_eq!(purged, json!({ "matching": 1, "deleted": 1 }));

    // The audit trail holds every change, refused ones included.
    let (_, trail) = api
        .call(Method::GET, "/v1/tenants/acme/audit", acme, None)
        .await;
    // (The token's making, by the command line, is there too, with role `cli`.)
    let actions: Vec<(String, i64)> = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .filter(|e| e["role"] != "cli")
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["status"].as_i64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, i64)> = [
        ("scripts.deploy", 200),
        // The pattern refused (422) and the syntax error; bodies that are not a deploy
        // (400) are turned away before anything is asked.
        ("scripts.deploy", 422),
        ("scripts.deploy", 422),
        ("events.publish", 200),
        ("events.publish", 200),
        ("events.publish", 200),
        ("scripts.deploy", 200),
        ("events.publish", 200),
        ("scripts.deploy", 200),
        ("dead_letters.replay_dry_run", 200),
        ("dead_letters.replay", 200),
        ("scripts.deploy", 200),
        ("events.publish", 200),
        ("dead_letters.purge", 200),
        ("dead_letters.purge", 200),
    ]
    .iter()
    .map(|(a, s)| (a.to_string(), *s))
    .collect();
    assert_eq!(actions, expected);
    daemon.shutdown().await;
    env.cleanup().await;
}

/// Checks `body` against the schema the document gives for `status` of `operation`; the
/// schema's `$ref`s resolve inside the document.
fn assert_matches(
    document: &Value,
    operation: &Value,
    status: StatusCode,
    body: &Value,
    what: &str,
) {
    // Answers are JSON, errors problem documents: whichever the status's content names.
    let content = &operation["responses"][status.as_str()]["content"];
    let Some(schema) = ["application/json", "application/problem+json"]
        .iter()
        .find_map(|media| content[media].get("schema"))
    else {
        return;
    };
    let mut root = schema.clone();
    root["components"] = document["components"].clone();
    let validator = jsonschema::draft202012::new(&root).expect("a schema of the document");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} answered {status} with {body} against its schema: {errors:?}"
    );
}

/// Every operation the document lists is served and guarded, and answers as documented:
/// without a token it is 401 (the fallback for unknown routes answers 404 without asking
/// for one); with an operator token, on a tenant with a script, a run and a dead letter,
/// it answers one of the statuses the document gives for it, with a body that matches
/// that status's schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served_as_documented() {
    let env = TestEnv::new().await;
    let (daemon, api) = Api::start(&env).await;
    let (operator, _) = token(&env, &["--role", "operator"]);
    let (status, served) = api.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let document: Value = serde_json::from_str(scriptd::api::OPENAPI).unwrap();
    assert_eq!(served, document);
    assert_eq!(document["openapi"], "3.1.0");
    // Something to show: a script whose run failed into a dead letter.
    let (status, _) = api
        .call(
            Method::PUT,
            "/v1/tenants/acme/scripts/probe",
            Some(&operator),
            Some(json!({
                "source": "export default () => { throw new Error('no'); }",
                "on": ["t"],
                "cron": "0 0 * * * *",
                "retry": { "max_attempts": 1 },
                "http": { "method": "GET", "path": "/probe" },
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    api.call(
        Method::POST,
        "/v1/tenants/acme/events",
        Some(&operator),
        Some(json!({ "type": "t", "data": {} })),
    )
    .await;
    env.wait_for_runs(WAIT, |runs| {
        runs.iter().any(|r| r.status == "dead_lettered")
    })
    .await;
    let (_, page) = api
        .call(Method::GET, "/v1/tenants/acme/runs", Some(&operator), None)
        .await;
    let run = page["runs"][0]["id"].as_i64().unwrap().to_string();
    let deadline = std::time::Instant::now() + WAIT;
    let letter = loop {
        let (_, letters) = api
            .call(
                Method::GET,
                "/v1/tenants/acme/dead-letters",
                Some(&operator),
                None,
            )
            .await;
        if let Some(first) = letters["dead_letters"].as_array().and_then(|l| l.first()) {
            break first["sequence"].as_u64().unwrap().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut operations = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{tenant}", "acme")
            .replace("{name}", "probe")
            .replace("{id}", &run)
            .replace("{sequence}", &letter)
            .replace("{version}", "1")
            .replace("{path}", "probe");
        for (method, operation) in item.as_object().unwrap() {
            operations += 1;
            let method: Method = method.to_uppercase().parse().unwrap();
            let what = format!("{method} {path}");
            let body = match operation["operationId"].as_str().unwrap() {
                "deployScript" => Some(json!({ "source": "export default () => 1", "on": ["t"] })),
                "publishEvent" => Some(json!({ "type": "t", "data": {} })),
                "replayDeadLetter" => Some(json!({ "dry_run": true })),
                "rollbackScript" => Some(json!({ "version": 1 })),
                "testScript" => Some(json!({ "data": {} })),
                "validateSource" => Some(json!({ "source": "export default () => 1" })),
                "putSecret" => Some(json!({ "value": "v" })),
                "putFetchAllow" => Some(json!({ "hosts": [] })),
                "purgeDeadLetters" => Some(json!({})),
                _ => None,
            };
            let open = operation["security"] == json!([]);
            let (status, answer) = api.call(method.clone(), &concrete, None, None).await;
            if open {
                assert_eq!(status, StatusCode::OK, "{what}");
                continue;
            }
            // A hook's token is per route: without one, what the route says (here a 401 for
            // the probe's token route, 405 for the methods it does not take).
            let per_route = operation["security"]
                .as_array()
                .is_some_and(|s| s.contains(&json!({})));
            let expected = match (per_route, method.clone()) {
                (true, m) if m != Method::GET => StatusCode::METHOD_NOT_ALLOWED,
                _ => StatusCode::UNAUTHORIZED,
            };
            assert_eq!(status, expected, "{what}: {answer}");
            assert_matches(&document, operation, status, &answer, &what);
            let (status, answer) = api
                .call(method.clone(), &concrete, Some(&operator), body)
                .await;
            let documented = operation["responses"]
                .as_object()
                .unwrap()
                .contains_key(status.as_str());
            assert!(documented, "{what} answered {status}: {answer}");
            assert_matches(&document, operation, status, &answer, &what);
        }
    }
    assert!(operations >= 30, "{operations} operations");
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_trials_settings_and_schedules_over_http() {
    let env = TestEnv::new().await;
    let key = scriptd::caps::secrets::SecretBox::generate_key();
    let (daemon, api) = start_with(&env, |s| s.capabilities.secrets.key = key.clone()).await;
    let (acme, _) = token(&env, &["--tenant", "acme"]);
    let (operator, _) = token(&env, &["--role", "operator"]);
    let acme = Some(acme.as_str());
    let deploy = |source: &str| json!({ "source": source, "on": ["x"], "cron": "0 0 3 * * *", "timezone": "Europe/Paris" });
    let counter = "export default async (e, ctx) => { const n = (await ctx.kv.get('n')) ?? 0; \
                   await ctx.kv.set('n', n + e.data.by); await ctx.publish('counted', { n }); \
                   return { n: n + e.data.by, token: (await ctx.secrets.get('api')) === 's3cret' }; }";
    for source in [counter, "export default () => 'v2'"] {
        let (status, body) = api
            .call(
                Method::PUT,
                "/v1/tenants/acme/scripts/count",
                acme,
                Some(deploy(source)),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, versions) = api
        .call(
            Method::GET,
            "/v1/tenants/acme/scripts/count/versions",
            acme,
            None,
        )
        .await;
    assert_eq!(
        versions["versions"].as_array().unwrap().len(),
        2,
        "{versions}"
    );
    let (status, rolled) = api
        .call(
            Method::POST,
            "/v1/tenants/acme/scripts/count/rollback",
            acme,
            Some(json!({ "version": 1 })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    assert_eq!(rolled["live"], true);

    // Secrets: set by the tenant, listed by name, never returned.
    let (status, _) = api
        .call(
            Method::PUT,
            "/v1/tenants/acme/secrets/api",
            acme,
            Some(json!({ "value": "s3cret" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    env.store.kv_set("acme", "n", "40", 1 << 20).await.unwrap();
    // A test run reads what a run would and changes nothing.
    let (status, tried) = api
        .call(
            Method::POST,
            "/v1/tenants/acme/scripts/count/test",
            acme,
            Some(json!({ "type": "x", "data": { "by": 2 } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{tried}");
    assert_eq!(
        tried["run"]["result"],
        json!({ "n": 42, "token": true }),
        "{tried}"
    );
    assert_eq!(tried["would"]["kv_writes"], json!({ "n": 42 }));
    assert_eq!(tried["would"]["published"].as_array().unwrap().len(), 1);
    assert_eq!(
        env.store.kv_get("acme", "n").await.unwrap().as_deref(),
        Some("40")
    );
    assert!(env.runs().await.is_empty(), "a test run is not recorded");
    // Validation without storing: a TypeScript syntax error at its line and column.
    let (_, checked) = api
        .call(
            Method::POST,
            "/v1/tenants/acme/validate",
            acme,
            Some(json!({ "source": "const a: number = 1;\nexport default () => a +;", "lang": "ts" })),
        )
        .await;
    assert_eq!(checked["ok"], false);
    assert_eq!(
        (checked["line"].as_i64(), checked["kind"].as_str()),
        (Some(2), Some("syntax"))
    );

    // Settings: the allow list is an operator's to change.
    let hosts = json!({ "hosts": ["api.example.com"] });
    let (status, _) = api
        .call(
            Method::PUT,
            "/v1/tenants/acme/fetch-allow",
            acme,
            Some(hosts.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api
        .call(
            Method::PUT,
            "/v1/tenants/acme/fetch-allow",
            Some(&operator),
            Some(hosts),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, settings) = api
        .call(Method::GET, "/v1/tenants/acme/settings", acme, None)
        .await;
    assert_eq!(settings["fetch_allow"], json!(["api.example.com"]));
    assert_eq!(settings["secrets"][0]["name"], "api");
    assert!(!settings.to_string().contains("s3cret"), "{settings}");

    // Schedules with their next occurrences, at 03:00 in Paris.
    let (_, schedules) = api
        .call(Method::GET, "/v1/tenants/acme/schedules?next=3", acme, None)
        .await;
    let next = schedules["schedules"][0]["next"].as_array().unwrap();
    assert_eq!(next.len(), 3, "{schedules}");
    for at in next {
        let at: chrono::DateTime<chrono::Utc> = at.as_str().unwrap().parse().unwrap();
        let paris = at.with_timezone(&chrono_tz::Europe::Paris);
        assert_eq!(paris.format("%H:%M:%S").to_string(), "03:00:00", "{at}");
    }
    let (_, trail) = api
        .call(Method::GET, "/v1/tenants/acme/audit", acme, None)
        .await;
    let actions: Vec<&str> = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in ["scripts.rollback", "secrets.set", "tenants.fetch_allow"] {
        assert!(actions.contains(&action), "{action} missing: {actions:?}");
    }
    assert!(!trail.to_string().contains("s3cret"));
    daemon.shutdown().await;
    env.cleanup().await;
}
