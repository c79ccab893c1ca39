//! Service metrics, in the OpenMetrics text format (the `prometheus-client` crate): jobs by
//! status and queue depth (read from the store at each scrape), phase durations (a histogram
//! per phase: build, run), and what runs used as the host measured it (CPU seconds, peak
//! memory).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::state::JobStatus;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

/// The service's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs: Family<StatusLabel, Gauge>,
    queue_depth: Gauge,
    phases: Family<PhaseLabel, Histogram>,
    run_cpu: Histogram,
    run_memory: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let jobs = Family::<StatusLabel, Gauge>::default();
        let queue_depth = Gauge::default();
        let phases = Family::<PhaseLabel, Histogram>::new_with_constructor(|| {
            // 50 ms to ~14 min.
            Histogram::new(exponential_buckets(0.05, 2.0, 15))
        });
        registry.register("perfbox_jobs", "Jobs by status", jobs.clone());
        registry.register(
            "perfbox_queue_depth",
            "Jobs waiting for a build slot",
            queue_depth.clone(),
        );
        registry.register(
            "perfbox_phase_seconds",
            "Time spent per phase (build, run)",
            phases.clone(),
        );
        // 10 ms to ~5.5 min of CPU; 1 MiB to 32 GiB of memory.
        let run_cpu = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let run_memory = Histogram::new(exponential_buckets(1048576.0, 2.0, 16));
        registry.register(
            "perfbox_run_cpu_seconds",
            "CPU time of each run, from its cgroup",
            run_cpu.clone(),
        );
        registry.register(
            "perfbox_run_peak_memory_bytes",
            "Peak memory of each run, from its cgroup",
            run_memory.clone(),
        );
        Self {
            registry,
            jobs,
            queue_depth,
            phases,
            run_cpu,
            run_memory,
        }
    }
}

impl Metrics {
    /// Record a phase duration.
    pub fn observe(&self, phase: &'static str, d: Duration) {
        self.phases
            .get_or_create(&PhaseLabel { phase })
            .observe(d.as_secs_f64());
    }

    /// Record what a run used (what its cgroup could tell).
    pub fn observe_usage(&self, u: &crate::sandbox::Usage) {
        if let Some(c) = u.cpu_seconds {
            self.run_cpu.observe(c);
        }
        if let Some(m) = u.peak_memory_bytes {
            self.run_memory.observe(m as f64);
        }
    }

    /// The exposition text, with the store's job counts and queue depth as of now.
    pub fn render(&self, counts: &[(JobStatus, i64)], queue_depth: i64) -> String {
        for status in JobStatus::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, n)| *n);
            self.jobs
                .get_or_create(&StatusLabel {
                    status: status.as_str(),
                })
                .set(n);
        }
        self.queue_depth.set(queue_depth);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_depth_and_phases() {
        let m = Metrics::default();
        m.observe("build", Duration::from_millis(300));
        m.observe("build", Duration::from_millis(100));
        let text = m.render(&[(JobStatus::Succeeded, 3)], 2);
        for line in [
            "perfbox_jobs{status=\"succeeded\"} 3",
            "perfbox_jobs{status=\"queued\"} 0",
            "perfbox_queue_depth 2",
            "perfbox_phase_seconds_count{phase=\"build\"} 2",
            "perfbox_phase_seconds_sum{phase=\"build\"} 0.4",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
    }
}
