//! The store's errors: PostgreSQL unreachable (try again later), a statement that failed,
//! stored data scriptd cannot read, or settings that cannot work.

use std::error::Error as _;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection could be made or it was lost (PostgreSQL down or unreachable, the
    /// pool's wait timed out): the same call may succeed later.
    #[error("{doing}: {source}")]
    Unavailable {
        /// What the store was doing.
        doing: String,
        /// The driver's or the pool's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A statement failed: a constraint, a permission, an object that does not exist.
    #[error("{doing}: {source}")]
    Statement {
        /// What the store was doing.
        doing: String,
        /// The driver's error (its SQLSTATE, when the server sent one).
        #[source]
        source: tokio_postgres::Error,
    },
    /// A stored value scriptd cannot read back.
    #[error("stored {what} is not valid: {detail}")]
    Data {
        /// Which value.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The `[database]` settings cannot work (an unparsable URL).
    #[error("{0}")]
    Config(String),
    /// What was asked collides with what is stored (a route another script has).
    #[error("{0}")]
    Conflict(String),
}

/// The store's results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Whether PostgreSQL could not be reached (or the connection was lost).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// Whether the server refused a value of the statement (SQLSTATE class 22, data
    /// exception): the same statement would be refused again.
    pub fn refused_a_value(&self) -> bool {
        self.code().is_some_and(|c| c.code().starts_with("22"))
    }

    /// The SQLSTATE of a statement the server refused.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            StoreError::Statement { source, .. } => source.code(),
            _ => None,
        }
    }

    /// This error, saying what the store was doing.
    fn doing(self, what: &str) -> StoreError {
        match self {
            StoreError::Unavailable { doing, source } => StoreError::Unavailable {
                doing: join(what, &doing),
                source,
            },
            StoreError::Statement { doing, source } => StoreError::Statement {
                doing: join(what, &doing),
                source,
            },
            other => other,
        }
    }
}

fn join(outer: &str, inner: &str) -> String {
    if inner.is_empty() {
        outer.to_owned()
    } else {
        format!("{outer}: {inner}")
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        // A connection lost, or one that could not be made (an I/O error underneath).
        let io = e.source().is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || io {
            StoreError::Unavailable {
                doing: String::new(),
                source: Box::new(e),
            }
        } else {
            StoreError::Statement {
                doing: String::new(),
                source: e,
            }
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> StoreError {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Unavailable {
                doing: String::new(),
                source: Box::new(other),
            },
        }
    }
}

/// Says what the store was doing when a call failed.
pub trait Doing<T> {
    /// The error, if any, with `what` in front.
    fn doing(self, what: &str) -> Result<T>;
}

impl<T, E: Into<StoreError>> Doing<T> for std::result::Result<T, E> {
    fn doing(self, what: &str) -> Result<T> {
        self.map_err(|e| e.into().doing(what))
    }
}

/// A stored value that does not parse: `StoreError::Data`.
pub fn bad_data(what: &'static str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Data {
        what,
        detail: detail.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_being_done_reads_outermost_first() {
        let e = StoreError::Unavailable {
            doing: String::new(),
            source: "refused".into(),
        };
        let e: Result<()> = Err(e);
        let e = e
            .doing("reading a key")
            .doing("running a script")
            .unwrap_err();
        assert!(e.is_unavailable());
        assert_eq!(e.to_string(), "running a script: reading a key: refused");
    }
}
