//! Which cgroup limits this host lets an unprivileged runtime apply, and where.
//!
//! - cgroup v2 (unified): a subtree owned by the runtime user (setup's `/sys/fs/cgroup/perfbox`,
//!   or the service's own cgroup under systemd `Delegate=yes`) whose `cgroup.subtree_control`
//!   enables memory, pids and cpu. Each job gets a child `<parent>/<container id>`.
//! - cgroup v1 (hybrid hosts such as the dev machines): per-controller directories that root
//!   created and chowned to the runtime user (`/sys/fs/cgroup/{memory,pids,cpu}/perfbox`);
//!   rootless runc applies limits inside them and skips controllers it cannot write.
//! - Neither: no cgroup limits; the sandbox falls back to rlimits and says so.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The cgroup filesystem root.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

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
    /// Probe the host for cgroups that `uid` can use, under `parent` (default "/perfbox").
    pub fn detect(uid: u32, parent: Option<&str>) -> Self {
        Self::detect_in(Path::new(CGROUP_ROOT), uid, parent.unwrap_or("/perfbox"))
    }

    /// [`detect`](Self::detect) with an injectable cgroupfs root (for tests).
    pub fn detect_in(root: &Path, uid: u32, parent: &str) -> Self {
        let rel = parent.trim_start_matches('/');
        let owned = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_dir() && m.uid() == uid);
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
        let hierarchies: Vec<String> = std::fs::read_dir(root)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir() && e.file_name() != "unified")
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
