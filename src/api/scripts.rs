//! `/v1/tenants/{tenant}/scripts`: list, show, deploy (checked in an isolate first, as
//! `scripts deploy` does), enable, disable, delete, versions, rollback, test runs; and
//! validating a source without storing it.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;

use super::{audited, ApiError, ApiResult, ApiState, Body, Caller, Field, Params, Route};
use crate::domain::{CatchUp, Overlap, Version};
use crate::engine::LimitOverrides;
use crate::retry::RetryOverrides;
use crate::scripts::manifest::{draft_run, validate_spec, SpecError};
use crate::scripts::route::HttpRoute;
use crate::scripts::typescript::{compile, Compiled, Lang};
use crate::store::{ScriptRow, ScriptSpec};

/// A script as the API shows it.
fn view(row: &ScriptRow, with_source: bool) -> serde_json::Value {
    let mut value = serde_json::to_value(row).unwrap_or_default();
    value["language"] = match row.typescript {
        Some(_) => "typescript",
        None => "javascript",
    }
    .into();
    if with_source {
        value["source"] = row.source.clone().into();
        if let Some(typescript) = &row.typescript {
            value["typescript"] = typescript.clone().into();
        }
    }
    value
}

pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
) -> ApiResult<Json<Vec<serde_json::Value>>> {
    caller.acting_for(&tenant)?;
    let rows = state.store.scripts(&tenant).await?;
    Ok(Json(rows.iter().map(|r| view(r, false)).collect()))
}

#[derive(Deserialize)]
pub struct ShowQuery {
    /// Include the source (and the TypeScript a version was compiled from).
    #[serde(default)]
    source: bool,
}

pub async fn show(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name)): Route<(String, String)>,
    Params(query): Params<ShowQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    let row = state
        .store
        .script(&tenant, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no script {tenant}/{name}")))?;
    Ok(Json(view(&row, query.source)))
}

fn utc() -> String {
    "UTC".into()
}

/// A deploy: the source and every setting (one left out goes back to its default).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployBody {
    source: String,
    #[serde(default)]
    lang: Lang,
    #[serde(default)]
    on: Vec<String>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default = "utc")]
    timezone: String,
    #[serde(default)]
    overlap: Overlap,
    #[serde(default)]
    catch_up: CatchUp,
    #[serde(default)]
    limits: LimitOverrides,
    #[serde(default)]
    retry: RetryOverrides,
    #[serde(default)]
    http: Option<HttpRoute>,
}

pub async fn deploy(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name)): Route<(String, String)>,
    Body(body): Body<DeployBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let work = async {
        let compiled = compile_or_refuse(body.source, body.lang)?;
        let spec = ScriptSpec {
            tenant: tenant.clone(),
            name: name.clone(),
            source: compiled.javascript,
            typescript: compiled.typescript,
            subjects: body.on,
            cron: body.cron,
            timezone: body.timezone,
            overlap: body.overlap,
            catch_up: body.catch_up,
            limits: body.limits,
            retry: body.retry,
            http: body.http,
        };
        validate_spec(&spec).map_err(refused_setting)?;
        let run = draft_run(&spec, &state.settings.engine.limits);
        if let Err(failure) = state.engine.validate(run).await {
            return Err(ApiError::Refused(format!(
                "the script does not load ({}): {}{}",
                failure.kind,
                failure.message,
                failure.stack.map(|s| format!("\n{s}")).unwrap_or_default()
            )));
        }
        let deployed = state.store.deploy(&spec).await?;
        // Answered once this daemon runs the new version (its index hears of the deploy
        // within moments), so an event published after the answer meets it here.
        let live = live_within(&state, &tenant, &name, deployed.version).await;
        Ok(Json(serde_json::json!({
            "live": live,
            "tenant": tenant,
            "name": name,
            "version": deployed.version,
            "sha256": deployed.sha256,
            "unchanged": deployed.unchanged_source,
        })))
    };
    audited(&state, &caller, &tenant, "scripts.deploy", &name, work).await
}

/// How long a deploy waits for this daemon's index to hold the new version.
const LIVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether this daemon's index holds `version` (or a later one) of the script within
/// [`LIVE_WAIT`].
async fn live_within(state: &ApiState, tenant: &str, name: &str, version: Version) -> bool {
    let deadline = tokio::time::Instant::now() + LIVE_WAIT;
    loop {
        let snapshot = state.index.snapshot();
        if snapshot
            .get(tenant, name)
            .is_some_and(|s| s.version >= version)
        {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// `source` compiled, or a 422 naming the syntax error's line and column.
fn compile_or_refuse(source: String, lang: Lang) -> ApiResult<Compiled> {
    compile(source, lang).map_err(|e| {
        ApiError::refused_field(
            "/source",
            format!("syntax error at {}:{}: {}", e.line, e.column, e.message),
        )
    })
}

/// A deploy's setting refused (422), named: a body member, or the tenant or name of the path.
fn refused_setting(e: SpecError) -> ApiError {
    let field = match e.field.as_str() {
        "tenant" | "name" => Field::Parameter(e.field),
        member => Field::body(member),
    };
    ApiError::Invalid {
        field,
        message: e.message,
        refused: true,
    }
}

/// Enables or disables a script.
async fn switch(
    state: ApiState,
    caller: Caller,
    tenant: String,
    name: String,
    enabled: bool,
) -> ApiResult<Json<serde_json::Value>> {
    let action = if enabled {
        "scripts.enable"
    } else {
        "scripts.disable"
    };
    let work = async {
        if !state.store.set_enabled(&tenant, &name, enabled).await? {
            return Err(ApiError::NotFound(format!("no script {tenant}/{name}")));
        }
        Ok(Json(
            serde_json::json!({ "tenant": tenant, "name": name, "enabled": enabled }),
        ))
    };
    audited(&state, &caller, &tenant, action, &name, work).await
}

pub async fn enable(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name)): Route<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    switch(state, caller, tenant, name, true).await
}

pub async fn disable(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name)): Route<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    switch(state, caller, tenant, name, false).await
}

