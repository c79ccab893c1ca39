//! Job limits: the defaults shipped in `sandbox/policy.toml`, overridable by the service config,
//! and the record of which of them the host really applied to a run.

use serde::{Deserialize, Serialize};

/// The policy file shipped with perfbox; its values are the defaults of [`Limits`].
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../sandbox/policy.toml");

/// Resource limits requested for every job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Memory limit in bytes (cgroup); no extra swap.
    pub memory_bytes: u64,
    /// Maximum number of tasks in the container (cgroup pids.max).
    pub pids: u64,
    /// CPU quota in thousandths of a CPU (cgroup cpu quota/period).
    pub cpu_millicores: u64,
    /// Size of the tmpfs mounted at /tmp.
    pub tmpfs_bytes: u64,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_NPROC (per host uid: a backstop, not a per-job limit).
    pub nproc: u64,
    /// RLIMIT_FSIZE.
    pub fsize_bytes: u64,
    /// Wall-clock limit of one run, in seconds.
    pub timeout_secs: u64,
    /// Bytes of stdout+stderr kept per run.
    pub log_bytes: u64,
    /// Disk a job may fill in /data (allocated blocks); beyond it the job is killed.
    pub data_bytes: u64,
    /// Files and directories a job may create in /data.
    pub data_files: u64,
}

impl Default for Limits {
    /// The values of `sandbox/policy.toml`. (Read key by key: deserializing `Limits` itself here
    /// would recurse, since `#[serde(default)]` calls this for partial tables.)
    fn default() -> Self {
        let table: toml::Table =
            toml::from_str(DEFAULT_POLICY_TOML).expect("sandbox/policy.toml is valid (tested)");
        let get = |k: &str| -> u64 {
            table
                .get(k)
                .and_then(toml::Value::as_integer)
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or_else(|| {
                    panic!("sandbox/policy.toml lacks a non-negative integer {k} (tested)")
                })
        };
        Self {
            memory_bytes: get("memory_bytes"),
            pids: get("pids"),
            cpu_millicores: get("cpu_millicores"),
            tmpfs_bytes: get("tmpfs_bytes"),
            nofile: get("nofile"),
            nproc: get("nproc"),
            fsize_bytes: get("fsize_bytes"),
            timeout_secs: get("timeout_secs"),
            log_bytes: get("log_bytes"),
            data_bytes: get("data_bytes"),
            data_files: get("data_files"),
        }
    }
}

/// How one limit was (or was not) enforced for a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Enforcement {
    /// Enforced by a cgroup controller file.
    Cgroup {
        /// e.g. "v1 memory.limit_in_bytes" or "v2 memory.max".
        control: String,
        /// The value written.
        value: String,
    },
    /// Enforced by a process rlimit (weaker than a cgroup; see `note`).
    Rlimit {
        /// e.g. "RLIMIT_AS".
        name: String,
        /// The value set.
        value: u64,
        /// What this does not cover.
        note: String,
    },
    /// Enforced by the sandbox itself (timeout, log cap, tmpfs size).
    Sandbox {
        /// Human description.
        value: String,
    },
    /// Not enforced on this host.
    NotApplied {
        /// Why not.
        reason: String,
    },
}

/// What really applied to one run, limit by limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedLimits {
    /// Memory.
    pub memory: Enforcement,
    /// Number of tasks.
    pub pids: Enforcement,
    /// CPU.
    pub cpu: Enforcement,
    /// Open files.
    pub nofile: Enforcement,
    /// Size of any file written.
    pub fsize: Enforcement,
    /// /tmp size.
    pub tmpfs: Enforcement,
    /// Wall clock.
    pub timeout: Enforcement,
    /// Log size.
    pub log: Enforcement,
    /// What the job may write to /data.
    pub data: Enforcement,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_policy_parses() {
        let l = Limits::default();
        assert_eq!(l.memory_bytes, 512 << 20);
        assert_eq!(l.pids, 256);
        assert!(l.timeout_secs > 0 && l.log_bytes > 0);
        // The file parses as a full Limits too, and a partial table keeps the defaults.
        let full: Limits = toml::from_str(DEFAULT_POLICY_TOML).unwrap();
        assert_eq!(full, l);
        let partial: Limits = toml::from_str("pids = 7").unwrap();
        assert_eq!((partial.pids, partial.memory_bytes), (7, l.memory_bytes));
        assert!(toml::from_str::<Limits>("bogus = 1").is_err());
    }
}
