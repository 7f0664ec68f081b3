//! Scripts and their immutable versions: deploy (new version on a new source), list, and
//! the full load the daemon's index is built from.

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::{bad_data, Doing, Result, StoreError};
use super::{scoped, Store, ALL_TENANTS};
use crate::domain::Version;
use crate::domain::{CatchUp, Overlap};
use crate::engine::LimitOverrides;
use crate::retry::RetryOverrides;
use crate::scripts::route::HttpRoute;

/// What a deploy asks for.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScriptSpec {
    /// The tenant that owns the script.
    pub tenant: String,
    /// The script's name, unique within its tenant.
    pub name: String,
    /// The JavaScript that runs; a new version is made when it (or the TypeScript it was
    /// compiled from) differs from the current one.
    #[serde(skip)]
    pub source: String,
    /// The TypeScript `source` was compiled from, if it was.
    #[serde(skip)]
    pub typescript: Option<String>,
    /// Tenant-relative subject patterns (`order.*`).
    pub subjects: Vec<String>,
    /// A schedule: six cron fields, seconds first; `None` for none.
    pub cron: Option<String>,
    /// The IANA time zone the schedule is read in.
    pub timezone: String,
    /// What the schedule does when an occurrence comes while the previous run goes on.
    pub overlap: Overlap,
    /// What the schedule does with the occurrences missed while no daemon ran.
    pub catch_up: CatchUp,
    /// The script's own limits, over the global ones.
    pub limits: LimitOverrides,
    /// The script's own retry settings, over the global policy.
    pub retry: RetryOverrides,
    /// The HTTP route that runs the script, if any.
    pub http: Option<HttpRoute>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deployed {
    /// The script's id.
    pub id: i64,
    /// The current version after the deploy.
    pub version: Version,
    /// The SHA-256 of the current version's source, hex.
    pub sha256: String,
    /// The source was the current version's: settings were updated, no version was made.
    pub unchanged_source: bool,
}

/// A script at its current version, as the index and `scripts list` see it.
#[derive(Clone, Debug, Serialize)]
pub struct ScriptRow {
    /// The script's id.
    pub id: i64,
    /// Whether the script runs: a disabled one handles no event or schedule occurrence, and its
    /// queued jobs are skipped.
    pub enabled: bool,
    /// The current version.
    pub version: Version,
    /// The SHA-256 of the current version's source, hex.
    pub sha256: String,
    /// When the script was first deployed (PostgreSQL's clock).
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Tenant, name, source of the current version, triggers, limits and retry policy.
    #[serde(flatten)]
    pub spec: ScriptSpec,
}

impl std::ops::Deref for ScriptRow {
    type Target = ScriptSpec;

    fn deref(&self) -> &ScriptSpec {
        &self.spec
    }
}

impl ScriptSpec {
    /// What triggers the script, for people: its subject patterns and its schedule.
    pub fn triggers(&self) -> String {
        let mut parts: Vec<String> = self.subjects.clone();
        if let Some(cron) = &self.cron {
            parts.push(format!("cron {cron} ({})", self.timezone));
        }
        if let Some(route) = &self.http {
            parts.push(format!("http {route} ({})", route.auth.as_str()));
        }
        parts.join(", ")
    }
}

/// A stored route, read back.
fn stored_route(
    method: Option<String>,
    path: Option<String>,
    auth: String,
) -> Result<Option<HttpRoute>> {
    let (Some(method), Some(path)) = (method, path) else {
        return Ok(None);
    };
    Ok(Some(HttpRoute {
        method,
        path,
        auth: auth.parse().map_err(|e| bad_data("http route", e))?,
    }))
}

pub fn sha256_hex(source: &str) -> String {
    hex::encode(Sha256::digest(source.as_bytes()))
}

/// The channel a deploy notifies; the payload is the tenant.
pub const NOTIFY_CHANNEL: &str = "scriptd_scripts";

const SELECT_CURRENT: &str =
    "SELECT s.id, s.tenant, s.name, s.enabled, s.current_version, s.subjects,
        s.cron, s.timezone, s.limits, s.retry, v.sha256, v.source, s.overlap, s.catch_up,
        v.typescript, s.http_method, s.http_path, s.http_auth, s.created_at
    FROM scripts s
    JOIN script_versions v ON v.script_id = s.id AND v.version = s.current_version";

