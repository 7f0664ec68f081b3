//! The web console (`/console/`): the page, script and style built from `console/` into
//! `console/dist/` and embedded here, so the daemon stays one file. It holds no privileges
//! of its own: it signs in with an API token and does everything through the API.

use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// Each asset: its path under `/console/`, content type and bytes.
const ASSETS: [(&str, &str, &[u8]); 3] = [
    (
        "",
        "text/html; charset=utf-8",
        include_bytes!("../../console/dist/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/dist/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/dist/app.css"),
    ),
];

/// Everything from this origin and nothing else: no inline script, no CDN, no framing.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
                      script-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
                      base-uri 'none'; form-action 'self'";

/// The console's routes; `/` and `/console` lead to it.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }));
    for (path, content_type, bytes) in ASSETS {
        router = router.route(
            &format!("/console/{path}"),
            get(move || async move { asset(content_type, bytes) }),
        );
    }
    router
}

fn asset(content_type: &'static str, bytes: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The page is small and changes with the binary: always revalidated.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        bytes,
    )
        .into_response()
}
