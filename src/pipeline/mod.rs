//! The attempt path's shared parts: batched run records and attempt claims (`records`,
//! over `batch`) and the retry policy (`retry`).

pub mod batch;
pub mod records;
pub mod retry;
