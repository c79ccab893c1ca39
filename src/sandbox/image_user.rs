//! Resolving an image's `USER` (`name`, `uid`, `name:group`, `uid:gid`) to numeric ids the way
//! Docker does, reading the image's own /etc/passwd and /etc/group without following symlinks
//! (a hostile image can make them point at host files).

use std::path::Path;

use super::safe_read::{SafeReadError, read_beneath};

const MAX_DB_BYTES: u64 = 1 << 20;

/// The process identity inside the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessUser {
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Supplementary gids from /etc/group.
    pub additional_gids: Vec<u32>,
    /// Home directory from /etc/passwd, if the user is listed.
    pub home: Option<String>,
}

/// Why an image's USER cannot be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// A user name that the image's /etc/passwd does not list.
    #[error("USER {0:?}: no such user in the image's /etc/passwd")]
    UnknownUser(String),
    /// A group name that the image's /etc/group does not list.
    #[error("USER group {0:?}: no such group in the image's /etc/group")]
    UnknownGroup(String),
    /// The image's user database is not readable safely.
    #[error("image user database: {0}")]
    Database(#[from] SafeReadError),
}

fn read_db(rootfs: &Path, file: &str) -> Result<String, UserError> {
    match read_beneath(rootfs, file, MAX_DB_BYTES) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(SafeReadError::Missing(_)) => Ok(String::new()),
        Err(e) => Err(e.into()),
    }
}

/// Resolve `spec` (the image's USER; empty = root) against the image's databases.
pub fn resolve(rootfs: &Path, spec: &str) -> Result<ProcessUser, UserError> {
    let spec = spec.trim();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let passwd = read_db(rootfs, "etc/passwd")?;
    let entry = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && (f[0] == user_part || f[2] == user_part)).then(|| {
            (
                f[0].to_string(),
                f[2].parse::<u32>().ok(),
                f[3].parse::<u32>().ok(),
                f[5].to_string(),
            )
        })
    });
    let (name, uid, mut gid, home) = match (entry, user_part.parse::<u32>()) {
        (Some((name, Some(uid), gid, home)), _) => (Some(name), uid, gid.unwrap_or(0), Some(home)),
        (_, Ok(uid)) => (None, uid, 0, None),
        _ => return Err(UserError::UnknownUser(user_part.to_string())),
    };
    let group = read_db(rootfs, "etc/group")?;
    if let Some(g) = group_part {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3 && f[0] == g)
                        .then(|| f[2].parse::<u32>().ok())
                        .flatten()
                })
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        };
    }
    let mut additional_gids = Vec::new();
    if let (Some(name), None) = (&name, group_part) {
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 4
                && f[3].split(',').any(|m| m == name)
                && let Ok(g) = f[2].parse::<u32>()
                && g != gid
                && !additional_gids.contains(&g)
            {
                additional_gids.push(g);
            }
        }
    }
    Ok(ProcessUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\nstaff:x:50:app\napp:x:1001:\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn resolves_like_docker() {
        let r = rootfs();
        assert_eq!(resolve(r.path(), "").unwrap().uid, 0);
        let app = resolve(r.path(), "app").unwrap();
        assert_eq!(
            (app.uid, app.gid, app.additional_gids.clone()),
            (1000, 1001, vec![50])
        );
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        assert_eq!(resolve(r.path(), "1000").unwrap().gid, 1001);
        let numeric = resolve(r.path(), "4242").unwrap();
        assert_eq!((numeric.uid, numeric.gid), (4242, 0));
        assert_eq!(resolve(r.path(), "app:staff").unwrap().gid, 50);
        assert_eq!(resolve(r.path(), "1000:7").unwrap().gid, 7);
        assert!(matches!(
            resolve(r.path(), "nobody"),
            Err(UserError::UnknownUser(_))
        ));
        assert!(matches!(
            resolve(r.path(), "app:nogroup"),
            Err(UserError::UnknownGroup(_))
        ));
    }

    #[test]
    fn refuses_passwd_symlinked_to_the_host() {
        let r = rootfs();
        std::fs::remove_file(r.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.path().join("etc/passwd")).unwrap();
        assert!(matches!(
            resolve(r.path(), "root"),
            Err(UserError::Database(SafeReadError::Symlink(_)))
        ));
    }
}
