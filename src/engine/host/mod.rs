//! Engine host processes: isolates live in child processes of the daemon (its own binary,
//! `scriptd engine-host`), so a leak, an out-of-memory abort or a crash in the engine costs
//! one host, never the daemon. The pool starts one host per slot, places runs on the host
//! holding the script's warm isolate when it has room, recycles a host (replacement first,
//! then drain) after a number of isolate creations or past an RSS ceiling, and fails the
//! runs of a host that died as `engine_crashed` while a replacement starts.

mod child;
mod confine;
mod protocol;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

pub use child::main as host_main;
use protocol::{CapRequest, CapValue, FromHost, ToHost, WireRun};

use super::failure::{Failure, FailureKind};
use super::{EngineConfig, RunResult, ScriptRun, SharedCapabilities, StatsSnapshot};
use crate::units::ByteSize;

/// The `[engine.hosts]` settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostsConfig {
    /// Engine host processes; 0 means one per core.
    pub count: usize,
    /// Worker threads (isolates running at once) in each host.
    pub workers_per_host: usize,
    /// Isolates a host may create before it is replaced (each leaks a little memory in the
    /// engine, and only a process exit returns it).
    pub max_isolates: u64,
    /// Resident memory past which a host is replaced.
    pub max_rss: ByteSize,
    /// The executable started as a host; empty for this one.
    pub binary: String,
    /// Install the seccomp filter that denies hosts files, sockets and new programs
    /// (Linux). Turn off only on platforms where it cannot be installed.
    pub seccomp: bool,
}

impl Default for HostsConfig {
    fn default() -> Self {
        HostsConfig {
            count: 0,
            workers_per_host: 1,
            max_isolates: 100,
            max_rss: ByteSize::mib(768),
            binary: String::new(),
            seccomp: true,
        }
    }
}

/// How long a run waits for a host to be up before it fails as an engine failure.
const HOST_WAIT: Duration = Duration::from_secs(30);
/// A started host has this long to say it is ready.
const READY_WAIT: Duration = Duration::from_secs(30);
/// RSS is read from /proc every this many results of a host.
const RSS_EVERY: u64 = 16;

pub struct HostPool {
    shared: Arc<Shared>,
}

enum Placement {
    Host(Arc<Host>),
    /// Every host has all the runs it may take.
    Full,
    /// No host is up.
    NoHost,
}

struct Shared {
    config: EngineConfig,
    caps: SharedCapabilities,
    binary: PathBuf,
    slots: Mutex<Vec<Option<Arc<Host>>>>,
    /// Every host not yet gone, draining ones included (for their counters).
    all: Mutex<Vec<Arc<Host>>>,
    /// Signalled whenever a host finishes a run or comes up.
    room: tokio::sync::Notify,
    /// Counters of hosts that are gone.
    retired: Mutex<StatsSnapshot>,
    recycled: AtomicU64,
    crashed: AtomicU64,
    closed: AtomicBool,
    next_run: AtomicU64,
}

struct Host {
    pid: u32,
    state: Mutex<HostState>,
    load: AtomicUsize,
    results: AtomicU64,
    stats: Mutex<StatsSnapshot>,
}

struct HostState {
    pending: HashMap<u64, oneshot::Sender<RunResult>>,
    tx: Option<mpsc::UnboundedSender<ToHost>>,
    draining: bool,
}

impl HostPool {
    /// Starts the hosts; runs wait until one is ready. Must be called within a runtime.
    pub fn start(config: &EngineConfig, caps: SharedCapabilities) -> std::io::Result<HostPool> {
        let binary = if config.hosts.binary.is_empty() {
            std::env::current_exe()?
        } else {
            PathBuf::from(&config.hosts.binary)
        };
        let count = match config.hosts.count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let shared = Arc::new(Shared {
            config: config.clone(),
            caps,
            binary,
            slots: Mutex::new(vec![None; count]),
            all: Mutex::new(Vec::new()),
            room: tokio::sync::Notify::new(),
            retired: Mutex::new(StatsSnapshot::default()),
            recycled: AtomicU64::new(0),
            crashed: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            next_run: AtomicU64::new(1),
        });
        for slot in 0..count {
            spawn_host(&shared, slot)?;
        }
        Ok(HostPool { shared })
    }

    /// Isolates that can run at once.
    pub fn capacity(&self) -> usize {
        self.shared
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
            * self.shared.config.hosts.workers_per_host.max(1)
    }

    /// Whether every slot has a host up.
    pub fn all_ready(&self) -> bool {
        self.shared
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .all(Option::is_some)
    }

    /// Process ids of the hosts up now.
    pub fn pids(&self) -> Vec<u32> {
        self.live().iter().map(|h| h.pid).collect()
    }

