//! Tenant lanes: the events stream and the jobs stream each have one durable consumer per
//! tenant, each pulled with its own window, so one tenant's backlog (of events or of jobs)
//! never stands in front of another tenant's. A lane opens for every tenant with scripts,
//! for events also for every tenant that had one, for jobs also for every tenant with jobs
//! still queued.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::error::{Doing, Result};
use super::NatsConfig;
pub use crate::pipeline::tenants::TenantsConfig;
use crate::scripts::index::ScriptIndex;

/// The durable consumer of `tenant`'s job lane.
pub fn lane_consumer(tenant: &str) -> String {
    format!("{}-{tenant}", super::RUNNER_CONSUMER)
}

/// The durable consumer of `tenant`'s event lane.
pub fn event_lane_consumer(tenant: &str) -> String {
    format!("{}-{tenant}", super::FANOUT_CONSUMER)
}

/// Tenants with jobs in the stream (a work queue holds only jobs not yet acknowledged).
async fn queued_tenants(js: &jetstream::Context, config: &NatsConfig) -> Result<HashSet<String>> {
    let name = config.jobs_stream();
    let doing = || format!("listing the subjects of stream {name}");
    let stream = js.get_stream(&name).await.doing(doing)?;
    let mut subjects = stream
        .info_with_subjects(format!("{}.>", config.jobs_prefix))
        .await
        .doing(doing)?;
    let mut tenants = HashSet::new();
    let skip = config.jobs_prefix.split('.').count();
    while let Some(entry) = subjects.next().await {
        let (subject, _) = entry.doing(doing)?;
        // Anyone may publish under the prefix: a token that is no tenant name gets no lane.
        match subject.split('.').nth(skip) {
            Some(tenant) if crate::subject::validate_name("tenant", tenant).is_ok() => {
                tenants.insert(tenant.to_owned());
            }
            _ => tracing::debug!(%subject, "A job subject without a valid tenant; no lane."),
        }
    }
    Ok(tenants)
}

/// Tenants with an event lane on the server. A lane stays when its tenant's scripts are
/// deleted and is pulled still (its events counted as no one's), so that it never holds
/// events of that time to run should the tenant have scripts again.
async fn tenants_with_event_lanes(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> Result<HashSet<String>> {
    let name = config.events_stream();
    let doing = || format!("listing the consumers of stream {name}");
    let stream = js.get_stream(&name).await.doing(doing)?;
    let mut names = stream.consumer_names();
    let prefix = format!("{}-", super::FANOUT_CONSUMER);
    let mut tenants = HashSet::new();
    while let Some(name) = names.next().await {
        if let Some(tenant) = name.doing(doing)?.strip_prefix(&prefix) {
            tenants.insert(tenant.to_owned());
        }
    }
    Ok(tenants)
}

/// An earlier scriptd's fan-out consumer (`scriptd-fanout`), if it is on the events stream.
async fn earlier_fan_out(
    stream: &jetstream::stream::Stream,
) -> Result<Option<jetstream::consumer::Info>> {
    match stream.consumer_info(super::FANOUT_CONSUMER).await {
        Ok(info) => Ok(Some(info)),
        Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::NotFound) => Ok(None),
        Err(e) => Err(e).doing(|| format!("reading consumer {}", super::FANOUT_CONSUMER)),
    }
}

/// How often the server is looked at for lanes the index does not name: tenants with jobs
/// still queued, tenants with an event lane.
const SERVER_SCAN: Duration = Duration::from_secs(30);

/// The oldest nats-server whose delivery count says the truth: before 2.10 a message
/// redelivered after its ack wait could reach two consumers' clients as a first delivery
/// (nats-server#4460).
const TRUE_DELIVERY_COUNTS: (u64, u64) = (2, 10);

/// Whether nats-server `version` (`2.10.4`, `v2.9.10`) counts deliveries truly.
pub fn counts_deliveries_truly(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= TRUE_DELIVERY_COUNTS,
        _ => false,
    }
}

/// The event lane's metadata entry that says the stream's last sequence when the lane was
/// made: every event a consumer of its name handed out before is at or below it.
const FRESH_AFTER: &str = "scriptd.fresh_after_sequence";

