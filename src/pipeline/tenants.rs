//! What one tenant may take of a replica: the `[tenants]` settings and the per-tenant run
//! permits.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

/// The `[tenants]` settings: how much of a replica one tenant may take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// Runs of one tenant in the engine at once, per replica; 0 means as many as the engine
    /// takes at once (`engine.runs_per_worker` per worker).
    pub max_concurrent_runs: usize,
    /// Per-tenant values of `max_concurrent_runs`, by tenant name.
    pub concurrent_runs: BTreeMap<String, usize>,
    /// Runs' worth of one tenant's events, and jobs, pulled ahead and not yet acknowledged,
    /// per replica: an event takes a place for each script its tenant's recent events
    /// matched, a job one. Each waits for its claim, run and record, so this over that time
    /// caps one tenant's rate (BENCHMARKS.md: 256 runs against 128 events gave +10 % events/s
    /// with one script per event, and no overflow into the job lane with three).
    pub pull_window: usize,
    /// Events, and jobs, of one tenant handed out and not yet acknowledged across all
    /// replicas, retries waiting for their delay included; JetStream holds the rest back.
    pub max_ack_pending: usize,
}

impl Default for TenantsConfig {
    fn default() -> Self {
        TenantsConfig {
            max_concurrent_runs: 0,
            concurrent_runs: BTreeMap::new(),
            pull_window: 256,
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
    by_tenant: Mutex<Permits>,
}

/// Each tenant's semaphore, kept while anything holds or awaits one of its permits.
#[derive(Default)]
struct Permits {
    by_tenant: HashMap<String, Arc<Semaphore>>,
    /// The size at which tenants are next looked over for ones to forget.
    prune_at: usize,
}

/// Tenants a replica remembers before it starts forgetting idle ones.
const REMEMBERED_TENANTS: usize = 1024;

impl Permits {
    /// Forgets the tenants with no run and none waiting (nothing but this map holds their
    /// semaphore, so a new one with every permit free is the same), once the map has grown
    /// to twice what the last look left: it stays in proportion to the busy tenants.
    fn prune(&mut self) {
        if self.by_tenant.len() < self.prune_at.max(REMEMBERED_TENANTS) {
            return;
        }
        self.by_tenant.retain(|_, s| Arc::strong_count(s) > 1);
        self.prune_at = 2 * self.by_tenant.len();
    }
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
        let semaphore = {
            let mut permits = self.by_tenant.lock().unwrap_or_else(|e| e.into_inner());
            match permits.by_tenant.get(tenant) {
                Some(semaphore) => semaphore.clone(),
                None => {
                    permits.prune();
                    let cap = self.config.cap(tenant, self.engine_slots);
                    let semaphore = Arc::new(Semaphore::new(cap));
                    permits
                        .by_tenant
                        .insert(tenant.to_owned(), semaphore.clone());
                    semaphore
                }
            }
        };
        semaphore.acquire_owned().await.ok()
    }

    /// Tenants remembered here now.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.by_tenant
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_tenant
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_tenants_are_forgotten_and_busy_ones_keep_their_cap() {
        use futures::FutureExt;
        let mut config = TenantsConfig::default();
        config.concurrent_runs.insert("busy".into(), 1);
        let slots = TenantSlots::new(config, 4);
        let held = slots.acquire("busy").await.unwrap();
        for i in 0..10 * REMEMBERED_TENANTS {
            drop(slots.acquire(&format!("t{i}")).await.unwrap());
        }
        assert!(
            slots.remembered() <= REMEMBERED_TENANTS + 1,
            "{} tenants remembered",
            slots.remembered()
        );
        // The busy tenant was kept: its one permit is still taken.
        assert!(slots.acquire("busy").now_or_never().is_none());
        drop(held);
        assert!(slots.acquire("busy").now_or_never().is_some());
    }

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
