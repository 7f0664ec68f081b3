//! Tenant lanes: the events stream and the jobs stream each have one durable consumer per
//! tenant, each pulled with its own window, so one tenant's backlog (of events or of jobs)
//! never stands in front of another tenant's. A lane opens for every tenant with scripts,
//! for events also for every tenant that had one, for jobs also for every tenant with jobs
//! still queued.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use futures::StreamExt;
use tokio::sync::watch;
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

/// How often the server is looked at for lanes the index does not name: tenants with jobs
/// still queued, tenants with an event lane.
const SERVER_SCAN: Duration = Duration::from_secs(30);

/// Which stream a set of lanes pulls, and so which tenants get one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The events stream: a lane for every tenant with scripts or with an event lane on
    /// the server, starting where the catch-all consumer stands when it is first made.
    Events,
    /// The jobs stream: a lane for every tenant with scripts or with jobs still queued.
    Jobs,
}

/// The tenants whose lanes are open on this replica.
#[derive(Clone)]
pub struct Opened(Arc<watch::Sender<HashSet<String>>>);

impl Default for Opened {
    fn default() -> Self {
        Opened(Arc::new(watch::Sender::new(HashSet::new())))
    }
}

impl Opened {
    pub fn contains(&self, tenant: &str) -> bool {
        self.0.borrow().contains(tenant)
    }

    /// Returns once `tenant`'s lane is open here.
    pub async fn wait_for(&self, tenant: &str) {
        let mut changes = self.0.subscribe();
        // The sender lives in `self`, so this ends only when the lane is open.
        let _ = changes.wait_for(|open| open.contains(tenant)).await;
    }

    fn insert(&self, tenant: String) {
        self.0.send_modify(|open| {
            open.insert(tenant);
        });
    }
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
    /// Filled in as lanes open.
    pub opened: Opened,
}

impl Lanes {
    /// Opens a lane for every tenant of the index, and for the tenants `Kind` says, as they
    /// appear, and pulls each with `handler` until `stop`; then waits for every lane to
    /// finish.
    pub async fn run<F>(self, stop: CancellationToken, handler: F)
    where
        F: Fn(jetstream::Message) -> futures::future::BoxFuture<'static, ()>
            + Clone
            + Send
            + Sync
            + 'static,
    {
        let lanes = tokio_util::task::TaskTracker::new();
        let mut changes = self.index.subscribe();
        let mut kept: HashSet<String> = HashSet::new();
        let mut scan = tokio::time::interval(SERVER_SCAN);
        let window = self.tenants.pull_window;
        loop {
            let wanted: Vec<String> = self
                .index
                .snapshot()
                .tenants()
                .map(str::to_owned)
                .chain(kept.iter().cloned())
                .filter(|t| !self.opened.contains(t))
                .collect();
            let mut failed = false;
            for tenant in wanted {
                let opening = tokio::select! {
                    _ = stop.cancelled() => break,
                    opening = self.open(&tenant) => opening,
                };
                match opening {
                    Ok(consumer) => {
                        tracing::debug!(tenant = %tenant, lanes = ?self.kind, "Lane opened.");
                        lanes.spawn(super::pull(consumer, window, stop.clone(), handler.clone()));
                        self.opened.insert(tenant);
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

    async fn open(&self, tenant: &str) -> Result<jetstream::consumer::PullConsumer> {
        match self.kind {
            Kind::Jobs => {
                super::durable_consumer(
                    &self.js,
                    &self.config.jobs_stream(),
                    &lane_consumer(tenant),
                    self.config.ack_wait,
                    self.tenants.max_ack_pending,
                    Some(format!("{}.{tenant}.>", self.config.jobs_prefix)),
                )
                .await
            }
            Kind::Events => self.open_event_lane(tenant).await,
        }
    }

    /// The event lane of `tenant`, made or updated. A new one starts after the catch-all
    /// consumer's acknowledgement floor: the tenant's events up to there were settled as
    /// no one's (it had no scripts yet) or, before event lanes, fanned out by the catch-all
    /// itself; the catch-all leaves those after it to the lane.
    async fn open_event_lane(&self, tenant: &str) -> Result<jetstream::consumer::PullConsumer> {
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
        if let Ok(existing) = stream.get_consumer::<pull::Config>(&name).await {
            // Where a lane starts was fixed when it was made.
            wanted.deliver_policy = existing.cached_info().config.deliver_policy;
            self.js
                .update_consumer_on_stream(wanted, &stream_name)
                .await
                .doing(|| format!("updating consumer {name}"))?;
        } else {
            let mut catch_all = stream
                .get_consumer::<pull::Config>(super::FANOUT_CONSUMER)
                .await
                .doing(|| format!("opening consumer {}", super::FANOUT_CONSUMER))?;
            let floor = catch_all
                .info()
                .await
                .doing(|| format!("reading consumer {}", super::FANOUT_CONSUMER))?
                .ack_floor
                .stream_sequence;
            wanted.deliver_policy = DeliverPolicy::ByStartSequence {
                start_sequence: floor + 1,
            };
            if let Err(e) = stream.create_consumer(wanted).await {
                // Another replica may have made it meanwhile, from its own floor.
                tracing::debug!(consumer = %name, error = %e, "Could not make the event lane; opening it as it is.");
            }
        }
        stream
            .get_consumer(&name)
            .await
            .doing(|| format!("opening consumer {name}"))
    }
}
