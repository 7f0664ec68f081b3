//! `scriptd bench pipeline`: the raw JetStream publish + consume + ack rate, beside scriptd's
//! end-to-end events/second for a trivial script and its publish→run-start latency, on the
//! same servers in one run. Uses throw-away streams and a throw-away database.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::bench::procstat::{self, CpuUse};
use crate::config::Settings;
use crate::daemon::{self, DaemonStats};
use crate::store::{ScriptSpec, Store};

#[derive(Debug, Args)]
pub struct PipelineBenchArgs {
    /// Events for each throughput figure.
    #[arg(long, default_value_t = 5000)]
    pub events: usize,
    /// Events for the latency figure, published at half the measured end-to-end rate.
    #[arg(long, default_value_t = 1000)]
    pub latency_events: usize,
    /// Jobs one tenant floods the daemon with for the fairness and memory-under-flood figures.
    #[arg(long, default_value_t = 10000)]
    pub backlog: usize,
    /// Distinct scripts deployed and run once each for the memory figure.
    #[arg(long, default_value_t = 1000)]
    pub scripts: usize,
}

const PAYLOAD: &[u8] = br#"{"id":"o-1","amount":42}"#;
const TRIVIAL: &str = "export default (event) => ({ ok: true, id: event.data.id })";

pub async fn pipeline(settings: &Settings, args: PipelineBenchArgs) -> anyhow::Result<ExitCode> {
    let id = format!("bench{}", std::process::id());
    let client = crate::bus::connect(&settings.nats).await?;
    let js = jetstream::new(client.clone());

    // Only the nats-server here: no database is in use yet.
    let nats_only = procstat::Servers {
        database: None,
        ..procstat::Servers::of(settings)
    };
    let cpu_start = CpuUse::now(&nats_only);
    let raw = raw_rate(&js, &id, args.events).await?;
    let cpu_raw = CpuUse::now(&nats_only).since(cpu_start);
    println!(
        "raw JetStream publish + pull + ack: {raw:.0} msgs/s ({} messages)",
        args.events
    );
    println!("  CPU per message: {}", cpu_raw.per_item(args.events));

    let scratch = super::Scratch::new(settings, &id).await?;
    let result = end_to_end(&scratch.settings, &js, &args).await;
    scratch.remove(&js).await?;
    result?.print(raw, &args);
    Ok(ExitCode::SUCCESS)
}

impl EndToEnd {
    fn print(&self, raw: f64, args: &PipelineBenchArgs) {
        println!(
            "scriptd end to end, 1 matching script: {:.0} events/s ({} events)",
            self.rate, args.events
        );
        println!("ratio end-to-end / raw: {:.2}", self.rate / raw);
        println!(
            "  CPU per event, 1 script: {}",
            self.cpu_one.per_item(args.events)
        );
        println!(
            "  runs started in the fan-out {}, queued in the lane {}",
            self.paths_one.0, self.paths_one.1
        );
        println!(
            "publish -> run start at {:.0} events/s: p50 {:.2?}, p99 {:.2?} ({} events)",
            self.paced, self.p50, self.p99, args.latency_events
        );
        println!(
            "scriptd end to end, 3 matching scripts: {:.0} events/s ({:.0} runs/s; ratio to raw {:.3})",
            self.three,
            self.three * 3.0,
            self.three / raw
        );
        println!(
            "  CPU per event, 3 scripts: {}",
            self.cpu_three.per_item(args.events)
        );
        println!(
            "  runs started in the fan-out {}, queued in the lane {}",
            self.paths_three.0, self.paths_three.1
        );
        self.fairness.print();
        let list = |mibs: &[f64]| {
            mibs.iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join(" + ")
        };
        println!(
            "RSS after {} distinct scripts ran once each: daemon {:.0} MiB; engine hosts {} MiB \
             (draining ones included), once drained {} MiB",
            args.scripts,
            self.rss.0,
            list(&self.rss.1),
            list(&self.rss.2)
        );
    }
}

