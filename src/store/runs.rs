//! Run records: one row per attempt, inserted in batches.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::error::{bad_data, Result};
use super::{scoped, Store, ALL_TENANTS};
use crate::domain::{RunStatus, Trigger, Version};

/// One attempt of one job.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    /// The tenant whose script ran.
    pub tenant: String,
    /// The script's name.
    pub script: String,
    /// The script version that ran; `None` for a skipped attempt whose script was gone and whose
    /// job named no version.
    pub version: Option<Version>,
    /// The job the attempt belongs to; the same on every attempt.
    pub job_id: String,
    /// The attempt's number, 1 for the first.
    pub attempt: i32,
    /// What made the job.
    pub trigger: Trigger,
    /// The NATS subject of the event the job handles; `None` for schedule jobs.
    pub subject: Option<String>,
    /// The id of the event the job handles (for a schedule job, the occurrence's job id).
    pub event_id: Option<String>,
    /// How the attempt ended.
    pub status: RunStatus,
    /// The failure's kind, or the skip reason for a skipped attempt; `None` when the run succeeded.
    pub failure_kind: Option<String>,
    /// What went wrong, or why the attempt was skipped; `None` when the run succeeded.
    pub failure_message: Option<String>,
    /// The JavaScript stack of the error that failed the run, when there is one.
    pub failure_stack: Option<String>,
    /// The run's console output: an array of `{level, message}` lines, empty when it did not run.
    pub logs: serde_json::Value,
    /// Whether the log limit cut the output.
    pub logs_truncated: bool,
    /// Whether a new isolate was created for the run.
    pub cold_start: bool,
    /// When the attempt started (for a skipped one, when it was skipped).
    pub started_at: DateTime<Utc>,
    /// How long the run took in the engine, milliseconds; 0 when it did not run.
    pub duration_ms: f64,
    /// For schedule runs: the occurrence they stand for.
    pub scheduled_at: Option<DateTime<Utc>>,
    /// Where the run's input lives: the event's stream and sequence (`SCRIPTD_EVENTS:42`),
    /// for runs of an event or of its replay.
    pub input_ref: Option<String>,
    /// The handler's return value (JSON up to `RESULT_KEPT`; past that a note of its size).
    pub result: Option<serde_json::Value>,
    /// The input itself, for runs whose input is kept nowhere else (HTTP requests), JSON up
    /// to `RESULT_KEPT` like the result.
    pub input: Option<serde_json::Value>,
    /// The W3C trace id of the run's trace, when it has one.
    pub trace_id: Option<String>,
    /// The attempt ran without a claim (a first delivery's direct run). Its record writes
    /// the job's claim row only if the job goes on (`retrying`): a job that ended this way
    /// is known to have ended by its runs (see `CLAIM_SQL`). Not stored; false when read.
    #[serde(skip)]
    pub unclaimed: bool,
}

impl RunRecord {
    /// A synchronous (HTTP) run's record: its caller waits for it and is answered with its
    /// id; the run was never claimed and nothing redelivers it.
    pub fn is_synchronous(&self) -> bool {
        self.trigger == Trigger::Http
    }
}

/// How much of a return value a run record keeps, as JSON.
pub const RESULT_KEPT: usize = 16 * 1024;

