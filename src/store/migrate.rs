//! Schema migrations: the SQL files of `migrations/`, embedded in the binary and applied in
//! order, once, under an advisory lock so concurrent daemons do not race.

use super::error::{Doing, Result};
use tokio_postgres::Client;

/// (version, name, SQL), in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "schedules",
        include_str!("../../migrations/0002_schedules.sql"),
    ),
    (
        3,
        "capabilities",
        include_str!("../../migrations/0003_capabilities.sql"),
    ),
    (
        4,
        "attempt_claims",
        include_str!("../../migrations/0004_attempt_claims.sql"),
    ),
    (
        5,
        "run_results",
        include_str!("../../migrations/0005_run_results.sql"),
    ),
    (
        6,
        "typescript",
        include_str!("../../migrations/0006_typescript.sql"),
    ),
    (7, "api", include_str!("../../migrations/0007_api.sql")),
    (
        8,
        "http_routes",
        include_str!("../../migrations/0008_http_routes.sql"),
    ),
    (
        9,
        "run_traces",
        include_str!("../../migrations/0009_run_traces.sql"),
    ),
];

/// An arbitrary constant shared by every scriptd: the advisory lock key for migrations.
const LOCK_KEY: i64 = 0x5c71_9d00_0001;

/// Applies the missing migrations; returns the names of those applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<String>> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .doing("taking the migration lock")?;
    let result = apply(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    let applied = result?;
    unlocked.doing("releasing the migration lock")?;
    Ok(applied)
}

async fn apply(client: &mut Client) -> Result<Vec<String>> {
    let exists: bool = client
        .query_one("SELECT to_regclass('scriptd_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        client
            .batch_execute(
                "CREATE TABLE scriptd_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )",
            )
            .await
            .doing("creating the migrations table")?;
    }
    let done: Vec<i32> = client
        .query("SELECT version FROM scriptd_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .doing(&format!("applying migration {version:04}_{name}"))?;
        tx.execute(
            "INSERT INTO scriptd_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        applied.push(format!("{version:04}_{name}"));
    }
    Ok(applied)
}