pub async fn delete(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name)): Route<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let work = async {
        if !state.store.delete_script(&tenant, &name).await? {
            return Err(ApiError::NotFound(format!("no script {tenant}/{name}")));
        }
        Ok(Json(
            serde_json::json!({ "tenant": tenant, "name": name, "deleted": true }),
        ))
    };
    audited(&state, &caller, &tenant, "scripts.delete", &name, work).await
}

pub async fn versions(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name)): Route<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    let versions = state.store.versions(&tenant, &name).await?;
    if versions.is_empty() {
        return Err(ApiError::NotFound(format!("no script {tenant}/{name}")));
    }
    Ok(Json(serde_json::json!({ "versions": versions })))
}

/// One version's source (and the TypeScript it was compiled from), to compare versions.
pub async fn version(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name, version)): Route<(String, String, Version)>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    let found = state
        .store
        .version_source(&tenant, &name, version)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("no version {version} of script {tenant}/{name}"))
        })?;
    let mut view = serde_json::json!({ "version": version, "source": found.javascript });
    if let Some(typescript) = found.typescript {
        view["typescript"] = typescript.into();
    }
    Ok(Json(view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    version: Version,
}

pub async fn rollback(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name)): Route<(String, String)>,
    Body(body): Body<RollbackBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let target = format!("{name} v{}", body.version);
    let work = async {
        if !state.store.rollback(&tenant, &name, body.version).await? {
            return Err(ApiError::NotFound(format!(
                "no version {} of script {tenant}/{name}",
                body.version
            )));
        }
        let live = live_within(&state, &tenant, &name, body.version).await;
        Ok(Json(serde_json::json!({
            "tenant": tenant, "name": name, "version": body.version, "live": live,
        })))
    };
    audited(&state, &caller, &tenant, "scripts.rollback", &target, work).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceBody {
    source: String,
    #[serde(default)]
    lang: Lang,
}

/// Compiles and loads a source without storing it: `{"ok": true}`, or where it fails.
pub async fn validate(
    State(state): State<ApiState>,
    caller: Caller,
    Route(tenant): Route<String>,
    Body(body): Body<SourceBody>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    let compiled = match compile(body.source, body.lang) {
        Ok(compiled) => compiled,
        Err(e) => {
            return Ok(Json(serde_json::json!({
                "ok": false,
                "kind": "syntax",
                "line": e.line,
                "column": e.column,
                "message": e.message,
            })))
        }
    };
    let spec = ScriptSpec {
        tenant: tenant.clone(),
        name: "script".into(),
        source: compiled.javascript,
        typescript: compiled.typescript,
        ..Default::default()
    };
    Ok(Json(
        match state
            .engine
            .validate(draft_run(&spec, &state.settings.engine.limits))
            .await
        {
            Ok(()) => serde_json::json!({ "ok": true }),
            Err(f) => serde_json::json!({
                "ok": false,
                "kind": f.kind,
                "message": f.message,
                "stack": f.stack,
            }),
        },
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestBody {
    /// The payload of the test event.
    #[serde(default)]
    data: serde_json::Value,
    /// Its tenant-relative type.
    #[serde(rename = "type", default = "test_type")]
    event_type: String,
    /// A source to try instead of the script's current version.
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    lang: Lang,
}

fn test_type() -> String {
    "test".into()
}

/// Runs the script (its current version, or a source given) once on a test event, as a
/// dry run: it reads the tenant's key-value data and secrets; nothing is published,
/// stored, fetched or recorded, and what would have been is reported.
pub async fn test(
    State(state): State<ApiState>,
    caller: Caller,
    Route((tenant, name)): Route<(String, String)>,
    Body(body): Body<TestBody>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.acting_for(&tenant)?;
    crate::subject::validate_event_type(&body.event_type)
        .map_err(|e| ApiError::refused_field("/type", e.to_string()))?;
    let (source, limits) = match body.source {
        Some(source) => {
            let compiled = compile_or_refuse(source, body.lang)?;
            (compiled.javascript, state.settings.engine.limits)
        }
        None => {
            let row = state
                .store
                .script(&tenant, &name)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no script {tenant}/{name}")))?;
            (
                row.spec.source.clone(),
                state.settings.engine.limits.with(&row.limits),
            )
        }
    };
    let event = crate::scripts::manifest::test_event(
        &state.settings.nats.events_prefix,
        &tenant,
        &body.event_type,
        body.data,
    );
    let run = crate::engine::ScriptRun::new(
        &tenant,
        &name,
        Version::FIRST,
        std::sync::Arc::<str>::from(source),
        &event,
        limits,
    );
    let trial = state.trial().await?;
    // One test run at a time: what it would have done is collected per run.
    let _turn = trial.turn.lock().await;
    let result = trial.engine.run(run).await;
    Ok(Json(serde_json::json!({
        "run": result,
        "would": trial.caps.take(),
    })))
}
