//! Tenant scripts as the daemon sees them: the in-memory index of current versions
//! (`index`), deploy manifests (`manifest`), HTTP routes (`route`) and the TypeScript compile
//! (`typescript`).

pub mod index;
pub mod manifest;
pub mod route;
pub mod typescript;
