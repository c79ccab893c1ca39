//! A submission's build context: a tar, tar.gz or zip archive, unpacked safely into a directory
//! that BuildKit then reads through the build's session (the files a Dockerfile may `COPY`).
//!
//! Every archive is hostile. An entry is refused, and with it the whole submission, when its path
//! is absolute, climbs out with `..`, passes through a symbolic link the archive made, or names
//! the same path twice; when it is a device, a FIFO, a socket or a hard link; when it is a
//! symbolic link whose target leaves the tree. The sizes of regular files are counted as the
//! archive states them (apparent size, before anything is written) against the cap, and so is
//! the number of entries. Files are written with fresh permissions (0644, or 0755 when the
//! archive marks them executable), never with the archive's owners or special bits.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// Not a tar, tar.gz or zip archive, or a broken one.
    #[error("the context is not a readable tar, tar.gz or zip archive: {0}")]
    Unreadable(String),
    /// An entry the rules above refuse.
    #[error("context entry {path:?}: {why}")]
    Entry {
        /// The entry's path as the archive gives it.
        path: String,
        /// Which rule.
        why: &'static str,
    },
    /// Past a cap.
    #[error("the context is larger than allowed: {0}")]
    TooLarge(String),
    /// Writing the tree failed (the service's disk, not the archive).
    #[error("cannot write the context: {0}")]
    Io(#[from] std::io::Error),
}

/// How much a context may hold.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Apparent bytes of all regular files.
    pub bytes: u64,
    /// Entries (files, directories, links).
    pub entries: u64,
}

/// What was unpacked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Regular files.
    pub files: u64,
    /// Their apparent size.
    pub bytes: u64,
}

/// One entry as the formats give it.
enum Kind {
    Dir,
    File { executable: bool },
    Symlink(String),
    Refused(&'static str),
}

/// Unpack `archive` into `dest` (an empty directory that exists), under `caps`.
pub fn unpack(archive: &[u8], dest: &Path, caps: Caps) -> Result<Unpacked, ContextError> {
    read(archive, Some(dest), caps).map(|(u, _)| u)
}

/// Check `archive` against every rule without writing anything; with the content of a
/// `Dockerfile` at its root (at most 1 MiB), if it has one.
pub fn check(archive: &[u8], caps: Caps) -> Result<(Unpacked, Option<Vec<u8>>), ContextError> {
    read(archive, None, caps)
}

fn read(
    archive: &[u8],
    dest: Option<&Path>,
    caps: Caps,
) -> Result<(Unpacked, Option<Vec<u8>>), ContextError> {
    let mut w = Writer {
        dest,
        caps,
        seen: HashSet::new(),
        links: HashSet::new(),
        done: Unpacked::default(),
        entries: 0,
        dockerfile: None,
    };
    if archive.starts_with(b"PK\x03\x04") || archive.starts_with(b"PK\x05\x06") {
        unpack_zip(archive, &mut w)?;
    } else if archive.starts_with(&[0x1f, 0x8b]) {
        unpack_tar(flate2::read::GzDecoder::new(archive), &mut w)?;
    } else {
        unpack_tar(archive, &mut w)?;
    }
    Ok((w.done, w.dockerfile))
}

fn unreadable(e: impl std::fmt::Display) -> ContextError {
    ContextError::Unreadable(e.to_string())
}

fn unpack_tar<R: Read>(input: R, w: &mut Writer<'_>) -> Result<(), ContextError> {
    let mut archive = tar::Archive::new(input);
    let mut any = false;
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        any = true;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let header = entry.header();
        let kind = match header.entry_type() {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File {
                executable: header.mode().map_err(unreadable)? & 0o111 != 0,
            },
            tar::EntryType::Symlink => Kind::Symlink(
                entry
                    .link_name()
                    .map_err(unreadable)?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            tar::EntryType::Link => Kind::Refused("hard links are not accepted"),
            tar::EntryType::Char | tar::EntryType::Block => {
                Kind::Refused("device files are not accepted")
            }
            tar::EntryType::Fifo => Kind::Refused("FIFOs are not accepted"),
            // PAX and GNU long-name headers are read by the tar crate itself.
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            _ => Kind::Refused("this kind of entry is not accepted"),
        };
        let size = entry.size();
        w.entry(&raw, kind, size, &mut entry)?;
    }
    if !any {
        return Err(ContextError::Unreadable("the archive is empty".into()));
    }
    Ok(())
}

fn unpack_zip(archive: &[u8], w: &mut Writer<'_>) -> Result<(), ContextError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(archive)).map_err(unreadable)?;
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).map_err(unreadable)?;
        let raw = String::from_utf8_lossy(f.name_raw()).into_owned();
        let mode = f.unix_mode();
        let kind = if f.is_dir() {
            Kind::Dir
        } else if mode.is_some_and(|m| m & 0o170000 == 0o120000) {
            let mut target = String::new();
            f.read_to_string(&mut target).map_err(unreadable)?;
            Kind::Symlink(target)
        } else if mode.is_some_and(|m| m & 0o170000 != 0 && m & 0o170000 != 0o100000) {
            Kind::Refused("only files, directories and symbolic links are accepted")
        } else {
            Kind::File {
                executable: mode.is_some_and(|m| m & 0o111 != 0),
            }
        };
        let size = f.size();
        w.entry(&raw, kind, size, &mut f)?;
    }
    Ok(())
}

