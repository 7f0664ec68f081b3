//! The daemon's script API: publishes to JetStream, key-value and secrets in PostgreSQL,
//! fetch through [`Fetcher`]. Calls run on the daemon's runtime (where its connections
//! live), never on an engine worker's thread, which is busy running JavaScript.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::future::BoxFuture;
use tokio::runtime::Handle;

use crate::caps::fetch::Fetcher;
use crate::caps::net::HostRule;
use crate::caps::secrets::SecretBox;
use crate::caps::{
    Call, CapError, CapResult, Capabilities, CapabilitiesConfig, FetchRequest, FetchResponse, KvOp,
    KvReply, Publish, DEPTH_HEADER,
};
use crate::pipeline::script_api::{on_runtime, open_secret, service_error};
use crate::store::{KvWrite, Store};

struct Inner {
    config: CapabilitiesConfig,
    js: jetstream::Context,
    events_prefix: String,
    store: Store,
    fetcher: Fetcher,
    secrets: Option<SecretBox>,
}

#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
    runtime: Handle,
}

impl Live {
    /// Must be called on the daemon's runtime.
    pub fn new(
        config: &CapabilitiesConfig,
        js: jetstream::Context,
        events_prefix: &str,
        store: Store,
    ) -> anyhow::Result<Live> {
        Ok(Live {
            inner: Arc::new(Inner {
                config: config.clone(),
                js,
                events_prefix: events_prefix.to_owned(),
                store,
                fetcher: Fetcher::new(&config.fetch)?,
                secrets: SecretBox::from_config(&config.secrets)?,
            }),
            runtime: Handle::current(),
        })
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

impl Capabilities for Live {
    fn config(&self) -> &CapabilitiesConfig {
        &self.inner.config
    }

    fn publish(&self, call: Call, message: Publish) -> BoxFuture<'static, CapResult<String>> {
        self.spawn(move |inner| async move {
            let subject = format!(
                "{}.{}.{}",
                inner.events_prefix, call.tenant, message.event_type
            );
            let mut headers = HeaderMap::new();
            for (name, value) in &message.headers {
                headers.insert(name.as_str(), value.as_str());
            }
            headers.insert(
                "Nats-Msg-Id",
                format!("{}-pub-{}", call.job, message.sequence).as_str(),
            );
            headers.insert(DEPTH_HEADER, (call.depth + 1).to_string().as_str());
            if let Some(parent) = &call.traceparent {
                headers.insert("traceparent", parent.as_str());
            }
            let ack = inner
                .js
                .publish_with_headers(subject.clone(), headers, message.data.into())
                .await
                .map_err(|e| service_error("ctx.publish", &call, e))?;
            ack.await
                .map_err(|e| service_error("ctx.publish", &call, e))?;
            Ok(subject)
        })
    }

    fn kv(&self, call: Call, op: KvOp) -> BoxFuture<'static, CapResult<KvReply>> {
        self.spawn(move |inner| async move {
            let store = &inner.store;
            let tenant = call.tenant.as_str();
            let reply = match op {
                KvOp::Get(key) => store.kv_get(tenant, &key).await.map(KvReply::Value),
                KvOp::Delete(key) => store.kv_delete(tenant, &key).await.map(KvReply::Deleted),
                KvOp::List { prefix, limit } => {
                    store.kv_list(tenant, &prefix, limit).await.map(KvReply::Keys)
                }
                KvOp::Set(key, value) => {
                    let quota = inner.config.kv.max_per_tenant;
                    match store.kv_set(tenant, &key, &value, quota.0).await {
                        Ok(KvWrite::Done) => Ok(KvReply::Done),
                        Ok(KvWrite::OverQuota { used, needed }) => {
                            return Err(CapError::limit(format!(
                                "ctx.kv.set: the tenant's keys and values would use {needed} bytes, \
                                 over its {quota} quota ({used} bytes in use)"
                            )))
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            reply.map_err(|e| service_error("ctx.kv", &call, e))
        })
    }

    fn fetch(
        &self,
        call: Call,
        request: FetchRequest,
    ) -> BoxFuture<'static, CapResult<FetchResponse>> {
        self.spawn(move |inner| async move {
            let entries = inner
                .store
                .fetch_allow_list(&call.tenant)
                .await
                .map_err(|e| service_error("fetch", &call, e))?;
            // Entries are checked when an operator sets them; one that no longer parses
            // allows nothing.
            let rules: Vec<HostRule> = entries
                .iter()
                .filter_map(|e| HostRule::parse(e).ok())
                .collect();
            // Bounded by the run's deadline, a little after it: a request still going then
            // is ended by the run's own timeout, which the run reports as `timeout`.
            let bound = call.deadline + std::time::Duration::from_millis(250);
            inner.fetcher.fetch(&rules, request, bound).await
        })
    }

    fn secret(&self, call: Call, name: String) -> BoxFuture<'static, CapResult<Option<String>>> {
        self.spawn(move |inner| async move {
            open_secret(&inner.store, inner.secrets.as_ref(), &call, &name).await
        })
    }
}
