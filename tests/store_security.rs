//! Row-level security: a session that declares one tenant sees and changes only that
//! tenant's rows, even with no WHERE clause, and a session that declares none sees nothing.

mod support;

use support::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_session_sees_only_its_own_rows() {
    let env = TestEnv::new().await;
    env.deploy("acme", "a", "export default () => 1", &["x"])
        .await;
    env.deploy("globex", "g", "export default () => 2", &["x"])
        .await;
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    client.batch_execute("SET ROLE scriptd_app").await.unwrap();

    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    // No tenant declared: nothing is visible.
    assert_eq!(count("SELECT count(*) FROM scripts").await, 0);
    client
        .batch_execute("SELECT set_config('scriptd.tenant', 'acme', false)")
        .await
        .unwrap();
    let names: Vec<String> = client
        .query("SELECT name FROM scripts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["a"]);
    assert_eq!(count("SELECT count(*) FROM script_versions").await, 1);
    // Another tenant's rows can be neither changed nor created.
    let changed = client
        .execute(
            "UPDATE scripts SET enabled = false WHERE tenant = 'globex'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(changed, 0);
    let forged = client
        .execute(
            "INSERT INTO runs (tenant, script, job_id, attempt, trigger, status, started_at, duration_ms)
             VALUES ('globex', 'g', 'j', 1, 'event', 'ok', now(), 1)",
            &[],
        )
        .await
        .expect_err("a row of another tenant was written");
    assert_eq!(
        forged.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{forged}"
    );
    client
        .batch_execute("SELECT set_config('scriptd.tenant', '*', false)")
        .await
        .unwrap();
    assert_eq!(count("SELECT count(*) FROM scripts").await, 2);
    drop(client);
    env.cleanup().await;
}

/// Each table under row-level security, with an insert of one row for tenant `$1` (`$2`
/// keeps keys apart where the tenant is not the whole key; where it is, `$2` is unused).
const TABLES: &[(&str, &str)] = &[
    (
        "scripts",
        "INSERT INTO scripts (tenant, name, current_version) VALUES ($1, $2, 1)",
    ),
    (
        "script_versions",
        "INSERT INTO script_versions (script_id, tenant, version, source, sha256)
         SELECT id, $1, 1000 + length($2), 'x', $2 FROM scripts WHERE tenant = 'acme' LIMIT 1",
    ),
    (
        "runs",
        "INSERT INTO runs (tenant, script, job_id, attempt, trigger, status, started_at, duration_ms)
         VALUES ($1, 's', $2, 1, 'event', 'ok', now(), 1)",
    ),
    (
        "schedule_locks",
        "INSERT INTO schedule_locks (tenant, script, job_id, expires_at) VALUES ($1, $2, 'j', now())",
    ),
    (
        "kv",
        "INSERT INTO kv (tenant, key, value, size) VALUES ($1, $2, '1', 1)",
    ),
    (
        "kv_usage",
        "INSERT INTO kv_usage (tenant) SELECT $1 WHERE $2::text IS NOT NULL",
    ),
    (
        "secrets",
        "INSERT INTO secrets (tenant, name, key_id, nonce, ciphertext) VALUES ($1, $2, 'k', '\\x00', '\\x00')",
    ),
    (
        "tenant_policies",
        "INSERT INTO tenant_policies (tenant) SELECT $1 WHERE $2::text IS NOT NULL",
    ),
    (
        "api_tokens",
        "INSERT INTO api_tokens (prefix, tenant, role, secret_hash) VALUES ($2, $1, 'tenant', '\\x00')",
    ),
    (
        "audit_log",
        "INSERT INTO audit_log (tenant, actor, role, action, status) VALUES ($1, $2, 'tenant', 'x', 200)",
    ),
    (
        "attempt_claims",
        "INSERT INTO attempt_claims (job_id, tenant, attempt, state, replica, claimed_at, lease_until, first_claimed_at)
         VALUES ($2, $1, 1, 'open', 'r', now(), now(), now())",
    ),
];

/// Every table, read and written by a session of one tenant as the daemon's role: it sees
/// only that tenant's rows, cannot change or delete the other's, and writing a row of
/// another tenant is refused with SQLSTATE 42501 (the policy's, not any error). The queries name no tenant: only the policy can
/// keep the other tenant's rows out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_keeps_tenants_apart_by_policy_alone() {
    let env = TestEnv::new().await;
    env.deploy("acme", "a", "export default () => 1", &["x"])
        .await;
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    client.batch_execute("SET ROLE scriptd_app").await.unwrap();
    let as_tenant = |tenant: &'static str| {
        let client = &client;
        async move {
            client
                .execute("SELECT set_config('scriptd.tenant', $1, false)", &[&tenant])
                .await
                .unwrap();
        }
    };
    // Rows of both tenants in every table, written as the daemon (all tenants).
    as_tenant("*").await;
    for (table, insert) in TABLES {
        for tenant in ["acme", "globex"] {
            let key = format!("{table}-{tenant}");
            client
                .execute(*insert, &[&tenant, &key])
                .await
                .unwrap_or_else(|e| panic!("{table}: {e}"));
        }
    }
    as_tenant("acme").await;
    for (table, insert) in TABLES {
        let tenants: Vec<String> = client
            .query(&format!("SELECT DISTINCT tenant FROM {table}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(tenants, ["acme"], "{table} shows another tenant's rows");
        let forged = client
            .execute(*insert, &[&"globex", &format!("{table}-forged-row")])
            .await
            .expect_err(table);
        assert_eq!(
            forged.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{table}: {forged}"
        );
        // The audit trail is append-only: no row of it changes, whosever it is.
        if *table == "audit_log" {
            for sql in [
                "UPDATE audit_log SET tenant = tenant",
                "DELETE FROM audit_log",
            ] {
                let refused = client.execute(sql, &[]).await.expect_err(sql);
                assert_eq!(
                    refused.code(),
                    Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
                    "{sql}: {refused}"
                );
            }
            continue;
        }
        // Changing: the other tenant's rows are out of reach of UPDATE and DELETE, and a
        // row of one's own cannot be handed to another tenant.
        let sql = format!("UPDATE {table} SET tenant = tenant WHERE tenant = 'globex'");
        assert_eq!(client.execute(&sql, &[]).await.unwrap(), 0, "{table}");
        let sql = format!("DELETE FROM {table} WHERE tenant = 'globex'");
        assert_eq!(client.execute(&sql, &[]).await.unwrap(), 0, "{table}");
        let sql = format!("UPDATE {table} SET tenant = 'globex'");
        let moved = client.execute(&sql, &[]).await.expect_err(table);
        assert_eq!(
            moved.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{table}: {moved}"
        );
    }
    // Everything of the other tenant is still there, as it was.
    as_tenant("*").await;
    for (table, _) in TABLES {
        let sql = format!("SELECT count(*) FROM {table} WHERE tenant = 'globex'");
        let left: i64 = client.query_one(&sql, &[]).await.unwrap().get(0);
        assert_eq!(left, 1, "{table}: globex's rows");
    }
    drop(client);
    env.cleanup().await;
}
