//! `scriptd dlq list|show|replay|purge`: inspect dead letters, replay them as fresh jobs,
//! and remove them.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::bus::dlq::{self, LetterFilter};
use crate::bus::replay::{self, VersionChoice};
use crate::config::Settings;
use crate::engine::Engine;
use crate::pipeline::attempt::Defaults;
use crate::pipeline::dry_run::{self, DryRun};
use crate::pipeline::job::Job;
use crate::store::{RunFilter, Store};
use crate::units::parse_duration;

#[derive(Debug, Args, Clone)]
pub struct FilterArgs {
    /// Only this tenant's dead letters.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only dead letters of scripts with this name.
    #[arg(long)]
    pub script: Option<String>,
    /// Failure kind: timeout, exception, heap_limit, ...
    #[arg(long)]
    pub kind: Option<String>,
    /// Only dead letters stored within this long (e.g. 1h).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
}

impl FilterArgs {
    fn filter(&self) -> anyhow::Result<LetterFilter> {
        Ok(LetterFilter {
            tenant: self.tenant.clone(),
            script: self.script.clone(),
            kind: self.kind.clone(),
            since: match self.since {
                Some(d) => Some(chrono::Utc::now() - chrono::Duration::from_std(d)?),
                None => None,
            },
        })
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Which dead letters to list.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// List at most this many.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Stream sequence of the dead letter (from `dlq list`).
    pub sequence: u64,
    /// Print the dead letter, its headers and its runs as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Stream sequences of the dead letters to replay.
    #[arg(required_unless_present = "all_matching")]
    pub sequences: Vec<u64>,
    /// Replay every dead letter that matches the filters instead.
    #[arg(long)]
    pub all_matching: bool,
    /// Which dead letters `--all-matching` replays.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// latest (the current version when the replay runs), pinned (the version that failed)
    /// or a version number.
    #[arg(long, default_value = "latest")]
    pub version: VersionChoice,
    /// Run the script on the payload in an isolate and print the outcome; publish, delete
    /// and record nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// At most this many replays per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Print the outcomes as one JSON array at the end instead of a line each.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Which dead letters to delete.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Every dead letter, when no filter is given.
    #[arg(long)]
    pub all: bool,
    /// Really delete (otherwise only count).
    #[arg(long)]
    pub yes: bool,
}

async fn open(
    settings: &Settings,
) -> anyhow::Result<(
    async_nats::jetstream::Context,
    async_nats::jetstream::stream::Stream,
)> {
    let client = async_nats::connect(settings.nats.servers())
        .await
        .with_context(|| {
            format!(
                "no connection to NATS at {} (is nats-server running with -js?)",
                settings.nats.url
            )
        })?;
    let js = async_nats::jetstream::new(client);
    let stream = dlq::stream(&js, &settings.nats).await?;
    Ok((js, stream))
}

pub async fn list(settings: &Settings, args: ListArgs) -> anyhow::Result<ExitCode> {
    let (_, mut stream) = open(settings).await?;
    let letters = dlq::list(&mut stream, &args.filter.filter()?, args.limit).await?;
    if args.json {
        super::print_json(&letters)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    if letters.is_empty() {
        writeln!(out, "no dead letters match")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:>6}  {:<12}  {:<22}  {:>4}  {:<16}  {:>3}  {:<19}  {:<19}  MESSAGE",
        "SEQ", "TENANT", "SCRIPT", "VER", "KIND", "TRY", "FIRST", "LAST"
    )?;
    for l in &letters {
        let d = &l.letter;
        let excerpt: String = d.failure.message.chars().take(50).collect();
        writeln!(
            out,
            "{:>6}  {:<12}  {:<22}  {:>4}  {:<16}  {:>3}  {:<19}  {:<19}  {excerpt}",
            l.sequence,
            d.tenant,
            d.script,
            d.script_version.map_or("-".into(), |v| v.to_string()),
            d.failure.kind.as_str(),
            d.attempts,
            d.first_attempt_at.format("%Y-%m-%d %H:%M:%S"),
            d.last_attempt_at.format("%Y-%m-%d %H:%M:%S"),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(settings: &Settings, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let (_, stream) = open(settings).await?;
    let stored = dlq::get(&stream, args.sequence).await?;
    let store = Store::connect(&settings.database).await?;
    let runs = store
        .list_runs(&RunFilter {
            job_id: Some(stored.letter.job_id.clone()),
            limit: 1000,
            ..Default::default()
        })
        .await?;
    let headers: serde_json::Map<String, serde_json::Value> = stored
        .headers
        .iter()
        .map(|(k, v)| {
            let name: &str = k.as_ref();
            (
                name.to_owned(),
                serde_json::Value::String(v.first().map(|v| v.to_string()).unwrap_or_default()),
            )
        })
        .collect();
    let document = serde_json::json!({
        "sequence": stored.sequence,
        "subject": stored.subject,
        "stored_at": stored.stored_at,
        "message_headers": headers,
        "dead_letter": stored.letter,
        "runs": runs,
    });
    if args.json {
        super::print_json(&document)?;
        return Ok(ExitCode::SUCCESS);
    }
    let d = &stored.letter;
    println!("dead letter {} on {}", stored.sequence, stored.subject);
    println!(
        "  script:   {}/{} v{}",
        d.tenant,
        d.script,
        d.script_version.map_or("-".into(), |v| v.to_string())
    );
    println!("  job:      {}", d.job_id);
    println!("  failure:  {}: {}", d.failure.kind, d.failure.message);
    if let Some(stack) = &d.failure.stack {
        println!("  stack:\n{stack}");
    }
    println!(
        "  attempts: {} (first {}, last {})",
        d.attempts, d.first_attempt_at, d.last_attempt_at
    );
    for (name, value) in &headers {
        println!("  header:   {name}: {}", value.as_str().unwrap_or_default());
    }
    println!("  payload:  {}", d.job.get());
    println!("  runs:");
    for r in runs.iter().rev() {
        println!(
            "    {} attempt {} v{} {} {}",
            r.started_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            r.attempt,
            r.version.map_or("-".into(), |v| v.to_string()),
            r.status,
            r.failure_message.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn replay(settings: &Settings, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (js, mut stream) = open(settings).await?;
    let mut letters = if args.all_matching {
        let filter = args.filter.filter()?;
        anyhow::ensure!(
            !filter.is_empty(),
            "--all-matching needs at least one filter (--tenant, --script, --kind, --since)"
        );
        let mut found = dlq::list(&mut stream, &filter, usize::MAX).await?;
        found.reverse();
        found
    } else {
        let mut found = Vec::new();
        for sequence in &args.sequences {
            found.push(dlq::get(&stream, *sequence).await?);
        }
        found
    };
    anyhow::ensure!(!letters.is_empty(), "no dead letters match");
    let store = Store::connect(&settings.database).await?;
    eprintln!(
        "replaying {} dead letter(s) with version: {}{}",
        letters.len(),
        match args.version {
            VersionChoice::Latest => "latest (the current version when each runs)".to_string(),
            VersionChoice::Pinned => "pinned (the version that failed)".to_string(),
            VersionChoice::Exactly(n) => format!("v{n}"),
        },
        if args.dry_run { ", dry run" } else { "" }
    );
    let dry = if args.dry_run {
        let caps = DryRun::new(
            &settings.capabilities,
            &settings.nats.events_prefix,
            store.clone(),
        )?;
        let engine = Engine::for_command(&settings.engine, Arc::new(caps.clone())).await?;
        Some((engine, caps))
    } else {
        None
    };
    let interval = args
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let started = Instant::now();
    let total = letters.len();
    let mut outcomes = Vec::new();
    for (i, stored) in letters.drain(..).enumerate() {
        if let Some(interval) = interval {
            tokio::time::sleep_until((started + interval * i as u32).into()).await;
        }
        let (job, headers) = replay::replay_job(&stored, args.version)?;
        let outcome = match &dry {
            Some((engine, caps)) => {
                let defaults = Defaults {
                    limits: settings.engine.limits,
                    retry: settings.retry,
                };
                dry_run::replay(&store, engine, caps, &defaults, &job).await?
            }
            None => {
                let seq = replay::publish(&js, &settings.nats, &job, headers).await?;
                stream
                    .delete_message(stored.sequence)
                    .await
                    .with_context(|| {
                        format!(
                            "removing dead letter {} after its replay was stored",
                            stored.sequence
                        )
                    })?;
                super::audit(
                    &store,
                    &job.tenant,
                    "dead_letters.replay",
                    &stored.sequence.to_string(),
                )
                .await?;
                serde_json::json!({ "dead_letter": stored.sequence, "job": job.id, "job_sequence": seq })
            }
        };
        if !args.json {
            println!("{}", describe(stored.sequence, &job, &outcome));
        }
        outcomes.push(outcome);
        if total >= 20 && (i + 1) % 10 == 0 {
            eprintln!("replayed {}/{total}", i + 1);
        }
    }
    if args.json {
        super::print_json(&outcomes)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One line for a person about what a replay (or its dry run) did.
fn describe(sequence: u64, job: &Job, outcome: &serde_json::Value) -> String {
    let script = format!("{}/{}", job.tenant, job.script);
    if outcome["dry_run"] != true {
        return format!(
            "dead letter {sequence}: replayed as job {} (stored at sequence {} of the jobs stream); the dead letter is removed",
            job.id, outcome["job_sequence"]
        );
    }
    let Some(version) = outcome["version"].as_u64() else {
        return format!(
            "dead letter {sequence}: dry run of {script}: would be skipped, {}",
            outcome["message"].as_str().unwrap_or_default()
        );
    };
    let run = &outcome["run"];
    let what = match outcome["outcome"].as_str().unwrap_or_default() {
        "ok" => {
            let result = run["result"].to_string();
            let shown: String = result.chars().take(200).collect();
            let cut = if shown.len() < result.len() {
                " ..."
            } else {
                ""
            };
            format!("ok, returning {shown}{cut}")
        }
        other => format!(
            "{} ({}: {})",
            other.replace('_', " "),
            run["failure"]["kind"].as_str().unwrap_or_default(),
            run["failure"]["message"].as_str().unwrap_or_default()
        ),
    };
    let took = run["duration_ms"].as_f64().unwrap_or_default();
    let would = &outcome["would"];
    let count = |v: &serde_json::Value| v.as_array().map_or(0, Vec::len);
    let mut effects = Vec::new();
    for (n, what) in [
        (count(&would["published"]), "event(s) to publish"),
        (
            would["kv_writes"].as_object().map_or(0, |o| o.len()),
            "key(s) to write",
        ),
        (count(&would["fetches_refused"]), "fetch(es) refused"),
    ] {
        if n > 0 {
            effects.push(format!("{n} {what}"));
        }
    }
    let effects = if effects.is_empty() {
        String::new()
    } else {
        format!(" ({})", effects.join(", "))
    };
    format!("dead letter {sequence}: dry run of {script} v{version}: {what} in {took:.1} ms; nothing was published, stored, fetched or recorded{effects}")
}

pub async fn purge(settings: &Settings, args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let filter = args.filter.filter()?;
    anyhow::ensure!(
        !filter.is_empty() || args.all,
        "refusing to purge without a filter: give --tenant, --script, --kind or --since, or --all"
    );
    let (_, mut stream) = open(settings).await?;
    let letters = dlq::list(&mut stream, &filter, usize::MAX).await?;
    if !args.yes {
        println!(
            "{} dead letter(s) match; run again with --yes to delete them",
            letters.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    let store = Store::connect(&settings.database).await?;
    for l in &letters {
        stream.delete_message(l.sequence).await?;
        super::audit(
            &store,
            &l.letter.tenant,
            "dead_letters.purge",
            &l.sequence.to_string(),
        )
        .await?;
    }
    println!("deleted {} dead letter(s)", letters.len());
    Ok(ExitCode::SUCCESS)
}
