//! Receiving the exported image: the tar stream the daemon pushes over the session's
//! `FileSend/DiffCopy` is unpacked into the rootfs directory *while it arrives*.
//!
//! Chunks go through a small bounded channel to a blocking thread that feeds them to
//! [`tar::Archive`] through a channel-backed [`Read`], so at most [`CHANNEL_CHUNKS`] daemon
//! messages (≤ 3 MiB each) are in memory at once, whatever the image size.
//!
//! Safety of the unpack ([`unpack_tar`]): every entry goes through [`tar::Entry::unpack_in`],
//! which strips leading `/`, refuses `..` components and refuses to write through a parent that
//! canonicalises outside the target (a symlinked directory). Any refused entry fails the export
//! (a tar produced by BuildKit from a real filesystem never contains one). Device nodes and
//! FIFOs are skipped (perfbox runs unprivileged), ownership is not restored (files belong to the
//! running user), extended attributes are not restored, permissions and mtimes are.
//! Directory permissions are applied after their contents, so a read-only directory does not
//! block its own children.
//!
//! Size: with a limit (`max_image_bytes`), an entry whose header says it would take the image
//! past the limit fails the export *before* any of it is written, counting apparent sizes: a
//! 256 GiB sparse file (which BuildKit's tar exporter streams as 256 GiB of zeros) is refused at
//! its header, and the disk never sees it.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::error::{ExportError, error_chain};

/// How many daemon messages may wait between the network and the unpacker.
pub(crate) const CHANNEL_CHUNKS: usize = 8;

/// What an unpack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries written (files, directories, links).
    pub entries: u64,
    /// Device nodes and FIFOs that were skipped.
    pub skipped_special: u64,
    /// Bytes of tar consumed.
    pub tar_bytes: u64,
}

/// Result of receiving one export.
#[derive(Debug, Clone)]
pub(crate) struct ExportOutcome {
    pub stats: UnpackStats,
    /// Bytes received from the daemon.
    pub bytes: u64,
    /// From the first byte received to the last entry written.
    pub duration: Duration,
}

/// Make sure `dir` is a usable unpack target: create it, or accept it if it is an empty directory.
pub(crate) fn prepare_target(dir: &Path) -> Result<(), ExportError> {
    let target_err = |source| ExportError::Target {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(ExportError::TargetNotEmpty {
                    path: dir.to_path_buf(),
                });
            }
            if std::fs::read_dir(dir).map_err(target_err)?.next().is_some() {
                return Err(ExportError::TargetNotEmpty {
                    path: dir.to_path_buf(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(target_err)
        }
        Err(e) => Err(target_err(e)),
    }
}

/// The sending half handed to the session's FileSend service.
#[derive(Debug)]
pub(crate) struct ExportSink {
    tx: mpsc::Sender<Bytes>,
    received: Arc<AtomicU64>,
    first_byte: Arc<std::sync::OnceLock<Instant>>,
}

impl ExportSink {
    /// Queue one chunk; waits while the unpacker is behind. Fails when the unpacker stopped
    /// (it failed; its error is reported by [`Unpacker::finish`]).
    pub(crate) async fn send(&self, chunk: Bytes) -> Result<(), ()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.first_byte.get_or_init(Instant::now);
        self.received
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        self.tx.send(chunk).await.map_err(|_| ())
    }
}

/// The receiving half: a blocking task unpacking into the rootfs.
pub(crate) struct Unpacker {
    handle: JoinHandle<Result<UnpackStats, ExportError>>,
    received: Arc<AtomicU64>,
    first_byte: Arc<std::sync::OnceLock<Instant>>,
}

/// Start an unpacker for `dir` (which [`prepare_target`] accepted), stopping past `limit` bytes
/// of tar (see the module docs).
pub(crate) fn start(dir: PathBuf, limit: Option<u64>) -> (ExportSink, Unpacker) {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let received = Arc::new(AtomicU64::new(0));
    let first_byte = Arc::new(std::sync::OnceLock::new());
    let handle = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader {
            rx,
            current: Bytes::new(),
        };
        let stats = unpack_tar_limited(&mut reader, &dir, limit)?;
        // The archive stops at its end marker; drain the rest (padding) so the sender never
        // blocks on a full channel nobody reads.
        io::copy(&mut reader, &mut io::sink()).map_err(|source| ExportError::Unpack {
            path: dir.clone(),
            source,
        })?;
        Ok(stats)
    });
    (
        ExportSink {
            tx,
            received: received.clone(),
            first_byte: first_byte.clone(),
        },
        Unpacker {
            handle,
            received,
            first_byte,
        },
    )
}