    fn live(&self) -> Vec<Arc<Host>> {
        self.shared
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    pub async fn submit(&self, run: ScriptRun, validate_only: bool) -> RunResult {
        let start = Instant::now();
        let mut wire = Some(Box::new(WireRun::from(&run)));
        let mut without_host_since = None;
        loop {
            let waiting = self.shared.room.notified();
            match self.place(&run) {
                Placement::Host(host) => {
                    let id = self.shared.next_run.fetch_add(1, Ordering::Relaxed);
                    match host.send(id, wire.take().expect("unsent"), validate_only) {
                        Ok(answer) => {
                            return answer.await.unwrap_or_else(|_| {
                                RunResult::failed(
                                    crashed("the engine host went away"),
                                    start,
                                    false,
                                )
                            })
                        }
                        Err(back) => wire = Some(back),
                    }
                }
                Placement::Full => without_host_since = None,
                Placement::NoHost => {
                    let since = *without_host_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > HOST_WAIT || self.shared.closed.load(Ordering::SeqCst) {
                        let f = Failure {
                            kind: FailureKind::Engine,
                            message: "no engine host is available".into(),
                            stack: None,
                            retryable: true,
                        };
                        return RunResult::failed(f, start, false);
                    }
                }
            }
            // Woken when a run finishes or a host comes up; the timeout covers a host that
            // went away without a word.
            let _ = tokio::time::timeout(Duration::from_millis(50), waiting).await;
        }
    }

    /// The host holding (or that would hold) this script version's warm isolate when it
    /// has an idle worker; otherwise the least busy host with room. Each host takes at most
    /// two runs per worker: the rest wait here, so a host that dies takes few runs with it
    /// and a draining host's replacement gets the queue.
    fn place(&self, run: &ScriptRun) -> Placement {
        let slots = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&run.tenant, &run.script, run.version).hash(&mut hasher);
        let home = (hasher.finish() % slots.len() as u64) as usize;
        let workers = self.shared.config.hosts.workers_per_host.max(1);
        if let Some(host) = &slots[home] {
            if host.load.load(Ordering::SeqCst) < workers {
                return Placement::Host(host.clone());
            }
        }
        let least = slots
            .iter()
            .flatten()
            .min_by_key(|h| h.load.load(Ordering::SeqCst));
        match least {
            None => Placement::NoHost,
            Some(h) if h.load.load(Ordering::SeqCst) < 2 * workers => Placement::Host(h.clone()),
            Some(_) => Placement::Full,
        }
    }

    pub fn stats(&self) -> StatsSnapshot {
        let mut total = *self
            .shared
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        total.warm_isolates = 0;
        let all = self
            .shared
            .all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for host in all {
            let s = *host.stats.lock().unwrap_or_else(|e| e.into_inner());
            add_counters(&mut total, &s);
            total.warm_isolates += s.warm_isolates;
            total.in_flight += host.load.load(Ordering::SeqCst) as u64;
        }
        total.host_recycles = self.shared.recycled.load(Ordering::Relaxed);
        total.host_crashes = self.shared.crashed.load(Ordering::Relaxed);
        total
    }
}

impl Drop for HostPool {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        for host in self.live() {
            host.drain();
        }
    }
}

fn add_counters(total: &mut StatsSnapshot, s: &StatsSnapshot) {
    total.runs += s.runs;
    total.cold_starts += s.cold_starts;
    total.warm_hits += s.warm_hits;
    total.evictions += s.evictions;
    total.discarded += s.discarded;
}

fn crashed(message: impl Into<String>) -> Failure {
    Failure {
        kind: FailureKind::EngineCrashed,
        message: message.into(),
        stack: None,
        retryable: true,
    }
}

impl Host {
    /// Hands a run to the host, unless it is draining or gone (then the run comes back).
    fn send(
        &self,
        id: u64,
        run: Box<WireRun>,
        validate_only: bool,
    ) -> Result<oneshot::Receiver<RunResult>, Box<WireRun>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.draining {
            return Err(run);
        }
        let Some(tx) = &state.tx else { return Err(run) };
        let (reply, answer) = oneshot::channel();
        match tx.send(ToHost::Run {
            id,
            run: *run,
            validate_only,
        }) {
            Ok(()) => {
                state.pending.insert(id, reply);
                self.load.fetch_add(1, Ordering::SeqCst);
                Ok(answer)
            }
            Err(mpsc::error::SendError(ToHost::Run { run, .. })) => Err(Box::new(run)),
            Err(_) => unreachable!("a run frame comes back as sent"),
        }
    }

    fn finish(&self, id: u64, result: RunResult, stats: StatsSnapshot) {
        let waiting = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .remove(&id);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        if let Some(waiting) = waiting {
            self.load.fetch_sub(1, Ordering::SeqCst);
            let _ = waiting.send(result);
        }
    }

    /// Stops new work; the host exits once its runs are done. Whether this call began it.
    fn drain(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.draining {
            return false;
        }
        state.draining = true;
        if let Some(tx) = &state.tx {
            let _ = tx.send(ToHost::Drain);
        }
        true
    }

    /// The host is gone: the runs it still had, and whether it was draining.
    fn close(&self) -> (Vec<oneshot::Sender<RunResult>>, bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.tx = None;
        self.load.store(0, Ordering::SeqCst);
        (
            state.pending.drain().map(|(_, w)| w).collect(),
            state.draining,
        )
    }
}

