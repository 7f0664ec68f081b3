//! The events' catch-all consumer: every event passes it. It settles, and counts, the events
//! no lane takes (of a tenant without scripts, or with a subject that names no tenant and
//! type) and leaves every other event to its tenant's event lane.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use tokio_util::sync::CancellationToken;

use super::fanout::FanoutStats;
use super::lanes::Opened;
use crate::scripts::index::ScriptIndex;
use crate::subject;

pub struct CatchAll {
    /// The prefix events arrive under (`nats.events_prefix`), before their tenant and type.
    pub events_prefix: String,
    /// How long JetStream waits for an acknowledgement (`nats.ack_wait`): an event waiting for its
    /// tenant's lane to open is kept alive within it.
    pub ack_wait: Duration,
    /// The scripts at their current versions: which tenants have scripts.
    pub index: Arc<ScriptIndex>,
    /// The tenants whose event lanes are open here.
    pub lanes: Opened,
    /// The fan-out's counters, which count the events settled here without a run.
    pub stats: Arc<FanoutStats>,
    /// Cancelled at shutdown: an event still waiting for its tenant's lane is then handed back.
    pub stop: CancellationToken,
}

impl CatchAll {
    /// Acknowledges `msg`: counted if no lane takes it, left to its lane otherwise. An
    /// event of a tenant whose lane is still being opened waits for it, so that the lane
    /// (which starts after what this consumer has acknowledged) cannot miss it.
    pub async fn handle(&self, msg: jetstream::Message) {
        let parsed = subject::parse_event_subject(&self.events_prefix, &msg.subject);
        match &parsed {
            Ok(event) if self.lanes.contains(event.tenant) => {}
            Ok(event) if self.index.snapshot().has_tenant(event.tenant) => {
                let waited = tokio::select! {
                    _ = self.stop.cancelled() => None,
                    lane = super::keeping_alive(&msg, self.ack_wait, self.lane_or_no_scripts(event.tenant)) => Some(lane),
                };
                match waited {
                    None => {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        return;
                    }
                    Some(true) => {}
                    Some(false) => self.no_scripts(&msg),
                }
            }
            Ok(_) => self.no_scripts(&msg),
            Err(e) => {
                self.settled_unrun(&self.stats.bad_subjects);
                tracing::warn!(subject = %msg.subject, reason = %e, "Event dropped: its subject names no tenant and type.");
            }
        }
        if let Err(e) = msg.ack().await {
            tracing::warn!(error = %e, "Could not acknowledge an event; it will be delivered again.");
        }
    }

    /// Waits until `tenant`'s lane is open here (`true`), or until the tenant has no
    /// scripts any more (`false`): its scripts may be deleted before its lane is made.
    async fn lane_or_no_scripts(&self, tenant: &str) -> bool {
        let mut changes = self.index.subscribe();
        let gone = async {
            while self.index.snapshot().has_tenant(tenant) {
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = self.lanes.wait_for(tenant) => true,
            _ = gone => false,
        }
    }

    fn no_scripts(&self, msg: &jetstream::Message) {
        self.settled_unrun(&self.stats.unmatched);
        tracing::debug!(subject = %msg.subject, "No script handles this event.");
    }

    /// Counts an event settled here without a run, under `why`.
    fn settled_unrun(&self, why: &AtomicU64) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        why.fetch_add(1, Ordering::Relaxed);
        self.stats.settled.fetch_add(1, Ordering::Relaxed);
    }
}
