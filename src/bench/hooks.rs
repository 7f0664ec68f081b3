//! `scriptd bench hooks`: requests/s and latency of a trivial HTTP-triggered script, driven
//! by `wrk` against a daemon in this process (its API on a free loopback port), on a public
//! route and on a token route; each request is a run whose record is committed before its
//! answer. Uses a throw-away database and streams.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::daemon::{self, DaemonStats};
use crate::scripts::route::{Auth, HttpRoute};
use crate::store::{Role, ScriptSpec, Store};

#[derive(Debug, Args)]
pub struct HooksBenchArgs {
    /// Open connections wrk keeps.
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// How long each route is driven.
    #[arg(long, value_parser = crate::units::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// wrk's threads (they share the machine with the daemon).
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
}

const TRIVIAL: &str = "export default (request) => ({ ok: true, path: request.path })";

pub async fn hooks(settings: &Settings, args: HooksBenchArgs) -> anyhow::Result<ExitCode> {
    if std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("wrk is not installed (Debian: apt-get install wrk)");
    }
    let id = format!("benchhooks{}", std::process::id());
    let client = crate::bus::connect(&settings.nats).await?;
    let js = async_nats::jetstream::new(client);
    let scratch = super::Scratch::new(settings, &id).await?;
    let result = drive(&scratch.settings, &args).await;
    scratch.remove(&js).await?;
    result?;
    Ok(ExitCode::SUCCESS)
}

async fn drive(s: &Settings, args: &HooksBenchArgs) -> anyhow::Result<()> {
    let store = Store::connect(&s.database).await?;
    for (name, auth) in [("public", Auth::Public), ("token", Auth::Token)] {
        store
            .deploy(&ScriptSpec {
                tenant: "bench".into(),
                name: name.into(),
                source: TRIVIAL.into(),
                timezone: "UTC".into(),
                http: Some(HttpRoute {
                    method: "GET".into(),
                    path: format!("/{name}"),
                    auth,
                }),
                ..Default::default()
            })
            .await?;
    }
    let (token, _) = store
        .create_token("bench", Role::Tenant, "bench hooks", None)
        .await?;
    let mut settings = s.clone();
    settings.api.listen = "127.0.0.1:0".into();
    let stop = CancellationToken::new();
    let stats = DaemonStats::default();
    let running = tokio::spawn(daemon::run_with_stats(
        settings,
        stop.clone(),
        stats.clone(),
    ));
    let address = loop {
        if let Some(address) = stats.api_listening.get() {
            break *address;
        }
        if running.is_finished() {
            bail!("the daemon stopped before it served the API");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let base = format!("http://{address}/hooks/bench");
    // Warm-up: the first request starts the isolate.
    let warm = reqwest::get(format!("{base}/public")).await?;
    if !warm.status().is_success() {
        bail!("the warm-up request answered {}", warm.status());
    }
    println!(
        "trivial hook, wrk -t{} -c{} -d{:?} (wrk shares the machine's cores with the daemon)",
        args.threads, args.connections, args.duration
    );
    for (name, header) in [
        ("public", None),
        ("token", Some(format!("Authorization: Bearer {token}"))),
    ] {
        let before = recorded(&s.database.url).await?;
        let figures = wrk(&format!("{base}/{name}"), header.as_deref(), args).await?;
        let runs = recorded(&s.database.url).await? - before;
        println!(
            "  {name:<6} route: {:.0} requests/s, latency p50 {} p99 {}; {} requests, {} runs \
             recorded, {} answers not 2xx",
            figures.rate, figures.p50, figures.p99, figures.requests, runs, figures.not_ok
        );
    }
    stop.cancel();
    running.await.context("the daemon task")??;
    store.pool().close();
    Ok(())
}

/// Runs recorded so far (read across tenants, as the database's owner).
async fn recorded(url: &str) -> anyhow::Result<i64> {
    let client = crate::store::connect_direct(url).await?;
    let row = client.query_one("SELECT count(*) FROM runs", &[]).await?;
    Ok(row.get(0))
}

struct Figures {
    rate: f64,
    requests: u64,
    p50: String,
    p99: String,
    not_ok: u64,
}

/// Drives `url` with wrk and reads its summary.
async fn wrk(url: &str, header: Option<&str>, args: &HooksBenchArgs) -> anyhow::Result<Figures> {
    let mut command = tokio::process::Command::new("wrk");
    command
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", args.duration.as_secs().max(1)))
        .arg("--latency");
    if let Some(header) = header {
        command.args(["-H", header]);
    }
    let out = command.arg(url).output().await.context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|rest| rest.trim().to_owned())
    };
    let rate = field("Requests/sec:")
        .and_then(|r| r.parse().ok())
        .context("wrk printed no Requests/sec")?;
    // "12345 requests in 10.00s, 1.23MB read"
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let not_ok = field("Non-2xx or 3xx responses:")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(Figures {
        rate,
        requests,
        p50: field("50%").unwrap_or_default(),
        p99: field("99%").unwrap_or_default(),
        not_ok,
    })
}
