//! The cgroup each build's RUN steps run in, apart from the build daemon's own.
//!
//! BuildKit runs RUN steps with runc; a rootless daemon strips the cgroup from their spec, so RUN
//! steps share the daemon's cgroup and a fork bomb in one can leave the daemon unable to create a
//! thread (the Go runtime then aborts: every build on it fails). perfbox's setup starts the daemon
//! with `--oci-worker-rootless=false` (still inside rootlesskit's user namespace, still as the
//! unprivileged user: only the spec stripping is off) and prepares a parent cgroup the daemon's
//! user owns, `<parent>` (default `/perfbox-build/runs`), beside the daemon's, with limits of its
//! own. For every build perfbox creates `<parent>/<scope>` with the build's memory and pids limits
//! and passes it as the frontend's `cgroup-parent`; runc then puts each RUN step in
//! `<parent>/<scope>/buildkit/<id>`.
//!
//! - cgroup v1: `<parent>` exists in every mounted hierarchy (runc joins all of them) and the
//!   service's user owns it; perfbox creates the build's cgroup in the memory and pids hierarchies
//!   with the limits (runc creates the others, and the `buildkit/` children, itself).
//! - cgroup v2: `<parent>` is owned by the service's user with memory and pids enabled in its
//!   `cgroup.subtree_control`.
//! - Anything else (a remote daemon, a host without the layout): [`BuildCgroups::Unavailable`] with
//!   the reason, which `/healthz` and every job record show.

use std::path::{Path, PathBuf};

use super::cgroups::CGROUP_ROOT;

/// Limits of one build's RUN steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BuildLimits {
    /// Memory (bytes).
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
}

/// Where builds get cgroups of their own, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildCgroups {
    /// cgroup v1: `parent` (e.g. `/perfbox-build/runs`) exists in every hierarchy.
    V1 {
        /// cgroupfs root (`/sys/fs/cgroup`; a temporary tree in tests).
        root: PathBuf,
        /// Parent inside each hierarchy, starting with `/`.
        parent: String,
        /// The mounted hierarchies (directory names under the root).
        hierarchies: Vec<String>,
    },
    /// cgroup v2: `parent` is delegated with memory and pids enabled for its children.
    V2 {
        /// cgroupfs root.
        root: PathBuf,
        /// Parent inside the hierarchy, starting with `/`.
        parent: String,
    },
    /// RUN steps share the daemon's cgroup.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// Why a build's cgroup could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BuildCgroupError {
    /// A cgroupfs file or directory could not be written.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The scope is not a plain name.
    #[error("bad build cgroup name {0:?}")]
    BadName(String),
}

impl BuildCgroups {
    /// What the host offers below `parent` (`""`: nothing, by configuration) to `uid`.
    pub fn detect(parent: &str, uid: u32) -> Self {
        Self::detect_in(Path::new(CGROUP_ROOT), parent, uid)
    }

    /// [`Self::detect`] with an injectable cgroupfs root.
    pub fn detect_in(root: &Path, parent: &str, uid: u32) -> Self {
        let rel = parent.trim_matches('/');
        if rel.is_empty() {
            return Self::Unavailable {
                reason: "no build cgroup parent is configured ([build] cgroup_parent = \"\")"
                    .into(),
            };
        }
        let owned = |p: &Path| super::cgroups::owned_dir(p, uid);
        if root.join("cgroup.controllers").exists() {
            let dir = root.join(rel);
            if !owned(&dir) {
                return Self::Unavailable {
                    reason: format!(
                        "cgroup v2: {} is not a directory owned by uid {uid} (setup prepares it for a local daemon)",
                        dir.display()
                    ),
                };
            }
            let enabled =
                std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
            for c in ["memory", "pids"] {
                if !enabled.split_whitespace().any(|e| e == c) {
                    return Self::Unavailable {
                        reason: format!(
                            "cgroup v2: {c} is not enabled in {}/cgroup.subtree_control",
                            dir.display()
                        ),
                    };
                }
            }
            return Self::V2 {
                root: root.to_path_buf(),
                parent: format!("/{rel}"),
            };
        }
        let hierarchies: Vec<String> = super::cgroups::v1_hierarchies(root);
        let mut missing: Vec<&str> = hierarchies
            .iter()
            .map(String::as_str)
            .filter(|h| !owned(&root.join(h).join(rel)))
            .collect();
        for needed in ["memory", "pids"] {
            if !hierarchies.iter().any(|h| h == needed) {
                missing.push(needed);
            }
        }
        if !missing.is_empty() {
            return Self::Unavailable {
                reason: format!(
                    "cgroup v1: {}/{{{}}}/{rel} is not a directory owned by uid {uid} (setup prepares it for a local daemon)",
                    root.display(),
                    missing.join(",")
                ),
            };
        }
        Self::V1 {
            root: root.to_path_buf(),
            parent: format!("/{rel}"),
            hierarchies,
        }
    }

