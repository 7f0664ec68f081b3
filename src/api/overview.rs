//! `/v1/tenants` (the tenants a token may act for) and `/v1/tenants/{tenant}/overview` (the
//! last hour of runs per minute and status, duration percentiles, dead letters waiting):
//! what the console's tenant picker and overview read.

use axum::extract::State;
use axum::Json;
use futures::TryStreamExt;

use super::{ApiError, ApiResult, ApiState, Caller, Route};
use crate::store::Role;

pub async fn tenants(
    State(state): State<ApiState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let tenants = match caller.0.role {
        Role::Operator => state.store.tenants().await?,
        Role::Tenant => vec![caller.0.tenant.clone()],
    };
    Ok(Json(serde_json::json!({ "tenants": tenants })))
}

pub async fn overview(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    let runs = state
        .store
        .run_overview(&tenant, chrono::Utc::now())
        .await?;
    let nats = &state.settings.nats;
    let stream = state
        .js
        .get_stream(nats.dlq_stream())
        .await
        .map_err(|e| ApiError::Unavailable(format!("the dead-letter stream: {e}")))?;
    let waiting: usize = stream
        .info_with_subjects(format!("{}.{tenant}.>", nats.dlq_prefix))
        .await
        .map_err(|e| ApiError::Unavailable(format!("the dead-letter stream: {e}")))?
        .try_fold(0, |sum, (_, count)| async move { Ok(sum + count) })
        .await
        .map_err(|e| ApiError::Unavailable(format!("the dead-letter stream: {e}")))?;
    let mut view = serde_json::to_value(runs).unwrap_or_default();
    view["tenant"] = tenant.into();
    view["dead_letters"] = waiting.into();
    Ok(Json(view))
}