/// Publishes `n` messages while a pull consumer acks them; messages per second overall.
async fn raw_rate(js: &jetstream::Context, id: &str, n: usize) -> anyhow::Result<f64> {
    let name = format!("{}_RAW", id.to_uppercase());
    let subject = format!("{id}.raw");
    let _ = js.delete_stream(&name).await;
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 1024,
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let consuming = tokio::spawn(async move {
        let mut messages = consumer.messages().await?;
        let mut seen = 0;
        while seen < n {
            let Some(message) = messages.next().await else {
                break;
            };
            message
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            seen += 1;
        }
        anyhow::Ok(())
    });
    publish_many(js, n, |_| subject.clone()).await?;
    consuming.await??;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    js.delete_stream(&name).await?;
    Ok(rate)
}

/// Publishes with up to 256 acknowledgements outstanding; returns each message's stream
/// sequence and the instant its publish began.
pub(crate) async fn publish_many(
    js: &jetstream::Context,
    n: usize,
    subject: impl Fn(usize) -> String,
) -> anyhow::Result<Vec<(u64, Instant)>> {
    let mut pending = futures::stream::FuturesOrdered::new();
    let mut sent = Vec::with_capacity(n);
    for i in 0..n {
        let at = Instant::now();
        let ack = js.publish(subject(i), Bytes::from_static(PAYLOAD)).await?;
        pending.push_back(async move { ack.await.map(|a| (a.sequence, at)) });
        if pending.len() >= 256 {
            if let Some(done) = pending.next().await {
                sent.push(done?);
            }
        }
    }
    while let Some(done) = pending.next().await {
        sent.push(done?);
    }
    Ok(sent)
}

/// What the end-to-end part measures.
struct EndToEnd {
    /// Events per second with one matching script.
    rate: f64,
    /// Publish→run start at `paced` events per second.
    p50: Duration,
    p99: Duration,
    paced: f64,
    /// Events per second with three matching scripts.
    three: f64,
    /// RSS after many distinct scripts ran.
    /// (The daemon, every engine host right then, the live hosts once the draining ones
    /// left), MiB.
    rss: (f64, Vec<f64>, Vec<f64>),
    /// CPU time by component over the one- and three-script phases.
    cpu_one: CpuUse,
    cpu_three: CpuUse,
    /// Runs started straight from the fan-out and runs queued in a lane, in each phase.
    paths_one: (u64, u64),
    paths_three: (u64, u64),
    fairness: crate::bench::fairness::Fairness,
}

