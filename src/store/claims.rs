//! Attempt claims: the one statement that lets exactly one replica start an attempt of a
//! job, and the hand-back of a claim whose attempt did not run.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::error::Result;
use super::Store;

/// A replica asks to run the next attempt of this job.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    /// The job whose next attempt is asked for.
    pub job_id: String,
    /// The job's tenant (row-level security scopes the claim to it).
    pub tenant: String,
    /// How long the claim holds if this replica never records the attempt (it died): then
    /// another replica may take the attempt over.
    pub lease: Duration,
    /// This replica holds no attempt of the job: a claim stored under its name is one whose
    /// answer was lost on the way back (or whose hand-back failed), and it is taken back at
    /// once instead of after its lease.
    pub idle_here: bool,
}

/// A claimed attempt handed back without running.
#[derive(Clone, Debug)]
pub struct Release {
    /// The job whose claim is handed back.
    pub job_id: String,
    /// The job's tenant.
    pub tenant: String,
    /// The attempt that was claimed.
    pub attempt: u32,
}

/// A job's claim as stored (`Store::claim_of`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredClaim {
    /// `running`, `open` (the last attempt ended and another may follow) or `ended`.
    pub state: String,
    /// The attempt claimed last.
    pub attempt: i32,
    /// The replica that claimed it.
    pub replica: String,
    /// Until when a running claim holds.
    pub lease_until: DateTime<Utc>,
}

/// What a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This replica runs `attempt` (1 for the first).
    Won {
        attempt: u32,
        /// When the job's first attempt was claimed (a dead letter's first attempt time).
        first_at: DateTime<Utc>,
        /// The attempt was claimed before by a replica whose lease ran out: it may have
        /// started the attempt and died.
        taken_over: bool,
    },
    /// The job ended (ok, dead-lettered or skipped): nothing runs.
    Ended,
    /// Another replica holds an attempt of this job until `until` at the latest.
    Held { until: DateTime<Utc> },
    /// Only a first attempt was asked for, and `done` attempts already failed: the job
    /// goes on in its lane, with its backoff.
    Later { done: u32 },
}

/// Which attempts a batch of claims may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimScope {
    /// Whatever attempt is next (job lanes).
    Next,
    /// The first attempt only (runs straight from the fan-out, which never delays).
    FirstOnly,
}

/// Claims the next attempt of each job: inserted if new, else taken if the last attempt
/// is finished (`open`) or the running one's lease has ended. A job with a run that ended
/// it is never claimed: a first attempt run without a claim (`RunRecord::unclaimed`) ends
/// its job with its record alone. Returns the rows won only; no join (`OFFSET 0` keeps the
/// probe a subquery run per job, never a join that could read `runs` whole), so the plan is
/// a primary-key upsert and one probe of `runs_by_job` per job whatever the tables' sizes.
const CLAIM_SQL: &str = "
INSERT INTO attempt_claims AS c (job_id, tenant, attempt, state, replica, claimed_at,
                                 lease_until, first_claimed_at)
SELECT job_id, tenant, 1, 'running', $4, now(), now() + make_interval(secs => lease), now()
FROM unnest($1::text[], $2::text[], $3::float8[]) AS t(job_id, tenant, lease)
WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.job_id = t.job_id AND r.status <> 'retrying'
                  OFFSET 0)
ON CONFLICT (job_id) DO UPDATE SET
    attempt = CASE WHEN c.state = 'open' THEN c.attempt + 1 ELSE c.attempt END,
    taken_over = c.state = 'running',
    state = 'running', replica = EXCLUDED.replica, claimed_at = now(),
    lease_until = EXCLUDED.lease_until
WHERE (c.state = 'open' AND (NOT $5 OR c.attempt = 0))
   OR (c.state = 'running' AND c.lease_until < now() AND (NOT $5 OR c.attempt = 1))
RETURNING c.job_id, c.attempt, c.first_claimed_at, c.taken_over";

/// A claim row returned by `CLAIM_SQL` or `TAKE_BACK_SQL`: the attempt this replica runs.
fn won_claim(row: &tokio_postgres::Row) -> Claim {
    Claim::Won {
        attempt: u32::try_from(row.get::<_, i32>(1)).unwrap_or(1),
        first_at: row.get(2),
        taken_over: row.get(3),
    }
}

