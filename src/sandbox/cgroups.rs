//! Which cgroup limits this host lets an unprivileged runtime apply, and where.
//!
//! - cgroup v2 (unified): a subtree owned by the runtime user (setup's `/sys/fs/cgroup/perfbox`,
//!   or the service's own cgroup under systemd `Delegate=yes`) whose `cgroup.subtree_control`
//!   enables memory, pids and cpu. Each job gets a child `<parent>/<container id>`.
//! - cgroup v1 (hybrid hosts such as the dev machines): per-controller directories that root
//!   created and chowned to the runtime user (`/sys/fs/cgroup/{memory,pids,cpu}/perfbox`);
//!   rootless runc applies limits inside them and skips controllers it cannot write.
//! - Neither: no cgroup limits; the sandbox falls back to rlimits and says so.
//!
//! # Under systemd (`Delegate=yes`)
//! systemd hands the service its own cgroup (e.g. `/system.slice/perfbox.service`, owned by the
//! service user), but cgroup v2's no-internal-processes rule forbids enabling controllers for
//! children while perfbox itself still lives in that cgroup. [`prepare_delegated_v2`] therefore
//! moves the service's processes into a leaf child (`<own>/service`), enables `+memory +pids +cpu`
//! in `<own>/cgroup.subtree_control`, and returns `<own>`: the parent of every job cgroup
//! (`<own>/<container id>`). `perfbox serve` calls it at startup when the host is cgroup v2 and
//! no `cgroup_parent` is configured.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The cgroup filesystem root.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The parent of job cgroups when none is configured: what `scripts/setup` prepares.
pub const DEFAULT_PARENT: &str = "/perfbox";

/// The v1 hierarchies mounted below `root` (directory names; `unified`, the v2 mount of a hybrid
/// host, left out).
pub(crate) fn v1_hierarchies(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir() && e.file_name() != "unified")
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `p` is a directory that `uid` owns (delegated to it).
pub(crate) fn owned_dir(p: &Path, uid: u32) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_dir() && m.uid() == uid)
}

/// A cgroup controller perfbox limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// memory
    Memory,
    /// pids
    Pids,
    /// cpu
    Cpu,
}

impl Controller {
    /// All controllers perfbox uses.
    pub const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    /// Kernel name.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

/// What the host offers for job limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupHost {
    /// Unified hierarchy with a delegated parent (path inside the hierarchy, e.g. "/perfbox").
    V2 {
        /// Parent cgroup path, relative to [`CGROUP_ROOT`], starting with '/'.
        parent: String,
        /// Controllers enabled for the parent's children.
        controllers: Vec<Controller>,
    },
    /// v1 hierarchies: controllers whose `<controller>/<parent>` dir the runtime user owns.
    V1 {
        /// Parent cgroup path inside each hierarchy, e.g. "/perfbox".
        parent: String,
        /// Controllers owned.
        controllers: Vec<Controller>,
    },
    /// No usable cgroup.
    Unavailable {
        /// Why.
        reason: String,
    },
}

impl CgroupHost {
    /// Probe the host for cgroups that `uid` can use, under `parent` (default
    /// [`DEFAULT_PARENT`]).
    pub fn detect(uid: u32, parent: Option<&str>) -> Self {
        Self::detect_in(
            Path::new(CGROUP_ROOT),
            uid,
            parent.unwrap_or(DEFAULT_PARENT),
        )
    }

