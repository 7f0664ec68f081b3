//! Fan-out: each event on `<events_prefix>.<tenant>.<type>` is handed to every matching
//! script of that tenant, as a first attempt run here at once (direct runs) or as a job in
//! the tenant's lane. The event is acknowledged once every run is recorded or its job is
//! stored; retries always go through the lanes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::dlq;
use super::error::{BusError, Doing, Result};
use super::lanes::Lane;
use super::runner::RETRY_AT_HEADER;
use super::{Claims, NatsConfig};
use crate::domain::Trigger;
use crate::engine::{Failure, FailureKind};
use crate::pipeline::attempt::{Attempt, Outcome};
use crate::pipeline::dead_letter::DeadLetter;
use crate::pipeline::executor::Executor;
use crate::pipeline::job::{event_job_id, headers_as_json, payload_as_json, EventView, Job};
use crate::pipeline::report::run_span;
use crate::scripts::index::ScriptIndex;
use crate::store::{Claim, ClaimScope};
use crate::subject;

/// Counters of the fan-out since start.
#[derive(Debug, Default)]
pub struct FanoutStats {
    /// Events taken from the events stream.
    pub events: AtomicU64,
    /// Events acknowledged: every run recorded or its job stored (or nothing to run).
    pub settled: AtomicU64,
    /// Jobs published: runs that could not start here soon, and retries of direct runs.
    pub jobs: AtomicU64,
    /// First attempts run straight from the fan-out.
    pub direct: AtomicU64,
    /// Of those, the ones run without an attempt claim: their event's first delivery
    /// anywhere (`Lane::first_delivery`).
    pub unclaimed: AtomicU64,
    /// Runs queued in their lane because no permit or engine slot came within
    /// `nats.direct_wait` (or the daemon was stopping).
    pub overflowed: AtomicU64,
    /// Events handed back unfinished: nak'ed for a run not recorded, a job not stored or a
    /// claim not taken; left to come back after the ack wait at the end of the shutdown
    /// grace period.
    pub returned: AtomicU64,
    /// Events of a tenant with no matching script.
    pub unmatched: AtomicU64,
    /// Events whose subject has no tenant or type.
    pub bad_subjects: AtomicU64,
    /// Events too large to fan out (dead-lettered).
    pub too_large: AtomicU64,
}

/// Hands each event to its tenant's matching scripts (see the module's doc).
pub struct Fanout {
    /// Where jobs and dead letters are published.
    pub js: jetstream::Context,
    /// The `[nats]` settings (subjects, streams, direct-run wait, event size limit).
    pub config: NatsConfig,
    /// The scripts at their current versions, matched by subject.
    pub index: Arc<ScriptIndex>,
    /// The fan-out's counters.
    pub stats: Arc<FanoutStats>,
    /// Runs first attempts in the fan-out when set (`nats.direct_runs`).
    pub direct: Option<Arc<Executor>>,
    /// The events being handled here.
    pub in_flight: Claims,
}

impl Fanout {
    /// Handles one event message, ending with its ack (or nak when a run could not be
    /// recorded or a job stored, so the event comes back; runs already recorded are not
    /// run again). `hard_stop` ends direct runs still going at the end of the shutdown
    /// grace period: the event is left to come back after its ack wait.
    pub async fn handle(&self, msg: jetstream::Message, lane: Lane, hard_stop: CancellationToken) {
        // Where the event sits in its stream, when it was stored and whether this is its
        // first delivery anywhere, read from the delivery's reply subject once.
        let Ok((sequence, published, first)) = msg.info().map(|i| {
            let first = lane.first_delivery(i.delivered, i.stream_sequence, i.published);
            (i.stream_sequence, i.published.unix_timestamp_nanos(), first)
        }) else {
            tracing::warn!(subject = %msg.subject, "An event message without its JetStream info; it will be delivered again.");
            return;
        };
        let Some(_claim) = self.in_flight.claim(sequence) else {
            tracing::debug!(subject = %msg.subject, "An event already being handled here was delivered again; ignored.");
            return;
        };
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        let fan_out = self.fan_out(&msg, sequence, published, first, &lane.runs);
        let outcome = tokio::select! {
            outcome = super::keeping_alive(&msg, self.config.ack_wait, fan_out) => outcome,
            _ = hard_stop.cancelled() => {
                // A run cut off here goes on in its engine host until the host has drained
                // (up to its timeout): the event comes back after its ack wait rather than
                // at once, so that no replica runs it meanwhile (a first delivery's run
                // holds no claim that would keep it from doing so).
                self.stats.returned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(subject = %msg.subject, "Runs still going at the end of the shutdown grace period; the event comes back after nats.ack_wait.");
                return;
            }
        };
        let settle = match outcome {
            Ok(()) => {
                self.stats.settled.fetch_add(1, Ordering::Relaxed);
                msg.ack().await
            }
            Err(e) => {
                self.stats.returned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(subject = %msg.subject, error = %format!("{e:#}"), "Fan-out failed; the event will be delivered again.");
                msg.ack_with(AckKind::Nak(Some(std::time::Duration::from_secs(1))))
                    .await
            }
        };
        if let Err(e) = settle {
            tracing::warn!(error = %e, "Could not settle an event message; it will be redelivered.");
        }
    }

