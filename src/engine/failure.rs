//! Why a run failed: the typed failure kinds and whether each is worth retrying.

use std::fmt;

use serde::{Deserialize, Serialize};

crate::domain::named_enum! {
/// The reason a run did not produce a result. The names (snake_case) are stable: they are
/// stored in run records and dead letters and used as metric labels.
pub enum FailureKind ("failure kind") {
    /// The source does not compile as an ES module (syntax error, forbidden import).
    Syntax = "syntax",
    /// The module has no default export, or it is not a function.
    NoHandler = "no_handler",
    /// The source is larger than the source-size limit.
    SourceTooLarge = "source_too_large",
    /// The handler (or the module's top level) threw, or its promise rejected.
    Exception = "exception",
    /// The run exceeded its wall-clock limit and was terminated.
    Timeout = "timeout",
    /// The isolate reached its heap limit (ArrayBuffers included) and was terminated.
    HeapLimit = "heap_limit",
    /// The run used more CPU time than its limit (time spent waiting for the script API
    /// does not count) and was terminated.
    CpuLimit = "cpu_limit",
    /// The handler returned a promise that can never settle: nothing is left that could
    /// resolve it.
    Unsettled = "unsettled",
    /// The JSON of the return value is larger than the result-size limit.
    ResultTooLarge = "result_too_large",
    /// The return value cannot be represented as JSON (BigInt, a cycle, ...).
    ResultNotSerialisable = "result_not_serialisable",
    /// The engine itself failed (isolate could not be created, worker gone).
    Engine = "engine",
    /// The engine host process running the script died (killed, crashed, out of memory).
    EngineCrashed = "engine_crashed",
    /// The trigger's input cannot be handed to a script (an event over the size limit).
    BadInput = "bad_input",
    /// The run waited in its worker's queue past the moment it had to start by (runs ahead
    /// of it ran long) and was not started; its job comes back (`ScriptRun::start_by`).
    NotStarted = "not_started",
}
}

impl FailureKind {
    /// Whether another attempt could succeed. Faults of the script's code or output are
    /// deterministic and go straight to the dead-letter subject; faults that may depend on
    /// timing, load or external state are retried; for the limits whose nature depends on
    /// the script, the operator decides (`engine.retry_heap_limit`, `retry_cpu_limit`).
    pub fn retryable(self, settings: Retried) -> bool {
        match self {
            FailureKind::Exception
            | FailureKind::Timeout
            | FailureKind::Engine
            | FailureKind::EngineCrashed
            | FailureKind::NotStarted => true,
            FailureKind::HeapLimit => settings.heap_limit,
            FailureKind::CpuLimit => settings.cpu_limit,
            FailureKind::Syntax
            | FailureKind::NoHandler
            | FailureKind::SourceTooLarge
            | FailureKind::Unsettled
            | FailureKind::ResultTooLarge
            | FailureKind::ResultNotSerialisable
            | FailureKind::BadInput => false,
        }
    }
}

/// The operator's choices of whether runs stopped at a limit are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retried {
    /// Runs stopped at their heap limit (`engine.retry_heap_limit`).
    pub heap_limit: bool,
    /// Runs stopped at their CPU-time limit (`engine.retry_cpu_limit`).
    pub cpu_limit: bool,
}

impl Retried {
    /// Every limit retried: what a failure says before the engine applies the settings.
    pub const ALL: Retried = Retried {
        heap_limit: true,
        cpu_limit: true,
    };
}

/// A failed run: its kind, a message for humans and, for exceptions, the JavaScript stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// What kind of failure it was (recorded as the run's failure kind).
    pub kind: FailureKind,
    /// What went wrong, for humans.
    pub message: String,
    /// The JavaScript stack of the error that failed the run, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    /// Whether the caller should try again (the kind's rule with the operator's settings).
    pub retryable: bool,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde() {
        for kind in FailureKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<FailureKind>(&json).unwrap(), kind);
        }
    }

    #[test]
    fn only_transient_kinds_are_retried() {
        let none = Retried {
            heap_limit: false,
            cpu_limit: false,
        };
        assert!(FailureKind::Exception.retryable(none));
        assert!(FailureKind::Timeout.retryable(none));
        assert!(FailureKind::HeapLimit.retryable(Retried::ALL));
        assert!(!FailureKind::HeapLimit.retryable(none));
        assert!(FailureKind::CpuLimit.retryable(Retried::ALL));
        assert!(!FailureKind::CpuLimit.retryable(none));
        assert!(!FailureKind::Syntax.retryable(Retried::ALL));
        assert!(!FailureKind::ResultTooLarge.retryable(Retried::ALL));
    }
}
