//! The engine host process (`scriptd engine-host`, started by the daemon): runs the
//! in-process engine on the runs the daemon sends over fd 3, forwards scripts' API calls to
//! the daemon, and exits when told to drain or when the daemon goes away.

use std::collections::HashMap;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::protocol::{self, CapRequest, CapValue, FromHost, ToHost};
use crate::caps::{
    Call, CapError, CapResult, Capabilities, CapabilitiesConfig, FetchRequest, FetchResponse, KvOp,
    KvReply, Publish,
};
use crate::engine::{Engine, EngineConfig, FailureKind, Isolation, RunResult};

/// Entry point of the hidden subcommand. `stack` is the native stack of the thread that
/// runs isolates (the daemon passes its `engine.thread_stack`).
pub fn main(stack: usize) -> anyhow::Result<()> {
    // Everything runs on one thread with that stack: the socket, and (with one worker per
    // host) the isolates themselves, so a run never changes threads inside the host.
    let host = std::thread::Builder::new()
        .name("scriptd-host".into())
        .stack_size(stack)
        .spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            tokio::task::LocalSet::new().block_on(&runtime, serve())
        })?;
    host.join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the engine host's thread panicked")))
}

async fn serve() -> anyhow::Result<()> {
    // SAFETY: the daemon passes the socket as fd 3 and nothing else in this process owns it.
    let socket = unsafe { std::os::unix::net::UnixStream::from_raw_fd(protocol::HOST_FD) };
    socket.set_nonblocking(true)?;
    let socket = tokio::net::UnixStream::from_std(socket)
        .context("fd 3 is not the daemon's socket: engine-host is started by `scriptd run`")?;
    let (read, write) = socket.into_split();
    let mut frames = FramedRead::new(read, protocol::codec());
    let mut sink = FramedWrite::new(write, protocol::codec());

    let (engine_config, caps_config) = match next(&mut frames).await? {
        Some(ToHost::Init { engine, caps }) => (engine, caps),
        _ => bail!("the daemon did not start with an Init frame"),
    };
    let (out, mut outgoing) = mpsc::unbounded_channel::<FromHost>();
    // Writes frames until told to finish, then what is already queued. (The engine keeps a
    // sender for its scripts' API calls, so the queue never closes by itself: waiting for
    // that held every draining host for the full timeout below.)
    let (finish, finishing) = oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        tokio::pin!(finishing);
        let mut finished = false;
        loop {
            let frame = tokio::select! {
                frame = outgoing.recv() => frame,
                _ = &mut finishing, if !finished => {
                    finished = true;
                    outgoing.close();
                    outgoing.recv().await
                }
            };
            let Some(frame) = frame else { break };
            if protocol::send_queued(&mut sink, frame, &mut outgoing)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let remote = Arc::new(Remote {
        config: caps_config,
        out: out.clone(),
        calls: Mutex::new(HashMap::new()),
        next_call: AtomicU64::new(1),
    });
    let config = EngineConfig {
        isolation: Isolation::Thread,
        workers: engine_config.hosts.workers_per_host.max(1),
        ..engine_config.clone()
    };
    // One worker runs on this thread: while its script runs, frames wait in the socket
    // (the daemon hands each worker at most `engine.runs_per_worker` runs). More workers
    // get threads of their own, so that one's long run holds up no other.
    let engine = if config.workers == 1 {
        let (engine, serve) = Engine::start_local(&config, remote.clone())?;
        tokio::task::spawn_local(serve);
        Arc::new(engine)
    } else {
        Arc::new(Engine::start_with(&config, remote.clone())?)
    };
    // Everything that reads files (the startup snapshot, thread stacks) happens before the
    // process gives up the right to.
    crate::engine::prepare();
    let refused = super::confine::apply(engine_config.hosts.seccomp)?;
    let _ = out.send(FromHost::Ready {
        pid: std::process::id(),
        refused,
    });

    let mut held = super::sources::HeldSources::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let drained = Arc::new(tokio::sync::Notify::new());
    let mut draining = false;
    loop {
        let frame = tokio::select! {
            frame = next(&mut frames) => match frame {
                Ok(frame) => frame,
                // The daemon's end of the socket went away (it was killed): so do we.
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "The daemon's socket failed; leaving.");
                    None
                }
            },
            // A wake-up can be left over from a moment the host was idle before the
            // drain began: only an empty host leaves (one left with a run in flight and
            // the run failed as engine_crashed).
            _ = drained.notified(), if draining => {
                if in_flight.load(Ordering::SeqCst) == 0 {
                    break;
                }
                continue;
            }
        };
        match frame {
            // The daemon went away: nothing to report to.
            None => break,
            Some(ToHost::Run {
                id,
                mut run,
                validate_only,
            }) => {
                let Some(source) = held.take(run.source_ref()) else {
                    // The daemon decides what is held here, so this is a fault of its own.
                    let lost = crate::engine::isolate::failure(
                        FailureKind::Engine,
                        "the engine host was not sent the script's source".into(),
                        None,
                    );
                    let result = RunResult::failed(lost, std::time::Instant::now(), false);
                    let _ = out.send(FromHost::Done {
                        id,
                        result: result.into(),
                        stats: engine.stats().into(),
                    });
                    continue;
                };
                in_flight.fetch_add(1, Ordering::SeqCst);
                let (engine, out, in_flight, drained) = (
                    engine.clone(),
                    out.clone(),
                    in_flight.clone(),
                    drained.clone(),
                );
                tokio::spawn(async move {
                    let run = run.into_run(source);
                    let result = if validate_only {
                        engine.submit(run, true).await
                    } else {
                        engine.run(run).await
                    };
                    let _ = out.send(FromHost::Done {
                        id,
                        result: result.into(),
                        stats: engine.stats().into(),
                    });
                    if in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
                        drained.notify_one();
                    }
                });
            }
            Some(ToHost::CapReply { call, reply }) => remote.answer(call, reply),
            Some(ToHost::Drain) => {
                tracing::debug!(
                    pid = std::process::id(),
                    in_flight = in_flight.load(Ordering::SeqCst),
                    "Draining."
                );
                draining = true;
                if in_flight.load(Ordering::SeqCst) == 0 {
                    break;
                }
            }
            Some(ToHost::Init { .. }) => bail!("a second Init frame"),
        }
    }
    tracing::debug!(pid = std::process::id(), "Leaving.");
    drop(out);
    drop(remote);
    let _ = finish.send(());
    // Results already queued are written before leaving.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
    // Leave without dropping the engine one isolate at a time: they hold nothing outside
    // this process, and its exit returns their memory at once.
    std::process::exit(0)
}

