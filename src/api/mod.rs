//! The HTTP API (`api.listen`): JSON under `/v1`, described by `/openapi.json`, for tenants
//! and operators holding a bearer token (`scriptd tokens create`). A tenant token acts for
//! its tenant only, under the same row-level security as the daemon's own queries; every
//! request that changes something lands in the audit trail.

pub mod console;
mod events;
pub mod hooks;
mod overview;
mod problem;
mod runs;
mod scripts;
mod tenants;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use async_nats::jetstream;
use axum::extract::FromRequestParts;
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::Method;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::engine::Engine;
use crate::pipeline::dry_run::DryRun;
use crate::store::{AuditEntry, Principal, Rejected, Store};
pub use problem::{ApiError, Field};

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
    /// The attempt path: runs of HTTP-triggered scripts go through it, as events' do.
    pub executor: Arc<crate::pipeline::executor::Executor>,
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

/// The routes, each with the method and path it is served at: the router is made from this
/// list, and a test compares the list with the OpenAPI document.
struct Table {
    router: Router<ApiState>,
    served: Vec<(Method, &'static str)>,
}

impl Table {
    fn on<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Table
    where
        H: Handler<T, ApiState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a method routes");
        self.router = self.router.route(path, on(filter, handler));
        self.served.push((method, path));
        self
    }
}

fn table() -> Table {
    let t = Table {
        router: Router::new(),
        served: Vec::new(),
    };
    let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
    let scripts = "/v1/tenants/{tenant}/scripts/{name}";
    let mut t = t
        .on(get.clone(), "/openapi.json", openapi)
        .on(get.clone(), "/v1/token", tenants::token)
        .on(get.clone(), "/v1/tenants", overview::tenants)
        .on(
            get.clone(),
            "/v1/tenants/{tenant}/overview",
            overview::overview,
        )
        .on(get.clone(), "/v1/tenants/{tenant}/scripts", scripts::list)
        .on(get.clone(), scripts, scripts::show)
        .on(put.clone(), scripts, scripts::deploy)
        .on(delete.clone(), scripts, scripts::delete)
        .on(
            post.clone(),
            "/v1/tenants/{tenant}/scripts/{name}/enable",
            scripts::enable,
        )
        .on(
            post.clone(),
            "/v1/tenants/{tenant}/scripts/{name}/disable",
            scripts::disable,
        )
        .on(
            get.clone(),
            "/v1/tenants/{tenant}/scripts/{name}/versions",
            scripts::versions,
        )
        .on(
            get.clone(),
            "/v1/tenants/{tenant}/scripts/{name}/versions/{version}",
            scripts::version,
        )
        .on(
            post.clone(),
            "/v1/tenants/{tenant}/scripts/{name}/rollback",
            scripts::rollback,
        )
        .on(
            post.clone(),
            "/v1/tenants/{tenant}/scripts/{name}/test",
            scripts::test,
        )
        .on(
            post.clone(),
            "/v1/tenants/{tenant}/validate",
            scripts::validate,
        )
        .on(get.clone(), "/v1/tenants/{tenant}/settings", tenants::show)
        .on(
            put.clone(),
            "/v1/tenants/{tenant}/secrets/{name}",
            tenants::put_secret,
        )
        .on(
            delete,
            "/v1/tenants/{tenant}/secrets/{name}",
            tenants::delete_secret,
        )
        .on(
            put,
            "/v1/tenants/{tenant}/fetch-allow",
            tenants::put_fetch_allow,
        )
        .on(
            get.clone(),
            "/v1/tenants/{tenant}/schedules",
            tenants::schedules,
        )
        .on(get.clone(), "/v1/tenants/{tenant}/runs", runs::list)
        .on(get.clone(), "/v1/tenants/{tenant}/runs/{id}", runs::show)
        .on(post.clone(), "/v1/tenants/{tenant}/events", events::publish)
        .on(
            get.clone(),
            "/v1/tenants/{tenant}/dead-letters",
            events::dead_letters,
        )
        .on(
            get.clone(),
            "/v1/tenants/{tenant}/dead-letters/{sequence}",
            events::dead_letter,
        )
        .on(
            post.clone(),
            "/v1/tenants/{tenant}/dead-letters/{sequence}/replay",
            events::replay,
        )
        .on(
            post,
            "/v1/tenants/{tenant}/dead-letters/purge",
            events::purge,
        )
        .on(get, "/v1/tenants/{tenant}/audit", runs::audit);
    for method in crate::scripts::route::METHODS {
        let method = Method::from_bytes(method.as_bytes()).expect("a method");
        t = t.on(method, "/hooks/{tenant}/{*path}", hooks::hook);
    }
    t
}

