//! The NATS adapter's errors: the server unreachable (try again later), a JetStream request
//! that failed, a stream scriptd cannot use, a dead letter that is not there, or a message
//! that could not be settled as handled.

/// What went wrong talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// No connection to the server could be made: the same call may succeed later.
    #[error("connecting to NATS at {url} (is nats-server running with -js?): {source}")]
    Unavailable {
        /// The server's URL.
        url: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// A JetStream request (stream, consumer, publish, message) failed.
    #[error("{doing}: {source}")]
    JetStream {
        /// What was being done.
        doing: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stream is missing or has settings this scriptd cannot use; the message says
    /// what to do.
    #[error("{0}")]
    Stream(String),
    /// No dead letter at that place, or not one scriptd wrote.
    #[error("{0}")]
    Letter(String),
    /// A message was not handled to the end (a run not recorded, a claim not taken, the
    /// grace period over): it is handed back and comes again.
    #[error("{0}")]
    Unsettled(String),
}

/// The adapter's results.
pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// Says what was being done when a JetStream request failed.
pub trait Doing<T> {
    /// The error, if any, as `BusError::JetStream` with `what` in front.
    fn doing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> Doing<T> for std::result::Result<T, E> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| BusError::JetStream {
            doing: what(),
            source: e.into(),
        })
    }
}
