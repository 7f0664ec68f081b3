-- What scripts can reach beyond their input: a key-value store, encrypted secrets and the
-- hosts `fetch` may call. All of it per tenant, under the same row-level security.

CREATE TABLE kv (
    tenant     text        NOT NULL,
    key        text        NOT NULL,
    value      jsonb       NOT NULL,
    -- Bytes the value and key count against the tenant's quota (their JSON text length).
    size       integer     NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, key)
);

-- Bytes each tenant's keys and values use; updated with every write under a row lock, so
-- the quota holds under concurrent writers.
CREATE TABLE kv_usage (
    tenant text   PRIMARY KEY,
    bytes  bigint NOT NULL DEFAULT 0,
    keys   bigint NOT NULL DEFAULT 0
);

CREATE TABLE secrets (
    tenant     text        NOT NULL,
    name       text        NOT NULL,
    -- Which key encrypted the value (a fingerprint, not the key), so a wrong key is named.
    key_id     text        NOT NULL,
    nonce      bytea       NOT NULL,
    ciphertext bytea       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

-- Per-tenant policy set by operators: the hosts `fetch` may call.
CREATE TABLE tenant_policies (
    tenant      text        PRIMARY KEY,
    fetch_allow text[]      NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE kv ENABLE ROW LEVEL SECURITY;
ALTER TABLE kv FORCE ROW LEVEL SECURITY;
ALTER TABLE kv_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE kv_usage FORCE ROW LEVEL SECURITY;
ALTER TABLE secrets ENABLE ROW LEVEL SECURITY;
ALTER TABLE secrets FORCE ROW LEVEL SECURITY;
ALTER TABLE tenant_policies ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_policies FORCE ROW LEVEL SECURITY;

CREATE POLICY tenant_scope ON kv
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));
CREATE POLICY tenant_scope ON kv_usage
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));
CREATE POLICY tenant_scope ON secrets
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));
CREATE POLICY tenant_scope ON tenant_policies
    USING (current_setting('scriptd.tenant', true) IN (tenant, '*'));

GRANT SELECT, INSERT, UPDATE, DELETE ON kv, kv_usage, secrets, tenant_policies TO scriptd_app;
