//! The cron ticker: every daemon arms each enabled schedule of the script index and, at
//! each occurrence, publishes a job through the same path as events. Job ids come from
//! (script id, occurrence), so the same occurrence published by several daemons is one job.
//! After downtime, missed occurrences are caught up by each script's policy.
//!
//! The clock is a plain timer on the next occurrence computed by `schedule` in the script's
//! time zone, not tokio-cron-scheduler: that crate fixes a zone's UTC offset when a job is
//! created, so schedules drift by an hour across daylight-saving changes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::NatsConfig;
use crate::domain::CatchUp;
use crate::domain::Trigger;
use crate::pipeline::job::Job;
use crate::schedule::Schedule;
use crate::scripts::index::{IndexedScript, ScriptIndex, Snapshot};
use crate::store::Store;

/// Most occurrences a `catch-up = all` schedule replays after downtime.
pub const MAX_CATCH_UP: usize = 100;
/// How often the ticker looks for changed schedules between occurrences.
const INDEX_CHECK: Duration = Duration::from_millis(250);

pub struct Ticker {
    /// Where scheduled jobs are published.
    pub js: jetstream::Context,
    /// The `[nats]` settings (the jobs subject prefix).
    pub config: NatsConfig,
    /// The scripts at their current versions, whose enabled schedules are armed.
    pub index: Arc<ScriptIndex>,
    /// Where each schedule's last occurrence is looked up, to catch up what was missed at start.
    pub store: Store,
    /// Counts the missed occurrences a `catch-up = none` schedule skips.
    pub metrics: Arc<crate::observe::metrics::Metrics>,
}

struct Armed {
    script: Arc<IndexedScript>,
    schedule: Schedule,
    next: DateTime<Utc>,
}

impl Ticker {
    pub async fn run(self, stop: CancellationToken) {
        let mut armed: HashMap<i64, Armed> = HashMap::new();
        let mut seen: Option<Arc<Snapshot>> = None;
        loop {
            let snapshot = self.index.snapshot();
            if seen.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &snapshot)) {
                let starting = seen.is_none();
                self.reconcile(&snapshot, &mut armed, starting).await;
                seen = Some(snapshot);
            }
            let now = Utc::now();
            for entry in armed.values_mut().filter(|a| a.next <= now) {
                let scheduled = entry.next;
                self.publish(&entry.script, scheduled, 0).await;
                // A daemon paused past several occurrences publishes only the latest.
                entry.next = entry
                    .schedule
                    .next_after(scheduled.max(now))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
            }
            let until_next = armed
                .values()
                .map(|a| (a.next - Utc::now()).to_std().unwrap_or_default())
                .min()
                .unwrap_or(INDEX_CHECK)
                .min(INDEX_CHECK);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(until_next) => {}
            }
        }
    }

    /// Arms new and changed schedules and drops removed or disabled ones. At start, each
    /// schedule first catches up what it missed while no daemon ran.
    async fn reconcile(
        &self,
        snapshot: &Snapshot,
        armed: &mut HashMap<i64, Armed>,
        starting: bool,
    ) {
        let now = Utc::now();
        let mut present = HashSet::new();
        for script in snapshot.scheduled() {
            present.insert(script.id);
            let unchanged = armed.get(&script.id).is_some_and(|a| {
                a.script.cron == script.cron && a.script.timezone == script.timezone
            });
            if unchanged {
                if let Some(a) = armed.get_mut(&script.id) {
                    a.script = script.clone();
                }
                continue;
            }
            let expr = script.cron.as_deref().unwrap_or_default();
            let schedule = match Schedule::parse(expr, &script.timezone) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(tenant = %script.tenant, script = %script.name, error = %e, "Schedule ignored.");
                    continue;
                }
            };
            if starting {
                self.catch_up(script, &schedule, now).await;
            }
            let next = schedule.next_after(now).unwrap_or(DateTime::<Utc>::MAX_UTC);
            tracing::debug!(tenant = %script.tenant, script = %script.name, cron = expr, next = %next, "Schedule armed.");
            armed.insert(
                script.id,
                Armed {
                    script: script.clone(),
                    schedule,
                    next,
                },
            );
        }
        armed.retain(|id, _| present.contains(id));
    }

    async fn catch_up(&self, script: &Arc<IndexedScript>, schedule: &Schedule, now: DateTime<Utc>) {
        let last = match self
            .store
            .last_scheduled(&script.tenant, &script.name)
            .await
        {
            Ok(Some(last)) => last,
            // Never ran: nothing was missed.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(script = %script.name, error = %format!("{e:#}"), "Cannot tell what the schedule missed; not catching up.");
                return;
            }
        };
        let missed = schedule.between(last, now, MAX_CATCH_UP);
        if missed.is_empty() {
            return;
        }
        tracing::info!(tenant = %script.tenant, script = %script.name, missed = missed.len(), policy = script.catch_up.as_str(), "Catching up missed occurrences.");
        match script.catch_up {
            CatchUp::None => {
                self.metrics
                    .schedule_skipped("missed", missed.len().saturating_sub(1) as u64);
                if let Some(latest) = missed.last() {
                    self.publish(script, *latest, missed.len()).await;
                }
            }
            CatchUp::All => {
                for occurrence in &missed {
                    self.publish(script, *occurrence, missed.len()).await;
                }
            }
        }
    }

    /// Publishes the job of one occurrence; failures are logged (the next daemon start
    /// catches the occurrence up).
    async fn publish(&self, script: &IndexedScript, scheduled: DateTime<Utc>, missed: usize) {
        if let Err(e) = self.try_publish(script, scheduled, missed).await {
            tracing::warn!(tenant = %script.tenant, script = %script.name, scheduled = %scheduled, error = %format!("{e:#}"), "Could not publish a scheduled job.");
        }
    }

    async fn try_publish(
        &self,
        script: &IndexedScript,
        scheduled: DateTime<Utc>,
        missed: usize,
    ) -> anyhow::Result<()> {
        let id = occurrence_job_id(script.id, scheduled);
        let event = serde_json::json!({
            "id": id,
            "type": "schedule",
            "tenant": script.tenant,
            "cron": script.cron,
            "timezone": script.timezone,
            "scheduledAt": scheduled.to_rfc3339_opts(SecondsFormat::Millis, true),
            "firedAt": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            "missed": missed,
        });
        let job = Job {
            id: id.clone(),
            tenant: script.tenant.clone(),
            script: script.name.clone(),
            trigger: Trigger::Schedule,
            subject: None,
            event_id: Some(id.clone()),
            event: RawValue::from_string(event.to_string())?,
            version: None,
            scheduled_at: Some(scheduled),
            input_ref: None,
            catch_up: missed > 0,
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        self.js
            .publish_with_headers(
                self.config.job_subject(&job.tenant, &job.script),
                headers,
                Bytes::from(serde_json::to_vec(&job)?),
            )
            .await?
            .await?;
        Ok(())
    }
}

/// The job id of one occurrence of a script's schedule: the same on every daemon.
pub fn occurrence_job_id(script_id: i64, scheduled: DateTime<Utc>) -> String {
    format!("cron-{script_id}-{}", scheduled.timestamp_millis())
}
