//! NATS JetStream: the connection, the three streams (events, jobs, dead letters) and their
//! durable consumers, declared idempotently at start-up.

pub mod dlq;
pub mod error;
pub mod fanout;
pub mod lanes;
pub mod replay;
pub mod runner;
pub mod streams;
pub mod ticker;

pub use streams::ensure_streams;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::units::{duration_str, ByteSize};
use error::{BusError, Doing, Result};

/// The `[nats]` settings. Subject prefixes and the stream name prefix let several
/// deployments (or test runs) share one server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// The NATS server to connect to, JetStream enabled; several (a cluster's nodes)
    /// separated by commas.
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
    /// Not used any more: events are pulled per tenant, each tenant's event lane with its
    /// own window (`[tenants]`). Accepted so that older configuration files still load.
    pub max_in_flight: usize,
    /// How long before a tenant's first script a new event lane of the tenant starts: the
    /// script is dated by PostgreSQL's clock and the events by the NATS server's, so this
    /// covers the two clocks' disagreement. Events published up to this long before the
    /// first script was deployed run too.
    #[serde(with = "duration_str")]
    pub lane_start_margin: Duration,
    /// Largest event payload fanned out; larger ones are dead-lettered as `bad_input`.
    pub max_event_size: ByteSize,
    /// How long JetStream waits for an acknowledgement before redelivering. Runs in
    /// progress send progress acknowledgements, so this is independent of script timeouts.
    #[serde(with = "duration_str")]
    pub ack_wait: Duration,
    /// Run an event's first attempts straight from the fan-out (one JetStream hop instead
    /// of two); jobs are published only for retries and for runs that cannot start soon.
    pub direct_runs: bool,
    /// How long a direct run may wait for its tenant's permit and an engine slot before it
    /// is queued in its tenant's lane as a job instead.
    #[serde(with = "duration_str")]
    pub direct_wait: Duration,
    /// Claim the attempt of every direct run, also of an event's first delivery. Off, a
    /// first delivery anywhere (nats-server 2.10 or later, an event stored after its lane
    /// was made, no earlier scriptd's fan-out consumer) runs without a claim, if its run is
    /// sure to end within `ack_wait` (see docs/architecture.md).
    pub claim_first_deliveries: bool,
    /// Each stream's replicas, storage and limits (`[nats.streams.events]`, ...).
    pub streams: streams::Streams,
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
            lane_start_margin: Duration::from_secs(1),
            max_event_size: ByteSize::kib(512),
            ack_wait: Duration::from_secs(30),
            direct_runs: true,
            direct_wait: Duration::from_millis(50),
            claim_first_deliveries: false,
            streams: Default::default(),
        }
    }
}

impl NatsConfig {
    /// The servers of `url`: one, or several separated by commas (the nodes of a cluster;
    /// the client also learns the others from the one it reaches).
    pub fn servers(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }

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

/// How long a pull request waits at the server for the messages it asks for. The client
/// gives up on it 5 s later if the server's end-of-request never came (a server restart
/// forgets requests), so this also bounds how long a consumer can stay deaf.
const LONG_POLL: Duration = Duration::from_secs(10);

/// How long past its expiry a request may stay unanswered before it is given up.
const NO_ANSWER: Duration = Duration::from_secs(5);

/// Runs per message of a lane lately (an event's matching scripts, 1 for a job), in
/// thousandths: a lane's window counts runs. It rises at once to a message that made more
/// (so a lane holds no more runs than its window) and falls back by an eighth of the
/// difference per message; 0 until the first message is told.
#[derive(Debug, Default)]
pub struct RunsPerMessage(AtomicU64);

impl RunsPerMessage {
    /// A message made `runs` runs (at least one place each, though: an event no script
    /// matches is still a message in hand).
    pub fn observe(&self, runs: usize) {
        let runs = runs.max(1) as u64 * 1000;
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                Some(if runs >= now {
                    runs
                } else {
                    (7 * now + runs) / 8
                })
            });
    }

    /// The places a message takes now (at least one), or none before the first message.
    pub fn places(&self) -> Option<usize> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            now => Some(((now + 500) / 1000).max(1) as usize),
        }
    }
}

