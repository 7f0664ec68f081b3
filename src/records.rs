//! Run records and job histories through batches: many runs write their attempt and read
//! their job's history at once, off the hot path. A writer learns when its record is
//! committed; only then is its message acknowledged.

use std::collections::HashMap;
use std::time::Duration;

use crate::batch::{Batcher, Shape};
use crate::store::{RunRecord, Store};

/// Records or lookups per statement, at most.
const MAX_BATCH: usize = 500;
/// How long a batch of records waits for more: its runs' messages are settled this much
/// later, in exchange for fewer statements and commits.
const LINGER: Duration = Duration::from_millis(1);
/// Tries per batch of records before the callers are told it failed (they then leave their
/// messages unacknowledged, so nothing is lost).
const TRIES: u32 = 3;

#[derive(Clone)]
pub struct RecordWriter {
    batcher: Batcher<RunRecord, Result<(), String>>,
}

impl RecordWriter {
    /// Starts the writer task; it ends when every `RecordWriter` clone is dropped.
    pub fn start(store: Store) -> (RecordWriter, tokio::task::JoinHandle<()>) {
        let shape = Shape {
            max: MAX_BATCH,
            linger: LINGER,
            concurrent: 1,
        };
        let (batcher, task) = Batcher::start(shape, move |records: Vec<RunRecord>| {
            let store = store.clone();
            async move {
                let outcome = insert_with_retries(&store, &records).await;
                vec![outcome; records.len()]
            }
        });
        (RecordWriter { batcher }, task)
    }

    /// Queues a record and waits until it is committed.
    pub async fn write(&self, record: RunRecord) -> Result<(), String> {
        self.batcher
            .call(record)
            .await
            .unwrap_or_else(|| Err("the run-record writer has stopped".into()))
    }
}

async fn insert_with_retries(store: &Store, records: &[RunRecord]) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 1..=TRIES {
        // A try whose answer was lost with its connection may have been committed: sent
        // again, it would record those runs twice.
        if let (true, Some(first)) = (attempt > 1, records.first()) {
            if store.run_recorded(first).await.unwrap_or(false) {
                return Ok(());
            }
        }
        match store.insert_runs(records).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                last = format!("{e:#}");
                tracing::warn!(records = records.len(), attempt, error = %last, "Writing run records failed.");
                if attempt < TRIES {
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
            }
        }
    }
    Err(last)
}

/// What is recorded of one job: failed attempts that were retried, and whether it ended.
pub type JobHistory = (u32, bool);

#[derive(Clone)]
pub struct HistoryReader {
    batcher: Batcher<String, Result<JobHistory, String>>,
}

impl HistoryReader {
    pub fn start(store: Store) -> (HistoryReader, tokio::task::JoinHandle<()>) {
        // Lookups stand between an event and its run: a second batch may go while one is
        // under way, so a lookup waits for at most its own round trip.
        let shape = Shape {
            concurrent: 2,
            ..Shape::serial(MAX_BATCH)
        };
        let (batcher, task) = Batcher::start(shape, move |jobs: Vec<String>| {
            let store = store.clone();
            async move {
                match store.job_histories(&jobs).await {
                    Ok(found) => {
                        let found: HashMap<_, _> = found.into_iter().collect();
                        jobs.iter()
                            .map(|j| Ok(found.get(j).copied().unwrap_or((0, false))))
                            .collect()
                    }
                    Err(e) => vec![Err(format!("{e:#}")); jobs.len()],
                }
            }
        });
        (HistoryReader { batcher }, task)
    }

    pub async fn history(&self, job_id: &str) -> Result<JobHistory, String> {
        self.batcher
            .call(job_id.to_owned())
            .await
            .unwrap_or_else(|| Err("the job-history reader has stopped".into()))
    }
}
