//! The jobs this replica is claiming, running or recording an attempt of. A claim stored
//! under the replica's name for a job it does not hold is one whose answer was lost (or
//! whose hand-back failed): knowing that, the replica takes it back at once rather than
//! waiting out its lease.

use std::collections::HashMap;
use std::sync::Mutex;

/// How many paths of this replica hold each job (a fan-out's direct run and a lane can
/// meet on one job for a moment; each holds it until its own attempt has ended).
#[derive(Debug, Default)]
pub struct HeldHere(Mutex<HashMap<String, u32>>);

impl HeldHere {
    /// Holds `job`; true if nothing here held it before.
    pub fn hold(&self, job: &str) -> bool {
        let mut held = self.lock();
        match held.get_mut(job) {
            Some(count) => {
                *count += 1;
                false
            }
            None => {
                held.insert(job.to_owned(), 1);
                true
            }
        }
    }

    /// Lets go of one hold of `job`.
    pub fn let_go(&self, job: &str) {
        let mut held = self.lock();
        if let Some(count) = held.get_mut(job) {
            *count -= 1;
            if *count == 0 {
                held.remove(job);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // The map is consistent after every statement: a panic elsewhere leaves it usable.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_idle_here_only_once_every_hold_has_let_go() {
        let held = HeldHere::default();
        assert!(held.hold("j"));
        assert!(!held.hold("j"));
        assert!(held.hold("k"));
        held.let_go("j");
        assert!(!held.hold("j"), "one hold of j is still there");
        held.let_go("j");
        held.let_go("j");
        assert!(held.hold("j"));
        // Letting go of a job not held changes nothing.
        held.let_go("x");
        assert!(held.hold("x"));
    }
}
