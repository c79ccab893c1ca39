//! The job state machine. A job is `queued`, then `building`, then `running`, and ends in exactly
//! one terminal state that says what happened. Every change goes through
//! [`JobStatus::can_transition_to`].

use serde::{Deserialize, Serialize};

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a build slot.
    Queued,
    /// BuildKit is building the Dockerfile.
    Building,
    /// The image runs in the sandbox.
    Running,
    /// Ran and wrote a valid perf.
    Succeeded,
    /// The Dockerfile did not build.
    BuildFailed,
    /// The container failed (non-zero exit, OOM, could not start).
    RunFailed,
    /// Killed at the build or run time limit.
    TimedOut,
    /// Exited 0 without writing /data/perf.json.
    NoPerf,
    /// Wrote a perf.json that is not `{"perf": <finite number>}` (or is unsafe to read).
    InvalidPerf,
    /// Cancelled by DELETE.
    Cancelled,
    /// perfbox stopped while the job was building or running.
    Interrupted,
}

impl JobStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Queued,
        JobStatus::Building,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::BuildFailed,
        JobStatus::RunFailed,
        JobStatus::TimedOut,
        JobStatus::NoPerf,
        JobStatus::InvalidPerf,
        JobStatus::Cancelled,
        JobStatus::Interrupted,
    ];

    /// The wire/database name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Building => "building",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::BuildFailed => "build_failed",
            JobStatus::RunFailed => "run_failed",
            JobStatus::TimedOut => "timed_out",
            JobStatus::NoPerf => "no_perf",
            JobStatus::InvalidPerf => "invalid_perf",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Interrupted => "interrupted",
        }
    }

    /// Parse a wire/database name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            JobStatus::Queued | JobStatus::Building | JobStatus::Running
        )
    }

    /// Whether `self → next` is a legal step.
    pub fn can_transition_to(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Queued, Building)
                | (Building, Running)
                | (Queued | Building | Running, Cancelled | Interrupted)
                | (Building, BuildFailed | TimedOut)
                | (
                    Running,
                    Succeeded | RunFailed | TimedOut | NoPerf | InvalidPerf
                )
        )
    }

    /// Human text for unfinished jobs.
    pub fn info(self) -> &'static str {
        match self {
            JobStatus::Queued => "waiting for a build slot",
            JobStatus::Building => "building the Dockerfile",
            JobStatus::Running => "running the image in the sandbox",
            _ => "finished",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobStatus::*;

    #[test]
    fn transition_table() {
        let legal = [
            (Queued, Building),
            (Building, Running),
            (Queued, Cancelled),
            (Building, Cancelled),
            (Running, Cancelled),
            (Queued, Interrupted),
            (Building, Interrupted),
            (Running, Interrupted),
            (Building, BuildFailed),
            (Building, TimedOut),
            (Running, Succeeded),
            (Running, RunFailed),
            (Running, TimedOut),
            (Running, NoPerf),
            (Running, InvalidPerf),
        ];
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                assert_eq!(
                    from.can_transition_to(to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(s.is_terminal(), !matches!(s, Queued | Building | Running));
            assert!(!s.is_terminal() || JobStatus::ALL.iter().all(|t| !s.can_transition_to(*t)));
        }
    }
}
