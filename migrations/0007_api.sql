-- The HTTP API: bearer tokens and the audit trail.
--
-- A token reads `sd_<prefix>_<secret>`. Only the SHA-256 of the secret is stored, under the
-- prefix that finds it; the token itself is shown once, when it is made. A tenant token acts
-- for its tenant only; an operator token (tenant '*') for every tenant.
CREATE TABLE api_tokens (
    prefix       text        PRIMARY KEY,
    tenant       text        NOT NULL,
    role         text        NOT NULL CHECK (role IN ('tenant', 'operator')),
    secret_hash  bytea       NOT NULL,
    label        text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    CHECK ((role = 'operator') = (tenant = '*'))
);

-- Who did what through the API, and how it ended: one row per request that changes
-- something (deploys, replays, purges, publishes, settings), refused ones included.
-- Append-only for the daemon's role.
CREATE TABLE audit_log (
    id      bigserial   PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    -- The tenant acted on ('*' for requests that name none).
    tenant  text        NOT NULL,
    -- The token's prefix.
    actor   text        NOT NULL,
    role    text        NOT NULL,
    -- What was asked: `scripts.deploy`, `dead_letters.replay`, ...
    action  text        NOT NULL,
    -- What it was asked of: a script's name, a dead letter's sequence, an event type.
    target  text        NOT NULL DEFAULT '',
    -- The HTTP status of the answer.
    status  integer     NOT NULL,
    detail  jsonb
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant, at DESC);

ALTER TABLE api_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_scope ON api_tokens
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));
ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_scope ON audit_log
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));
GRANT SELECT, INSERT, UPDATE, DELETE ON api_tokens TO scriptd_app;
GRANT SELECT, INSERT ON audit_log TO scriptd_app;
GRANT USAGE ON SEQUENCE audit_log_id_seq TO scriptd_app;
