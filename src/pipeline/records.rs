//! Run records and attempt claims through batches: many runs claim their attempt and
//! write its record at once, off the hot path. A writer learns when its record is
//! committed; only then is its message acknowledged.

use std::sync::Arc;
use std::time::Duration;

use crate::pipeline::batch::{Batcher, Shape};
use crate::store::{Claim, ClaimRequest, ClaimScope, Release, RunRecord, Store, StoreError};

/// Why a record was not written or a claim not taken: the store's error (shared by every
/// caller whose item was in the failed batch), or the batch task gone.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BatchError {
    /// The store failed the batch.
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// The task that writes these batches has stopped (the daemon is stopping).
    #[error("the {0} task has stopped")]
    Stopped(&'static str),
}

impl BatchError {
    /// Whether PostgreSQL refused a value of the batch (`StoreError::refused_a_value`).
    pub fn refused_a_value(&self) -> bool {
        matches!(self, BatchError::Store(e) if e.refused_a_value())
    }
}

impl From<StoreError> for BatchError {
    fn from(e: StoreError) -> BatchError {
        BatchError::Store(Arc::new(e))
    }
}

/// Records or lookups per statement, at most.
const MAX_BATCH: usize = 500;
/// How long a batch of records waits for more: its runs' messages are settled this much
/// later, in exchange for fewer statements and commits (2 ms rather than 1: 0.13 → 0.10
/// transactions per event, BENCHMARKS.md). A batch holding a synchronous (HTTP) run, whose
/// caller waits for its record, goes at once.
const LINGER: Duration = Duration::from_millis(2);
/// Tries per batch of records before the callers are told it failed (they then leave their
/// messages unacknowledged, so nothing is lost).
const TRIES: u32 = 3;

/// Writes run records in batches (see the module's doc).
#[derive(Clone)]
pub struct RecordWriter {
    batcher: Batcher<RunRecord, Result<Option<i64>, BatchError>>,
}

impl RecordWriter {
    /// Starts the writer task; it ends when every `RecordWriter` clone is dropped. Records
    /// are inserted through `inserts` (`Store::connect_records`); whether a failed try was
    /// committed after all is looked up through `store`.
    pub fn start(store: Store, inserts: Store) -> (RecordWriter, tokio::task::JoinHandle<()>) {
        let shape = Shape {
            max: MAX_BATCH,
            linger: LINGER,
            concurrent: 1,
        };
        let (batcher, task) = Batcher::start(shape, move |records: Vec<RunRecord>| {
            let (store, inserts) = (store.clone(), inserts.clone());
            async move {
                match insert_with_retries(&store, &inserts, &records).await {
                    Ok(ids) => ids.into_iter().map(Ok).collect(),
                    // A value PostgreSQL will not store fails the statement, so the whole
                    // batch: each record then goes alone, and only the one holding such a
                    // value fails (its message comes back), not the runs beside it.
                    Err(e) if records.len() > 1 && e.refused_a_value() => {
                        tracing::warn!(records = records.len(), error = %e, "A record batch held a value PostgreSQL refused; writing its records one by one.");
                        let mut answers = Vec::with_capacity(records.len());
                        for record in &records {
                            let one = std::slice::from_ref(record);
                            answers.push(
                                insert_with_retries(&store, &inserts, one)
                                    .await
                                    .map(|ids| ids[0]),
                            );
                        }
                        answers
                    }
                    Err(e) => vec![Err(e); records.len()],
                }
            }
        });
        (RecordWriter { batcher }, task)
    }

    /// Queues a record and waits until it is committed; the run's id when its batch was
    /// asked for ids, as it always is for a synchronous (HTTP) run (`Store::insert_runs`).
    pub async fn write(&self, record: RunRecord) -> Result<Option<i64>, BatchError> {
        let answer = if record.is_synchronous() {
            self.batcher.call_soon(record).await
        } else {
            self.batcher.call(record).await
        };
        answer.unwrap_or(Err(BatchError::Stopped("run-record writer")))
    }
}

