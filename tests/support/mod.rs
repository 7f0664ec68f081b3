//! A private world per test on the real services: its own database (migrated), its own
//! subject prefixes and stream names, a daemon in-process or as child processes, and
//! clean-up of all of it.
#![allow(dead_code)]

pub mod api;
pub mod http;
pub mod otlp;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use scriptd::config::Settings;
use scriptd::daemon::DaemonStats;
use scriptd::engine::LimitOverrides;
use scriptd::retry::{RetryOverrides, RetryPolicy};
use scriptd::store::{ScriptSpec, Store};
use tokio_util::sync::CancellationToken;

/// The machine's PostgreSQL.
const POSTGRES: &str = "127.0.0.1:5432";

/// The NATS server the tests use: the machine's, unless `TEST_NATS_URL` names
/// another (`scripts/test` points the suite at a current nats-server that way).
pub fn nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The nats-server binary tests that run a server of their own start: the one named by
/// `TEST_NATS_SERVER`, else the machine's.
pub fn nats_server_binary() -> String {
    if let Ok(binary) = std::env::var("TEST_NATS_SERVER") {
        return binary;
    }
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .unwrap_or("nats-server")
    .to_owned()
}

pub struct TestEnv {
    pub id: String,
    pub settings: Settings,
    pub store: Store,
    pub js: async_nats::jetstream::Context,
    pub nats: async_nats::Client,
    /// The server's `postgres` database, where this world's database is made and dropped.
    admin_url: String,
}

pub struct RunningDaemon {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub stats: DaemonStats,
}

impl RunningDaemon {
    /// Asks for a graceful shutdown and waits for it.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.expect("daemon task").expect("daemon ran");
    }
}

