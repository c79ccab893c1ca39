//! What a build's RUN steps have written to disk, measured while the build runs.
//!
//! A RUN step writes into the upper directory of an overlay mount that BuildKit made for it in
//! its own root (the host's disk). Nothing in rootless BuildKit bounds that, so a RUN step can
//! fill the disk long before the image is exported and its size checked. perfbox samples it:
//!
//! 1. the RUN steps of a build are the cgroups `<build cgroup>/buildkit/<id>` that runc made;
//! 2. the root mount of a process in each (`/proc/<pid>/mountinfo`, mount point `/`) names its
//!    overlay `upperdir`; every other writable mount of the step that lives in the same
//!    snapshots directory is written to the host's disk too — a cache mount
//!    (`RUN --mount=type=cache`: a bind of a snapshot's `fs`, kept after the build, so a step
//!    that fills it is not even undone by BuildKit), or another overlay's `upperdir` — and is
//!    counted in full (an owner-scoped cache mount's earlier contents included);
//! 3. that directory is walked (allocated blocks and entries, one file system, no symlink
//!    followed) by `perfbox measure-tree` run **inside the daemon's user namespace**: files a RUN
//!    step made as another user (a subuid) with a mode that shuts out others are still counted,
//!    which the service's own uid could not read.
//!
//! The total is over every upper directory seen during the build (a finished step's stays on
//! disk). A step shorter than the sampling interval can be missed; the export's size check and the
//! free-disk floor stay behind it.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Disk used by files and the number of entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteUsage {
    /// Allocated bytes (st_blocks × 512: a sparse file counts what it really uses).
    pub bytes: u64,
    /// Files, directories and links.
    pub entries: u64,
}

/// Stop counting past this many entries: enough to be over any limit, bounded work.
const MAX_WALK: u64 = 20_000_000;

/// Walk `dir` (not following symlinks, not leaving its file system) and add up what it uses.
/// Entries that vanish or cannot be read during the walk are skipped.
pub fn measure_tree(dir: &Path) -> std::io::Result<WriteUsage> {
    let top = std::fs::symlink_metadata(dir)?;
    let dev = top.dev();
    let mut usage = WriteUsage {
        bytes: top.blocks() * 512,
        entries: 0,
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            usage.entries += 1;
            usage.bytes += m.blocks() * 512;
            if m.is_dir() && m.dev() == dev {
                stack.push(e.path());
            }
            if usage.entries > MAX_WALK {
                return Ok(usage);
            }
        }
    }
    Ok(usage)
}

/// The samples of one build.
#[derive(Debug)]
pub struct BuildWrites {
    cgroup: PathBuf,
    exe: PathBuf,
    seen: HashMap<PathBuf, WriteUsage>,
}

impl BuildWrites {
    /// Watch the RUN steps below `cgroup` (the build's cgroup directory in the pids hierarchy
    /// on v1, or the unified one), measuring with `exe measure-tree`.
    pub fn new(cgroup: PathBuf, exe: PathBuf) -> Self {
        Self {
            cgroup,
            exe,
            seen: HashMap::new(),
        }
    }

    /// Measure the RUN steps running now; the total over every upper directory seen so far.
    pub fn sample(&mut self) -> WriteUsage {
        for pid in running_steps(&self.cgroup) {
            for dir in written_dirs(pid) {
                if let Ok(u) = measure_in_userns(&self.exe, pid, &dir) {
                    let slot = self.seen.entry(dir).or_default();
                    slot.bytes = slot.bytes.max(u.bytes);
                    slot.entries = slot.entries.max(u.entries);
                }
            }
        }
        self.seen
            .values()
            .fold(WriteUsage::default(), |a, u| WriteUsage {
                bytes: a.bytes + u.bytes,
                entries: a.entries + u.entries,
            })
    }
}

/// One process of each RUN step running in the build's cgroup.
fn running_steps(cgroup: &Path) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir(cgroup.join("buildkit")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let procs = std::fs::read_to_string(e.path().join("cgroup.procs")).ok()?;
            procs.lines().find_map(|l| l.trim().parse().ok())
        })
        .collect()
}

/// The directories on the host's disk that `pid`'s writes land in (see the module docs).
fn written_dirs(pid: i32) -> Vec<PathBuf> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .map(|text| written_dirs_in(&text))
        .unwrap_or_default()
}

