//! An OTLP/HTTP receiver on 127.0.0.1 for telemetry tests: accepts JSON-encoded exports and
//! keeps the spans and the names of the metrics it was sent.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One received span: its ids, name and string/int attributes.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

pub struct Collector {
    pub port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
    metrics: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let metrics = Arc::new(Mutex::new(BTreeSet::new()));
        let (their_spans, their_metrics) = (spans.clone(), metrics.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let spans = their_spans.clone();
                let metrics = their_metrics.clone();
                tokio::spawn(async move {
                    // Keep-alive: several requests may come on one connection.
                    let mut pending = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match socket.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => pending.extend_from_slice(&buf[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .filter_map(|l| l.strip_prefix("content-length:"))
                            .find_map(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while pending.len() < end + 4 + length {
                            match socket.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => pending.extend_from_slice(&buf[..n]),
                            }
                        }
                        let body: Vec<u8> =
                            pending.drain(..end + 4 + length).skip(end + 4).collect();
                        let export = serde_json::from_slice::<serde_json::Value>(&body);
                        if let Ok(export) = export {
                            if head.starts_with("post /v1/traces") {
                                spans.lock().unwrap().extend(spans_of(&export));
                            } else if head.starts_with("post /v1/metrics") {
                                metrics.lock().unwrap().extend(metric_names(&export));
                            }
                        }
                        let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                        if socket.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Collector {
            port,
            spans,
            metrics,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// The names of every metric exported so far.
    pub fn metric_names(&self) -> BTreeSet<String> {
        self.metrics.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn list(v: &serde_json::Value, k: &str) -> Vec<serde_json::Value> {
    v[k].as_array().cloned().unwrap_or_default()
}

fn metric_names(export: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for resource in list(export, "resourceMetrics") {
        for scope in list(&resource, "scopeMetrics") {
            for metric in list(&scope, "metrics") {
                out.extend(metric["name"].as_str().map(str::to_owned));
            }
        }
    }
    out
}

fn spans_of(export: &serde_json::Value) -> Vec<Span> {
    let mut out = Vec::new();
    for resource in list(export, "resourceSpans") {
        for scope in list(&resource, "scopeSpans") {
            for span in list(&scope, "spans") {
                let mut attributes = serde_json::Map::new();
                for attribute in list(&span, "attributes") {
                    let value = &attribute["value"];
                    let value = value
                        .get("stringValue")
                        .or_else(|| value.get("intValue"))
                        .cloned()
                        .unwrap_or_default();
                    attributes.insert(attribute["key"].as_str().unwrap_or("").to_owned(), value);
                }
                let text = |k: &str| span[k].as_str().unwrap_or("").to_ascii_lowercase();
                out.push(Span {
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent_span_id: text("parentSpanId"),
                    name: text("name"),
                    attributes,
                });
            }
        }
    }
    out
}