/// Starts the host process of `slot`; it joins the pool once it says it is ready.
fn spawn_host(shared: &Arc<Shared>, slot: usize) -> std::io::Result<()> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut command = tokio::process::Command::new(&shared.binary);
    command
        .arg("engine-host")
        // Hosts get no secrets from the daemon's environment: only what logging needs, and
        // a fixed time zone so no zone file is read and scripts see UTC everywhere.
        .env_clear()
        .env("TZ", "UTC")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    for var in [
        "RUST_LOG",
        "SCRIPTD_LOG__FILTER",
        "SCRIPTD_LOG__FORMAT",
        "SCRIPTD_LOG_FORMAT",
    ] {
        if let Ok(value) = std::env::var(var) {
            command.env(var, value);
        }
    }
    let fd = theirs.as_raw_fd();
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if fd == protocol::HOST_FD {
                // Already in place: only clear close-on-exec.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, protocol::HOST_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    drop(theirs);
    ours.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(ours)?;
    tokio::spawn(run_host(shared.clone(), slot, child, stream));
    Ok(())
}

/// One host's life: handshake, then results and API calls until it ends; then its runs are
/// failed (if it died) and its slot refilled (unless it was replaced already).
async fn run_host(
    shared: Arc<Shared>,
    slot: usize,
    mut child: tokio::process::Child,
    stream: tokio::net::UnixStream,
) {
    let pid = child.id().unwrap_or(0);
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, protocol::codec());
    let mut sink = FramedWrite::new(write, protocol::codec());
    let init = ToHost::Init {
        engine: shared.config.clone(),
        caps: shared.caps.config().clone(),
    };
    let ready = async {
        let bytes = serde_json::to_vec(&init).map_err(|e| e.to_string())?;
        sink.send(bytes::Bytes::from(bytes))
            .await
            .map_err(|e| e.to_string())?;
        match frames.next().await {
            Some(Ok(bytes)) => match serde_json::from_slice::<FromHost>(&bytes) {
                Ok(FromHost::Ready { .. }) => Ok(()),
                _ => Err("its first frame was not Ready".to_owned()),
            },
            Some(Err(e)) => Err(e.to_string()),
            None => Err("it exited".to_owned()),
        }
    };
    if let Err(why) = tokio::time::timeout(READY_WAIT, ready)
        .await
        .unwrap_or_else(|_| Err("no answer".into()))
    {
        let status = child.wait().await.ok();
        tracing::error!(pid, slot, %why, ?status, "An engine host did not start; trying again in a second.");
        tokio::time::sleep(Duration::from_secs(1)).await;
        respawn(&shared, slot, None);
        return;
    }
    let (tx, mut outgoing) = mpsc::unbounded_channel::<ToHost>();
    tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            let Ok(bytes) = serde_json::to_vec(&frame) else {
                continue;
            };
            if sink.send(bytes::Bytes::from(bytes)).await.is_err() {
                break;
            }
        }
    });
    let host = Arc::new(Host {
        pid,
        state: Mutex::new(HostState {
            pending: HashMap::new(),
            tx: Some(tx.clone()),
            draining: false,
        }),
        load: AtomicUsize::new(0),
        results: AtomicU64::new(0),
        stats: Mutex::new(StatsSnapshot::default()),
    });
    shared
        .all
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(host.clone());
    if shared.closed.load(Ordering::SeqCst) {
        host.drain();
    } else {
        shared.slots.lock().unwrap_or_else(|e| e.into_inner())[slot] = Some(host.clone());
    }
    shared.room.notify_waiters();
    tracing::debug!(pid, slot, "Engine host ready.");
    while let Some(Ok(bytes)) = frames.next().await {
        match serde_json::from_slice::<FromHost>(&bytes) {
            Ok(FromHost::Done { id, result, stats }) => {
                // An engine fault (not the script's) may leave the host's engine unsound:
                // such a host is replaced at once.
                let engine_fault =
                    matches!(&result.outcome, Err(f) if f.kind == FailureKind::Engine);
                host.finish(id, result.into(), stats);
                recycle_if_due(&shared, slot, &host, engine_fault);
                shared.room.notify_waiters();
            }
            Ok(FromHost::Cap {
                call,
                from,
                request,
            }) => {
                let (caps, tx) = (shared.caps.clone(), tx.clone());
                tokio::spawn(async move {
                    let reply = serve_call(caps, from.into(), request).await;
                    let _ = tx.send(ToHost::CapReply { call, reply });
                });
            }
            Ok(FromHost::Ready { .. }) => {}
            Err(e) => tracing::warn!(pid, error = %e, "Unreadable frame from an engine host."),
        }
    }
    let status = child.wait().await.ok();
    let (stranded, draining) = host.close();
    {
        let mut retired = shared.retired.lock().unwrap_or_else(|e| e.into_inner());
        let last = *host.stats.lock().unwrap_or_else(|e| e.into_inner());
        add_counters(&mut retired, &last);
        shared
            .all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|h| !Arc::ptr_eq(h, &host));
    }
    if !draining || !stranded.is_empty() {
        shared.crashed.fetch_add(1, Ordering::Relaxed);
        let how = status.map_or("unknown".to_owned(), |s| s.to_string());
        tracing::error!(pid, slot, status = %how, runs = stranded.len(), "An engine host died; its runs fail as engine_crashed and a new host starts.");
        for waiting in stranded {
            let f = crashed(format!("the engine host running the script died ({how})"));
            let _ = waiting.send(RunResult::failed(f, Instant::now(), false));
        }
    } else {
        tracing::debug!(pid, slot, "Engine host exited after draining.");
    }
    respawn(&shared, slot, Some(&host));
}

