//! One engine host's life, seen from the daemon: starting the process with its socket on
//! fd 3, the handshake, results and script API calls until it ends, failing the runs of a
//! host that died, refilling its slot, and recycling a host past its budget.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::protocol::{self, CapRequest, CapValue, FromHost, ToHost};
use super::{add_counters, crashed, Answer, Host, HostState, Shared};
use crate::caps::CapError;
use crate::engine::{Failure, FailureKind, RunResult, SharedCapabilities, StatsSnapshot};
use crate::units::ByteSize;

/// A started host has this long to say it is ready.
const READY_WAIT: Duration = Duration::from_secs(30);
/// A host's RSS is read from /proc (four system calls) at a result when this long has
/// passed since the last read: at most a few times a second under load, at every result
/// of a quiet host.
pub(super) const RSS_EVERY: Duration = Duration::from_millis(250);
/// How often a host's runs are checked against their timeout and `hosts.kill_grace`.
const DEADLINE_CHECK: Duration = Duration::from_millis(100);

/// Starts the host process of `slot`; it joins the pool once it says it is ready.
pub(super) fn spawn_host(shared: &Arc<Shared>, slot: usize) -> std::io::Result<()> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut command = tokio::process::Command::new(&shared.binary);
    command
        .arg("engine-host")
        .arg("--stack")
        .arg(shared.config.thread_stack.as_usize().to_string())
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
    {
        let _slots = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        shared.starting.lock().unwrap_or_else(|e| e.into_inner())[slot] += 1;
    }
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
                Ok(FromHost::Ready { refused, .. }) => Ok(refused),
                _ => Err("its first frame was not Ready".to_owned()),
            },
            Some(Err(e)) => Err(e.to_string()),
            None => Err("it exited".to_owned()),
        }
    };
    let started = tokio::time::timeout(READY_WAIT, ready)
        .await
        .unwrap_or_else(|_| Err("no answer".into()));
    let refused = match started {
        Ok(refused) => refused,
        Err(why) => {
            started_or_failed(&shared, slot);
            let status = child.wait().await.ok();
            tracing::error!(pid, slot, %why, ?status, "An engine host did not start; trying again in a second.");
            tokio::time::sleep(Duration::from_secs(1)).await;
            respawn(&shared, slot, None);
            return;
        }
    };
    let (tx, mut outgoing) = mpsc::unbounded_channel::<ToHost>();
    tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            // The tasks ready to run go first: the runs they place on this host then leave
            // in this write, not in one write (and one wake-up of the host) each.
            tokio::task::yield_now().await;
            if protocol::send_queued(&mut sink, frame, &mut outgoing)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let host = Arc::new(Host {
        pid,
        refused,
        workers: shared.config.hosts.workers_per_host.max(1),
        state: Mutex::new(HostState {
            pending: HashMap::new(),
            waiting: Default::default(),
            tx: Some(tx.clone()),
            sources: Default::default(),
            draining: false,
            killed: None,
        }),
        load: AtomicUsize::new(0),
        rss_due: Mutex::new(Instant::now()),
        stats: Mutex::new(StatsSnapshot::default()),
    });
    shared
        .all
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(host.clone());
    {
        let mut slots = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        shared.starting.lock().unwrap_or_else(|e| e.into_inner())[slot] -= 1;
        if shared.closed.load(Ordering::SeqCst) {
            host.drain();
        } else {
            slots[slot] = Some(host.clone());
        }
    }
    shared.room.notify_waiters();
    tracing::debug!(pid, slot, refused = ?host.refused, "Engine host ready.");
    let grace = shared.config.hosts.kill_grace;
    let mut deadlines = tokio::time::interval(DEADLINE_CHECK);
    deadlines.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let bytes = tokio::select! {
            frame = frames.next() => match frame {
                Some(Ok(bytes)) => bytes,
                _ => break,
            },
            _ = deadlines.tick() => {
                if let Some(id) = host.overdue(grace) {
                    tracing::warn!(pid, slot, grace = ?grace, "A run went on past its timeout and the grace; killing its engine host.");
                    host.kill(id);
                }
                continue;
            }
        };
        match serde_json::from_slice::<FromHost>(&bytes) {
            Ok(FromHost::Done { id, result, stats }) => {
                // An engine fault (not the script's) may leave the host's engine unsound:
                // such a host is replaced at once.
                let engine_fault =
                    matches!(&result.outcome, Err(f) if f.kind == FailureKind::Engine);
                host.finish(id, result.into(), stats.into());
                recycle_if_due(&shared, slot, &host, engine_fault);
                shared.room.notify_waiters();
            }
            Ok(FromHost::Cap { call, job, request }) => {
                let Some(caller) = host.caller(&job) else {
                    tracing::warn!(pid, %job, "An engine host asked for a run it does not have; refused.");
                    let reply = Err(CapError::denied("no such run on this engine host"));
                    let _ = tx.send(ToHost::CapReply { call, reply });
                    continue;
                };
                let (caps, tx) = (shared.caps.clone(), tx.clone());
                tokio::spawn(async move {
                    let reply = serve_call(caps, caller, request).await;
                    let _ = tx.send(ToHost::CapReply { call, reply });
                });
            }
            Ok(FromHost::Ready { .. }) => {}
            Err(e) => tracing::warn!(pid, error = %e, "Unreadable frame from an engine host."),
        }
    }
    let status = child.wait().await.ok();
    let (stranded, draining, killed) = host.close();
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
    if let Some(overdue) = killed {
        shared.killed.fetch_add(1, Ordering::Relaxed);
        for (id, waiting) in stranded {
            let answer = if id == overdue {
                let f = Failure {
                    kind: FailureKind::Timeout,
                    message: format!(
                        "the run went on past its {} timeout (busy where the engine does not check for it) and its engine host was killed {} later",
                        humantime::format_duration(waiting.timeout),
                        humantime::format_duration(grace)
                    ),
                    stack: None,
                    retryable: true,
                };
                let started = waiting.started.unwrap_or_else(Instant::now);
                Answer::Done(RunResult::failed(f, started, false))
            } else {
                Answer::Again
            };
            let _ = waiting.reply.send(answer);
        }
    } else if !draining || !stranded.is_empty() {
        shared.crashed.fetch_add(1, Ordering::Relaxed);
        let how = status.map_or("unknown".to_owned(), |s| s.to_string());
        tracing::error!(pid, slot, status = %how, runs = stranded.len(), "An engine host died; its runs fail as engine_crashed and a new host starts.");
        for (_, waiting) in stranded {
            let f = crashed(format!("the engine host running the script died ({how})"));
            let answer = Answer::Done(RunResult::failed(f, Instant::now(), false));
            let _ = waiting.reply.send(answer);
        }
    } else {
        tracing::debug!(pid, slot, "Engine host exited after draining.");
    }
    respawn(&shared, slot, Some(&host));
}

/// Starts a new host for `slot` if `gone` still holds it (a recycled host's slot was
/// handed to its replacement already) and the pool is open.
fn started_or_failed(shared: &Shared, slot: usize) {
    let _slots = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
    shared.starting.lock().unwrap_or_else(|e| e.into_inner())[slot] -= 1;
}

fn respawn(shared: &Arc<Shared>, slot: usize, gone: Option<&Arc<Host>>) {
    {
        let mut slots = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        // An empty slot with a host starting for it is taken care of: a recycled host that
        // exits before its replacement is up must not start another (each such one was
        // left running without work, holding its memory, until the daemon stopped).
        let starting = shared.starting.lock().unwrap_or_else(|e| e.into_inner())[slot];
        let holds = match (&slots[slot], gone) {
            (Some(current), Some(gone)) => Arc::ptr_eq(current, gone),
            (None, _) => starting == 0,
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
    } else if host.rss_due() {
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
