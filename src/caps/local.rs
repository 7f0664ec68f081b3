//! The script API for `scripts test`: nothing leaves the process except fetches to hosts
//! allowed on the command line. Publishes are recorded, key-value lives in memory (seeded
//! from the command line), secrets come from the command line.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde::Serialize;

use super::fetch::Fetcher;
use super::net::HostRule;
use super::{
    Call, CapError, CapResult, Capabilities, CapabilitiesConfig, FetchRequest, FetchResponse, KvOp,
    KvReply, Publish,
};

/// A message the script published, as the daemon would have sent it.
#[derive(Clone, Debug, Serialize)]
pub struct Published {
    /// The full subject: `<events_prefix>.<tenant>.<type>`.
    pub subject: String,
    /// The payload, as the script gave it.
    pub data: serde_json::Value,
    /// The headers the script set, as name and value pairs.
    pub headers: Vec<(String, String)>,
}

pub struct Local {
    config: CapabilitiesConfig,
    events_prefix: String,
    allow: Arc<Vec<HostRule>>,
    fetcher: Arc<Fetcher>,
    /// Fetches run on the command's runtime, not on the engine worker's thread.
    runtime: tokio::runtime::Handle,
    secrets: BTreeMap<String, String>,
    kv: Mutex<BTreeMap<String, String>>,
    published: Mutex<Vec<Published>>,
}

impl Local {
    pub fn new(
        config: &CapabilitiesConfig,
        events_prefix: &str,
        allow: Vec<HostRule>,
        kv: BTreeMap<String, String>,
        secrets: BTreeMap<String, String>,
    ) -> anyhow::Result<Local> {
        Ok(Local {
            config: config.clone(),
            events_prefix: events_prefix.to_owned(),
            allow: Arc::new(allow),
            fetcher: Arc::new(Fetcher::new(&config.fetch)?),
            runtime: tokio::runtime::Handle::current(),
            secrets,
            kv: Mutex::new(kv),
            published: Mutex::new(Vec::new()),
        })
    }

    pub fn published(&self) -> Vec<Published> {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The key-value data after the run, values as JSON.
    pub fn kv(&self) -> BTreeMap<String, serde_json::Value> {
        self.kv
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap_or_default()))
            .collect()
    }
}

impl Capabilities for Local {
    fn config(&self) -> &CapabilitiesConfig {
        &self.config
    }

    fn publish(&self, call: Call, message: Publish) -> BoxFuture<'static, CapResult<String>> {
        let subject = format!(
            "{}.{}.{}",
            self.events_prefix, call.tenant, message.event_type
        );
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Published {
                subject: subject.clone(),
                data: serde_json::from_str(&message.data).unwrap_or_default(),
                headers: message.headers,
            });
        Box::pin(async move { Ok(subject) })
    }

    fn kv(&self, _: Call, op: KvOp) -> BoxFuture<'static, CapResult<KvReply>> {
        let reply = op.apply_in_memory(&mut self.kv.lock().unwrap_or_else(|e| e.into_inner()));
        Box::pin(async move { Ok(reply) })
    }

    fn fetch(
        &self,
        call: Call,
        request: FetchRequest,
    ) -> BoxFuture<'static, CapResult<FetchResponse>> {
        let (allow, fetcher) = (self.allow.clone(), self.fetcher.clone());
        let task = self
            .runtime
            .spawn(async move { fetcher.fetch(&allow, request, call.deadline).await });
        Box::pin(async move {
            task.await
                .unwrap_or_else(|e| Err(CapError::failed(format!("fetch failed: {e}"))))
        })
    }

    fn secret(&self, _: Call, name: String) -> BoxFuture<'static, CapResult<Option<String>>> {
        let value = self.secrets.get(&name).cloned();
        Box::pin(async move { Ok::<_, CapError>(value) })
    }
}
