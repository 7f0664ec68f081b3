//! Attempt claims: the one statement that lets exactly one replica start an attempt of a
//! job, and the hand-back of a claim whose attempt did not run.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Store;

/// A replica asks to run the next attempt of this job.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    pub job_id: String,
    pub tenant: String,
    /// How long the claim holds if this replica never records the attempt (it died): then
    /// another replica may take the attempt over.
    pub lease: Duration,
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

const CLAIM_SQL: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::float8[]) AS t(job_id, tenant, lease)
), claimed AS (
    INSERT INTO attempt_claims AS c (job_id, tenant, attempt, state, replica, claimed_at,
                                     lease_until, first_claimed_at)
    SELECT job_id, tenant, 1, 'running', $4, now(), now() + make_interval(secs => lease), now()
    FROM input
    ON CONFLICT (job_id) DO UPDATE SET
        attempt = CASE WHEN c.state = 'open' THEN c.attempt + 1 ELSE c.attempt END,
        state = 'running', replica = EXCLUDED.replica, claimed_at = now(),
        lease_until = EXCLUDED.lease_until
    WHERE (c.state = 'open' AND (NOT $5 OR c.attempt = 0))
       OR (c.state = 'running' AND c.lease_until < now() AND (NOT $5 OR c.attempt = 1))
    RETURNING c.job_id, c.attempt, c.first_claimed_at
)
SELECT i.job_id, n.attempt, n.first_claimed_at, o.state, o.attempt, o.lease_until
FROM input i
LEFT JOIN claimed n ON n.job_id = i.job_id
LEFT JOIN attempt_claims o ON o.job_id = i.job_id";

impl Store {
    /// Claims the next attempt of each job for `replica`, in one statement: of all the
    /// replicas that ask for the same attempt, one wins. A job asked for twice in one
    /// batch is answered `Held` the second time.
    pub async fn claim_attempts(
        &self,
        replica: &str,
        scope: ClaimScope,
        requests: &[ClaimRequest],
    ) -> anyhow::Result<Vec<Claim>> {
        let mut seen = HashSet::with_capacity(requests.len());
        let unique: Vec<&ClaimRequest> = requests
            .iter()
            .filter(|r| seen.insert(r.job_id.as_str()))
            .collect();
        let jobs: Vec<&str> = unique.iter().map(|r| r.job_id.as_str()).collect();
        let tenants: Vec<&str> = unique.iter().map(|r| r.tenant.as_str()).collect();
        let leases: Vec<f64> = unique.iter().map(|r| r.lease.as_secs_f64()).collect();
        let first_only = scope == ClaimScope::FirstOnly;
        let rows = self
            .all_tenants_query(
                CLAIM_SQL,
                &[&jobs, &tenants, &leases, &replica, &first_only],
            )
            .await?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let job: String = row.get(0);
            let won: Option<i32> = row.get(1);
            let previous: Option<String> = row.get(3);
            let claim = match (won, previous.as_deref()) {
                (Some(attempt), previous) => Claim::Won {
                    attempt: u32::try_from(attempt).unwrap_or(1),
                    first_at: row.get(2),
                    taken_over: previous == Some("running"),
                },
                (None, Some("ended")) => Claim::Ended,
                (None, Some("open")) => Claim::Later {
                    done: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
                },
                (None, Some(_)) => Claim::Held { until: row.get(5) },
                // Inserted by a statement that committed after this one began.
                (None, None) => Claim::Held {
                    until: Utc::now() + chrono::Duration::seconds(1),
                },
            };
            found.insert(job, claim);
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

    /// Hands back a claim whose attempt did not run (shutdown, a lock not free, a record
    /// not written before it started): the attempt may be claimed again at once.
    pub async fn release_claim(
        &self,
        replica: &str,
        job_id: &str,
        attempt: u32,
    ) -> anyhow::Result<()> {
        self.all_tenants_query(
            "UPDATE attempt_claims
             SET state = 'open', attempt = attempt - 1, lease_until = now()
             WHERE job_id = $1 AND attempt = $2 AND state = 'running' AND replica = $3",
            &[&job_id, &(attempt as i32), &replica],
        )
        .await
        .map(drop)
    }

    /// The claim of one job as stored: (state, attempt, replica).
    pub async fn claim_of(&self, job_id: &str) -> anyhow::Result<Option<(String, i32, String)>> {
        let rows = self
            .all_tenants_query(
                "SELECT state, attempt, replica FROM attempt_claims WHERE job_id = $1",
                &[&job_id],
            )
            .await?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1), r.get(2))))
    }
}
