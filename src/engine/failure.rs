//! Why a run failed: the typed failure kinds and whether each is worth retrying.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The reason a run did not produce a result. The names (snake_case) are stable: they are
/// stored in run records and dead letters and used as metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The source does not compile as an ES module (syntax error, forbidden import).
    Syntax,
    /// The module has no default export, or it is not a function.
    NoHandler,
    /// The source is larger than the source-size limit.
    SourceTooLarge,
    /// The handler (or the module's top level) threw, or its promise rejected.
    Exception,
    /// The run exceeded its wall-clock limit and was terminated.
    Timeout,
    /// The isolate reached its heap limit (ArrayBuffers included) and was terminated.
    HeapLimit,
    /// The handler returned a promise that can never settle: nothing is left that could
    /// resolve it.
    Unsettled,
    /// The JSON of the return value is larger than the result-size limit.
    ResultTooLarge,
    /// The return value cannot be represented as JSON (BigInt, a cycle, ...).
    ResultNotSerialisable,
    /// The engine itself failed (isolate could not be created, worker gone).
    Engine,
    /// The engine host process running the script died (killed, crashed, out of memory).
    EngineCrashed,
    /// The trigger's input cannot be handed to a script (an event over the size limit).
    BadInput,
}

impl FailureKind {
    pub const ALL: [FailureKind; 12] = [
        FailureKind::Syntax,
        FailureKind::NoHandler,
        FailureKind::SourceTooLarge,
        FailureKind::Exception,
        FailureKind::Timeout,
        FailureKind::HeapLimit,
        FailureKind::Unsettled,
        FailureKind::ResultTooLarge,
        FailureKind::ResultNotSerialisable,
        FailureKind::Engine,
        FailureKind::EngineCrashed,
        FailureKind::BadInput,
    ];

    /// Whether another attempt could succeed. Faults of the script's code or output are
    /// deterministic and go straight to the dead-letter subject; faults that may depend on
    /// timing, load or external state are retried. `heap_limit_retryable` is the operator's
    /// setting (`engine.retry_heap_limit`).
    pub fn retryable(self, heap_limit_retryable: bool) -> bool {
        match self {
            FailureKind::Exception
            | FailureKind::Timeout
            | FailureKind::Engine
            | FailureKind::EngineCrashed => true,
            FailureKind::HeapLimit => heap_limit_retryable,
            FailureKind::Syntax
            | FailureKind::NoHandler
            | FailureKind::SourceTooLarge
            | FailureKind::Unsettled
            | FailureKind::ResultTooLarge
            | FailureKind::ResultNotSerialisable
            | FailureKind::BadInput => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Syntax => "syntax",
            FailureKind::NoHandler => "no_handler",
            FailureKind::SourceTooLarge => "source_too_large",
            FailureKind::Exception => "exception",
            FailureKind::Timeout => "timeout",
            FailureKind::HeapLimit => "heap_limit",
            FailureKind::Unsettled => "unsettled",
            FailureKind::ResultTooLarge => "result_too_large",
            FailureKind::ResultNotSerialisable => "result_not_serialisable",
            FailureKind::Engine => "engine",
            FailureKind::EngineCrashed => "engine_crashed",
            FailureKind::BadInput => "bad_input",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed run: its kind, a message for humans and, for exceptions, the JavaScript stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
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
        assert!(FailureKind::Exception.retryable(false));
        assert!(FailureKind::Timeout.retryable(false));
        assert!(FailureKind::HeapLimit.retryable(true));
        assert!(!FailureKind::HeapLimit.retryable(false));
        assert!(!FailureKind::Syntax.retryable(true));
        assert!(!FailureKind::ResultTooLarge.retryable(true));
    }
}
