//! The daemon's long-running tasks under watch: each is spawned with a name, and one that
//! ends before the daemon stops, or panics at any time, is reported by name.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How a task ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// It returned (a task that should run until shutdown).
    Returned,
    /// It panicked, with this message.
    Panicked(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Returned => f.write_str("ended"),
            Ended::Panicked(message) => write!(f, "panicked: {message}"),
        }
    }
}

/// The daemon stopped because one of its tasks failed (the process then exits with 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TaskFailed(pub String);

/// A task that ended, by name.
pub type TaskEnd = (&'static str, Ended);

/// Spawns named tasks and hears when each ends.
pub struct Supervisor {
    tx: mpsc::UnboundedSender<TaskEnd>,
    rx: mpsc::UnboundedReceiver<TaskEnd>,
}

impl Default for Supervisor {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Supervisor { tx, rx }
    }
}

impl Supervisor {
    /// Spawns `task` as `name`. The handle completes after the end is reported; a panic
    /// is caught and reported rather than resumed.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let ended = match AssertUnwindSafe(task).catch_unwind().await {
                Ok(()) => Ended::Returned,
                Err(panic) => Ended::Panicked(panic_message(panic.as_ref())),
            };
            let _ = tx.send((name, ended));
        })
    }

    /// Waits until `stop` is cancelled (then `None`) or a task ends first (then which and
    /// how).
    pub async fn watch(&mut self, stop: &CancellationToken) -> Option<TaskEnd> {
        tokio::select! {
            biased;
            _ = stop.cancelled() => None,
            end = self.rx.recv() => end,
        }
    }

    /// The tasks that panicked since they were last asked for (a panic while draining is
    /// as much a failure as one before).
    pub fn panics(&mut self) -> Vec<TaskEnd> {
        let mut panics = Vec::new();
        while let Ok(end) = self.rx.try_recv() {
            if matches!(end.1, Ended::Panicked(_)) {
                panics.push(end);
            }
        }
        panics
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic with no message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_early_is_named_and_a_panic_is_caught() {
        let mut supervisor = Supervisor::default();
        let stop = CancellationToken::new();
        let forever = supervisor.spawn("forever", {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        let ended = supervisor.spawn("short", async {});
        assert_eq!(
            supervisor.watch(&stop).await,
            Some(("short", Ended::Returned))
        );
        ended.await.unwrap();
        let broken = supervisor.spawn("broken", async { panic!("lane lost") });
        assert_eq!(
            supervisor.watch(&stop).await,
            Some(("broken", Ended::Panicked("lane lost".into())))
        );
        broken.await.expect("the panic is caught, not resumed");
        stop.cancel();
        assert_eq!(supervisor.watch(&stop).await, None);
        forever.await.unwrap();
        // The orderly end after the stop is no failure; a panic while draining is.
        supervisor
            .spawn("late", async { panic!("{}", String::from("late")) })
            .await
            .unwrap();
        assert_eq!(
            supervisor.panics(),
            vec![("late", Ended::Panicked("late".into()))]
        );
    }
}
