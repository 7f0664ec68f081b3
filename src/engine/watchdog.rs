//! The wall-clock limit: a thread outside the isolate's thread that terminates a run when its
//! deadline passes, so a runaway script cannot starve its own supervisor.

use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Instant;

use super::guard::Guard;

#[derive(Default)]
struct State {
    /// The run being watched: its generation, deadline and the isolate to stop.
    armed: Option<(u64, Instant, Arc<Guard>)>,
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
    /// `deadline`.
    pub fn arm(&self, guard: Arc<Guard>, deadline: Instant) -> Armed<'_> {
        let (lock, cvar) = &*self.shared;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.generation += 1;
        let generation = state.generation;
        state.armed = Some((generation, deadline, guard));
        if state.wakes_at.is_none_or(|at| deadline < at) {
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
        if matches!(state.armed, Some((g, _, _)) if g == self.generation) {
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
        let Some((_, deadline, guard)) = &state.armed else {
            state.wakes_at = None;
            state = cvar.wait(state).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let now = Instant::now();
        if now >= *deadline {
            guard.on_timeout();
            state.armed = None;
            continue;
        }
        let wait = *deadline - now;
        state.wakes_at = Some(*deadline);
        state = cvar
            .wait_timeout(state, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}
