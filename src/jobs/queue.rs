//! The build queue: which queued job takes the next free build slot.
//!
//! Jobs wait in submission order (FIFO). A free slot goes to the oldest waiting job whose owner
//! (token name, or client address without tokens) holds fewer than `per_owner` build slots: one
//! owner's slow builds cannot take every slot while other owners' jobs wait. Pure bookkeeping, no
//! I/O and no async: the job service drives it ([`super::JobService`]).

use std::collections::{HashMap, VecDeque};

use super::JobId;

/// Waiting jobs and the build slots in use.
#[derive(Debug)]
pub struct BuildQueue {
    waiting: VecDeque<(JobId, String)>,
    building: HashMap<String, usize>,
    slots: usize,
    in_use: usize,
    per_owner: usize,
}

impl BuildQueue {
    /// `slots` build slots in all, at most `per_owner` for one owner.
    pub fn new(slots: usize, per_owner: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            building: HashMap::new(),
            slots: slots.max(1),
            in_use: 0,
            per_owner: per_owner.max(1),
        }
    }

    /// Queue `id`, submitted by `owner`, behind every job already waiting.
    pub fn push(&mut self, id: JobId, owner: &str) {
        self.waiting.push_back((id, owner.to_owned()));
    }

    /// Forget a waiting job (cancelled before it started). False if it was not waiting.
    pub fn remove(&mut self, id: JobId) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|(j, _)| *j != id);
        self.waiting.len() != before
    }

    /// Give a free slot to the oldest waiting job whose owner is under its share, if any: the
    /// job and its owner, whose slot must be given back with [`Self::release`].
    pub fn start_next(&mut self) -> Option<(JobId, String)> {
        if self.in_use >= self.slots {
            return None;
        }
        let pos = self.waiting.iter().position(|(_, owner)| {
            self.building.get(owner).copied().unwrap_or(0) < self.per_owner
        })?;
        let (id, owner) = self.waiting.remove(pos)?;
        *self.building.entry(owner.clone()).or_default() += 1;
        self.in_use += 1;
        Some((id, owner))
    }

    /// Give back a slot [`Self::start_next`] handed to `owner`.
    pub fn release(&mut self, owner: &str) {
        if let Some(n) = self.building.get_mut(owner) {
            *n -= 1;
            if *n == 0 {
                self.building.remove(owner);
            }
            self.in_use -= 1;
        }
    }

    /// Jobs waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_within_the_slots() {
        let mut q = BuildQueue::new(2, 2);
        for id in 1..=3 {
            q.push(id, "a");
        }
        assert_eq!(q.start_next(), Some((1, "a".into())));
        assert_eq!(q.start_next(), Some((2, "a".into())));
        assert_eq!(q.start_next(), None, "both slots are taken");
        q.release("a");
        assert_eq!(q.start_next(), Some((3, "a".into())));
        assert_eq!((q.waiting(), q.in_use()), (0, 2));
    }

    #[test]
    fn one_owner_cannot_take_every_slot() {
        let mut q = BuildQueue::new(2, 1);
        q.push(1, "slow");
        q.push(2, "slow");
        q.push(3, "slow");
        q.push(4, "other");
        assert_eq!(q.start_next(), Some((1, "slow".into())));
        // Job 2 is older, but its owner holds its share: job 4 gets the other slot.
        assert_eq!(q.start_next(), Some((4, "other".into())));
        assert_eq!(q.start_next(), None);
        q.release("other");
        assert_eq!(
            q.start_next(),
            None,
            "the free slot stays free rather than go to slow"
        );
        q.push(5, "third");
        assert_eq!(q.start_next(), Some((5, "third".into())));
        q.release("slow");
        q.release("third");
        assert_eq!(q.start_next(), Some((2, "slow".into())));
        assert_eq!(q.start_next(), None);
        assert_eq!(q.waiting(), 1);
    }

    #[test]
    fn removed_jobs_never_start() {
        let mut q = BuildQueue::new(1, 1);
        q.push(1, "a");
        q.push(2, "b");
        assert!(q.remove(1));
        assert!(!q.remove(1));
        assert_eq!(q.start_next(), Some((2, "b".into())));
        q.release("unknown");
        assert_eq!(
            q.in_use(),
            1,
            "releasing an owner with no slot changes nothing"
        );
    }
}
