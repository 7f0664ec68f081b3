//! Warm isolates of one engine worker, kept per (tenant, script, version) and evicted least
//! recently used first when the pool passes its count or memory budget.

use super::isolate::ScriptIsolate;
use super::ScriptRun;
use crate::domain::Version;

struct Entry {
    tenant: String,
    script: String,
    version: Version,
    isolate: ScriptIsolate,
    memory: usize,
    last_used: u64,
}

pub struct WarmPool {
    entries: Vec<Entry>,
    clock: u64,
    max_count: usize,
    max_memory: usize,
}

impl WarmPool {
    pub fn new(max_count: usize, max_memory: usize) -> Self {
        WarmPool {
            entries: Vec::new(),
            clock: 0,
            max_count,
            max_memory,
        }
    }

    /// Takes out the warm isolate of this run's script version, if there is one holding
    /// exactly this source with this heap limit. An isolate of the same key that no longer
    /// fits is dropped.
    pub fn take(&mut self, run: &ScriptRun) -> Option<ScriptIsolate> {
        let i = self.entries.iter().position(|e| {
            e.version == run.version && e.script == run.script && e.tenant == run.tenant
        })?;
        let entry = self.entries.swap_remove(i);
        let same_source = entry
            .isolate
            .source
            .as_ref()
            .is_some_and(|s| std::sync::Arc::ptr_eq(s, &run.source) || **s == *run.source);
        (same_source && entry.isolate.heap_limit == run.limits.heap).then_some(entry.isolate)
    }

    /// Keeps an isolate (not entered) that ended its run cleanly, with its memory use; returns how many were evicted to make
    /// room (possibly the new one itself, if it alone is over the memory budget).
    pub fn put(&mut self, run: &ScriptRun, isolate: ScriptIsolate, memory: usize) -> usize {
        self.clock += 1;
        self.entries.push(Entry {
            tenant: run.tenant.clone(),
            script: run.script.clone(),
            version: run.version,
            isolate,
            memory,
            last_used: self.clock,
        });
        let mut evicted = 0;
        while self.entries.len() > self.max_count
            || self.entries.iter().map(|e| e.memory).sum::<usize>() > self.max_memory
        {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.entries.swap_remove(oldest);
            evicted += 1;
        }
        evicted
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}
