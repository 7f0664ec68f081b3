//! `scriptd bench engine`: cold start, warm run latency and throughput of the engine,
//! printed as a table (numbers, not pass/fail).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::engine::{Engine, EngineConfig, Limits, ScriptRun, ENGINE_NAME};

const TRIVIAL: &str =
    "export default async function (event, ctx) { return { ok: true, n: event.n }; }";

#[derive(Debug, Args)]
pub struct EngineBenchArgs {
    /// Cold runs (each in a new isolate: create from snapshot, load module, run).
    #[arg(long, default_value_t = 200)]
    pub cold: usize,
    /// Warm runs of one script in its kept isolate.
    #[arg(long, default_value_t = 5000)]
    pub warm: usize,
    /// Runs spread over every worker for the throughput figure.
    #[arg(long, default_value_t = 20000)]
    pub throughput: usize,
}

pub(crate) fn run_of(script: &str, version: u32, n: usize) -> ScriptRun {
    run_with(script, version, n, trivial())
}

/// The trivial handler, one allocation for every run, as the daemon's runs of one version
/// share theirs.
pub(crate) fn trivial() -> Arc<str> {
    static SOURCE: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| Arc::from(TRIVIAL)).clone()
}

/// A run of `source` as script `script` at `version`, on input `{ "n": n }`.
pub(crate) fn run_with(script: &str, version: u32, n: usize, source: Arc<str>) -> ScriptRun {
    ScriptRun::new(
        "bench",
        script,
        crate::domain::Version::new(version),
        source,
        &serde_json::json!({ "n": n }),
        Limits::default(),
    )
}

/// The trivial handler followed by a comment that makes it `kib` KiB, like a bundled script.
pub(crate) fn bundle_of(kib: usize) -> Arc<str> {
    format!("{TRIVIAL}\n/* {} */\n", "x".repeat(kib * 1024)).into()
}

/// The round trip seen by the caller and the time spent inside the engine worker.
pub(crate) async fn timed(engine: &Engine, run: ScriptRun) -> anyhow::Result<(Duration, Duration)> {
    let start = Instant::now();
    let result = engine.run(run).await;
    if let Err(f) = result.outcome {
        anyhow::bail!("benchmark run failed: {f}");
    }
    Ok((start.elapsed(), result.duration))
}

pub(crate) fn rows(name: &str, samples: Vec<(Duration, Duration)>) {
    let (round_trip, inside): (Vec<_>, Vec<_>) = samples.into_iter().unzip();
    row(&format!("{name}, round trip"), round_trip);
    row(&format!("{name}, in worker"), inside);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<26} {:>10.3?} {:>10.3?} {:>8}",
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples.len()
    );
}

/// Resident memory of this process, from /proc (Linux); 0 elsewhere.
pub fn rss_bytes() -> u64 {
    crate::engine::rss_of(std::process::id()).unwrap_or(0)
}

/// Runs of a trivial script from as many callers as the engine has slots
/// (`runs_per_worker` per worker), `total` in all (rounded up to a multiple of the
/// callers): how many ran, and in what time.
pub(crate) async fn throughput(
    engine: &Arc<Engine>,
    total: usize,
) -> anyhow::Result<(usize, Duration)> {
    let callers = engine.slots();
    let per_caller = total.div_ceil(callers).max(1);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..callers {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_caller {
                timed(&engine, run_of(&format!("throughput-{t}"), 1, i)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((per_caller * callers, start.elapsed()))
}

pub async fn engine(config: &EngineConfig, args: EngineBenchArgs) -> anyhow::Result<ExitCode> {
    let engine = Engine::start(config)?;
    let workers = engine.workers();
    println!("engine: {ENGINE_NAME}; workers: {workers}");
    println!("cold start = new isolate from the snapshot + module load + first run");
    println!(
        "{:<26} {:>10} {:>10} {:>8}",
        "measure", "p50", "p99", "runs"
    );

    // The first run builds the startup snapshot; it is not part of any figure.
    timed(&engine, run_of("snapshot", 0, 0)).await?;
    let rss_before = rss_bytes();

    let mut cold = Vec::with_capacity(args.cold);
    for i in 0..args.cold {
        cold.push(timed(&engine, run_of("cold", i as u32 + 1, i)).await?);
    }
    let rss_after_cold = rss_bytes();
    rows("cold start", cold);

    timed(&engine, run_of("warm", 1, 0)).await?;
    let mut warm = Vec::with_capacity(args.warm);
    for i in 0..args.warm {
        warm.push(timed(&engine, run_of("warm", 1, i)).await?);
    }
    rows("warm run", warm);

    let engine = Arc::new(engine);
    let (total, elapsed) = throughput(&engine, args.throughput).await?;
    println!(
        "throughput, all workers: {:.0} runs/s ({total} runs in {elapsed:.2?})",
        total as f64 / elapsed.as_secs_f64()
    );
    let stats = engine.stats();
    println!(
        "pool: {} cold starts, {} warm hits ({:.1}% hit rate), {} evictions",
        stats.cold_starts,
        stats.warm_hits,
        100.0 * stats.warm_hits as f64 / stats.runs.max(1) as f64,
        stats.evictions
    );
    println!(
        "RSS: {:.1} MiB after the cold runs ({:+.1} MiB over {} isolates created and kept or dropped)",
        rss_after_cold as f64 / 1048576.0,
        (rss_after_cold as f64 - rss_before as f64) / 1048576.0,
        args.cold
    );
    Ok(ExitCode::SUCCESS)
}
