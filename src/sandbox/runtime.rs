//! One client for the OCI runtime CLIs perfbox supports — runc, crun and youki share the verbs
//! used here (`run`, `kill`, `delete`, `list`, each with a global `--root` state dir). Every
//! command is spawned the same way: stdin from /dev/null, `NOTIFY_SOCKET` removed (it only means
//! something to systemd), an explicit PATH, and — when perfbox itself runs as root — as the
//! unprivileged runtime user, so the runtime is always rootless.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// Which OCI runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// opencontainers/runc.
    Runc,
    /// containers/crun.
    Crun,
    /// youki-dev/youki.
    Youki,
}

impl RuntimeKind {
    /// Binary name.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Runc => "runc",
            RuntimeKind::Crun => "crun",
            RuntimeKind::Youki => "youki",
        }
    }

    /// Whether `run --keep` exists (keeps the cgroup after exit, so OOM counters can be read).
    pub fn supports_keep(self) -> bool {
        !matches!(self, RuntimeKind::Crun)
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "runc" => Ok(RuntimeKind::Runc),
            "crun" => Ok(RuntimeKind::Crun),
            "youki" => Ok(RuntimeKind::Youki),
            other => Err(format!(
                "unknown runtime {other:?}: expected runc, crun or youki"
            )),
        }
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors driving the runtime CLI.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The binary is not installed.
    #[error("OCI runtime {0} not found on PATH (run scripts/setup)")]
    NotFound(String),
    /// Spawning failed.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// Binary.
        binary: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A runtime command failed; its own words are kept.
    #[error("{binary} {verb} failed ({status}): {stderr}")]
    CommandFailed {
        /// Binary.
        binary: String,
        /// Verb.
        verb: String,
        /// Exit status.
        status: String,
        /// stderr, trimmed.
        stderr: String,
    },
}

const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An OCI runtime CLI.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Which one.
    pub kind: RuntimeKind,
    /// Absolute path of the binary.
    pub binary: PathBuf,
    /// Host uid/gid to run it as, when perfbox runs as root (None: as ourselves).
    pub run_as: Option<(u32, u32)>,
}

impl Runtime {
    /// Find `kind` on PATH (plus /usr/local/bin and /usr/sbin).
    pub fn locate(kind: RuntimeKind, run_as: Option<(u32, u32)>) -> Result<Self, RuntimeError> {
        let path = std::env::var("PATH").unwrap_or_default();
        let binary = path
            .split(':')
            .chain(PATH_ENV.split(':'))
            .map(|d| Path::new(d).join(kind.name()))
            .find(|p| p.is_file())
            .ok_or_else(|| RuntimeError::NotFound(kind.name().into()))?;
        Ok(Self {
            kind,
            binary,
            run_as,
        })
    }

    /// A command for `args`, with perfbox's spawning rules applied.
    pub fn command(&self, state_root: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(state_root).args(args);
        cmd.stdin(Stdio::null())
            .env_clear()
            .env("PATH", PATH_ENV)
            .env("XDG_RUNTIME_DIR", state_root)
            .env("HOME", state_root)
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.run_as {
            // Only root may switch; std also clears supplementary groups (setgroups([])).
            if nix::unistd::geteuid().is_root() {
                cmd.uid(uid).gid(gid);
            }
        }
        cmd
    }

    /// argv of `run` (foreground: the runtime's exit status is the container's).
    pub fn run_args<'a>(&self, bundle: &'a str, id: &'a str) -> Vec<&'a str> {
        let mut v = vec!["run", "--bundle", bundle];
        if self.kind.supports_keep() {
            v.push("--keep");
        }
        v.push(id);
        v
    }

    /// Start `run` with stdout and stderr piped.
    pub fn spawn_run(
        &self,
        state_root: &Path,
        bundle: &Path,
        id: &str,
    ) -> Result<Child, RuntimeError> {
        let bundle = bundle.to_string_lossy();
        let mut cmd = self.command(state_root, &self.run_args(&bundle, id));
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().map_err(|source| RuntimeError::Spawn {
            binary: self.kind.name().into(),
            source,
        })
    }

    async fn simple(&self, state_root: &Path, args: &[&str]) -> Result<String, RuntimeError> {
        let mut cmd = self.command(state_root, args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let fut = cmd.output();
        let out = tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .map_err(|_| RuntimeError::CommandFailed {
                binary: self.kind.name().into(),
                verb: args[0].into(),
                status: "timeout".into(),
                stderr: "no answer within 30 s".into(),
            })?
            .map_err(|source| RuntimeError::Spawn {
                binary: self.kind.name().into(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(RuntimeError::CommandFailed {
                binary: self.kind.name().into(),
                verb: args[0].into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// `kill <id> KILL`: the container's init dies, and with it its whole pid namespace (a
    /// stopped process included: SIGKILL needs no SIGCONT).
    pub async fn kill(&self, state_root: &Path, id: &str) -> Result<(), RuntimeError> {
        self.simple(state_root, &["kill", id, "KILL"])
            .await
            .map(|_| ())
    }

    /// `delete --force <id>`.
    pub async fn delete(&self, state_root: &Path, id: &str) -> Result<(), RuntimeError> {
        self.simple(state_root, &["delete", "--force", id])
            .await
            .map(|_| ())
    }

    /// `--version`, first line.
    pub async fn version(&self) -> Result<String, RuntimeError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let out = cmd.output().await.map_err(|source| RuntimeError::Spawn {
            binary: self.kind.name().into(),
            source,
        })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_pinned() {
        let runc = Runtime {
            kind: RuntimeKind::Runc,
            binary: "/usr/bin/runc".into(),
            run_as: None,
        };
        assert_eq!(
            runc.run_args("/b", "id1"),
            vec!["run", "--bundle", "/b", "--keep", "id1"]
        );
        let crun = Runtime {
            kind: RuntimeKind::Crun,
            binary: "/usr/bin/crun".into(),
            run_as: None,
        };
        assert_eq!(
            crun.run_args("/b", "id1"),
            vec!["run", "--bundle", "/b", "id1"]
        );
        let cmd = runc.command(Path::new("/s"), &["kill", "id1", "KILL"]);
        let argv: Vec<_> = cmd
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(argv, vec!["--root", "/s", "kill", "id1", "KILL"]);
        assert!("bogus".parse::<RuntimeKind>().is_err());
        assert_eq!("youki".parse::<RuntimeKind>(), Ok(RuntimeKind::Youki));
    }
}