/// Where the jobs not won stand (the rare path: redeliveries): their claims, then the
/// jobs a run ended, claimed or not.
const STATE_SQL: &str = "
SELECT job_id, state, attempt, lease_until, replica FROM attempt_claims WHERE job_id = ANY($1)
UNION ALL
SELECT DISTINCT job_id, 'ended', 0, now(), '' FROM runs
WHERE job_id = ANY($1) AND status <> 'retrying'";

/// Takes back running claims stored under this replica's name that it knows it does not
/// hold (`ClaimRequest::idle_here`): the same attempt, a new lease. A claim another replica
/// has taken over meanwhile is left alone.
const TAKE_BACK_SQL: &str = "
UPDATE attempt_claims AS c SET claimed_at = now(),
    lease_until = now() + make_interval(secs => t.lease)
FROM unnest($1::text[], $2::float8[]) AS t(job_id, lease)
WHERE c.job_id = t.job_id AND c.state = 'running' AND c.replica = $3
  AND (NOT $4 OR c.attempt = 1)
RETURNING c.job_id, c.attempt, c.first_claimed_at, c.taken_over";

impl Store {
    /// Claims the next attempt of each job for `replica`, in one statement: of all the
    /// replicas that ask for the same attempt, one wins. A job asked for twice in one
    /// batch is answered `Held` the second time.
    pub async fn claim_attempts(
        &self,
        replica: &str,
        scope: ClaimScope,
        requests: &[ClaimRequest],
    ) -> Result<Vec<Claim>> {
        let mut seen = HashSet::with_capacity(requests.len());
        let unique: Vec<&ClaimRequest> = requests
            .iter()
            .filter(|r| seen.insert(r.job_id.as_str()))
            .collect();
        let jobs: Vec<&str> = unique.iter().map(|r| r.job_id.as_str()).collect();
        let tenants: Vec<&str> = unique.iter().map(|r| r.tenant.as_str()).collect();
        let leases: Vec<f64> = unique.iter().map(|r| r.lease.as_secs_f64()).collect();
        let first_only = scope == ClaimScope::FirstOnly;
        let won = self
            .all_tenants_query(
                CLAIM_SQL,
                &[&jobs, &tenants, &leases, &replica, &first_only],
            )
            .await?;
        let mut found = HashMap::with_capacity(unique.len());
        for row in &won {
            found.insert(row.get::<_, String>(0), won_claim(row));
        }
        if found.len() < unique.len() {
            let rest: Vec<&str> = jobs
                .iter()
                .copied()
                .filter(|j| !found.contains_key(*j))
                .collect();
            let mut lost_answers = HashSet::new();
            for row in self.state_of(&rest).await? {
                let job: String = row.get(0);
                if found.get(&job) == Some(&Claim::Ended) {
                    continue;
                }
                let claim = match row.get::<_, String>(1).as_str() {
                    "ended" => {
                        lost_answers.remove(&job);
                        Claim::Ended
                    }
                    "open" => Claim::Later {
                        done: u32::try_from(row.get::<_, i32>(2)).unwrap_or(0),
                    },
                    _ => {
                        if row.get::<_, &str>(4) == replica {
                            lost_answers.insert(job.clone());
                        }
                        Claim::Held { until: row.get(3) }
                    }
                };
                found.insert(job, claim);
            }
            let idle: Vec<&ClaimRequest> = unique
                .iter()
                .copied()
                .filter(|r| r.idle_here && lost_answers.contains(&r.job_id))
                .collect();
            if !idle.is_empty() {
                for row in self.take_back(replica, scope, &idle).await? {
                    found.insert(row.get::<_, String>(0), won_claim(&row));
                }
            }
        }
        let mut answered = HashSet::with_capacity(requests.len());
        Ok(requests
            .iter()
            .map(|r| match found.get(&r.job_id) {
                Some(claim) if answered.insert(r.job_id.as_str()) => claim.clone(),
                _ => Claim::Held {
                    until: Utc::now() + chrono::Duration::seconds(1),
                },
            })
            .collect())
    }