struct Writer<'a> {
    /// None: check only.
    dest: Option<&'a Path>,
    caps: Caps,
    seen: HashSet<PathBuf>,
    links: HashSet<PathBuf>,
    done: Unpacked,
    entries: u64,
    dockerfile: Option<Vec<u8>>,
}

impl Writer<'_> {
    fn entry(
        &mut self,
        raw: &str,
        kind: Kind,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), ContextError> {
        let refuse = |why| ContextError::Entry {
            path: raw.to_owned(),
            why,
        };
        if let Kind::Refused(why) = kind {
            return Err(refuse(why));
        }
        let rel = clean(raw).map_err(refuse)?;
        if rel.as_os_str().is_empty() {
            // "./" itself.
            return Ok(());
        }
        self.entries += 1;
        if self.entries > self.caps.entries {
            return Err(ContextError::TooLarge(format!(
                "more than {} entries",
                self.caps.entries
            )));
        }
        if rel.ancestors().skip(1).any(|a| self.links.contains(a)) {
            return Err(refuse("its path goes through a symbolic link"));
        }
        let dir_again = matches!(kind, Kind::Dir) && self.seen.contains(&rel);
        if !dir_again && !self.seen.insert(rel.clone()) {
            return Err(refuse("the archive holds this path twice"));
        }
        let path = self.dest.map(|d| d.join(&rel));
        if let Some(parent) = path.as_deref().and_then(Path::parent) {
            std::fs::create_dir_all(parent)?;
        }
        match kind {
            Kind::Dir => {
                if let (false, Some(path)) = (dir_again, &path) {
                    std::fs::create_dir_all(path)?;
                }
            }
            Kind::File { executable } => {
                self.done.bytes += size;
                if self.done.bytes > self.caps.bytes {
                    return Err(ContextError::TooLarge(format!(
                        "its files hold more than {} bytes",
                        self.caps.bytes
                    )));
                }
                let mut out: Box<dyn std::io::Write> = match &path {
                    Some(path) => {
                        use std::os::unix::fs::OpenOptionsExt;
                        Box::new(
                            std::fs::OpenOptions::new()
                                .write(true)
                                .create_new(true)
                                .mode(if executable { 0o755 } else { 0o644 })
                                .open(path)?,
                        )
                    }
                    None if rel == Path::new("Dockerfile") && size <= 1 << 20 => {
                        Box::new(Keep(self.dockerfile.insert(Vec::new())))
                    }
                    None => Box::new(std::io::sink()),
                };
                // Never more than the header said, whatever the stream holds.
                let copied = std::io::copy(&mut data.take(size), &mut out).map_err(unreadable)?;
                if copied != size {
                    return Err(ContextError::Unreadable(format!(
                        "{raw:?} is cut short ({copied} of {size} bytes)"
                    )));
                }
                self.done.files += 1;
            }
            Kind::Symlink(target) => {
                if !stays_inside(&rel, &target) {
                    return Err(refuse("a symbolic link that leaves the context"));
                }
                if let Some(path) = &path {
                    std::os::unix::fs::symlink(&target, path)?;
                }
                self.links.insert(rel);
            }
            Kind::Refused(_) => unreachable!("refused above"),
        }
        Ok(())
    }
}

/// A writer into a vector it borrows.
struct Keep<'a>(&'a mut Vec<u8>);

impl std::io::Write for Keep<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The relative path an entry names, or why it is refused.
fn clean(raw: &str) -> Result<PathBuf, &'static str> {
    if raw.contains('\0') {
        return Err("a NUL byte in the path");
    }
    let mut out = PathBuf::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("the path climbs out with .."),
            Component::RootDir | Component::Prefix(_) => return Err("an absolute path"),
        }
    }
    Ok(out)
}

