//! Fan-out: each event on `<events_prefix>.<tenant>.<type>` becomes one job per matching
//! script of that tenant. The event is acknowledged once every job is stored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::Utc;
use serde_json::value::RawValue;

use super::dlq::{self, DeadLetter};
use super::job::{event_job_id, headers_as_json, payload_as_json, EventView, Job};
use super::NatsConfig;
use crate::engine::{Failure, FailureKind};
use crate::index::ScriptIndex;
use crate::subject;

/// Counters of the fan-out since start.
#[derive(Debug, Default)]
pub struct FanoutStats {
    pub events: AtomicU64,
    pub jobs: AtomicU64,
    /// Events of a tenant with no matching script.
    pub unmatched: AtomicU64,
    /// Events whose subject has no tenant or type.
    pub bad_subjects: AtomicU64,
    /// Events too large to fan out (dead-lettered).
    pub too_large: AtomicU64,
}

pub struct Fanout {
    pub js: jetstream::Context,
    pub config: NatsConfig,
    pub index: Arc<ScriptIndex>,
    pub stats: Arc<FanoutStats>,
}

impl Fanout {
    /// Handles one event message, ending with its ack (or nak when a job could not be
    /// stored, so the event comes back).
    pub async fn handle(&self, msg: jetstream::Message) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        let settle = match self.fan_out(&msg).await {
            Ok(()) => msg.ack().await,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %format!("{e:#}"), "Fan-out failed; the event will be delivered again.");
                msg.ack_with(AckKind::Nak(Some(std::time::Duration::from_secs(1))))
                    .await
            }
        };
        if let Err(e) = settle {
            tracing::warn!(error = %e, "Could not settle an event message; it will be redelivered.");
        }
    }

    async fn fan_out(&self, msg: &jetstream::Message) -> anyhow::Result<()> {
        let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let sequence = info.stream_sequence;
        let published = info.published.unix_timestamp_nanos();
        let parsed = match subject::parse_event_subject(&self.config.events_prefix, &msg.subject) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.stats.bad_subjects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(subject = %msg.subject, reason = %e, "Event dropped: its subject names no tenant and type.");
                return Ok(());
            }
        };
        let snapshot = self.index.snapshot();
        let scripts: Vec<_> = snapshot
            .matching(parsed.tenant, parsed.event_type)
            .collect();
        if scripts.is_empty() {
            self.stats.unmatched.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(subject = %msg.subject, "No script handles this event.");
            return Ok(());
        }
        let stream = self.config.events_stream();
        let event_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
            .unwrap_or_else(|| format!("{stream}-{sequence}"));
        let time = chrono::DateTime::from_timestamp_nanos(published as i64)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);

        if msg.payload.len() > self.config.max_event_size.as_usize() {
            self.stats.too_large.fetch_add(1, Ordering::Relaxed);
            for script in &scripts {
                let letter = DeadLetter {
                    tenant: script.tenant.clone(),
                    script: script.name.clone(),
                    job_id: event_job_id(&stream, sequence, script.id),
                    script_version: None,
                    failure: Failure {
                        kind: FailureKind::BadInput,
                        message: format!(
                            "the event payload is {} bytes, over nats.max_event_size ({}); it stays in stream {stream} at sequence {sequence}",
                            msg.payload.len(),
                            self.config.max_event_size
                        ),
                        stack: None,
                        retryable: false,
                    },
                    attempts: 0,
                    first_attempt_at: Utc::now(),
                    last_attempt_at: Utc::now(),
                    headers: headers_as_json(msg.headers.as_ref()),
                    job: RawValue::from_string(
                        serde_json::json!({ "subject": msg.subject.as_str(), "event_id": event_id })
                            .to_string(),
                    )?,
                };
                dlq::publish(&self.js, &self.config, &letter, msg.headers.as_ref()).await?;
            }
            return Ok(());
        }

        let (data, encoding) = payload_as_json(&msg.payload);
        let view = EventView {
            id: &event_id,
            subject: &msg.subject,
            event_type: parsed.event_type,
            tenant: parsed.tenant,
            data: &data,
            encoding,
            headers: headers_as_json(msg.headers.as_ref()),
            time,
        };
        let event = RawValue::from_string(serde_json::to_string(&view)?)?;
        let mut acks = Vec::with_capacity(scripts.len());
        for script in &scripts {
            let job = Job {
                id: event_job_id(&stream, sequence, script.id),
                tenant: script.tenant.clone(),
                script: script.name.clone(),
                trigger: "event".into(),
                subject: Some(msg.subject.to_string()),
                event_id: Some(event_id.clone()),
                event: event.clone(),
                version: None,
                scheduled_at: None,
                catch_up: false,
            };
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", job.id.as_str());
            for name in ["traceparent", crate::caps::DEPTH_HEADER] {
                if let Some(value) = msg.headers.as_ref().and_then(|h| h.get(name)) {
                    headers.insert(name, value.as_str());
                }
            }
            let ack = self
                .js
                .publish_with_headers(
                    self.config.job_subject(&job.tenant, &job.script),
                    headers,
                    Bytes::from(serde_json::to_vec(&job)?),
                )
                .await?;
            acks.push(ack);
        }
        for ack in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            ack?;
        }
        self.stats
            .jobs
            .fetch_add(scripts.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}
