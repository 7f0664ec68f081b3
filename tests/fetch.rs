//! `fetch`'s network policy on real HTTP over loopback: the allow list, private and
//! metadata addresses (written in the URL, resolved by DNS, or reached by a redirect), the
//! response cap and the timeout.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use scriptd::caps::fetch::Fetcher;
use scriptd::caps::net::HostRule;
use scriptd::caps::{CapErrorKind, FetchConfig, FetchRequest};
use support::http::{TestServer, HUGE};

fn get(url: &str) -> FetchRequest {
    FetchRequest {
        url: url.to_owned(),
        method: "GET".into(),
        headers: Vec::new(),
        body: Vec::new(),
        follow_redirects: true,
    }
}

fn rules(entries: &[&str]) -> Vec<HostRule> {
    entries
        .iter()
        .map(|e| HostRule::parse(e).unwrap())
        .collect()
}

/// A fetcher that may reach 127.0.0.1 (as an operator would allow a local service).
fn loopback_allowed() -> Fetcher {
    Fetcher::new(&FetchConfig {
        allow_private: vec!["127.0.0.1/32".parse().unwrap()],
        ..FetchConfig::default()
    })
    .unwrap()
}

fn later() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

#[tokio::test]
async fn an_allowed_local_server_answers() {
    let server = TestServer::start().await;
    let allow = rules(&[&format!("127.0.0.1:{}", server.port)]);
    let fetcher = loopback_allowed();
    let response = fetcher
        .fetch(&allow, get(&server.url("/hello")), later())
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, br#"{"hello":"world"}"#);

    let post = FetchRequest {
        method: "POST".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: br#"{"a":1}"#.to_vec(),
        ..get(&server.url("/echo"))
    };
    let response = fetcher.fetch(&allow, post, later()).await.unwrap();
    let echo: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], r#"{"a":1}"#);
    assert_eq!(echo["headers"]["content-type"], "application/json");

    // A redirect within the allowed host is followed.
    let to = server.url("/hello");
    let response = fetcher
        .fetch(
            &allow,
            get(&server.url(&format!("/redirect?to={to}"))),
            later(),
        )
        .await
        .unwrap();
    assert!(response.redirected);
    assert_eq!(response.body, br#"{"hello":"world"}"#);
}

#[tokio::test]
async fn hosts_off_the_allow_list_are_refused() {
    let server = TestServer::start().await;
    let fetcher = loopback_allowed();
    for (allow, url) in [
        (vec![], server.url("/hello")),
        (vec!["api.example.com"], server.url("/hello")),
        (vec!["127.0.0.1:1"], server.url("/hello")),
        (vec!["127.0.0.1"], "http://example.com/".to_owned()),
    ] {
        let err = fetcher
            .fetch(&rules(&allow), get(&url), later())
            .await
            .unwrap_err();
        assert_eq!(err.kind, CapErrorKind::Denied, "{url}: {err}");
        assert!(err.message.contains("allow list"), "{err}");
    }
}

#[tokio::test]
async fn private_and_metadata_addresses_are_refused_without_an_operators_allowance() {
    let server = TestServer::start().await;
    let fetcher = Fetcher::new(&FetchConfig::default()).unwrap();
    // Allowed by the tenant's list, refused for where they lead.
    let allow = rules(&[
        "127.0.0.1",
        "169.254.169.254",
        "localhost",
        "[::1]",
        "10.0.0.1",
    ]);
    for url in [
        server.url("/hello"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://localhost:{}/hello", server.port),
        "http://[::1]/".to_owned(),
        "http://10.0.0.1/".to_owned(),
    ] {
        let err = fetcher.fetch(&allow, get(&url), later()).await.unwrap_err();
        assert_eq!(err.kind, CapErrorKind::Denied, "{url}: {err}");
        assert!(err.message.contains("address"), "{url}: {err}");
    }
}

#[tokio::test]
async fn a_redirect_to_a_private_address_is_refused() {
    let server = TestServer::start().await;
    let fetcher = loopback_allowed();
    let allow = rules(&[&format!("127.0.0.1:{}", server.port), "169.254.169.254"]);
    let url = server.url("/redirect?to=http://169.254.169.254/latest/meta-data/");
    let err = fetcher.fetch(&allow, get(&url), later()).await.unwrap_err();
    assert_eq!(err.kind, CapErrorKind::Denied, "{err}");
    assert!(err.message.contains("link-local"), "{err}");
    // And to a host off the allow list.
    let url = server.url("/redirect?to=http://example.com/");
    let err = fetcher.fetch(&allow, get(&url), later()).await.unwrap_err();
    assert!(err.message.contains("allow list"), "{err}");
}

#[tokio::test]
async fn a_huge_response_is_cut_at_the_cap() {
    let server = TestServer::start().await;
    let fetcher = loopback_allowed();
    let allow = rules(&["127.0.0.1"]);
    for path in ["/huge", "/huge-declared"] {
        let err = fetcher
            .fetch(&allow, get(&server.url(path)), later())
            .await
            .unwrap_err();
        assert_eq!(err.kind, CapErrorKind::Limit, "{err}");
        assert!(err.message.contains("larger than"), "{err}");
    }
    // The server could write what the socket buffers took, nowhere near 100 MiB twice.
    let sent = server.huge_sent.load(Ordering::Relaxed);
    assert!(sent < HUGE, "the server wrote {sent} bytes");
}

#[tokio::test]
async fn a_slow_server_meets_the_deadline() {
    let server = TestServer::start().await;
    let fetcher = loopback_allowed();
    let start = Instant::now();
    let deadline = start + Duration::from_millis(500);
    let err = fetcher
        .fetch(&rules(&["127.0.0.1"]), get(&server.url("/slow")), deadline)
        .await
        .unwrap_err();
    assert_eq!(err.kind, CapErrorKind::Timeout, "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn only_http_urls_and_script_settable_headers() {
    let fetcher = loopback_allowed();
    let allow = rules(&["127.0.0.1"]);
    let err = fetcher
        .fetch(&allow, get("file:///etc/passwd"), later())
        .await
        .unwrap_err();
    assert_eq!(err.kind, CapErrorKind::Invalid, "{err}");
    let forged = FetchRequest {
        headers: vec![("Host".into(), "internal".into())],
        ..get("http://127.0.0.1:9/")
    };
    let err = fetcher.fetch(&allow, forged, later()).await.unwrap_err();
    assert_eq!(err.kind, CapErrorKind::Invalid, "{err}");
}