    /// One line for `/healthz` and setup's report.
    pub fn describe(&self) -> String {
        match self {
            Self::V1 { parent, .. } => format!(
                "each build's RUN steps in a cgroup of their own below {parent} (cgroup v1), apart from the build daemon"
            ),
            Self::V2 { parent, .. } => format!(
                "each build's RUN steps in a cgroup of their own below {parent} (cgroup v2), apart from the build daemon"
            ),
            Self::Unavailable { reason } => format!(
                "NOT separated: RUN steps share the build daemon's cgroup and limits ({reason})"
            ),
        }
    }

    /// Whether builds get cgroups of their own.
    pub fn available(&self) -> bool {
        !matches!(self, Self::Unavailable { .. })
    }

    /// Make the cgroup `<parent>/<name>` with `limits`. `Ok(None)` when the host has no build
    /// cgroups.
    pub fn create(
        &self,
        name: &str,
        limits: BuildLimits,
    ) -> Result<Option<BuildCgroup>, BuildCgroupError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(BuildCgroupError::BadName(name.to_owned()));
        }
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| BuildCgroupError::Io { what, path, source }
        };
        let write =
            |path: PathBuf, value: String| std::fs::write(&path, value).map_err(io("write", &path));
        let (rel, dirs) = match self {
            Self::Unavailable { .. } => return Ok(None),
            Self::V1 {
                root,
                parent,
                hierarchies,
            } => {
                let rel = format!("{}/{name}", parent.trim_matches('/'));
                let dirs: Vec<PathBuf> = hierarchies
                    .iter()
                    .map(|h| root.join(h).join(&rel))
                    .collect();
                for h in ["memory", "pids"] {
                    let dir = root.join(h).join(&rel);
                    match std::fs::create_dir(&dir) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(io("create", &dir)(e)),
                    }
                }
                let mem = root.join("memory").join(&rel);
                write(
                    mem.join("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                )?;
                write(
                    root.join("pids").join(&rel).join("pids.max"),
                    limits.pids.to_string(),
                )?;
                (rel, dirs)
            }
            Self::V2 { root, parent } => {
                let rel = format!("{}/{name}", parent.trim_matches('/'));
                let dir = root.join(&rel);
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io("create", &dir)(e)),
                }
                write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
                // No swap on top of the memory limit (absent when the kernel has no swap accounting).
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                write(dir.join("pids.max"), limits.pids.to_string())?;
                (rel, vec![dir])
            }
        };
        Ok(Some(BuildCgroup {
            rel,
            dirs,
            pids_dir: match self {
                Self::V1 { root, .. } => Some(root.join("pids")),
                _ => None,
            },
            limits,
        }))
    }
}

/// One build's cgroup; removed (with whatever runc left in it) when dropped.
#[derive(Debug)]
pub struct BuildCgroup {
    rel: String,
    dirs: Vec<PathBuf>,
    pids_dir: Option<PathBuf>,
    limits: BuildLimits,
}

impl BuildCgroup {
    /// The frontend's `cgroup-parent` value: the path inside the hierarchy without its leading `/`.
    pub fn frontend_parent(&self) -> &str {
        &self.rel
    }

    /// The limits it was made with.
    pub fn limits(&self) -> BuildLimits {
        self.limits
    }

    /// Its directory in the hierarchy that lists its processes (pids on v1, the unified one on
    /// v2), where runc makes `buildkit/<id>` for each RUN step.
    pub fn procs_dir(&self) -> PathBuf {
        match &self.pids_dir {
            Some(pids_root) => pids_root.join(&self.rel),
            None => self.dirs.first().cloned().unwrap_or_default(),
        }
    }

    /// Whether any RUN step ran in it (runc made its `buildkit/` child): evidence for the job
    /// record that the daemon honoured the cgroup.
    pub fn used(&self) -> bool {
        self.procs_dir().join("buildkit").is_dir()
    }

