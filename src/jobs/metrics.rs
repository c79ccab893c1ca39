//! Service metrics in Prometheus text format: jobs by status (from the store), queue depth,
//! active builds and runs, and phase durations (sum and count per phase).

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::state::JobStatus;

/// In-memory counters.
#[derive(Debug, Default)]
pub struct Metrics {
    queued: AtomicUsize,
    phases: Mutex<Vec<(&'static str, f64, u64)>>,
}

impl Metrics {
    /// A job entered the queue.
    pub fn enqueue(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// A job left the queue.
    pub fn dequeue(&self) {
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(1))
            });
    }

    /// Jobs waiting.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Record a phase duration.
    pub fn observe(&self, phase: &'static str, d: Duration) {
        let mut p = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        match p.iter_mut().find(|(n, _, _)| *n == phase) {
            Some(e) => {
                e.1 += d.as_secs_f64();
                e.2 += 1;
            }
            None => p.push((phase, d.as_secs_f64(), 1)),
        }
    }

    /// Prometheus exposition text.
    pub fn render(&self, counts: &[(JobStatus, i64)]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP perfbox_jobs Jobs by status.\n# TYPE perfbox_jobs gauge"
        );
        for st in JobStatus::ALL {
            let n = counts.iter().find(|(c, _)| *c == st).map_or(0, |(_, n)| *n);
            let _ = writeln!(s, "perfbox_jobs{{status=\"{st}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP perfbox_queue_depth Jobs waiting for a build slot.\n# TYPE perfbox_queue_depth gauge"
        );
        let _ = writeln!(s, "perfbox_queue_depth {}", self.queued());
        let _ = writeln!(
            s,
            "# HELP perfbox_phase_seconds Time spent per phase.\n# TYPE perfbox_phase_seconds summary"
        );
        for (phase, sum, count) in self.phases.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(s, "perfbox_phase_seconds_sum{{phase=\"{phase}\"}} {sum}");
            let _ = writeln!(
                s,
                "perfbox_phase_seconds_count{{phase=\"{phase}\"}} {count}"
            );
        }
        s
    }
}
