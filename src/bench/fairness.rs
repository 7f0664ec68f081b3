//! The fairness and flood part of `scriptd bench pipeline`: one tenant floods the daemon
//! with events; how long does another tenant's single event wait, published right behind
//! the flood and once the flood is fanned out, and how large does the daemon grow meanwhile?

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;

use crate::config::Settings;
use crate::daemon::DaemonStats;
use crate::store::{ScriptSpec, Store};

/// What the flood showed.
pub struct Fairness {
    /// Events in the noisy tenant's flood.
    pub backlog: usize,
    /// From the quiet tenant's publish right behind the flood (in the events stream) to
    /// its run's start.
    pub behind_wait: Duration,
    /// Noisy runs that finished meanwhile.
    pub behind_meanwhile: u64,
    /// From the quiet tenant's publish once the whole flood was fanned out (run, or queued
    /// in its lane) to its run's start.
    pub quiet_wait: Duration,
    /// Noisy runs that finished meanwhile.
    pub noisy_meanwhile: u64,
    /// The noisy script's median run time.
    pub noisy_run: Duration,
    /// The daemon's RSS before the flood and at most during it, MiB.
    pub rss_before: f64,
    /// The daemon's largest RSS seen during the flood, MiB.
    pub rss_peak: f64,
}

/// Each noisy run keeps its worker busy this long.
const NOISY: &str =
    "export default () => { const end = Date.now() + 1; while (Date.now() < end) {} return 1; }";

pub async fn flood(
    s: &Settings,
    js: &jetstream::Context,
    store: &Store,
    stats: &DaemonStats,
    backlog: usize,
) -> anyhow::Result<Fairness> {
    for (tenant, source, on) in [
        ("noisy", NOISY, "flood"),
        ("quiet", "export default () => 1", "ping"),
    ] {
        store
            .deploy(&ScriptSpec {
                tenant: tenant.into(),
                name: "bench".into(),
                source: source.into(),
                subjects: vec![on.into()],
                timezone: "UTC".into(),
                ..Default::default()
            })
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = || crate::engine::rss_of(std::process::id()).unwrap_or(0) as f64 / 1048576.0;
    let rss_before = rss();
    let mut rss_peak = rss_before;
    let settled_before = stats.fanout.settled.load(Ordering::Relaxed);
    let succeeded_before = stats.attempts.succeeded.load(Ordering::Relaxed);
    let flood_subject = format!("{}.noisy.flood", s.nats.events_prefix);
    let db = crate::store::connect_direct(&s.database.url).await?;
    crate::bench::pipeline::publish_many(js, backlog, |_| flood_subject.clone()).await?;
    let (behind_wait, behind_meanwhile) =
        quiet_run(s, js, &db, stats, 0, &mut || rss_peak = rss_peak.max(rss())).await?;
    // The whole backlog is fanned out (run, or queued as jobs) before the second quiet
    // event.
    while stats.fanout.settled.load(Ordering::Relaxed) < settled_before + backlog as u64 + 1 {
        rss_peak = rss_peak.max(rss());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (quiet_wait, noisy_meanwhile) =
        quiet_run(s, js, &db, stats, 1, &mut || rss_peak = rss_peak.max(rss())).await?;
    while stats.attempts.succeeded.load(Ordering::Relaxed) < succeeded_before + backlog as u64 + 2 {
        rss_peak = rss_peak.max(rss());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let median: f64 = db
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) FROM runs
             WHERE tenant = 'noisy'",
            &[],
        )
        .await?
        .get(0);
    Ok(Fairness {
        backlog,
        behind_wait,
        behind_meanwhile,
        quiet_wait,
        noisy_meanwhile,
        noisy_run: Duration::from_secs_f64(median / 1000.0),
        rss_before,
        rss_peak,
    })
}

/// Publishes one quiet event (the quiet tenant has `before` runs so far) and waits for its
/// run: the time from its publish to its run's start, and the other runs that succeeded
/// meanwhile. `meanwhile` is called while it waits.
async fn quiet_run(
    s: &Settings,
    js: &jetstream::Context,
    db: &tokio_postgres::Client,
    stats: &DaemonStats,
    before: i64,
    meanwhile: &mut impl FnMut(),
) -> anyhow::Result<(Duration, u64)> {
    let done_before = stats.attempts.succeeded.load(Ordering::Relaxed);
    let published = Instant::now();
    js.publish(
        format!("{}.quiet.ping", s.nats.events_prefix),
        Bytes::from_static(b"{}"),
    )
    .await?
    .await?;
    let deadline = published + Duration::from_secs(120);
    loop {
        let runs: i64 = db
            .query_one("SELECT count(*) FROM runs WHERE tenant = 'quiet'", &[])
            .await?
            .get(0);
        if runs > before {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the quiet tenant's event did not run within 2 minutes"
        );
        meanwhile();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The record is written after the run; its start is what is measured.
    let row = db
        .query_one(
            "SELECT extract(epoch FROM (clock_timestamp() - max(started_at)))::float8 FROM runs
             WHERE tenant = 'quiet'",
            &[],
        )
        .await?;
    let since_start = Duration::from_secs_f64(row.get::<_, f64>(0).max(0.0));
    let waited = published.elapsed().saturating_sub(since_start);
    // Less the quiet run itself.
    let others = (stats.attempts.succeeded.load(Ordering::Relaxed) - done_before).saturating_sub(1);
    Ok((waited, others))
}

impl Fairness {
    pub fn print(&self) {
        println!(
            "fairness: another tenant's event published right behind a {}-event flood started \
             {:.1?} after its publish ({} flood runs finished meanwhile); once the flood was \
             fanned out, another started {:.1?} after its publish ({} flood runs meanwhile; \
             one takes {:.2?})",
            self.backlog,
            self.behind_wait,
            self.behind_meanwhile,
            self.quiet_wait,
            self.noisy_meanwhile,
            self.noisy_run
        );
        println!(
            "admission: daemon RSS {:.0} MiB before the flood, at most {:.0} MiB during it",
            self.rss_before, self.rss_peak
        );
    }
}
