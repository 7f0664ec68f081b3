//! Logging and OpenTelemetry: tracing-subscriber (human or JSON lines on standard error),
//! and, when an OTLP endpoint is configured, export of traces and metrics over OTLP/HTTP
//! (the metrics' OTLP reader joins the Prometheus one in their meter provider). W3C trace
//! context (`traceparent`) is read from and written to message headers here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::metrics::{MeterProviderBuilder, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{FilterExt, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::observe::metrics::Metrics;
use crate::units::duration_str;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The `[log]` settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// How log lines are written.
    pub format: LogFormat,
    /// A tracing filter (`info`, `scriptd=debug,warn`); `RUST_LOG` replaces it when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            filter: "info".into(),
        }
    }
}

/// The `[telemetry]` settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of the HTTP listener serving `/healthz`, `/readyz` and `/metrics`; empty for
    /// none.
    pub listen: String,
    /// OTLP/HTTP base URL (`http://collector:4318`). Empty: `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// if set, else nothing is exported.
    pub otlp_endpoint: String,
    /// `http/protobuf` or `http/json`. Empty: `OTEL_EXPORTER_OTLP_PROTOCOL`, else protobuf.
    pub otlp_protocol: String,
    /// Empty: `OTEL_SERVICE_NAME`, else `scriptd`.
    pub service_name: String,
    /// How often metrics are exported over OTLP.
    #[serde(with = "duration_str")]
    pub metrics_interval: Duration,
    /// Label run metrics with the tenant (one series per tenant: only with few tenants).
    pub tenant_labels: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            listen: "127.0.0.1:9464".into(),
            otlp_endpoint: String::new(),
            otlp_protocol: String::new(),
            service_name: String::new(),
            metrics_interval: Duration::from_secs(15),
            tenant_labels: false,
        }
    }
}

/// Holds the daemon's metrics; flushes and stops the exporters when dropped.
#[derive(Default)]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    metrics: Arc<Metrics>,
}

impl TelemetryGuard {
    /// The metrics to report to: served on `/metrics`, and exported over OTLP when spans
    /// are.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take() {
            if let Err(e) = tracer.shutdown() {
                eprintln!("scriptd: flushing traces failed: {e}");
            }
        }
        self.metrics.shutdown();
    }
}

/// The name of the span of one run attempt.
pub const RUN_SPAN: &str = "scriptd.run";

/// Installs the global subscriber. `RUST_LOG`, when set, replaces the configured filter.
/// Standard output stays free for command output. With `export`, and an OTLP endpoint
/// configured, spans and the guard's metrics are exported too. Call outside any async
/// runtime, and drop the guard outside one.
pub fn init(
    log: &LogConfig,
    telemetry: &TelemetryConfig,
    export: bool,
) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => EnvFilter::try_new(from_env)?,
        // The NATS client says "connected successfully" and "event: closed" at info level
        // on every command; its warnings and errors still show.
        _ if !log.filter.contains("async_nats") => {
            EnvFilter::try_new(format!("{},async_nats=warn", log.filter))?
        }
        _ => EnvFilter::try_new(&log.filter)?,
    };
    // Colours only for a terminal: a file or a pipe gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    // The log filter decides what is printed, not which spans are exported. Run spans are
    // not printed: the log lines of a run name its tenant, script and job themselves, and
    // the printer formatted every run's span fields (styling, escaping) though it never
    // printed them, work on every run seen under callgrind.
    //
    // The function passes every level, and says so: without that hint the pair had none, the
    // process's level ceiling was TRACE, and every library's debug events and `log` records
    // were built and dispatched only to be dropped here (~12 per event under callgrind).
    let filter = filter.and(
        tracing_subscriber::filter::filter_fn(|meta| !(meta.is_span() && meta.name() == RUN_SPAN))
            .with_max_level_hint(tracing::level_filters::LevelFilter::TRACE),
    );
    let fmt = match log.format {
        LogFormat::Human => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let mut guard = TelemetryGuard {
        tracer: None,
        metrics: Arc::new(Metrics::new(telemetry.tenant_labels)),
    };
    let otel = match export
        .then(|| otlp_target(telemetry))
        .transpose()?
        .flatten()
    {
        Some(target) => {
            let (tracer, meter) = start_exporters(telemetry, &target)?;
            let spans = Targets::new().with_target("scriptd", tracing::Level::INFO);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer.tracer("scriptd"))
                .with_filter(spans);
            opentelemetry::global::set_tracer_provider(tracer.clone());
            guard.tracer = Some(tracer);
            guard.metrics = Arc::new(Metrics::with_provider(telemetry.tenant_labels, meter));
            Some(layer)
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))?;
    Ok(guard)
}

struct Target {
    /// Base URL; `None` lets the exporter read `OTEL_EXPORTER_OTLP_*` itself.
    base: Option<String>,
    protocol: Protocol,
}

fn otlp_target(config: &TelemetryConfig) -> anyhow::Result<Option<Target>> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let base = if !config.otlp_endpoint.is_empty() {
        Some(config.otlp_endpoint.trim_end_matches('/').to_owned())
    } else if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
    {
        None
    } else {
        return Ok(None);
    };
    let protocol = match config.otlp_protocol.as_str() {
        "" => env("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "http/protobuf".into()),
        p => p.to_owned(),
    };
    let protocol = match protocol.as_str() {
        "http/protobuf" => Protocol::HttpBinary,
        "http/json" => Protocol::HttpJson,
        other => bail!("OTLP protocol {other:?} is not supported: use http/protobuf or http/json"),
    };
    Ok(Some(Target { base, protocol }))
}

/// The span exporter's provider, and a meter provider builder with the metric exporter's
/// reader.
fn start_exporters(
    config: &TelemetryConfig,
    target: &Target,
) -> anyhow::Result<(SdkTracerProvider, MeterProviderBuilder)> {
    let service = if !config.service_name.is_empty() {
        config.service_name.clone()
    } else {
        std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "scriptd".into())
    };
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let mut spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(target.protocol);
    let mut metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(target.protocol);
    if let Some(base) = &target.base {
        spans = spans.with_endpoint(format!("{base}/v1/traces"));
        metrics = metrics.with_endpoint(format!("{base}/v1/metrics"));
    }
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(spans.build().context("the OTLP span exporter")?)
        .with_resource(resource.clone())
        .build();
    let reader = PeriodicReader::builder(metrics.build().context("the OTLP metric exporter")?)
        .with_interval(config.metrics_interval)
        .build();
    let meter = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource);
    Ok((tracer, meter))
}

/// The trace context in `traceparent`, as a parent for a span.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// The trace id in a `traceparent` (`00-<trace id>-<span id>-<flags>`), when it holds a
/// valid one.
pub fn trace_id(traceparent: &str) -> Option<String> {
    let id = traceparent.split('-').nth(1)?;
    let valid = id.len() == 32
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && id.bytes().any(|b| b != b'0');
    valid.then(|| id.to_ascii_lowercase())
}

/// The `traceparent` naming `span`, when spans are exported.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_trace_id_is_read_from_a_valid_traceparent_only() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            super::trace_id(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(),
            Some(id)
        );
        assert_eq!(
            super::trace_id(&format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32))),
            None
        );
        assert_eq!(super::trace_id("00-xyz-00f067aa0ba902b7-01"), None);
        assert_eq!(super::trace_id("garbage"), None);
    }
}
