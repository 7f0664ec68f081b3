//! Engine host processes: isolates live in child processes of the daemon (its own binary,
//! `scriptd engine-host`), so a leak, an out-of-memory abort or a crash in the engine costs
//! one host, never the daemon. The pool starts one host per slot, places runs on the host
//! holding the script's warm isolate when it has room, recycles a host (replacement first,
//! then drain) after a number of isolate creations or past an RSS ceiling, and fails the
//! runs of a host that died as `engine_crashed` while a replacement starts.

mod child;
mod confine;
mod lifecycle;
mod protocol;
mod sources;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use child::main as host_main;
pub use lifecycle::rss_of;
use lifecycle::spawn_host;
use protocol::{ToHost, WireRun};

use super::failure::{Failure, FailureKind};
use super::{EngineConfig, RunResult, ScriptRun, SharedCapabilities, StatsSnapshot};
use crate::caps::Call;
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
    /// How long past its timeout a run may go on before its host is killed to stop it.
    /// The host's own watchdog stops JavaScript at the timeout; a run busy inside the
    /// engine's native code (a sort, a regular expression, JSON of a huge value) may not
    /// notice until that code returns. The run is then recorded as `timeout`, a new host
    /// takes the slot, and the runs that were waiting on the killed host go to another.
    #[serde(with = "crate::units::duration_str")]
    pub kill_grace: Duration,
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
            kill_grace: Duration::from_secs(1),
        }
    }
}

/// How long a run waits for a host to be up before it fails as an engine failure.
const HOST_WAIT: Duration = Duration::from_secs(30);

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
    /// Hosts started for each slot and not yet up (or failed); changed under `slots`'s
    /// lock, so a slot that is empty because its replacement is still starting is told
    /// from one that needs a host.
    starting: Mutex<Vec<usize>>,
    /// Every host not yet gone, draining ones included (for their counters).
    all: Mutex<Vec<Arc<Host>>>,
    /// Signalled whenever a host finishes a run or comes up.
    room: tokio::sync::Notify,
    /// Counters of hosts that are gone.
    retired: Mutex<StatsSnapshot>,
    recycled: AtomicU64,
    crashed: AtomicU64,
    /// Hosts killed to stop a run that went on past its timeout and the grace.
    killed: AtomicU64,
    closed: AtomicBool,
    next_run: AtomicU64,
}

struct Host {
    pid: u32,
    /// The system calls the host saw refused once confined.
    refused: Vec<String>,
    /// Runs the host works on at once (`workers_per_host`).
    workers: usize,
    state: Mutex<HostState>,
    load: AtomicUsize,
    /// When the host's RSS is to be read next (`lifecycle::RSS_EVERY`).
    rss_due: Mutex<Instant>,
    stats: Mutex<StatsSnapshot>,
}

/// A run handed to a host: who waits for it, and on whose behalf its script API calls act.
/// The daemon answers a host's API call only for a run it has in flight there, as that
/// run's tenant — never as whatever tenant a (possibly compromised) host names.
struct Pending {
    reply: oneshot::Sender<Answer>,
    call: Call,
    /// The run's own timeout.
    timeout: Duration,
    /// When a worker of the host took the run; none while it waits behind another.
    started: Option<Instant>,
}

/// What the caller of a run placed on a host hears back.
enum Answer {
    /// The run's result.
    Done(RunResult),
    /// The host was killed to stop another run before this one began: place it again.
    Again,
}

struct HostState {
    pending: HashMap<u64, Pending>,
    /// Runs sent and waiting for a worker of the host, oldest first: the host takes them in
    /// this order as its workers free up.
    waiting: std::collections::VecDeque<u64>,
    tx: Option<mpsc::UnboundedSender<ToHost>>,
    /// The sources this host holds; decided here, in the order frames are queued.
    sources: sources::SentSources,
    draining: bool,
    /// The run the host was killed to stop, once it was.
    killed: Option<u64>,
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
            starting: Mutex::new(vec![0; count]),
            all: Mutex::new(Vec::new()),
            room: tokio::sync::Notify::new(),
            retired: Mutex::new(StatsSnapshot::default()),
            recycled: AtomicU64::new(0),
            crashed: AtomicU64::new(0),
            killed: AtomicU64::new(0),
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
    /// Host processes started and not yet gone: live, starting and draining ones.
    pub fn processes(&self) -> usize {
        let slots = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        let starting: usize = self
            .shared
            .starting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .sum();
        drop(slots);
        starting
            + self
                .shared
                .all
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.live().iter().map(|h| h.pid).collect()
    }