async fn end_to_end(
    s: &Settings,
    js: &jetstream::Context,
    args: &PipelineBenchArgs,
) -> anyhow::Result<EndToEnd> {
    let store = Store::connect(&s.database).await?;
    store
        .deploy(&ScriptSpec {
            tenant: "bench".into(),
            name: "trivial".into(),
            source: TRIVIAL.into(),
            subjects: vec!["order.*".into()],
            timezone: "UTC".into(),
            ..Default::default()
        })
        .await?;
    crate::bus::ensure_streams(js, &s.nats).await?;
    let stop = CancellationToken::new();
    let stats = DaemonStats::default();
    let servers = procstat::Servers::of(s);
    let running = tokio::spawn(daemon::run_with_stats(
        s.clone(),
        stop.clone(),
        stats.clone(),
    ));
    let subject = format!("{}.bench.order.created", s.nats.events_prefix);

    // Warm-up: the first event starts the isolate.
    publish_many(js, 1, |_| subject.clone()).await?;
    wait_for(&stats, 1).await?;

    let start = Instant::now();
    let cpu_start = CpuUse::now(&servers);
    let paths_start = paths(&stats);
    publish_many(js, args.events, |_| subject.clone()).await?;
    wait_for(&stats, 1 + args.events as u64).await?;
    let rate = args.events as f64 / start.elapsed().as_secs_f64();
    let cpu_one = CpuUse::now(&servers).since(cpu_start);
    let paths_one = since(paths(&stats), paths_start);

    // Latency at half that rate: publish on a fixed schedule, then join each event's
    // publish instant with its run's start time from the run records.
    let paced = rate / 2.0;
    let interval = Duration::from_secs_f64(1.0 / paced);
    let wall_start = chrono::Utc::now();
    let mono_start = Instant::now();
    let mut published: HashMap<u64, Instant> = HashMap::new();
    let mut next = Instant::now();
    for _ in 0..args.latency_events {
        let at = Instant::now();
        let ack = js
            .publish(subject.clone(), Bytes::from_static(PAYLOAD))
            .await?
            .await?;
        published.insert(ack.sequence, at);
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    let done = 1 + args.events as u64 + args.latency_events as u64;
    wait_for(&stats, done).await?;
    let client = crate::store::connect_direct(&s.database.url).await?;
    let rows = client
        .query(
            "SELECT job_id, started_at FROM runs WHERE started_at >= $1",
            &[&wall_start],
        )
        .await?;
    let mut latencies: Vec<Duration> = rows
        .iter()
        .filter_map(|r| {
            let job: String = r.get(0);
            let started: chrono::DateTime<chrono::Utc> = r.get(1);
            let seq: u64 = job.rsplit('-').nth(1)?.parse().ok()?;
            let at = published.get(&seq)?;
            let published_wall =
                wall_start + chrono::Duration::from_std(at.duration_since(mono_start)).ok()?;
            (started - published_wall).to_std().ok()
        })
        .collect();
    latencies.sort();

    // Three scripts matching every event.
    for name in ["second", "third"] {
        store
            .deploy(&ScriptSpec {
                tenant: "bench".into(),
                name: name.into(),
                source: TRIVIAL.into(),
                subjects: vec!["order.*".into()],
                timezone: "UTC".into(),
                ..Default::default()
            })
            .await?;
    }
    // The index follows deploys by notification, within moments.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut done = done;
    publish_many(js, 1, |_| subject.clone()).await?;
    done += 3;
    wait_for(&stats, done).await?;
    let start = Instant::now();
    let cpu_start = CpuUse::now(&servers);
    let paths_start = paths(&stats);
    publish_many(js, args.events, |_| subject.clone()).await?;
    done += 3 * args.events as u64;
    wait_for(&stats, done).await?;
    let three = args.events as f64 / start.elapsed().as_secs_f64();
    let cpu_three = CpuUse::now(&servers).since(cpu_start);
    let paths_three = since(paths(&stats), paths_start);

    let fairness = crate::bench::fairness::flood(s, js, &store, &stats, args.backlog).await?;
    done += args.backlog as u64 + 1;

    // Many distinct scripts, one event each.
    for i in 0..args.scripts {
        store
            .deploy(&ScriptSpec {
                tenant: "bench".into(),
                name: format!("s{i}"),
                source: format!("export default (event) => ({{ script: {i}, id: event.data.id }})"),
                subjects: vec![format!("many.s{i}")],
                timezone: "UTC".into(),
                ..Default::default()
            })
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let prefix = s.nats.events_prefix.clone();
    publish_many(js, args.scripts, |i| format!("{prefix}.bench.many.s{i}")).await?;
    done += args.scripts as u64;
    wait_for(&stats, done).await?;
    // Right after, hosts recycled on the way are still draining beside their
    // replacements; the figure is taken at once and again once only the live ones remain.
    let at_once: Vec<f64> = procstat::children().into_iter().map(rss_mib).collect();
    let live = match s.engine.hosts.count {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let settle = Instant::now() + Duration::from_secs(20);
    while procstat::children().len() > live && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss = (
        rss_mib(std::process::id()),
        at_once,
        procstat::children().into_iter().map(rss_mib).collect(),
    );

    stop.cancel();
    running.await??;
    // Closed before the database is dropped, so no connection of ours is cut under it.
    store.pool().close();
    let p = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok(EndToEnd {
        rate,
        p50: p(0.5),
        p99: p(0.99),
        paced,
        three,
        rss,
        cpu_one,
        cpu_three,
        paths_one,
        paths_three,
        fairness,
    })
}

/// (Runs started in the fan-out, runs queued in a lane) so far.
fn paths(stats: &DaemonStats) -> (u64, u64) {
    (
        stats.fanout.direct.load(Ordering::Relaxed),
        stats.fanout.overflowed.load(Ordering::Relaxed),
    )
}

fn since(now: (u64, u64), then: (u64, u64)) -> (u64, u64) {
    (now.0 - then.0, now.1 - then.1)
}

fn rss_mib(pid: u32) -> f64 {
    crate::engine::rss_of(pid).unwrap_or(0) as f64 / 1048576.0
}

/// Waits until `runs` run records are committed (not merely runs ended: a run counts once
/// its record is in PostgreSQL, as its message's acknowledgement waits for that too).
async fn wait_for(stats: &DaemonStats, runs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while stats.attempts.recorded.load(Ordering::Relaxed) < runs {
        anyhow::ensure!(
            Instant::now() < deadline,
            "runs did not complete within 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}
