//! What scripts can do beyond computing: the interface between the engine's ops and the
//! services behind them (publish, key-value, fetch, secrets), its limits, and its errors.
//! Every call names the tenant of the run making it; implementations never take a tenant
//! from the script.

mod config;
pub mod fetch;
pub mod local;
pub mod net;
pub mod secrets;

use std::time::Instant;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use config::{CapabilitiesConfig, FetchConfig, KvConfig, PublishConfig, SecretsConfig};

/// Header carrying how many script publishes led to an event.
pub const DEPTH_HEADER: &str = "Scriptd-Chain-Depth";

/// Who is calling: the run a capability call belongs to. Built by the engine from the run,
/// never from script input.
#[derive(Clone, Debug)]
pub struct Call {
    /// The tenant of the run: every call acts on this tenant's subjects, keys and secrets only.
    pub tenant: String,
    /// The name of the script making the call, for the daemon's logs.
    pub script: String,
    /// The job this run belongs to: the same on every attempt, so publishes are deduplicated.
    pub job: String,
    /// The W3C trace context the run continues, if any.
    pub traceparent: Option<String>,
    /// How many script publishes led to the event this run handles (0 for outside events).
    pub depth: u32,
    /// When the run's wall-clock limit ends.
    pub deadline: Instant,
}

/// A message a script publishes with `ctx.publish`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Publish {
    /// The event type, appended to the tenant's event subject.
    pub event_type: String,
    /// The payload as JSON text.
    pub data: String,
    /// Headers the script set, as name and value pairs; `Nats-*`, `Scriptd-*` and trace context
    /// headers are refused.
    pub headers: Vec<(String, String)>,
    /// The run's publish sequence number (1, 2, ...): with the job id, the message's
    /// deduplication id.
    pub sequence: u32,
}

/// A key-value operation on the calling tenant's keys. Values are JSON text.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum KvOp {
    Get(String),
    Set(String, String),
    Delete(String),
    List { prefix: String, limit: usize },
}

