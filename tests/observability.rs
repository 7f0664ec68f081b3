//! Observability on the real services: `/metrics` moving with the work and parsing as
//! Prometheus text, `/readyz` following NATS, and spans exported over OTLP in the trace of
//! the service that published the event (retries and the dead letter included), with the
//! metrics under the same names.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use scriptd::engine::LimitOverrides;
use scriptd::retry::RetryOverrides;
use support::otlp::Collector;
use support::{Child, OwnNats, RunningDaemon, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

async fn get(daemon: &RunningDaemon, path: &str) -> (u16, String) {
    let address = daemon.stats.listening.get().expect("the endpoint listens");
    let response = reqwest::get(format!("http://{address}{path}"))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn listening(daemon: &RunningDaemon) {
    let deadline = std::time::Instant::now() + WAIT;
    while daemon.stats.listening.get().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the endpoint never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every metric family `/metrics` serves once the daemon has run events, with its type.
/// Schedule skips and start delays join them with the first scheduled occurrence.
const FAMILIES: &[(&str, &str)] = &[
    ("scriptd_events_received_total", "counter"),
    ("scriptd_events_dropped_total", "counter"),
    ("scriptd_jobs_created_total", "counter"),
    ("scriptd_events_returned_total", "counter"),
    ("scriptd_direct_runs_total", "counter"),
    ("scriptd_direct_overflows_total", "counter"),
    ("scriptd_runs_started_total", "counter"),
    ("scriptd_runs_finished_total", "counter"),
    ("scriptd_run_duration_seconds", "histogram"),
    ("scriptd_retries_total", "counter"),
    ("scriptd_dead_letters_total", "counter"),
    ("scriptd_jobs_returned_total", "counter"),
    ("scriptd_jobs_held_elsewhere_total", "counter"),
    ("scriptd_schedule_late_starts_total", "counter"),
    ("scriptd_engine_warm_hits_total", "counter"),
    ("scriptd_engine_cold_starts_total", "counter"),
    ("scriptd_engine_evictions_total", "counter"),
    ("scriptd_engine_discarded_total", "counter"),
    ("scriptd_engine_warm_isolates", "gauge"),
    ("scriptd_engine_in_flight", "gauge"),
    ("scriptd_engine_workers", "gauge"),
    ("scriptd_nats_connected", "gauge"),
    ("scriptd_postgres_connections", "gauge"),
    ("scriptd_postgres_waiting", "gauge"),
];

/// One scrape of `/metrics`.
struct Scrape {
    /// `series -> value`; a series is written `name{label="value",...}` with its labels in
    /// name order, whatever their order in the text.
    samples: HashMap<String, f64>,
    /// `family -> type`.
    types: HashMap<String, String>,
}

impl std::ops::Index<&str> for Scrape {
    type Output = f64;

    fn index(&self, series: &str) -> &f64 {
        self.samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series}"))
    }
}

/// Parses Prometheus text strictly enough to catch malformed output: every sample's
/// family was declared with a type, every value is a number, label values are quoted.
fn parse_prometheus(text: &str) -> Scrape {
    let mut types = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        assert!(types.contains_key(family), "undeclared family: {line}");
        let labels = series.strip_prefix(name).unwrap();
        let series = if labels.is_empty() {
            name.to_owned()
        } else {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("{line}"));
            let mut labels = parse_labels(inner).unwrap_or_else(|| panic!("{line}"));
            labels.sort();
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{name}{{{}}}", labels.join(","))
        };
        samples.insert(series, value);
    }
    Scrape { samples, types }
}

