//! Tenant scripts as the daemon sees them: the in-memory index of current versions
//! (`index`) and deploy manifests (`manifest`).

pub mod index;
pub mod manifest;
