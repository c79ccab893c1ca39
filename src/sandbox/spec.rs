//! The OCI runtime spec of a job: a pure function from what the job is (image rootfs, output
//! dir, process, limits, host identity) to a hardened [`Spec`]. Written to the job dir as
//! `config.json`, which is both what the runtime reads and the audit record of the sandbox.
//!
//! What it grants: the image's process as the image's USER inside a user namespace (container
//! root = the unprivileged runtime user), fresh mount/pid/ipc/uts/cgroup/network namespaces (the
//! network one holds only `lo`), the image rootfs read-only, a size-capped tmpfs at /tmp, the
//! job's own output dir at /data, and the usual /proc, /dev, /sys with runc's masked and
//! read-only paths. What it takes away: every capability, privilege gain (no_new_privileges),
//! every syscall outside the seccomp allowlist, core dumps, and resources beyond the limits; and
//! it puts the job's processes first in line for the OOM killer (`oom_score_adj` 1000).

use std::path::PathBuf;

use oci_spec::runtime::{
    Capabilities, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder,
    LinuxSeccomp, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder,
    RootBuilder, Spec, SpecBuilder, UserBuilder, get_default_maskedpaths,
    get_default_readonly_paths,
};

use super::cgroups::{CgroupHost, Controller};
use super::idmap::HostIdentity;
use super::image_user::ProcessUser;
use super::policy::{AppliedLimits, Enforcement, Limits};

/// CPU quota period (µs).
const CPU_PERIOD_US: u64 = 100_000;

/// Every job process's `oom_score_adj`: the kernel's first choice when memory runs out.
pub const OOM_SCORE_ADJ: i32 = 1000;

/// Everything the spec depends on.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    /// Absolute path of the image root filesystem (mounted read-only).
    pub rootfs: PathBuf,
    /// Absolute path of this job's output dir (mounted at /data).
    pub out_dir: PathBuf,
    /// Absolute path of a dataset (mounted read-only at /input), if the job asked for one.
    pub input: Option<PathBuf>,
    /// argv (Entrypoint + Cmd, already resolved).
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// The image USER, resolved.
    pub user: ProcessUser,
    /// Who runs the runtime on the host.
    pub identity: &'a HostIdentity,
    /// Requested limits.
    pub limits: &'a Limits,
    /// What cgroups can enforce here.
    pub cgroups: &'a CgroupHost,
    /// The container id (names its cgroup).
    pub container_id: &'a str,
    /// Seccomp profile.
    pub seccomp: LinuxSeccomp,
}

/// Errors building a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The image USER cannot be mapped into this host's id ranges.
    #[error(
        "image user {uid}:{gid} has no host id: this host maps container ids 0..={max_uid} (uid) / 0..={max_gid} (gid); add a subuid/subgid range for the runtime user"
    )]
    UnmappableUser {
        /// uid.
        uid: u32,
        /// gid.
        gid: u32,
        /// Highest mappable uid.
        max_uid: u32,
        /// Highest mappable gid.
        max_gid: u32,
    },
    /// A path in the spec is not absolute.
    #[error("{0} must be an absolute path")]
    RelativePath(String),
    /// oci-spec refused a value.
    #[error("invalid spec: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, SpecError> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

fn rlimit(typ: PosixRlimitType, value: u64) -> Result<oci_spec::runtime::PosixRlimit, SpecError> {
    Ok(PosixRlimitBuilder::default()
        .typ(typ)
        .hard(value)
        .soft(value)
        .build()?)
}

