//! Cron schedules: the expression in its time zone and its occurrences (`expr`, re-exported
//! here). The ticker that turns occurrences into jobs is a trigger like the fan-out and
//! lives with it in `bus::ticker`: manifests validate expressions here, and the ticker reads
//! the script index, so keeping the two apart keeps the modules free of cycles.

pub mod expr;

pub use expr::*;
