//! What the daemon and an engine host process say to each other: length-delimited frames
//! of JSON on a Unix socket (fd 3 in the host). Runs go down, results come back; a script's
//! API calls come back up and their replies go down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_util::codec::LengthDelimitedCodec;

use super::sources::SourceRef;
use crate::caps::{
    CapError, CapabilitiesConfig, FetchRequest, FetchResponse, KvOp, KvReply, Publish,
};
use crate::domain::Version;
use crate::engine::{EngineConfig, Failure, Limits, LogLine, RunResult, ScriptRun, StatsSnapshot};
use crate::units::ByteSize;

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
        stats: WireStats,
    },
    /// A script API call of the run of `job`; the daemon acts as that run's tenant.
    Cap {
        call: u64,
        job: String,
        request: CapRequest,
    },
}

/// A run as its frame carries it: an array in field order (`source` null and `forget`
/// empty when there is nothing to say), since the names were most of what encoding and
/// decoding a frame cost.
#[derive(Deserialize)]
#[serde(from = "WireRunFields")]
pub struct WireRun {
    /// The tenant whose script runs.
    pub tenant: String,
    /// The script's name.
    pub script: String,
    /// The version of the script that runs.
    pub version: Version,
    /// The number the host knows the version's source by (see `sources`).
    pub source_id: u64,
    /// The source's text, when the host does not hold it yet.
    pub source: Option<String>,
    /// Sources the host drops before it takes this one.
    pub forget: Vec<u64>,
    /// The event given to the handler, as JSON text.
    pub input: Box<RawValue>,
    /// The attempt's number, 1 for the first.
    pub attempt: u32,
    /// The limits the run is held to.
    pub limits: WireLimits,
    /// The job the run belongs to (the same on every attempt).
    pub job: String,
    /// The W3C trace context passed on to what the script publishes.
    pub traceparent: Option<String>,
    /// How many script publishes led to the run's event.
    pub depth: u32,
    /// The run's `start_by` (`ScriptRun`) on the machine's monotonic clock, in microseconds:
    /// an `Instant` does not cross processes, and the time a frame waits unread in the
    /// socket behind a long run is part of the wait it bounds.
    pub start_by_us: Option<u64>,
}

/// `WireRun`'s fields in order, as they cross.
type WireRunFields = (
    String,
    String,
    Version,
    u64,
    Option<String>,
    Vec<u64>,
    Box<RawValue>,
    u32,
    WireLimits,
    String,
    Option<String>,
    u32,
    Option<u64>,
);

impl From<WireRunFields> for WireRun {
    fn from(f: WireRunFields) -> Self {
        let (
            tenant,
            script,
            version,
            source_id,
            source,
            forget,
            input,
            attempt,
            limits,
            job,
            traceparent,
            depth,
            start_by_us,
        ) = f;
        WireRun {
            tenant,
            script,
            version,
            source_id,
            source,
            forget,
            input,
            attempt,
            limits,
            job,
            traceparent,
            depth,
            start_by_us,
        }
    }
}

impl Serialize for WireRun {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (
            &self.tenant,
            &self.script,
            &self.version,
            self.source_id,
            &self.source,
            &self.forget,
            &self.input,
            self.attempt,
            &self.limits,
            &self.job,
            &self.traceparent,
            self.depth,
            self.start_by_us,
        )
            .serialize(serializer)
    }
}

impl WireRun {
    /// The run as its frame carries it; its source is filled in when a host is chosen
    /// (`with_source`), since what a host holds differs between hosts.
    pub fn of(r: &ScriptRun) -> Self {
        WireRun {
            tenant: r.tenant.clone(),
            script: r.script.clone(),
            version: r.version,
            source_id: 0,
            source: None,
            forget: Vec::new(),
            input: r.input.clone(),
            attempt: r.attempt,
            limits: r.limits.into(),
            job: r.job.clone(),
            traceparent: r.traceparent.clone(),
            depth: r.depth,
            start_by_us: r.start_by.map(|by| {
                let left = by.saturating_duration_since(Instant::now());
                monotonic_us().saturating_add(micros(left))
            }),
        }
    }

    /// Carries `source` as the host it goes to is to take it.
    pub fn with_source(&mut self, source: SourceRef) {
        self.source_id = source.id;
        self.source = source.text;
        self.forget = source.forget;
    }

    /// How the frame carries its source (the host's side).
    pub fn source_ref(&mut self) -> SourceRef {
        SourceRef {
            id: self.source_id,
            text: self.source.take(),
            forget: std::mem::take(&mut self.forget),
        }
    }

