//! The daemon's HTTP endpoint for probes and scrapers: `/healthz` (the process answers),
//! `/readyz` (NATS and PostgreSQL reachable, streams present, script index loaded, no task
//! stopped unexpectedly) and
//! `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::Metrics;
use crate::store::Store;

/// How long one readiness check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What readiness depends on, filled in as the daemon starts.
#[derive(Default)]
pub struct Readiness {
    parts: OnceLock<Parts>,
    index_loaded: AtomicBool,
    /// Set once the daemon's consumers are pulling and its metrics are registered.
    consuming: AtomicBool,
    /// The first of the daemon's tasks that stopped unexpectedly: not ready from then on.
    task_failure: OnceLock<String>,
}

struct Parts {
    nats: async_nats::Client,
    js: jetstream::Context,
    store: Store,
    streams: Vec<String>,
}

impl Readiness {
    pub fn attach(
        &self,
        nats: async_nats::Client,
        js: jetstream::Context,
        store: Store,
        streams: Vec<String>,
    ) {
        let _ = self.parts.set(Parts {
            nats,
            js,
            store,
            streams,
        });
    }

    pub fn index_loaded(&self) {
        self.index_loaded.store(true, Ordering::SeqCst);
    }

    /// Every task runs: the consumers pull, the ticker ticks, `/metrics` has its families.
    pub fn consuming(&self) {
        self.consuming.store(true, Ordering::SeqCst);
    }

    /// A daemon task stopped unexpectedly: the daemon is shutting down and not ready.
    pub fn task_failed(&self, what: String) {
        let _ = self.task_failure.set(what);
    }

    /// Whether the daemon can do its work, and each check's finding.
    pub async fn check(&self) -> (bool, serde_json::Value) {
        let mut checks = serde_json::Map::new();
        let mut ready = true;
        let mut note = |name: &str, outcome: Result<(), String>| {
            ready &= outcome.is_ok();
            let value = match outcome {
                Ok(()) => "ok".to_owned(),
                Err(why) => why,
            };
            checks.insert(name.to_owned(), value.into());
        };
        if let Some(failure) = self.task_failure.get() {
            note("tasks", Err(failure.clone()));
        }
        let Some(parts) = self.parts.get() else {
            note("startup", Err("connecting to NATS and PostgreSQL".into()));
            return (false, checks.into());
        };
        let nats_up = parts.nats.connection_state() == async_nats::connection::State::Connected;
        note(
            "nats",
            if nats_up {
                Ok(())
            } else {
                Err(format!("{}", parts.nats.connection_state()))
            },
        );
        let postgres = tokio::time::timeout(CHECK_TIMEOUT, async {
            let client = parts.store.client().await.map_err(|e| format!("{e:#}"))?;
            client
                .simple_query("SELECT 1")
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err("no answer within 2s".into()));
        note("postgres", postgres);
        let streams = if nats_up {
            let mut missing = Vec::new();
            for name in &parts.streams {
                let found = tokio::time::timeout(CHECK_TIMEOUT, parts.js.get_stream(name)).await;
                if !matches!(found, Ok(Ok(_))) {
                    missing.push(name.clone());
                }
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing or unreachable: {}", missing.join(", ")))
            }
        } else {
            Err("NATS is not connected".into())
        };
        note("streams", streams);
        let done = |flag: &AtomicBool, not_yet: &str| match flag.load(Ordering::SeqCst) {
            true => Ok(()),
            false => Err(not_yet.to_owned()),
        };
        note("script_index", done(&self.index_loaded, "not loaded yet"));
        note("consumers", done(&self.consuming, "not consuming yet"));
        (ready, checks.into())
    }
}

/// Binds `listen` and serves until `stop`; returns the bound address (useful with port 0).
pub async fn serve(
    listen: &str,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding telemetry.listen {listen}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            let Ok((socket, _)) = accepted else { continue };
            let (readiness, metrics) = (readiness.clone(), metrics.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    respond(request, readiness.clone(), metrics.clone())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

async fn respond(
    request: Request<Incoming>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if request.method() != hyper::Method::GET {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ));
    }
    Ok(match request.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let (ready, checks) = readiness.check().await;
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({ "ready": ready, "checks": checks });
            reply(status, "application/json", format!("{body}\n"))
        }
        "/metrics" => match metrics.render() {
            Ok(text) => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            ),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e:#}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    })
}