/// [`written_dirs`] of a mountinfo text: the root overlay's `upperdir` first, then every other
/// read-write mount in the same snapshots directory (a bind of a snapshot's `fs`, or an
/// overlay's `upperdir`). Nothing when the root is not an overlay.
fn written_dirs_in(mountinfo: &str) -> Vec<PathBuf> {
    // Per line: (mount point, root within its file system, rw, fs type, upperdir if overlay).
    let mounts: Vec<(String, String, bool, String, Option<PathBuf>)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mut m = mount.split(' ');
            let root = unescape(m.nth(3)?);
            let point = unescape(m.next()?);
            let rw = m.next()?.split(',').any(|o| o == "rw");
            let mut fs = fs.split(' ');
            let kind = fs.next()?.to_owned();
            let upper = fs.nth(1).and_then(|options| {
                options
                    .split(',')
                    .find_map(|o| o.strip_prefix("upperdir="))
                    .map(|u| PathBuf::from(unescape(u)))
            });
            Some((point, root, rw, kind, upper))
        })
        .collect();
    // The last mount at / is the one in force.
    let Some(root_upper) = mounts
        .iter()
        .rev()
        .find(|(point, _, _, kind, _)| point == "/" && kind == "overlay")
        .and_then(|m| m.4.clone())
    else {
        return Vec::new();
    };
    // `<snapshots>/<n>/fs`: the other mounts that count live in `<snapshots>`.
    let Some(snapshots) = root_upper
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
    else {
        return vec![root_upper];
    };
    let mut dirs = vec![root_upper.clone()];
    for (point, root, rw, kind, upper) in &mounts {
        if point == "/" || !rw {
            continue;
        }
        let dir = match (kind.as_str(), upper) {
            ("overlay", Some(u)) => u.clone(),
            (_, _) => PathBuf::from(root),
        };
        if dir.starts_with(&snapshots) && !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// mountinfo's octal escapes (`\040` for a space...).
fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1..i + 4)
                .is_some_and(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
        {
            let digit = |k: usize| u16::from(b[i + k] - b'0');
            out.push((digit(1) * 64 + digit(2) * 8 + digit(3)) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `exe measure-tree dir`, in the user namespace of `pid` (the service's user owns it, so the
/// child may join it and read every file of the build's users).
fn measure_in_userns(exe: &Path, pid: i32, dir: &Path) -> std::io::Result<WriteUsage> {
    use std::os::unix::process::CommandExt;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("measure-tree").arg(dir);
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which is
    // async-signal-safe, on a file descriptor opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUSER)
                .map_err(std::io::Error::from)
        });
    }
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    parse_usage(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| std::io::Error::other("measure-tree printed no usage"))
}

/// `"<bytes> <entries>"`, as `perfbox measure-tree` prints it.
pub fn parse_usage(text: &str) -> Option<WriteUsage> {
    let mut it = text.split_whitespace();
    Some(WriteUsage {
        bytes: it.next()?.parse().ok()?,
        entries: it.next()?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_upper_dir_of_the_root_mount() {
        let mi = "1234 1000 0:52 / / rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/var/lib/perfbox/buildkit/root/snap\\040s/45/fs,workdir=/w,userxattr\n\
                  1235 1234 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            written_dirs_in(mi),
            vec![PathBuf::from("/var/lib/perfbox/buildkit/root/snap s/45/fs")]
        );
        assert!(written_dirs_in("1 0 0:1 / / rw - ext4 /dev/vda rw\n").is_empty());
        assert!(written_dirs_in("garbage").is_empty());
    }

    #[test]
    fn cache_mounts_and_rw_overlays_count_read_only_and_host_binds_do_not() {
        // What a RUN step with `--mount=type=cache,target=/c` sees (from this host), plus a
        // read-write overlay elsewhere, a read-only snapshot bind, and BuildKit's resolv.conf.
        let snaps = "/var/lib/perfbox/buildkit/root/runc-overlayfs/snapshots/snapshots";
        let mi = format!(
            "154 112 0:44 / / rw,relatime - overlay overlay rw,lowerdir={snaps}/9164/fs,upperdir={snaps}/10187/fs,workdir={snaps}/10187/work\n\
             161 154 254:0 /var/lib/perfbox/buildkit/root/runc-overlayfs/executor/resolv.conf /etc/resolv.conf ro,nosuid - ext4 /dev/vda rw\n\
             201 154 254:0 {snaps}/10188/fs /c rw,relatime - ext4 /dev/vda rw,discard\n\
             202 154 254:0 {snaps}/10190/fs /ro ro,relatime - ext4 /dev/vda rw\n\
             203 154 0:45 / /o rw,relatime - overlay overlay rw,lowerdir={snaps}/1/fs,upperdir={snaps}/10189/fs,workdir={snaps}/10189/work\n\
             204 154 254:0 /etc /hostetc rw,relatime - ext4 /dev/vda rw\n"
        );
        let dirs: Vec<String> = written_dirs_in(&mi)
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        assert_eq!(
            dirs,
            vec![
                format!("{snaps}/10187/fs"),
                format!("{snaps}/10188/fs"),
                format!("{snaps}/10189/fs")
            ]
        );
    }

    #[test]
    fn measures_blocks_and_entries_without_following_links() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/f"), vec![1u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink("/usr", t.path().join("link")).unwrap();
        // A sparse file counts what it uses, not its length.
        let f = std::fs::File::create(t.path().join("sparse")).unwrap();
        f.set_len(10 << 30).unwrap();
        let u = measure_tree(t.path()).unwrap();
        assert_eq!(u.entries, 4);
        assert!(u.bytes >= 1 << 20 && u.bytes < 2 << 20, "{u:?}");
        assert_eq!(
            parse_usage("123 4\n"),
            Some(WriteUsage {
                bytes: 123,
                entries: 4
            })
        );
        assert_eq!(parse_usage("x"), None);
    }

    #[test]
    fn no_steps_means_nothing_written() {
        let t = tempfile::tempdir().unwrap();
        let mut w = BuildWrites::new(t.path().to_path_buf(), "/bin/false".into());
        assert_eq!(w.sample(), WriteUsage::default());
    }
}
