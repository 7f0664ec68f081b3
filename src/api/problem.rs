//! How the API says no: `ApiError`, answered as an RFC 9457 problem document
//! (`application/problem+json`) with a stable `code`, and for bad input the field it is
//! about (`errors[].pointer` into the body, `errors[].parameter` of the query or path).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Where in the request a bad value is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    /// A JSON pointer into the body (`/limits/timeout`).
    Pointer(String),
    /// A query or path parameter.
    Parameter(String),
}

impl Field {
    /// The body member at `path`, given as dotted names and `[index]`es (`on[0]`,
    /// `limits.timeout`) as serde reports them.
    pub fn body(path: &str) -> Field {
        let mut pointer = String::new();
        for part in path.split('.').filter(|p| !p.is_empty() && *p != "?") {
            let (name, indexes) = part.split_once('[').unwrap_or((part, ""));
            if !name.is_empty() {
                pointer.push('/');
                pointer.push_str(&name.replace('~', "~0").replace('/', "~1"));
            }
            for index in indexes.split('[').map(|i| i.trim_end_matches(']')) {
                if !index.is_empty() {
                    pointer.push('/');
                    pointer.push_str(index);
                }
            }
        }
        Field::Pointer(pointer)
    }
}

/// An answer other than success.
#[derive(Debug)]
pub enum ApiError {
    /// 401: no token, or one that is malformed, unknown, revoked or expired.
    Unauthenticated,
    /// 403: a tenant token used for another tenant.
    Forbidden(String),
    /// 404.
    NotFound(String),
    /// 405: a hook's path with another method.
    MethodNotAllowed(String),
    /// 400: the request itself is wrong (not JSON, a parameter of the wrong type).
    BadRequest(String),
    /// 400 or 422 with the field it is about: a body member or parameter that is missing, of
    /// the wrong type (400), or well-formed but refused (422, `refused`).
    Invalid {
        field: Field,
        message: String,
        /// Well-formed but refused (422) rather than malformed (400).
        refused: bool,
    },
    /// 413: a body over [`super::BODY_LIMIT`].
    TooLarge,
    /// 422: well-formed but refused (a script that does not compile, a bad setting).
    Refused(String),
    /// 409: collides with what is there (a route another script has).
    Conflict(String),
    /// 503: PostgreSQL or NATS did not answer.
    Unavailable(String),
    /// 500 or 504: a script run by an HTTP request failed; the run's record says why.
    RunFailed {
        /// The run's id (`/v1/tenants/{tenant}/runs/{id}`).
        run: Option<i64>,
        /// 504 for a run stopped by its time limit, 500 otherwise.
        timed_out: bool,
        /// What the caller is told: the failure's kind, not its message.
        message: String,
    },
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest(_) | ApiError::Invalid { refused: false, .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Refused(_) | ApiError::Invalid { refused: true, .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RunFailed {
                timed_out: true, ..
            } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::RunFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable name of the problem (`code` in the document).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::BadRequest(_) | ApiError::Invalid { refused: false, .. } => "bad_request",
            ApiError::TooLarge => "too_large",
            ApiError::Refused(_) | ApiError::Invalid { refused: true, .. } => "refused",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::RunFailed {
                timed_out: true, ..
            } => "run_timed_out",
            ApiError::RunFailed { .. } => "run_failed",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ApiError::Unauthenticated => {
                "a valid bearer token is needed (Authorization: Bearer sd_...)"
            }
            ApiError::TooLarge => "the request body is over 1 MiB",
            ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::MethodNotAllowed(m)
            | ApiError::BadRequest(m)
            | ApiError::Refused(m)
            | ApiError::Conflict(m)
            | ApiError::Unavailable(m)
            | ApiError::Invalid { message: m, .. }
            | ApiError::RunFailed { message: m, .. } => m,
        }
    }

    /// A refusal (422) of the body member at `pointer`.
    pub fn refused_field(pointer: &str, message: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            field: Field::Pointer(pointer.to_owned()),
            message: message.into(),
            refused: true,
        }
    }

    /// The problem document.
    pub fn document(&self) -> serde_json::Value {
        let status = self.status();
        let mut problem = serde_json::json!({
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.message(),
            "code": self.code(),
        });
        match self {
            ApiError::Invalid { field, message, .. } => {
                let (key, value) = match field {
                    Field::Pointer(p) => ("pointer", p),
                    Field::Parameter(p) => ("parameter", p),
                };
                problem["errors"] = serde_json::json!([{ key: value, "detail": message }]);
            }
            ApiError::RunFailed { run: Some(id), .. } => problem["run_id"] = (*id).into(),
            _ => {}
        }
        problem
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.document()).unwrap_or_default();
        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, ApiError::Unauthenticated) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        use crate::store::StoreError;
        if let StoreError::Conflict(message) = e {
            return ApiError::Conflict(message);
        }
        if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
            return ApiError::Conflict(
                "another request made the same thing at the same moment; look and try again".into(),
            );
        }
        tracing::warn!(error = %e, "An API request's database work failed.");
        ApiError::Unavailable("the database did not answer; try again".into())
    }
}

/// A deserialisation error of the body, with the member it is about: serde's path, which
/// for a missing member stops at the object that lacks it (its message names it).
pub fn body_error(path: &str, message: &str) -> ApiError {
    let missing = message
        .split_once("missing field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(name, _)| name);
    let path = match missing {
        Some(name) if path == "." || path.is_empty() => name.to_owned(),
        Some(name) => format!("{path}.{name}"),
        None => path.to_owned(),
    };
    ApiError::Invalid {
        field: Field::body(&path),
        message: message.to_owned(),
        refused: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_paths_become_json_pointers() {
        assert_eq!(Field::body("on[0]"), Field::Pointer("/on/0".into()));
        assert_eq!(
            Field::body("limits.timeout"),
            Field::Pointer("/limits/timeout".into())
        );
        assert_eq!(Field::body("."), Field::Pointer("".into()));
        let missing = body_error(".", "missing field `source` at line 1 column 2");
        let ApiError::Invalid { field, .. } = missing else {
            panic!("not an invalid field")
        };
        assert_eq!(field, Field::Pointer("/source".into()));
        let unknown = body_error("limits.heapp", "unknown field `heapp`, expected one of ...");
        let ApiError::Invalid { field, .. } = unknown else {
            panic!("not an invalid field")
        };
        assert_eq!(field, Field::Pointer("/limits/heapp".into()));
    }
}
