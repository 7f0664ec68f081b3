//! scriptd: an event-driven scripting worker daemon. The library holds everything; the
//! binary only parses the command line.

pub mod batch;
pub mod bench;
pub mod bench_fairness;
pub mod bench_hosts;
pub mod bench_pipeline;
pub mod bus;
pub mod caps;
pub mod cli;
pub mod config;
pub mod cron;
pub mod daemon;
pub mod dev;
pub mod engine;
pub mod health;
pub mod index;
pub mod manifest;
pub mod metrics;
pub mod procstat;
pub mod records;
pub mod retry;
pub mod schedule;
pub mod store;
pub mod subject;
pub mod supervisor;
pub mod telemetry;
pub mod units;