impl Store {
    /// Creates the script or a new version of it, in one transaction that also notifies
    /// running daemons.
    pub async fn deploy(&self, spec: &ScriptSpec) -> Result<Deployed> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, &spec.tenant).await?;
        // A TypeScript version is named by the TypeScript: the same file deployed again is
        // unchanged, whatever the compiler makes of it.
        let sha = sha256_hex(spec.typescript.as_deref().unwrap_or(&spec.source));
        let limits = serde_json::to_value(spec.limits).map_err(|e| bad_data("limits", e))?;
        let retry = serde_json::to_value(spec.retry).map_err(|e| bad_data("retry policy", e))?;
        let route = spec.http.as_ref();
        let (method, path) = (route.map(|r| &r.method), route.map(|r| &r.path));
        let auth = route.map_or("token", |r| r.auth.as_str());
        let key = route.map(HttpRoute::key);
        if let Some(key) = &key {
            let taken = tx
                .query_opt(
                    "SELECT name FROM scripts WHERE tenant = $1 AND http_key = $2 AND name <> $3",
                    &[&spec.tenant, key, &spec.name],
                )
                .await?;
            if let Some(row) = taken {
                let other: String = row.get(0);
                return Err(StoreError::Conflict(format!(
                    "the route {key} of tenant {} is taken by script {other}",
                    spec.tenant
                )));
            }
        }
        let existing = tx
            .query_opt(
                "SELECT s.current_version, v.sha256 FROM scripts s
                 JOIN script_versions v ON v.script_id = s.id AND v.version = s.current_version
                 WHERE s.tenant = $1 AND s.name = $2 FOR UPDATE OF s",
                &[&spec.tenant, &spec.name],
            )
            .await?;
        let (version, unchanged_source) = match existing {
            Some(row) => {
                let current: Version = row.get(0);
                let current_sha: String = row.get(1);
                let unchanged = current_sha == sha;
                (if unchanged { current } else { current.next() }, unchanged)
            }
            None => (Version::FIRST, false),
        };
        // The row is locked above when it exists: this inserts it or updates it whole.
        let row = tx
            .query_one(
                "INSERT INTO scripts (tenant, name, current_version, subjects, cron, timezone,
                    limits, retry, overlap, catch_up, http_method, http_path, http_auth,
                    http_key)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                 ON CONFLICT (tenant, name) DO UPDATE SET
                    current_version = EXCLUDED.current_version, subjects = EXCLUDED.subjects,
                    cron = EXCLUDED.cron, timezone = EXCLUDED.timezone,
                    limits = EXCLUDED.limits, retry = EXCLUDED.retry,
                    overlap = EXCLUDED.overlap, catch_up = EXCLUDED.catch_up,
                    http_method = EXCLUDED.http_method, http_path = EXCLUDED.http_path,
                    http_auth = EXCLUDED.http_auth, http_key = EXCLUDED.http_key,
                    updated_at = now()
                 RETURNING id",
                &[
                    &spec.tenant,
                    &spec.name,
                    &version,
                    &spec.subjects,
                    &spec.cron,
                    &spec.timezone,
                    &limits,
                    &retry,
                    &spec.overlap.as_str(),
                    &spec.catch_up.as_str(),
                    &method,
                    &path,
                    &auth,
                    &key,
                ],
            )
            .await?;
        let id: i64 = row.get(0);
        if !unchanged_source {
            tx.execute(
                "INSERT INTO script_versions (script_id, tenant, version, source, sha256,
                                              typescript)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &id,
                    &spec.tenant,
                    &version,
                    &spec.source,
                    &sha,
                    &spec.typescript,
                ],
            )
            .await?;
        }
        tx.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &spec.tenant])
            .await?;
        tx.commit().await.doing("committing the deploy")?;
        Ok(Deployed {
            id,
            version,
            sha256: sha,
            unchanged_source,
        })
    }

    /// Enables or disables a script; returns false if it does not exist.
    pub async fn set_enabled(&self, tenant: &str, name: &str, enabled: bool) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let n = tx
            .execute(
                "UPDATE scripts SET enabled = $3, updated_at = now() WHERE tenant = $1 AND name = $2",
                &[&tenant, &name, &enabled],
            )
            .await?;
        tx.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &tenant])
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    /// Deletes a script and its versions; returns false if it does not exist.
    pub async fn delete_script(&self, tenant: &str, name: &str) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let n = tx
            .execute(
                "DELETE FROM scripts WHERE tenant = $1 AND name = $2",
                &[&tenant, &name],
            )
            .await?;
        tx.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &tenant])
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    /// Scripts at their current version: one tenant's, or every tenant's with
    /// [`ALL_TENANTS`].
    pub async fn scripts(&self, tenant: &str) -> Result<Vec<ScriptRow>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let rows = if tenant == ALL_TENANTS {
            tx.query(&format!("{SELECT_CURRENT} ORDER BY s.tenant, s.name"), &[])
                .await?
        } else {
            tx.query(
                &format!("{SELECT_CURRENT} WHERE s.tenant = $1 ORDER BY s.name"),
                &[&tenant],
            )
            .await?
        };
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                Ok(ScriptRow {
                    id: r.get(0),
                    enabled: r.get(3),
                    version: r.get(4),
                    sha256: r.get(10),
                    created_at: r.get(18),
                    spec: ScriptSpec {
                        tenant: r.get(1),
                        name: r.get(2),
                        source: r.get(11),
                        typescript: r.get(14),
                        subjects: r.get(5),
                        cron: r.get(6),
                        timezone: r.get(7),
                        overlap: r
                            .get::<_, String>(12)
                            .parse()
                            .map_err(|e| bad_data("script setting", e))?,
                        catch_up: r
                            .get::<_, String>(13)
                            .parse()
                            .map_err(|e| bad_data("script setting", e))?,
                        limits: serde_json::from_value(r.get(8))
                            .map_err(|e| bad_data("limits", e))?,
                        retry: serde_json::from_value(r.get(9))
                            .map_err(|e| bad_data("retry policy", e))?,
                        http: stored_route(r.get(15), r.get(16), r.get(17))?,
                    },
                })
            })
            .collect()
    }
}

