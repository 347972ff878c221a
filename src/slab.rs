//! A minimal slab: values in a vector, addressed by index, with freed slots reused.
//!
//! Connection indices double as mio tokens. Lookups return `Option`, never panic: an event or a
//! timer for a slot that was freed (and maybe reused) is simply found absent or stale.

/// A slot: a value, or a link in the free list.
enum Slot<T> {
    Full(T),
    Free(usize),
}

/// Values addressed by small integer keys.
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// Head of the free list; `usize::MAX` when empty.
    free: usize,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: usize::MAX,
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Number of values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no value is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key the next `insert` will use.
    pub fn vacant_key(&self) -> usize {
        if self.free == usize::MAX {
            self.slots.len()
        } else {
            self.free
        }
    }

    /// Stores `value` and returns its key.
    pub fn insert(&mut self, value: T) -> usize {
        let key = self.vacant_key();
        self.len += 1;
        if key == self.slots.len() {
            self.slots.push(Slot::Full(value));
        } else if let Some(Slot::Free(next)) = self.slots.get(key) {
            self.free = *next;
            self.slots[key] = Slot::Full(value);
        }
        key
    }

    /// The value at `key`, if any.
    pub fn get(&self, key: usize) -> Option<&T> {
        match self.slots.get(key) {
            Some(Slot::Full(v)) => Some(v),
            _ => None,
        }
    }

    /// The value at `key`, if any, mutably.
    pub fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        match self.slots.get_mut(key) {
            Some(Slot::Full(v)) => Some(v),
            _ => None,
        }
    }

    /// Removes and returns the value at `key`, if any.
    pub fn remove(&mut self, key: usize) -> Option<T> {
        let slot = self.slots.get_mut(key)?;
        if matches!(slot, Slot::Free(_)) {
            return None;
        }
        let old = std::mem::replace(slot, Slot::Free(self.free));
        self.free = key;
        self.len -= 1;
        match old {
            Slot::Full(v) => Some(v),
            Slot::Free(_) => None,
        }
    }

    /// Keys of all values held.
    pub fn keys(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(k, s)| matches!(s, Slot::Full(_)).then_some(k))
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn reuses_freed_slots() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(a), None);
        assert_eq!(s.vacant_key(), a);
        assert_eq!(s.insert("c"), a);
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.len(), 2);
        assert_eq!(s.keys().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(s.get(99), None);
        assert_eq!(s.remove(99), None);
    }
}