    /// Takes back these jobs' claims stored under `replica`'s name (see `TAKE_BACK_SQL`).
    async fn take_back(
        &self,
        replica: &str,
        scope: ClaimScope,
        requests: &[&ClaimRequest],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let jobs: Vec<&str> = requests.iter().map(|r| r.job_id.as_str()).collect();
        let leases: Vec<f64> = requests.iter().map(|r| r.lease.as_secs_f64()).collect();
        let first_only = scope == ClaimScope::FirstOnly;
        let taken = self
            .rare_query(TAKE_BACK_SQL, &[&jobs, &leases, &replica, &first_only])
            .await?;
        for row in &taken {
            tracing::info!(job = %row.get::<_, &str>(0), attempt = row.get::<_, i32>(1), "Took back an attempt claim whose answer was lost; it runs now rather than after its lease.");
        }
        Ok(taken)
    }

    /// The claims of these jobs as they stand.
    async fn state_of(&self, jobs: &[&str]) -> Result<Vec<tokio_postgres::Row>> {
        self.rare_query(STATE_SQL, &[&jobs]).await
    }

    /// A statement of the rare path over a list of jobs, planned for these very jobs (an
    /// unnamed statement: a plan cached while the table was small could scan it whole
    /// later).
    async fn rare_query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let mut client = self.client().await?;
        if self.all_tenants {
            return Ok(client.query(sql, params).await?);
        }
        let tx = super::scoped(&mut client, super::ALL_TENANTS).await?;
        let rows = tx.query(sql, params).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Hands back claims whose attempts did not run (shutdown, a lock not free, no engine
    /// slot in time, a record not written): each attempt may be claimed again at once. A
    /// claim another replica holds by now is left alone. One upsert, like the claim, so its
    /// plan is the primary key's at any size.
    pub async fn release_claims(&self, replica: &str, claims: &[Release]) -> Result<()> {
        let jobs: Vec<&str> = claims.iter().map(|c| c.job_id.as_str()).collect();
        let tenants: Vec<&str> = claims.iter().map(|c| c.tenant.as_str()).collect();
        let before: Vec<i32> = claims
            .iter()
            .map(|c| i32::try_from(c.attempt).unwrap_or(i32::MAX) - 1)
            .collect();
        self.all_tenants_query(
            "INSERT INTO attempt_claims AS c (job_id, tenant, attempt, state, replica,
                                             claimed_at, lease_until, first_claimed_at)
             SELECT DISTINCT ON (job_id) job_id, tenant, before, 'open', $4, now(), now(), now()
             FROM unnest($1::text[], $2::text[], $3::int[]) AS t(job_id, tenant, before)
             ON CONFLICT (job_id) DO UPDATE SET
                state = 'open', attempt = EXCLUDED.attempt, lease_until = now()
             WHERE c.state = 'running' AND c.replica = $4 AND c.attempt = EXCLUDED.attempt + 1",
            &[&jobs, &tenants, &before, &replica],
        )
        .await
        .map(drop)
    }

    /// The plan a claim statement gets in this store's sessions once its plan is cached
    /// (generic), as `EXPLAIN` prints it: whether it can read a table whole.
    #[doc(hidden)]
    pub async fn claim_plan(&self) -> Result<String> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(&format!(
            "SET LOCAL plan_cache_mode = force_generic_plan; PREPARE claim_plan AS {CLAIM_SQL}"
        ))
        .await?;
        let lines = tx
            .query(
                "EXPLAIN (COSTS OFF) EXECUTE claim_plan('{j}', '{acme}', '{1}', 'r', false)",
                &[],
            )
            .await?;
        tx.batch_execute("DEALLOCATE claim_plan").await?;
        tx.commit().await?;
        Ok(lines
            .iter()
            .map(|l| l.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// The claim of one job as stored.
    pub async fn claim_of(&self, job_id: &str) -> Result<Option<StoredClaim>> {
        let rows = self
            .all_tenants_query(
                "SELECT state, attempt, replica, lease_until FROM attempt_claims WHERE job_id = $1",
                &[&job_id],
            )
            .await?;
        Ok(rows.first().map(|r| StoredClaim {
            state: r.get(0),
            attempt: r.get(1),
            replica: r.get(2),
            lease_until: r.get(3),
        }))
    }
}