    async fn fan_out(
        &self,
        msg: &jetstream::Message,
        sequence: u64,
        published_nanos: i128,
        first: bool,
        runs: &super::RunsPerMessage,
    ) -> Result<()> {
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
        runs.observe(scripts.len());
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
        let time = chrono::DateTime::from_timestamp_nanos(published_nanos as i64)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);

        if msg.payload.len() > self.config.max_event_size.as_usize() {
            self.stats.too_large.fetch_add(1, Ordering::Relaxed);
            for script in &scripts {
                let failure = Failure {
                    kind: FailureKind::BadInput,
                    message: format!(
                        "the event payload is {} bytes, over nats.max_event_size ({}); it stays in stream {stream} at sequence {sequence}",
                        msg.payload.len(),
                        self.config.max_event_size
                    ),
                    stack: None,
                    retryable: false,
                };
                let letter = DeadLetter::of_event(
                    &script.tenant,
                    &script.name,
                    event_job_id(&stream, sequence, script.id),
                    failure,
                    msg.headers.as_ref(),
                    &serde_json::json!({ "subject": msg.subject.as_str(), "event_id": event_id }),
                )
                .doing(|| "writing a dead letter".into())?;
                Box::pin(dlq::publish(
                    &self.js,
                    &self.config,
                    &letter,
                    msg.headers.as_ref(),
                ))
                .await?;
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
        // Written once, not parsed again: what serde_json writes is JSON.
        let event = serde_json::value::to_raw_value(&view)
            .doing(|| "writing the event for its scripts".into())?;
        // What a job of this event carries besides its id: the trace and the chain depth.
        let mut headers = HeaderMap::new();
        for name in ["traceparent", crate::caps::DEPTH_HEADER] {
            if let Some(value) = msg.headers.as_ref().and_then(|h| h.get(name)) {
                headers.insert(name, value.as_str());
            }
        }
        let jobs = scripts.iter().map(|script| Job {
            id: event_job_id(&stream, sequence, script.id),
            tenant: script.tenant.clone(),
            script: script.name.clone(),
            trigger: Trigger::Event,
            subject: Some(msg.subject.to_string()),
            event_id: Some(event_id.clone()),
            event: event.clone(),
            version: None,
            scheduled_at: None,
            input_ref: Some(format!("{stream}:{sequence}")),
            catch_up: false,
        });
        if let Some(executor) = &self.direct {
            let runs = jobs.map(|job| self.direct(executor, job, &headers, first));
            for done in futures::future::join_all(runs).await {
                done?;
            }
            return Ok(());
        }
        let mut acks = Vec::with_capacity(scripts.len());
        for job in jobs {
            acks.push(Box::pin(self.publish(&job, &headers, None)).await?);
        }
        for ack in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            ack.doing(|| "storing a job".into())?;
        }
        self.stats
            .jobs
            .fetch_add(scripts.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Runs the first attempt of `job` here if its tenant's permit and an engine slot come
    /// within `nats.direct_wait` and this replica wins the attempt's claim (or needs none:
    /// `first`, its event's first delivery anywhere), else queues the job in its tenant's
    /// lane. Returns once the attempt is recorded (a retry queued in the lane) or the job
    /// is stored.
    async fn direct(
        &self,
        executor: &Executor,
        job: Job,
        headers: &HeaderMap,
        first: bool,
    ) -> Result<()> {
        // A first delivery anywhere needs no claim: nothing ran the job before, and the
        // event comes back (to any replica) only after its ack wait with no progress,
        // by when this run has ended if it starts within the direct wait and its worker's
        // queue is shorter than the rest of the ack wait (`hold_unclaimed`).
        let within = self.config.ack_wait.saturating_sub(self.config.direct_wait);
        let unclaimed = first && executor.hold_unclaimed(&job, within);
        // Otherwise the claim says whether this event was handled before (a redelivery
        // after a crash, a lost ack, or nats-server#4460): what ended stays ended; a job
        // with a failed attempt, or whose attempt another replica holds, continues in its
        // lane. It is taken before the engine slot, whose wait is short here: claimed once
        // the slot had come, the slot idled through the claim's round trip (1-script
        // throughput -40 %).
        let claim = if unclaimed {
            Ok(Claim::Won {
                attempt: 1,
                first_at: Utc::now(),
                taken_over: false,
            })
        } else {
            Box::pin(executor.claim(&job, ClaimScope::FirstOnly)).await
        };
        let (number, first_at) = match claim {
            Ok(Claim::Won {
                attempt, first_at, ..
            }) => (attempt, first_at),
            Ok(Claim::Ended) => return Ok(()),
            Ok(Claim::Held { .. } | Claim::Later { .. }) => {
                return Box::pin(self.queue(&job, headers, None)).await;
            }
            Err(e) => {
                return Err(BusError::Unsettled(format!(
                    "cannot claim the first attempt of job {}: {e}",
                    job.id
                )))
            }
        };
        // Stopping: what has not started goes to the lane, for this or another replica.
        let slot = tokio::time::timeout(self.config.direct_wait, executor.slot(&job.tenant))
            .await
            .ok()
            .flatten();
        let Some(slot) = slot else {
            self.stats.overflowed.fetch_add(1, Ordering::Relaxed);
            if unclaimed {
                executor.let_go(&job);
            } else {
                executor.release(&job, number).await;
            }
            return Box::pin(self.queue(&job, headers, None)).await;
        };
        self.stats.direct.fetch_add(1, Ordering::Relaxed);
        if unclaimed {
            self.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
        }
        let span = run_span(&job, Some(headers));
        let attempt = Attempt {
            job: &job,
            number,
            first_at,
            headers: Some(headers),
            unclaimed,
        };
        match executor.run(attempt, slot).instrument(span).await {
            Ok(Outcome::Retry { after }) => {
                let due = Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
                Box::pin(self.queue(&job, headers, Some(due))).await
            }
            Ok(
                Outcome::Ok | Outcome::DeadLettered(_) | Outcome::Skipped(_) | Outcome::Failed(_),
            ) => Ok(()),
            Err(_) => Err(BusError::Unsettled(format!(
                "the attempt of job {} was not recorded",
                job.id
            ))),
        }
    }

    /// Publishes `job` to its lane and waits until JetStream has stored it.
    async fn queue(
        &self,
        job: &Job,
        headers: &HeaderMap,
        due: Option<chrono::DateTime<Utc>>,
    ) -> Result<()> {
        self.publish(job, headers, due)
            .await?
            .await
            .doing(|| format!("storing job {}", job.id))?;
        self.stats.jobs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes `job` with its deterministic message id (a job published again, by a
    /// redelivered event or another replica, is stored once); `due` delays its next
    /// attempt.
    async fn publish(
        &self,
        job: &Job,
        headers: &HeaderMap,
        due: Option<chrono::DateTime<Utc>>,
    ) -> Result<jetstream::context::PublishAckFuture> {
        let mut headers = headers.clone();
        headers.insert("Nats-Msg-Id", job.id.as_str());
        if let Some(due) = due {
            headers.insert(RETRY_AT_HEADER, due.timestamp_millis().to_string().as_str());
        }
        let doing = || format!("publishing job {}", job.id);
        let payload = serde_json::to_vec(job).doing(doing)?;
        self.js
            .publish_with_headers(
                self.config.job_subject(&job.tenant, &job.script),
                headers,
                Bytes::from(payload),
            )
            .await
            .doing(doing)
    }
}
