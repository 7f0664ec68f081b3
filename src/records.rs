//! The run-record writer: attempts are queued from many runs and inserted in batches, off
//! the hot path; each caller learns when its record is committed (only then is its message
//! acknowledged).

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::store::{RunRecord, Store};

/// Records per insert, at most.
const MAX_BATCH: usize = 500;
/// Tries per batch before the callers are told it failed (they then leave their messages
/// unacknowledged, so nothing is lost).
const TRIES: u32 = 3;

type Pending = (RunRecord, oneshot::Sender<Result<(), String>>);

#[derive(Clone)]
pub struct RecordWriter {
    tx: mpsc::Sender<Pending>,
}

impl RecordWriter {
    /// Starts the writer task; it ends when every `RecordWriter` clone is dropped.
    pub fn start(store: Store) -> (RecordWriter, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let task = tokio::spawn(write_batches(store, rx));
        (RecordWriter { tx }, task)
    }

    /// Queues a record and waits until it is committed.
    pub async fn write(&self, record: RunRecord) -> Result<(), String> {
        let (done, committed) = oneshot::channel();
        self.tx
            .send((record, done))
            .await
            .map_err(|_| "the run-record writer has stopped".to_string())?;
        committed
            .await
            .unwrap_or_else(|_| Err("the run-record writer has stopped".into()))
    }
}

async fn write_batches(store: Store, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let records: Vec<RunRecord> = batch.iter().map(|(r, _)| r.clone()).collect();
        let mut outcome = Err(String::new());
        for attempt in 1..=TRIES {
            match store.insert_runs(&records).await {
                Ok(()) => {
                    outcome = Ok(());
                    break;
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    tracing::warn!(records = records.len(), attempt, error = %message, "Writing run records failed.");
                    outcome = Err(message);
                    if attempt < TRIES {
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    }
                }
            }
        }
        for (_, done) in batch.drain(..) {
            let _ = done.send(outcome.clone());
        }
    }
}
