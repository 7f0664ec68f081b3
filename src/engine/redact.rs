//! Keeps secrets a run read out of what the run leaves behind: its logs, its result and its
//! failure message are stored in run records and dead letters, so every occurrence of a
//! secret's value there is replaced by a marker.

use serde_json::Value;

use super::failure::Failure;
use super::sandbox::LogLine;

pub const MARKER: &str = "[secret]";

/// Values shorter than this are not searched for: replacing every "a" would destroy the
/// record and protect nothing.
const MIN_LEN: usize = 4;

pub fn secrets(values: &[String], logs: &mut [LogLine], outcome: &mut Result<Value, Failure>) {
    let values: Vec<&str> = values
        .iter()
        .map(String::as_str)
        .filter(|v| v.len() >= MIN_LEN)
        .collect();
    if values.is_empty() {
        return;
    }
    for line in logs.iter_mut() {
        scrub(&values, &mut line.message);
    }
    match outcome {
        Ok(value) => scrub_value(&values, value),
        Err(failure) => {
            scrub(&values, &mut failure.message);
            if let Some(stack) = &mut failure.stack {
                scrub(&values, stack);
            }
        }
    }
}

fn scrub(values: &[&str], text: &mut String) {
    for value in values {
        if text.contains(value) {
            *text = text.replace(value, MARKER);
        }
    }
}

fn scrub_value(values: &[&str], value: &mut Value) {
    match value {
        Value::String(s) => scrub(values, s),
        Value::Array(items) => items.iter_mut().for_each(|v| scrub_value(values, v)),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (mut key, mut v) in entries {
                scrub(values, &mut key);
                scrub_value(values, &mut v);
                map.insert(key, v);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FailureKind;

    #[test]
    fn secrets_leave_logs_results_and_failures() {
        let values = vec!["hunter22".to_owned(), "ab".to_owned()];
        let mut logs = vec![LogLine {
            level: "info".into(),
            message: "key=hunter22 ab".into(),
        }];
        let mut ok = Ok(serde_json::json!({"k": ["x hunter22"], "hunter22": 1}));
        secrets(&values, &mut logs, &mut ok);
        assert_eq!(logs[0].message, "key=[secret] ab");
        assert_eq!(
            ok.unwrap(),
            serde_json::json!({"k": ["x [secret]"], "[secret]": 1})
        );
        let mut failed = Err(Failure {
            kind: FailureKind::Exception,
            message: "Error: hunter22".into(),
            stack: Some("at hunter22".into()),
            retryable: true,
        });
        secrets(&values, &mut [], &mut failed);
        let f = failed.unwrap_err();
        assert_eq!(f.message, "Error: [secret]");
        assert_eq!(f.stack.as_deref(), Some("at [secret]"));
    }
}