/// The source of one version: the JavaScript that runs, and the TypeScript it was compiled
/// from, if it was.
#[derive(Clone, Debug, Serialize)]
pub struct VersionSource {
    pub javascript: String,
    pub typescript: Option<String>,
}

/// One stored version of a script.
#[derive(Clone, Debug, Serialize)]
pub struct VersionRow {
    /// The version's number.
    pub version: Version,
    /// The SHA-256 of its source, hex.
    pub sha256: String,
    /// When it was deployed.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Whether it is the version that runs now.
    pub current: bool,
    /// Its source.
    #[serde(skip)]
    pub source: String,
}

impl Store {
    /// One script at its current version.
    pub async fn script(&self, tenant: &str, name: &str) -> Result<Option<ScriptRow>> {
        Ok(self
            .scripts(tenant)
            .await?
            .into_iter()
            .find(|s| s.name == name))
    }

    /// Every version of a script, newest first; empty if the script does not exist.
    pub async fn versions(&self, tenant: &str, name: &str) -> Result<Vec<VersionRow>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let rows = tx
            .query(
                "SELECT v.version, v.sha256, v.created_at, v.version = s.current_version, v.source
                 FROM scripts s JOIN script_versions v ON v.script_id = s.id
                 WHERE s.tenant = $1 AND s.name = $2
                 ORDER BY v.version DESC",
                &[&tenant, &name],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|r| VersionRow {
                version: r.get(0),
                sha256: r.get(1),
                created_at: r.get(2),
                current: r.get(3),
                source: r.get(4),
            })
            .collect())
    }

    /// The source of one version of a script, if it exists.
    pub async fn version_source(
        &self,
        tenant: &str,
        name: &str,
        version: Version,
    ) -> Result<Option<VersionSource>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let row = tx
            .query_opt(
                "SELECT v.source, v.typescript FROM scripts s
                 JOIN script_versions v ON v.script_id = s.id
                 WHERE s.tenant = $1 AND s.name = $2 AND v.version = $3",
                &[&tenant, &name, &version],
            )
            .await?;
        tx.commit().await?;
        Ok(row.map(|r| VersionSource {
            javascript: r.get(0),
            typescript: r.get(1),
        }))
    }

    /// Makes an existing version current again; false if the script or version does not
    /// exist. Running daemons are notified like after a deploy.
    pub async fn rollback(&self, tenant: &str, name: &str, version: Version) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let n = tx
            .execute(
                "UPDATE scripts s SET current_version = $3, updated_at = now()
                 WHERE s.tenant = $1 AND s.name = $2
                   AND EXISTS (SELECT 1 FROM script_versions v
                               WHERE v.script_id = s.id AND v.version = $3)",
                &[&tenant, &name, &version],
            )
            .await?;
        tx.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &tenant])
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }
}