    /// [`detect`](Self::detect) with an injectable cgroupfs root (for tests).
    pub fn detect_in(root: &Path, uid: u32, parent: &str) -> Self {
        let rel = parent.trim_start_matches('/');
        let owned = |p: &Path| owned_dir(p, uid);
        if root.join("cgroup.controllers").exists() {
            let dir = root.join(rel);
            if !owned(&dir) {
                return CgroupHost::Unavailable {
                    reason: format!(
                        "cgroup v2: {} is not a directory owned by uid {uid} (not delegated)",
                        dir.display()
                    ),
                };
            }
            // Enable what the parent may hand down; a failure leaves the controller off.
            let available =
                std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
            for c in Controller::ALL {
                if available.split_whitespace().any(|a| a == c.name()) {
                    let _ = std::fs::write(
                        dir.join("cgroup.subtree_control"),
                        format!("+{}", c.name()),
                    );
                }
            }
            let enabled =
                std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
            let controllers: Vec<_> = Controller::ALL
                .into_iter()
                .filter(|c| enabled.split_whitespace().any(|e| e == c.name()))
                .collect();
            return CgroupHost::V2 {
                parent: format!("/{rel}"),
                controllers,
            };
        }
        // runc joins every v1 hierarchy at an explicit cgroupsPath and fails on the first one it
        // cannot write, so all of them need a dir of ours, not just the limiting ones.
        let hierarchies: Vec<String> = v1_hierarchies(root);
        let missing: Vec<&str> = hierarchies
            .iter()
            .map(String::as_str)
            .filter(|h| !owned(&root.join(h).join(rel)))
            .collect();
        let controllers: Vec<_> = Controller::ALL
            .into_iter()
            .filter(|c| hierarchies.iter().any(|h| h == c.name()))
            .collect();
        if hierarchies.is_empty() || !missing.is_empty() || controllers.is_empty() {
            CgroupHost::Unavailable {
                reason: format!(
                    "cgroup v1: {}/{{{}}}/{rel} not owned by uid {uid} (run scripts/setup as root)",
                    root.display(),
                    if missing.is_empty() {
                        "memory,pids,cpu".to_string()
                    } else {
                        missing.join(",")
                    }
                ),
            }
        } else {
            CgroupHost::V1 {
                parent: format!("/{rel}"),
                controllers,
            }
        }
    }

    /// Whether a controller's limit will be applied through a cgroup.
    pub fn has(&self, c: Controller) -> bool {
        match self {
            CgroupHost::V2 { controllers, .. } | CgroupHost::V1 { controllers, .. } => {
                controllers.contains(&c)
            }
            CgroupHost::Unavailable { .. } => false,
        }
    }

    /// The `linux.cgroupsPath` for a container, when any controller is usable.
    pub fn cgroups_path(&self, container_id: &str) -> Option<String> {
        match self {
            CgroupHost::V2 { parent, .. } | CgroupHost::V1 { parent, .. } => {
                Some(format!("{}/{container_id}", parent.trim_end_matches('/')))
            }
            CgroupHost::Unavailable { .. } => None,
        }
    }

    /// Version label for records ("v1", "v2", "none").
    pub fn version(&self) -> &'static str {
        match self {
            CgroupHost::V2 { .. } => "v2",
            CgroupHost::V1 { .. } => "v1",
            CgroupHost::Unavailable { .. } => "none",
        }
    }

    /// Why a controller is not usable (for the record).
    pub fn missing_reason(&self, c: Controller) -> String {
        match self {
            CgroupHost::Unavailable { reason } => reason.clone(),
            CgroupHost::V2 { parent, .. } => format!(
                "cgroup v2: {} not enabled in {parent}/cgroup.subtree_control",
                c.name()
            ),
            CgroupHost::V1 { parent, .. } => format!(
                "cgroup v1: {CGROUP_ROOT}/{}{parent} is not owned by the runtime user",
                c.name()
            ),
        }
    }

    /// OOM kills recorded in the parent of the job cgroups (hierarchical on v2: it counts every
    /// job's), for runtimes that delete a job's cgroup before perfbox can read it.
    pub fn parent_oom_kills(&self) -> Option<u64> {
        let file = match self {
            CgroupHost::V2 { parent, .. } => Path::new(CGROUP_ROOT)
                .join(parent.trim_start_matches('/'))
                .join("memory.events"),
            _ => return None,
        };
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == "oom_kill").then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// Number of OOM kills recorded in a container's memory cgroup (it must still exist).
    pub fn oom_kills(&self, container_id: &str) -> Option<u64> {
        let (file, key): (PathBuf, &str) = match self {
            CgroupHost::V2 { parent, .. } => (
                Path::new(CGROUP_ROOT)
                    .join(parent.trim_start_matches('/'))
                    .join(container_id)
                    .join("memory.events"),
                "oom_kill",
            ),
            CgroupHost::V1 {
                parent,
                controllers,
            } if controllers.contains(&Controller::Memory) => (
                Path::new(CGROUP_ROOT)
                    .join("memory")
                    .join(parent.trim_start_matches('/'))
                    .join(container_id)
                    .join("memory.oom_control"),
                "oom_kill",
            ),
            _ => return None,
        };
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }
}

