//! Tenant scripts as the daemon sees them: the in-memory index of current versions
//! (`index`), deploy manifests (`manifest`) and the NATS subjects scripts are matched on
//! (`subject`).

pub mod index;
pub mod manifest;
pub mod subject;
