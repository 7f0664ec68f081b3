//! What the daemon and an engine host process say to each other: length-delimited frames
//! of JSON on a Unix socket (fd 3 in the host). Runs go down, results come back; a script's
//! API calls come back up and their replies go down.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_util::codec::LengthDelimitedCodec;

use crate::caps::{
    CapError, CapabilitiesConfig, FetchRequest, FetchResponse, KvOp, KvReply, Publish,
};
use crate::domain::Version;
use crate::engine::{EngineConfig, Failure, Limits, LogLine, RunResult, ScriptRun, StatsSnapshot};

/// The host's end of the socket.
pub const HOST_FD: i32 = 3;

/// Frames up to this size: results, sources and fetch bodies are bounded well below it.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(256 * 1024 * 1024)
        .new_codec()
}

/// Writes `first` and whatever else is already queued behind it, then flushes: frames that
/// pile up while a write is under way leave in one system call, not one each.
pub async fn send_queued<T, W>(
    sink: &mut tokio_util::codec::FramedWrite<W, LengthDelimitedCodec>,
    first: T,
    queue: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
) -> std::io::Result<()>
where
    T: Serialize,
    W: tokio::io::AsyncWrite + Unpin,
{
    use futures::SinkExt;
    let mut next = Some(first);
    let mut sent = 0;
    while let Some(frame) = next.take() {
        if let Ok(bytes) = serde_json::to_vec(&frame) {
            sink.feed(bytes::Bytes::from(bytes)).await?;
        }
        sent += 1;
        if sent < 64 {
            next = queue.try_recv().ok();
        }
    }
    SinkExt::<bytes::Bytes>::flush(sink).await
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToHost {
    /// First frame: how to run the engine and what the script API allows.
    Init {
        engine: EngineConfig,
        caps: CapabilitiesConfig,
    },
    Run {
        id: u64,
        run: WireRun,
        validate_only: bool,
    },
    CapReply {
        call: u64,
        reply: Result<CapValue, CapError>,
    },
    /// Take no more runs; exit once those in flight are done.
    Drain,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromHost {
    Ready {
        pid: u32,
        /// The system calls the host tried once confined and saw refused with EPERM.
        refused: Vec<String>,
    },
    Done {
        id: u64,
        result: WireResult,
        stats: StatsSnapshot,
    },
    /// A script API call of the run of `job`; the daemon acts as that run's tenant.
    Cap {
        call: u64,
        job: String,
        request: CapRequest,
    },
}

#[derive(Serialize, Deserialize)]
pub struct WireRun {
    /// The tenant whose script runs.
    pub tenant: String,
    /// The script's name.
    pub script: String,
    /// The version of the script that runs.
    pub version: Version,
    /// The version's source.
    pub source: String,
    /// The event given to the handler, as JSON text.
    pub input: Box<RawValue>,
    /// The attempt's number, 1 for the first.
    pub attempt: u32,
    /// The limits the run is held to.
    pub limits: Limits,
    /// The job the run belongs to (the same on every attempt).
    pub job: String,
    /// The W3C trace context passed on to what the script publishes.
    pub traceparent: Option<String>,
    /// How many script publishes led to the run's event.
    pub depth: u32,
}

impl From<&ScriptRun> for WireRun {
    fn from(r: &ScriptRun) -> Self {
        WireRun {
            tenant: r.tenant.clone(),
            script: r.script.clone(),
            version: r.version,
            source: r.source.to_string(),
            input: r.input.clone(),
            attempt: r.attempt,
            limits: r.limits,
            job: r.job.clone(),
            traceparent: r.traceparent.clone(),
            depth: r.depth,
        }
    }
}

impl From<WireRun> for ScriptRun {
    fn from(w: WireRun) -> Self {
        ScriptRun {
            tenant: w.tenant,
            script: w.script,
            version: w.version,
            source: w.source.into(),
            input: w.input,
            attempt: w.attempt,
            limits: w.limits,
            job: w.job,
            traceparent: w.traceparent,
            depth: w.depth,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct WireResult {
    /// The handler's return value as JSON, or why there is none.
    pub outcome: Result<serde_json::Value, Failure>,
    /// The run's captured console output.
    pub logs: Vec<LogLine>,
    /// Whether the log limit cut the output.
    pub logs_truncated: bool,
    /// How long the run took in the host, microseconds.
    pub duration_us: u64,
    /// Whether a new isolate was created for the run.
    pub cold_start: bool,
}

impl From<RunResult> for WireResult {
    fn from(r: RunResult) -> Self {
        WireResult {
            outcome: r.outcome,
            logs: r.logs,
            logs_truncated: r.logs_truncated,
            duration_us: r.duration.as_micros() as u64,
            cold_start: r.cold_start,
        }
    }
}

impl From<WireResult> for RunResult {
    fn from(w: WireResult) -> Self {
        RunResult {
            outcome: w.outcome,
            logs: w.logs,
            logs_truncated: w.logs_truncated,
            duration: Duration::from_micros(w.duration_us),
            cold_start: w.cold_start,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapRequest {
    Publish(Publish),
    Kv(KvOp),
    Fetch(FetchRequest),
    Secret(String),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapValue {
    Published(String),
    Kv(KvReply),
    Fetched(FetchResponse),
    Secret(Option<String>),
}
