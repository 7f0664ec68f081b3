//! The scripts' JavaScript environment: the `scriptd` extension (console capture op and
//! bootstrap module) and the startup snapshot every isolate is created from.

use std::sync::OnceLock;

use deno_core::{op2, JsRuntimeForSnapshot, OpState, RuntimeOptions};
use serde::{Deserialize, Serialize};

/// One line a script wrote with `console.*` or `ctx.log`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The level: `debug`, `info`, `warn` or `error` (`console.log` and `ctx.log` write `info`).
    pub level: String,
    /// The arguments of the call, formatted and joined by spaces.
    pub message: String,
}

/// The largest character boundary of `text` at or below `at` (`text.len()` past its end).
pub(crate) fn char_floor(text: &str, at: usize) -> usize {
    let mut end = at.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// The console output of the run in progress, capped at a byte budget. Lives in the
/// isolate's `OpState`, replaced at the start of every run.
#[derive(Debug, Default)]
pub struct LogBuffer {
    lines: Vec<LogLine>,
    used: usize,
    cap: usize,
    dropped_bytes: usize,
    dropped_lines: usize,
}

impl LogBuffer {
    pub fn new(cap: usize) -> Self {
        LogBuffer {
            cap,
            ..Default::default()
        }
    }

    pub fn push(&mut self, level: &str, message: &str) {
        let room = self.cap - self.used;
        if self.dropped_lines > 0 || room == 0 {
            self.dropped_lines += 1;
            self.dropped_bytes += message.len();
            return;
        }
        let kept = if message.len() <= room {
            message
        } else {
            let end = char_floor(message, room);
            self.dropped_lines += 1;
            self.dropped_bytes += message.len() - end;
            &message[..end]
        };
        self.used += kept.len();
        self.lines.push(LogLine {
            level: level.to_owned(),
            message: kept.to_owned(),
        });
    }

    /// The captured lines, ending with a visible marker when anything was cut.
    pub fn finish(mut self) -> (Vec<LogLine>, bool) {
        let truncated = self.dropped_lines > 0;
        if truncated {
            self.lines.push(LogLine {
                level: "warn".to_owned(),
                message: format!(
                    "[scriptd: log truncated at {} bytes; {} more bytes in {} writes dropped]",
                    self.cap, self.dropped_bytes, self.dropped_lines
                ),
            });
        }
        (self.lines, truncated)
    }
}

#[op2(fast)]
fn op_scriptd_log(state: &mut OpState, #[string] level: &str, #[string] message: &str) {
    if let Some(buffer) = state.try_borrow_mut::<LogBuffer>() {
        buffer.push(level, message);
    }
}

deno_core::extension!(
    scriptd,
    ops = [
        op_scriptd_log,
        super::ops::op_scriptd_publish,
        super::ops::op_scriptd_kv_get,
        super::ops::op_scriptd_kv_set,
        super::ops::op_scriptd_kv_delete,
        super::ops::op_scriptd_kv_list,
        super::ops::op_scriptd_fetch,
        super::ops::op_scriptd_secret,
    ],
    esm_entry_point = BOOTSTRAP,
);

/// The sandbox module's specifier.
const BOOTSTRAP: &str = "ext:scriptd/bootstrap.js";

/// The extension, for snapshot creation and for every runtime created from the snapshot
/// (whose JavaScript is then not evaluated again).
///
/// The sandbox's source is compiled into the binary. (The `extension!` macro's `esm = [dir
/// ...]` form records the file's path instead, to be read when a snapshot is built: here
/// that is at run time, so a binary copied away from its source tree, as into a container
/// image, could not build its snapshot, and a running daemon's new engine hosts read
/// whatever the file held by then.)
pub fn extensions() -> Vec<deno_core::Extension> {
    let mut extension = scriptd::init();
    extension.esm_files =
        std::borrow::Cow::Owned(vec![deno_core::ExtensionFileSource::new_computed(
            BOOTSTRAP,
            std::sync::Arc::from(include_str!("bootstrap.js")),
        )]);
    vec![extension]
}

/// The startup snapshot, built once per process on first use (tens of milliseconds).
/// Creating isolates from it is faster than from scratch and avoids an engine defect that
/// makes runtime creation fail after a few hundred runtimes without one.
pub fn snapshot() -> &'static [u8] {
    static SNAPSHOT: OnceLock<&'static [u8]> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        // Built on a thread of its own: a snapshot isolate must not share a thread with the
        // caller's isolates.
        std::thread::spawn(|| {
            let runtime = JsRuntimeForSnapshot::new(RuntimeOptions {
                extensions: extensions(),
                ..Default::default()
            });
            Box::leak(runtime.snapshot()) as &'static [u8]
        })
        .join()
        .expect("building the startup snapshot failed")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_source_is_compiled_in() {
        for extension in extensions() {
            let files = extension.esm_files.iter().chain(extension.js_files.iter());
            for file in files {
                assert!(
                    file.is_runtime_loadable(),
                    "{} would be read from the build machine's disk",
                    file.specifier
                );
            }
        }
    }

    #[test]
    fn log_buffer_cuts_at_the_cap_with_a_marker() {
        let mut b = LogBuffer::new(10);
        b.push("info", "12345");
        b.push("info", "6789ab");
        b.push("info", "dropped");
        let (lines, truncated) = b.finish();
        assert!(truncated);
        assert_eq!(lines[0].message, "12345");
        assert_eq!(lines[1].message, "6789a");
        assert!(lines[2].message.contains("log truncated at 10 bytes"));
        assert!(lines[2].message.contains("8 more bytes in 2 writes"));
    }

    #[test]
    fn log_buffer_never_splits_a_character() {
        let mut b = LogBuffer::new(3);
        b.push("info", "aé€");
        let (lines, _) = b.finish();
        assert_eq!(lines[0].message, "aé");
    }

    #[test]
    fn log_buffer_under_the_cap_is_untouched() {
        let mut b = LogBuffer::new(100);
        b.push("warn", "hello");
        assert_eq!(
            b.finish(),
            (
                vec![LogLine {
                    level: "warn".into(),
                    message: "hello".into()
                }],
                false
            )
        );
    }
}