/// `a="x",b="y\"z"` as `[("a", "\"x\""), ...]` (values kept quoted and escaped).
fn parse_labels(mut text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    while !text.is_empty() {
        let (name, rest) = text.split_once('=')?;
        let rest = rest.strip_prefix('"')?;
        let mut escaped = false;
        let end = rest.char_indices().find_map(|(i, c)| match c {
            _ if escaped => {
                escaped = false;
                None
            }
            '\\' => {
                escaped = true;
                None
            }
            '"' => Some(i),
            _ => None,
        })?;
        labels.push((name.to_owned(), format!("\"{}\"", &rest[..end])));
        let rest = &rest[end + 1..];
        text = rest.strip_prefix(',').unwrap_or(rest);
    }
    Some(labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_events_are_processed() {
    let env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    settings.telemetry.listen = "127.0.0.1:0".into();
    env.deploy("acme", "fine", "export default () => 1", &["m.*"])
        .await;
    env.deploy_with(
        "acme",
        "broken",
        "export default () => { throw new Error('no'); }",
        &["m.bad"],
        LimitOverrides::default(),
        RetryOverrides {
            max_attempts: Some(1),
            ..Default::default()
        },
    )
    .await;
    let daemon = env.start_daemon_with(settings);
    listening(&daemon).await;
    let (status, body) = get(&daemon, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Parts attach as the daemon starts; wait for the engine's series.
    let deadline = std::time::Instant::now() + WAIT;
    let before = loop {
        let samples = parse_prometheus(&get(&daemon, "/metrics").await.1);
        if samples.samples.contains_key("scriptd_engine_workers") {
            break samples;
        }
        assert!(std::time::Instant::now() < deadline, "no engine metrics");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(before["scriptd_events_received_total"], 0.0);

    env.publish("acme", "m.good", "{}").await;
    env.publish("acme", "m.bad", "{}").await;
    env.publish("acme", "other", "{}").await;
    env.wait_for_runs(WAIT, |runs| runs.len() >= 3).await;
    let after = parse_prometheus(&get(&daemon, "/metrics").await.1);
    assert_eq!(after["scriptd_events_received_total"], 3.0);
    // All three ran straight from the fan-out: no job was needed.
    assert_eq!(after["scriptd_direct_runs_total"], 3.0);
    assert_eq!(after["scriptd_jobs_created_total"], 0.0);
    assert_eq!(
        after["scriptd_events_dropped_total{reason=\"unmatched\"}"],
        1.0
    );
    assert_eq!(after["scriptd_runs_started_total"], 3.0);
    assert_eq!(
        after["scriptd_runs_finished_total{kind=\"none\",status=\"ok\"}"],
        2.0
    );
    assert_eq!(
        after["scriptd_runs_finished_total{kind=\"exception\",status=\"dead_lettered\"}"],
        1.0
    );
    assert_eq!(after["scriptd_dead_letters_total"], 1.0);
    assert_eq!(after["scriptd_run_duration_seconds_count"], 3.0);
    assert_eq!(
        after["scriptd_run_duration_seconds_bucket{le=\"+Inf\"}"],
        3.0
    );
    assert!(after["scriptd_engine_cold_starts_total"] >= 2.0);
    assert_eq!(after["scriptd_nats_connected"], 1.0);
    for (family, kind) in FAMILIES {
        assert_eq!(
            after.types.get(*family).map(String::as_str),
            Some(*kind),
            "{family}"
        );
    }
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_nats() {
    let mut nats = OwnNats::start();
    let env = TestEnv::with_nats(&nats.url()).await;
    let mut settings = env.settings.clone();
    settings.telemetry.listen = "127.0.0.1:0".into();
    let daemon = env.start_daemon_with(settings);
    listening(&daemon).await;
    let ready_is = |want: u16| {
        let daemon = &daemon;
        async move {
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                let (status, body) = get(daemon, "/readyz").await;
                if status == want {
                    return body;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "/readyz stayed {status}: {body}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let body = ready_is(200).await;
    assert!(body.contains("\"script_index\":\"ok\""), "{body}");
    assert!(body.contains("\"consumers\":\"ok\""), "{body}");
    // Ready means consuming, with every metric family registered.
    let (_, metrics) = get(&daemon, "/metrics").await;
    for family in ["scriptd_nats_connected", "scriptd_events_received_total"] {
        assert!(
            metrics.contains(family),
            "{family} missing once ready:\n{metrics}"
        );
    }
    nats.stop();
    let body = ready_is(503).await;
    let checks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_ne!(checks["checks"]["nats"], "ok", "{body}");
    assert_eq!(checks["checks"]["postgres"], "ok", "{body}");
    let (status, _) = get(&daemon, "/healthz").await;
    assert_eq!(status, 200, "alive while not ready");
    nats.restart();
    ready_is(200).await;
    daemon.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_retries_and_dead_letters_join_the_publishers_trace() {
    let env = TestEnv::new().await;
    let collector = Collector::start().await;
    env.deploy_with(
        "acme",
        "always-fails",
        "export default () => { throw new Error('down'); }",
        &["traced"],
        LimitOverrides::default(),
        RetryOverrides {
            max_attempts: Some(2),
            initial: Some(Duration::from_millis(50)),
            ..Default::default()
        },
    )
    .await;
    let _daemon = Child(
        env.daemon_command()
            .arg("run")
            .env("SCRIPTD_TELEMETRY__OTLP_ENDPOINT", collector.endpoint())
            .env("SCRIPTD_TELEMETRY__OTLP_PROTOCOL", "http/json")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("SCRIPTD_TELEMETRY__METRICS_INTERVAL", "200ms")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn scriptd run"),
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    env.publish_traced(
        "acme",
        "traced",
        "{}",
        &format!("00-{trace_id}-{parent_id}-01"),
    )
    .await;
    env.wait_for_runs(WAIT, |runs| {
        runs.iter().any(|r| r.status == "dead_lettered")
    })
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    let spans = loop {
        let spans: Vec<_> = collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        let runs = spans.iter().filter(|s| s.name == "scriptd.run").count();
        if runs >= 2 && spans.iter().any(|s| s.name == "scriptd.dead_letter") {
            break spans;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "spans of the trace so far: {spans:#?}; all: {:#?}",
            collector.spans()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let runs: Vec<_> = spans.iter().filter(|s| s.name == "scriptd.run").collect();
    for run in &runs {
        assert_eq!(run.parent_span_id, parent_id, "{run:#?}");
        assert_eq!(run.attributes["tenant"], "acme");
        assert_eq!(run.attributes["script"], "always-fails");
        assert_eq!(run.attributes["trigger"], "event");
    }
    let outcomes: HashSet<_> = runs
        .iter()
        .map(|r| r.attributes["outcome"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        outcomes,
        HashSet::from(["retrying".to_owned(), "dead_lettered".to_owned()])
    );
    let dead_letter = spans
        .iter()
        .find(|s| s.name == "scriptd.dead_letter")
        .unwrap();
    assert!(
        runs.iter().any(|r| r.span_id == dead_letter.parent_span_id),
        "the dead letter's span is inside a run's span"
    );
    // The metrics go out over OTLP under the same names, without Prometheus' `_total` and
    // unit suffixes.
    let wanted: HashSet<String> = FAMILIES
        .iter()
        .map(|(name, kind)| match *kind {
            "counter" => name.strip_suffix("_total").unwrap().to_owned(),
            "histogram" => name.strip_suffix("_seconds").unwrap().to_owned(),
            _ => name.to_string(),
        })
        .collect();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let exported: HashSet<String> = collector.metric_names().into_iter().collect();
        let missing: Vec<_> = wanted.difference(&exported).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never exported: {missing:?}; exported: {exported:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.cleanup().await;
}
