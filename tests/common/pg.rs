//! A throwaway PostgreSQL server for tests: Debian's binaries (`postgresql` package), a fresh
//! cluster in a test dir, run as the unprivileged perfbox user, listening only on a free loopback
//! port (and a unix socket in its own dir), trust auth for that user. Stopped on drop.

use std::path::PathBuf;
use std::process::Command;

use super::{TestDir, as_perfbox, user};

pub struct Postgres {
    pub dir: TestDir,
    pub port: u16,
    bin: PathBuf,
}

/// The newest installed server's bin dir, or why there is none.
pub fn pg_bin() -> Result<PathBuf, String> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| "PostgreSQL is not installed (no /usr/lib/postgresql; setup installs Debian's postgresql)".to_string())?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| "no PostgreSQL server binaries under /usr/lib/postgresql".into())
}

impl Postgres {
    /// Start one, or say why it cannot start.
    pub fn start(tag: &str) -> Result<Postgres, String> {
        let bin = pg_bin()?;
        let dir = TestDir::new(tag);
        let ok = Command::new("chown")
            .args(["-R", user()])
            .arg(dir.path())
            .status();
        if !ok.map(|s| s.success()).unwrap_or(false) {
            return Err("cannot chown the test dir to the perfbox user".into());
        }
        let data = dir.path().join("data");
        let out = as_perfbox(&[
            bin.join("initdb").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-U",
            user(),
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        ])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let pg = Postgres {
            port: super::service::free_port(),
            dir,
            bin,
        };
        pg.ctl(&["start"])?;
        Ok(pg)
    }

    fn ctl(&self, what: &[&str]) -> Result<(), String> {
        let data = self.dir.path().join("data");
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log");
        let mut argv = vec![
            self.bin.join("pg_ctl").to_str().unwrap().to_owned(),
            "-D".into(),
            data.to_str().unwrap().into(),
            "-l".into(),
            log.to_str().unwrap().into(),
            "-o".into(),
            opts,
            "-w".into(),
            "-t".into(),
            "30".into(),
        ];
        argv.extend(what.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = as_perfbox(&refs)
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl {what:?} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        }
    }

    /// Restart the server (fast shutdown: open connections are cut).
    pub fn restart(&self) {
        self.ctl(&["restart", "-m", "fast"]).unwrap();
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{}@127.0.0.1:{}/{db}", user(), self.port)
    }

    /// Make a fresh database.
    pub fn create_db(&self, db: &str) {
        let out = as_perfbox(&[
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-d",
            "postgres",
            "-qc",
            &format!("CREATE DATABASE {db}"),
        ])
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop", "-m", "immediate"]);
    }
}
