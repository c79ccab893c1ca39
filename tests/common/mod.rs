//! Shared helpers for the integration tests: a real busybox root filesystem, job directories the
//! unprivileged perfbox user can reach, process scans, and honest skips (libtest-mimic trials
//! marked ignored, with the host's reason in the name).

#![allow(dead_code)]

pub mod pg;
pub mod service;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A setting of the setup under test: the `PERFBOX_*` variable scripts/test exports (a CI run
/// from nothing uses its own user, directories, registry and cgroups), else the default of
/// scripts/lib/common.sh.
fn setting(var: &'static str, default: &'static str) -> &'static str {
    static CACHE: std::sync::Mutex<Vec<(&'static str, &'static str)>> =
        std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap();
    if let Some((_, v)) = cache.iter().find(|(k, _)| *k == var) {
        return v;
    }
    let v: &'static str = match std::env::var(var) {
        Ok(v) if !v.is_empty() => Box::leak(v.into_boxed_str()),
        _ => default,
    };
    cache.push((var, v));
    v
}

/// The unprivileged user setup creates (`PERFBOX_USER`).
pub fn user() -> &'static str {
    setting("PERFBOX_USER", "perfbox")
}

/// perfbox's state dir (0755, owned by the user): test dirs live below it so the user can reach
/// them (`PERFBOX_STATE`).
pub fn state() -> &'static Path {
    Path::new(setting("PERFBOX_STATE", "/var/lib/perfbox"))
}

/// perfbox's run dir, where the daemons' sockets are (`PERFBOX_RUN`).
pub fn run_dir() -> &'static Path {
    Path::new(setting("PERFBOX_RUN", "/run/perfbox"))
}

/// The rootless buildkitd socket.
pub fn buildkit_socket() -> String {
    run_dir()
        .join("buildkit/buildkitd.sock")
        .display()
        .to_string()
}

/// The networked buildkitd's socket (scripts/buildkitd-net).
pub fn buildkit_net_socket() -> String {
    run_dir()
        .join("buildkit-net/buildkitd.sock")
        .display()
        .to_string()
}

/// The loopback registry of base images, `host:port` (`PERFBOX_REGISTRY`).
pub fn registry() -> &'static str {
    setting("PERFBOX_REGISTRY", "127.0.0.1:5000")
}

/// The registry's port.
pub fn registry_port() -> u16 {
    registry().rsplit(':').next().unwrap().parse().unwrap()
}

/// The name of perfbox's cgroups (`PERFBOX_CGROUP`): jobs under `/<name>`, builds under
/// `/<name>-build`.
pub fn cgroup_name() -> &'static str {
    setting("PERFBOX_CGROUP", "perfbox")
}

/// The parent cgroup of job cgroups, as perfbox's `cgroup_parent` option spells it.
pub fn cgroup_parent() -> String {
    format!("/{}", cgroup_name())
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Fail loudly (not skip) when the environment that setup provides is missing.
pub fn require_setup() {
    assert!(
        nix::unistd::User::from_name(user())
            .ok()
            .flatten()
            .is_some(),
        "user {} missing: run `sudo scripts/setup` first (README, Quick start)",
        user()
    );
}

/// Wait until the buildkitd at `socket` answers (`buildctl debug workers`), for up to 60 s: a
/// test that needs the daemon checks it first, so a daemon that another test restarted, or that
/// is missing, gives a clear message instead of "connection refused" in the middle of a test.
pub fn require_buildkitd(socket: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = Command::new("buildctl")
            .args(["--addr", &format!("unix://{socket}"), "debug", "workers"])
            .output();
        match out {
            Ok(o) if o.status.success() => return,
            Ok(o) if std::time::Instant::now() >= deadline => panic!(
                "buildkitd on {socket} does not answer after 60 s (scripts/setup starts it; see {}/logs/buildkitd.log): {}",
                state().display(),
                first_error_line(&String::from_utf8_lossy(&o.stderr))
            ),
            Err(e) => panic!("cannot run buildctl (scripts/setup installs it): {e}"),
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(250)),
        }
    }
}

/// A fresh directory under the state dir's test/, removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> Self {
        let base = state().join("test");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = base.join(format!("{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // PERFBOX_KEEP_TEST_DIRS=1 keeps them (services' logs) for a post-mortem.
        if std::env::var_os("PERFBOX_KEEP_TEST_DIRS").is_some() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A busybox root filesystem (Debian's busybox-static plus applet links), owned by perfbox as a
/// built image would be. Built once per test binary.
pub fn busybox_rootfs() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let root = state()
            .join("test")
            .join(format!("rootfs-busybox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "etc",
            "tmp",
            "data",
            "proc",
            "sys",
            "dev",
            "root",
            "home/user",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        let list = Command::new("/bin/busybox")
            .arg("--list-full")
            .output()
            .unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let p = root.join(applet);
            if !p.exists() {
                std::os::unix::fs::symlink("/bin/busybox", p).unwrap();
            }
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
        let st = Command::new("chown")
            .args(["-R", user()])
            .arg(&root)
            .status()
            .unwrap();
        assert!(st.success());
        root
    })
    .clone()
}

/// Remove the shared rootfs at the end of a test binary.
pub fn remove_busybox_rootfs() {
    let root = state()
        .join("test")
        .join(format!("rootfs-busybox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(root);
}

/// pids whose command line contains `marker` (a scan of /proc, like `ps`).
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                found.push(pid);
            }
        }
    }
    found
}

