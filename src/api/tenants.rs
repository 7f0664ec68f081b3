//! `/v1/tenants/{tenant}/settings`, `/secrets/{name}`, `/fetch-allow` and `/schedules`:
//! what a tenant's scripts may reach (secret names, never values; the fetch allow list,
//! which only operators change) and when its scheduled scripts run next.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;

use super::{audited, ApiError, ApiResult, ApiState, Body, Caller, Params, Route};
use crate::caps::net::HostRule;
use crate::caps::secrets::SecretBox;
use crate::schedule::Schedule;
use crate::store::Role;
use crate::subject;

pub async fn show(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    let store = &state.store;
    let fetch_allow = store.fetch_allow_list(&tenant).await?;
    let secrets = store.secret_list(&tenant).await?;
    let (kv_bytes, kv_keys) = store.kv_usage(&tenant).await?;
    Ok(Json(serde_json::json!({
        "tenant": tenant,
        "fetch_allow": fetch_allow,
        "secrets": secrets,
        "kv": {
            "bytes": kv_bytes,
            "keys": kv_keys,
            "quota": state.settings.capabilities.kv.max_per_tenant.0,
        },
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretBody {
    value: String,
}

pub async fn put_secret(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name)): Route<(String, String)>,
    Body(body): Body<SecretBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let work = async {
        subject::validate_name("secret", &name).map_err(|e| ApiError::Invalid {
            field: super::Field::Parameter("name".into()),
            message: e.to_string(),
            refused: true,
        })?;
        if body.value.is_empty() {
            return Err(ApiError::refused_field(
                "/value",
                "the secret's value is empty",
            ));
        }
        let secret_box = SecretBox::from_config(&state.settings.capabilities.secrets)
            .ok()
            .flatten()
            .ok_or_else(|| {
                ApiError::Refused(
                    "this daemon has no secrets key (capabilities.secrets.key_file)".into(),
                )
            })?;
        let sealed = secret_box.seal(&tenant, &name, &body.value);
        state.store.secret_put(&tenant, &name, &sealed).await?;
        Ok(Json(
            serde_json::json!({ "tenant": tenant, "name": name, "stored": true }),
        ))
    };
    // The value is in no log and no audit row: only the name is.
    audited(&state, &caller, &tenant, "secrets.set", &name, work).await
}

pub async fn delete_secret(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name)): Route<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let work = async {
        if !state.store.secret_delete(&tenant, &name).await? {
            return Err(ApiError::NotFound(format!(
                "tenant {tenant} has no secret {name:?}"
            )));
        }
        Ok(Json(
            serde_json::json!({ "tenant": tenant, "name": name, "deleted": true }),
        ))
    };
    audited(&state, &caller, &tenant, "secrets.delete", &name, work).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowBody {
    hosts: Vec<String>,
}

/// Replaces the hosts the tenant's scripts may fetch from. An operator's decision: a
/// tenant token is refused (403), as the allow list is what keeps a tenant's scripts
/// from calling anywhere.
pub async fn put_fetch_allow(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
    Body(body): Body<AllowBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let work = async {
        if caller.0.role != Role::Operator {
            return Err(ApiError::Forbidden(
                "only an operator token changes a tenant's fetch allow list".into(),
            ));
        }
        for (i, host) in body.hosts.iter().enumerate() {
            HostRule::parse(host)
                .map_err(|e| ApiError::refused_field(&format!("/hosts/{i}"), e))?;
        }
        state
            .store
            .set_fetch_allow_list(&tenant, &body.hosts)
            .await?;
        Ok(Json(
            serde_json::json!({ "tenant": tenant, "fetch_allow": body.hosts }),
        ))
    };
    audited(&state, &caller, &tenant, "tenants.fetch_allow", "", work).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulesQuery {
    /// Occurrences per script (default 5, at most 100).
    next: Option<usize>,
}

pub async fn schedules(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
    Params(query): Params<SchedulesQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    let count = query.next.unwrap_or(5).clamp(1, 100);
    let now = chrono::Utc::now();
    let scheduled: Vec<serde_json::Value> = state
        .store
        .scripts(&tenant)
        .await?
        .iter()
        .filter_map(|script| {
            let cron = script.cron.as_deref()?;
            let schedule = Schedule::parse(cron, &script.timezone).ok()?;
            let next: Vec<_> =
                std::iter::successors(schedule.next_after(now), |t| schedule.next_after(*t))
                    .take(count)
                    .map(|t| t.to_rfc3339())
                    .collect();
            Some(serde_json::json!({
                "name": script.name,
                "enabled": script.enabled,
                "cron": cron,
                "timezone": script.timezone,
                "overlap": script.overlap,
                "catch_up": script.catch_up,
                "next": next,
            }))
        })
        .collect();
    Ok(Json(serde_json::json!({ "schedules": scheduled })))
}

/// The token the request carries: its prefix, role and tenant (`*` for an operator), so a
/// client (the console) knows whom it acts for.
pub async fn token(caller: Caller) -> Json<serde_json::Value> {
    let who = &caller.0;
    Json(serde_json::json!({
        "prefix": who.prefix,
        "role": who.role.as_str(),
        "tenant": who.tenant,
    }))
}