#[derive(Debug, Clone)]
pub struct Run {
    pub script: String,
    pub version: Option<i32>,
    pub job_id: String,
    pub attempt: i32,
    pub status: String,
    pub failure_kind: Option<String>,
    pub failure_message: Option<String>,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub logs: serde_json::Value,
    pub subject: Option<String>,
    pub tenant: String,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        Self::with_nats(&nats_url()).await
    }

    /// A world on another NATS server (one the test starts and stops itself).
    pub async fn with_nats(nats_url: &str) -> TestEnv {
        Self::with_servers(nats_url, POSTGRES).await
    }

    /// A world on other servers: `pg_hosts` is one `host:port`, or several separated by
    /// commas (a primary and its standby), of which the one taking writes is used.
    pub async fn with_servers(nats_url: &str, pg_hosts: &str) -> TestEnv {
        let url = |db: &str| match pg_hosts.contains(',') {
            true => format!("postgres://postgres@{pg_hosts}/{db}?target_session_attrs=read-write"),
            false => format!("postgres://postgres@{pg_hosts}/{db}"),
        };
        let admin_url = url("postgres");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let id = format!(
            "t{}x{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            nanos % 100_000
        );
        let admin = scriptd::store::connect_direct(&admin_url)
            .await
            .expect("PostgreSQL");
        admin
            .batch_execute(&format!("CREATE DATABASE scriptd_{id}"))
            .await
            .expect("create test database");
        let mut settings = Settings::default();
        settings.database.url = url(&format!("scriptd_{id}"));
        settings.database.pool_size = 4;
        settings.nats.url = nats_url.into();
        settings.nats.events_prefix = format!("{id}.events");
        settings.nats.jobs_prefix = format!("{id}.jobs");
        settings.nats.dlq_prefix = format!("{id}.dlq");
        settings.nats.stream_prefix = id.to_uppercase();
        settings.nats.ack_wait = Duration::from_secs(5);
        settings.engine.workers = 2;
        // Scripts run in engine host processes, as in production: the hosts are this
        // package's binary (the test binary itself cannot be one).
        settings.engine.hosts.count = 2;
        settings.engine.hosts.binary = env!("CARGO_BIN_EXE_scriptd").into();
        settings.retry = RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max_interval: Duration::from_secs(2),
            randomization: 0.0,
            max_attempts: 3,
        };
        settings.daemon.shutdown_grace = Duration::from_secs(10);
        // Tests that want the HTTP endpoint ask for a free port.
        settings.telemetry.listen = String::new();
        Store::migrate(&settings.database)
            .await
            .expect("migrations");
        let store = Store::connect(&settings.database).await.expect("store");
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(settings.nats.servers())
            .await
            .expect("NATS");
        let js = async_nats::jetstream::new(nats.clone());
        scriptd::bus::ensure_streams(&js, &settings.nats)
            .await
            .expect("streams");
        TestEnv {
            id,
            settings,
            store,
            js,
            nats,
            admin_url,
        }
    }

    pub fn start_daemon(&self) -> RunningDaemon {
        self.start_daemon_with(self.settings.clone())
    }

    pub fn start_daemon_with(&self, settings: Settings) -> RunningDaemon {
        let stop = CancellationToken::new();
        let stats = DaemonStats::default();
        let task = tokio::spawn(scriptd::daemon::run_with_stats(
            settings,
            stop.clone(),
            stats.clone(),
        ));
        RunningDaemon { stop, task, stats }
    }

    /// Runs `scriptd ARGS` in this world from the project's directory (as the README and
    /// compose.yaml give commands) and fails the test, with what it printed, unless it
    /// succeeds.
    pub fn cli_ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> std::process::Output {
        let out = self
            .daemon_command()
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("scriptd runs");
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        assert!(
            out.status.success(),
            "scriptd {}: {}{}",
            shown.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The environment a `scriptd` child process needs to join this world.
    pub fn daemon_command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_scriptd"));
        let s = &self.settings;
        c.env("SCRIPTD_DATABASE__URL", &s.database.url)
            .env("SCRIPTD_NATS__URL", &s.nats.url)
            .env("SCRIPTD_NATS__EVENTS_PREFIX", &s.nats.events_prefix)
            .env("SCRIPTD_NATS__JOBS_PREFIX", &s.nats.jobs_prefix)
            .env("SCRIPTD_NATS__DLQ_PREFIX", &s.nats.dlq_prefix)
            .env("SCRIPTD_NATS__STREAM_PREFIX", &s.nats.stream_prefix)
            .env("SCRIPTD_NATS__ACK_WAIT", "3s")
            .env("SCRIPTD_ENGINE__WORKERS", "2")
            .env("SCRIPTD_RETRY__INITIAL", "100ms")
            .env("SCRIPTD_RETRY__RANDOMIZATION", "0")
            .env("SCRIPTD_LOG__FILTER", "warn")
            .env("SCRIPTD_TELEMETRY__LISTEN", "")
            .env_remove("RUST_LOG");
        c
    }

    pub async fn deploy(&self, tenant: &str, name: &str, source: &str, on: &[&str]) -> i32 {
        self.deploy_with(
            tenant,
            name,
            source,
            on,
            LimitOverrides::default(),
            RetryOverrides::default(),
        )
        .await
    }

    pub async fn deploy_with(
        &self,
        tenant: &str,
        name: &str,
        source: &str,
        on: &[&str],
        limits: LimitOverrides,
        retry: RetryOverrides,
    ) -> i32 {
        let spec = ScriptSpec {
            tenant: tenant.into(),
            name: name.into(),
            source: source.into(),
            subjects: on.iter().map(|s| s.to_string()).collect(),
            cron: None,
            timezone: "UTC".into(),
            limits,
            retry,
            ..Default::default()
        };
        self.deploy_spec(&spec).await
    }

    pub async fn publish(
        &self,
        tenant: &str,
        event_type: &str,
        payload: impl Into<bytes::Bytes>,
    ) -> u64 {
        self.publish_subject(
            &format!("{}.{tenant}.{event_type}", self.settings.nats.events_prefix),
            payload,
        )
        .await
    }

    /// Publishes an event of `tenant` carrying the W3C trace context `traceparent`, as a
    /// traced service would.
    pub async fn publish_traced(
        &self,
        tenant: &str,
        event_type: &str,
        payload: &'static str,
        traceparent: &str,
    ) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", traceparent);
        self.js
            .publish_with_headers(
                format!("{}.{tenant}.{event_type}", self.settings.nats.events_prefix),
                headers,
                payload.into(),
            )
            .await
            .expect("publish")
            .await
            .expect("publish ack");
    }

    pub async fn publish_subject(&self, subject: &str, payload: impl Into<bytes::Bytes>) -> u64 {
        self.js
            .publish(subject.to_owned(), payload.into())
            .await
            .expect("publish")
            .await
            .expect("publish ack")
            .sequence
    }

    pub async fn runs(&self) -> Vec<Run> {
        let client = scriptd::store::connect_direct(&self.settings.database.url)
            .await
            .unwrap();
        client
            .query(
                "SELECT script, version, job_id, attempt, status, failure_kind, failure_message,
                        started_at, logs, subject, tenant
                 FROM runs ORDER BY started_at, id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| Run {
                script: r.get(0),
                version: r.get(1),
                job_id: r.get(2),
                attempt: r.get(3),
                status: r.get(4),
                failure_kind: r.get(5),
                failure_message: r.get(6),
                started_at: r.get(7),
                logs: r.get(8),
                subject: r.get(9),
                tenant: r.get(10),
            })
            .collect()
    }

    /// Waits until the recorded runs satisfy `done`, for at most `limit`.
    pub async fn wait_for_runs(&self, limit: Duration, done: impl Fn(&[Run]) -> bool) -> Vec<Run> {
        let deadline = Instant::now() + limit;
        loop {
            let runs = self.runs().await;
            if done(&runs) {
                return runs;
            }
            if Instant::now() > deadline {
                panic!("runs did not reach the expected state within {limit:?}: {runs:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every message of the dead-letter stream, as JSON.
    pub async fn dead_letters(&self) -> Vec<(async_nats::HeaderMap, serde_json::Value)> {
        let stream = self
            .js
            .get_stream(self.settings.nats.dlq_stream())
            .await
            .unwrap();
        let info = stream.get_info().await.unwrap();
        let mut out = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if info.state.messages == 0 {
                break;
            }
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push((m.headers, serde_json::from_slice(&m.payload).unwrap()));
            }
        }
        out
    }

    pub async fn cleanup(self) {
        let _ = std::fs::remove_dir_all(self.files_dir());
        for stream in [
            self.settings.nats.events_stream(),
            self.settings.nats.jobs_stream(),
            self.settings.nats.dlq_stream(),
        ] {
            let _ = self.js.delete_stream(stream).await;
        }
        drop(self.store);
        let admin = scriptd::store::connect_direct(&self.admin_url)
            .await
            .unwrap();
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS scriptd_{} WITH (FORCE)",
                self.id
            ))
            .await
            .expect("drop test database");
    }
}

