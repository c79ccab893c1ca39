//! Per-owner quotas kept in this node's memory: the submission rate (a token bucket per owner)
//! and runs at once (a semaphore per owner). Queued jobs per owner are counted by the store, and
//! build slots per owner by its claim. An owner is a token's name, or a client address when
//! the service has no tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Submissions per minute per owner: a bucket of `per_minute` submissions refilled evenly
/// (one every 60/`per_minute` s), so a burst of `per_minute` passes and then one per interval.
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// A limiter allowing `per_minute` submissions per owner.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one submission for `owner` at `now`: Ok, or Err with how long until one is free.
    pub fn take(&self, owner: &str, now: Instant) -> Result<(), Duration> {
        let cap = f64::from(self.per_minute);
        let per_sec = cap / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        // Full buckets carry no information: forget them now and then, so the map stays small.
        if buckets.len() > 10_000 {
            buckets.retain(|_, (level, at)| {
                *level + now.saturating_duration_since(*at).as_secs_f64() * per_sec < cap
            });
        }
        let (level, at) = buckets.entry(owner.to_owned()).or_insert((cap, now));
        *level = (*level + now.saturating_duration_since(*at).as_secs_f64() * per_sec).min(cap);
        *at = now;
        if *level >= 1.0 {
            *level -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *level) / per_sec))
        }
    }

    /// The limit.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }
}

/// At most `per_owner` runs of one owner at once on this node; the others wait in order.
pub struct OwnerSlots {
    per_owner: usize,
    owners: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl OwnerSlots {
    /// `per_owner` slots for each owner.
    pub fn new(per_owner: usize) -> Self {
        Self {
            per_owner: per_owner.max(1),
            owners: Mutex::new(HashMap::new()),
        }
    }

    /// Wait for one of `owner`'s slots.
    pub async fn acquire(&self, owner: &str) -> OwnedSemaphorePermit {
        let sem = {
            let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            // Owners with every slot free and no one waiting need no entry.
            owners
                .retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < self.per_owner);
            owners
                .entry(owner.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_owner)))
                .clone()
        };
        sem.acquire_owned()
            .await
            .expect("owner semaphores are never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_one_per_interval() {
        let r = RateLimiter::new(6); // one every 10 s
        let t0 = Instant::now();
        for _ in 0..6 {
            r.take("a", t0).unwrap();
        }
        let wait = r.take("a", t0).unwrap_err();
        assert!((9.9..=10.0).contains(&wait.as_secs_f64()), "{wait:?}");
        r.take("b", t0).expect("another owner has its own bucket");
        r.take("a", t0 + Duration::from_secs(5)).unwrap_err();
        r.take("a", t0 + Duration::from_secs(10)).unwrap();
        r.take("a", t0 + Duration::from_secs(10)).unwrap_err();
        // A long pause refills to the cap, not beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..6 {
            r.take("a", later).unwrap();
        }
        r.take("a", later).unwrap_err();
    }

    #[tokio::test]
    async fn an_owner_waits_for_its_own_slots_only() {
        let s = OwnerSlots::new(2);
        let a1 = s.acquire("a").await;
        let _a2 = s.acquire("a").await;
        let third = tokio::time::timeout(Duration::from_millis(50), s.acquire("a")).await;
        assert!(third.is_err(), "a's third run waits");
        let _b = tokio::time::timeout(Duration::from_millis(50), s.acquire("b"))
            .await
            .expect("b is not held up by a");
        drop(a1);
        let _a3 = tokio::time::timeout(Duration::from_millis(50), s.acquire("a"))
            .await
            .expect("a's slot came back");
    }
}