/// The main buildkitd of the setup under test (not the networked one, not rootlesskit).
pub fn main_buildkitd_pids() -> Vec<i32> {
    let config = state()
        .join("buildkit/buildkitd.toml")
        .display()
        .to_string();
    let mut pids = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let cmd =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
        // (A child it forked has the same name and command line until it execs: not the daemon.)
        let parent_comm = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|st| {
                st.rsplit(')')
                    .next()?
                    .split_whitespace()
                    .nth(1)
                    .map(str::to_owned)
            })
            .and_then(|ppid| std::fs::read_to_string(format!("/proc/{ppid}/comm")).ok())
            .unwrap_or_default();
        if comm.trim() == "buildkitd" && cmd.contains(&config) && parent_comm.trim() != "buildkitd"
        {
            pids.push(pid);
        }
    }
    pids
}

/// Free bytes (for unprivileged users) on the disk holding the state dir.
pub fn free_bytes() -> u64 {
    let st = nix::sys::statvfs::statvfs(state()).unwrap();
    st.blocks_available() as u64 * st.fragment_size() as u64
}

/// The lowest free space of the state dir's disk, sampled every 20 ms from [`Self::start`] until
/// [`Self::stop`].
pub struct LowestFreeDisk {
    /// Free bytes at the start.
    pub before: u64,
    lowest: std::sync::Arc<std::sync::atomic::AtomicU64>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LowestFreeDisk {
    pub fn start() -> Self {
        use std::sync::atomic::Ordering;
        let before = free_bytes();
        let lowest = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (lowest, done) = (lowest.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    lowest.fetch_min(free_bytes(), Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            })
        };
        Self {
            before,
            lowest,
            done,
            thread: Some(thread),
        }
    }

    /// Stop sampling; the largest drop of free space seen, in bytes.
    pub fn stop(&mut self) -> u64 {
        use std::sync::atomic::Ordering;
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.before
            .saturating_sub(self.lowest.load(Ordering::SeqCst))
    }
}

impl Drop for LowestFreeDisk {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the host has the unified cgroup v2 hierarchy.
pub fn cgroup_v2_host() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A trial that is ignored, with the reason in its name (libtest prints it as "ignored").
/// The reason is kept to one readable line: brackets (they would end the marker) are dropped
/// and it is cut at 240 characters.
pub fn skipped(name: &str, reason: &str) -> libtest_mimic::Trial {
    let reason: String = reason
        .chars()
        .filter(|c| *c != '[' && *c != ']')
        .take(240)
        .collect();
    libtest_mimic::Trial::test(format!("{name} [SKIPPED: {reason}]"), || Ok(()))
        .with_ignored_flag(true)
}

/// Run an async test body on a fresh runtime, turning panics into failures with the message.
pub fn block_on<F: std::future::Future<Output = ()>>(f: F) -> Result<(), libtest_mimic::Failed> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
    Ok(())
}

/// The most telling line of a runtime's error output: the first that mentions an error, else the
/// last non-empty one.
pub fn first_error_line(text: &str) -> String {
    text.lines()
        .find(|l| l.to_lowercase().contains("error"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("no output")
        .trim()
        .to_string()
}

/// `argv` run as the unprivileged perfbox user (setpriv), with stdin from /dev/null, its own
/// XDG_RUNTIME_DIR (setup's run dir) and no NOTIFY_SOCKET.
pub fn as_perfbox(argv: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", user(), "--regid", user(), "--init-groups", "--"])
        .args(argv)
        // The user's own run dir (setup's, owned by it): runc keeps per-user state below
        // $XDG_RUNTIME_DIR, and a shared /tmp/runc would belong to whichever user came first.
        .env("XDG_RUNTIME_DIR", run_dir())
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null());
    c
}

/// `buildctl build` of `dockerfile` (written into `dir`, which is also the context) on the daemon
/// at `socket`, with `opts` before the tar output to `tar`. Ok(progress log) or Err(progress log).
pub fn buildctl_build(
    socket: &str,
    dir: &Path,
    dockerfile: &str,
    tar: &Path,
    opts: &[&str],
) -> Result<String, String> {
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    let out = Command::new("buildctl")
        .args([
            "--addr",
            &format!("unix://{socket}"),
            "build",
            "--progress=plain",
        ])
        .args(["--frontend", "dockerfile.v0"])
        .arg("--local")
        .arg(format!("context={}", dir.display()))
        .arg("--local")
        .arg(format!("dockerfile={}", dir.display()))
        .args(opts)
        .arg("--output")
        .arg(format!("type=tar,dest={}", tar.display()))
        .output()
        .map_err(|e| format!("buildctl: {e}"))?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(log)
    } else {
        Err(log)
    }
}