impl Store {
    /// One statement for all tenants: a single round trip with a cached prepared statement
    /// on the daemon's store, a transaction that declares the scope otherwise.
    pub(super) async fn all_tenants_query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let mut client = self.client().await?;
        if self.all_tenants {
            let statement = client.prepare_cached(sql).await?;
            return Ok(client.query(&statement, params).await?);
        }
        let tx = scoped(&mut client, ALL_TENANTS).await?;
        let rows = tx.query(sql, params).await?;
        tx.commit().await?;
        Ok(rows)
    }

    async fn all_tenants_statement(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<()> {
        self.all_tenants_query(sql, params).await.map(drop)
    }

    /// The ids of `records` if they are in `runs` (same job, attempt and start), in their
    /// order; none if they are not. A batch is inserted by one statement, all or nothing,
    /// so this tells whether a batch whose answer was lost with its connection was committed.
    pub async fn recorded_ids(&self, records: &[RunRecord]) -> Result<Option<Vec<i64>>> {
        let jobs: Vec<&str> = records.iter().map(|r| r.job_id.as_str()).collect();
        let attempts: Vec<i32> = records.iter().map(|r| r.attempt).collect();
        let started: Vec<DateTime<Utc>> = records.iter().map(|r| r.started_at).collect();
        let rows = self
            .all_tenants_query(
                "SELECT r.id, r.job_id, r.attempt FROM runs r
                 JOIN unnest($1::text[], $2::int[], $3::timestamptz[]) AS k(job_id, attempt, at)
                   ON r.job_id = k.job_id AND r.attempt = k.attempt AND r.started_at = k.at",
                &[&jobs, &attempts, &started],
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(in_order(records, &rows)))
    }

    /// Inserts a batch of run records in one statement (so all or none of them are
    /// committed; see `recorded_ids`), releasing the claims of the attempts that held one or
    /// go on (`writes_claim`). Their ids, in order, when the batch holds a synchronous (HTTP)
    /// run, whose caller is answered with its id, or writes a claim; otherwise none: asking
    /// for ids nothing reads cost PostgreSQL and the daemon a few µs per record
    /// (BENCHMARKS.md).
    pub async fn insert_runs(&self, records: &[RunRecord]) -> Result<Vec<Option<i64>>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // Columns borrow from the records: text is written straight into the statement's
        // parameters, not copied into new strings first.
        macro_rules! column {
            ($field:ident) => {
                records.iter().map(|r| r.$field).collect::<Vec<_>>()
            };
            ($field:ident as str) => {
                records
                    .iter()
                    .map(|r| r.$field.as_str())
                    .collect::<Vec<_>>()
            };
            ($field:ident as option) => {
                records
                    .iter()
                    .map(|r| r.$field.as_deref())
                    .collect::<Vec<_>>()
            };
            // Text a script or a publisher wrote: it may hold NUL characters.
            ($field:ident as untrusted) => {
                records
                    .iter()
                    .map(|r| r.$field.as_deref().map(storable))
                    .collect::<Vec<_>>()
            };
        }
        let logs: Vec<String> = records.iter().map(|r| storable_json(&r.logs)).collect();
        let results: Vec<Option<String>> = records
            .iter()
            .map(|r| r.result.as_ref().map(storable_json))
            .collect();
        let inputs: Vec<Option<String>> = records
            .iter()
            .map(|r| r.input.as_ref().map(storable_json))
            .collect();
        // Most batches are first deliveries' runs that ended their jobs: no claim to write,
        // and the statement without the claims part costs less per row (BENCHMARKS.md).
        let claims: Vec<bool> = records.iter().map(writes_claim).collect();
        let (statement, answers_ids) = if claims.contains(&true) {
            (RECORD_AND_RELEASE, true)
        } else if records.iter().any(RunRecord::is_synchronous) {
            (RECORD_ONLY, true)
        } else {
            (RECORD_ONLY_QUIETLY, false)
        };
        let rows = self
            .all_tenants_query(
                statement,
                &[
                    &column!(tenant as str),
                    &column!(script as str),
                    &column!(version),
                    &column!(job_id as str),
                    &column!(attempt),
                    &column!(trigger as str),
                    &column!(subject as untrusted),
                    &column!(event_id as untrusted),
                    &column!(status as str),
                    &column!(failure_kind as option),
                    &column!(failure_message as untrusted),
                    &column!(failure_stack as untrusted),
                    &logs,
                    &column!(logs_truncated),
                    &column!(cold_start),
                    &column!(started_at),
                    &column!(duration_ms),
                    &column!(scheduled_at),
                    &column!(input_ref as option),
                    &results,
                    &inputs,
                    &column!(trace_id as untrusted),
                    &claims,
                ],
            )
            .await?;
        if !answers_ids {
            return Ok(vec![None; records.len()]);
        }
        Ok(in_order(records, &rows).into_iter().map(Some).collect())
    }
}