    /// The run, with the source the host found for it.
    pub fn into_run(self, source: Arc<str>) -> ScriptRun {
        ScriptRun {
            tenant: self.tenant,
            script: self.script,
            version: self.version,
            source,
            input: self.input,
            attempt: self.attempt,
            limits: self.limits.into(),
            job: self.job,
            traceparent: self.traceparent,
            depth: self.depth,
            start_by: self.start_by_us.map(|by| {
                let left = by.saturating_sub(monotonic_us());
                Instant::now() + Duration::from_micros(left)
            }),
        }
    }
}

/// Now on the machine's monotonic clock (`CLOCK_MONOTONIC`, shared by its processes), in
/// microseconds.
fn monotonic_us() -> u64 {
    micros(crate::engine::watchdog::clock_reading(libc::CLOCK_MONOTONIC).unwrap_or_default())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A run's limits as plain numbers. Their configuration form (`"5s"`, `"64MiB"`) cost a
/// formatted string each on the way out and a parse each on the way in, on every run. They
/// cross as an array in field order: named, their keys were most of their cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "[u64; 6]", from = "[u64; 6]")]
pub struct WireLimits {
    timeout_us: u64,
    heap: u64,
    source: u64,
    result: u64,
    logs: u64,
    cpu_time_us: u64,
}

impl From<Limits> for WireLimits {
    fn from(l: Limits) -> Self {
        WireLimits {
            timeout_us: micros(l.timeout),
            heap: l.heap.0,
            source: l.source.0,
            result: l.result.0,
            logs: l.logs.0,
            cpu_time_us: micros(l.cpu_time),
        }
    }
}

impl From<WireLimits> for [u64; 6] {
    fn from(w: WireLimits) -> Self {
        [
            w.timeout_us,
            w.heap,
            w.source,
            w.result,
            w.logs,
            w.cpu_time_us,
        ]
    }
}

impl From<[u64; 6]> for WireLimits {
    fn from([timeout_us, heap, source, result, logs, cpu_time_us]: [u64; 6]) -> Self {
        WireLimits {
            timeout_us,
            heap,
            source,
            result,
            logs,
            cpu_time_us,
        }
    }
}

/// The engine's counters as every result carries them: an array in `StatsSnapshot`'s field
/// order. Named, they were ten of a result frame's ~25 keys, and decoding the frames was
/// the largest single cost of a run in the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireStats([u64; 10]);

impl From<StatsSnapshot> for WireStats {
    fn from(s: StatsSnapshot) -> Self {
        WireStats([
            s.runs,
            s.cold_starts,
            s.warm_hits,
            s.evictions,
            s.discarded,
            s.warm_isolates,
            s.in_flight,
            s.host_recycles,
            s.host_crashes,
            s.host_kills,
        ])
    }
}

impl From<WireStats> for StatsSnapshot {
    fn from(WireStats(s): WireStats) -> Self {
        let [runs, cold_starts, warm_hits, evictions, discarded, warm_isolates, in_flight, host_recycles, host_crashes, host_kills] =
            s;
        StatsSnapshot {
            runs,
            cold_starts,
            warm_hits,
            evictions,
            discarded,
            warm_isolates,
            in_flight,
            host_recycles,
            host_crashes,
            host_kills,
        }
    }
}

impl From<WireLimits> for Limits {
    fn from(w: WireLimits) -> Self {
        Limits {
            timeout: Duration::from_micros(w.timeout_us),
            heap: ByteSize(w.heap),
            source: ByteSize(w.source),
            result: ByteSize(w.result),
            logs: ByteSize(w.logs),
            cpu_time: Duration::from_micros(w.cpu_time_us),
        }
    }
}

/// A run's result as its frame carries it: an array in field order, as `WireRun`.
#[derive(Deserialize)]
#[serde(from = "WireResultFields")]
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

/// `WireResult`'s fields in order, as they cross.
type WireResultFields = (
    Result<serde_json::Value, Failure>,
    Vec<LogLine>,
    bool,
    u64,
    bool,
);

impl From<WireResultFields> for WireResult {
    fn from((outcome, logs, logs_truncated, duration_us, cold_start): WireResultFields) -> Self {
        WireResult {
            outcome,
            logs,
            logs_truncated,
            duration_us,
            cold_start,
        }
    }
}

impl Serialize for WireResult {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (
            &self.outcome,
            &self.logs,
            self.logs_truncated,
            self.duration_us,
            self.cold_start,
        )
            .serialize(serializer)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_cross_the_socket_unchanged() {
        let limits = Limits {
            timeout: Duration::from_millis(2_500),
            heap: ByteSize::mib(48),
            source: ByteSize::kib(100),
            result: ByteSize(12_345),
            logs: ByteSize::kib(64),
            cpu_time: Duration::from_micros(1_234_567),
        };
        let wire = serde_json::to_string(&WireLimits::from(limits)).unwrap();
        let back: WireLimits = serde_json::from_str(&wire).unwrap();
        let back = Limits::from(back);
        assert_eq!(back.timeout, limits.timeout);
        assert_eq!(back.cpu_time, limits.cpu_time);
        assert_eq!(
            (back.heap, back.source, back.result, back.logs),
            (limits.heap, limits.source, limits.result, limits.logs)
        );
    }

    #[test]
    fn a_runs_start_by_crosses_as_the_same_moment() {
        let mut run = ScriptRun::new(
            "acme",
            "orders",
            Version::new(1),
            "export default () => 1",
            &serde_json::Value::Null,
            Limits::default(),
        );
        let wire = WireRun::of(&run);
        assert_eq!(wire.start_by_us, None);
        assert_eq!(wire.into_run("x".into()).start_by, None);

        let by = Instant::now() + Duration::from_secs(2);
        run.start_by = Some(by);
        let there = WireRun::of(&run).into_run("x".into()).start_by.unwrap();
        let apart = if there > by { there - by } else { by - there };
        assert!(apart < Duration::from_millis(50), "{apart:?} apart");

        // A moment already past stays past.
        run.start_by = Some(Instant::now());
        let there = WireRun::of(&run).into_run("x".into()).start_by.unwrap();
        assert!(there <= Instant::now());
    }

    /// The fields of a run frame, comparable.
    fn fields(r: &WireRun) -> String {
        format!(
            "{} {} {} {} {:?} {:?} {} {} {:?} {} {:?} {} {:?}",
            r.tenant,
            r.script,
            r.version.get(),
            r.source_id,
            r.source,
            r.forget,
            r.input.get(),
            r.attempt,
            r.limits,
            r.job,
            r.traceparent,
            r.depth,
            r.start_by_us
        )
    }

    #[test]
    fn runs_and_results_cross_the_socket_unchanged() {
        let run = |source: Option<&str>, forget: Vec<u64>, traceparent: Option<&str>| WireRun {
            start_by_us: traceparent.map(|_| 123_456_789),
            tenant: "acme".into(),
            script: "orders".into(),
            version: Version::new(3),
            source_id: 7,
            source: source.map(Into::into),
            forget,
            input: RawValue::from_string(r#"{"n":[1,"two"]}"#.into()).unwrap(),
            attempt: 2,
            limits: WireLimits::from(Limits::default()),
            job: "ev-S-1-9".into(),
            traceparent: traceparent.map(Into::into),
            depth: 1,
        };
        for sent in [
            run(Some("export default () => 1"), vec![3, 4], Some("00-ab-01")),
            run(None, vec![], None),
        ] {
            let expected = fields(&sent);
            let frame = serde_json::to_vec(&ToHost::Run {
                id: 11,
                run: sent,
                validate_only: true,
            })
            .unwrap();
            let Ok(ToHost::Run {
                id,
                run: got,
                validate_only,
            }) = serde_json::from_slice(&frame)
            else {
                panic!("not a run frame: {}", String::from_utf8_lossy(&frame));
            };
            assert_eq!((id, validate_only), (11, true));
            assert_eq!(fields(&got), expected);
        }

        let log = LogLine {
            level: "warn".into(),
            message: "careful".into(),
        };
        for outcome in [
            Ok(serde_json::json!({ "total": 42, "items": [1, 2] })),
            Err(Failure {
                kind: crate::engine::FailureKind::Timeout,
                message: "too slow".into(),
                stack: Some("at x".into()),
                retryable: true,
            }),
        ] {
            let sent = WireResult {
                outcome,
                logs: vec![log.clone()],
                logs_truncated: true,
                duration_us: 1234,
                cold_start: true,
            };
            let frame = serde_json::to_vec(&sent).unwrap();
            let got: WireResult = serde_json::from_slice(&frame).unwrap();
            assert_eq!(got.outcome, sent.outcome);
            assert_eq!(got.logs, sent.logs);
            assert_eq!(
                (got.logs_truncated, got.duration_us, got.cold_start),
                (true, 1234, true)
            );
        }
    }

    #[test]
    fn counters_cross_the_socket_unchanged() {
        let stats = StatsSnapshot {
            runs: 1,
            cold_starts: 2,
            warm_hits: 3,
            evictions: 4,
            discarded: 5,
            warm_isolates: 6,
            in_flight: 7,
            host_recycles: 8,
            host_crashes: 9,
            host_kills: 10,
        };
        let wire = serde_json::to_string(&WireStats::from(stats)).unwrap();
        assert_eq!(wire, "[1,2,3,4,5,6,7,8,9,10]");
        let back: WireStats = serde_json::from_str(&wire).unwrap();
        assert_eq!(StatsSnapshot::from(back), stats);
    }
}