/// Starts a new host for `slot` if `gone` still holds it (a recycled host's slot was
/// handed to its replacement already) and the pool is open.
fn respawn(shared: &Arc<Shared>, slot: usize, gone: Option<&Arc<Host>>) {
    {
        let mut slots = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        let holds = match (&slots[slot], gone) {
            (Some(current), Some(gone)) => Arc::ptr_eq(current, gone),
            (None, _) => true,
            (Some(_), None) => false,
        };
        if !holds {
            return;
        }
        slots[slot] = None;
    }
    if shared.closed.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = spawn_host(shared, slot) {
        tracing::error!(slot, error = %e, "Could not start an engine host.");
    }
}

/// Replaces a host that created its share of isolates or grew past the RSS ceiling: the
/// replacement starts now and takes the slot when ready; the old host finishes its runs.
fn recycle_if_due(shared: &Arc<Shared>, slot: usize, host: &Arc<Host>, engine_fault: bool) {
    let results = host.results.fetch_add(1, Ordering::Relaxed) + 1;
    let created = host
        .stats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .cold_starts;
    let limits = &shared.config.hosts;
    let reason = if engine_fault {
        Some("an engine fault".to_owned())
    } else if created >= limits.max_isolates {
        Some(format!("{created} isolates created"))
    } else if results.is_multiple_of(RSS_EVERY) {
        rss_of(host.pid)
            .filter(|rss| *rss >= limits.max_rss.0)
            .map(|rss| format!("{} resident", ByteSize(rss)))
    } else {
        None
    };
    let Some(reason) = reason else { return };
    if !host.drain() {
        return;
    }
    shared.recycled.fetch_add(1, Ordering::Relaxed);
    tracing::info!(pid = host.pid, slot, %reason, "Recycling an engine host.");
    {
        let mut slots = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots[slot].as_ref().is_some_and(|h| Arc::ptr_eq(h, host)) {
            slots[slot] = None;
        }
    }
    if !shared.closed.load(Ordering::SeqCst) {
        if let Err(e) = spawn_host(shared, slot) {
            tracing::error!(slot, error = %e, "Could not start an engine host.");
        }
    }
}

/// Resident memory of a process, from /proc.
pub fn rss_of(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf takes a plain integer.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

async fn serve_call(
    caps: SharedCapabilities,
    call: crate::caps::Call,
    request: CapRequest,
) -> Result<CapValue, crate::caps::CapError> {
    Ok(match request {
        CapRequest::Publish(m) => CapValue::Published(caps.publish(call, m).await?),
        CapRequest::Kv(op) => CapValue::Kv(caps.kv(call, op).await?),
        CapRequest::Fetch(r) => CapValue::Fetched(caps.fetch(call, r).await?),
        CapRequest::Secret(name) => CapValue::Secret(caps.secret(call, name).await?),
    })
}
