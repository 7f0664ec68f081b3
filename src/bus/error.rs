//! The NATS adapter's errors: the server unreachable (try again later), a JetStream request
//! that failed, a stream scriptd cannot use, a dead letter that is not there, or a message
//! that could not be settled as handled.

use std::time::{Duration, Instant};

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

/// How long [`patiently`] keeps trying while JetStream cannot answer yet (a cluster electing
/// its meta leader, a stream's leader moving, a node restarting) before it gives up.
const NOT_READY_FOR: Duration = Duration::from_secs(60);

impl BusError {
    /// Whether JetStream could not answer yet, rather than refused the request: a timeout,
    /// no responders, an offline or leaderless asset, or a 503 from a server without a meta
    /// leader. Such a request may succeed when asked again.
    pub fn is_not_ready(&self) -> bool {
        use async_nats::jetstream::{context as c, stream as s};
        let BusError::JetStream { source, .. } = self else {
            return false;
        };
        let unavailable = |e: &async_nats::jetstream::Error| e.code() == 503;
        if let Some(e) = source.downcast_ref::<c::CreateStreamError>() {
            return match e.kind() {
                c::CreateStreamErrorKind::TimedOut
                | c::CreateStreamErrorKind::JetStreamUnavailable => true,
                c::CreateStreamErrorKind::JetStream(j) => unavailable(&j),
                _ => false,
            };
        }
        if let Some(e) = source.downcast_ref::<c::GetStreamError>() {
            return match e.kind() {
                c::GetStreamErrorKind::Request => true,
                c::GetStreamErrorKind::JetStream(j) => unavailable(&j),
                _ => false,
            };
        }
        if let Some(e) = source.downcast_ref::<c::ConsumerInfoError>() {
            return match e.kind() {
                c::ConsumerInfoErrorKind::Offline
                | c::ConsumerInfoErrorKind::Request
                | c::ConsumerInfoErrorKind::TimedOut
                | c::ConsumerInfoErrorKind::NoResponders => true,
                c::ConsumerInfoErrorKind::JetStream(j) => unavailable(&j),
                _ => false,
            };
        }
        if let Some(e) = source.downcast_ref::<s::ConsumerError>() {
            return match e.kind() {
                s::ConsumerErrorKind::TimedOut | s::ConsumerErrorKind::Request => true,
                s::ConsumerErrorKind::JetStream(j) => unavailable(&j),
                _ => false,
            };
        }
        if let Some(e) = source.downcast_ref::<s::ConsumerUpdateError>() {
            return match e.kind() {
                s::ConsumerUpdateErrorKind::TimedOut | s::ConsumerUpdateErrorKind::Request => true,
                s::ConsumerUpdateErrorKind::JetStream(j) => unavailable(&j),
                _ => false,
            };
        }
        if let Some(e) = source.downcast_ref::<c::RequestError>() {
            return matches!(
                e.kind(),
                c::RequestErrorKind::TimedOut | c::RequestErrorKind::NoResponders
            );
        }
        false
    }
}

/// `attempt()`, asked again with a warning while JetStream is not ready (see
/// [`BusError::is_not_ready`]), for up to a minute; `what` names it in the warning.
pub async fn patiently<T, F, Fut>(what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = Instant::now() + NOT_READY_FOR;
    let mut pause = Duration::from_millis(100);
    loop {
        match attempt().await {
            Err(e) if e.is_not_ready() && Instant::now() + pause < deadline => {
                tracing::warn!(error = %e, "JetStream is not ready for {what}; trying again.");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            done => return done,
        }
    }
}

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

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context as c;

    use super::*;

    fn failed(source: impl std::error::Error + Send + Sync + 'static) -> BusError {
        BusError::JetStream {
            doing: "testing".into(),
            source: Box::new(source),
        }
    }

    #[test]
    fn timeouts_and_no_responders_are_not_ready_refusals_are_final() {
        let timed_out = c::CreateStreamError::new(c::CreateStreamErrorKind::TimedOut);
        assert!(failed(timed_out).is_not_ready());
        let no_one = c::RequestError::new(c::RequestErrorKind::NoResponders);
        assert!(failed(no_one).is_not_ready());
        let offline = c::ConsumerInfoError::new(c::ConsumerInfoErrorKind::Offline);
        assert!(failed(offline).is_not_ready());
        let bad_name = c::CreateStreamError::new(c::CreateStreamErrorKind::InvalidStreamName);
        assert!(!failed(bad_name).is_not_ready());
        let missing = c::ConsumerInfoError::new(c::ConsumerInfoErrorKind::NotFound);
        assert!(!failed(missing).is_not_ready());
        assert!(!BusError::Stream("wrong retention".into()).is_not_ready());
    }
}