impl KvOp {
    /// Carries the operation out on keys and JSON values held in memory (`scripts test`,
    /// and test backends).
    pub fn apply_in_memory(self, kv: &mut std::collections::BTreeMap<String, String>) -> KvReply {
        match self {
            KvOp::Get(key) => KvReply::Value(kv.get(&key).cloned()),
            KvOp::Set(key, value) => {
                kv.insert(key, value);
                KvReply::Done
            }
            KvOp::Delete(key) => KvReply::Deleted(kv.remove(&key).is_some()),
            KvOp::List { prefix, limit } => KvReply::Keys(
                kv.keys()
                    .filter(|k| k.starts_with(&prefix))
                    .take(limit)
                    .cloned()
                    .collect(),
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum KvReply {
    Value(Option<String>),
    Done,
    Deleted(bool),
    Keys(Vec<String>),
}

/// An HTTP request from `fetch`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchRequest {
    /// The URL to fetch: `http` or `https`, on a host of the tenant's allow list.
    pub url: String,
    /// The HTTP method, in any letter case; `GET` when the script gives none.
    pub method: String,
    /// Request headers as name and value pairs, in the order the script gave them.
    pub headers: Vec<(String, String)>,
    /// The request body; empty for none.
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
    /// Follow redirects (re-checking each target) rather than failing on them.
    pub follow_redirects: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchResponse {
    /// The HTTP status code of the final response.
    pub status: u16,
    /// The status code's standard reason phrase (`Not Found`); empty when it has none.
    pub status_text: String,
    /// The final URL, after redirects.
    pub url: String,
    /// Whether one or more redirects were followed.
    pub redirected: bool,
    /// Response headers as name and value pairs; values that are not visible ASCII are left out.
    pub headers: Vec<(String, String)>,
    /// The whole response body, at most `capabilities.fetch.max_response`.
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
}

/// Bytes as base64 text: bodies cross the engine host boundary as JSON.
mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// Why a capability call failed; becomes a JavaScript error the script can catch.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct CapError {
    /// Which error class the script sees.
    pub kind: CapErrorKind,
    /// What went wrong, naming the call (`fetch: ...`): the JavaScript error's message.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CapErrorKind {
    /// Bad arguments (`TypeError`).
    Invalid,
    /// Outside what the tenant may do: another tenant's subject, a host not allowed, a
    /// private address (`PermissionDenied`).
    Denied,
    /// A count or size limit (`LimitExceeded`).
    Limit,
    /// A request took longer than allowed (`TimeoutError`).
    Timeout,
    /// The capability is not available where the script runs (`NotSupported`).
    Unavailable,
    /// The service behind it failed: NATS, PostgreSQL, the remote host (`Error`).
    Failed,
}

impl CapErrorKind {
    /// The JavaScript error class the script sees.
    pub fn js_class(self) -> &'static str {
        match self {
            CapErrorKind::Invalid => "TypeError",
            CapErrorKind::Denied => "PermissionDenied",
            CapErrorKind::Limit => "LimitExceeded",
            CapErrorKind::Timeout => "TimeoutError",
            CapErrorKind::Unavailable => "NotSupported",
            CapErrorKind::Failed => "Error",
        }
    }
}

impl CapError {
    pub fn new(kind: CapErrorKind, message: impl Into<String>) -> CapError {
        CapError {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> CapError {
        Self::new(CapErrorKind::Invalid, message)
    }
    pub fn denied(message: impl Into<String>) -> CapError {
        Self::new(CapErrorKind::Denied, message)
    }
    pub fn limit(message: impl Into<String>) -> CapError {
        Self::new(CapErrorKind::Limit, message)
    }
    pub fn failed(message: impl Into<String>) -> CapError {
        Self::new(CapErrorKind::Failed, message)
    }
}

pub type CapResult<T> = Result<T, CapError>;

/// The services behind the script API. The engine's ops check arguments and per-run limits
/// (from [`Capabilities::config`]) before calling; implementations enforce what needs their
/// state (tenant quotas, allow lists, addresses).
pub trait Capabilities: Send + Sync + 'static {
    fn config(&self) -> &CapabilitiesConfig;
    fn publish(&self, call: Call, message: Publish) -> BoxFuture<'static, CapResult<String>>;
    fn kv(&self, call: Call, op: KvOp) -> BoxFuture<'static, CapResult<KvReply>>;
    fn fetch(
        &self,
        call: Call,
        request: FetchRequest,
    ) -> BoxFuture<'static, CapResult<FetchResponse>>;
    /// A secret's plain value; `None` if the tenant has no secret of that name.
    fn secret(&self, call: Call, name: String) -> BoxFuture<'static, CapResult<Option<String>>>;
}

/// For engines outside a daemon (benchmarks, deploy checks): every call fails clearly.
#[derive(Default)]
pub struct NoCapabilities {
    config: CapabilitiesConfig,
}

impl NoCapabilities {
    fn refuse<T: Send + 'static>(what: &str) -> BoxFuture<'static, CapResult<T>> {
        let error = CapError::new(
            CapErrorKind::Unavailable,
            format!("{what} is only available when the script runs in the daemon"),
        );
        Box::pin(async move { Err(error) })
    }
}

impl Capabilities for NoCapabilities {
    fn config(&self) -> &CapabilitiesConfig {
        &self.config
    }
    fn publish(&self, _: Call, _: Publish) -> BoxFuture<'static, CapResult<String>> {
        Self::refuse("ctx.publish")
    }
    fn kv(&self, _: Call, _: KvOp) -> BoxFuture<'static, CapResult<KvReply>> {
        Self::refuse("ctx.kv")
    }
    fn fetch(&self, _: Call, _: FetchRequest) -> BoxFuture<'static, CapResult<FetchResponse>> {
        Self::refuse("fetch")
    }
    fn secret(&self, _: Call, _: String) -> BoxFuture<'static, CapResult<Option<String>>> {
        Self::refuse("ctx.secrets")
    }
}
