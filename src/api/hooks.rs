//! `/hooks/{tenant}/{*path}`: HTTP-triggered scripts. A request runs, at once, the
//! tenant's script whose route takes its method and path, with a `request` object, and is
//! answered with what the script returns. It is recorded like any run (trigger `http`);
//! it is not retried or dead-lettered: a failure is answered, 500 (504 for a time limit),
//! with the run's id and not its internals.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::{ApiError, ApiResult, ApiState, Caller, Route, BODY_LIMIT};
use crate::domain::Trigger;
use crate::engine::FailureKind;
use crate::pipeline::job::{payload_as_json, Job};
use crate::scripts::index::{IndexedScript, Routed};
use crate::scripts::route::Auth;

/// The header every answer of a hook carries: the id of the run that made it.
pub const RUN_ID_HEADER: &str = "scriptd-run-id";

/// Response headers a script cannot set: the server frames the answer itself.
const FRAMING: [&str; 4] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
];

pub async fn hook(
    State(state): State<ApiState>,
    Route((tenant, _)): Route<(String, String)>,
    request: Request,
) -> Response {
    // The path as sent, still percent-encoded: route matching splits it on `/` first and
    // decodes each parameter once (an encoded `/` stays inside its segment).
    let prefix = format!("/hooks/{tenant}/");
    let Some(rest) = request.uri().path().strip_prefix(&prefix) else {
        return ApiError::NotFound(format!("no hook path for tenant {tenant:?}")).into_response();
    };
    let path = format!("/{rest}");
    match serve(state, tenant, path, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn serve(
    state: ApiState,
    tenant: String,
    path: String,
    request: Request,
) -> ApiResult<Response> {
    let (mut parts, body) = request.into_parts();
    let method = parts.method.as_str().to_owned();
    let (script, params) = match state.index.snapshot().route(&tenant, &method, &path) {
        Routed::Found(script, params) => (script, params),
        Routed::OtherMethods(allowed) => {
            let mut response = ApiError::MethodNotAllowed(format!(
                "{path} of tenant {tenant} takes {}",
                allowed.join(", ")
            ))
            .into_response();
            if let Ok(allow) = HeaderValue::from_str(&allowed.join(", ")) {
                response.headers_mut().insert(header::ALLOW, allow);
            }
            return Ok(response);
        }
        Routed::None => {
            return Err(ApiError::NotFound(format!(
                "tenant {tenant} has no route {method} {path}"
            )))
        }
    };
    let route = script.http.as_ref().expect("a routed script has a route");
    if route.auth == Auth::Token {
        let caller = Caller::from_request_parts(&mut parts, &state).await?;
        caller.acting_for(&tenant)?;
    }
    let body = axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .map_err(|_| ApiError::TooLarge)?;
    let request = request_object(&parts, &path, &route.path, params, &body, route.auth);
    let job = Job {
        id: format!(
            "http-{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        ),
        tenant: tenant.clone(),
        script: script.name.clone(),
        trigger: Trigger::Http,
        subject: None,
        event_id: None,
        event: serde_json::value::to_raw_value(&request).map_err(|e| {
            ApiError::BadRequest(format!("the request cannot be given to a script: {e}"))
        })?,
        version: None,
        scheduled_at: None,
        input_ref: None,
        catch_up: false,
    };
    run(&state, &job, &script, &parts.headers).await
}

/// Runs the script for `job` and turns its return value into the answer.
async fn run(
    state: &ApiState,
    job: &Job,
    script: &Arc<IndexedScript>,
    request_headers: &HeaderMap,
) -> ApiResult<Response> {
    let executor = &state.executor;
    // A caller is waiting: a request waits for its tenant's turn in the engine no longer
    // than the script may run.
    let wait = script.limits(&state.settings.engine.limits).timeout;
    let slot = match tokio::time::timeout(wait, executor.slot(&job.tenant)).await {
        Ok(Some(slot)) => slot,
        Ok(None) => return Err(ApiError::Unavailable("the daemon is stopping".into())),
        Err(_) => {
            return Err(ApiError::Unavailable(format!(
                "every run slot of tenant {} stayed busy for {wait:?}; try again",
                job.tenant
            )))
        }
    };
    // The caller's trace goes on in the run, as an event's does.
    let trace = request_headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(|value| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("traceparent", value);
            headers
        });
    let span = crate::pipeline::report::run_span(job, trace.as_ref());
    let ran = executor
        .run_now(job, script, trace.as_ref(), slot)
        .instrument(span)
        .await;
    let (id, result) = match ran {
        Ok(ran) => ran,
        Err(None) => {
            return Err(ApiError::NotFound(format!(
                "script {}/{} was disabled or deleted",
                job.tenant, job.script
            )))
        }
        Err(Some(_)) => {
            return Err(ApiError::Unavailable(
                "the script ran, but its run record could not be written".into(),
            ))
        }
    };
    let answered = match &result.outcome {
        Ok(value) => answer(value).map_err(|why| ApiError::RunFailed {
            run: Some(id),
            timed_out: false,
            message: format!("the script's answer is not a response: {why}"),
        }),
        Err(failure) => Err(ApiError::RunFailed {
            run: Some(id),
            timed_out: matches!(failure.kind, FailureKind::Timeout | FailureKind::CpuLimit),
            message: format!("the script failed ({}); see run {id}", failure.kind),
        }),
    };
    let mut response = answered.unwrap_or_else(IntoResponse::into_response);
    response
        .headers_mut()
        .insert(RUN_ID_HEADER, HeaderValue::from(id));
    Ok(response)
}

/// What the script is given: `{id, method, path, route, params, query, headers, body,
/// encoding}`. The body is JSON when the request says it is, else text (base64 when it is
/// not UTF-8), null when empty. On a token route the token is not passed on.
fn request_object(
    parts: &axum::http::request::Parts,
    path: &str,
    route: &str,
    params: serde_json::Map<String, serde_json::Value>,
    body: &[u8],
    auth: Auth,
) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        if auth == Auth::Token && name == header::AUTHORIZATION {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(serde_json::Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), value.into());
            }
        }
    }
    let mut query = serde_json::Map::new();
    let pairs = form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes());
    for (name, value) in pairs {
        let value = serde_json::Value::from(value.into_owned());
        match query.get_mut(name.as_ref()) {
            Some(serde_json::Value::Array(values)) => values.push(value),
            Some(first) => *first = serde_json::Value::Array(vec![first.take(), value]),
            None => {
                query.insert(name.into_owned(), value);
            }
        }
    }
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            let t = t.trim();
            t == "application/json" || t.ends_with("+json")
        });
    let (body, encoding) = if body.is_empty() {
        (serde_json::Value::Null, "none")
    } else {
        let (raw, encoding) = payload_as_json(body);
        match (encoding, is_json) {
            // JSON text sent as something else is text to the script.
            ("json", false) => (String::from_utf8_lossy(body).into_owned().into(), "text"),
            (encoding, _) => (
                serde_json::from_str(raw.get()).unwrap_or_default(),
                encoding,
            ),
        }
    };
    serde_json::json!({
        "method": parts.method.as_str(),
        "path": path,
        "route": route,
        "params": params,
        "query": query,
        "headers": headers,
        "body": body,
        "encoding": encoding,
    })
}