/// Every route the API serves: its method and path.
pub fn served_routes() -> Vec<(Method, &'static str)> {
    table().served
}

/// The API's router.
pub fn router(state: ApiState) -> Router {
    table()
        .router
        .merge(console::router())
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

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON body. One that is not JSON, or not what the route takes, is a 400 problem naming
/// the member (`errors[].pointer`); one over [`BODY_LIMIT`] a 413.
pub struct Body<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> ApiResult<Self> {
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge,
                _ => ApiError::BadRequest(e.body_text()),
            })?;
        let mut json = serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(&mut json) {
            Ok(value) => Ok(Body(value)),
            Err(e) if e.inner().is_data() => Err(problem::body_error(
                &e.path().to_string(),
                &e.inner().to_string(),
            )),
            Err(e) => Err(ApiError::BadRequest(format!(
                "the body is not JSON: {}",
                e.inner()
            ))),
        }
    }
}

/// Query parameters; a wrong one is a 400 problem naming it (`errors[].parameter`).
pub struct Params<T>(pub T);

impl<T, S> FromRequestParts<S> for Params<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> ApiResult<Self> {
        let query = parts.uri.query().unwrap_or_default();
        let pairs = form_urlencoded::parse(query.as_bytes());
        serde_path_to_error::deserialize(serde_urlencoded::Deserializer::new(pairs))
            .map(Params)
            .map_err(|e| {
                let inner = e.inner().to_string();
                let path = e.path().to_string();
                let named = match problem::body_error(&path, &inner) {
                    ApiError::Invalid {
                        field: Field::Pointer(p),
                        ..
                    } => p.trim_start_matches('/').to_owned(),
                    _ => path,
                };
                ApiError::Invalid {
                    field: Field::Parameter(named),
                    message: inner,
                    refused: false,
                }
            })
    }
}

/// Path parameters; a wrong one (a run id that is not a number) is a 400 problem naming it.
pub struct Route<T>(pub T);

impl<T, S> FromRequestParts<S> for Route<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        let named = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map(|raw| raw.iter().map(|(k, _)| k.to_owned()).collect::<Vec<_>>())
            .unwrap_or_default();
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Route(value))
            .map_err(|e| {
                let key = match &e {
                    PathRejection::FailedToDeserializePathParams(failed) => match failed.kind() {
                        ErrorKind::ParseErrorAtKey { key, .. }
                        | ErrorKind::InvalidUtf8InPathParam { key } => Some(key.clone()),
                        ErrorKind::ParseErrorAtIndex { index, .. } => named.get(*index).cloned(),
                        _ => None,
                    },
                    _ => None,
                };
                match key {
                    Some(key) => ApiError::Invalid {
                        field: Field::Parameter(key),
                        message: e.body_text(),
                        refused: false,
                    },
                    None => ApiError::BadRequest(e.body_text()),
                }
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The router and the document list the same operations: nothing served is left out of
    /// the document, nothing documented is missing from the router.
    #[test]
    fn every_served_route_is_documented_and_every_documented_one_served() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).expect("JSON");
        let mut documented: Vec<String> = Vec::new();
        for (path, item) in document["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("an item").keys() {
                documented.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        let mut served: Vec<String> = served_routes()
            .into_iter()
            .map(|(method, path)| format!("{method} {}", path.replace("{*", "{")))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(served, documented);
    }
}
