//! Reading a file that a job controls, from the host side, without trusting it: the path is
//! resolved strictly beneath a directory with no symlink followed at any component
//! (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), the final component is opened with
//! `O_NOFOLLOW | O_NONBLOCK` (a FIFO cannot make us wait), only a regular file is accepted, and
//! no more than a fixed number of bytes is ever read.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};

/// Why a job-controlled file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SafeReadError {
    /// Nothing at that path.
    #[error("{0} does not exist")]
    Missing(String),
    /// A symlink somewhere on the path (refused, never followed).
    #[error("{0} is or passes through a symlink (refused)")]
    Symlink(String),
    /// Exists but is not a regular file (directory, FIFO, socket, device).
    #[error("{path} is not a regular file (it is a {kind})")]
    NotRegular {
        /// Relative path.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// Larger than allowed; not read.
    #[error("{path} is {size} bytes, more than the {max} allowed (not read)")]
    TooBig {
        /// Relative path.
        path: String,
        /// Its size.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// Any other I/O error.
    #[error("cannot read {path}: {message}")]
    Io {
        /// Relative path.
        path: String,
        /// The OS error.
        message: String,
    },
}

/// Read `rel` (relative, resolved beneath `dir`) into memory, at most `max` bytes.
pub fn read_beneath(dir: &Path, rel: &str, max: u64) -> Result<Vec<u8>, SafeReadError> {
    let io = |e: std::io::Error| SafeReadError::Io {
        path: rel.to_string(),
        message: e.to_string(),
    };
    let dir = File::open(dir).map_err(io)?;
    let rel_trimmed = rel.trim_start_matches('/');
    let how = OpenHow::new()
        .flags(
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY,
        )
        .mode(Mode::empty())
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let fd = match openat2(dir.as_fd(), rel_trimmed, how) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => return Err(SafeReadError::Missing(rel.into())),
        Err(Errno::ELOOP) | Err(Errno::EXDEV) => return Err(SafeReadError::Symlink(rel.into())),
        Err(e) => return Err(io(e.into())),
    };
    let st = fstat(&fd).map_err(|e| io(e.into()))?;
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    if kind != SFlag::S_IFREG {
        let kind = match kind {
            SFlag::S_IFDIR => "directory",
            SFlag::S_IFIFO => "FIFO",
            SFlag::S_IFSOCK => "socket",
            SFlag::S_IFCHR => "character device",
            SFlag::S_IFBLK => "block device",
            _ => "special file",
        };
        return Err(SafeReadError::NotRegular {
            path: rel.into(),
            kind,
        });
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if size > max {
        return Err(SafeReadError::TooBig {
            path: rel.into(),
            size,
            max,
        });
    }
    let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // Bounded even if the file grows between fstat and read.
    File::from(fd)
        .take(max + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() as u64 > max {
        return Err(SafeReadError::TooBig {
            path: rel.into(),
            size: buf.len() as u64,
            max,
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn reads_regular_and_refuses_symlinks_fifos_dirs_and_big_files() {
        let d = tempfile::tempdir().unwrap();
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "host secret").unwrap();
        std::fs::write(d.path().join("ok"), "hello").unwrap();
        symlink(secret.path(), d.path().join("link")).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        symlink("/etc", d.path().join("etcdir")).unwrap();
        nix::unistd::mkfifo(&d.path().join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        std::fs::write(d.path().join("big"), vec![b'x'; 100]).unwrap();

        assert_eq!(read_beneath(d.path(), "ok", 10).unwrap(), b"hello");
        assert!(matches!(
            read_beneath(d.path(), "link", 10),
            Err(SafeReadError::Symlink(_))
        ));
        assert!(matches!(
            read_beneath(d.path(), "etcdir/passwd", 1 << 20),
            Err(SafeReadError::Symlink(_))
        ));
        assert!(matches!(
            read_beneath(d.path(), "../x", 10),
            Err(SafeReadError::Symlink(_)) | Err(SafeReadError::Io { .. })
        ));
        assert!(matches!(
            read_beneath(d.path(), "fifo", 10),
            Err(SafeReadError::NotRegular { kind: "FIFO", .. })
        ));
        assert!(matches!(
            read_beneath(d.path(), "sub", 10),
            Err(SafeReadError::NotRegular {
                kind: "directory",
                ..
            })
        ));
        assert!(matches!(
            read_beneath(d.path(), "big", 10),
            Err(SafeReadError::TooBig { size: 100, .. })
        ));
        assert!(matches!(
            read_beneath(d.path(), "none", 10),
            Err(SafeReadError::Missing(_))
        ));
    }
}