/// What a job's cgroup counted: CPU time (nanoseconds: all, user, system) and peak memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// CPU time in all.
    pub cpu_ns: Option<u64>,
    /// CPU time in user mode.
    pub user_ns: Option<u64>,
    /// CPU time in the kernel.
    pub system_ns: Option<u64>,
    /// Most memory charged at once.
    pub peak_memory_bytes: Option<u64>,
}

impl CgroupUsage {
    /// Whether it says anything.
    pub fn is_empty(&self) -> bool {
        self.cpu_ns.is_none() && self.peak_memory_bytes.is_none()
    }
}

/// `key value` lines (cpu.stat, memory.events): the value of `key`.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl CgroupHost {
    /// What a container's cgroup counted so far (it must still exist): on v2 `cpu.stat` and
    /// `memory.peak`; on v1 `cpuacct.usage{,_user,_sys}` and `memory.max_usage_in_bytes`.
    pub fn usage(&self, container_id: &str) -> Option<CgroupUsage> {
        self.usage_in(Path::new(CGROUP_ROOT), container_id)
    }

    /// [`usage`](Self::usage) with an injectable cgroupfs root (for tests).
    pub fn usage_in(&self, root: &Path, container_id: &str) -> Option<CgroupUsage> {
        let read = |p: PathBuf| std::fs::read_to_string(p).ok();
        let num = |p: PathBuf| read(p).and_then(|t| t.trim().parse::<u64>().ok());
        let u = match self {
            CgroupHost::V2 { parent, .. } => {
                let dir = root.join(parent.trim_start_matches('/')).join(container_id);
                let stat = read(dir.join("cpu.stat")).unwrap_or_default();
                let us = |k| keyed(&stat, k).map(|v| v * 1000);
                CgroupUsage {
                    cpu_ns: us("usage_usec"),
                    user_ns: us("user_usec"),
                    system_ns: us("system_usec"),
                    peak_memory_bytes: num(dir.join("memory.peak")),
                }
            }
            CgroupHost::V1 { parent, .. } => {
                let rel = parent.trim_start_matches('/');
                let cpu = root.join("cpuacct").join(rel).join(container_id);
                CgroupUsage {
                    cpu_ns: num(cpu.join("cpuacct.usage")),
                    user_ns: num(cpu.join("cpuacct.usage_user")),
                    system_ns: num(cpu.join("cpuacct.usage_sys")),
                    peak_memory_bytes: num(root
                        .join("memory")
                        .join(rel)
                        .join(container_id)
                        .join("memory.max_usage_in_bytes")),
                }
            }
            CgroupHost::Unavailable { .. } => return None,
        };
        (!u.is_empty()).then_some(u)
    }
}

/// The leaf child a delegated service moves itself into (see [`prepare_delegated_v2`]).
pub const SERVICE_LEAF: &str = "service";

