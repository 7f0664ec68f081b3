//! `scriptd run`, `migrate` and `events publish`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::observe::metrics::Metrics;
use crate::store::Store;
use crate::subject;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The tenant the event belongs to.
    pub tenant: String,
    /// Tenant-relative event type, e.g. order.created.
    #[arg(value_name = "TYPE")]
    pub event_type: String,
    /// The payload, JSON unless --raw; @FILE reads it from a file.
    pub payload: String,
    /// Publish the payload as it is, JSON or not (scripts then see text or base64 in
    /// `event.data`, with `event.encoding` saying which).
    #[arg(long)]
    pub raw: bool,
    /// A header, `Name=value`; repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected Name=value, got {s:?}"))
}

/// Runs the daemon until SIGTERM or SIGINT, reporting to `metrics`.
pub async fn run_daemon(settings: Settings, metrics: Arc<Metrics>) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    crate::daemon::run(settings, shutdown, metrics).await?;
    Ok(ExitCode::SUCCESS)
}

/// Cancels `token` on the first SIGTERM or SIGINT.
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    token.cancel();
}

pub async fn migrate(settings: &Settings) -> anyhow::Result<ExitCode> {
    let applied = Store::migrate(&settings.database).await?;
    if applied.is_empty() {
        println!("database is up to date");
    }
    for name in applied {
        println!("applied {name}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn publish(settings: &Settings, args: PublishArgs) -> anyhow::Result<ExitCode> {
    subject::validate_name("tenant", &args.tenant)?;
    subject::validate_event_type(&args.event_type)?;
    let payload = match args.payload.strip_prefix('@') {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {path}"))?,
        None => args.payload.into_bytes(),
    };
    if !args.raw {
        // Scripts would see a string where they expect an object: refused before it
        // reaches anyone.
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&payload) {
            anyhow::bail!(
                "the payload is not JSON ({e}); fix it, or publish it as it is with --raw"
            );
        }
    }
    let client = async_nats::connect(settings.nats.servers())
        .await
        .with_context(|| format!("connecting to NATS at {}", settings.nats.url))?;
    let js = async_nats::jetstream::new(client);
    let mut headers = HeaderMap::new();
    for (name, value) in &args.headers {
        headers.insert(name.as_str(), value.as_str());
    }
    let subject = format!(
        "{}.{}.{}",
        settings.nats.events_prefix, args.tenant, args.event_type
    );
    let ack = js
        .publish_with_headers(subject.clone(), headers, Bytes::from(payload))
        .await?
        .await
        .with_context(|| {
            format!("no stream stored {subject}: is the daemon's events stream created (run `scriptd run` once)?")
        })?;
    println!(
        "published {subject} (stream {}, sequence {})",
        ack.stream, ack.sequence
    );
    Ok(ExitCode::SUCCESS)
}
