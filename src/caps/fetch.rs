//! Outbound HTTP for scripts' `fetch`: one shared client, the tenant's allow list checked on
//! every hop, every address checked where the connection is made (so a DNS answer cannot
//! point an allowed name at a private address), redirects followed by hand and re-checked,
//! response bodies read up to a cap, all under the run's remaining time.

use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, COOKIE, LOCATION};
use reqwest::{Method, StatusCode, Url};

use super::net::{allowed, AddressPolicy, HostRule};
use super::{CapError, CapErrorKind, CapResult, FetchConfig, FetchRequest, FetchResponse};

/// Request headers a script may not set: they belong to the connection or would let a
/// request claim to be for another host than the one checked.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
];

pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    config: FetchConfig,
}

/// A connection refused by the address policy; found again in reqwest's error chain.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Refused {}

/// Resolves names with the system resolver and keeps only the addresses the policy allows.
struct GuardedResolver {
    policy: Arc<AddressPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let usable: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refusal = Some(why);
                        false
                    }
                })
                .collect();
            if usable.is_empty() {
                let why = refusal.unwrap_or_else(|| "no addresses".into());
                let refused: Box<dyn StdError + Send + Sync> = Box::new(Refused(format!(
                    "{host} resolves to a refused address: {why}"
                )));
                return Err(refused);
            }
            Ok(Box::new(usable.into_iter()) as Addrs)
        })
    }
}

impl Fetcher {
    pub fn new(config: &FetchConfig) -> anyhow::Result<Fetcher> {
        let policy = Arc::new(AddressPolicy {
            allow_private: config.allow_private.clone(),
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .user_agent(concat!("scriptd/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Fetcher {
            client,
            policy,
            config: config.clone(),
        })
    }

    /// Performs `request` for a tenant whose allow list is `allow`, finishing by `deadline`
    /// at the latest.
    pub async fn fetch(
        &self,
        allow: &[HostRule],
        request: FetchRequest,
        deadline: Instant,
    ) -> CapResult<FetchResponse> {
        let until = deadline.min(Instant::now() + self.config.timeout);
        match tokio::time::timeout_at(until.into(), self.follow(allow, request)).await {
            Ok(result) => result,
            Err(_) => Err(CapError::new(
                CapErrorKind::Timeout,
                format!(
                    "fetch: no complete response within {}",
                    humantime::format_duration(until.saturating_duration_since(Instant::now()))
                ),
            )),
        }
    }

    async fn follow(&self, allow: &[HostRule], request: FetchRequest) -> CapResult<FetchResponse> {
        let mut url = Url::parse(&request.url)
            .map_err(|e| CapError::invalid(format!("fetch: invalid URL {:?}: {e}", request.url)))?;
        let mut method = Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| {
                CapError::invalid(format!("fetch: invalid method {:?}", request.method))
            })?;
        let mut headers = request_headers(&request.headers)?;
        let mut body = request.body;
        let mut redirects = 0;
        loop {
            self.check_url(allow, &url)?;
            let mut builder = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if !body.is_empty() {
                builder = builder.body(body.clone());
            }
            let response = builder
                .send()
                .await
                .map_err(|e| transport_error(&url, &e))?;
            let status = response.status();
            let location = response.headers().get(LOCATION).cloned();
            if let (true, true, Some(location)) =
                (status.is_redirection(), request.follow_redirects, location)
            {
                if redirects == self.config.max_redirects {
                    return Err(CapError::limit(format!(
                        "fetch: more than {} redirects",
                        self.config.max_redirects
                    )));
                }
                redirects += 1;
                let next = location
                    .to_str()
                    .ok()
                    .and_then(|l| url.join(l).ok())
                    .ok_or_else(|| {
                        CapError::failed(format!("fetch: {url} redirected to an invalid location"))
                    })?;
                if status == StatusCode::SEE_OTHER
                    || (matches!(status.as_u16(), 301 | 302) && method == Method::POST)
                {
                    method = Method::GET;
                    body = Vec::new();
                    headers.remove(reqwest::header::CONTENT_TYPE);
                }
                if next.origin() != url.origin() {
                    // Credentials are for the origin they were written for.
                    headers.remove(AUTHORIZATION);
                    headers.remove(COOKIE);
                }
                url = next;
                continue;
            }
            return self.read(url, response, redirects > 0).await;
        }
    }

    /// The allow list and, for addresses written in the URL, the address policy (names are
    /// checked when resolved).
    fn check_url(&self, allow: &[HostRule], url: &Url) -> CapResult<()> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(CapError::invalid(format!(
                "fetch: only http and https URLs can be fetched, not {:?}",
                url.scheme()
            )));
        }
        let port = url.port_or_known_default().unwrap_or(0);
        let (name, ip) = match url.host() {
            Some(url::Host::Domain(d)) => (d.to_ascii_lowercase(), None),
            Some(url::Host::Ipv4(ip)) => (ip.to_string(), Some(IpAddr::V4(ip))),
            Some(url::Host::Ipv6(ip)) => (ip.to_string(), Some(IpAddr::V6(ip))),
            None => return Err(CapError::invalid(format!("fetch: {url} has no host"))),
        };
        if !allowed(allow, &name, port) {
            return Err(CapError::denied(format!(
                "fetch: {name}:{port} is not on this tenant's allow list"
            )));
        }
        if let Some(ip) = ip {
            self.policy
                .check(ip)
                .map_err(|why| CapError::denied(format!("fetch: {why}")))?;
        }
        Ok(())
    }

    async fn read(
        &self,
        url: Url,
        mut response: reqwest::Response,
        redirected: bool,
    ) -> CapResult<FetchResponse> {
        let cap = self.config.max_response.as_usize();
        let too_large = |read: usize| {
            CapError::limit(format!(
                "fetch: the response body of {url} is larger than the {} limit (stopped after {read} bytes)",
                self.config.max_response
            ))
        };
        if response.content_length().is_some_and(|n| n > cap as u64) {
            return Err(too_large(0));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport_error(&url, &e))?
        {
            if body.len() + chunk.len() > cap {
                return Err(too_large(body.len() + chunk.len()));
            }
            body.extend_from_slice(&chunk);
        }
        let status = response.status();
        Ok(FetchResponse {
            status: status.as_u16(),
            status_text: status.canonical_reason().unwrap_or("").to_owned(),
            url: url.to_string(),
            redirected,
            headers: response
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect(),
            body,
        })
    }
}

fn request_headers(pairs: &[(String, String)]) -> CapResult<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let lower = name.to_ascii_lowercase();
        if FORBIDDEN_HEADERS.contains(&lower.as_str()) || lower.starts_with("proxy-") {
            return Err(CapError::invalid(format!(
                "fetch: the {name:?} header cannot be set by scripts"
            )));
        }
        let name = HeaderName::from_bytes(lower.as_bytes())
            .map_err(|_| CapError::invalid(format!("fetch: invalid header name {name:?}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| CapError::invalid(format!("fetch: invalid value for header {name}")))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// A transport failure, or the address policy refusing the connection.
fn transport_error(url: &Url, error: &reqwest::Error) -> CapError {
    let mut source: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return CapError::denied(format!("fetch: {refused}"));
        }
        source = e.source();
    }
    if error.is_timeout() {
        return CapError::new(CapErrorKind::Timeout, format!("fetch: {url} timed out"));
    }
    let mut message = format!("fetch: {url} failed: {error}");
    let mut source = error.source();
    while let Some(e) = source {
        message.push_str(&format!(": {e}"));
        source = e.source();
    }
    CapError::failed(message)
}
