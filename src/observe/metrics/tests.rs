//! The exposition of `Metrics`: names, labels, HELP texts, buckets and values read at
//! collection time.

use super::*;

/// The sample lines of `text` (comments left out).
fn samples(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

/// Asserts that each of `lines` is a whole line of `text`.
fn assert_lines(text: &str, lines: &[&str]) {
    for line in lines {
        assert!(text.lines().any(|l| l == *line), "{line} in\n{text}");
    }
}

#[test]
fn runs_are_counted_by_status_and_kind_and_rendered() {
    let m = Metrics::new(false);
    m.run_started();
    m.run_finished("acme", "ok", None, Some(Duration::from_millis(3)));
    m.run_finished(
        "acme",
        "retrying",
        Some("timeout"),
        Some(Duration::from_secs(2)),
    );
    m.run_finished("globex", "retrying", Some("timeout"), None);
    m.schedule_started(Duration::from_secs(3));
    m.schedule_skipped("overlap", 2);
    let text = m.render().unwrap();
    assert_lines(
        &text,
        &[
            "scriptd_runs_started_total 1",
            "scriptd_runs_finished_total{kind=\"timeout\",status=\"retrying\"} 2",
            "scriptd_runs_finished_total{kind=\"none\",status=\"ok\"} 1",
            "scriptd_run_duration_seconds_bucket{le=\"0.0025\"} 0",
            "scriptd_run_duration_seconds_bucket{le=\"0.005\"} 1",
            "scriptd_run_duration_seconds_bucket{le=\"2.5\"} 2",
            "scriptd_run_duration_seconds_bucket{le=\"+Inf\"} 2",
            "scriptd_run_duration_seconds_sum 2.003",
            "scriptd_run_duration_seconds_count 2",
            "scriptd_schedule_start_delay_seconds_bucket{le=\"5\"} 1",
            "scriptd_schedule_start_delay_seconds_count 1",
            "scriptd_schedule_late_starts_total 1",
            "scriptd_schedule_skips_total{reason=\"overlap\"} 2",
        ],
    );
    assert!(!text.contains("tenant="));
    // Every sample line is `name{labels} value` with a number.
    for line in samples(&text) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

#[test]
fn exposition_has_the_names_help_and_buckets_scrapers_know() {
    let m = Metrics::new(false);
    // Before anything happened: the counters without labels, at zero.
    let text = m.render().unwrap();
    assert_eq!(
        samples(&text),
        [
            "scriptd_runs_started_total 0",
            "scriptd_schedule_late_starts_total 0"
        ],
        "{text}"
    );
    m.run_finished("acme", "ok", None, Some(Duration::from_millis(3)));
    m.schedule_started(Duration::from_millis(20));
    let text = m.render().unwrap();
    assert_lines(
        &text,
        &[
        "# HELP scriptd_runs_started_total Runs started.",
        "# TYPE scriptd_runs_started_total counter",
        "# HELP scriptd_run_duration_seconds Run duration in the engine.",
        "# TYPE scriptd_run_duration_seconds histogram",
        "# HELP scriptd_schedule_start_delay_seconds Time from a schedule occurrence to its run's start.",
        "# TYPE scriptd_schedule_start_delay_seconds histogram",
        ],
    );
    for (name, bounds) in [
        ("scriptd_run_duration_seconds", RUN_BUCKETS),
        ("scriptd_schedule_start_delay_seconds", DELAY_BUCKETS),
    ] {
        let prefix = format!("{name}_bucket{{le=\"");
        let les: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str())?.split('"').next())
            .collect();
        let mut want: Vec<String> = bounds.iter().map(f64::to_string).collect();
        want.push("+Inf".into());
        assert_eq!(les, want, "{text}");
    }
    assert!(!text.contains("target_info"), "{text}");
    assert!(!text.contains("otel_scope"), "{text}");
}

#[test]
fn tenants_are_labels_only_when_configured() {
    let m = Metrics::new(true);
    m.run_finished("acme", "ok", None, None);
    assert!(m.render().unwrap().contains("tenant=\"acme\""));
    m.set_tenant_labels(false);
    m.run_finished("acme", "ok", None, None);
    let text = m.render().unwrap();
    assert_lines(
        &text,
        &["scriptd_runs_finished_total{kind=\"none\",status=\"ok\"} 1"],
    );
}

#[test]
fn observed_values_are_read_at_each_scrape() {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    let m = Metrics::new(false);
    let events = Arc::new(AtomicU64::new(3));
    let theirs = events.clone();
    m.observe(
        Kind::Counter,
        "scriptd_events_received_total",
        "Events taken from the events stream.",
        move |r| r.value(theirs.load(Ordering::Relaxed) as f64),
    );
    m.observe(
        Kind::Gauge,
        "scriptd_postgres_connections",
        "Pooled PostgreSQL connections, by state.",
        |r| {
            r.labelled(&[("state", "idle")], 2.0);
            r.labelled(&[("state", "in_use")], 1.0);
        },
    );
    // A second registration of a name changes nothing.
    m.observe(
        Kind::Counter,
        "scriptd_events_received_total",
        "Other.",
        |r| r.value(100.0),
    );
    assert_lines(
        &m.render().unwrap(),
        &[
            "# HELP scriptd_events_received_total Events taken from the events stream.",
            "# TYPE scriptd_events_received_total counter",
            "scriptd_events_received_total 3",
            "# TYPE scriptd_postgres_connections gauge",
            "scriptd_postgres_connections{state=\"idle\"} 2",
            "scriptd_postgres_connections{state=\"in_use\"} 1",
        ],
    );
    events.store(5, Ordering::Relaxed);
    assert_lines(&m.render().unwrap(), &["scriptd_events_received_total 5"]);
}