/// Whether the symbolic link at `link` (relative to the root) pointing at `target` resolves
/// inside the root, judged on the text alone (nothing it passes through may be a link: the
/// writer refuses paths through links).
fn stays_inside(link: &Path, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for c in Path::new(target).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps {
        bytes: 1 << 20,
        entries: 100,
    };

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            // Raw names: set_path refuses the hostile ones we mean to send.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_plain_tree_unpacks_with_fresh_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let archive = tar_of(&[
            ("app/", tar::EntryType::Directory, b"", None),
            ("app/run.sh", tar::EntryType::Regular, b"echo hi\n", None),
            (
                "Dockerfile",
                tar::EntryType::Regular,
                b"FROM busybox\n",
                None,
            ),
            ("app/latest", tar::EntryType::Symlink, b"", Some("run.sh")),
        ]);
        let u = unpack(&archive, t.path(), CAPS).unwrap();
        assert_eq!(
            u,
            Unpacked {
                files: 2,
                bytes: 21
            }
        );
        assert_eq!(
            std::fs::read(t.path().join("app/run.sh")).unwrap(),
            b"echo hi\n"
        );
        let mode = std::fs::metadata(t.path().join("app/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert_eq!(
            std::fs::read_link(t.path().join("app/latest")).unwrap(),
            Path::new("run.sh")
        );
        // The same tree gzipped.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &archive).unwrap();
        let t2 = tempfile::tempdir().unwrap();
        assert_eq!(
            unpack(&gz.finish().unwrap(), t2.path(), CAPS)
                .unwrap()
                .files,
            2
        );
    }

    #[test]
    fn hostile_entries_are_refused() {
        use tar::EntryType as E;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (tar_of(&[("../escape", E::Regular, b"x", None)]), ".."),
            (
                tar_of(&[("/etc/passwd", E::Regular, b"x", None)]),
                "absolute",
            ),
            (tar_of(&[("a/../../b", E::Regular, b"x", None)]), ".."),
            (
                tar_of(&[("out", E::Symlink, b"", Some("../../etc"))]),
                "leaves",
            ),
            (
                tar_of(&[("abs", E::Symlink, b"", Some("/etc/shadow"))]),
                "leaves",
            ),
            (
                tar_of(&[
                    ("d", E::Symlink, b"", Some(".")),
                    ("d/x", E::Regular, b"x", None),
                ]),
                "through a symbolic link",
            ),
            (tar_of(&[("dev", E::Char, b"", None)]), "device"),
            (tar_of(&[("fifo", E::Fifo, b"", None)]), "FIFO"),
            (tar_of(&[("hard", E::Link, b"", Some("x"))]), "hard link"),
            (
                tar_of(&[("x", E::Regular, b"1", None), ("x", E::Regular, b"2", None)]),
                "twice",
            ),
        ];
        for (archive, want) in cases {
            let t = tempfile::tempdir().unwrap();
            let e = unpack(&archive, t.path(), CAPS).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        let t = tempfile::tempdir().unwrap();
        let e = unpack(b"this is not an archive at all", t.path(), CAPS).unwrap_err();
        assert!(matches!(e, ContextError::Unreadable(_)), "{e}");
    }

    #[test]
    fn caps_count_apparent_sizes_before_writing() {
        let t = tempfile::tempdir().unwrap();
        let big = vec![0u8; 4096];
        let archive = tar_of(&[("a", tar::EntryType::Regular, &big, None)]);
        let small = Caps {
            bytes: 4095,
            entries: 10,
        };
        assert!(matches!(
            unpack(&archive, t.path(), small),
            Err(ContextError::TooLarge(_))
        ));
        let few = Caps {
            bytes: 1 << 20,
            entries: 1,
        };
        let two = tar_of(&[
            ("a", tar::EntryType::Regular, b"", None),
            ("b", tar::EntryType::Regular, b"", None),
        ]);
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            unpack(&two, t.path(), few),
            Err(ContextError::TooLarge(_))
        ));
    }

    #[test]
    fn zip_archives_unpack_and_refuse_the_same_way() {
        use std::io::Write;
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
        z.start_file("model/weights.bin", opts).unwrap();
        z.write_all(b"0123").unwrap();
        z.start_file("Dockerfile", opts).unwrap();
        z.write_all(b"FROM busybox\n").unwrap();
        let archive = z.finish().unwrap().into_inner();
        let t = tempfile::tempdir().unwrap();
        assert_eq!(unpack(&archive, t.path(), CAPS).unwrap().files, 2);
        assert_eq!(
            std::fs::read(t.path().join("model/weights.bin")).unwrap(),
            b"0123"
        );
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        z.start_file("../evil", opts).unwrap();
        z.write_all(b"x").unwrap();
        let archive = z.finish().unwrap().into_inner();
        let t = tempfile::tempdir().unwrap();
        assert!(
            unpack(&archive, t.path(), CAPS)
                .unwrap_err()
                .to_string()
                .contains("..")
        );
    }
}
