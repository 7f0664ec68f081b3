//! scriptd: an event-driven scripting worker daemon. The library holds everything; the
//! binary only parses the command line.

pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod telemetry;
pub mod units;
