//! The HTTP API (`api.listen`): JSON under `/v1`, described by `/openapi.json`, for tenants
//! and operators holding a bearer token (`scriptd tokens create`). A tenant token acts for
//! its tenant only, under the same row-level security as the daemon's own queries; every
//! request that changes something lands in the audit trail.

mod events;
mod runs;
mod scripts;
mod tenants;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use async_nats::jetstream;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::engine::Engine;
use crate::pipeline::dry_run::DryRun;
use crate::store::{AuditEntry, Principal, Rejected, Store};

/// The largest request body taken (a deploy's source with its settings).
pub const BODY_LIMIT: usize = 1 << 20;

/// The OpenAPI 3.1 document of what is served.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub js: jetstream::Context,
    pub engine: Arc<Engine>,
    pub settings: Arc<Settings>,
    /// This daemon's script index: a deploy answers once it runs the new version.
    pub index: Arc<crate::scripts::index::ScriptIndex>,
    /// The engine of test runs, with a dry run's script API; started at the first.
    pub trial: Arc<tokio::sync::OnceCell<Trial>>,
}

/// An engine host of its own for test runs, whose script API changes nothing.
pub struct Trial {
    pub engine: Engine,
    pub caps: DryRun,
    /// Test runs take turns: what each would have done is collected per run.
    pub turn: tokio::sync::Mutex<()>,
}

impl ApiState {
    /// The test-run engine, started on first use.
    pub async fn trial(&self) -> ApiResult<&Trial> {
        self.trial
            .get_or_try_init(|| async {
                let settings = &self.settings;
                let caps = DryRun::new(
                    &settings.capabilities,
                    &settings.nats.events_prefix,
                    self.store.clone(),
                )?;
                let engine = Engine::for_command(&settings.engine, Arc::new(caps.clone())).await?;
                Ok::<_, anyhow::Error>(Trial {
                    engine,
                    caps,
                    turn: Default::default(),
                })
            })
            .await
            .map_err(|e| ApiError::Unavailable(format!("the test-run engine did not start: {e:#}")))
    }
}

/// Every route, as the OpenAPI document lists it (tests compare the two).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/tenants/{tenant}/scripts", get(scripts::list))
        .route(
            "/v1/tenants/{tenant}/scripts/{name}",
            get(scripts::show)
                .put(scripts::deploy)
                .delete(scripts::delete),
        )
        .route(
            "/v1/tenants/{tenant}/scripts/{name}/enable",
            post(scripts::enable),
        )
        .route(
            "/v1/tenants/{tenant}/scripts/{name}/disable",
            post(scripts::disable),
        )
        .route(
            "/v1/tenants/{tenant}/scripts/{name}/versions",
            get(scripts::versions),
        )
        .route(
            "/v1/tenants/{tenant}/scripts/{name}/rollback",
            post(scripts::rollback),
        )
        .route(
            "/v1/tenants/{tenant}/scripts/{name}/test",
            post(scripts::test),
        )
        .route("/v1/tenants/{tenant}/validate", post(scripts::validate))
        .route("/v1/tenants/{tenant}/settings", get(tenants::show))
        .route(
            "/v1/tenants/{tenant}/secrets/{name}",
            axum::routing::put(tenants::put_secret).delete(tenants::delete_secret),
        )
        .route(
            "/v1/tenants/{tenant}/fetch-allow",
            axum::routing::put(tenants::put_fetch_allow),
        )
        .route("/v1/tenants/{tenant}/schedules", get(tenants::schedules))
        .route("/v1/tenants/{tenant}/runs", get(runs::list))
        .route("/v1/tenants/{tenant}/runs/{id}", get(runs::show))
        .route("/v1/tenants/{tenant}/events", post(events::publish))
        .route(
            "/v1/tenants/{tenant}/dead-letters",
            get(events::dead_letters),
        )
        .route(
            "/v1/tenants/{tenant}/dead-letters/{sequence}",
            get(events::dead_letter),
        )
        .route(
            "/v1/tenants/{tenant}/dead-letters/{sequence}/replay",
            post(events::replay),
        )
        .route(
            "/v1/tenants/{tenant}/dead-letters/purge",
            post(events::purge),
        )
        .route("/v1/tenants/{tenant}/audit", get(runs::audit))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        // A request body over 1 MiB is refused (413) before it is read further.
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Serves the API on `listen` until `stop`; the address it is bound to.
pub async fn serve(
    listen: &str,
    state: ApiState,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding api.listen {listen}"))?;
    let bound = listener.local_addr()?;
    let app = router(state);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "The API listener failed.");
        }
    });
    Ok(bound)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// An answer other than success, as JSON `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub enum ApiError {
    /// 401: no token, or one that is malformed, unknown, revoked or expired.
    Unauthenticated,
    /// 403: a tenant token used for another tenant.
    Forbidden(String),
    /// 404.
    NotFound(String),
    /// 400: the request itself is wrong.
    BadRequest(String),
    /// 413: a body over [`BODY_LIMIT`].
    TooLarge,
    /// 422: well-formed but refused (a script that does not compile, a bad setting).
    Refused(String),
    /// 503: PostgreSQL or NATS did not answer.
    Unavailable(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::TooLarge => "too_large",
            ApiError::Refused(_) => "refused",
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    fn message(&self) -> &str {
        match self {
            ApiError::Unauthenticated => {
                "a valid bearer token is needed (Authorization: Bearer sd_...)"
            }
            ApiError::TooLarge => "the request body is over 1 MiB",
            ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::BadRequest(m)
            | ApiError::Refused(m)
            | ApiError::Unavailable(m) => m,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            serde_json::json!({ "error": { "code": self.code(), "message": self.message() } });
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::Unauthenticated) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("a header"),
            );
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        tracing::warn!(error = %e, "An API request's database work failed.");
        ApiError::Unavailable("the database did not answer; try again".into())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON body; a body that is not JSON, or not what the route takes, is a 400 with what
/// was wrong, as the API's own JSON error.
pub struct Body<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> ApiResult<Self> {
        Json::<T>::from_request(request, state)
            .await
            .map(|Json(value)| Body(value))
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge,
                _ => ApiError::BadRequest(e.body_text()),
            })
    }
}

