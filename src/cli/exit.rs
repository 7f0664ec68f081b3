//! The process exit code of a command that ended in an error: which of the documented
//! codes the error's chain calls for.

use std::error::Error;
use std::process::ExitCode;

/// The operation ran and failed (a script failed, a check failed, the daemon stopped
/// because one of its tasks did).
pub const FAILED: u8 = 1;
/// Usage or bad input (also clap's code for a bad command line).
pub const BAD_INPUT: u8 = 2;
/// A service the command needs (NATS or PostgreSQL) could not be reached; trying again
/// later may succeed. The value is sysexits' EX_UNAVAILABLE.
pub const UNAVAILABLE: u8 = 69;

/// The exit code for an error: unavailable if any cause is a connection that could not
/// be made or was lost, failed for a daemon task's failure, else bad input.
pub fn code(error: &anyhow::Error) -> ExitCode {
    ExitCode::from(code_number(error))
}

fn code_number(error: &anyhow::Error) -> u8 {
    if error.chain().any(unavailable) {
        UNAVAILABLE
    } else if error
        .chain()
        .any(|c| c.is::<crate::daemon::supervisor::TaskFailed>())
    {
        FAILED
    } else {
        BAD_INPUT
    }
}

fn unavailable(cause: &(dyn Error + 'static)) -> bool {
    if let Some(e) = cause.downcast_ref::<crate::store::StoreError>() {
        return e.is_unavailable();
    }
    if let Some(e) = cause.downcast_ref::<tokio_postgres::Error>() {
        // A connection lost; one that could not be made has an I/O error as its source,
        // found further down the chain.
        return e.is_closed() || io_source(e);
    }
    if let Some(e) = cause.downcast_ref::<deadpool_postgres::PoolError>() {
        return match e {
            deadpool_postgres::PoolError::Timeout(_) => true,
            deadpool_postgres::PoolError::Backend(e) => e.is_closed() || io_source(e),
            _ => false,
        };
    }
    if cause.is::<async_nats::ConnectError>() {
        return true;
    }
    if let Some(e) = cause.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind::*;
        return matches!(
            e.kind(),
            ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | TimedOut
        );
    }
    false
}

fn io_source(e: &tokio_postgres::Error) -> bool {
    e.source().is_some_and(|s| s.is::<std::io::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn errors_map_to_their_documented_codes() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = anyhow::Error::new(refused).context("connecting to PostgreSQL");
        assert_eq!(code_number(&error), UNAVAILABLE);
        let task = anyhow::Error::new(crate::daemon::supervisor::TaskFailed(
            "the job lanes task ended".into(),
        ));
        assert_eq!(code_number(&task), FAILED);
        let bad: anyhow::Result<()> = Err(anyhow::anyhow!("no such script")).context("deploying");
        assert_eq!(code_number(&bad.unwrap_err()), BAD_INPUT);
    }
}
