//! Which script sources an engine host holds. A source crosses the socket once per host;
//! later runs of it name it by number. The daemon alone decides what a host keeps and says
//! what to forget in the frame that needs the room, so the two sides never disagree: frames
//! reach the host in the order they were decided.

use std::collections::HashMap;
use std::sync::Arc;

/// Sources a host keeps at most: its warm pool holds 64 isolates by default, so this
/// covers every warm script and as many again.
pub const KEPT: usize = 128;

/// How a run frame carries its source.
#[derive(Debug, PartialEq, Eq)]
pub struct SourceRef {
    /// The number the host knows the source by.
    pub id: u64,
    /// The text, when the host does not hold it yet.
    pub text: Option<String>,
    /// Sources the host is to drop before it takes this one.
    pub forget: Vec<u64>,
}

struct Sent {
    id: u64,
    /// Held so that the allocation, whose address is the key, is not reused meanwhile.
    _source: Arc<str>,
    last_used: u64,
}

/// The daemon's record of what one host holds, keyed by the address of the source's
/// allocation: every run of a script version shares its source's `Arc`, so a lookup costs
/// no hashing or comparing of the text. A source that arrives in another `Arc` (a version
/// loaded for a replay, say) is sent again under a new number, which is merely wasteful.
#[derive(Default)]
pub struct SentSources {
    by_address: HashMap<usize, Sent>,
    next_id: u64,
    tick: u64,
}

impl SentSources {
    /// How the next run frame to this host carries `source`.
    pub fn reference(&mut self, source: &Arc<str>) -> SourceRef {
        self.tick += 1;
        let address = Arc::as_ptr(source) as *const u8 as usize;
        if let Some(sent) = self.by_address.get_mut(&address) {
            sent.last_used = self.tick;
            return SourceRef {
                id: sent.id,
                text: None,
                forget: Vec::new(),
            };
        }
        let mut forget = Vec::new();
        while self.by_address.len() >= KEPT {
            let Some((&oldest, _)) = self.by_address.iter().min_by_key(|(_, s)| s.last_used) else {
                break;
            };
            if let Some(gone) = self.by_address.remove(&oldest) {
                forget.push(gone.id);
            }
        }
        self.next_id += 1;
        let id = self.next_id;
        self.by_address.insert(
            address,
            Sent {
                id,
                _source: source.clone(),
                last_used: self.tick,
            },
        );
        SourceRef {
            id,
            text: Some(source.to_string()),
            forget,
        }
    }
}

/// The host's side: the sources it was sent, by number.
#[derive(Default)]
pub struct HeldSources(HashMap<u64, Arc<str>>);

impl HeldSources {
    /// The source of a run frame: its text if it came with one (kept under its number),
    /// else the one kept; `None` if the daemon named a source this host never got.
    pub fn take(&mut self, reference: SourceRef) -> Option<Arc<str>> {
        for id in reference.forget {
            self.0.remove(&id);
        }
        match reference.text {
            Some(text) => {
                let source: Arc<str> = text.into();
                self.0.insert(reference.id, source.clone());
                Some(source)
            }
            None => self.0.get(&reference.id).cloned(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_crosses_once_and_the_host_keeps_what_the_daemon_thinks() {
        let mut sent = SentSources::default();
        let mut held = HeldSources::default();
        let a: Arc<str> = "export default () => 1".into();
        let first = sent.reference(&a);
        assert!(first.text.is_some());
        let id = first.id;
        assert_eq!(held.take(first).as_deref(), Some(&*a));
        let again = sent.reference(&a);
        assert_eq!((again.id, again.text.is_none()), (id, true));
        assert_eq!(held.take(again).as_deref(), Some(&*a));
        // The same text in another allocation is sent again, under its own number.
        let copy: Arc<str> = a.to_string().into();
        let other = sent.reference(&copy);
        assert!(other.text.is_some() && other.id != id);
    }

    #[test]
    fn the_least_recently_used_source_is_forgotten_on_both_sides() {
        let mut sent = SentSources::default();
        let mut held = HeldSources::default();
        let sources: Vec<Arc<str>> = (0..=KEPT).map(|i| format!("s{i}").into()).collect();
        let mut ids = Vec::new();
        for s in &sources[..KEPT] {
            let r = sent.reference(s);
            ids.push(r.id);
            held.take(r);
        }
        // Source 0 is used again, so source 1 is now the oldest.
        held.take(sent.reference(&sources[0]));
        let last = sent.reference(&sources[KEPT]);
        assert_eq!(last.forget, vec![ids[1]]);
        held.take(last);
        assert_eq!(held.len(), KEPT);
        let back = sent.reference(&sources[1]);
        assert!(back.text.is_some(), "a forgotten source is sent again");
        assert_eq!(
            held.take(SourceRef {
                id: ids[1],
                text: None,
                forget: vec![]
            }),
            None
        );
    }
}
