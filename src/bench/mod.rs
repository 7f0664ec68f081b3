//! The `scriptd bench` commands: numbers printed for people, never pass/fail. Only the CLI
//! uses this module; the daemon does not depend on it.

pub mod engine;
pub mod fairness;
pub mod hooks;
pub mod hosts;
pub mod pipeline;
pub mod procstat;
pub mod typescript;

use anyhow::Context;
use async_nats::jetstream;

use crate::config::Settings;

/// A throw-away database and stream names of their own for a benchmark that runs a daemon
/// on the configured servers; `remove` drops them.
pub(crate) struct Scratch {
    /// The configured settings, pointed at the scratch database and streams.
    pub settings: Settings,
    admin: tokio_postgres::Client,
    database: String,
}

impl Scratch {
    /// Makes the database `scriptd_<id>` (migrated) and the prefixes `<id>.*`.
    pub async fn new(settings: &Settings, id: &str) -> anyhow::Result<Scratch> {
        let mut s = settings.clone();
        let database = format!("scriptd_{id}");
        let mut admin: tokio_postgres::Config = s.database.url.parse().context("database.url")?;
        admin.dbname("postgres");
        let (admin, connection) = admin
            .connect(tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL")?;
        tokio::spawn(connection);
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {database}"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await?;
        s.database.url = replace_dbname(&s.database.url, &database);
        s.nats.events_prefix = format!("{id}.events");
        s.nats.jobs_prefix = format!("{id}.jobs");
        s.nats.dlq_prefix = format!("{id}.dlq");
        s.nats.stream_prefix = id.to_uppercase();
        crate::store::Store::migrate(&s.database).await?;
        Ok(Scratch {
            settings: s,
            admin,
            database,
        })
    }

    /// Deletes the streams and drops the database.
    pub async fn remove(self, js: &jetstream::Context) -> anyhow::Result<()> {
        let nats = &self.settings.nats;
        for name in [nats.events_stream(), nats.jobs_stream(), nats.dlq_stream()] {
            let _ = js.delete_stream(name).await;
        }
        self.admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .await?;
        Ok(())
    }
}

fn replace_dbname(url: &str, name: &str) -> String {
    match url.rsplit_once('/') {
        Some((head, tail)) if !tail.contains('@') => {
            let query = tail
                .split_once('?')
                .map(|(_, q)| format!("?{q}"))
                .unwrap_or_default();
            format!("{head}/{name}{query}")
        }
        _ => format!("{url} dbname={name}"),
    }
}
