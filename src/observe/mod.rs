//! What the daemon tells about itself: logs, traces and OTLP export (`telemetry`), metrics
//! (`metrics`) and the probe and scrape endpoint (`health`).

pub mod health;
pub mod metrics;
pub mod telemetry;
