//! The script API of a dry run (`dlq replay --dry-run`, the API's test runs): reads what
//! the daemon would read, changes nothing. Key-value reads see the tenant's stored data under the run's own
//! writes, which stay in memory; secrets open as in the daemon; publishes are recorded,
//! not sent; fetches are refused (a request cannot be taken back) and recorded.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::runtime::Handle;

use crate::caps::local::Published;
use crate::caps::secrets::SecretBox;
use crate::caps::{
    Call, CapError, CapErrorKind, CapResult, Capabilities, CapabilitiesConfig, FetchRequest,
    FetchResponse, KvOp, KvReply, Publish,
};
use crate::store::Store;

use super::attempt::{self, Attempt, Defaults, Outcome};
use super::job::Job;
use super::script_api::{on_runtime, open_secret};
use crate::engine::Engine;
use crate::scripts::index::Snapshot;

/// What a dry run's script would have done.
#[derive(Debug, Default, Serialize)]
pub struct Effects {
    /// Messages it would have published.
    pub published: Vec<Published>,
    /// Keys it would have set (to their JSON value) or deleted (null).
    pub kv_writes: BTreeMap<String, Option<serde_json::Value>>,
    /// Requests it asked for, refused: `METHOD url`.
    pub fetches_refused: Vec<String>,
}

struct Inner {
    config: CapabilitiesConfig,
    events_prefix: String,
    store: Store,
    secrets: Option<SecretBox>,
    /// Keys written by the run: a value, or none for a delete. One tenant's at a time.
    writes: Mutex<BTreeMap<String, Option<String>>>,
    published: Mutex<Vec<Published>>,
    fetches: Mutex<Vec<String>>,
}

#[derive(Clone)]
pub struct DryRun {
    inner: Arc<Inner>,
    runtime: Handle,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DryRun {
    /// Must be called on the command's runtime.
    pub fn new(
        config: &CapabilitiesConfig,
        events_prefix: &str,
        store: Store,
    ) -> anyhow::Result<DryRun> {
        Ok(DryRun {
            inner: Arc::new(Inner {
                config: config.clone(),
                events_prefix: events_prefix.to_owned(),
                store,
                secrets: SecretBox::from_config(&config.secrets)?,
                writes: Mutex::default(),
                published: Mutex::default(),
                fetches: Mutex::default(),
            }),
            runtime: Handle::current(),
        })
    }

    /// What the run since the last call would have done; the next run starts afresh.
    pub fn take(&self) -> Effects {
        let inner = &self.inner;
        let kv_writes = std::mem::take(&mut *locked(&inner.writes))
            .into_iter()
            .map(|(k, v)| (k, v.map(|v| serde_json::from_str(&v).unwrap_or_default())))
            .collect();
        Effects {
            published: std::mem::take(&mut *locked(&inner.published)),
            kv_writes,
            fetches_refused: std::mem::take(&mut *locked(&inner.fetches)),
        }
    }

    /// Runs `work` on the command's or daemon's runtime (see [`on_runtime`]).
    fn spawn<T, F>(&self, work: impl FnOnce(Arc<Inner>) -> F) -> BoxFuture<'static, CapResult<T>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = CapResult<T>> + Send + 'static,
    {
        on_runtime(&self.runtime, work(self.inner.clone()))
    }
}

impl Inner {
    /// A key's value as the run sees it: its own write, else the stored one.
    async fn kv_get(&self, tenant: &str, key: &str) -> anyhow::Result<Option<String>> {
        if let Some(written) = locked(&self.writes).get(key).cloned() {
            return Ok(written);
        }
        Ok(self.store.kv_get(tenant, key).await?)
    }