impl Unpacker {
    /// Wait for the unpack to finish (all senders dropped) and report it.
    pub(crate) async fn finish(self) -> Result<ExportOutcome, ExportError> {
        let stats = self
            .handle
            .await
            .map_err(|e| ExportError::Task(e.to_string()))??;
        let bytes = self.received.load(Ordering::Relaxed);
        if bytes == 0 {
            return Err(ExportError::NothingReceived);
        }
        let duration = self
            .first_byte
            .get()
            .map(Instant::elapsed)
            .unwrap_or_default();
        Ok(ExportOutcome {
            stats,
            bytes,
            duration,
        })
    }
}

/// A blocking [`Read`] over chunks arriving on a tokio channel (use only on a blocking thread).
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Counts bytes read through it.
struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Unpack a tar stream into `dst` (an existing directory) without letting any entry escape it.
/// See the module documentation for the rules.
pub fn unpack_tar<R: Read>(reader: R, dst: &Path) -> Result<UnpackStats, ExportError> {
    unpack_tar_limited(reader, dst, None)
}

/// [`unpack_tar`], failing with [`ExportError::TooLarge`] before writing an entry that would take
/// the archive past `limit` bytes (headers and apparent file sizes).
pub fn unpack_tar_limited<R: Read>(
    reader: R,
    dst: &Path,
    limit: Option<u64>,
) -> Result<UnpackStats, ExportError> {
    let unpack_err = |source| ExportError::Unpack {
        path: dst.to_path_buf(),
        source,
    };
    let mut archive = tar::Archive::new(CountingReader {
        inner: reader,
        count: 0,
    });
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(false);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);

    let mut target = Target::new(dst)?;
    let mut stats = UnpackStats::default();
    // Directories are created on demand by their children; their own permissions and mtime are
    // applied at the end, deepest first.
    let mut directories = Vec::new();
    for entry in archive.entries().map_err(unpack_err)? {
        let mut entry = entry.map_err(unpack_err)?;
        if let Some(limit) = limit {
            // Bytes consumed so far (this entry's header included) plus its content.
            // (`Entry::size`, not the header field: past 8 GiB the size is in a PAX record.)
            let consumed = entry.raw_header_position() + 512;
            let end = consumed.saturating_add(entry.size());
            if end > limit {
                return Err(ExportError::TooLarge {
                    limit,
                    entry: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                    size: entry.size(),
                });
            }
        }
        let kind = entry.header().entry_type();
        if kind.is_block_special() || kind.is_character_special() || kind.is_fifo() {
            stats.skipped_special += 1;
            continue;
        }
        if kind.is_dir() {
            // Create it now (children and links may need it); mode and mtime come at the end.
            target.precreate_dir(&entry.path_bytes());
            directories.push(entry);
            continue;
        }
        target.unpack(&mut entry)?;
        stats.entries += 1;
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut dir in directories {
        target.unpack(&mut dir)?;
        stats.entries += 1;
    }
    stats.tar_bytes = archive.into_inner().count;
    Ok(stats)
}

