//! The three JetStream streams: each one's settings (`[nats.streams.events]`, `.jobs`,
//! `.dlq`: replicas, storage, age and size limits) and making JetStream hold them.

use std::time::Duration;

use async_nats::jetstream::{self, context, stream};
use serde::{Deserialize, Serialize};

use super::error::{patiently, BusError, Doing, Result};
use super::NatsConfig;
use crate::units::{opt_duration_str, ByteSize};

/// Where a stream keeps its messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk: survives a server restart.
    #[default]
    File,
    /// In memory: faster, lost when the server (or, at replicas 1, its node) restarts.
    Memory,
}

/// One stream's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Copies kept in a JetStream cluster: 1, or 3 (or 5) to survive the loss of 1 (or 2)
    /// nodes; at most the cluster's size.
    pub replicas: usize,
    /// `file` or `memory`. JetStream cannot change it on an existing stream.
    pub storage: Storage,
    /// How long a message is kept at most; unset: `nats.max_age` for events and jobs,
    /// forever for dead letters.
    #[serde(with = "opt_duration_str", skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// Bytes the stream may hold; 0 for no limit. A full stream refuses new messages
    /// (discard new) rather than dropping kept ones: publishers get an error and retry.
    pub max_bytes: ByteSize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            replicas: 1,
            storage: Storage::File,
            max_age: None,
            max_bytes: ByteSize(0),
        }
    }
}

/// The three streams' settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Streams {
    pub events: StreamSettings,
    pub jobs: StreamSettings,
    pub dlq: StreamSettings,
}

impl StreamSettings {
    /// Applies these settings to `config`; `default_age` when none is set (zero: forever).
    pub fn apply(&self, config: &mut stream::Config, default_age: Duration) {
        config.num_replicas = self.replicas.max(1);
        config.storage = match self.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        };
        config.max_age = self.max_age.unwrap_or(default_age);
        if self.max_bytes.0 > 0 {
            config.max_bytes = i64::try_from(self.max_bytes.0).unwrap_or(i64::MAX);
            config.discard = stream::DiscardPolicy::New;
        } else {
            config.max_bytes = -1;
        }
    }
}

/// The three streams, created or updated to this configuration. While JetStream cannot
/// answer yet (no meta leader, no responders, a request timing out) each stream is tried
/// again, with a warning, for up to a minute.
pub async fn ensure_streams(js: &jetstream::Context, config: &NatsConfig) -> Result<()> {
    let streams = [
        (
            config.events_stream(),
            format!("{}.>", config.events_prefix),
            "Domain events, by tenant",
        ),
        (
            config.jobs_stream(),
            format!("{}.>", config.jobs_prefix),
            "One script run each",
        ),
        (
            config.dlq_stream(),
            format!("{}.>", config.dlq_prefix),
            "Runs that exhausted their retries",
        ),
    ];
    for (name, subject, description) in streams {
        // Jobs are a work queue: a job leaves the stream when it is acknowledged, which lets
        // each tenant have its own consumer (see `lanes`).
        let retention = if name == config.jobs_stream() {
            stream::RetentionPolicy::WorkQueue
        } else {
            stream::RetentionPolicy::Limits
        };
        let mut wanted = stream::Config {
            name: name.clone(),
            subjects: vec![subject],
            description: Some(description.into()),
            retention,
            duplicate_window: config.duplicate_window,
            allow_direct: true,
            ..Default::default()
        };
        let (settings, default_age) = if name == config.events_stream() {
            (&config.streams.events, config.max_age)
        } else if name == config.jobs_stream() {
            (&config.streams.jobs, config.max_age)
        } else {
            (&config.streams.dlq, Duration::ZERO)
        };
        settings.apply(&mut wanted, default_age);
        patiently(&format!("stream {name}"), || ensure_stream(js, &wanted)).await?;
    }
    Ok(())
}

/// One stream, created, or checked and updated.
async fn ensure_stream(js: &jetstream::Context, wanted: &stream::Config) -> Result<()> {
    let name = &wanted.name;
    let mut existing = match js.get_stream(name).await {
        Ok(existing) => existing,
        Err(e)
            if matches!(e.kind(), context::GetStreamErrorKind::JetStream(ref j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            js.create_stream(wanted.clone())
                .await
                .doing(|| format!("creating stream {name}"))?;
            return Ok(());
        }
        Err(e) => return Err(e).doing(|| format!("looking up stream {name}")),
    };
    let found = &existing
        .info()
        .await
        .doing(|| format!("reading stream {name}"))?
        .config;
    if found.retention != wanted.retention {
        return Err(BusError::Stream(format!(
            "stream {name} has {:?} retention, this scriptd needs {:?}: it was made by an \
             earlier scriptd. Stop every replica, let them finish their jobs, delete the \
             stream (nats stream rm {name}) and start again",
            found.retention, wanted.retention
        )));
    }
    if found.storage != wanted.storage {
        return Err(BusError::Stream(format!(
            "stream {name} keeps its messages in {:?} storage and the settings ask for {:?}: \
             JetStream cannot change that in place. Keep the setting, or drain the stream, \
             delete it (nats stream rm {name}) and start again",
            found.storage, wanted.storage
        )));
    }
    js.update_stream(wanted)
        .await
        .doing(|| format!("updating stream {name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_the_stream_config() {
        let settings: Streams = toml::from_str(
            "[events]\nreplicas = 3\nmax_bytes = \"1GiB\"\n[dlq]\nstorage = \"memory\"\nmax_age = \"30days\"",
        )
        .unwrap();
        let mut events = stream::Config::default();
        settings.events.apply(&mut events, Duration::from_secs(60));
        assert_eq!(events.num_replicas, 3);
        assert_eq!(events.max_bytes, 1 << 30);
        assert_eq!(events.discard, stream::DiscardPolicy::New);
        assert_eq!(events.max_age, Duration::from_secs(60));
        let mut dlq = stream::Config::default();
        settings.dlq.apply(&mut dlq, Duration::ZERO);
        assert_eq!(dlq.storage, stream::StorageType::Memory);
        assert_eq!(dlq.max_age, Duration::from_secs(30 * 86400));
        assert_eq!(dlq.max_bytes, -1);
        assert_eq!(settings.jobs, StreamSettings::default());
    }
}