    /// Kill whatever still runs in it and remove it, deepest first, in every hierarchy (for up
    /// to a second while killed processes exit).
    fn remove(&self) {
        for dir in &self.dirs {
            for _ in 0..20 {
                kill_all_below(dir);
                match remove_tree(dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    _ => break,
                }
            }
        }
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// SIGKILL every process in `dir` and its children (a RUN step the daemon did not stop). The
/// service's user owns the daemon's user namespace, so it may signal every process in it.
fn kill_all_below(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            kill_all_below(&e.path());
        }
    }
}

/// rmdir `dir` and its child cgroups, deepest first (a cgroup's files go with it).
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = remove_tree(&e.path());
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    const LIMITS: BuildLimits = BuildLimits {
        memory_bytes: 1 << 30,
        pids: 100,
    };

    #[test]
    fn v1_needs_the_parent_in_every_hierarchy() {
        let t = tempfile::tempdir().unwrap();
        for h in ["memory", "pids", "cpu", "systemd"] {
            std::fs::create_dir_all(t.path().join(h).join("perfbox-build/runs")).unwrap();
        }
        let b = BuildCgroups::detect_in(t.path(), "/perfbox-build/runs", uid());
        assert!(matches!(b, BuildCgroups::V1 { .. }), "{b:?}");
        assert!(b.describe().contains("of their own"));
        std::fs::create_dir_all(t.path().join("freezer")).unwrap();
        let b = BuildCgroups::detect_in(t.path(), "/perfbox-build/runs", uid());
        match &b {
            BuildCgroups::Unavailable { reason } => assert!(reason.contains("freezer"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(b.describe().starts_with("NOT separated"));
        assert!(!BuildCgroups::detect_in(t.path(), "/perfbox-build/runs", uid() + 1).available());
        assert!(!BuildCgroups::detect_in(t.path(), "", uid()).available());
    }

    #[test]
    fn v1_build_cgroup_gets_limits_and_is_removed() {
        let t = tempfile::tempdir().unwrap();
        for h in ["memory", "pids", "cpu"] {
            std::fs::create_dir_all(t.path().join(h).join("pb/runs")).unwrap();
        }
        let b = BuildCgroups::detect_in(t.path(), "/pb/runs", uid());
        let cg = b.create("job-7", LIMITS).unwrap().unwrap();
        assert_eq!(cg.frontend_parent(), "pb/runs/job-7");
        let read = |p: &str| std::fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(
            read("memory/pb/runs/job-7/memory.limit_in_bytes"),
            "1073741824"
        );
        assert_eq!(read("pids/pb/runs/job-7/pids.max"), "100");
        assert!(!cg.used());
        // runc's children, in every hierarchy.
        for h in ["memory", "pids", "cpu"] {
            std::fs::create_dir_all(t.path().join(h).join("pb/runs/job-7/buildkit/abc")).unwrap();
        }
        assert!(cg.used());
        assert!(b.create("../x", LIMITS).is_err());
        drop(cg);
        // (cgroupfs removes a cgroup's files with it; this tree holds real files where limits
        // were written, so only the hierarchy without them can be checked here.)
        assert!(!t.path().join("cpu/pb/runs/job-7").exists());
        assert!(!t.path().join("memory/pb/runs/job-7/buildkit").exists());
        assert!(t.path().join("cpu/pb/runs").exists());
    }

    #[test]
    fn v2_needs_memory_and_pids_delegated() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let runs = t.path().join("pb/runs");
        std::fs::create_dir_all(&runs).unwrap();
        std::fs::write(runs.join("cgroup.subtree_control"), "pids").unwrap();
        assert!(!BuildCgroups::detect_in(t.path(), "/pb/runs", uid()).available());
        std::fs::write(runs.join("cgroup.subtree_control"), "memory pids").unwrap();
        let b = BuildCgroups::detect_in(t.path(), "/pb/runs", uid());
        let cg = b.create("owner-ab12", LIMITS).unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(runs.join("owner-ab12/pids.max")).unwrap(),
            "100"
        );
        assert_eq!(cg.frontend_parent(), "pb/runs/owner-ab12");
        drop(cg);
        assert_eq!(
            BuildCgroups::Unavailable { reason: "x".into() }
                .create("a", LIMITS)
                .unwrap()
                .map(|c| c.rel.clone()),
            None
        );
    }
}
