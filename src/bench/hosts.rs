//! `scriptd bench hosts`: what the process boundary costs — warm round trips and throughput
//! through engine hosts beside the same in this process — and the memory of thousands of
//! isolate create/drop cycles with host recycling on.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use crate::bench::engine::{
    bundle_of, rows, rss_bytes, run_of, run_with, throughput, timed, trivial,
};
use crate::engine::{rss_of, Engine, EngineConfig, Isolation};

#[derive(Debug, Args)]
pub struct HostsBenchArgs {
    /// Warm runs of one script, one at a time, for the round-trip figures.
    #[arg(long, default_value_t = 5000)]
    pub warm: usize,
    /// Runs over every worker or host for the throughput figures.
    #[arg(long, default_value_t = 20000)]
    pub throughput: usize,
    /// Isolates created and dropped (a new script version each run) through hosts.
    #[arg(long, default_value_t = 10000)]
    pub cycles: usize,
}

fn total_rss_mib(engine: &Engine) -> f64 {
    let hosts: u64 = engine.host_pids().into_iter().filter_map(rss_of).sum();
    (hosts + rss_bytes()) as f64 / 1048576.0
}

pub async fn hosts(config: &EngineConfig, args: HostsBenchArgs) -> anyhow::Result<ExitCode> {
    let caps: crate::engine::SharedCapabilities = Arc::new(crate::caps::NoCapabilities::default());
    let threads = Arc::new(Engine::start(config)?);
    let process = EngineConfig {
        isolation: Isolation::Process,
        ..config.clone()
    };
    let hosts = Arc::new(Engine::start_with(&process, caps)?);
    anyhow::ensure!(
        hosts.wait_ready(std::time::Duration::from_secs(60)).await,
        "the engine hosts did not start"
    );
    println!(
        "threads: {} workers in this process; hosts: {} processes x {} workers, recycled after {} isolates or {}",
        threads.workers(),
        hosts.host_pids().len(),
        config.hosts.workers_per_host,
        config.hosts.max_isolates,
        config.hosts.max_rss
    );
    println!(
        "{:<26} {:>10} {:>10} {:>8}",
        "measure", "p50", "p99", "runs"
    );
    // The trivial handler, then a bundled script's source (which crosses to a host once
    // and is named by number after).
    for (label, script, source) in [
        ("warm", "warm", trivial()),
        ("100 KiB", "bundle", bundle_of(100)),
    ] {
        for (name, engine) in [("in-process", &threads), ("through a host", &hosts)] {
            timed(engine, run_with(script, 1, 0, source.clone())).await?;
            let mut warm = Vec::with_capacity(args.warm);
            for i in 0..args.warm {
                warm.push(timed(engine, run_with(script, 1, i, source.clone())).await?);
            }
            rows(&format!("{label} {name}"), warm);
        }
    }
    for (name, engine) in [("in-process", &threads), ("through hosts", &hosts)] {
        let (runs, took) = throughput(engine, args.throughput).await?;
        println!(
            "throughput {name}: {:.0} runs/s",
            runs as f64 / took.as_secs_f64()
        );
    }
    drop(threads);
    println!("create/drop cycles through hosts (a new isolate per run):");
    println!(
        "{:>8} {:>14} {:>10} {:>13} {:>9}",
        "cycles", "total RSS MiB", "recycles", "engine faults", "runs/s"
    );
    let start = Instant::now();
    let step = (args.cycles / 10).max(1);
    let mut faults = 0;
    for i in 0..args.cycles {
        // An engine fault fails the run (the daemon retries it) and replaces the host.
        if hosts
            .run(run_of("cycle", i as u32 + 1, i))
            .await
            .outcome
            .is_err()
        {
            faults += 1;
        }
        if (i + 1) % step == 0 {
            println!(
                "{:>8} {:>14.0} {:>10} {:>13} {:>9.0}",
                i + 1,
                total_rss_mib(&hosts),
                hosts.stats().host_recycles,
                faults,
                (i + 1) as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
