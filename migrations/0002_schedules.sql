-- Cron schedules: per-script overlap and catch-up policies, the scheduled instant of each
-- run, and the lock that keeps two runs of one schedule from overlapping across daemons.

ALTER TABLE scripts
    ADD COLUMN overlap text NOT NULL DEFAULT 'skip'
        CHECK (overlap IN ('skip', 'allow', 'queue-one')),
    ADD COLUMN catch_up text NOT NULL DEFAULT 'none'
        CHECK (catch_up IN ('none', 'all'));

ALTER TABLE runs ADD COLUMN scheduled_at timestamptz;

-- The last occurrence recorded per script: where catch-up starts after downtime.
CREATE INDEX runs_by_schedule ON runs (tenant, script, scheduled_at DESC)
    WHERE scheduled_at IS NOT NULL;

-- One row while a scheduled run of a script is going (overlap policy skip / queue-one).
CREATE TABLE schedule_locks (
    tenant     text        NOT NULL,
    script     text        NOT NULL,
    job_id     text        NOT NULL,
    -- A job waiting for the lock (queue-one): at most one.
    queued_job text,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (tenant, script)
);

ALTER TABLE schedule_locks ENABLE ROW LEVEL SECURITY;
ALTER TABLE schedule_locks FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_scope ON schedule_locks
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));
GRANT SELECT, INSERT, UPDATE, DELETE ON schedule_locks TO scriptd_app;
