//! scriptd: an event-driven scripting worker daemon. The library holds everything; the
//! binary only parses the command line.

pub mod api;
mod bench;
pub mod bus;
pub mod caps;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod domain;
pub mod engine;
pub mod observe;
pub mod pipeline;
pub mod retry;
pub mod schedule;
pub mod scripts;
pub mod store;
pub mod subject;
pub mod units;
