//! PostgreSQL: the connection pool, migrations, scripts and their versions, run records.
//! Every query declares the tenant it works for (`scriptd.tenant`, '*' for the daemon's
//! cross-tenant work); row-level security enforces it for the `database.role` role.

mod claims;
mod error;
mod kv;
mod migrate;
mod overview;
mod runs;
mod scripts;
mod secrets;
mod tokens;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Transaction};
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

pub use claims::{Claim, ClaimRequest, ClaimScope, Release, StoredClaim};
use error::Doing;
pub use error::{Result, StoreError};
pub use kv::KvWrite;
pub use overview::{Minute, RunOverview, OVERVIEW_MINUTES};
pub use runs::{LockOutcome, RunFilter, RunRecord, StoredRun, RESULT_KEPT};
pub use scripts::{
    sha256_hex, Deployed, ScriptRow, ScriptSpec, VersionRow, VersionSource, NOTIFY_CHANNEL,
};
pub use secrets::SecretInfo;
pub use tokens::{AuditEntry, AuditRow, Principal, Rejected, Role, TokenInfo};

/// The `[database]` settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// libpq-style URL or key=value string.
    pub url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Role every pooled session switches to (`SET ROLE`) so row-level security applies
    /// even when the login is a superuser; empty to stay as the login user.
    pub role: String,
    /// Apply migrations when the daemon starts.
    pub migrate_on_start: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/scriptd".into(),
            pool_size: 8,
            role: "scriptd_app".into(),
            migrate_on_start: true,
        }
    }
}

/// What a pool's sessions are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sessions {
    /// Each query declares its tenant.
    Scoped,
    /// The daemon's: every tenant.
    AllTenants,
    /// The daemon's attempt claims: every tenant, asynchronous commits, generic plans,
    /// index scans only.
    Claims,
    /// The daemon's run-record writer: every tenant, generic plans.
    Records,
}

/// Tenant scope of a query: one tenant, or all (the daemon's index and run records).
pub const ALL_TENANTS: &str = "*";

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    url: String,
    /// Whether every session of the pool works for all tenants (the daemon's store), so
    /// the daemon's hot-path statements need no transaction to declare their scope.
    all_tenants: bool,
}

impl Store {
    /// A pool for `config`; checks one connection so a wrong URL fails here, clearly.
    /// A store whose every query declares its tenant.
    pub async fn connect(config: &DatabaseConfig) -> Result<Store> {
        Self::open(config, Sessions::Scoped, config.pool_size).await
    }

    /// The daemon's store: its sessions work for all tenants from the start.
    pub async fn connect_all_tenants(config: &DatabaseConfig) -> Result<Store> {
        Self::open(config, Sessions::AllTenants, config.pool_size).await
    }

    /// The daemon's store for attempt claims (`connections` of them): all tenants, and
    /// commits that do not wait for the WAL to reach the disk. A claim stands between a run's
    /// engine slot and its start; waiting for a flush there cost more than half the
    /// throughput. Other sessions see a claim once it commits, flushed or not, so two live
    /// replicas still cannot both win an attempt; what a PostgreSQL crash can lose is a
    /// claim whose run then cannot record either, and the attempt is claimed again, as
    /// after a replica's crash. Run records, which release claims, stay synchronous.
    pub async fn connect_claims(config: &DatabaseConfig, connections: usize) -> Result<Store> {
        Self::open(config, Sessions::Claims, connections).await
    }

    /// The daemon's store for run records (two connections: batches are written one at a
    /// time). Its one statement, the batch insert that also releases the batch's claims, is
    /// planned once per connection rather than per batch: its plan (arrays unnested into
    /// an insert and a primary-key upsert) is the same whatever the values and the tables'
    /// sizes, and planning it was a third of its cost (141 µs of 395 µs per batch here,
    /// measured with `pg_stat_statements`). No query that reads a table runs on this pool:
    /// a generic plan made while a table is small could keep scanning it whole.
    pub async fn connect_records(config: &DatabaseConfig) -> Result<Store> {
        Self::open(config, Sessions::Records, 2).await
    }

    async fn open(
        config: &DatabaseConfig,
        sessions: Sessions,
        connections: usize,
    ) -> Result<Store> {
        let all_tenants = sessions != Sessions::Scoped;
        let pg: tokio_postgres::Config = config.url.parse().map_err(|e| {
            StoreError::Config(format!(
                "invalid database.url {:?}: {e}",
                redact(&config.url)
            ))
        })?;
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let role = config.role.clone();
        let pool = Pool::builder(manager)
            .max_size(connections.max(1))
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
                let role = role.clone();
                Box::pin(async move {
                    // Plans are made for each execution's values and the table's size at
                    // that moment. A generic plan, cached once a prepared statement has
                    // run a few times, keeps whatever suited the table then: made while
                    // `runs` was nearly empty, it scanned the whole table for every job's
                    // history (450 rows read per run after 20 000 runs, the largest CPU
                    // cost per event until PostgreSQL analysed the table again).
                    // The claims store's statement is a primary-key upsert and a probe of
                    // `runs_by_job` per job, and planning was half its cost: generic plans
                    // there, with sequential scans off so that no plan made while `runs`
                    // is small reads it whole (its probe would, made on a table of a few
                    // rows). The records store's statement likewise (see `connect_records`).
                    let mut setup = String::new();
                    match sessions {
                        Sessions::Claims => setup
                            .push_str("SET synchronous_commit = off; SET enable_seqscan = off;"),
                        Sessions::Records => {
                            setup.push_str("SET plan_cache_mode = force_generic_plan;")
                        }
                        Sessions::Scoped | Sessions::AllTenants => {
                            setup.push_str("SET plan_cache_mode = force_custom_plan;")
                        }
                    }
                    if !role.is_empty() {
                        setup.push_str(&format!("SET ROLE {};", quote_ident(&role)));
                    }
                    if all_tenants {
                        setup.push_str("SELECT set_config('scriptd.tenant', '*', false);");
                    }

                    client
                        .batch_execute(&setup)
                        .await
                        .map_err(deadpool_postgres::HookError::Backend)?;
                    Ok(())
                })
            }))
            .build()
            .map_err(|e| StoreError::Config(format!("building the database pool: {e}")))?;
        let store = Store {
            pool,
            url: config.url.clone(),
            all_tenants,
        };
        drop(store.client().await?);
        Ok(store)
    }

    /// Applies missing migrations (as the login user, not the restricted role).
    pub async fn migrate(config: &DatabaseConfig) -> Result<Vec<String>> {
        let mut client = connect_direct(&config.url).await?;
        migrate::migrate(&mut client).await
    }

    pub async fn client(&self) -> Result<Object> {
        self.pool.get().await.doing(&{
            format!(
                "no database connection to {} (is PostgreSQL running, does the database exist, \
                 and were migrations applied with `scriptd migrate`?)",
                redact(&self.url)
            )
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

/// A transaction working for `tenant` (or [`ALL_TENANTS`]).
pub async fn scoped<'a>(client: &'a mut Object, tenant: &str) -> Result<Transaction<'a>> {
    let tx = client.transaction().await?;
    tx.execute("SELECT set_config('scriptd.tenant', $1, true)", &[&tenant])
        .await?;
    Ok(tx)
}

/// A plain connection outside the pool (migrations, LISTEN).
pub async fn connect_direct(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.doing(&{
        format!(
            "connecting to PostgreSQL at {} (is it running and does the database exist?)",
            redact(url)
        )
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "Database connection closed.");
        }
    });
    Ok(client)
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
