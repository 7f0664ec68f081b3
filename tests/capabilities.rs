//! The script API in the daemon on the real services: event chains through ctx.publish,
//! publishes deduplicated across retries, tenant-scoped key-value with its quota, fetch
//! through a tenant's allow list, secrets encrypted at rest and absent from run records.

mod support;

use std::time::Duration;

use scriptd::caps::secrets::SecretBox;
use scriptd::engine::LimitOverrides;
use scriptd::retry::RetryOverrides;
use support::http::TestServer;
use support::{Run, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

fn ok_runs<'a>(runs: &'a [Run], script: &str) -> Vec<&'a Run> {
    runs.iter()
        .filter(|r| r.script == script && r.status == "ok")
        .collect()
}

/// The first log line a run wrote, parsed as JSON.
fn logged(run: &Run) -> serde_json::Value {
    let line = run.logs[0]["message"].as_str().unwrap();
    serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_event_triggers_the_tenants_next_script_only() {
    let env = TestEnv::new().await;
    env.deploy(
        "acme",
        "first",
        "export default async (e, ctx) => { await ctx.publish('order.enriched', { id: e.data.id, enriched: true }); }",
        &["order.created"],
    )
    .await;
    env.deploy(
        "acme",
        "second",
        "export default (e) => { console.log(JSON.stringify({ data: e.data, depth: e.headers['Scriptd-Chain-Depth'] })); }",
        &["order.enriched"],
    )
    .await;
    env.deploy(
        "globex",
        "spy",
        "export default () => 'seen'",
        &["order.enriched", ">"],
    )
    .await;
    let daemon = env.start_daemon();
    env.publish("acme", "order.created", r#"{"id": 42}"#).await;
    env.wait_for_runs(WAIT, |runs| !ok_runs(runs, "second").is_empty())
        .await;
    // Globex's catch-all could only show up later: look once nothing is left to run.
    env.wait_idle(WAIT).await;
    let runs = env.runs().await;
    let second = ok_runs(&runs, "second")[0];
    assert_eq!(
        logged(second),
        serde_json::json!({ "data": { "id": 42, "enriched": true }, "depth": "1" })
    );
    assert!(second
        .subject
        .as_deref()
        .unwrap()
        .ends_with(".events.acme.order.enriched"));
    assert!(runs.iter().all(|r| r.tenant == "acme"), "{runs:#?}");
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_run_publishes_once() {
    let env = TestEnv::new().await;
    env.deploy_with(
        "acme",
        "emit-then-fail",
        "export default async (e, ctx) => {
            await ctx.publish('ping.out', { n: 1 });
            await ctx.publish('ping.out', { n: 2 });
            if (ctx.attempt < 3) throw new Error('fail after publishing, attempt ' + ctx.attempt);
        }",
        &["ping.in"],
        LimitOverrides::default(),
        RetryOverrides {
            max_attempts: Some(3),
            initial: Some(Duration::from_millis(50)),
            ..Default::default()
        },
    )
    .await;
    env.deploy(
        "acme",
        "downstream",
        "export default (e) => e.data.n",
        &["ping.out"],
    )
    .await;
    let daemon = env.start_daemon();
    env.publish("acme", "ping.in", "{}").await;
    let runs = env
        .wait_for_runs(WAIT, |runs| {
            !ok_runs(runs, "emit-then-fail").is_empty() && ok_runs(runs, "downstream").len() >= 2
        })
        .await;
    assert_eq!(
        runs.iter().filter(|r| r.script == "emit-then-fail").count(),
        3,
        "{runs:#?}"
    );
    let subject = format!("{}.acme.ping.out", env.settings.nats.events_prefix);
    assert_eq!(
        env.messages_on(&subject).await,
        2,
        "three attempts, two messages"
    );
    daemon.shutdown().await;
    let runs = env.runs().await;
    assert_eq!(ok_runs(&runs, "downstream").len(), 2, "{runs:#?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_data_is_the_tenants_own_and_within_its_quota() {
    let env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    settings.capabilities.kv.max_per_tenant = scriptd::units::ByteSize(1000);
    let writer = "export default async (e, ctx) => {
        await ctx.kv.set('shared', { owner: ctx.tenant });
        await ctx.kv.set('big', 'x'.repeat(400));
        await ctx.kv.set('big', 'y'.repeat(400));
        let refused = null;
        try { await ctx.kv.set('bigger', 'z'.repeat(600)); } catch (err) { refused = err.name; }
        console.log(JSON.stringify({ refused, keys: await ctx.kv.list(''), shared: await ctx.kv.get('shared') }));
    }";
    let reader = "export default async (e, ctx) => {
        console.log(JSON.stringify({ keys: await ctx.kv.list(''), shared: await ctx.kv.get('shared') ?? null }));
    }";
    env.deploy("acme", "writer", writer, &["kv.write"]).await;
    env.deploy("globex", "reader", reader, &["kv.read"]).await;
    let daemon = env.start_daemon_with(settings);
    env.publish("acme", "kv.write", "{}").await;
    let runs = env
        .wait_for_runs(WAIT, |runs| !ok_runs(runs, "writer").is_empty())
        .await;
    assert_eq!(
        logged(ok_runs(&runs, "writer")[0]),
        serde_json::json!({ "refused": "LimitExceeded", "keys": ["big", "shared"], "shared": { "owner": "acme" } })
    );
    env.publish("globex", "kv.read", "{}").await;
    let runs = env
        .wait_for_runs(WAIT, |runs| !ok_runs(runs, "reader").is_empty())
        .await;
    assert_eq!(
        logged(ok_runs(&runs, "reader")[0]),
        serde_json::json!({ "keys": [], "shared": null })
    );
    let (bytes, keys) = env.store.kv_usage("acme").await.unwrap();
    assert_eq!(
        (bytes, keys),
        (6 + 16 + 3 + 402, 2),
        "usage counts the current values only"
    );
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_goes_through_the_tenants_allow_list_and_the_runs_timeout() {
    let env = TestEnv::new().await;
    let server = TestServer::start().await;
    let mut settings = env.settings.clone();
    settings.capabilities.fetch.allow_private = vec!["127.0.0.1/32".parse().unwrap()];
    env.store
        .set_fetch_allow_list("acme", &[format!("127.0.0.1:{}", server.port)])
        .await
        .unwrap();
    let script = "export default async (e, ctx) => {
        try {
            const r = await fetch(e.data.url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ from: ctx.tenant }) });
            console.log(JSON.stringify({ status: r.status, body: await r.json() }));
        } catch (err) {
            console.log(JSON.stringify({ error: err.name }));
        }
    }";
    env.deploy("acme", "caller", script, &["call"]).await;
    env.deploy("globex", "caller", script, &["call"]).await;
    env.deploy_with(
        "acme",
        "slow",
        "export default async (e) => { await fetch(e.data.url); }",
        &["slow"],
        LimitOverrides {
            timeout: Some(Duration::from_millis(800)),
            ..Default::default()
        },
        RetryOverrides {
            max_attempts: Some(1),
            ..Default::default()
        },
    )
    .await;
    let daemon = env.start_daemon_with(settings);
    let echo = format!(r#"{{"url": "{}"}}"#, server.url("/echo"));
    env.publish("acme", "call", echo.clone()).await;
    env.publish("globex", "call", echo).await;
    env.publish(
        "acme",
        "slow",
        format!(r#"{{"url": "{}"}}"#, server.url("/slow")),
    )
    .await;
    let runs = env
        .wait_for_runs(WAIT, |runs| {
            ok_runs(runs, "caller").len() == 2 && runs.iter().any(|r| r.script == "slow")
        })
        .await;
    for run in ok_runs(&runs, "caller") {
        let out = logged(run);
        if run.tenant == "acme" {
            assert_eq!(out["status"], 200);
            assert_eq!(out["body"]["method"], "POST");
            assert_eq!(out["body"]["body"], r#"{"from":"acme"}"#);
        } else {
            assert_eq!(out, serde_json::json!({ "error": "PermissionDenied" }));
        }
    }
    let slow = runs.iter().find(|r| r.script == "slow").unwrap();
    assert_eq!(slow.failure_kind.as_deref(), Some("timeout"), "{slow:#?}");
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_encrypted_at_rest_and_never_recorded() {
    let env = TestEnv::new().await;
    let key = SecretBox::generate_key();
    let mut settings = env.settings.clone();
    settings.capabilities.secrets.key = key.clone();
    let secret_box = SecretBox::from_config(&settings.capabilities.secrets)
        .unwrap()
        .unwrap();
    const VALUE: &str = "sk_live_5f3a9c1e77";
    env.store
        .secret_put(
            "acme",
            "payments",
            &secret_box.seal("acme", "payments", VALUE),
        )
        .await
        .unwrap();
    env.deploy_with(
        "acme",
        "leaky",
        "export default async (e, ctx) => {
            const key = await ctx.secrets.get('payments');
            console.log('the key is', key);
            if (ctx.attempt === 1) throw new Error('rejected key ' + key);
            return { key };
        }",
        &["pay"],
        LimitOverrides::default(),
        RetryOverrides {
            max_attempts: Some(2),
            initial: Some(Duration::from_millis(50)),
            ..Default::default()
        },
    )
    .await;
    env.deploy(
        "globex",
        "thief",
        "export default async (e, ctx) => { console.log(JSON.stringify({ got: await ctx.secrets.get('payments') ?? null })); }",
        &["pay"],
    )
    .await;
    // Initech's row is acme's, copied in the database: it must not open for initech.
    let sealed = env
        .store
        .secret_get("acme", "payments")
        .await
        .unwrap()
        .unwrap();
    env.store
        .secret_put("initech", "payments", &sealed)
        .await
        .unwrap();
    env.deploy(
        "initech",
        "copier",
        "export default async (e, ctx) => await ctx.secrets.get('payments')",
        &["pay"],
    )
    .await;
    let daemon = env.start_daemon_with(settings);
    env.publish("acme", "pay", "{}").await;
    env.publish("globex", "pay", "{}").await;
    env.publish("initech", "pay", "{}").await;
    let runs = env
        .wait_for_runs(WAIT, |runs| {
            !ok_runs(runs, "leaky").is_empty()
                && !ok_runs(runs, "thief").is_empty()
                && runs.iter().any(|r| r.script == "copier")
        })
        .await;
    let copier = runs.iter().find(|r| r.script == "copier").unwrap();
    let message = copier.failure_message.as_deref().unwrap_or_default();
    assert!(
        message.contains("does not decrypt for tenant \"initech\""),
        "{message}"
    );
    assert!(!message.contains("unavailable"), "{message}");
    assert_eq!(
        logged(ok_runs(&runs, "thief")[0]),
        serde_json::json!({ "got": null })
    );
    let leaky: Vec<&Run> = runs.iter().filter(|r| r.script == "leaky").collect();
    assert_eq!(leaky.len(), 2);
    assert_eq!(leaky[0].logs[0]["message"], "the key is [secret]");
    let message = leaky[0].failure_message.as_deref().unwrap();
    assert!(message.contains("rejected key [secret]"), "{message}");
    // Nowhere in the database in plain text: not in run records, not in the secrets table.
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    for table in ["runs", "secrets"] {
        let hits: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {table} t WHERE t::text LIKE '%' || $1 || '%'"),
                &[&VALUE],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(hits, 0, "the secret is readable in {table}");
    }
    daemon.shutdown().await;
    env.cleanup().await;
}

/// Tenants are kept apart by two walls, each enough alone: the store's queries name the
/// run's tenant, and row-level security admits only its rows. `store_security` takes the
/// first wall away (its queries name no tenant); this test takes the second away (row-level
/// security off on every table the script API reads) and another tenant's key-value data,
/// secrets and fetch allow list must stay out of reach all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queries_alone_keep_tenants_apart_with_row_level_security_off() {
    let env = TestEnv::new().await;
    let server = TestServer::start().await;
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    let tables = ["kv", "kv_usage", "secrets", "tenant_policies"];
    for table in tables {
        client
            .batch_execute(&format!(
                "ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY"
            ))
            .await
            .unwrap();
    }
    let guarded: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = ANY($1) AND relrowsecurity",
            &[&&tables[..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(guarded, 0, "row-level security is still on");
    let key = SecretBox::generate_key();
    let mut settings = env.settings.clone();
    settings.capabilities.secrets.key = key.clone();
    settings.capabilities.fetch.allow_private = vec!["127.0.0.1/32".parse().unwrap()];
    let secret_box = SecretBox::from_config(&settings.capabilities.secrets)
        .unwrap()
        .unwrap();
    env.store
        .secret_put(
            "acme",
            "token",
            &secret_box.seal("acme", "token", "acme-only"),
        )
        .await
        .unwrap();
    env.store
        .set_fetch_allow_list("acme", &[format!("127.0.0.1:{}", server.port)])
        .await
        .unwrap();
    let script = "export default async (e, ctx) => {
        if (ctx.tenant === 'acme') await ctx.kv.set('shared', 'acme data');
        let fetched;
        try { fetched = (await fetch(e.data.url)).status; } catch (err) { fetched = err.name; }
        console.log(JSON.stringify({
            keys: await ctx.kv.list(''),
            shared: await ctx.kv.get('shared') ?? null,
            token: await ctx.secrets.get('token') ?? null,
            fetched,
        }));
    }";
    env.deploy("acme", "probe", script, &["probe"]).await;
    env.deploy("globex", "probe", script, &["probe"]).await;
    let daemon = env.start_daemon_with(settings);
    let data = format!(r#"{{"url": "{}"}}"#, server.url("/echo"));
    env.publish("acme", "probe", data.clone()).await;
    env.wait_for_runs(WAIT, |runs| ok_runs(runs, "probe").len() == 1)
        .await;
    env.publish("globex", "probe", data).await;
    let runs = env
        .wait_for_runs(WAIT, |runs| ok_runs(runs, "probe").len() == 2)
        .await;
    let seen = |tenant: &str| {
        logged(
            runs.iter()
                .find(|r| r.tenant == tenant && r.status == "ok")
                .unwrap(),
        )
    };
    assert_eq!(
        seen("acme"),
        serde_json::json!({ "keys": ["shared"], "shared": "acme data", "token": "[secret]", "fetched": 200 })
    );
    assert_eq!(
        seen("globex"),
        serde_json::json!({ "keys": [], "shared": null, "token": null, "fetched": "PermissionDenied" })
    );
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_secrets_and_allow_lists_from_the_command_line() {
    use std::io::Write;
    use std::process::Stdio;

    let env = TestEnv::new().await;
    let cli = |args: &[&str], key: Option<&str>, stdin: &str| {
        let mut command = env.daemon_command();
        command.args(args);
        match key {
            Some(key) => command.env("SCRIPTD_CAPABILITIES__SECRETS__KEY", key),
            None => command.env_remove("SCRIPTD_CAPABILITIES__SECRETS__KEY"),
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let refused = cli(&["secrets", "set", "acme", "api"], None, "value\n");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("generate-key"));

    let key = cli(&["secrets", "generate-key"], None, "");
    let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();
    let set = cli(
        &["secrets", "set", "acme", "api"],
        Some(&key),
        "s3cret-value\n",
    );
    assert!(set.status.success(), "{set:?}");
    let listed = support::json(cli(&["secrets", "list", "acme", "--json"], Some(&key), ""));
    assert_eq!(listed[0]["name"], "api");
    assert!(!listed.to_string().contains("s3cret"));
    let sealed = env.store.secret_get("acme", "api").await.unwrap().unwrap();
    let secret_box = SecretBox::new(
        &base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &key).unwrap(),
    )
    .unwrap();
    assert_eq!(
        secret_box.open("acme", "api", &sealed).unwrap(),
        "s3cret-value"
    );

    let bad = cli(&["tenants", "allow-fetch", "acme", "http://x/y"], None, "");
    assert!(!bad.status.success());
    let allowed = cli(
        &[
            "tenants",
            "allow-fetch",
            "acme",
            "api.example.com",
            "*.example.org:8443",
        ],
        None,
        "",
    );
    assert!(allowed.status.success(), "{allowed:?}");
    let shown = support::json(cli(&["tenants", "show", "acme", "--json"], None, ""));
    assert_eq!(
        shown["fetch_allow"],
        serde_json::json!(["api.example.com", "*.example.org:8443"])
    );
    assert_eq!(shown["secrets"], serde_json::json!(["api"]));
    let deleted = cli(&["secrets", "delete", "acme", "api"], None, "");
    assert!(deleted.status.success());
    assert!(env.store.secret_get("acme", "api").await.unwrap().is_none());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_test_gives_scripts_a_local_api() {
    let env = TestEnv::new().await;
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts-examples/order-created.js"
    );
    let out = env
        .daemon_command()
        .args(["scripts", "test", example, "--tenant", "acme", "--json"])
        .args([
            "--event",
            r#"{"data": {"id": "o-9", "items": [{"price": 2, "qty": 3}]}}"#,
        ])
        .args(["--kv", "orders:EUR=2"])
        .output()
        .unwrap();
    let shown = support::json(out);
    assert_eq!(shown["status"], "ok", "{shown}");
    assert_eq!(
        shown["result"],
        serde_json::json!({ "total": 6, "currency": "EUR", "count": 3 })
    );
    assert_eq!(shown["kv"]["orders:EUR"], 3);
    let published = &shown["published"][0];
    assert!(
        published["subject"]
            .as_str()
            .unwrap()
            .ends_with(".acme.invoice.requested"),
        "{published}"
    );
    assert_eq!(published["data"]["order"], "o-9");
    // Nothing reached the real stream.
    let subject = format!("{}.acme.invoice.requested", env.settings.nats.events_prefix);
    assert_eq!(env.messages_on(&subject).await, 0);
    env.cleanup().await;
}