/// `text` as PostgreSQL can store it: it takes no NUL character (U+0000) in text or jsonb,
/// and one such value would fail its whole batch of records, again on every try. A record
/// keeps U+FFFD in its place.
fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// `value` written as JSON that PostgreSQL can store (see `storable`).
fn storable_json(value: &serde_json::Value) -> String {
    let text = value.to_string();
    // serde_json writes U+0000 as this escape; a false alarm (an escaped backslash before
    // `u0000`) only costs the walk.
    if !text.contains("\\u0000") {
        return text;
    }
    fn clean(value: &serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::String(s) => Value::String(storable(s).into_owned()),
            Value::Array(items) => Value::Array(items.iter().map(clean).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (storable(k).into_owned(), clean(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    clean(value).to_string()
}

/// The batch's rows, one per record, from the statement's 23 array parameters.
macro_rules! record_rows {
    () => {
        "WITH t AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::int[],
                $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
                $12::text[], $13::text[], $14::bool[], $15::bool[], $16::timestamptz[],
                $17::float8[], $18::timestamptz[], $19::text[], $20::text[], $21::text[],
                $22::text[], $23::bool[])
            AS t(tenant, script, version, job_id, attempt, trigger, subject, event_id,
                status, failure_kind, failure_message, failure_stack, logs,
                logs_truncated, cold_start, started_at, duration_ms, scheduled_at,
                input_ref, result, input, trace_id, writes_claim)
         )"
    };
}

/// The insert of the batch's rows into `runs` (followed by `returning_ids!` where their ids
/// are wanted).
macro_rules! insert_runs {
    () => {
        "INSERT INTO runs (tenant, script, version, job_id, attempt, trigger, subject,
            event_id, status, failure_kind, failure_message, failure_stack, logs,
            logs_truncated, cold_start, started_at, duration_ms, scheduled_at,
            input_ref, result, input, trace_id)
         SELECT t.tenant, t.script, t.version, t.job_id, t.attempt, t.trigger,
            t.subject, t.event_id, t.status, t.failure_kind, t.failure_message,
            t.failure_stack, t.logs::jsonb, t.logs_truncated, t.cold_start,
            t.started_at, t.duration_ms, t.scheduled_at, t.input_ref,
            t.result::jsonb, t.input::jsonb, t.trace_id
         FROM t"
    };
}

/// What `in_order` reads of the inserted rows.
macro_rules! returning_ids {
    () => {
        " RETURNING id, job_id, attempt"
    };
}

/// A batch of records, each releasing its attempt's claim in the same statement: a retried
/// attempt opens the next one, any other status ends the job. A job ended by an attempt
/// that held no claim gets no claim row: its runs say it ended. Which records write one,
/// `writes_claim` says (the 23rd parameter).
const RECORD_AND_RELEASE: &str = concat!(
    record_rows!(),
    ", inserted AS (",
    insert_runs!(),
    returning_ids!(),
    "), released AS (
        INSERT INTO attempt_claims AS c (job_id, tenant, attempt, state, replica,
            claimed_at, lease_until, first_claimed_at)
        SELECT DISTINCT ON (job_id) job_id, tenant, attempt,
            CASE WHEN status = 'retrying' THEN 'open' ELSE 'ended' END, '', started_at,
            now(), started_at
        FROM t WHERE writes_claim
        ORDER BY job_id, attempt DESC
        ON CONFLICT (job_id) DO UPDATE SET
            state = EXCLUDED.state, attempt = EXCLUDED.attempt, lease_until = now()
        WHERE c.state <> 'ended' AND c.attempt <= EXCLUDED.attempt
     )
     SELECT id, job_id, attempt FROM inserted"
);

/// A batch of records none of which writes a claim, answering their ids.
const RECORD_ONLY: &str = concat!(record_rows!(), " ", insert_runs!(), returning_ids!());

/// A batch of records none of which writes a claim or needs its id: most batches.
const RECORD_ONLY_QUIETLY: &str = concat!(record_rows!(), " ", insert_runs!());

/// Whether a record writes its job's claim in `RECORD_AND_RELEASE`: a synchronous run (HTTP)
/// was never claimed and nothing redelivers it; a run without a claim that ended its job
/// leaves the job's runs to say so.
fn writes_claim(r: &RunRecord) -> bool {
    !r.is_synchronous() && (!r.unclaimed || r.status == RunStatus::Retrying)
}

/// The ids of `rows` (id, job id, attempt) in the order of `records`; 0 for one not found.
fn in_order(records: &[RunRecord], rows: &[tokio_postgres::Row]) -> Vec<i64> {
    let ids: std::collections::HashMap<(&str, i32), i64> = rows
        .iter()
        .map(|r| ((r.get(1), r.get(2)), r.get(0)))
        .collect();
    records
        .iter()
        .map(|r| {
            ids.get(&(r.job_id.as_str(), r.attempt))
                .copied()
                .unwrap_or_default()
        })
        .collect()
}

