//! Service metrics in Prometheus text format: jobs by status and queue depth (from the store),
//! and phase durations (sum and count per phase).

use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use super::state::JobStatus;

/// Phase durations, in memory (job counts and the queue come from the store).
#[derive(Debug, Default)]
pub struct Metrics {
    phases: Mutex<Vec<(&'static str, f64, u64)>>,
}

impl Metrics {
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
    pub fn render(&self, counts: &[(JobStatus, i64)], queue_depth: i64) -> String {
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
        let _ = writeln!(s, "perfbox_queue_depth {queue_depth}");
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
