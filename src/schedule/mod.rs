//! Cron schedules: the expression and its occurrences (`expr`, re-exported here) and the
//! ticker that turns occurrences into jobs (`ticker`).

pub mod expr;
pub mod ticker;

pub use expr::*;