/// What the overlap lock said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockOutcome {
    /// This job holds the lock: run.
    Acquired,
    /// Another job holds it.
    Held,
    /// Another job holds it and this one is the one waiting (queue-one).
    Waiting,
}

impl Store {
    /// The latest occurrence of a script's schedule that has a run record.
    pub async fn last_scheduled(
        &self,
        tenant: &str,
        script: &str,
    ) -> Result<Option<DateTime<Utc>>> {
        let rows = self
            .all_tenants_query(
                "SELECT max(scheduled_at) FROM runs
                 WHERE tenant = $1 AND script = $2 AND scheduled_at IS NOT NULL",
                &[&tenant, &script],
            )
            .await?;
        Ok(rows.first().and_then(|r| r.get(0)))
    }

    /// Takes the overlap lock of a schedule for `job_id` until `expires_at`, unless another
    /// job holds it and has not expired. With `queue` a job may wait as the single queued one.
    pub async fn lock_schedule(
        &self,
        tenant: &str,
        script: &str,
        job_id: &str,
        expires_at: DateTime<Utc>,
        queue: bool,
    ) -> Result<LockOutcome> {
        let rows = self
            .all_tenants_query(
                "INSERT INTO schedule_locks (tenant, script, job_id, expires_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tenant, script) DO UPDATE
                    SET job_id = EXCLUDED.job_id, expires_at = EXCLUDED.expires_at,
                        queued_job = NULL
                    WHERE schedule_locks.expires_at < now()
                       OR schedule_locks.job_id = EXCLUDED.job_id
                 RETURNING job_id",
                &[&tenant, &script, &job_id, &expires_at],
            )
            .await?;
        if !rows.is_empty() {
            return Ok(LockOutcome::Acquired);
        }
        if !queue {
            return Ok(LockOutcome::Held);
        }
        let queued = self
            .all_tenants_query(
                "UPDATE schedule_locks SET queued_job = $3
                 WHERE tenant = $1 AND script = $2 AND (queued_job IS NULL OR queued_job = $3)
                 RETURNING queued_job",
                &[&tenant, &script, &job_id],
            )
            .await?;
        Ok(if queued.is_empty() {
            LockOutcome::Held
        } else {
            LockOutcome::Waiting
        })
    }

    /// Releases the overlap lock if `job_id` holds it.
    pub async fn unlock_schedule(&self, tenant: &str, script: &str, job_id: &str) -> Result<()> {
        self.all_tenants_statement(
            "DELETE FROM schedule_locks WHERE tenant = $1 AND script = $2 AND job_id = $3
               AND queued_job IS NULL",
            &[&tenant, &script, &job_id],
        )
        .await?;
        self.all_tenants_statement(
            "UPDATE schedule_locks SET expires_at = now() - interval '1 second'
             WHERE tenant = $1 AND script = $2 AND job_id = $3",
            &[&tenant, &script, &job_id],
        )
        .await
    }
}

/// Which runs to list.
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    /// Only this tenant's runs.
    pub tenant: Option<String>,
    /// Only runs of scripts with this name.
    pub script: Option<String>,
    /// Only runs with this status (`ok`, `retrying`, `dead_lettered`, `skipped`, `failed`).
    pub status: Option<String>,
    /// Only runs started at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only the runs of this job.
    pub job_id: Option<String>,
    /// Only runs older than the one with this id (the cursor of a page of runs).
    pub before: Option<i64>,
    /// Only runs recorded after the one with this id (to follow new runs by polling).
    pub after: Option<i64>,
    /// Only runs of this trigger (`event`, `schedule`, `replay`, `http`).
    pub trigger: Option<String>,
    /// Only runs that failed (or were skipped) with this kind.
    pub kind: Option<String>,
    /// At most this many runs, newest first (at least 1).
    pub limit: i64,
}

/// A stored run, as `runs list` and `runs show` print it: the record and its row id.
#[derive(Clone, Debug, Serialize)]
pub struct StoredRun {
    /// The run record's row id, as `runs show` takes it.
    pub id: i64,
    /// The record.
    #[serde(flatten)]
    pub run: RunRecord,
}

impl std::ops::Deref for StoredRun {
    type Target = RunRecord;

    fn deref(&self) -> &RunRecord {
        &self.run
    }
}

const STORED_RUN_COLUMNS: &str = "id, tenant, script, version, job_id, attempt, trigger,
    subject, event_id, status, failure_kind, failure_message, failure_stack, logs,
    logs_truncated, cold_start, started_at, duration_ms, scheduled_at, input_ref, result,
    input, trace_id";

