//! The `scriptd bench` commands: numbers printed for people, never pass/fail. Only the CLI
//! uses this module; the daemon does not depend on it.

pub mod engine;
pub mod fairness;
pub mod hosts;
pub mod pipeline;
pub mod procstat;
pub mod typescript;
