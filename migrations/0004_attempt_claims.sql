-- Attempt claims: one row per job saying which attempt is running where, or that the job
-- ended. A replica claims an attempt with one statement before it runs it; only one replica
-- can win an attempt, so a job delivered to two replicas at once (a lost ack, a NATS restart,
-- nats-server#4460) runs once. A claim not released by its lease's end (its replica died)
-- can be taken over. Run records release claims in the statement that inserts them.
CREATE TABLE attempt_claims (
    job_id           text        PRIMARY KEY,
    tenant           text        NOT NULL,
    -- The attempt running (state 'running') or the last one finished ('open', 'ended');
    -- 0 with 'open' when a claim was handed back before its first attempt ran.
    attempt          integer     NOT NULL,
    -- 'running': `attempt` is claimed by `replica` until `lease_until`;
    -- 'open': attempt + 1 may be claimed; 'ended': ok, dead-lettered or skipped.
    state            text        NOT NULL CHECK (state IN ('running', 'open', 'ended')),
    replica          text        NOT NULL,
    claimed_at       timestamptz NOT NULL,
    lease_until      timestamptz NOT NULL,
    -- When the job's first attempt was claimed: a dead letter's first_attempt_at.
    first_claimed_at timestamptz NOT NULL,
    -- Whether the running claim was taken over from a replica whose lease had ended.
    taken_over       boolean     NOT NULL DEFAULT false
);

-- Jobs recorded before claims existed keep their history: attempts that failed and were
-- retried, and whether the job ended.
INSERT INTO attempt_claims (job_id, tenant, attempt, state, replica, claimed_at, lease_until,
                            first_claimed_at)
SELECT job_id, min(tenant), max(attempt),
       CASE WHEN bool_or(status <> 'retrying') THEN 'ended' ELSE 'open' END,
       '', max(started_at), max(started_at), min(started_at)
FROM runs GROUP BY job_id
ON CONFLICT (job_id) DO NOTHING;

ALTER TABLE attempt_claims ENABLE ROW LEVEL SECURITY;
ALTER TABLE attempt_claims FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_scope ON attempt_claims
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));
GRANT SELECT, INSERT, UPDATE, DELETE ON attempt_claims TO scriptd_app;