/// Query parameters, answered as [`Body`] is when they are wrong.
pub struct Params<T>(pub T);

impl<T, S> FromRequestParts<S> for Params<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Params(value))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// Path parameters, answered as [`Body`] is when they are wrong (a run id that is not a
/// number).
pub struct Route<T>(pub T);

impl<T, S> FromRequestParts<S> for Route<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Route(value))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// The caller, from its bearer token.
pub struct Caller(pub Principal);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> ApiResult<Caller> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthenticated)?;
        match state.store.authenticate(token.trim()).await? {
            Ok(principal) => Ok(Caller(principal)),
            Err(why) => {
                // The token itself is never logged; its prefix is not a secret.
                let prefix = token.get(3..15).unwrap_or_default();
                let why = match why {
                    Rejected::Malformed => "malformed",
                    Rejected::Unknown => "unknown",
                    Rejected::Revoked => "revoked",
                    Rejected::Expired => "expired",
                };
                tracing::info!(prefix, why, "API request with a token that does not count.");
                Err(ApiError::Unauthenticated)
            }
        }
    }
}

impl Caller {
    /// Refuses (403) a tenant token used for another tenant, before anything is looked
    /// up: tenant names are not secret, but nothing about the other tenant's data leaks.
    pub fn acting_for(&self, tenant: &str) -> ApiResult<()> {
        if self.0.may_act_for(tenant) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this token acts for tenant {:?} only",
                self.0.tenant
            )))
        }
    }
}

/// A request that changes something: checked for the tenant, carried out, and recorded in
/// the audit trail with how it ended (refusals included).
pub async fn audited<T, F>(
    state: &ApiState,
    caller: &Caller,
    tenant: &str,
    action: &str,
    target: &str,
    work: F,
) -> ApiResult<T>
where
    F: std::future::Future<Output = ApiResult<T>>,
{
    let result = match caller.acting_for(tenant) {
        Ok(()) => work.await,
        Err(e) => Err(e),
    };
    let (status, detail) = match &result {
        Ok(_) => (200, None),
        Err(e) => (
            i32::from(e.status().as_u16()),
            Some(serde_json::json!({ "error": e.message() })),
        ),
    };
    let entry = AuditEntry {
        tenant: tenant.to_owned(),
        actor: caller.0.prefix.clone(),
        role: caller.0.role.as_str().to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        status,
        detail,
    };
    if let Err(e) = state.store.audit(&entry).await {
        // An action whose record cannot be kept is reported as failed, though it was done.
        tracing::error!(error = %e, action, tenant, "Could not write the audit trail.");
        return Err(ApiError::Unavailable(
            "the action was carried out but could not be recorded in the audit trail".into(),
        ));
    }
    result
}