impl Store {
    /// Runs matching `filter`, newest first.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<StoredRun>> {
        let scope = filter.tenant.as_deref().unwrap_or(ALL_TENANTS);
        let mut client = self.client().await?;
        let tx = scoped(&mut client, scope).await?;
        let rows = tx
            .query(
                &format!(
                    "SELECT {STORED_RUN_COLUMNS} FROM runs
                 WHERE ($1::text IS NULL OR tenant = $1)
                   AND ($2::text IS NULL OR script = $2)
                   AND ($3::text IS NULL OR status = $3)
                   AND ($4::timestamptz IS NULL OR started_at >= $4)
                   AND ($5::text IS NULL OR job_id = $5)
                   AND ($7::bigint IS NULL OR (started_at, id) <
                        (SELECT c.started_at, c.id FROM runs c WHERE c.id = $7))
                   AND ($8::bigint IS NULL OR id > $8)
                   AND ($9::text IS NULL OR trigger = $9)
                   AND ($10::text IS NULL OR failure_kind = $10)
                 ORDER BY started_at DESC, id DESC
                 LIMIT $6"
                ),
                &[
                    &filter.tenant,
                    &filter.script,
                    &filter.status,
                    &filter.since,
                    &filter.job_id,
                    &filter.limit.max(1),
                    &filter.before,
                    &filter.after,
                    &filter.trigger,
                    &filter.kind,
                ],
            )
            .await?;
        tx.commit().await?;
        rows.iter().map(stored_run).collect()
    }

    /// Runs recorded after the one with id `after` (0 for all), oldest first, at most
    /// `limit`: for following runs as they are recorded.
    pub async fn runs_after(&self, after: i64, limit: i64) -> Result<Vec<StoredRun>> {
        let rows = self
            .all_tenants_query(
                &format!(
                    "SELECT {STORED_RUN_COLUMNS} FROM runs WHERE id > $1 ORDER BY id LIMIT $2"
                ),
                &[&after, &limit.max(1)],
            )
            .await?;
        rows.iter().map(stored_run).collect()
    }

    /// The id of the newest run record, 0 when there is none.
    pub async fn last_run_id(&self) -> Result<i64> {
        let rows = self
            .all_tenants_query("SELECT coalesce(max(id), 0) FROM runs", &[])
            .await?;
        Ok(rows.first().map_or(0, |r| r.get(0)))
    }

    /// One run of `tenant` by id, read as that tenant: none if it is another's.
    pub async fn run_of(&self, tenant: &str, id: i64) -> Result<Option<StoredRun>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let row = tx
            .query_opt(
                &format!("SELECT {STORED_RUN_COLUMNS} FROM runs WHERE id = $1 AND tenant = $2"),
                &[&id, &tenant],
            )
            .await?;
        tx.commit().await?;
        row.as_ref().map(stored_run).transpose()
    }

    /// One run by id.
    pub async fn run_by_id(&self, id: i64) -> Result<Option<StoredRun>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, ALL_TENANTS).await?;
        let row = tx
            .query_opt(
                &format!("SELECT {STORED_RUN_COLUMNS} FROM runs WHERE id = $1"),
                &[&id],
            )
            .await?;
        tx.commit().await?;
        row.as_ref().map(stored_run).transpose()
    }
}

fn stored_run(r: &tokio_postgres::Row) -> Result<StoredRun> {
    Ok(StoredRun {
        id: r.get(0),
        run: RunRecord {
            tenant: r.get(1),
            script: r.get(2),
            version: r.get(3),
            job_id: r.get(4),
            attempt: r.get(5),
            trigger: r
                .get::<_, String>(6)
                .parse()
                .map_err(|e| bad_data("trigger", e))?,
            subject: r.get(7),
            event_id: r.get(8),
            status: r
                .get::<_, String>(9)
                .parse()
                .map_err(|e| bad_data("run status", e))?,
            failure_kind: r.get(10),
            failure_message: r.get(11),
            failure_stack: r.get(12),
            logs: r.get(13),
            logs_truncated: r.get(14),
            cold_start: r.get(15),
            started_at: r.get(16),
            duration_ms: r.get(17),
            scheduled_at: r.get(18),
            input_ref: r.get(19),
            result: r.get(20),
            input: r.get(21),
            trace_id: r.get(22),
            unclaimed: false,
        },
    })
}
