//! [`JobDir`]: the one place that knows a job directory's layout.
//!
//! `<state_dir>/jobs/<id>/` (the service's user's; the state dir above it is not world-readable
//! under systemd) holds what the submission brought
//! (`Dockerfile`, `build-options.json`), what the build wrote (`build.log`), and what the sandbox
//! writes there (`config.json`, the OCI spec the job ran with; `run.log`; `out/`, mounted at
//! `/data`; `runtime/`, the runtime's state during the run). Image root filesystems are not here:
//! they live in the shared image cache.

use std::path::{Path, PathBuf};

use super::BuildOptions;
use crate::sandbox::{OUT_DIR, RUN_LOG, SPEC_FILE};

/// The Dockerfile as submitted.
pub const DOCKERFILE: &str = "Dockerfile";
/// Build args and target, as submitted.
pub const BUILD_OPTIONS: &str = "build-options.json";
/// The build context archive, as submitted (tar, tar.gz or zip), when there was one.
pub const CONTEXT_ARCHIVE: &str = "context.archive";
/// Where the build unpacks it.
const CONTEXT_DIR: &str = "context";
/// The build's progress log.
const BUILD_LOG: &str = "build.log";

/// The files a shared store keeps of a job: what the submission brought (any node may run it),
/// then what its run left to show (any node may show them). Nothing else is ever written into a
/// job directory from the store.
pub const SUBMITTED: [&str; 3] = [DOCKERFILE, BUILD_OPTIONS, CONTEXT_ARCHIVE];
/// See [`SUBMITTED`].
pub const RESULTS: [&str; 3] = [BUILD_LOG, RUN_LOG, SPEC_FILE];

/// A job's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDir(PathBuf);

impl JobDir {
    /// The directory at `path` (nothing is created).
    pub fn new(path: PathBuf) -> Self {
        Self(path)
    }

    /// The directory itself (what the sandbox is given).
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Create it with the submission's Dockerfile, build options and context archive.
    pub fn create(
        &self,
        dockerfile: &[u8],
        options: &BuildOptions,
        context: Option<&[u8]>,
    ) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.0)?;
        for (name, content) in Self::submission(dockerfile, options, context)? {
            std::fs::write(self.0.join(name), content)?;
        }
        Ok(())
    }

    /// What a submission brings, as files (name, content).
    pub fn submission(
        dockerfile: &[u8],
        options: &BuildOptions,
        context: Option<&[u8]>,
    ) -> std::io::Result<Vec<(&'static str, Vec<u8>)>> {
        let options = serde_json::to_vec(options).map_err(std::io::Error::other)?;
        let mut files = vec![(DOCKERFILE, dockerfile.to_vec()), (BUILD_OPTIONS, options)];
        if let Some(c) = context {
            files.push((CONTEXT_ARCHIVE, c.to_vec()));
        }
        Ok(files)
    }

    /// The context archive as submitted, if there was one.
    pub fn context_archive(&self) -> Option<Vec<u8>> {
        std::fs::read(self.0.join(CONTEXT_ARCHIVE)).ok()
    }

    /// Where the build unpacks the context.
    pub fn context_dir(&self) -> PathBuf {
        self.0.join(CONTEXT_DIR)
    }

    /// Write files kept in a shared store into the directory (creating it): only the names of
    /// [`SUBMITTED`] and [`RESULTS`]; others are ignored.
    pub fn restore(&self, files: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.0)?;
        for (name, content) in files {
            if SUBMITTED.contains(&name.as_str()) || RESULTS.contains(&name.as_str()) {
                let tmp = self.0.join(format!(".{name}.restore"));
                std::fs::write(&tmp, content)?;
                std::fs::rename(&tmp, self.0.join(name))?;
            }
        }
        Ok(())
    }

    /// The files of [`RESULTS`] that exist, each at most `cap` bytes (its end, when longer:
    /// the end of a log says why a job ended).
    pub fn results(&self, cap: u64) -> Vec<(&'static str, Vec<u8>)> {
        use std::io::{Read, Seek, SeekFrom};
        RESULTS
            .iter()
            .filter_map(|name| {
                let mut f = std::fs::File::open(self.0.join(name)).ok()?;
                let len = f.metadata().ok()?.len();
                if len > cap {
                    f.seek(SeekFrom::Start(len - cap)).ok()?;
                }
                let mut buf = vec![];
                f.take(cap).read_to_end(&mut buf).ok()?;
                Some((*name, buf))
            })
            .collect()
    }

    /// The Dockerfile as submitted.
    pub fn dockerfile(&self) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.0.join(DOCKERFILE))
    }

    /// The build options as submitted (none for jobs made before they existed).
    pub fn build_options(&self) -> BuildOptions {
        std::fs::read(self.0.join(BUILD_OPTIONS))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The build log.
    pub fn build_log(&self) -> PathBuf {
        self.0.join(BUILD_LOG)
    }

    /// The run log (written by the sandbox).
    pub fn run_log(&self) -> PathBuf {
        self.0.join(RUN_LOG)
    }

    /// The OCI spec the job ran with (written by the sandbox).
    pub fn spec(&self) -> PathBuf {
        self.0.join(SPEC_FILE)
    }

    /// The job's `/data` (written by the job).
    pub fn out(&self) -> PathBuf {
        self.0.join(OUT_DIR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let dir = JobDir::new(t.path().join("jobs/7"));
        let mut options = BuildOptions::default();
        options.build_args.insert("A".into(), "1".into());
        dir.create(b"FROM busybox\n", &options, Some(b"archive"))
            .unwrap();
        assert_eq!(dir.context_archive().as_deref(), Some(&b"archive"[..]));
        assert_eq!(dir.dockerfile().unwrap(), b"FROM busybox\n");
        assert_eq!(dir.build_options(), options);
        assert_eq!(dir.build_log(), t.path().join("jobs/7/build.log"));
        assert_eq!(dir.run_log(), t.path().join("jobs/7/run.log"));
        assert_eq!(dir.spec(), t.path().join("jobs/7/config.json"));
        assert_eq!(dir.out(), t.path().join("jobs/7/out"));
        // A job from before build options existed.
        std::fs::remove_file(t.path().join("jobs/7/build-options.json")).unwrap();
        assert_eq!(dir.build_options(), BuildOptions::default());
    }
}
