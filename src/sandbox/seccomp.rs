//! The seccomp profile: shipped as data in `sandbox/seccomp.json` (default-deny allowlist with the
//! semantics of Docker's default profile, see `sandbox/README.md`) and loaded into the OCI spec.

use oci_spec::runtime::LinuxSeccomp;

/// The profile file shipped with perfbox.
pub const DEFAULT_PROFILE_JSON: &str = include_str!("../../sandbox/seccomp.json");

/// Largest profile accepted from a file (a profile is data read at startup: bound it).
pub const MAX_PROFILE_BYTES: usize = 256 * 1024;

/// Errors loading a seccomp profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile is larger than [`MAX_PROFILE_BYTES`].
    #[error("seccomp profile is {0} bytes, more than the {MAX_PROFILE_BYTES} allowed")]
    TooLarge(usize),
    /// Not an OCI `linux.seccomp` object.
    #[error("seccomp profile is not a valid OCI linux.seccomp object: {0}")]
    Invalid(#[from] serde_json::Error),
    /// The profile would allow everything by default.
    #[error("seccomp profile must deny by default, found {0:?}")]
    NotDefaultDeny(String),
}

/// Parse a profile and check that it is default-deny.
pub fn parse_profile(json: &str) -> Result<LinuxSeccomp, SeccompError> {
    if json.len() > MAX_PROFILE_BYTES {
        return Err(SeccompError::TooLarge(json.len()));
    }
    let profile: LinuxSeccomp = serde_json::from_str(json)?;
    let action = format!("{:?}", profile.default_action());
    if !matches!(
        profile.default_action(),
        oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
            | oci_spec::runtime::LinuxSeccompAction::ScmpActKill
            | oci_spec::runtime::LinuxSeccompAction::ScmpActKillProcess
            | oci_spec::runtime::LinuxSeccompAction::ScmpActKillThread
    ) {
        return Err(SeccompError::NotDefaultDeny(action));
    }
    Ok(profile)
}

/// The shipped profile.
pub fn default_profile() -> LinuxSeccomp {
    parse_profile(DEFAULT_PROFILE_JSON).expect("sandbox/seccomp.json is valid (tested)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(p: &LinuxSeccomp) -> Vec<String> {
        p.syscalls()
            .iter()
            .flatten()
            .filter(|s| {
                s.action() == oci_spec::runtime::LinuxSeccompAction::ScmpActAllow
                    && s.args().is_none()
            })
            .flat_map(|s| s.names().clone())
            .collect()
    }

    #[test]
    fn shipped_profile_is_default_deny_and_denies_escape_syscalls() {
        let p = default_profile();
        let allowed = allowed(&p);
        for s in ["read", "write", "execve", "openat", "wait4", "exit_group"] {
            assert!(allowed.iter().any(|a| a == s), "{s} must be allowed");
        }
        for s in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "pivot_root",
            "bpf",
            "ptrace",
            "keyctl",
            "kexec_load",
            "init_module",
            "reboot",
            "perf_event_open",
            "chroot",
            "open_by_handle_at",
            "userfaultfd",
            "process_vm_readv",
            "clone3",
        ] {
            assert!(!allowed.iter().any(|a| a == s), "{s} must not be allowed");
        }
    }

    #[test]
    fn rejects_allow_by_default_and_oversized_profiles() {
        let allow_all = r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#;
        assert!(matches!(
            parse_profile(allow_all),
            Err(SeccompError::NotDefaultDeny(_))
        ));
        let big = " ".repeat(MAX_PROFILE_BYTES + 1);
        assert!(matches!(
            parse_profile(&big),
            Err(SeccompError::TooLarge(_))
        ));
    }
}