/// Build the hardened spec and the record of which limits it really applies.
pub fn hardened_spec(input: &SpecInput<'_>) -> Result<(Spec, AppliedLimits), SpecError> {
    for (name, p) in [("rootfs", &input.rootfs), ("output dir", &input.out_dir)] {
        if !p.is_absolute() {
            return Err(SpecError::RelativePath(name.into()));
        }
    }
    let id = input.identity;
    let user = &input.user;
    let gids_ok = std::iter::once(user.gid)
        .chain(user.additional_gids.iter().copied())
        .all(|g| g <= id.max_container_gid());
    if user.uid > id.max_container_uid() || !gids_ok {
        return Err(SpecError::UnmappableUser {
            uid: user.uid,
            gid: user.gid,
            max_uid: id.max_container_uid(),
            max_gid: id.max_container_gid(),
        });
    }
    let limits = input.limits;
    let cg = input.cgroups;

    // Limits: cgroups where the host lets us, else an rlimit where one exists, else say so.
    let mut rlimits = vec![
        rlimit(PosixRlimitType::RlimitCore, 0)?,
        rlimit(PosixRlimitType::RlimitNofile, limits.nofile)?,
        rlimit(PosixRlimitType::RlimitNproc, limits.nproc)?,
        rlimit(PosixRlimitType::RlimitFsize, limits.fsize_bytes)?,
    ];
    let mut resources = LinuxResourcesBuilder::default();
    let v = cg.version();
    let memory = if cg.has(Controller::Memory) {
        let mut m = LinuxMemoryBuilder::default().limit(limits.memory_bytes as i64);
        if v == "v2" {
            m = m.swap(limits.memory_bytes as i64); // memory+swap = memory: no swap on top
        }
        resources = resources.memory(m.build()?);
        let control = if v == "v2" {
            "v2 memory.max"
        } else {
            "v1 memory.limit_in_bytes"
        };
        Enforcement::Cgroup {
            control: control.into(),
            value: limits.memory_bytes.to_string(),
        }
    } else {
        // Address space is a loose stand-in for memory: it bounds mappings, not resident pages.
        let value = limits.memory_bytes.saturating_mul(4);
        rlimits.push(rlimit(PosixRlimitType::RlimitAs, value)?);
        Enforcement::Rlimit {
            name: "RLIMIT_AS".into(),
            value,
            note: format!(
                "4x the memory limit as address space per process, not a memory limit ({})",
                cg.missing_reason(Controller::Memory)
            ),
        }
    };
    let pids = if cg.has(Controller::Pids) {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(limits.pids as i64)
                .build()?,
        );
        let control = if v == "v2" {
            "v2 pids.max"
        } else {
            "v1 pids.max"
        };
        Enforcement::Cgroup {
            control: control.into(),
            value: limits.pids.to_string(),
        }
    } else {
        Enforcement::Rlimit {
            name: "RLIMIT_NPROC".into(),
            value: limits.nproc,
            note: format!(
                "counts every process of the runtime user's uid, not this job's ({})",
                cg.missing_reason(Controller::Pids)
            ),
        }
    };
    let cpu = if cg.has(Controller::Cpu) {
        let quota = (limits.cpu_millicores * CPU_PERIOD_US / 1000) as i64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD_US)
                .build()?,
        );
        let control = if v == "v2" {
            "v2 cpu.max"
        } else {
            "v1 cpu.cfs_quota_us"
        };
        Enforcement::Cgroup {
            control: control.into(),
            value: format!("{quota}/{CPU_PERIOD_US}"),
        }
    } else {
        Enforcement::NotApplied {
            reason: cg.missing_reason(Controller::Cpu),
        }
    };
    let applied = AppliedLimits {
        memory,
        pids,
        cpu,
        nofile: Enforcement::Rlimit {
            name: "RLIMIT_NOFILE".into(),
            value: limits.nofile,
            note: String::new(),
        },
        fsize: Enforcement::Rlimit {
            name: "RLIMIT_FSIZE".into(),
            value: limits.fsize_bytes,
            note: String::new(),
        },
        tmpfs: Enforcement::Sandbox {
            value: format!("/tmp tmpfs size={}", limits.tmpfs_bytes),
        },
        timeout: Enforcement::Sandbox {
            value: format!(
                "{} s wall clock, then SIGKILL to the container",
                limits.timeout_secs
            ),
        },
        log: Enforcement::Sandbox {
            value: format!("{} bytes of stdout+stderr kept", limits.log_bytes),
        },
        data: Enforcement::Sandbox {
            value: format!(
                "/data watched every 200 ms: at most {} bytes of disk and {} files, then the container is killed",
                limits.data_bytes, limits.data_files
            ),
        },
    };

    let no_caps = Capabilities::new();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(user.uid)
                .gid(user.gid)
                .additional_gids(user.additional_gids.clone())
                .build()?,
        )
        .args(input.args.clone())
        .env(input.env.clone())
        .cwd(input.cwd.clone())
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(no_caps.clone())
                .effective(no_caps.clone())
                .inheritable(no_caps.clone())
                .permitted(no_caps.clone())
                .ambient(no_caps)
                .build()?,
        )
        .no_new_privileges(true)
        .rlimits(rlimits)
        // When memory runs out beyond the job's own limit (no memory cgroup, as in perfbox's
        // container image, or the whole machine short), the kernel kills a job's process
        // first, never perfbox, BuildKit or the registry. Raising it needs no privilege.
        .oom_score_adj(OOM_SCORE_ADJ)
        .build()?;

    let tmpfs_size = format!("size={}", limits.tmpfs_bytes);
    let out_dir = input.out_dir.to_string_lossy().into_owned();
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        // A sysfs of our own network namespace, read-only (not a bind of the host's /sys).
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/tmp",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=1777", &tmpfs_size],
        )?,
        // The only writable host path in the container: this job's own output directory.
        mount(
            "/data",
            "bind",
            &out_dir,
            &["rbind", "rw", "nosuid", "nodev", "noexec"],
        )?,
    ];
    // The one other host path a job may get: the dataset it asked for, read-only, and only
    // that directory (not recursive: nothing mounted below it comes along).
    if let Some(dataset) = &input.input {
        mounts.push(mount(
            "/input",
            "bind",
            &dataset.to_string_lossy(),
            &["bind", "ro", "nosuid", "nodev", "noexec"],
        )?);
    }

    let namespaces = [
        LinuxNamespaceType::User,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Cgroup,
        // runc's --rootless preset leaves this out; it is what keeps the job off every network.
        LinuxNamespaceType::Network,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .collect::<Result<Vec<_>, _>>()?;

    let mut linux = LinuxBuilder::default()
        .uid_mappings(id.uid_mappings())
        .gid_mappings(id.gid_mappings())
        .namespaces(namespaces)
        .masked_paths(get_default_maskedpaths())
        .readonly_paths(get_default_readonly_paths())
        .seccomp(input.seccomp.clone())
        .resources(resources.build()?);
    if let Some(path) = cg.cgroups_path(input.container_id) {
        linux = linux.cgroups_path(PathBuf::from(path));
    }

    let spec = SpecBuilder::default()
        .version("1.0.2")
        .hostname("perfbox")
        .root(
            RootBuilder::default()
                .path(input.rootfs.clone())
                .readonly(true)
                .build()?,
        )
        .process(process)
        .mounts(mounts)
        .linux(linux.build()?)
        .build()?;
    Ok((spec, applied))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::idmap::IdRange;
    use oci_spec::runtime::LinuxNamespaceType as Ns;

    fn identity(sub: bool) -> HostIdentity {
        let r = sub.then_some(IdRange {
            start: 200000,
            count: 65536,
        });
        HostIdentity {
            uid: 990,
            gid: 990,
            name: "perfbox".into(),
            subuid: r,
            subgid: r,
        }
    }

    fn build(
        user: ProcessUser,
        id: &HostIdentity,
        cg: &CgroupHost,
    ) -> Result<(Spec, AppliedLimits), SpecError> {
        let limits = Limits::default();
        hardened_spec(&SpecInput {
            rootfs: "/var/lib/perfbox/images/x/rootfs".into(),
            out_dir: "/var/lib/perfbox/jobs/1/out".into(),
            input: None,
            args: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user,
            identity: id,
            limits: &limits,
            cgroups: cg,
            container_id: "perfbox-1",
            seccomp: crate::sandbox::seccomp::default_profile(),
        })
    }

    fn root() -> ProcessUser {
        ProcessUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: None,
        }
    }

    #[test]
    fn spec_is_hardened() {
        let none = CgroupHost::Unavailable {
            reason: "test".into(),
        };
        let (spec, applied) = build(root(), &identity(true), &none).unwrap();
        let root_cfg = spec.root().as_ref().unwrap();
        assert_eq!(root_cfg.readonly(), Some(true));
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.oom_score_adj(), Some(OOM_SCORE_ADJ));
        let caps = p.capabilities().as_ref().unwrap();
        for set in [
            caps.bounding(),
            caps.effective(),
            caps.inheritable(),
            caps.permitted(),
            caps.ambient(),
        ] {
            assert!(set.as_ref().unwrap().is_empty());
        }
        let linux = spec.linux().as_ref().unwrap();
        let ns: Vec<Ns> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        for want in [
            Ns::User,
            Ns::Mount,
            Ns::Pid,
            Ns::Ipc,
            Ns::Uts,
            Ns::Cgroup,
            Ns::Network,
        ] {
            assert!(ns.contains(&want), "{want:?} namespace missing");
        }
        assert_eq!(linux.uid_mappings().as_ref().unwrap()[0].host_id(), 990);
        assert_eq!(linux.uid_mappings().as_ref().unwrap()[1].host_id(), 200000);
        assert!(linux.seccomp().is_some());
        assert!(
            linux
                .masked_paths()
                .as_ref()
                .unwrap()
                .iter()
                .any(|p| p == "/proc/kcore")
        );
        // Only one host path: the job's output dir, at /data.
        let binds: Vec<_> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|m| m.typ().as_deref() == Some("bind"))
            .collect();
        assert_eq!(binds.len(), 1);
        assert_eq!(binds[0].destination().to_str(), Some("/data"));
        assert_eq!(
            binds[0].source().as_ref().unwrap().to_str(),
            Some("/var/lib/perfbox/jobs/1/out")
        );
        // No cgroups here: memory falls back to an rlimit and cpu says it is not applied.
        assert!(matches!(applied.memory, Enforcement::Rlimit { .. }));
        assert!(matches!(applied.cpu, Enforcement::NotApplied { .. }));
        assert!(linux.cgroups_path().is_none());
        let names: Vec<_> = p
            .rlimits()
            .as_ref()
            .unwrap()
            .iter()
            .map(|r| r.typ())
            .collect();
        assert!(
            names.contains(&PosixRlimitType::RlimitCore)
                && names.contains(&PosixRlimitType::RlimitAs)
        );
    }

    #[test]
    fn cgroup_limits_recorded_where_the_host_allows() {
        let v1 = CgroupHost::V1 {
            parent: "/perfbox".into(),
            controllers: vec![Controller::Memory, Controller::Pids],
        };
        let (spec, applied) = build(root(), &identity(true), &v1).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_ref().unwrap().to_str(),
            Some("/perfbox/perfbox-1")
        );
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.memory().as_ref().unwrap().limit(), Some(512 << 20));
        assert_eq!(res.pids().as_ref().unwrap().limit(), 256);
        assert!(res.cpu().is_none());
        assert!(matches!(applied.memory, Enforcement::Cgroup { .. }));
        assert!(matches!(applied.pids, Enforcement::Cgroup { .. }));
        assert!(matches!(applied.cpu, Enforcement::NotApplied { .. }));
    }

    #[test]
    fn non_root_user_needs_a_subordinate_range() {
        let none = CgroupHost::Unavailable {
            reason: "test".into(),
        };
        let u1000 = ProcessUser {
            uid: 1000,
            gid: 1000,
            additional_gids: vec![],
            home: None,
        };
        assert!(build(u1000.clone(), &identity(true), &none).is_ok());
        assert!(matches!(
            build(u1000, &identity(false), &none),
            Err(SpecError::UnmappableUser { .. })
        ));
    }
}