    /// Stored keys under `prefix` with the run's writes laid over them.
    async fn kv_list(
        &self,
        tenant: &str,
        prefix: &str,
        limit: usize,
    ) -> anyhow::Result<Vec<String>> {
        let deleted = locked(&self.writes)
            .values()
            .filter(|v| v.is_none())
            .count();
        let stored = self
            .store
            .kv_list(tenant, prefix, limit.saturating_add(deleted))
            .await?;
        let writes = locked(&self.writes);
        let mut keys: std::collections::BTreeSet<String> = stored
            .into_iter()
            .filter(|k| !matches!(writes.get(k), Some(None)))
            .collect();
        keys.extend(
            writes
                .iter()
                .filter(|(k, v)| v.is_some() && k.starts_with(prefix))
                .map(|(k, _)| k.clone()),
        );
        Ok(keys.into_iter().take(limit).collect())
    }
}

impl Capabilities for DryRun {
    fn config(&self) -> &CapabilitiesConfig {
        &self.inner.config
    }

    fn publish(&self, call: Call, message: Publish) -> BoxFuture<'static, CapResult<String>> {
        let subject = format!(
            "{}.{}.{}",
            self.inner.events_prefix, call.tenant, message.event_type
        );
        locked(&self.inner.published).push(Published {
            subject: subject.clone(),
            data: serde_json::from_str(&message.data).unwrap_or_default(),
            headers: message.headers,
        });
        Box::pin(async move { Ok(subject) })
    }

    fn kv(&self, call: Call, op: KvOp) -> BoxFuture<'static, CapResult<KvReply>> {
        self.spawn(move |inner| async move {
            let tenant = call.tenant.as_str();
            let reply = match op {
                KvOp::Get(key) => inner.kv_get(tenant, &key).await.map(KvReply::Value),
                KvOp::List { prefix, limit } => inner
                    .kv_list(tenant, &prefix, limit)
                    .await
                    .map(KvReply::Keys),
                KvOp::Set(key, value) => {
                    locked(&inner.writes).insert(key, Some(value));
                    Ok(KvReply::Done)
                }
                KvOp::Delete(key) => {
                    let existed = inner.kv_get(tenant, &key).await.map(|v| v.is_some());
                    locked(&inner.writes).insert(key, None);
                    existed.map(KvReply::Deleted)
                }
            };
            reply.map_err(|e| CapError::failed(format!("ctx.kv failed: {e:#}")))
        })
    }

    fn fetch(
        &self,
        _: Call,
        request: FetchRequest,
    ) -> BoxFuture<'static, CapResult<FetchResponse>> {
        let what = format!("{} {}", request.method.to_uppercase(), request.url);
        let error = CapError::new(
            CapErrorKind::Unavailable,
            format!("fetch is not made in a dry run ({what})"),
        );
        locked(&self.inner.fetches).push(what);
        Box::pin(async move { Err(error) })
    }

    fn secret(&self, call: Call, name: String) -> BoxFuture<'static, CapResult<Option<String>>> {
        self.spawn(move |inner| async move {
            open_secret(&inner.store, inner.secrets.as_ref(), &call, &name).await
        })
    }
}

/// Plans and runs the replay's first attempt as the daemon would, with a script API that
/// reads and changes nothing, and decides its outcome; nothing is published, stored,
/// fetched or recorded, and what would have been is reported.
pub async fn replay(
    store: &Store,
    engine: &Engine,
    caps: &DryRun,
    defaults: &Defaults,
    job: &Job,
) -> anyhow::Result<serde_json::Value> {
    let current = Snapshot::from_rows(
        store
            .script(&job.tenant, &job.script)
            .await?
            .into_iter()
            .collect(),
    );
    let plan =
        match attempt::plan(job, current.get(&job.tenant, &job.script), store, defaults).await? {
            Ok(plan) => plan,
            Err(reason) => {
                return Ok(serde_json::json!({
                    "dry_run": true,
                    "outcome": Outcome::Skipped(reason).status(),
                    "reason": reason,
                    "message": reason.message(),
                }))
            }
        };
    let attempt = Attempt {
        job,
        number: 1,
        first_at: chrono::Utc::now(),
        headers: None,
        unclaimed: false,
    };
    let result = engine.run(plan.run(&attempt, None)).await;
    let outcome = plan.decide(&result, attempt.number);
    Ok(serde_json::json!({
        "dry_run": true,
        "version": plan.version,
        "outcome": outcome.status(),
        "run": result,
        "would": caps.take(),
    }))
}
