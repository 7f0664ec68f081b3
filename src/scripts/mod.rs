//! Tenant scripts as the daemon sees them: the in-memory index of current versions
//! (`index`), deploy manifests (`manifest`) and the TypeScript compile (`typescript`).

pub mod index;
pub mod manifest;
pub mod typescript;
