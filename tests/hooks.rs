//! HTTP-triggered scripts against a real daemon, NATS and PostgreSQL: a request runs the
//! script bound to its route and gets its answer; the run is recorded (trigger `http`,
//! the request as input); token and public routes, 401/403/404/405/413; a failure is a 500
//! and a time limit a 504, each naming the run and not its internals, and neither retried.

mod support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::api::{token, Api, WAIT};
use support::TestEnv;

/// `PUT`s a script with `settings` (its source included) as `token`; the answer.
async fn deploy(api: &Api, token: &str, name: &str, settings: Value) -> (StatusCode, Value) {
    api.call(
        Method::PUT,
        &format!("/v1/tenants/acme/scripts/{name}"),
        Some(token),
        Some(settings),
    )
    .await
}

/// A request to a hook: its status, headers and body.
async fn request(
    api: &Api,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = api
        .http
        .request(method, format!("{}/hooks/acme{path}", api.base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some((content_type, body)) = body {
        request = request.header("content-type", content_type).body(body);
    }
    let response = request.send().await.expect("the daemon answers");
    let (status, headers) = (response.status(), response.headers().clone());
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, value)
}

/// The run an answer names in its `scriptd-run-id` header, as the API shows it.
async fn run_of(api: &Api, token: &str, headers: &reqwest::header::HeaderMap) -> Value {
    let id = headers["scriptd-run-id"].to_str().unwrap();
    let (status, run) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/acme/runs/{id}"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{run}");
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_runs_the_script_of_its_route_and_gets_its_answer() {
    let env = TestEnv::new().await;
    let (daemon, api) = Api::start(&env).await;
    let (acme, _) = token(&env, &["--tenant", "acme"]);
    let (globex, _) = token(&env, &["--tenant", "globex"]);
    let (status, deployed) = deploy(
        &api,
        &acme,
        "orders",
        json!({
            "source": "export default (req) => ({ status: 201, \
                headers: { 'x-order': req.params.id }, \
                body: { id: req.params.id, qty: req.body.qty, tag: req.query.tag, \
                        method: req.method, route: req.route, encoding: req.encoding, \
                        auth: req.headers.authorization ?? null } })",
            "http": { "method": "POST", "path": "/orders/{id}" },
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{deployed}");
    assert_eq!(deployed["live"], true);

    let order = Some(("application/json", br#"{"qty": 3}"#.to_vec()));
    let (status, headers, answer) = request(
        &api,
        Method::POST,
        "/orders/42?tag=a&tag=b",
        Some(&acme),
        order.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(headers["x-order"], "42");
    assert_eq!(
        answer,
        json!({ "id": "42", "qty": 3, "tag": ["a", "b"], "method": "POST",
                "route": "/orders/{id}", "encoding": "json", "auth": null })
    );
    // Recorded like any run, the request as its input (the token left out).
    let run = run_of(&api, &acme, &headers).await;
    assert_eq!(run["trigger"], "http");
    assert_eq!(run["status"], "ok");
    assert_eq!(run["attempt"], 1);
    assert_eq!(run["input"]["params"]["id"], "42");
    assert_eq!(run["input"]["path"], "/orders/42");
    assert!(
        run["input"]["headers"].get("authorization").is_none(),
        "{run}"
    );
    assert_eq!(run["result"]["status"], 201);

    // Who may call: a token acting for the tenant.
    let (status, _, answer) = request(&api, Method::POST, "/orders/42", None, order.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    let (status, _, answer) = request(
        &api,
        Method::POST,
        "/orders/42",
        Some(&globex),
        order.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (status, headers, answer) =
        request(&api, Method::GET, "/orders/42", Some(&acme), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{answer}");
    assert_eq!(headers["allow"], "POST");
    let (status, _, answer) = request(&api, Method::GET, "/nothing", Some(&acme), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(answer["code"], "not_found");
    let huge = Some(("application/json", vec![b' '; 2 << 20]));
    let (status, _, answer) =
        request(&api.once(), Method::POST, "/orders/42", Some(&acme), huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");

    // A second script cannot take the same route, whatever it names its parameter.
    let (status, refused) = deploy(
        &api,
        &acme,
        "copycat",
        json!({
            "source": "export default () => 1",
            "http": { "method": "POST", "path": "/orders/{n}" },
        }),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(
        refused["detail"].as_str().unwrap().contains("orders"),
        "{refused}"
    );

    // A public route: anyone may call; text in, text out; nothing returned is a 204.
    let (status, deployed) = deploy(
        &api,
        &acme,
        "greet",
        json!({
            "source": "export default (req) => req.body === null ? null \
                : ({ status: 200, body: 'hi ' + req.body + ' (' + req.encoding + ')' })",
            "http": { "method": "PUT", "path": "/greet", "auth": "public" },
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{deployed}");
    let text = Some(("text/plain", b"{\"not\": \"parsed\"}".to_vec()));
    let (status, headers, answer) = request(&api, Method::PUT, "/greet", None, text).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, json!("hi {\"not\": \"parsed\"} (text)"));
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let (status, _, _) = request(&api, Method::PUT, "/greet", None, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // A route bound from the command line, with the rest of the path as a parameter.
    let file = env.write_script("files.js", "export default (req) => req.params.rest");
    env.cli_ok(&[
        "scripts".as_ref(),
        "deploy".as_ref(),
        file.as_os_str(),
        "--tenant".as_ref(),
        "acme".as_ref(),
        "--name".as_ref(),
        "files".as_ref(),
        "--http".as_ref(),
        "GET /files/{*rest}".as_ref(),
        "--http-auth".as_ref(),
        "public".as_ref(),
    ]);
    let deadline = std::time::Instant::now() + WAIT;
    let answer = loop {
        let (status, _, answer) =
            request(&api, Method::GET, "/files/a/b%20c.txt", None, None).await;
        if status == StatusCode::OK {
            break answer;
        }
        assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
        assert!(std::time::Instant::now() < deadline, "the route never came");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(answer, json!("a/b c.txt"));
    // Each parameter is decoded once: an encoded `%` stays one.
    let (_, _, answer) = request(&api, Method::GET, "/files/x%2520y", None, None).await;
    assert_eq!(answer, json!("x%20y"));
    // An encoded `/` stays inside its segment.
    let (status, headers, answer) = request(
        &api,
        Method::POST,
        "/orders/a%2Fb",
        Some(&acme),
        Some(("application/json", br#"{"qty": 1}"#.to_vec())),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["id"], "a/b");
    assert_eq!(headers["x-order"], "a/b");
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_is_answered_with_its_id_and_not_retried() {
    let env = TestEnv::new().await;
    let (daemon, api) = Api::start(&env).await;
    let (acme, _) = token(&env, &["--tenant", "acme"]);
    for (name, source, limits) in [
        (
            "boom",
            "export default () => { throw new Error('db password is hunter2'); }",
            json!({}),
        ),
        (
            "spin",
            "export default () => { for (;;) {} }",
            json!({ "timeout": "300ms" }),
        ),
        (
            "odd",
            "export default () => ({ status: 'fine' })",
            json!({}),
        ),
    ] {
        let (status, deployed) = deploy(
            &api,
            &acme,
            name,
            json!({
                "source": source,
                "limits": limits,
                "retry": { "max_attempts": 5 },
                "http": { "method": "GET", "path": format!("/{name}") },
            }),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{deployed}");
    }
    let (status, headers, answer) = request(&api, Method::GET, "/boom", Some(&acme), None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    assert_eq!(answer["code"], "run_failed");
    assert!(!answer.to_string().contains("hunter2"), "{answer}");
    let id = headers["scriptd-run-id"].to_str().unwrap().to_owned();
    assert_eq!(answer["run_id"].to_string(), id);
    let run = run_of(&api, &acme, &headers).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["failure_kind"], "exception");
    assert!(run["failure_message"].as_str().unwrap().contains("hunter2"));

    let (status, headers, answer) = request(&api, Method::GET, "/spin", Some(&acme), None).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{answer}");
    assert_eq!(answer["code"], "run_timed_out");
    let run = run_of(&api, &acme, &headers).await;
    assert!(
        ["timeout", "cpu_limit"].contains(&run["failure_kind"].as_str().unwrap()),
        "{run}"
    );

    let (status, headers, answer) = request(&api, Method::GET, "/odd", Some(&acme), None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("status"),
        "{answer}"
    );
    assert!(headers.contains_key("scriptd-run-id"));

    // The runs list filters by trigger, status and kind, and follows what is new.
    let runs = |query: String| {
        let (api, acme) = (&api, &acme);
        async move {
            let (status, page) = api
                .call(
                    Method::GET,
                    &format!("/v1/tenants/acme/runs?{query}"),
                    Some(acme),
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{query}: {page}");
            page["runs"].as_array().unwrap().clone()
        }
    };
    let failed = runs("status=failed&trigger=http".into()).await;
    assert_eq!(failed.len(), 2, "{failed:?}");
    let exceptions = runs("kind=exception".into()).await;
    assert_eq!(exceptions.len(), 1);
    assert_eq!(exceptions[0]["script"], "boom");
    let oldest = runs("limit=500".into()).await.last().unwrap()["id"]
        .as_i64()
        .unwrap();
    let newer = runs(format!("after={oldest}")).await;
    assert_eq!(newer.len(), 2, "{newer:?}");
    let (status, wrong) = api
        .call(
            Method::GET,
            "/v1/tenants/acme/runs?status=crashed",
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{wrong}");
    assert_eq!(wrong["errors"][0]["parameter"], "status", "{wrong}");
    let (status, who) = api.call(Method::GET, "/v1/token", Some(&acme), None).await;
    assert_eq!(status, StatusCode::OK, "{who}");
    assert_eq!(
        (who["tenant"].as_str(), who["role"].as_str()),
        (Some("acme"), Some("tenant"))
    );

    // Nothing was retried or dead-lettered: one attempt each, with max_attempts 5.
    env.wait_idle(WAIT).await;
    let runs = env.runs().await;
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs.iter().all(|r| r.attempt == 1));
    assert!(env.dead_letters().await.is_empty());
    daemon.shutdown().await;
    env.cleanup().await;
}

/// A request waits for its tenant's turn in the engine no longer than its script may run:
/// with the tenant's one run slot held by a long request, another gets a 503 in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_does_not_wait_for_a_busy_tenant_longer_than_its_timeout() {
    let env = TestEnv::new().await;
    let (daemon, api) = support::api::start_with(&env, |s| {
        s.tenants.max_concurrent_runs = 1;
    })
    .await;
    let (acme, _) = token(&env, &["--tenant", "acme"]);
    for (name, source, timeout) in [
        ("slow", support::busy_script(3000, "'done'"), "5s"),
        ("quick", "export default () => 'quick'".to_owned(), "300ms"),
    ] {
        let (status, deployed) = deploy(
            &api,
            &acme,
            name,
            json!({
                "source": source,
                "limits": { "timeout": timeout, "cpu_time": timeout },
                "http": { "method": "GET", "path": format!("/{name}"), "auth": "public" },
            }),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{deployed}");
    }
    let slow = tokio::spawn({
        let (http, url) = (api.http.clone(), format!("{}/hooks/acme/slow", api.base));
        async move { http.get(url).send().await.unwrap().status() }
    });
    // Once the slow run holds the slot (it runs for 3 s), a quick request is turned away
    // after its own 300 ms; before that, it may still run.
    let answer = loop {
        let asked = std::time::Instant::now();
        let (status, _, answer) = request(&api, Method::GET, "/quick", None, None).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                asked.elapsed() < Duration::from_millis(2000),
                "{:?}",
                asked.elapsed()
            );
            break answer;
        }
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert!(
            !slow.is_finished(),
            "no request was turned away while the slot was held"
        );
    };
    assert!(
        answer["detail"].as_str().unwrap().contains("busy"),
        "{answer}"
    );
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    let (status, _, answer) = request(&api, Method::GET, "/quick", None, None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    daemon.shutdown().await;
    env.cleanup().await;
}
