//! Who the runtime runs as on the host, and how container ids map onto it: container root is the
//! perfbox user itself; container uids 1.. map onto its subordinate range from /etc/subuid (via the
//! setuid `newuidmap`/`newgidmap` helpers) when one exists, so that an image's `USER 1000` works.

use std::path::Path;

use oci_spec::runtime::{LinuxIdMapping, LinuxIdMappingBuilder};

/// A contiguous range of subordinate ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First host id.
    pub start: u32,
    /// Number of ids.
    pub count: u32,
}

/// The unprivileged host identity that runs the OCI runtime (and so owns every job's container).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    /// Host uid (container root maps to it).
    pub uid: u32,
    /// Host gid.
    pub gid: u32,
    /// User name (for /etc/subuid lookups).
    pub name: String,
    /// Subordinate uid range, if any and newuidmap exists.
    pub subuid: Option<IdRange>,
    /// Subordinate gid range, if any and newgidmap exists.
    pub subgid: Option<IdRange>,
}

/// Errors finding the runtime identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The named user does not exist.
    #[error("no such user {0:?} on this host (run scripts/setup)")]
    NoSuchUser(String),
    /// Refuse to run containers as host root.
    #[error("refusing to run containers as host root: configure an unprivileged runtime user")]
    Root,
    /// Lookup failure.
    #[error("user lookup failed: {0}")]
    Lookup(String),
}

impl HostIdentity {
    /// The identity of `name` (or of the current user when `None`), with its subordinate ranges.
    pub fn lookup(name: Option<&str>) -> Result<Self, IdentityError> {
        let user = match name {
            Some(n) => nix::unistd::User::from_name(n)
                .map_err(|e| IdentityError::Lookup(e.to_string()))?
                .ok_or_else(|| IdentityError::NoSuchUser(n.to_string()))?,
            None => nix::unistd::User::from_uid(nix::unistd::geteuid())
                .map_err(|e| IdentityError::Lookup(e.to_string()))?
                .ok_or_else(|| IdentityError::NoSuchUser(nix::unistd::geteuid().to_string()))?,
        };
        if user.uid.is_root() {
            return Err(IdentityError::Root);
        }
        let helper = |bin: &str| {
            ["/usr/bin", "/bin", "/usr/sbin"]
                .iter()
                .any(|d| Path::new(d).join(bin).exists())
        };
        let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
        let subuid = helper("newuidmap")
            .then(|| find_range(&read("/etc/subuid"), &user.name, user.uid.as_raw()))
            .flatten();
        let subgid = helper("newgidmap")
            .then(|| find_range(&read("/etc/subgid"), &user.name, user.uid.as_raw()))
            .flatten();
        Ok(Self {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            name: user.name,
            subuid,
            subgid,
        })
    }

    /// uid mappings: container 0 → `uid`, container 1.. → the subordinate range.
    pub fn uid_mappings(&self) -> Vec<LinuxIdMapping> {
        mappings(self.uid, self.subuid)
    }

    /// gid mappings: container 0 → `gid`, container 1.. → the subordinate range.
    pub fn gid_mappings(&self) -> Vec<LinuxIdMapping> {
        mappings(self.gid, self.subgid)
    }

    /// Highest container uid that has a host id.
    pub fn max_container_uid(&self) -> u32 {
        self.subuid.map_or(0, |r| r.count)
    }

    /// Highest container gid that has a host id.
    pub fn max_container_gid(&self) -> u32 {
        self.subgid.map_or(0, |r| r.count)
    }
}

fn mappings(own: u32, sub: Option<IdRange>) -> Vec<LinuxIdMapping> {
    let one = |container_id, host_id, size| {
        LinuxIdMappingBuilder::default()
            .container_id(container_id)
            .host_id(host_id)
            .size(size)
            .build()
            .expect("all fields set")
    };
    let mut v = vec![one(0u32, own, 1u32)];
    if let Some(r) = sub {
        v.push(one(1, r.start, r.count));
    }
    v
}

/// The first `name:start:count` (or `uid:start:count`) line for this user.
pub fn find_range(file: &str, name: &str, uid: u32) -> Option<IdRange> {
    file.lines().find_map(|line| {
        let mut parts = line.trim().split(':');
        let who = parts.next()?;
        let start = parts.next()?.parse().ok()?;
        let count = parts.next()?.parse().ok()?;
        (who == name || who == uid.to_string()).then_some(IdRange { start, count })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_subordinate_range_by_name_or_uid() {
        let f = "alice:100000:65536\nperfbox:165536:65536\n# junk\n";
        assert_eq!(
            find_range(f, "perfbox", 999),
            Some(IdRange {
                start: 165536,
                count: 65536
            })
        );
        assert_eq!(
            find_range("999:200000:10\n", "x", 999),
            Some(IdRange {
                start: 200000,
                count: 10
            })
        );
        assert_eq!(find_range(f, "bob", 5), None);
    }
}
