-- Scripts, their immutable versions, and one row per run attempt. Every table carries the
-- tenant; row-level security limits each session to the tenant it declares with
-- `SET LOCAL scriptd.tenant = '<tenant>'` ('*' for the daemon's cross-tenant work).

CREATE TABLE scripts (
    id              bigserial PRIMARY KEY,
    tenant          text        NOT NULL,
    name            text        NOT NULL,
    enabled         boolean     NOT NULL DEFAULT true,
    current_version integer     NOT NULL,
    subjects        text[]      NOT NULL DEFAULT '{}',
    cron            text,
    timezone        text        NOT NULL DEFAULT 'UTC',
    limits          jsonb       NOT NULL DEFAULT '{}',
    retry           jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, name)
);

CREATE TABLE script_versions (
    script_id  bigint      NOT NULL REFERENCES scripts (id) ON DELETE CASCADE,
    tenant     text        NOT NULL,
    version    integer     NOT NULL,
    source     text        NOT NULL,
    sha256     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (script_id, version)
);

CREATE TABLE runs (
    id              bigserial PRIMARY KEY,
    tenant          text             NOT NULL,
    script          text             NOT NULL,
    version         integer,
    job_id          text             NOT NULL,
    attempt         integer          NOT NULL,
    trigger         text             NOT NULL,
    subject         text,
    event_id        text,
    status          text             NOT NULL,
    failure_kind    text,
    failure_message text,
    failure_stack   text,
    logs            jsonb            NOT NULL DEFAULT '[]',
    logs_truncated  boolean          NOT NULL DEFAULT false,
    cold_start      boolean          NOT NULL DEFAULT false,
    started_at      timestamptz      NOT NULL,
    duration_ms     double precision NOT NULL
);

-- Run history of one script, newest first; the attempts of one job.
CREATE INDEX runs_by_script ON runs (tenant, script, started_at DESC);
CREATE INDEX runs_by_job ON runs (job_id);

ALTER TABLE scripts ENABLE ROW LEVEL SECURITY;
ALTER TABLE scripts FORCE ROW LEVEL SECURITY;
ALTER TABLE script_versions ENABLE ROW LEVEL SECURITY;
ALTER TABLE script_versions FORCE ROW LEVEL SECURITY;
ALTER TABLE runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE runs FORCE ROW LEVEL SECURITY;

CREATE POLICY tenant_scope ON scripts
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));
CREATE POLICY tenant_scope ON script_versions
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));
CREATE POLICY tenant_scope ON runs
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));

-- Superusers bypass row-level security, so the daemon works as this role (setting
-- `database.role`). Roles are shared by the whole server: create it once, tolerate races.
DO $$
BEGIN
    CREATE ROLE scriptd_app NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;
GRANT SELECT, INSERT, UPDATE, DELETE ON scripts, script_versions, runs TO scriptd_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO scriptd_app;
