//! Jobs: one script run each, with a deterministic id so a redelivered event (or a cron
//! tick seen by several replicas) becomes one job. Also the event object scripts receive.

use async_nats::HeaderMap;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::domain::{Trigger, Version};

/// The payload of a job message.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    /// Also the message's `Nats-Msg-Id`.
    pub id: String,
    /// The tenant whose script runs.
    pub tenant: String,
    /// The script's name.
    pub script: String,
    /// What made the job.
    pub trigger: Trigger,
    /// The NATS subject that triggered the job, for event jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The event's id (its `Nats-Msg-Id`, or stream and sequence), for event jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The first argument of the handler.
    pub event: Box<RawValue>,
    /// Run this version rather than the current one (replays pinned to a version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    /// The occurrence a schedule job stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Where the input lives: the event's stream and sequence (`SCRIPTD_EVENTS:42`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_ref: Option<String>,
    /// A missed occurrence run after downtime: it waits for the schedule's running job
    /// instead of being skipped as an overlap.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catch_up: bool,
}

/// The job id of an event fanned out to a script: the event's place in its stream and the
/// script's id, so fanning the same event out again yields the same ids.
pub fn event_job_id(stream: &str, sequence: u64, script_id: i64) -> String {
    format!("ev-{stream}-{sequence}-{script_id}")
}

/// The handler's view of an event.
#[derive(Serialize)]
pub struct EventView<'a> {
    /// The event's id: its `Nats-Msg-Id`, else `<stream>-<sequence>`; the same on every redelivery.
    pub id: &'a str,
    /// The full NATS subject.
    pub subject: &'a str,
    /// The tenant-relative type (`order.created` for subject `events.acme.order.created`).
    #[serde(rename = "type")]
    pub event_type: &'a str,
    /// The tenant the event belongs to (always the script's own).
    pub tenant: &'a str,
    /// The payload: parsed JSON; other UTF-8 as a string; other bytes as base64 (see `encoding`).
    pub data: &'a RawValue,
    /// `json` when the payload was JSON, `text` when it was other UTF-8 (then `data` is a
    /// string), `base64` when it was not UTF-8 (then `data` is its base64).
    pub encoding: &'static str,
    /// The message's NATS headers (the first value of each), JetStream's own `Nats-*` left out.
    pub headers: serde_json::Map<String, serde_json::Value>,
    /// When JetStream stored the event, RFC 3339.
    pub time: String,
}

/// The payload as JSON for `data`, and how it was encoded.
pub fn payload_as_json(payload: &[u8]) -> (Box<RawValue>, &'static str) {
    if let Ok(text) = std::str::from_utf8(payload) {
        if let Ok(raw) = serde_json::from_str::<Box<RawValue>>(text) {
            return (raw, "json");
        }
        let quoted = serde_json::to_string(text).expect("a string serialises");
        return (RawValue::from_string(quoted).expect("valid JSON"), "text");
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
    let quoted = serde_json::to_string(&encoded).expect("a string serialises");
    (RawValue::from_string(quoted).expect("valid JSON"), "base64")
}

/// NATS headers as a JSON object (first value of each name), without JetStream's own.
pub fn headers_as_json(headers: Option<&HeaderMap>) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            if name.starts_with("Nats-") {
                continue;
            }
            if let Some(value) = values.first() {
                out.insert(
                    name.to_owned(),
                    serde_json::Value::String(value.to_string()),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_keep_their_content_in_every_encoding() {
        let (raw, enc) = payload_as_json(br#"{"id": 1}"#);
        assert_eq!((raw.get(), enc), (r#"{"id": 1}"#, "json"));
        let (raw, enc) = payload_as_json(b"plain \"text\"");
        assert_eq!((raw.get(), enc), (r#""plain \"text\"""#, "text"));
        let (raw, enc) = payload_as_json(&[0xff, 0xfe, 0x00]);
        assert_eq!((raw.get(), enc), ("\"//4A\"", "base64"));
        let (raw, enc) = payload_as_json(b"");
        assert_eq!((raw.get(), enc), ("\"\"", "text"));
    }

    #[test]
    fn job_ids_are_deterministic() {
        assert_eq!(
            event_job_id("S_EVENTS", 7, 3),
            event_job_id("S_EVENTS", 7, 3)
        );
        assert_ne!(
            event_job_id("S_EVENTS", 7, 3),
            event_job_id("S_EVENTS", 7, 4)
        );
    }
}
