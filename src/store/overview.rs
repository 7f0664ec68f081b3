//! What the console's overview and tenant picker read: the tenants there are, and a
//! tenant's runs of the last hour summed up per minute and status with duration percentiles.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Serialize;

use super::error::Result;
use super::{scoped, Store, ALL_TENANTS};

/// The span the overview covers, in minutes.
pub const OVERVIEW_MINUTES: i64 = 60;

/// One minute of runs: how many ended with each status.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Minute {
    pub minute: DateTime<Utc>,
    pub runs: std::collections::BTreeMap<String, i64>,
}

/// A tenant's runs over the last [`OVERVIEW_MINUTES`].
#[derive(Clone, Debug, Serialize)]
pub struct RunOverview {
    /// Every minute of the span, oldest first (minutes without runs included).
    pub minutes: Vec<Minute>,
    /// Runs in the span.
    pub runs: i64,
    /// Median and 99th percentile of the runs' durations in the engine (runs that ran).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Store {
    /// The tenants with scripts or tokens, by name.
    pub async fn tenants(&self) -> Result<Vec<String>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, ALL_TENANTS).await?;
        let rows = tx
            .query(
                "SELECT tenant FROM scripts
                 UNION SELECT tenant FROM api_tokens WHERE tenant <> '*'
                 ORDER BY 1",
                &[],
            )
            .await?;
        tx.commit().await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// `tenant`'s runs of the last hour, as of `now`.
    pub async fn run_overview(&self, tenant: &str, now: DateTime<Utc>) -> Result<RunOverview> {
        let end = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now) + TimeDelta::minutes(1);
        let start = end - TimeDelta::minutes(OVERVIEW_MINUTES);
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let counted = tx
            .query(
                "SELECT date_trunc('minute', started_at), status, count(*) FROM runs
                 WHERE tenant = $1 AND started_at >= $2 AND started_at < $3
                 GROUP BY 1, 2",
                &[&tenant, &start, &end],
            )
            .await?;
        let durations = tx
            .query_one(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms),
                        percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms)
                 FROM runs
                 WHERE tenant = $1 AND started_at >= $2 AND started_at < $3
                   AND status <> 'skipped'",
                &[&tenant, &start, &end],
            )
            .await?;
        tx.commit().await?;
        let mut minutes: Vec<Minute> = (0..OVERVIEW_MINUTES)
            .map(|i| Minute {
                minute: start + TimeDelta::minutes(i),
                runs: Default::default(),
            })
            .collect();
        let mut runs = 0;
        for row in &counted {
            let at: DateTime<Utc> = row.get(0);
            let n: i64 = row.get(2);
            runs += n;
            let i = (at - start).num_minutes();
            if let Some(minute) = usize::try_from(i).ok().and_then(|i| minutes.get_mut(i)) {
                minute.runs.insert(row.get(1), n);
            }
        }
        Ok(RunOverview {
            minutes,
            runs,
            p50_ms: durations.get(0),
            p99_ms: durations.get(1),
        })
    }
}