/// Pulls `consumer` with at most `window` runs' worth of messages in hand until `stop`,
/// handing each to `handler`; then waits for the handlers in flight. A message takes as
/// many places as its lane's messages made runs lately (`runs`, told by the handler): so
/// a lane whose events each match three scripts holds a third as many events as one whose
/// events match one, and its runs wait no longer for an engine slot.
///
/// JetStream is asked for exactly as many messages as there are free places, in one
/// request that the server answers as messages come (a long poll): so every message
/// received is handled at once (and a job kept alive by its handler); none waits unseen in
/// a client buffer, where its ack wait could run out and JetStream hand it to another
/// replica too (a prefetching pull ran jobs twice in the rolling-restart test that way).
/// A request fills up as messages are published, with no request per message; once one was
/// filled (so more are likely waiting), the next waits for a quarter of the window to be
/// free: under load the pulls come in chunks, not one per message handled, and the
/// messages of a chunk claim their attempts in one batch. A request that fails (server
/// restart, lost connection) is made again.
///
/// `handler` returns its work boxed: moving a handler's future by value into each task cost
/// more copying than anything else the daemon did per message. For the same reason the
/// attempt path boxes its largest awaits (the engine's run, the record's write, store
/// queries, lane publishes): held inline, each grew every future above it, and each of
/// those was copied whole (a future's full size, whatever state it is in) when it was
/// boxed or placed in its parent: ~10 KiB several times per event before.
pub async fn pull<F>(
    consumer: jetstream::consumer::PullConsumer,
    window: usize,
    runs: Arc<RunsPerMessage>,
    stop: CancellationToken,
    handler: F,
) where
    F: Fn(jetstream::Message) -> futures::future::BoxFuture<'static, ()>,
{
    let tracker = tokio_util::task::TaskTracker::new();
    let window = window.max(1);
    let places = Arc::new(Semaphore::new(window));
    let chunk = (window / 4).max(1);
    // The last request was filled: more messages are probably waiting.
    let mut behind = false;
    'pull: while !stop.is_cancelled() {
        // Places per message now: a request waits for at least one message's worth. Until
        // the lane has had a message, it asks for no more than a chunk (one place each):
        // asked for a whole window of events that each match several scripts, it held
        // several windows of runs, more than could start within `nats.direct_wait`.
        let (each, most) = match runs.places() {
            Some(each) => (each.min(window), window),
            None => (1, chunk),
        };
        let mut hand = Vec::with_capacity(window);
        while hand.len() < each || (behind && hand.len() < chunk) {
            tokio::select! {
                _ = stop.cancelled() => break 'pull,
                place = places.clone().acquire_owned() => match place {
                    Ok(place) => hand.push(place),
                    Err(_) => break 'pull,
                },
            }
            while let Ok(place) = places.clone().try_acquire_owned() {
                hand.push(place);
            }
        }
        hand.truncate(most);
        let asked = hand.len() / each;
        let request = consumer
            .batch()
            .max_messages(asked)
            .expires(LONG_POLL)
            .messages()
            .await;
        let mut messages = match request {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot pull messages; trying again.");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut received = 0;
        loop {
            let next = tokio::select! {
                // Messages already delivered and not taken come back after their ack wait.
                _ = stop.cancelled() => break 'pull,
                // A request that gets no answer (sent just as the server restarted) ends
                // here, by the client's own timer or after this long.
                next = tokio::time::timeout(LONG_POLL + NO_ANSWER, messages.next()) => next,
            };
            let Ok(next) = next else {
                tracing::debug!("A pull request got no answer; asking again.");
                break;
            };
            match next {
                Some(Ok(message)) => {
                    received += 1;
                    let place = hand.split_off(hand.len().saturating_sub(each));
                    let work = handler(message);
                    tracker.spawn(async move {
                        work.await;
                        drop(place);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "Pull request ended.");
                    break;
                }
                None => break,
            }
        }
        behind = received == asked;
    }
    tracker.close();
    tracker.wait().await;
}

/// Drives `work`, telling JetStream every third of `ack_wait` that `msg` is still being
/// handled: waiting for a permit or an engine slot, running, or waiting for its record. A
/// message held here never expires and goes to another replica meanwhile (which ran jobs
/// twice when replicas held more jobs than they could start within the ack wait).
pub(crate) async fn keeping_alive<T>(
    msg: &jetstream::Message,
    ack_wait: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    let progress = || async {
        let _ = msg.ack_with(jetstream::AckKind::Progress).await;
    };
    every(ack_wait / 3, work, progress).await
}

/// Drives `work` to its end, awaiting `tick()` every `period` meanwhile; the first tick is
/// a period from now. (Awaiting an interval's immediate first tick instead held every
/// message ~1 ms, since the timer rounds a deadline up to its next millisecond: more than
/// half of publish → run start at 500 events/s.)
async fn every<T, F: std::future::Future<Output = ()>>(
    period: Duration,
    work: impl std::future::Future<Output = T>,
    mut tick: impl FnMut() -> F,
) -> T {
    tokio::pin!(work);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticks.tick() => tick().await,
        }
    }
}