/// For a lane made without `FRESH_AFTER` (by an earlier version), how much later than its
/// making an event must have been stored to count as one no earlier consumer of the lane's
/// name handed out: the lane is dated by the server that made it, the event by the one
/// that stored it (nodes of a cluster, two clocks).
const CLOCKS_MARGIN: Duration = Duration::from_secs(2);

/// Where in its stream a lane's fresh events begin: those no consumer but this lane's
/// handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreshAfter {
    /// Events past this stream sequence (`FRESH_AFTER`).
    Sequence(u64),
    /// Events stored after this instant (the lane's making plus `CLOCKS_MARGIN`).
    Time(time::OffsetDateTime),
}

/// What a lane tells its handler with each message.
#[derive(Clone, Debug, Default)]
pub struct Lane {
    /// Where the messages begin whose first delivery here is their first anywhere: no
    /// consumer of this lane's name handed them out before it was made, and no earlier
    /// scriptd's fan-out consumer is on the stream (else this is `None`). `None`: any
    /// delivery may repeat an earlier one.
    pub fresh_after: Option<FreshAfter>,
    /// Runs per message of the lane lately, told by its handler (a job lane's is one from
    /// the start): the lane's window counts runs, so a message takes this many places
    /// (`bus::pull`).
    pub runs: Arc<super::RunsPerMessage>,
}

impl Lane {
    /// Whether a delivery with these JetStream facts is its message's first anywhere.
    pub fn first_delivery(
        &self,
        delivered: i64,
        sequence: u64,
        published: time::OffsetDateTime,
    ) -> bool {
        delivered == 1
            && match self.fresh_after {
                Some(FreshAfter::Sequence(after)) => sequence > after,
                Some(FreshAfter::Time(after)) => published > after,
                None => false,
            }
    }
}

/// Which stream a set of lanes pulls, and so which tenants get one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The events stream: a lane for every tenant with scripts or with an event lane on
    /// the server, starting at the tenant's first script when it is first made.
    Events,
    /// The jobs stream: a lane for every tenant with scripts or with jobs still queued.
    Jobs,
}

/// One replica's lanes over one stream.
pub struct Lanes {
    /// Where the lanes' durable consumers are made and looked for.
    pub js: jetstream::Context,
    /// The `[nats]` settings (streams, subject prefixes, ack wait).
    pub config: NatsConfig,
    /// The `[tenants]` settings: each lane's pull window and its limit of unacknowledged messages.
    pub tenants: TenantsConfig,
    /// The scripts at their current versions: every tenant with scripts gets a lane.
    pub index: Arc<ScriptIndex>,
    /// Which stream the lanes pull.
    pub kind: Kind,
    /// Tell event lanes' handlers which deliveries are first ones (`Lane::fresh_after`),
    /// if the server counts deliveries truly (`nats.claim_first_deliveries` off).
    pub first_deliveries: bool,
}