/// Errors of [`prepare_delegated_v2`].
#[derive(Debug, thiserror::Error)]
pub enum DelegationError {
    /// A cgroupfs or procfs file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Make the cgroup that systemd delegated to this process (`Delegate=yes`) usable as the parent of
/// job cgroups, and return that parent (a path inside the hierarchy, e.g.
/// `/system.slice/perfbox.service`).
///
/// Returns `Ok(None)`, changing nothing, when the host is not cgroup v2 or our own cgroup is not
/// a directory owned by `uid` (not delegated: e.g. run by hand from a shell), so the caller keeps
/// its default (`/perfbox`, prepared by `scripts/setup`).
///
/// Steps (cgroup v2 forbids controllers in `subtree_control` of a cgroup that has processes):
/// 1. read our cgroup from `/proc/self/cgroup` (`0::<path>`); if it is already `<own>/service`
///    (a previous call), `<own>` is the parent;
/// 2. create the leaf `<own>/service` and move every process of `<own>` into it (only this
///    service's own processes can be there: it is the unit's cgroup);
/// 3. write `+memory`, `+pids`, `+cpu` (those listed in `<own>/cgroup.controllers`) to
///    `<own>/cgroup.subtree_control`. A controller the kernel refuses stays off; the sandbox's
///    detection then records that its limit did not apply through a cgroup.
pub fn prepare_delegated_v2(uid: u32) -> Result<Option<String>, DelegationError> {
    let own =
        std::fs::read_to_string("/proc/self/cgroup").map_err(|source| DelegationError::Io {
            what: "cannot read",
            path: "/proc/self/cgroup".into(),
            source,
        })?;
    prepare_delegated_v2_in(Path::new(CGROUP_ROOT), &own, uid, std::process::id())
}

/// [`prepare_delegated_v2`] with an injectable cgroupfs root, `/proc/self/cgroup` text and pid.
pub fn prepare_delegated_v2_in(
    root: &Path,
    proc_self_cgroup: &str,
    uid: u32,
    pid: u32,
) -> Result<Option<String>, DelegationError> {
    if !root.join("cgroup.controllers").exists() {
        return Ok(None);
    }
    let Some(mut own) = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_end_matches('/').to_string())
    else {
        return Ok(None);
    };
    let owned = |rel: &str| {
        std::fs::metadata(root.join(rel.trim_start_matches('/')))
            .is_ok_and(|m| m.is_dir() && m.uid() == uid)
    };
    if let Some(parent) = own.strip_suffix(&format!("/{SERVICE_LEAF}"))
        && !parent.is_empty()
        && owned(parent)
    {
        own = parent.to_string();
    }
    if own.is_empty() || !owned(&own) {
        return Ok(None);
    }
    let dir = root.join(own.trim_start_matches('/'));
    let io = |what: &'static str, path: PathBuf| {
        move |source| DelegationError::Io { what, path, source }
    };
    let leaf = dir.join(SERVICE_LEAF);
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create", leaf.clone())(e)),
    }
    // Move ourselves first, then anything else the unit's cgroup still holds (a helper we
    // spawned before this call). A pid that exited meanwhile is not an error.
    let procs = leaf.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(io("cannot move into", procs.clone()))?;
    let listed = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for other in listed.split_whitespace() {
        let _ = std::fs::write(&procs, other);
    }
    let available = std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(io("cannot read", dir.join("cgroup.controllers")))?;
    let control = dir.join("cgroup.subtree_control");
    for c in Controller::ALL {
        if available.split_whitespace().any(|a| a == c.name()) {
            std::fs::write(&control, format!("+{}", c.name()))
                .map_err(io("cannot enable a controller in", control.clone()))?;
        }
    }
    Ok(Some(own))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reads_v2_and_v1_counters() {
        let root = tempfile::tempdir().unwrap();
        let job = root.path().join("perfbox/job1");
        std::fs::create_dir_all(&job).unwrap();
        std::fs::write(
            job.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n",
        )
        .unwrap();
        std::fs::write(job.join("memory.peak"), "104857600\n").unwrap();
        let v2 = CgroupHost::V2 {
            parent: "/perfbox".into(),
            controllers: vec![Controller::Memory],
        };
        assert_eq!(
            v2.usage_in(root.path(), "job1"),
            Some(CgroupUsage {
                cpu_ns: Some(1_500_000),
                user_ns: Some(1_000_000),
                system_ns: Some(500_000),
                peak_memory_bytes: Some(104_857_600),
            })
        );
        assert_eq!(
            v2.usage_in(root.path(), "gone"),
            None,
            "a removed cgroup says nothing"
        );
        let v1root = tempfile::tempdir().unwrap();
        let cpu = v1root.path().join("cpuacct/perfbox/job1");
        let mem = v1root.path().join("memory/perfbox/job1");
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), "7000\n").unwrap();
        std::fs::write(cpu.join("cpuacct.usage_user"), "4000\n").unwrap();
        std::fs::write(cpu.join("cpuacct.usage_sys"), "3000\n").unwrap();
        std::fs::write(mem.join("memory.max_usage_in_bytes"), "4096\n").unwrap();
        let v1 = CgroupHost::V1 {
            parent: "/perfbox".into(),
            controllers: vec![Controller::Memory],
        };
        let u = v1.usage_in(v1root.path(), "job1").unwrap();
        assert_eq!(
            (u.cpu_ns, u.user_ns, u.system_ns),
            (Some(7000), Some(4000), Some(3000))
        );
        assert_eq!(u.peak_memory_bytes, Some(4096));
    }

    #[test]
    fn detects_v1_owned_controllers_and_v2_delegation() {
        let uid = nix::unistd::geteuid().as_raw();
        let v1 = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(v1.path().join("memory/perfbox")).unwrap();
        std::fs::create_dir_all(v1.path().join("pids/perfbox")).unwrap();
        std::fs::create_dir_all(v1.path().join("freezer")).unwrap();
        // A hierarchy without our dir makes runc fail, so nothing is usable.
        assert!(matches!(
            CgroupHost::detect_in(v1.path(), uid, "/perfbox"),
            CgroupHost::Unavailable { .. }
        ));
        std::fs::create_dir_all(v1.path().join("freezer/perfbox")).unwrap();
        std::fs::create_dir_all(v1.path().join("unified")).unwrap();
        let h = CgroupHost::detect_in(v1.path(), uid, "/perfbox");
        assert_eq!(
            h,
            CgroupHost::V1 {
                parent: "/perfbox".into(),
                controllers: vec![Controller::Memory, Controller::Pids]
            }
        );
        assert_eq!(h.cgroups_path("job-1").as_deref(), Some("/perfbox/job-1"));
        assert!(!h.has(Controller::Cpu));

        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        assert!(matches!(
            CgroupHost::detect_in(v2.path(), uid, "/perfbox"),
            CgroupHost::Unavailable { .. }
        ));
        std::fs::create_dir(v2.path().join("perfbox")).unwrap();
        std::fs::write(
            v2.path().join("perfbox/cgroup.controllers"),
            "cpu memory pids",
        )
        .unwrap();
        // A plain file stands in for subtree_control: it holds our last "+cpu" write, not the
        // kernel's list of enabled controllers, so nothing counts as enabled.
        let h = CgroupHost::detect_in(v2.path(), uid, "/perfbox");
        assert_eq!(
            h,
            CgroupHost::V2 {
                parent: "/perfbox".into(),
                controllers: vec![]
            }
        );

        let other = tempfile::tempdir().unwrap();
        assert!(matches!(
            CgroupHost::detect_in(other.path(), uid + 1, "/perfbox"),
            CgroupHost::Unavailable { .. }
        ));
    }

    #[test]
    fn delegated_v2_moves_into_a_leaf_and_returns_the_units_cgroup() {
        let uid = nix::unistd::geteuid().as_raw();
        let root = tempfile::tempdir().unwrap();
        let proc = "0::/system.slice/perfbox.service\n";
        // Not v2: nothing to do.
        assert_eq!(
            prepare_delegated_v2_in(root.path(), proc, uid, 42).unwrap(),
            None
        );
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        // v2, but our cgroup is not a directory we own: not delegated.
        assert_eq!(
            prepare_delegated_v2_in(root.path(), proc, uid, 42).unwrap(),
            None
        );
        let own = root.path().join("system.slice/perfbox.service");
        std::fs::create_dir_all(&own).unwrap();
        assert_eq!(
            prepare_delegated_v2_in(root.path(), proc, uid + 1, 42).unwrap(),
            None
        );
        std::fs::write(own.join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        std::fs::write(own.join("cgroup.procs"), "").unwrap();
        let parent = prepare_delegated_v2_in(root.path(), proc, uid, 42).unwrap();
        assert_eq!(parent.as_deref(), Some("/system.slice/perfbox.service"));
        // A plain file stands in for cgroupfs, so it keeps the last write of each file.
        assert_eq!(
            std::fs::read_to_string(own.join("service/cgroup.procs")).unwrap(),
            "42"
        );
        assert_eq!(
            std::fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(),
            "+cpu"
        );
        // Called again from inside the leaf: the same parent, not the leaf.
        let again = prepare_delegated_v2_in(
            root.path(),
            "0::/system.slice/perfbox.service/service\n",
            uid,
            42,
        )
        .unwrap();
        assert_eq!(again, parent);
        // A job cgroup path under that parent.
        let host = CgroupHost::V2 {
            parent: parent.unwrap(),
            controllers: Controller::ALL.to_vec(),
        };
        assert_eq!(
            host.cgroups_path("job-7").as_deref(),
            Some("/system.slice/perfbox.service/job-7")
        );
    }
}
