//! The in-memory script index: every script at its current version, by tenant, so an event
//! costs no SQL. Loaded at start, reloaded on LISTEN/NOTIFY from deploys and periodically.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::domain::Version;
use crate::engine::{LimitOverrides, Limits};
use crate::retry::{RetryOverrides, RetryPolicy};
use crate::scripts::route::HttpRoute;
use crate::store::{ScriptRow, Store, ALL_TENANTS};
use crate::subject;

/// A script at its current version, ready to run.
#[derive(Debug)]
pub struct IndexedScript {
    /// The script's id in the database; part of its jobs' ids.
    pub id: i64,
    /// The tenant that owns the script.
    pub tenant: String,
    /// The script's name, unique within its tenant.
    pub name: String,
    /// Whether the script runs: a disabled one handles no event or schedule occurrence, and its
    /// queued jobs are skipped.
    pub enabled: bool,
    /// The current version.
    pub version: Version,
    /// The current version's source.
    pub source: Arc<str>,
    /// Tenant-relative subject patterns (`order.*`, `user.>`) of the events the script handles.
    pub subjects: Vec<String>,
    /// The schedule: six cron fields, seconds first; `None` for a script run by events only.
    pub cron: Option<String>,
    /// The IANA time zone the schedule is read in.
    pub timezone: String,
    /// What the schedule does when an occurrence comes while the previous run goes on.
    pub overlap: crate::domain::Overlap,
    /// What the schedule does with the occurrences missed while no daemon ran.
    pub catch_up: crate::domain::CatchUp,
    /// The script's own limits, over the global ones.
    pub limits: LimitOverrides,
    /// The script's own retry settings, over the global policy.
    pub retry: RetryOverrides,
    /// The HTTP route that runs the script, if any.
    pub http: Option<HttpRoute>,
    /// When the script was first deployed: a tenant's event lane starts at its first script.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// What a request path finds among a tenant's routes.
pub enum Routed {
    /// The script whose route matches, with the path's parameters.
    Found(
        Arc<IndexedScript>,
        serde_json::Map<String, serde_json::Value>,
    ),
    /// Routes match the path, with other methods (these).
    OtherMethods(Vec<String>),
    /// No route matches.
    None,
}

impl IndexedScript {
    pub fn limits(&self, global: &Limits) -> Limits {
        global.with(&self.limits)
    }

    pub fn retry_policy(&self, global: &RetryPolicy) -> RetryPolicy {
        global.with(&self.retry)
    }

    /// Whether this script handles events of this tenant-relative type.
    pub fn handles(&self, event_type: &str) -> bool {
        self.enabled
            && self
                .subjects
                .iter()
                .any(|p| subject::matches(p, event_type))
    }
}

/// One consistent view of all scripts.
#[derive(Debug, Default)]
pub struct Snapshot {
    by_tenant: HashMap<String, Vec<Arc<IndexedScript>>>,
}

impl Snapshot {
    pub fn from_rows(rows: Vec<ScriptRow>) -> Snapshot {
        let mut by_tenant: HashMap<String, Vec<Arc<IndexedScript>>> = HashMap::new();
        for r in rows {
            let spec = r.spec;
            by_tenant
                .entry(spec.tenant.clone())
                .or_default()
                .push(Arc::new(IndexedScript {
                    id: r.id,
                    tenant: spec.tenant,
                    name: spec.name,
                    enabled: r.enabled,
                    version: r.version,
                    source: Arc::from(spec.source),
                    subjects: spec.subjects,
                    cron: spec.cron,
                    timezone: spec.timezone,
                    overlap: spec.overlap,
                    catch_up: spec.catch_up,
                    limits: spec.limits,
                    retry: spec.retry,
                    http: spec.http,
                    created_at: r.created_at,
                }));
        }
        Snapshot { by_tenant }
    }

    /// The enabled scripts of `tenant` whose patterns match `event_type`.
    pub fn matching<'a>(
        &'a self,
        tenant: &str,
        event_type: &'a str,
    ) -> impl Iterator<Item = &'a Arc<IndexedScript>> + 'a {
        self.by_tenant
            .get(tenant)
            .into_iter()
            .flatten()
            .filter(move |s| s.handles(event_type))
    }

    /// Every enabled script with a schedule.
    pub fn scheduled(&self) -> impl Iterator<Item = &Arc<IndexedScript>> {
        self.by_tenant
            .values()
            .flatten()
            .filter(|s| s.enabled && s.cron.is_some())
    }

