//! `/v1/tenants/{tenant}/events` (an HTTP ingress: the same subject rules and size limit as
//! NATS publishers) and the tenant's dead letters: list, replay.

use async_nats::HeaderMap;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;

use super::{audited, ApiError, ApiResult, ApiState, Body, Caller, Params, Route};
use crate::bus::dlq::{self, LetterFilter};
use crate::bus::replay::{self, VersionChoice};
use crate::pipeline::attempt::Defaults;
use crate::pipeline::dry_run;
use crate::store::RunFilter;
use crate::subject;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBody {
    /// Tenant-relative type (`order.created`).
    #[serde(rename = "type")]
    event_type: String,
    /// The payload, published as JSON.
    data: serde_json::Value,
    /// An id for the event (its `Nats-Msg-Id`): JetStream stores an id once within the
    /// duplicate window, so a publish retried with the same id is not a second event.
    #[serde(default)]
    id: Option<String>,
}

pub async fn publish(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
    Body(body): Body<EventBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let target = body.event_type.clone();
    let work = async {
        subject::validate_event_type(&body.event_type)
            .map_err(|e| ApiError::refused_field("/type", e.to_string()))?;
        let nats = &state.settings.nats;
        let payload = serde_json::to_vec(&body.data).unwrap_or_default();
        if payload.len() as u64 > nats.max_event_size.0 {
            return Err(ApiError::refused_field(
                "/data",
                format!(
                    "the event is {} bytes, over nats.max_event_size ({})",
                    payload.len(),
                    nats.max_event_size
                ),
            ));
        }
        let mut headers = HeaderMap::new();
        if let Some(id) = &body.id {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        let subject = format!("{}.{}.{}", nats.events_prefix, tenant, body.event_type);
        let ack = state
            .js
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
            .map_err(|e| ApiError::Unavailable(format!("NATS did not take the event: {e}")))?
            .await
            .map_err(|e| {
                ApiError::Unavailable(format!("JetStream did not store the event: {e}"))
            })?;
        Ok(Json(serde_json::json!({
            "subject": subject,
            "sequence": ack.sequence,
            "duplicate": ack.duplicate,
        })))
    };
    audited(&state, &caller, &tenant, "events.publish", &target, work).await
}

async fn letters_stream(state: &ApiState) -> ApiResult<async_nats::jetstream::stream::Stream> {
    state
        .js
        .get_stream(state.settings.nats.dlq_stream())
        .await
        .map_err(|e| ApiError::Unavailable(format!("the dead-letter stream: {e}")))
}

/// The dead letter at `sequence`, if it is `tenant`'s: another tenant's is answered as if
/// it did not exist (404). With the stream it is in.
async fn tenant_letter(
    state: &ApiState,
    tenant: &str,
    sequence: u64,
) -> ApiResult<(async_nats::jetstream::stream::Stream, dlq::StoredLetter)> {
    let stream = letters_stream(state).await?;
    let missing = || ApiError::NotFound(format!("no dead letter {sequence} of tenant {tenant}"));
    let stored = dlq::get(&stream, sequence).await.map_err(|_| missing())?;
    if stored.letter.tenant != tenant {
        return Err(missing());
    }
    Ok((stream, stored))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LettersQuery {
    script: Option<String>,
    kind: Option<String>,
    limit: Option<usize>,
}

pub async fn dead_letters(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
    Params(query): Params<LettersQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    let mut stream = letters_stream(&state).await?;
    let filter = LetterFilter {
        tenant: Some(tenant),
        script: query.script,
        kind: query.kind,
        since: None,
    };
    let letters = dlq::list(
        &mut stream,
        &filter,
        query.limit.unwrap_or(100).clamp(1, 1000),
    )
    .await
    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(serde_json::json!({ "dead_letters": letters })))
}

/// One dead letter with the run records of every attempt of its job.
pub async fn dead_letter(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, sequence)): Route<(String, u64)>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    let (_, stored) = tenant_letter(&state, &tenant, sequence).await?;
    let runs = state
        .store
        .list_runs(&RunFilter {
            tenant: Some(tenant.clone()),
            job_id: Some(stored.letter.job_id.clone()),
            limit: 1000,
            ..Default::default()
        })
        .await?;
    Ok(Json(
        serde_json::json!({ "dead_letter": stored, "runs": runs }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// `latest` (default), `pinned` or a version number.
    #[serde(default)]
    version: Option<String>,
    /// Run the replay's first attempt as a dry run and say how it ends; nothing is
    /// queued and the dead letter stays.
    #[serde(default)]
    dry_run: bool,
}

pub async fn replay(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, sequence)): Route<(String, u64)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    // The body is optional: none is `{}`.
    let body: ReplayBody = if body.is_empty() {
        ReplayBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("the body: {e}")))?
    };
    let work = async {
        let choice: VersionChoice = body
            .version
            .as_deref()
            .unwrap_or("latest")
            .parse()
            .map_err(|e: String| ApiError::Invalid {
                field: super::Field::Pointer("/version".into()),
                message: e,
                refused: false,
            })?;
        let (stream, stored) = tenant_letter(&state, &tenant, sequence).await?;
        let (job, headers) =
            replay::replay_job(&stored, choice).map_err(|e| ApiError::Refused(e.to_string()))?;
        if body.dry_run {
            let trial = state.trial().await?;
            let _turn = trial.turn.lock().await;
            let defaults = Defaults {
                limits: state.settings.engine.limits,
                retry: state.settings.retry,
            };
            let outcome =
                dry_run::replay(&state.store, &trial.engine, &trial.caps, &defaults, &job)
                    .await
                    .map_err(|e| ApiError::Unavailable(format!("{e:#}")))?;
            return Ok(Json(outcome));
        }
        let job_sequence = replay::publish(&state.js, &state.settings.nats, &job, headers)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        stream.delete_message(sequence).await.map_err(|e| {
            ApiError::Unavailable(format!(
                "the replay is queued but the dead letter stays: {e}"
            ))
        })?;
        Ok(Json(serde_json::json!({
            "dead_letter": sequence,
            "job": job.id,
            "job_sequence": job_sequence,
        })))
    };
    let action = if body.dry_run {
        "dead_letters.replay_dry_run"
    } else {
        "dead_letters.replay"
    };
    audited(
        &state,
        &caller,
        &tenant,
        action,
        &sequence.to_string(),
        work,
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeBody {
    script: Option<String>,
    kind: Option<String>,
    /// Must be true: without it, only the count of what would be deleted is answered.
    #[serde(default)]
    confirm: bool,
}

/// Deletes the tenant's dead letters matching the filter (all of them with none), once
/// confirmed; unconfirmed, says how many would go.
pub async fn purge(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
    Body(body): Body<PurgeBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let target = format!(
        "script={} kind={}",
        body.script.as_deref().unwrap_or("*"),
        body.kind.as_deref().unwrap_or("*")
    );
    let work = async {
        let mut stream = letters_stream(&state).await?;
        let filter = LetterFilter {
            tenant: Some(tenant.clone()),
            script: body.script,
            kind: body.kind,
            since: None,
        };
        let letters = dlq::list(&mut stream, &filter, usize::MAX)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        if !body.confirm {
            return Ok(Json(
                serde_json::json!({ "matching": letters.len(), "deleted": 0 }),
            ));
        }
        for letter in &letters {
            stream.delete_message(letter.sequence).await.map_err(|e| {
                ApiError::Unavailable(format!("deleting dead letter {}: {e}", letter.sequence))
            })?;
        }
        Ok(Json(
            serde_json::json!({ "matching": letters.len(), "deleted": letters.len() }),
        ))
    };
    audited(
        &state,
        &caller,
        &tenant,
        "dead_letters.purge",
        &target,
        work,
    )
    .await
}