async fn insert_with_retries(
    store: &Store,
    inserts: &Store,
    records: &[RunRecord],
) -> Result<Vec<Option<i64>>, BatchError> {
    let mut last = BatchError::Stopped("run-record writer");
    for attempt in 1..=TRIES {
        // A try whose answer was lost with its connection may have been committed: sent
        // again, it would record those runs twice.
        if attempt > 1 {
            if let Ok(Some(ids)) = store.recorded_ids(records).await {
                return Ok(ids.into_iter().map(Some).collect());
            }
        }
        match inserts.insert_runs(records).await {
            Ok(ids) => return Ok(ids),
            // The same values would be refused again.
            Err(e) if e.refused_a_value() => return Err(e.into()),
            Err(e) => {
                tracing::warn!(records = records.len(), attempt, error = %e, "Writing run records failed.");
                last = e.into();
                if attempt < TRIES {
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
            }
        }
    }
    Err(last)
}

/// Attempt claims, and their hand-backs, through batches: many runs claim their attempt
/// at once. One per kind of caller (job lanes take any attempt, direct runs the first only).
#[derive(Clone)]
pub struct ClaimTaker {
    claims: Batcher<ClaimRequest, Result<Claim, BatchError>>,
    releases: Batcher<Release, Result<(), BatchError>>,
}

impl ClaimTaker {
    /// Starts the two batch tasks; they end when every `ClaimTaker` clone is dropped.
    pub fn start(
        store: Store,
        replica: Arc<str>,
        scope: ClaimScope,
    ) -> (ClaimTaker, tokio::task::JoinHandle<()>) {
        // A claim stands between an event and its run: a second batch may go while one is
        // under way, so a claim waits for at most its own round trip. (One batch at a time
        // makes larger batches, ~5 µs less of PostgreSQL's CPU per event, but put ~0.3 ms on
        // p99 publish → run start at 500 events/s: 3.86 – 4.38 ms against 3.46 – 3.66 ms,
        // peers harness, in turns.)
        let shape = Shape {
            concurrent: 2,
            ..Shape::serial(MAX_BATCH)
        };
        let (db, who) = (store.clone(), replica.clone());
        let (claims, claiming) = Batcher::start(shape, move |requests: Vec<ClaimRequest>| {
            let (store, replica) = (db.clone(), who.clone());
            async move {
                match store.claim_attempts(&replica, scope, &requests).await {
                    Ok(claims) => claims.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(BatchError::from(e)); requests.len()],
                }
            }
        });
        let (releases, releasing) = Batcher::start(shape, move |released: Vec<Release>| {
            let (store, replica) = (store.clone(), replica.clone());
            async move {
                let outcome = store
                    .release_claims(&replica, &released)
                    .await
                    .map_err(BatchError::from);
                vec![outcome; released.len()]
            }
        });
        let task = tokio::spawn(async move {
            let _ = tokio::join!(claiming, releasing);
        });
        (ClaimTaker { claims, releases }, task)
    }

    /// Claims the next attempt of a job (see `Store::claim_attempts`).
    pub async fn claim(&self, request: ClaimRequest) -> Result<Claim, BatchError> {
        self.claims
            .call(request)
            .await
            .unwrap_or(Err(BatchError::Stopped("attempt-claim")))
    }

    /// Hands back a claimed attempt that did not run. If this fails the claim stays until
    /// its lease ends, and the job waits that long.
    pub async fn release(&self, job_id: &str, tenant: &str, attempt: u32) {
        let release = Release {
            job_id: job_id.to_owned(),
            tenant: tenant.to_owned(),
            attempt,
        };
        let outcome = self
            .releases
            .call(release)
            .await
            .unwrap_or(Err(BatchError::Stopped("attempt-claim")));
        if let Err(e) = outcome {
            tracing::warn!(job = %job_id, attempt, error = %e, "Could not hand back an attempt claim; the job waits for its lease to end.");
        }
    }
}