/// The unpack target, with the set of directories known to be real directories inside it.
///
/// [`tar::Entry::unpack_in`] is safe but canonicalises the target and the entry's parent for
/// every entry (about 25 `readlink`s per file in a deep tree: half the unpack time of a
/// python image). The fast path skips that when the parent is a directory *this unpacker*
/// created or checked with `lstat` (not a symlink), component by component from the target:
/// no later entry can turn such a directory into a symlink (tar refuses to replace a directory
/// with a file or link), so nothing written below it can leave the target. Everything else
/// (hard links, whose target must be checked too, and paths below a symlink) goes through
/// `unpack_in`.
struct Target {
    root: PathBuf,
    verified: std::collections::HashSet<PathBuf>,
}

impl Target {
    fn new(dst: &Path) -> Result<Self, ExportError> {
        let mut verified = std::collections::HashSet::new();
        verified.insert(PathBuf::new());
        Ok(Self {
            root: dst.to_path_buf(),
            verified,
        })
    }

    fn unpack<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ExportError> {
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = match relative_path(&entry.path_bytes()) {
            Ok(Some(rel)) => rel,
            // Only `/` or `.`: the target itself.
            Ok(None) => return Ok(()),
            Err(reason) => {
                return Err(ExportError::UnsafeEntry {
                    entry: name,
                    reason: reason.to_owned(),
                });
            }
        };
        let fast = !entry.header().entry_type().is_hard_link()
            && rel
                .parent()
                .is_some_and(|parent| self.ensure_real_dir(parent).unwrap_or(false));
        let result = if fast {
            entry.unpack(self.root.join(&rel)).map(|_| true)
        } else {
            entry.unpack_in(&self.root)
        };
        match result {
            Ok(true) => {
                if entry.header().entry_type().is_dir() {
                    self.verified.insert(rel);
                }
                Ok(())
            }
            Ok(false) => Err(ExportError::UnsafeEntry {
                entry: name,
                reason: "path contains `..`".to_owned(),
            }),
            Err(e) if mentions_escape(&e) => Err(ExportError::UnsafeEntry {
                entry: name,
                reason: error_chain(&e),
            }),
            Err(source) => Err(ExportError::Unpack {
                path: self.root.join(&rel),
                source,
            }),
        }
    }

    /// Best-effort early creation of a directory entry; any problem is reported when the entry
    /// itself is unpacked.
    fn precreate_dir(&mut self, raw: &[u8]) {
        if let Ok(Some(rel)) = relative_path(raw) {
            let _ = self.ensure_real_dir(&rel);
        }
    }

    /// Make `rel` a real directory under the target (creating missing ones), checking every
    /// component with `lstat`. `Ok(false)`: some component is not a directory (e.g. a symlink);
    /// the caller must use the canonicalising path.
    fn ensure_real_dir(&mut self, rel: &Path) -> io::Result<bool> {
        if self.verified.contains(rel) {
            return Ok(true);
        }
        if let Some(parent) = rel.parent()
            && !self.ensure_real_dir(parent)?
        {
            return Ok(false);
        }
        let full = self.root.join(rel);
        match std::fs::symlink_metadata(&full) {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::create_dir(&full) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if !std::fs::symlink_metadata(&full)?.file_type().is_dir() {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        }
        self.verified.insert(rel.to_path_buf());
        Ok(true)
    }
}

/// The entry path relative to the target: leading `/` and `.` components dropped, `..` refused.
fn relative_path(raw: &[u8]) -> Result<Option<PathBuf>, &'static str> {
    use std::os::unix::ffi::OsStrExt;
    let mut rel = PathBuf::new();
    for part in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match part {
            std::path::Component::Prefix(_)
            | std::path::Component::RootDir
            | std::path::Component::CurDir => {}
            std::path::Component::ParentDir => return Err("path contains `..`"),
            std::path::Component::Normal(p) => rel.push(p),
        }
    }
    Ok((!rel.as_os_str().is_empty()).then_some(rel))
}

