//! NATS JetStream: the connection, the three streams (events, jobs, dead letters) and their
//! durable consumers, declared idempotently at start-up.

pub mod dlq;
pub mod fanout;
pub mod job;
pub mod lanes;
pub mod replay;
pub mod runner;

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use serde::{Deserialize, Serialize};

use crate::units::{duration_str, ByteSize};

/// The `[nats]` settings. Subject prefixes and the stream name prefix let several
/// deployments (or test runs) share one server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: String,
    /// Events arrive on `<events_prefix>.<tenant>.<type...>`.
    pub events_prefix: String,
    /// Jobs go to `<jobs_prefix>.<tenant>.<script>`.
    pub jobs_prefix: String,
    /// Dead letters go to `<dlq_prefix>.<tenant>.<script>`.
    pub dlq_prefix: String,
    /// Streams are `<stream_prefix>_EVENTS`, `_JOBS` and `_DLQ`.
    pub stream_prefix: String,
    /// How long a job id is remembered to drop duplicates (redelivered events, replicas).
    #[serde(with = "duration_str")]
    pub duplicate_window: Duration,
    /// How long events and jobs are kept in their streams at most.
    #[serde(with = "duration_str")]
    pub max_age: Duration,
    /// Events being fanned out per replica (pulled and not yet acknowledged). Jobs are
    /// pulled per tenant: see `[tenants]`.
    pub max_in_flight: usize,
    /// Largest event payload fanned out; larger ones are dead-lettered as `bad_input`.
    pub max_event_size: ByteSize,
    /// How long JetStream waits for an acknowledgement before redelivering. Runs in
    /// progress send progress acknowledgements, so this is independent of script timeouts.
    #[serde(with = "duration_str")]
    pub ack_wait: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            events_prefix: "events".into(),
            jobs_prefix: "scriptd.jobs".into(),
            dlq_prefix: "scriptd.dlq".into(),
            stream_prefix: "SCRIPTD".into(),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_in_flight: 256,
            max_event_size: ByteSize::kib(512),
            ack_wait: Duration::from_secs(30),
        }
    }
}

impl NatsConfig {
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.stream_prefix)
    }
    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.stream_prefix)
    }
    pub fn dlq_stream(&self) -> String {
        format!("{}_DLQ", self.stream_prefix)
    }
    pub fn job_subject(&self, tenant: &str, script: &str) -> String {
        format!("{}.{tenant}.{script}", self.jobs_prefix)
    }
    pub fn dlq_subject(&self, tenant: &str, script: &str) -> String {
        format!("{}.{tenant}.{script}", self.dlq_prefix)
    }
}

/// Pulls messages from `consumer` and hands each to `handler`, at most `concurrency` at a
/// time, until `stop` is cancelled; then waits for the handlers in flight. A broken message
/// stream (server restart, lost heartbeats) is opened again.
pub async fn consume<F, Fut>(
    consumer: consumer::PullConsumer,
    concurrency: usize,
    stop: tokio_util::sync::CancellationToken,
    handler: F,
) where
    F: Fn(jetstream::Message) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use futures::StreamExt;

    let tracker = tokio_util::task::TaskTracker::new();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    'open: while !stop.is_cancelled() {
        let opened = consumer
            .stream()
            .max_messages_per_batch(concurrency.max(1))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match opened {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot pull messages; trying again.");
                tokio::select! {
                    _ = stop.cancelled() => break 'open,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'open,
                }
            }
        };
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => break 'open,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break 'open,
                },
            };
            let next = tokio::select! {
                _ = stop.cancelled() => break 'open,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    let work = handler(message);
                    tracker.spawn(async move {
                        work.await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Message stream error.");
                }
                None => {
                    tracing::warn!("Message stream ended; opening it again.");
                    tokio::select! {
                        _ = stop.cancelled() => break 'open,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'open,
                    }
                }
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// Durable consumer names, shared by every replica: the fan-out's, and the prefix of the
/// tenant lanes' (`scriptd-runner-<tenant>`).
pub const FANOUT_CONSUMER: &str = "scriptd-fanout";
pub const RUNNER_CONSUMER: &str = "scriptd-runner";

/// Connects, retrying until the server answers; the client reconnects by itself later.
pub async fn connect(config: &NatsConfig) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("scriptd")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS connection lost; reconnecting.")
                }
                async_nats::Event::Connected => tracing::info!("NATS connected."),
                other => tracing::debug!(event = %other, "NATS event."),
            }
        })
        .connect(&config.url)
        .await
        .with_context(|| {
            format!(
                "connecting to NATS at {} (is nats-server running with -js?)",
                config.url
            )
        })
}

