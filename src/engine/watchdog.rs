//! The wall-clock and CPU-time limits: a thread outside the isolate's thread that terminates a
//! run when its deadline passes or its thread has used its CPU time, so a runaway script
//! cannot starve its own supervisor.

use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::guard::Guard;

/// The CPU time a run may use, on the clock of the thread that runs it.
#[derive(Clone, Copy, Debug)]
pub struct CpuBudget {
    clock: libc::clockid_t,
    /// The thread's CPU time when the run began.
    start: Duration,
    limit: Duration,
}

impl CpuBudget {
    /// A budget of `limit` on the calling thread's CPU clock, from now; none if the clock
    /// cannot be read (the wall-clock limit then still holds).
    pub fn of_this_thread(limit: Duration) -> Option<CpuBudget> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self is the calling thread; the out-pointer is a valid local.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } != 0 {
            return None;
        }
        Some(CpuBudget {
            clock,
            start: clock_reading(clock)?,
            limit,
        })
    }

    /// CPU time left, or none once it is used up (or the clock is gone).
    fn left(&self) -> Option<Duration> {
        let used = clock_reading(self.clock)?.saturating_sub(self.start);
        self.limit.checked_sub(used).filter(|left| !left.is_zero())
    }
}

/// A clock's reading (a thread's CPU clock here; the machine's monotonic clock for a run's
/// start-by as it crosses to an engine host).
pub(super) fn clock_reading(clock: libc::clockid_t) -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the out-pointer is a valid local; a clock of a thread that has exited fails
    // with EINVAL, which is handled.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return None;
    }
    Some(Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

/// The run being watched.
struct Watched {
    generation: u64,
    deadline: Instant,
    cpu: Option<CpuBudget>,
    guard: Arc<Guard>,
}

#[derive(Default)]
struct State {
    /// The run being watched: its generation, deadline, CPU budget and the isolate to stop.
    armed: Option<Watched>,
    generation: u64,
    /// When the watching thread wakes by itself: `None` while it waits for a run to be
    /// armed. Arming a later deadline than this, or ending a run, need not wake it: it
    /// looks again then. So a busy worker costs the thread about one wake-up per deadline,
    /// not two per run (a run's arm and end each woke it before: two context switches).
    wakes_at: Option<Instant>,
    /// Set when the owning worker goes away; the thread then exits.
    shutdown: bool,
}

/// One watchdog per engine worker (a worker runs one isolate at a time).
pub struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
}

/// Disarms the watchdog when dropped: the run ended before its deadline.
pub struct Armed<'a> {
    watchdog: &'a Watchdog,
    generation: u64,
}

impl Watchdog {
    pub fn spawn(name: String) -> std::io::Result<Watchdog> {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let theirs = shared.clone();
        thread::Builder::new()
            .name(name)
            .spawn(move || watch(&theirs))?;
        Ok(Watchdog { shared })
    }

    /// Watches `guard`'s isolate until the returned value is dropped; terminates it at
    /// `deadline`, or once its thread has used `cpu`.
    pub fn arm(&self, guard: Arc<Guard>, deadline: Instant, cpu: Option<CpuBudget>) -> Armed<'_> {
        let (lock, cvar) = &*self.shared;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.generation += 1;
        let generation = state.generation;
        // A thread's CPU time grows no faster than the wall clock: the budget cannot run
        // out before this.
        let first_look = cpu.map_or(deadline, |b| deadline.min(Instant::now() + b.limit));
        state.armed = Some(Watched {
            generation,
            deadline,
            cpu,
            guard,
        });
        if state.wakes_at.is_none_or(|at| first_look < at) {
            cvar.notify_one();
        }
        Armed {
            watchdog: self,
            generation,
        }
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let (lock, _) = &*self.watchdog.shared;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(&state.armed, Some(w) if w.generation == self.generation) {
            // The guard (and its isolate handle) is let go at once; the thread finds
            // nothing armed when it next wakes.
            state.armed = None;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).shutdown = true;
        cvar.notify_one();
    }
}

fn watch(shared: &(Mutex<State>, Condvar)) {
    let (lock, cvar) = shared;
    let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
    while !state.shutdown {
        let Some(watched) = &state.armed else {
            state.wakes_at = None;
            state = cvar.wait(state).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let now = Instant::now();
        if now >= watched.deadline {
            watched.guard.on_timeout();
            state.armed = None;
            continue;
        }
        let mut wake = watched.deadline;
        if let Some(budget) = &watched.cpu {
            match budget.left() {
                None => {
                    watched.guard.on_cpu_limit();
                    state.armed = None;
                    continue;
                }
                // The earliest the rest can be used up: look again then.
                Some(left) => wake = wake.min(now + left),
            }
        }
        let wait = wake - now;
        state.wakes_at = Some(wake);
        state = cvar
            .wait_timeout(state, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}