impl Lanes {
    /// Opens a lane for every tenant of the index, and for the tenants `Kind` says, as they
    /// appear, and pulls each with `handler` until `stop`; then waits for every lane to
    /// finish.
    pub async fn run<F>(self, stop: CancellationToken, handler: F)
    where
        F: Fn(jetstream::Message, Lane) -> futures::future::BoxFuture<'static, ()>
            + Clone
            + Send
            + Sync
            + 'static,
    {
        let lanes = tokio_util::task::TaskTracker::new();
        let mut changes = self.index.subscribe();
        let mut kept: HashSet<String> = HashSet::new();
        let mut opened: HashSet<String> = HashSet::new();
        let mut scan = tokio::time::interval(SERVER_SCAN);
        let window = self.tenants.pull_window;
        loop {
            let wanted: Vec<String> = self
                .index
                .snapshot()
                .tenants()
                .map(str::to_owned)
                .chain(kept.iter().cloned())
                .filter(|t| !opened.contains(t))
                .collect();
            let mut failed = false;
            for tenant in wanted {
                let opening = tokio::select! {
                    _ = stop.cancelled() => break,
                    opening = self.open(&tenant) => opening,
                };
                match opening {
                    Ok((consumer, lane)) => {
                        tracing::debug!(tenant = %tenant, lanes = ?self.kind, ?lane, "Lane opened.");
                        let handler = handler.clone();
                        let runs = lane.runs.clone();
                        let handle = move |message| handler(message, lane.clone());
                        lanes.spawn(super::pull(consumer, window, runs, stop.clone(), handle));
                        opened.insert(tenant);
                    }
                    Err(e) => {
                        failed = true;
                        tracing::warn!(tenant = %tenant, lanes = ?self.kind, error = %format!("{e:#}"), "Cannot open the tenant's lane; trying again.");
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(Duration::from_secs(1)), if failed => {}
                _ = scan.tick() => {
                    let found = match self.kind {
                        Kind::Jobs => queued_tenants(&self.js, &self.config).await,
                        Kind::Events => tenants_with_event_lanes(&self.js, &self.config).await,
                    };
                    match found {
                        Ok(found) => kept = found,
                        Err(e) => tracing::warn!(lanes = ?self.kind, error = %format!("{e:#}"), "Cannot list the tenants with lanes to keep."),
                    }
                }
            }
        }
        lanes.close();
        lanes.wait().await;
    }

    async fn open(&self, tenant: &str) -> Result<(jetstream::consumer::PullConsumer, Lane)> {
        match self.kind {
            Kind::Jobs => {
                let consumer = super::durable_consumer(
                    &self.js,
                    &self.config.jobs_stream(),
                    &lane_consumer(tenant),
                    self.config.ack_wait,
                    self.tenants.max_ack_pending,
                    Some(format!("{}.{tenant}.>", self.config.jobs_prefix)),
                )
                .await?;
                // A job is one run: it takes one place of the lane's window from the start.
                let lane = Lane::default();
                lane.runs.observe(1);
                Ok((consumer, lane))
            }
            Kind::Events => self.open_event_lane(tenant).await,
        }
    }

    /// The event lane of `tenant`, made or updated, and what its handler is told. A new one
    /// starts where `lane_start` says.
    async fn open_event_lane(
        &self,
        tenant: &str,
    ) -> Result<(jetstream::consumer::PullConsumer, Lane)> {
        let stream_name = self.config.events_stream();
        let stream = self
            .js
            .get_stream(&stream_name)
            .await
            .doing(|| format!("stream {stream_name} is missing"))?;
        let name = event_lane_consumer(tenant);
        let mut wanted = super::pull_config(
            &name,
            self.config.ack_wait,
            self.tenants.max_ack_pending,
            Some(format!("{}.{tenant}.>", self.config.events_prefix)),
        );
        let first_deliveries = self.first_deliveries
            && counts_deliveries_truly(&self.js.client().server_info().version);
        if let Ok(existing) = stream.get_consumer::<pull::Config>(&name).await {
            // Where a lane starts, and where its fresh events begin, were fixed when it was
            // made.
            wanted.deliver_policy = existing.cached_info().config.deliver_policy;
            wanted.metadata = existing.cached_info().config.metadata.clone();
            self.js
                .update_consumer_on_stream(wanted, &stream_name)
                .await
                .doing(|| format!("updating consumer {name}"))?;
        } else {
            wanted.deliver_policy = self.lane_start(&stream, tenant).await?;
            if first_deliveries {
                // Read once no consumer of the name is there: whatever one handed out before
                // is at or below the stream's last sequence now.
                let last = self
                    .js
                    .get_stream(&stream_name)
                    .await
                    .doing(|| format!("reading stream {stream_name}"))?
                    .cached_info()
                    .state
                    .last_sequence;
                wanted.metadata.insert(FRESH_AFTER.into(), last.to_string());
            }
            if let Err(e) = stream.create_consumer(wanted).await {
                // Another replica may have made it meanwhile.
                tracing::debug!(consumer = %name, error = %e, "Could not make the event lane; opening it as it is.");
            }
        }
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&name)
            .await
            .doing(|| format!("opening consumer {name}"))?;
        let lane = if first_deliveries {
            self.lane_facts(&stream, &consumer).await?
        } else {
            Lane::default()
        };
        Ok((consumer, lane))
    }

    /// What the handler of an event lane is told, on a server that counts deliveries
    /// truly: where its fresh events begin, unless an earlier scriptd's fan-out consumer is
    /// there (its replicas may run the same events, claiming them).
    async fn lane_facts(
        &self,
        stream: &jetstream::stream::Stream,
        consumer: &jetstream::consumer::PullConsumer,
    ) -> Result<Lane> {
        if earlier_fan_out(stream).await?.is_some() {
            return Ok(Lane::default());
        }
        let info = consumer.cached_info();
        let recorded = info.config.metadata.get(FRESH_AFTER);
        let fresh_after = match recorded.and_then(|s| s.parse().ok()) {
            Some(sequence) => FreshAfter::Sequence(sequence),
            None => FreshAfter::Time(info.created + CLOCKS_MARGIN),
        };
        Ok(Lane {
            fresh_after: Some(fresh_after),
            ..Lane::default()
        })
    }

    /// Where a new event lane of `tenant` starts: at the first event published once the
    /// tenant's oldest script was deployed, less `nats.lane_start_margin` for the servers'
    /// clocks (PostgreSQL dates the script, NATS the events), so that no event published
    /// after the deploy is missed, whenever a daemon gets to make the lane. An earlier
    /// scriptd's fan-out consumer (`scriptd-fanout`, the one consumer of the events before
    /// event lanes, then their catch-all) may have settled events past that point: then
    /// the lane starts right after them, as that version's lanes did.
    async fn lane_start(
        &self,
        stream: &jetstream::stream::Stream,
        tenant: &str,
    ) -> Result<DeliverPolicy> {
        let Some(first) = self.index.snapshot().first_deployed(tenant) else {
            // Kept for a lane on the server that is gone now: no script, nothing to run.
            return Ok(DeliverPolicy::New);
        };
        let since = chrono::Duration::from_std(self.config.lane_start_margin)
            .ok()
            .and_then(|margin| first.checked_sub_signed(margin))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
        let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(since.timestamp_micros()) * 1_000,
        )
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let by_time = DeliverPolicy::ByStartTime { start_time };
        let Some(earlier) = earlier_fan_out(stream).await? else {
            return Ok(by_time);
        };
        let floor = earlier.ack_floor.stream_sequence;
        if floor == 0 {
            return Ok(by_time);
        }
        // The floor's own message dates it; one aged out of the stream is older than any
        // event left.
        let settled = match stream.get_raw_message(floor).await {
            Ok(settled) => settled.time,
            Err(e) if matches!(e.kind(), RawMessageErrorKind::NoMessageFound) => {
                return Ok(by_time)
            }
            Err(e) => return Err(e).doing(|| format!("reading message {floor} of the events")),
        };
        Ok(if settled >= start_time {
            DeliverPolicy::ByStartSequence {
                start_sequence: floor + 1,
            }
        } else {
            by_time
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_counts_are_true_from_nats_server_2_10() {
        for version in ["2.10.0", "v2.10.4", "2.15.1", "3.0.0-beta.1", "2.11.0-RC.2"] {
            assert!(counts_deliveries_truly(version), "{version}");
        }
        for version in ["2.9.10", "v2.9.25", "1.4.1", "", "two.ten"] {
            assert!(!counts_deliveries_truly(version), "{version}");
        }
    }

    #[test]
    fn a_first_delivery_is_one_of_a_message_past_where_the_lane_was_made() {
        let made = time::OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let later = made + Duration::from_millis(1);
        let by_sequence = Lane {
            fresh_after: Some(FreshAfter::Sequence(41)),
            ..Lane::default()
        };
        assert!(by_sequence.first_delivery(1, 42, made));
        assert!(!by_sequence.first_delivery(2, 42, made), "a redelivery");
        assert!(
            !by_sequence.first_delivery(1, 41, later),
            "in the stream before"
        );
        let by_time = Lane {
            fresh_after: Some(FreshAfter::Time(made)),
            ..Lane::default()
        };
        assert!(by_time.first_delivery(1, 1, later));
        assert!(!by_time.first_delivery(2, 1, later), "a redelivery");
        assert!(
            !by_time.first_delivery(1, 99, made),
            "stored before the lane was made"
        );
        assert!(
            !Lane::default().first_delivery(1, 99, later),
            "nothing known"
        );
    }
}
