//! The embedded store: update times in this process's memory, for a single instance with no
//! Redis. It behaves like Redis behind the helper thread, so the event loop cannot tell them
//! apart.

use super::{Change, Fetched, Store, StoreError};
use crate::timestamp::Micros;
use std::collections::HashMap;

/// Update times kept in memory.
#[derive(Default)]
pub struct MemoryStore {
    times: HashMap<Box<str>, Micros>,
    /// Changes written since the previous fetch.
    log: Vec<Change>,
    fetched_once: bool,
}

impl Store for MemoryStore {
    fn describe(&self) -> String {
        "the embedded in-memory store (one instance, nothing shared)".into()
    }

    fn fetch(&mut self) -> Result<Fetched, StoreError> {
        if !self.fetched_once {
            self.fetched_once = true;
            self.log.clear();
            let changes = self
                .times
                .iter()
                .map(|(k, &t)| Change {
                    key: k.clone(),
                    time: t,
                })
                .collect();
            return Ok(Fetched {
                changes,
                snapshot: true,
            });
        }
        Ok(Fetched {
            changes: std::mem::take(&mut self.log),
            snapshot: false,
        })
    }

    fn write(&mut self, batch: &[Change]) -> Result<Vec<Micros>, StoreError> {
        let mut stored = Vec::with_capacity(batch.len());
        for c in batch {
            let t = self.times.entry(c.key.clone()).or_insert(Micros::MIN);
            if c.time > *t {
                *t = c.time;
                self.log.push(c.clone());
            }
            stored.push(*t);
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, time: Micros) -> Change {
        Change {
            key: key.into(),
            time,
        }
    }

    #[test]
    fn times_only_move_forward() {
        let mut s = MemoryStore::default();
        assert_eq!(
            s.write(&[change("a", 5), change("a", 3), change("b", 1)])
                .unwrap(),
            vec![5, 5, 1]
        );
        let first = s.fetch().unwrap();
        assert!(first.snapshot);
        assert_eq!(first.changes.len(), 2);
        assert!(s.fetch().unwrap().changes.is_empty());
        assert_eq!(
            s.write(&[change("a", 7), change("a", 7)]).unwrap(),
            vec![7, 7]
        );
        let next = s.fetch().unwrap();
        assert!(!next.snapshot);
        assert_eq!(next.changes, vec![change("a", 7)]);
    }
}