async fn next<R>(
    frames: &mut FramedRead<R, tokio_util::codec::LengthDelimitedCodec>,
) -> anyhow::Result<Option<ToHost>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    match frames.next().await {
        None => Ok(None),
        Some(bytes) => Ok(Some(
            serde_json::from_slice(&bytes?).context("a frame from the daemon")?,
        )),
    }
}

/// The script API of a host: every call goes to the daemon and waits for its reply.
struct Remote {
    config: CapabilitiesConfig,
    out: mpsc::UnboundedSender<FromHost>,
    calls: Mutex<HashMap<u64, oneshot::Sender<Result<CapValue, CapError>>>>,
    next_call: AtomicU64,
}

impl Remote {
    fn answer(&self, call: u64, reply: Result<CapValue, CapError>) {
        let waiting = self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&call);
        if let Some(waiting) = waiting {
            let _ = waiting.send(reply);
        }
    }

    fn ask<T: Send + 'static>(
        &self,
        from: Call,
        request: CapRequest,
        unwrap: fn(CapValue) -> Option<T>,
    ) -> BoxFuture<'static, CapResult<T>> {
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(call, reply);
        let sent = self.out.send(FromHost::Cap {
            call,
            job: from.job,
            request,
        });
        Box::pin(async move {
            if sent.is_err() {
                return Err(CapError::failed("the daemon is gone"));
            }
            match answer.await {
                Ok(Ok(value)) => unwrap(value)
                    .ok_or_else(|| CapError::failed("the daemon answered another call")),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(CapError::failed("the daemon is gone")),
            }
        })
    }
}

impl Capabilities for Remote {
    fn config(&self) -> &CapabilitiesConfig {
        &self.config
    }
    fn publish(&self, call: Call, message: Publish) -> BoxFuture<'static, CapResult<String>> {
        self.ask(call, CapRequest::Publish(message), |v| match v {
            CapValue::Published(s) => Some(s),
            _ => None,
        })
    }
    fn kv(&self, call: Call, op: KvOp) -> BoxFuture<'static, CapResult<KvReply>> {
        self.ask(call, CapRequest::Kv(op), |v| match v {
            CapValue::Kv(r) => Some(r),
            _ => None,
        })
    }
    fn fetch(
        &self,
        call: Call,
        request: FetchRequest,
    ) -> BoxFuture<'static, CapResult<FetchResponse>> {
        self.ask(call, CapRequest::Fetch(request), |v| match v {
            CapValue::Fetched(r) => Some(r),
            _ => None,
        })
    }
    fn secret(&self, call: Call, name: String) -> BoxFuture<'static, CapResult<Option<String>>> {
        self.ask(call, CapRequest::Secret(name), |v| match v {
            CapValue::Secret(s) => Some(s),
            _ => None,
        })
    }
}
