//! The HTTP API of a daemon started in-process on a free port, and tokens made with the
//! CLI, for the tests that call it.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::{RunningDaemon, TestEnv};

pub const WAIT: Duration = Duration::from_secs(30);

/// A daemon with the API on a free port and `settings` changed by `change`.
pub async fn start_with(
    env: &TestEnv,
    change: impl FnOnce(&mut scriptd::config::Settings),
) -> (RunningDaemon, Api) {
    let mut settings = env.settings.clone();
    change(&mut settings);
    Api::start_settings(settings).await
}

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn start(env: &TestEnv) -> (RunningDaemon, Api) {
        start_with(env, |_| {}).await
    }

    pub async fn start_settings(mut settings: scriptd::config::Settings) -> (RunningDaemon, Api) {
        settings.api.listen = "127.0.0.1:0".into();
        let stop = tokio_util::sync::CancellationToken::new();
        let stats = scriptd::daemon::DaemonStats::default();
        let task = tokio::spawn(scriptd::daemon::run_with_stats(
            settings,
            stop.clone(),
            stats.clone(),
        ));
        let daemon = RunningDaemon { stop, task, stats };
        let deadline = std::time::Instant::now() + WAIT;
        let address = loop {
            if let Some(address) = daemon.stats.api_listening.get() {
                break *address;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the API never listened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let api = Api {
            base: format!("http://{address}"),
            http: reqwest::Client::new(),
        };
        (daemon, api)
    }

    /// The same API through a client of its own, for a request the server answers before
    /// reading its whole body (a body over the limit) and then closes the connection: the
    /// next requests of the shared client must not meet that connection in its pool.
    pub fn once(&self) -> Api {
        Api {
            base: self.base.clone(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("the API answers");
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }
}

/// A token made with `scriptd tokens create --json`.
pub fn token(env: &TestEnv, args: &[&str]) -> (String, String) {
    let out = env.cli_ok(&[&["tokens", "create", "--json"], args].concat());
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        shown["token"].as_str().unwrap().to_owned(),
        shown["prefix"].as_str().unwrap().to_owned(),
    )
}
