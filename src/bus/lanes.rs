//! Tenant lanes: the jobs stream is a work queue with one durable consumer per tenant, each
//! pulled with its own window, so one tenant's backlog never stands in front of another
//! tenant's jobs. A lane opens for every tenant with scripts or with jobs still queued.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::NatsConfig;
use crate::index::ScriptIndex;

/// The `[tenants]` settings: how much of a replica one tenant may take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// Runs of one tenant in the engine at once, per replica; 0 means as many as the engine
    /// takes at once (two per worker).
    pub max_concurrent_runs: usize,
    /// Per-tenant values of `max_concurrent_runs`, by tenant name.
    pub concurrent_runs: BTreeMap<String, usize>,
    /// Jobs of one tenant pulled ahead and not yet acknowledged, per replica.
    pub pull_window: usize,
    /// Jobs of one tenant handed out and not yet acknowledged across all replicas, retries
    /// waiting for their delay included; JetStream holds the rest back.
    pub max_ack_pending: usize,
}

impl Default for TenantsConfig {
    fn default() -> Self {
        TenantsConfig {
            max_concurrent_runs: 0,
            concurrent_runs: BTreeMap::new(),
            pull_window: 64,
            max_ack_pending: 10_000,
        }
    }
}

impl TenantsConfig {
    /// The cap of `tenant`'s concurrent runs on a replica whose engine takes `slots` at once.
    pub fn cap(&self, tenant: &str, slots: usize) -> usize {
        let cap = self
            .concurrent_runs
            .get(tenant)
            .copied()
            .unwrap_or(self.max_concurrent_runs);
        if cap == 0 {
            slots.max(1)
        } else {
            cap
        }
    }
}

/// Per-tenant run permits of one replica, created on first use.
pub struct TenantSlots {
    config: TenantsConfig,
    engine_slots: usize,
    by_tenant: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl TenantSlots {
    pub fn new(config: TenantsConfig, engine_slots: usize) -> TenantSlots {
        TenantSlots {
            config,
            engine_slots,
            by_tenant: Mutex::default(),
        }
    }

    /// Waits until `tenant` may start one more run here.
    pub async fn acquire(&self, tenant: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = self
            .by_tenant
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.cap(tenant, self.engine_slots))))
            .clone();
        semaphore.acquire_owned().await.ok()
    }
}

/// The durable consumer of `tenant`'s lane.
pub fn lane_consumer(tenant: &str) -> String {
    format!("{}-{tenant}", super::RUNNER_CONSUMER)
}

/// Tenants with jobs in the stream (a work queue holds only jobs not yet acknowledged).
async fn queued_tenants(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> anyhow::Result<HashSet<String>> {
    let stream = js.get_stream(config.jobs_stream()).await?;
    let mut subjects = stream
        .info_with_subjects(format!("{}.>", config.jobs_prefix))
        .await?;
    let mut tenants = HashSet::new();
    let skip = config.jobs_prefix.split('.').count();
    while let Some(entry) = subjects.next().await {
        let (subject, _) = entry?;
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

/// How often the stream is looked at for jobs of tenants that have no scripts any more.
const QUEUED_SCAN: Duration = Duration::from_secs(30);

/// Opens a lane for every tenant of the index, and for tenants with queued jobs, as they
/// appear, and pulls each with `handler` until `stop`; then waits for every lane to finish.
pub async fn run<F>(
    js: jetstream::Context,
    config: NatsConfig,
    tenants: TenantsConfig,
    index: Arc<ScriptIndex>,
    stop: CancellationToken,
    handler: F,
) where
    F: Fn(jetstream::Message) -> futures::future::BoxFuture<'static, ()>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let lanes = tokio_util::task::TaskTracker::new();
    let mut open: HashSet<String> = HashSet::new();
    let mut changes = index.subscribe();
    let mut queued: HashSet<String> = HashSet::new();
    let mut scan = tokio::time::interval(QUEUED_SCAN);
    loop {
        let wanted: Vec<String> = index
            .snapshot()
            .tenants()
            .map(str::to_owned)
            .chain(queued.iter().cloned())
            .filter(|t| !open.contains(t))
            .collect();
        let mut failed = false;
        for tenant in wanted {
            match open_lane(&js, &config, &tenants, &tenant).await {
                Ok(consumer) => {
                    tracing::debug!(tenant = %tenant, "Lane opened.");
                    lanes.spawn(super::pull(
                        consumer,
                        tenants.pull_window.max(1),
                        stop.clone(),
                        handler.clone(),
                    ));
                    open.insert(tenant);
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(tenant = %tenant, error = %format!("{e:#}"), "Cannot open the tenant's lane; trying again.");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(Duration::from_secs(1)), if failed => {}
            _ = scan.tick() => match queued_tenants(&js, &config).await {
                Ok(found) => queued = found,
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "Cannot list the tenants with queued jobs."),
            },
        }
    }
    lanes.close();
    lanes.wait().await;
}

async fn open_lane(
    js: &jetstream::Context,
    config: &NatsConfig,
    tenants: &TenantsConfig,
    tenant: &str,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    super::durable_consumer(
        js,
        &config.jobs_stream(),
        &lane_consumer(tenant),
        config.ack_wait,
        tenants.max_ack_pending,
        Some(format!("{}.{tenant}.>", config.jobs_prefix)),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fall_back_to_the_engine_size() {
        let mut config = TenantsConfig::default();
        assert_eq!(config.cap("acme", 4), 4);
        config.max_concurrent_runs = 2;
        config.concurrent_runs.insert("big".into(), 16);
        assert_eq!(config.cap("acme", 4), 2);
        assert_eq!(config.cap("big", 4), 16);
    }
}