    /// Each live host's process id and the system calls it saw refused once confined.
    pub fn confinement(&self) -> Vec<(u32, Vec<String>)> {
        self.live()
            .iter()
            .map(|h| (h.pid, h.refused.clone()))
            .collect()
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
        let mut wire = Some(Box::new(WireRun::of(&run)));
        let call = run.call(start + run.limits.timeout);
        let mut without_host_since = None;
        loop {
            let waiting = self.shared.room.notified();
            match self.place(&run) {
                Placement::Host(host) => {
                    let id = self.shared.next_run.fetch_add(1, Ordering::Relaxed);
                    let sent = host.send(
                        id,
                        wire.take().expect("unsent"),
                        &run.source,
                        &call,
                        run.limits.timeout,
                        validate_only,
                    );
                    match sent {
                        Ok(answer) => match answer.await {
                            Ok(Answer::Done(result)) => return result,
                            // Its host was killed for another run before it began.
                            Ok(Answer::Again) => wire = Some(Box::new(WireRun::of(&run))),
                            Err(_) => {
                                let gone = crashed("the engine host went away");
                                return RunResult::failed(gone, start, false);
                            }
                        },
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
    /// `runs_per_worker` runs per worker: the rest wait here, so a host that dies takes
    /// no more runs with it and a draining host's replacement gets the queue.
    fn place(&self, run: &ScriptRun) -> Placement {
        let slots = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&run.tenant, &run.script, run.version).hash(&mut hasher);
        let home = (hasher.finish() % slots.len() as u64) as usize;
        let workers = self.shared.config.hosts.workers_per_host.max(1);
        if let Some(host) = &slots[home] {
            if host.reserve(workers) {
                return Placement::Host(host.clone());
            }
        }
        let room = self.shared.config.runs_per_worker.max(1) * workers;
        let least = slots
            .iter()
            .flatten()
            .min_by_key(|h| h.load.load(Ordering::SeqCst));
        match least {
            None => Placement::NoHost,
            Some(h) if h.reserve(room) => Placement::Host(h.clone()),
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
        total.host_kills = self.shared.killed.load(Ordering::Relaxed);
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
    /// Whether the host's RSS is due to be read (`lifecycle::RSS_EVERY`); if so, the next
    /// read is due that long from now.
    fn rss_due(&self) -> bool {
        let now = Instant::now();
        let mut due = self.rss_due.lock().unwrap_or_else(|e| e.into_inner());
        if now < *due {
            return false;
        }
        *due = now + lifecycle::RSS_EVERY;
        true
    }

    /// Takes a place for one run if fewer than `limit` are held, in one step: checked and
    /// taken apart, two callers could both see the last place free, and a host held more
    /// than `runs_per_worker` runs per worker. `send` gives it back if the run does not go.
    fn reserve(&self, limit: usize) -> bool {
        self.load
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                (l < limit).then_some(l + 1)
            })
            .is_ok()
    }

    /// Gives back a place taken by `reserve` for a run that did not go (the count was reset
    /// if the host went away meanwhile).
    fn unreserve(&self) {
        let _ = self
            .load
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                Some(l.saturating_sub(1))
            });
    }

    /// Hands a run to the host, for which `reserve` took a place, unless it is draining or
    /// gone (then the run comes back and the place is given back).
    fn send(
        &self,
        id: u64,
        mut run: Box<WireRun>,
        source: &Arc<str>,
        call: &Call,
        timeout: Duration,
        validate_only: bool,
    ) -> Result<oneshot::Receiver<Answer>, Box<WireRun>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.draining || state.tx.is_none() {
            self.unreserve();
            return Err(run);
        }
        // Should the frame not be queued, the host is gone, and what it held with it.
        run.with_source(state.sources.reference(source));
        let Some(tx) = &state.tx else {
            self.unreserve();
            return Err(run);
        };
        let (reply, answer) = oneshot::channel();
        match tx.send(ToHost::Run {
            id,
            run: *run,
            validate_only,
        }) {
            Ok(()) => {
                let running = state
                    .pending
                    .values()
                    .filter(|p| p.started.is_some())
                    .count();
                let started = if running < self.workers {
                    Some(Instant::now())
                } else {
                    state.waiting.push_back(id);
                    None
                };
                let call = call.clone();
                let pending = Pending {
                    reply,
                    call,
                    timeout,
                    started,
                };
                state.pending.insert(id, pending);
                Ok(answer)
            }
            Err(mpsc::error::SendError(ToHost::Run { run, .. })) => {
                self.unreserve();
                Err(Box::new(run))
            }
            Err(_) => unreachable!("a run frame comes back as sent"),
        }
    }

    fn finish(&self, id: u64, result: RunResult, stats: StatsSnapshot) {
        let finished = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let finished = state.pending.remove(&id);
            state.waiting.retain(|w| *w != id);
            // The worker it had takes the oldest waiting run.
            if finished.as_ref().is_some_and(|p| p.started.is_some()) {
                if let Some(next) = state.waiting.pop_front() {
                    if let Some(p) = state.pending.get_mut(&next) {
                        p.started = Some(Instant::now());
                    }
                }
            }
            finished
        };
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        if let Some(finished) = finished {
            self.load.fetch_sub(1, Ordering::SeqCst);
            let _ = finished.reply.send(Answer::Done(result));
        }
    }

    /// The run that has gone on `grace` past its timeout, if one has.
    fn overdue(&self, grace: Duration) -> Option<u64> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.killed.is_some() {
            return None;
        }
        state.pending.iter().find_map(|(id, p)| {
            let started = p.started?;
            (started.elapsed() > p.timeout + grace).then_some(*id)
        })
    }

    /// Kills the host to stop run `id`; it takes no more runs. Its end is handled as any
    /// host's (`close`), with `id` recorded as a timeout and the others placed again.
    fn kill(&self, id: u64) {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.killed = Some(id);
            state.draining = true;
        }
        // SAFETY: kill(2) with a pid this pool started and has not yet reaped.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
        }
    }

    /// The caller of a script API call the host made for `job`, if that job is in flight
    /// here.
    fn caller(&self, job: &str) -> Option<Call> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .pending
            .values()
            .find(|p| p.call.job == job)
            .map(|p| p.call.clone())
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

    /// The host is gone: the runs it still had, whether it was draining, and the run it
    /// was killed to stop.
    fn close(&self) -> (Vec<(u64, Pending)>, bool, Option<u64>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.tx = None;
        state.waiting.clear();
        self.load.store(0, Ordering::SeqCst);
        (
            state.pending.drain().collect(),
            state.draining,
            state.killed,
        )
    }
}