/// Stream sequences of the messages being handled here. JetStream can hand the same message
/// to a consumer again while it is still being handled (seen after a nak during another
/// replica's shutdown); the second delivery is left to the first's outcome.
#[derive(Default)]
pub struct Claims(std::sync::Mutex<std::collections::HashSet<u64>>);

/// Removes a message from its `Claims` when its handling ends, however it ends.
pub struct Claim<'a> {
    claims: &'a Claims,
    sequence: u64,
}

impl Claims {
    /// Claims the message at stream sequence `sequence` for this handler; `None` when it
    /// is being handled here already.
    pub fn claim(&self, sequence: u64) -> Option<Claim<'_>> {
        let fresh = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sequence);
        fresh.then_some(Claim {
            claims: self,
            sequence,
        })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.claims
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.sequence);
    }
}

/// Durable consumer names, shared by every replica: the prefix of the tenants' event lanes
/// (`scriptd-fanout-<tenant>`; alone, the one events consumer of earlier versions, which a
/// new lane starts after: see `lanes`), and the prefix of the tenants' job lanes
/// (`scriptd-runner-<tenant>`).
pub const FANOUT_CONSUMER: &str = "scriptd-fanout";
pub const RUNNER_CONSUMER: &str = "scriptd-runner";

/// Connects, or says it could not (`BusError::Unavailable`, naming the server); once
/// connected, the client reconnects by itself. The daemon waits for the server with its
/// own messages, each naming the URL, instead of the client's silent retries.
pub async fn connect(config: &NatsConfig) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("scriptd")
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
        .connect(config.servers())
        .await
        .map_err(|source| BusError::Unavailable {
            url: config.url.clone(),
            source,
        })
}

/// A durable pull consumer, created or updated; asked again while JetStream is not ready.
pub async fn durable_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    name: &str,
    ack_wait: Duration,
    max_ack_pending: usize,
    filter_subject: Option<String>,
) -> Result<consumer::PullConsumer> {
    let config = pull_config(name, ack_wait, max_ack_pending, filter_subject);
    error::patiently(&format!("consumer {name}"), || {
        open_consumer(js, stream_name, &config)
    })
    .await
}

async fn open_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    config: &consumer::pull::Config,
) -> Result<consumer::PullConsumer> {
    let name = config.durable_name.as_deref().unwrap_or_default();
    let stream = js
        .get_stream(stream_name)
        .await
        .doing(|| format!("looking up stream {stream_name}"))?;
    match stream.consumer_info(name).await {
        Ok(_) => {
            js.update_consumer_on_stream(config.clone(), stream_name)
                .await
                .doing(|| format!("updating consumer {name}"))?;
        }
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
            stream
                .create_consumer(config.clone())
                .await
                .doing(|| format!("creating consumer {name}"))?;
        }
        Err(e) => return Err(e).doing(|| format!("looking up consumer {name}")),
    }
    stream
        .get_consumer(name)
        .await
        .doing(|| format!("opening consumer {name}"))
}

/// The settings every durable pull consumer of scriptd has.
pub(crate) fn pull_config(
    name: &str,
    ack_wait: Duration,
    max_ack_pending: usize,
    filter_subject: Option<String>,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        // Retries are decided by the retry policy; this is only a backstop against a
        // message that can never be handled.
        max_deliver: 1000,
        max_ack_pending: max_ack_pending as i64,
        filter_subject: filter_subject.unwrap_or_default(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn a_lanes_messages_take_the_places_of_their_recent_runs() {
        let runs = RunsPerMessage::default();
        assert_eq!(
            runs.places(),
            None,
            "nothing known before the first message"
        );
        runs.observe(1);
        assert_eq!(runs.places(), Some(1));
        runs.observe(3);
        assert_eq!(runs.places(), Some(3), "rises at once");
        runs.observe(1);
        assert_eq!(
            runs.places(),
            Some(3),
            "falls by an eighth of the difference"
        );
        for _ in 0..40 {
            runs.observe(0);
        }
        assert_eq!(runs.places(), Some(1), "no run still takes a place");
    }

    #[tokio::test]
    async fn work_that_is_ready_is_not_held_by_the_progress_timer() {
        let done = every(Duration::from_secs(10), async { 7 }, || async {}).now_or_never();
        assert_eq!(done, Some(7));
    }

    #[tokio::test]
    async fn long_work_is_ticked_until_it_ends() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let work = async move {
            // Ends once it has seen two ticks.
            rx.recv().await;
            rx.recv().await;
            "done"
        };
        let tick = || {
            let _ = tx.send(());
            async {}
        };
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            every(Duration::from_millis(5), work, tick),
        )
        .await;
        assert_eq!(out, Ok("done"));
    }
}
