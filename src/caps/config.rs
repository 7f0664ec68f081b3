//! Settings of the script API (the `[capabilities]` table): per-run counts, sizes, tenant
//! quotas, fetch's network policy and the secrets key.

use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::units::{duration_str, ByteSize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapabilitiesConfig {
    /// What `ctx.publish` may send (`[capabilities.publish]`).
    pub publish: PublishConfig,
    /// What `ctx.kv` may store and do (`[capabilities.kv]`).
    pub kv: KvConfig,
    /// What `fetch` may request and reach (`[capabilities.fetch]`).
    pub fetch: FetchConfig,
    /// The key tenant secrets are encrypted with (`[capabilities.secrets]`).
    pub secrets: SecretsConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// Messages one run may publish.
    pub max_per_run: u32,
    /// Size of one message's payload (JSON text).
    pub max_size: ByteSize,
    /// How long a chain of script-published events may grow (an event published by a run
    /// handling a published event is one step deeper); stops scripts triggering each other
    /// forever.
    pub max_chain_depth: u32,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            max_per_run: 100,
            max_size: ByteSize::kib(256),
            max_chain_depth: 16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvConfig {
    /// Length of a key in bytes.
    pub max_key: usize,
    /// Size of one value as JSON text.
    pub max_value: ByteSize,
    /// Keys plus values of one tenant.
    pub max_per_tenant: ByteSize,
    /// get/set/delete/list calls one run may make.
    pub max_ops_per_run: u32,
    /// Most keys one `list` returns.
    pub max_list: usize,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            max_key: 512,
            max_value: ByteSize::kib(64),
            max_per_tenant: ByteSize::mib(10),
            max_ops_per_run: 1000,
            max_list: 1000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Requests one run may make (each redirect followed counts).
    pub max_per_run: u32,
    /// Time for one request, response body included; never past the run's own limit.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// Response bodies larger than this are refused after reading this much.
    pub max_response: ByteSize,
    /// Largest request body a script may send.
    pub max_request_body: ByteSize,
    /// Redirects followed for one request before it fails.
    pub max_redirects: u32,
    /// Private, loopback, link-local and other non-public networks (CIDR) that fetch may
    /// reach anyway. Empty by default: only public addresses.
    pub allow_private: Vec<IpNet>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_per_run: 20,
            timeout: Duration::from_secs(10),
            max_response: ByteSize::mib(10),
            max_request_body: ByteSize::mib(1),
            max_redirects: 5,
            allow_private: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// The key encrypting secrets at rest: 32 bytes, base64. Prefer `key_file` or the
    /// `SCRIPTD_CAPABILITIES__SECRETS__KEY` variable to writing it in a file under version
    /// control.
    pub key: String,
    /// A file holding the key (base64), read at start.
    pub key_file: String,
}