/// The three streams, created or updated to this configuration.
pub async fn ensure_streams(js: &jetstream::Context, config: &NatsConfig) -> anyhow::Result<()> {
    let streams = [
        (
            config.events_stream(),
            format!("{}.>", config.events_prefix),
            "Domain events, by tenant",
        ),
        (
            config.jobs_stream(),
            format!("{}.>", config.jobs_prefix),
            "One script run each",
        ),
        (
            config.dlq_stream(),
            format!("{}.>", config.dlq_prefix),
            "Runs that exhausted their retries",
        ),
    ];
    for (name, subject, description) in streams {
        // Jobs are a work queue: a job leaves the stream when it is acknowledged, which lets
        // each tenant have its own consumer (see `lanes`).
        let retention = if name == config.jobs_stream() {
            stream::RetentionPolicy::WorkQueue
        } else {
            stream::RetentionPolicy::Limits
        };
        let wanted = stream::Config {
            name: name.clone(),
            subjects: vec![subject],
            description: Some(description.into()),
            retention,
            storage: stream::StorageType::File,
            duplicate_window: config.duplicate_window,
            max_age: if name == config.dlq_stream() {
                Duration::ZERO
            } else {
                config.max_age
            },
            allow_direct: true,
            ..Default::default()
        };
        match js.get_stream(&name).await {
            Ok(mut existing) => {
                let found = existing.info().await?.config.retention;
                anyhow::ensure!(
                    found == retention,
                    "stream {name} has {found:?} retention, this scriptd needs {retention:?}: \
                     it was made by an earlier scriptd. Stop every replica, let them finish \
                     their jobs, delete the stream (nats stream rm {name}) and start again"
                );
                js.update_stream(&wanted)
                    .await
                    .with_context(|| format!("updating stream {name}"))?;
            }
            Err(_) => {
                js.create_stream(wanted)
                    .await
                    .with_context(|| format!("creating stream {name}"))?;
            }
        }
    }
    Ok(())
}

/// A durable pull consumer, created or updated.
pub async fn durable_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    name: &str,
    ack_wait: Duration,
    max_ack_pending: usize,
    filter_subject: Option<String>,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js
        .get_stream(stream_name)
        .await
        .with_context(|| format!("stream {stream_name} is missing"))?;
    let config = consumer::pull::Config {
        durable_name: Some(name.into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        // Retries are decided by the retry policy; this is only a backstop against a
        // message that can never be handled.
        max_deliver: 1000,
        max_ack_pending: max_ack_pending as i64,
        filter_subject: filter_subject.unwrap_or_default(),
        ..Default::default()
    };
    match stream.get_consumer::<consumer::pull::Config>(name).await {
        Ok(_) => {
            js.update_consumer_on_stream(config, stream_name)
                .await
                .with_context(|| format!("updating consumer {name}"))?;
        }
        Err(_) => {
            stream
                .create_consumer(config)
                .await
                .with_context(|| format!("creating consumer {name}"))?;
        }
    }
    stream
        .get_consumer(name)
        .await
        .map_err(|e| anyhow::anyhow!("opening consumer {name}: {e}"))
}