    /// The enabled script of `tenant` whose route takes `method` and `path` (the most
    /// specific, when several match).
    pub fn route(&self, tenant: &str, method: &str, path: &str) -> Routed {
        let mut best: Option<(usize, &Arc<IndexedScript>, serde_json::Map<_, _>)> = None;
        let mut others = Vec::new();
        let routes = self
            .by_tenant
            .get(tenant)
            .into_iter()
            .flatten()
            .filter(|s| s.enabled)
            .filter_map(|s| Some((s, s.http.as_ref()?)));
        for (script, route) in routes {
            let Some((params, score)) = route.matches(path) else {
                continue;
            };
            if route.method != method {
                others.push(route.method.clone());
            } else if best.as_ref().is_none_or(|(s, ..)| score > *s) {
                best = Some((score, script, params));
            }
        }
        match best {
            Some((_, script, params)) => Routed::Found(script.clone(), params),
            None if !others.is_empty() => {
                others.sort();
                others.dedup();
                Routed::OtherMethods(others)
            }
            None => Routed::None,
        }
    }

    pub fn get(&self, tenant: &str, name: &str) -> Option<&Arc<IndexedScript>> {
        self.by_tenant.get(tenant)?.iter().find(|s| s.name == name)
    }

    /// Every tenant with at least one script (enabled or not).
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.by_tenant.keys().map(String::as_str)
    }

    /// When the oldest of `tenant`'s scripts was deployed; none for a tenant without scripts.
    pub fn first_deployed(&self, tenant: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        let scripts = self.by_tenant.get(tenant)?;
        scripts.iter().map(|s| s.created_at).min()
    }

    pub fn has_tenant(&self, tenant: &str) -> bool {
        self.by_tenant.contains_key(tenant)
    }

    pub fn len(&self) -> usize {
        self.by_tenant.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The shared, swappable index.
pub struct ScriptIndex {
    current: RwLock<Arc<Snapshot>>,
    loaded: AtomicBool,
    /// Counts replacements, so others can wait for the next one.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Default for ScriptIndex {
    fn default() -> Self {
        ScriptIndex {
            current: RwLock::default(),
            loaded: AtomicBool::default(),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl ScriptIndex {
    /// A receiver that sees every later replacement of the snapshot.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    pub fn replace(&self, snapshot: Snapshot) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
        self.loaded.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub async fn reload(&self, store: &Store) -> anyhow::Result<usize> {
        let snapshot = Snapshot::from_rows(store.scripts(ALL_TENANTS).await?);
        let n = snapshot.len();
        self.replace(snapshot);
        Ok(n)
    }
}

/// Keeps the index fresh until cancelled: a LISTEN connection reloads on every deploy
/// notification, and a full reload runs every `interval` whatever happens (the fallback
/// for missed notifications and lost connections).
pub async fn keep_fresh(
    index: Arc<ScriptIndex>,
    store: Store,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (notified_tx, mut notified) = tokio::sync::mpsc::channel::<()>(1);
        let listener = tokio::spawn(listen(store.url().to_owned(), notified_tx));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    listener.abort();
                    return;
                }
                _ = ticker.tick() => {}
                got = notified.recv() => {
                    if got.is_none() {
                        // The listener ended: reload (we may have missed something) and
                        // connect it again.
                        reload_logged(&index, &store).await;
                        break;
                    }
                }
            }
            reload_logged(&index, &store).await;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn reload_logged(index: &ScriptIndex, store: &Store) {
    match index.reload(store).await {
        Ok(n) => tracing::debug!(scripts = n, "Script index reloaded."),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "Script index reload failed; keeping the previous one.")
        }
    }
}

/// Forwards deploy notifications until the connection drops.
async fn listen(url: String, notified: tokio::sync::mpsc::Sender<()>) {
    let (client, mut connection) = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot listen for script changes; relying on periodic reloads.");
            return;
        }
    };
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {}", crate::store::NOTIFY_CHANNEL);
    let listening = client.batch_execute(&statement);
    tokio::pin!(listening);
    let mut subscribed = false;
    loop {
        tokio::select! {
            done = &mut listening, if !subscribed => {
                if let Err(e) = done {
                    tracing::warn!(error = %e, "LISTEN failed.");
                    return;
                }
                subscribed = true;
                // Changes made before LISTEN took effect are caught by this reload.
                if notified.send(()).await.is_err() { return; }
            }
            message = messages.next() => match message {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    let _ = notified.try_send(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Script change listener lost its connection.");
                    return;
                }
                None => return,
            }
        }
    }
}
