//! `/v1/tenants/{tenant}/runs` (newest first, filtered, paged with a cursor; `*` for every
//! tenant with an operator token), one run with
//! its logs, input and result, and the tenant's audit trail.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;

use super::{ApiError, ApiResult, ApiState, Caller, Field, Params, Route};
use crate::domain::{RunStatus, Trigger};
use crate::store::RunFilter;

/// Runs per page unless asked otherwise, and at most.
const PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    script: Option<String>,
    status: Option<RunStatus>,
    trigger: Option<Trigger>,
    /// A failure kind, or a skip's reason.
    kind: Option<String>,
    /// Runs started at or after this instant (RFC 3339).
    since: Option<chrono::DateTime<chrono::Utc>>,
    limit: Option<i64>,
    /// The `next` of the previous page: runs older than that one.
    before: Option<i64>,
    /// Runs recorded after the one with this id: what is new since a page was read.
    after: Option<i64>,
    /// The runs of one job: its attempts.
    job: Option<String>,
}

pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
    Params(query): Params<RunsQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    // `*` reads every tenant's runs: an operator token's (a tenant's is refused).
    caller.acting_for(&tenant)?;
    let limit = query.limit.unwrap_or(PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::Invalid {
            field: Field::Parameter("limit".into()),
            message: format!("limit is 1 to {MAX_PAGE}, not {limit}"),
            refused: false,
        });
    }
    let runs = state
        .store
        .list_runs(&RunFilter {
            tenant: (tenant != crate::store::ALL_TENANTS).then_some(tenant),
            script: query.script,
            status: query.status.map(|s| s.as_str().to_owned()),
            trigger: query.trigger.map(|t| t.as_str().to_owned()),
            kind: query.kind,
            since: query.since,
            before: query.before,
            after: query.after,
            job_id: query.job,
            limit,
        })
        .await?;
    let next = (runs.len() as i64 == limit)
        .then(|| runs.last().map(|r| r.id))
        .flatten();
    Ok(Json(serde_json::json!({ "runs": runs, "next": next })))
}

pub async fn show(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, id)): Route<(String, i64)>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    // Read as the tenant: another tenant's run is not there (404), whatever its id.
    let run = state
        .store
        .run_of(&tenant, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no run {id} of tenant {tenant}")))?;
    let event = match (&run.input, &run.input_ref) {
        (None, Some(at)) => stored_event(&state, &tenant, at).await,
        _ => None,
    };
    let mut view = serde_json::to_value(&run).unwrap_or_default();
    if let Some(event) = event {
        view["input"] = event;
    }
    Ok(Json(view))
}

/// The event a run's input reference (`<events stream>:<sequence>`) names, while the events
/// stream keeps it: its subject, when it was stored and its payload (JSON when it is).
async fn stored_event(state: &ApiState, tenant: &str, at: &str) -> Option<serde_json::Value> {
    let nats = &state.settings.nats;
    let (stream, sequence) = at.rsplit_once(':')?;
    if stream != nats.events_stream() {
        return None;
    }
    let stream = state.js.get_stream(stream).await.ok()?;
    let message = stream.direct_get(sequence.parse().ok()?).await.ok()?;
    // The reference is the tenant's own (its run was read as the tenant); its subject says so.
    let subject = message.subject.as_str();
    subject.strip_prefix(&format!("{}.{tenant}.", nats.events_prefix))?;
    let data = serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&message.payload).into_owned())
    });
    Some(serde_json::json!({
        "subject": subject,
        "stored_at": chrono::DateTime::from_timestamp_nanos(message.time.unix_timestamp_nanos() as i64),
        "data": data,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    limit: Option<i64>,
}

pub async fn audit(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
    Params(query): Params<AuditQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    let limit = query.limit.unwrap_or(PAGE).clamp(1, MAX_PAGE);
    let rows = state.store.audit_trail(&tenant, limit).await?;
    Ok(Json(serde_json::json!({ "entries": rows })))
}