/// A `scriptd` child process, killed when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl TestEnv {
    /// Starts `scriptd run` as a child process in this world.
    pub fn spawn_daemon(&self) -> Child {
        Child(
            self.daemon_command()
                .arg("run")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .spawn()
                .expect("spawn scriptd run"),
        )
    }

    /// Messages of `stream` handed out and not yet acknowledged, over all its consumers
    /// (the fan-out's for events, every tenant's lane for jobs).
    pub async fn in_flight(&self, stream: String) -> usize {
        use futures::StreamExt;
        let stream = self.js.get_stream(stream).await.unwrap();
        let mut consumers = stream.consumers();
        let mut pending = 0;
        while let Some(Ok(info)) = consumers.next().await {
            pending += info.num_ack_pending;
        }
        pending
    }

    /// Messages of `stream` not yet delivered, or delivered and not yet acknowledged, over
    /// all its consumers.
    pub async fn backlog(&self, stream: String) -> u64 {
        use futures::StreamExt;
        let stream = self.js.get_stream(stream).await.expect("stream");
        let mut consumers = stream.consumers();
        let mut left = 0;
        while let Some(info) = consumers.next().await {
            let info = info.expect("consumer info");
            left += info.num_pending + info.num_ack_pending as u64;
        }
        left
    }

    /// The messages stored on `subject` in the events stream.
    pub async fn messages_on(&self, subject: &str) -> u64 {
        use futures::TryStreamExt;
        let stream = self
            .js
            .get_stream(self.settings.nats.events_stream())
            .await
            .expect("events stream");
        let mut info = stream
            .info_with_subjects(subject)
            .await
            .expect("stream info");
        let mut total = 0;
        while let Some((_, count)) = info.try_next().await.expect("stream info") {
            total += count as u64;
        }
        total
    }

    /// Waits until the events and jobs streams have nothing waiting and nothing handed out:
    /// every event taken is settled and every retry has run, so what has not happened by
    /// now will not. Absence is asserted after this, never before.
    pub async fn wait_idle(&self, limit: Duration) {
        let nats = &self.settings.nats;
        self.wait_until(limit, "the events and jobs streams to drain", || async {
            self.backlog(nats.events_stream()).await + self.backlog(nats.jobs_stream()).await == 0
        })
        .await;
    }

    /// Whether exactly `n` events are taken and not yet acknowledged.
    pub async fn events_in_flight_is(&self, n: usize) -> bool {
        self.in_flight(self.settings.nats.events_stream()).await == n
    }

    /// Waits until `tenant`'s event lane is made, for at most `limit`: events stored
    /// before count as possibly handed out by an earlier consumer of its name
    /// (`Lane::first_delivery`); those stored from now on do not.
    pub async fn wait_for_event_lane(&self, tenant: &str, limit: Duration) {
        let lane = scriptd::bus::lanes::event_lane_consumer(tenant);
        self.wait_until(limit, "the event lane to be made", || async {
            match self.js.get_stream(self.settings.nats.events_stream()).await {
                Ok(stream) => stream.consumer_info(&lane).await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
    }

    /// Waits until `check` holds, for at most `limit`.
    pub async fn wait_until<F, Fut>(&self, limit: Duration, what: &str, check: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        while !check().await {
            assert!(
                Instant::now() < deadline,
                "{what} did not happen within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A TCP relay in front of PostgreSQL that can be cut: while cut, it drops every
/// connection and refuses new ones, as a database outage would.
pub struct Relay {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    pub async fn start(target: &'static str) -> Relay {
        use std::sync::atomic::AtomicBool;
        use std::sync::atomic::AtomicU64;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(AtomicBool::new(false));
        let generation = std::sync::Arc::new(AtomicU64::new(0));
        let (c, g) = (cut.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let (c, g) = (c.clone(), g.clone());
                let born = g.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    tokio::pin!(copy);
                    loop {
                        tokio::select! {
                            _ = &mut copy => return,
                            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                                if c.load(Ordering::SeqCst) || g.load(Ordering::SeqCst) != born {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Relay {
            port,
            cut,
            generation,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A nats-server of the test's own on a free port, with JetStream in a temporary folder.
pub struct OwnNats {
    pub port: u16,
    pub dir: std::path::PathBuf,
    process: Option<std::process::Child>,
}

impl OwnNats {
    pub fn start() -> OwnNats {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("scriptd-nats-{}-{port}", std::process::id()));
        let mut nats = OwnNats {
            port,
            dir,
            process: None,
        };
        nats.restart();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        self.stop();
        self.process = Some(
            std::process::Command::new(nats_server_binary())
                .args([
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-js",
                    "-sd",
                ])
                .arg(&self.dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("nats-server"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestEnv {
    /// Deploys `spec`; its version.
    pub async fn deploy_spec(&self, spec: &ScriptSpec) -> i32 {
        let deployed = self.store.deploy(spec).await.expect("deploy");
        deployed.version.get() as i32
    }

    /// Deploys a script on a cron schedule (and no subject).
    pub async fn deploy_scheduled(
        &self,
        name: &str,
        source: &str,
        cron: &str,
        overlap: scriptd::domain::Overlap,
        retry: RetryOverrides,
    ) -> i32 {
        let spec = ScriptSpec {
            tenant: "acme".into(),
            name: name.into(),
            source: source.into(),
            cron: Some(cron.into()),
            timezone: "UTC".into(),
            overlap,
            retry,
            ..Default::default()
        };
        self.deploy_spec(&spec).await
    }

    /// The scheduled instants of the recorded runs with this status, oldest first.
    pub async fn scheduled_runs(
        &self,
        status: &str,
    ) -> Vec<(chrono::DateTime<chrono::Utc>, String)> {
        let client = scriptd::store::connect_direct(&self.settings.database.url)
            .await
            .unwrap();
        client
            .query(
                "SELECT scheduled_at, job_id FROM runs
                 WHERE scheduled_at IS NOT NULL AND status = $1 ORDER BY scheduled_at, id",
                &[&status],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

/// The JSON a successful `scriptd ... --json` command printed.
pub fn json(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// A handler that keeps its thread busy for `ms` milliseconds, then returns `returns`
/// (a JavaScript expression; the event is `e`).
pub fn busy_script(ms: u64, returns: &str) -> String {
    format!(
        "export default (e) => {{ const end = Date.now() + {ms}; while (Date.now() < end) {{}} return {returns}; }}"
    )
}

impl TestEnv {
    /// Writes a script file in this test's own folder (removed by `cleanup`).
    pub fn write_script(&self, name: &str, source: &str) -> std::path::PathBuf {
        let dir = self.files_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, source).unwrap();
        path
    }

    fn files_dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("scriptd-{}", self.id))
    }
}

/// Splits a command line on spaces, keeping single-quoted words whole.
pub fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Loads of numbered events (`{"i": n}` with `Nats-Msg-Id: e<n>`, for tenant acme's
/// `order.created`), and what the tests that fail a server under them assert.
impl TestEnv {
    /// Publishes event `n` and waits for JetStream to store it. A publish sent again with
    /// the same id is stored once.
    pub async fn publish_numbered(&self, n: usize) -> Result<(), String> {
        let subject = format!("{}.acme.order.created", self.settings.nats.events_prefix);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("e{n}").as_str());
        let ack = self
            .js
            .publish_with_headers(subject, headers, format!("{{\"i\":{n}}}").into())
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(drop).map_err(|e| e.to_string())
    }

    /// Asserts that each of `scripts` ran each event `e0..e<events>` exactly once (one ok
    /// run, whatever else was recorded) and ran nothing else.
    pub async fn assert_each_ran_once(&self, events: usize, scripts: &[&str]) {
        let client = scriptd::store::connect_direct(&self.settings.database.url)
            .await
            .unwrap();
        let rows = client
            .query(
                "SELECT event_id, script, count(*) FILTER (WHERE status = 'ok'), count(*)
                 FROM runs GROUP BY event_id, script",
                &[],
            )
            .await
            .unwrap();
        let seen: std::collections::HashMap<(String, String), (i64, i64)> = rows
            .iter()
            .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
            .collect();
        assert_eq!(
            seen.len(),
            events * scripts.len(),
            "(event, script) pairs run"
        );
        for n in 0..events {
            for script in scripts {
                let (ok, all) = seen[&(format!("e{n}"), script.to_string())];
                assert_eq!(ok, 1, "event e{n}, script {script}: {ok} ok runs of {all}");
            }
        }
    }
}

/// The longest pause between two consecutive run starts.
pub fn longest_pause(runs: &[Run]) -> Duration {
    let mut starts: Vec<_> = runs.iter().map(|r| r.started_at).collect();
    starts.sort();
    starts
        .windows(2)
        .filter_map(|w| (w[1] - w[0]).to_std().ok())
        .max()
        .unwrap_or_default()
}

/// A TCP port on 127.0.0.1 that nothing listens on (as of now), and that this process has
/// not handed out before: servers started one after another must not be given the same.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A run record of tenant acme's script `s` at its first version, for tests that write
/// records through the store.
pub fn run_record(
    job: &str,
    attempt: i32,
    status: scriptd::domain::RunStatus,
) -> scriptd::store::RunRecord {
    scriptd::store::RunRecord {
        tenant: "acme".into(),
        script: "s".into(),
        version: Some(scriptd::domain::Version::FIRST),
        job_id: job.into(),
        attempt,
        trigger: scriptd::domain::Trigger::Event,
        subject: None,
        event_id: None,
        status,
        failure_kind: None,
        failure_message: None,
        failure_stack: None,
        logs: serde_json::json!([]),
        logs_truncated: false,
        cold_start: false,
        started_at: chrono::Utc::now(),
        duration_ms: 1.0,
        scheduled_at: None,
        input_ref: None,
        result: None,
        input: None,
        trace_id: None,
        unclaimed: false,
    }
}