/// Whether tar refused an entry because it would land outside the target.
fn mentions_escape(e: &io::Error) -> bool {
    error_chain(e).contains("outside of destination")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_mtime(1_700_000_000);
        // set_path refuses `..`; write the raw name like a hostile producer would.
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        h
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = header(path, *kind, data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).expect("link name");
                h.set_cksum();
            }
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("finish")
    }

    #[test]
    fn unpacks_files_dirs_and_links() {
        let t = tempfile::tempdir().expect("tempdir");
        let tar = tar_with(&[
            ("etc/", tar::EntryType::Directory, b"", None),
            ("etc/hostname", tar::EntryType::Regular, b"box\n", None),
            ("bin/sh", tar::EntryType::Symlink, b"", Some("busybox")),
            ("dev/null", tar::EntryType::Char, b"", None),
        ]);
        let stats = unpack_tar(tar.as_slice(), t.path()).expect("unpack");
        assert_eq!(
            std::fs::read_to_string(t.path().join("etc/hostname")).expect("file"),
            "box\n"
        );
        assert_eq!(
            std::fs::read_link(t.path().join("bin/sh")).expect("link"),
            PathBuf::from("busybox")
        );
        assert!(!t.path().join("dev/null").exists());
        assert_eq!(stats.skipped_special, 1);
        assert_eq!(stats.entries, 3);
        // Headers and data of all four entries were read (the end marker may not be).
        assert!(stats.tar_bytes >= 4 * 512 + 512 && stats.tar_bytes <= tar.len() as u64);
    }

    #[test]
    fn refuses_parent_dir_entries() {
        let root = tempfile::tempdir().expect("tempdir");
        let dst = root.path().join("rootfs");
        std::fs::create_dir(&dst).expect("mkdir");
        let tar = tar_with(&[("../x", tar::EntryType::Regular, b"evil", None)]);
        let err = unpack_tar(tar.as_slice(), &dst).expect_err("must refuse");
        assert!(matches!(err, ExportError::UnsafeEntry { .. }), "{err}");
        assert!(!root.path().join("x").exists());
    }

    #[test]
    fn absolute_paths_land_inside() {
        let t = tempfile::tempdir().expect("tempdir");
        let tar = tar_with(&[("/abs", tar::EntryType::Regular, b"in", None)]);
        unpack_tar(tar.as_slice(), t.path()).expect("unpack");
        assert_eq!(
            std::fs::read_to_string(t.path().join("abs")).expect("file"),
            "in"
        );
    }

    #[test]
    fn refuses_writing_through_symlinked_parent() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        let dst = root.path().join("rootfs");
        std::fs::create_dir(&dst).expect("mkdir");
        let outside_s = outside.to_str().expect("utf8");
        let tar = tar_with(&[
            ("d", tar::EntryType::Symlink, b"", Some(outside_s)),
            ("d/file", tar::EntryType::Regular, b"evil", None),
        ]);
        let nested = tar_with(&[
            ("d", tar::EntryType::Symlink, b"", Some(outside_s)),
            ("d/sub/file", tar::EntryType::Regular, b"evil", None),
        ]);
        let dst2 = root.path().join("rootfs2");
        std::fs::create_dir(&dst2).expect("mkdir");
        let err2 = unpack_tar(nested.as_slice(), &dst2).expect_err("must refuse");
        assert!(matches!(err2, ExportError::UnsafeEntry { .. }), "{err2}");
        assert!(!outside.join("sub").exists());
        let err = unpack_tar(tar.as_slice(), &dst).expect_err("must refuse");
        assert!(matches!(err, ExportError::UnsafeEntry { .. }), "{err}");
        assert!(!outside.join("file").exists());
    }

    #[test]
    fn entries_below_an_inside_symlink_use_the_checked_path() {
        let t = tempfile::tempdir().expect("tempdir");
        let tar = tar_with(&[
            ("usr/lib/", tar::EntryType::Directory, b"", None),
            ("lib", tar::EntryType::Symlink, b"", Some("usr/lib")),
            ("lib/x", tar::EntryType::Regular, b"x", None),
            ("usr/lib/hard", tar::EntryType::Link, b"", Some("lib/x")),
        ]);
        unpack_tar(tar.as_slice(), t.path()).expect("unpack");
        assert_eq!(
            std::fs::read(t.path().join("usr/lib/x")).expect("file"),
            b"x"
        );
        assert_eq!(
            std::fs::read(t.path().join("usr/lib/hard")).expect("hard link"),
            b"x"
        );
    }

    #[test]
    fn a_limit_stops_an_entry_before_writing_it() {
        let t = tempfile::tempdir().expect("tempdir");
        let tar = tar_with(&[
            ("small", tar::EntryType::Regular, &[1u8; 1000], None),
            ("big", tar::EntryType::Regular, &[2u8; 5000], None),
        ]);
        let err = unpack_tar_limited(tar.as_slice(), t.path(), Some(4096)).expect_err("limit");
        match err {
            ExportError::TooLarge { limit, entry, size } => {
                assert_eq!((limit, entry.as_str(), size), (4096, "big", 5000));
            }
            other => panic!("{other}"),
        }
        assert!(t.path().join("small").exists());
        assert!(!t.path().join("big").exists(), "nothing of it was written");
        // A sparse giant is refused from its header alone: no data follows in this stream.
        let mut h = header("sparse", tar::EntryType::Regular, 256 << 30);
        h.set_cksum();
        let mut stream = h.as_bytes().to_vec();
        stream.extend_from_slice(&[0u8; 4096]);
        let t2 = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            unpack_tar_limited(stream.as_slice(), t2.path(), Some(1 << 30)),
            Err(ExportError::TooLarge { size, .. }) if size == 256 << 30
        ));
        unpack_tar_limited(tar.as_slice(), t.path(), Some(1 << 20)).expect("under the limit");
        // Past 8 GiB the size is in a PAX record (as BuildKit's exporter writes it).
        let mut pax = tar::Builder::new(Vec::new());
        pax.append_pax_extensions([("size", b"274877906944".as_slice())])
            .expect("pax");
        let mut h = header("giant", tar::EntryType::Regular, 0);
        h.set_cksum();
        pax.append(&h, std::io::empty()).expect("append");
        let stream = pax.into_inner().expect("finish");
        let t3 = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            unpack_tar_limited(stream.as_slice(), t3.path(), Some(1 << 30)),
            Err(ExportError::TooLarge { size, .. }) if size == 256 << 30
        ));
    }

    #[test]
    fn relative_path_rules() {
        assert_eq!(relative_path(b"/a/./b"), Ok(Some(PathBuf::from("a/b"))));
        assert_eq!(relative_path(b"./"), Ok(None));
        assert!(relative_path(b"a/../../b").is_err());
    }

    #[test]
    fn prepare_target_rules() {
        let t = tempfile::tempdir().expect("tempdir");
        let fresh = t.path().join("a/b");
        prepare_target(&fresh).expect("created");
        prepare_target(&fresh).expect("empty dir is fine");
        std::fs::write(fresh.join("f"), b"x").expect("write");
        assert!(matches!(
            prepare_target(&fresh),
            Err(ExportError::TargetNotEmpty { .. })
        ));
        assert!(matches!(
            prepare_target(&fresh.join("f")),
            Err(ExportError::TargetNotEmpty { .. })
        ));
    }

    #[tokio::test]
    async fn channel_unpacker_streams_chunks() {
        let t = tempfile::tempdir().expect("tempdir");
        let big = vec![7u8; 1 << 20];
        let tar = tar_with(&[("big", tar::EntryType::Regular, &big, None)]);
        let (sink, unpacker) = start(t.path().to_path_buf(), None);
        for chunk in tar.chunks(100_000) {
            sink.send(Bytes::copy_from_slice(chunk))
                .await
                .expect("send");
        }
        drop(sink);
        let out = unpacker.finish().await.expect("finish");
        assert_eq!(out.bytes, tar.len() as u64);
        assert_eq!(std::fs::read(t.path().join("big")).expect("file"), big);
    }
}