/// The HTTP answer of a return value: `{status, headers?, body?}` as it says (a string
/// body as text, any other as JSON), null or undefined as 204, any other value as JSON 200.
fn answer(value: &serde_json::Value) -> Result<Response, String> {
    let shaped = value.as_object().filter(|o| {
        o.contains_key("status")
            && o.keys()
                .all(|k| ["status", "headers", "body"].contains(&k.as_str()))
    });
    let Some(shape) = shaped else {
        if value.is_null() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        return Ok(json_response(StatusCode::OK, value));
    };
    let status = shape["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| format!("status {} is not a number from 200 to 599", shape["status"]))?;
    let mut response = match shape.get("body") {
        None | Some(serde_json::Value::Null) => status.into_response(),
        Some(serde_json::Value::String(text)) => {
            let mut r = (status, text.clone()).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        Some(other) => json_response(status, other),
    };
    if let Some(given) = shape.get("headers").filter(|h| !h.is_null()) {
        let given = given
            .as_object()
            .ok_or("headers is not an object of names and values")?;
        for (name, value) in given {
            if FRAMING.contains(&name.to_ascii_lowercase().as_str()) {
                continue;
            }
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => return Err(format!("header {name:?} is not a string")),
            };
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            let value = HeaderValue::from_str(&text)
                .map_err(|_| format!("the value of header {name} is not a header value"))?;
            response.headers_mut().insert(name, value);
        }
    }
    Ok(response)
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut response = (status, value.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn return_values_become_answers() {
        let plain = answer(&json!({ "total": 3 })).unwrap();
        assert_eq!(plain.status(), StatusCode::OK);
        assert_eq!(plain.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            answer(&json!(null)).unwrap().status(),
            StatusCode::NO_CONTENT
        );
        let shaped = answer(&json!({
            "status": 201,
            "headers": { "Location": "/orders/7", "Content-Length": "999" },
            "body": "made",
        }))
        .unwrap();
        assert_eq!(shaped.status(), StatusCode::CREATED);
        assert_eq!(shaped.headers()["location"], "/orders/7");
        assert!(shaped
            .headers()
            .get("content-length")
            .is_none_or(|v| v != "999"));
        assert!(answer(&json!({ "status": 99 })).is_err());
        assert!(answer(&json!({ "status": "ok" })).is_err());
        assert!(answer(&json!({ "status": 200, "headers": { "bad name": "x" } })).is_err());
        // An object with other keys is a value, not a response.
        let value = answer(&json!({ "status": 200, "extra": 1 })).unwrap();
        assert_eq!(value.status(), StatusCode::OK);
    }
}
