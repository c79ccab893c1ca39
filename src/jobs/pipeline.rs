//! One job's work, in order:
//!
//! 1. **the image** ([`JobService::image`]): from the image cache when an identical Dockerfile of
//!    the same cache scope was built before (owner scope only), else built with BuildKit under
//!    the build-side isolation (source policy, cache scope, the build's own cgroup, caps on what
//!    it writes and exports, the build timeout, the free-disk floor); an exported root filesystem
//!    goes into the image cache, or, when the cache already holds it, the export is skipped. The
//!    build slot is given back as soon as the image is there (or the build failed);
//! 2. **the run** ([`JobService::run_image`]): after a run slot, in the sandbox;
//! 3. **the outcome** ([`super::outcome`]).
//!
//! Every phase returns the job's ending on failure ([`Ending`]); the pipeline has one exit per
//! phase. Cancellation is a token the worker registered: it stops the build (dropping the build
//! future cancels the solve) or kills the container.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::outcome::{RunFacts, outcome};
use super::service::JobService;
use super::worker::Ending;
use super::{BuildCgroupRecord, BuildRecord, JobDir, JobId, JobRecord, JobStatus, Patch, images};
use crate::buildkit::{
    BuildError, BuildLog, BuildNetwork, BuildRequest, BuildScope, BuiltImage, ExportFilter, FileLog,
};
use crate::config::{BuildNetworkSetting, CacheScope};
use crate::image::ImageConfig;
use crate::sandbox::build_cgroup::{BuildCgroup, BuildCgroups, BuildLimits};
use crate::sandbox::build_writes::BuildWrites;
use crate::sandbox::{Prepared, RunRequest};

/// The frontend every build runs with.
pub(super) const FRONTEND: &str =
    "dockerfile.v0 (BuildKit's built-in Dockerfile frontend; # syntax= directives are ignored)";

/// An image ready to run, and what to record about it.
struct Image {
    config: ImageConfig,
    lease: images::Lease,
    patch: Patch,
}

/// What a build writes to: a staging directory for the export, and the slot where a root
/// filesystem the cache already held is leased instead.
struct Staged {
    staging: Staging,
    reused: Arc<Mutex<Option<images::Lease>>>,
}

/// A directory an export is unpacked into, removed unless it was handed to the image cache.
struct Staging(Option<PathBuf>);

impl Staging {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// The cache took it (moved it away): nothing to remove.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

impl JobService {
    /// One claimed job: its image, its run, its outcome. Returns the final status and what to
    /// record with it.
    pub(super) async fn pipeline(
        &self,
        rec: &JobRecord,
        cancel: &CancellationToken,
    ) -> (JobStatus, Patch) {
        let dir = self.job_dir(rec.id);
        let mut build = None;
        let image = self.image(rec, &dir, cancel, &mut build).await;
        // The build is over either way: its slot goes to the next job, and the unpacked context
        // (if any) its disk space (the archive stays with the job).
        self.release_build_slot(rec.id);
        let _ = std::fs::remove_dir_all(dir.context_dir());
        let build = build.and_then(|b| serde_json::to_value(b).ok());
        let (status, mut patch) = match image {
            Ok(image) => {
                let owner = rec.submitter.clone().or_else(|| rec.owner.clone());
                self.run_image(
                    rec.id,
                    owner.as_deref().unwrap_or(""),
                    &dir,
                    image,
                    build.clone(),
                    cancel,
                )
                .await
            }
            Err((status, error)) => (status, Patch::default().with_error(error)),
        };
        patch.build = build;
        (status, patch)
    }

    /// Phase 1: the job's image. `record` receives what the build ran with, as soon as it is
    /// known.
    async fn image(
        &self,
        rec: &JobRecord,
        dir: &JobDir,
        cancel: &CancellationToken,
        record: &mut Option<BuildRecord>,
    ) -> Result<Image, Ending> {
        let failed = |what: &str| {
            let what = what.to_owned();
            move |e: String| (JobStatus::BuildFailed, format!("{what}: {e}"))
        };
        let dockerfile = dir
            .dockerfile()
            .map_err(|e| failed("cannot read the stored Dockerfile")(e.to_string()))?;
        let log: Arc<dyn BuildLog> = Arc::new(
            FileLog::append(&dir.build_log())
                .map_err(|e| failed("cannot create build.log")(e.to_string()))?,
        );
        let options = dir.build_options();
        let scope = self.scope_tag(rec);
        let cgroup = self
            .build_cgroup(&scope)
            .map_err(failed("cannot prepare the build's cgroup"))?;
        // The submission's own files, unpacked again here (checked at submission; checked
        // again, since a shared store may hand them over from another node).
        let context = self
            .unpack_context(dir)
            .map_err(failed("the build context"))?;
        *record = Some(self.build_record(&scope, cgroup.as_deref(), context.is_some()));
        let started = Instant::now();
        let sha = hex::encode(Sha256::digest(&dockerfile));
        // An identical Dockerfile of the same scope (owner scope only: with the job scope
        // nothing is shared) reuses its image without a build.
        let alias_key = (self.inner.cfg.build.cache_scope == CacheScope::Owner
            && options.build_args.is_empty()
            && options.target.is_none()
            && context.is_none())
        .then(|| hex::encode(Sha256::digest(format!("{scope}\n{sha}").as_bytes())));
        let image = match self.cached_image(alias_key.as_deref(), &log) {
            Some(image) => image,
            None => {
                let (mut req, staged) = self.build_request(dockerfile, options, &scope, cancel)?;
                req.context_dir = context.clone();
                req.cgroup_parent = cgroup.as_ref().map(|cg| cg.frontend_parent().to_owned());
                let built = self.build(req, &log, cgroup.as_deref()).await;
                if let (
                    Some(cg),
                    Some(BuildRecord {
                        cgroup: BuildCgroupRecord::Own { used, .. },
                        ..
                    }),
                ) = (&cgroup, record.as_mut())
                {
                    // Evidence that the daemon ran RUN steps in the build's cgroup.
                    *used = cg.used();
                }
                drop(cgroup);
                self.keep_image(built?, staged, &sha, alias_key.as_deref())?
            }
        };
        self.inner.metrics.observe("build", started.elapsed());
        Ok(image)
    }

    /// The image an identical Dockerfile built before, from the image cache.
    fn cached_image(&self, alias_key: Option<&str>, log: &Arc<dyn BuildLog>) -> Option<Image> {
        let (alias, lease) = self.inner.images.lookup_alias(alias_key?)?;
        log.line(&format!(
            "perfbox: an identical Dockerfile was built before; reusing its cached image (rootfs {}, config {}) without calling BuildKit",
            alias.rootfs_key,
            alias.config_digest.as_deref().unwrap_or("-")
        ));
        Some(Image {
            config: alias.config,
            lease,
            patch: Patch {
                image_digest: alias.config_digest,
                image_cache: Some("hit".into()),
                ..Default::default()
            },
        })
    }

    /// The build of `dockerfile` in `scope`, with every isolation setting of the configuration,
    /// unpacked into a fresh staging directory of the image cache. After the solve and before
    /// the export, a root filesystem the cache already holds is leased instead of exported.
    fn build_request(
        &self,
        dockerfile: Vec<u8>,
        options: super::BuildOptions,
        scope: &str,
        cancel: &CancellationToken,
    ) -> Result<(BuildRequest, Staged), Ending> {
        let cfg = &self.inner.cfg;
        let staging = Staging(Some(self.inner.images.staging_dir()));
        let mut req = BuildRequest::new(dockerfile, staging.path().to_path_buf());
        req.network = match cfg.build_network {
            BuildNetworkSetting::None => BuildNetwork::None,
            BuildNetworkSetting::Isolated => BuildNetwork::Sandbox,
        };
        req.cancel = cancel.child_token();
        req.build_args = options.build_args;
        req.target = options.target;
        req.source_policy = self.inner.policy.clone();
        req.scope =
            Some(BuildScope::new(scope).map_err(|e| (JobStatus::BuildFailed, e.to_string()))?);
        req.max_image_bytes = Some(cfg.build.max_image_bytes);
        let reused: Staged = Staged {
            staging,
            reused: Arc::new(Mutex::new(None)),
        };
        let (cache, slot) = (self.inner.images.clone(), reused.reused.clone());
        req.skip_export = Some(ExportFilter(Arc::new(move |key| match cache.lease(key) {
            Some(lease) => {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
                true
            }
            None => false,
        })));
        Ok((req, reused))
    }

    /// A built image into the image cache (or the cached root filesystem it matched), and its
    /// alias when its scope may reuse it.
    fn keep_image(
        &self,
        built: BuiltImage,
        staged: Staged,
        sha: &str,
        alias_key: Option<&str>,
    ) -> Result<Image, Ending> {
        let reused = staged
            .reused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (lease, source) = match reused {
            Some(lease) if !built.exported => (lease, "rootfs-hit"),
            _ => {
                let key = built
                    .rootfs_key
                    .clone()
                    .unwrap_or_else(|| format!("df-{sha}"));
                let lease = self
                    .inner
                    .images
                    .insert(&key, staged.staging.path(), built.export_bytes)
                    .map_err(|e| {
                        (
                            JobStatus::BuildFailed,
                            format!("cannot store the built image: {e}"),
                        )
                    })?;
                staged.staging.keep();
                (lease, "miss")
            }
        };
        if let Some(key) = alias_key {
            self.inner.images.set_alias(
                key,
                &images::Alias {
                    rootfs_key: lease.key().to_string(),
                    config: built.config.clone(),
                    config_digest: built.config_digest.clone(),
                },
            );
        }
        Ok(Image {
            config: built.config,
            lease,
            patch: Patch {
                image_digest: built.config_digest,
                cached_steps: Some(built.cached_steps as i64),
                total_steps: Some(built.total_steps as i64),
                image_cache: Some(source.into()),
                ..Default::default()
            },
        })
    }

    /// The BuildKit build, bounded by the build timeout, the free-disk floor, and what its RUN
    /// steps may write.
    async fn build(
        &self,
        req: BuildRequest,
        log: &Arc<dyn BuildLog>,
        cgroup: Option<&BuildCgroup>,
    ) -> Result<BuiltImage, Ending> {
        let cfg = &self.inner.cfg;
        let scope = req.scope.clone();
        // A RUN step can write until the disk is full: watch the free space where BuildKit and
        // the image cache write, and stop the build before the host runs out.
        let watched = self.disk_watch_paths();
        if let Some(low) = low_disk(&watched, cfg.min_free_disk_bytes) {
            return Err((JobStatus::BuildFailed, format!("not started: {low}")));
        }
        // What the RUN steps write to BuildKit's disk, sampled while they run: the build is
        // stopped past max_image_bytes / max_image_files, long before the disk floor.
        let writes = async {
            match (cgroup, &self.inner.exe) {
                (Some(cg), Some(exe)) => {
                    let w = BuildWrites::new(cg.procs_dir(), exe.clone());
                    watch_writes(w, cfg.build.max_image_bytes, cfg.build.max_image_files).await
                }
                _ => std::future::pending().await,
            }
        };
        let timeout = Duration::from_secs(cfg.build_timeout_secs);
        let stopped = tokio::select! {
            r = tokio::time::timeout(timeout, self.inner.builder.build_image(req, log.clone())) => {
                match r {
                    Ok(Ok(built)) => return Ok(built),
                    Ok(Err(BuildError::Cancelled)) => {
                        return Err((JobStatus::Cancelled, "cancelled by request during the build".into()));
                    }
                    Ok(Err(e)) => {
                        log.line(&format!("perfbox: build failed: {e}"));
                        return Err((JobStatus::BuildFailed, e.to_string()));
                    }
                    Err(_) => {
                        log.line(&format!("perfbox: build exceeded {} s; cancelled", cfg.build_timeout_secs));
                        return Err((
                            JobStatus::TimedOut,
                            format!("the build exceeded its {} s limit and was cancelled", cfg.build_timeout_secs),
                        ));
                    }
                }
            }
            low = disk_guard(watched, cfg.min_free_disk_bytes) => low,
            over = writes => over,
        };
        // Stopped for the disk's sake: the stopped step's snapshot stays in BuildKit's cache, so
        // give the space back.
        log.line(&format!("perfbox: build stopped: {stopped}"));
        match self.inner.builder.prune(scope.as_ref()).await {
            Ok(freed) => log.line(&format!(
                "perfbox: pruned {freed} bytes of unused BuildKit cache"
            )),
            Err(e) => log.line(&format!("perfbox: could not prune BuildKit's cache: {e}")),
        }
        Err((
            JobStatus::BuildFailed,
            format!("the build was stopped: {stopped}"),
        ))
    }

    /// Phases 2 and 3: wait for one of the owner's run slots (`quotas.runs_per_owner`), then
    /// for a run slot, run the image, and map what happened to the job's end.
    async fn run_image(
        &self,
        id: JobId,
        owner: &str,
        dir: &JobDir,
        image: Image,
        build: Option<serde_json::Value>,
        cancel: &CancellationToken,
    ) -> (JobStatus, Patch) {
        let ending = |status, error: String| (status, Patch::default().with_error(error));
        let owner_permit = tokio::select! {
            p = self.inner.owner_runs.acquire(owner) => p,
            _ = cancel.cancelled() => {
                return ending(JobStatus::Cancelled, "cancelled by request before the run".into());
            }
        };
        let run_permit = tokio::select! {
            p = self.inner.run_slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return ending(JobStatus::Interrupted, "perfbox is shutting down".into()),
            },
            _ = cancel.cancelled() => {
                return ending(JobStatus::Cancelled, "cancelled by request before the run".into());
            }
        };
        // What the build ran with is known now: visible while the job runs, not only at its end.
        let mut running = image.patch;
        running.build = build;
        running.holder = self.holder(id);
        let recorded = self
            .write_through(id, "the run's start", || {
                self.inner
                    .store
                    .transition(id, JobStatus::Running, running.clone())
            })
            .await;
        if let Err(e) = recorded {
            return ending(
                JobStatus::Interrupted,
                format!("cannot record the run: {e}"),
            );
        }
        let started = Instant::now();
        // A second attempt, once, when the runtime failed before the job's process existed: a
        // new container (and spec, whose digest replaces the first one's in the record).
        let mut retried = false;
        let report = loop {
            let prepared = match self
                .prepare_run(id, dir, image.lease.rootfs(), &image.config, cancel)
                .await
            {
                Ok(p) => p,
                Err((status, error)) => return ending(status, error),
            };
            let report = self
                .inner
                .runner
                .start(prepared, cancel.child_token())
                .await;
            if retried
                || cancel.is_cancelled()
                || !matches!(&report, Ok(r) if r.runtime_failed_before_start())
            {
                break report;
            }
            tracing::warn!(job = %id, "the runtime failed in its own setup, before the job started; running it once more");
            retried = true;
        };
        drop(run_permit);
        drop(owner_permit);
        drop(image.lease);
        self.inner.metrics.observe("run", started.elapsed());
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                return ending(
                    JobStatus::RunFailed,
                    format!("the sandbox could not run the image: {e}"),
                );
            }
        };
        let (status, mut patch) = outcome(&RunFacts {
            end: &report.end,
            oom_killed: report.oom_killed,
            perf: &report.perf,
            log_tail: &report.log_tail,
            memory_limit: self.inner.runner.memory_limit(),
        });
        // runtime, cgroup and limits were recorded when the spec was written (prepare_run).
        patch.oom_killed = Some(report.oom_killed);
        patch.usage = serde_json::to_value(&report.usage).ok();
        self.inner.metrics.observe_usage(&report.usage);
        (status, patch)
    }

    /// Phase 2's start: write the run's spec, then record its digest, the runtime and the limits
    /// before anything runs (an audit of a run that never ends, as after a crash, has them).
    async fn prepare_run(
        &self,
        id: JobId,
        dir: &JobDir,
        rootfs: &std::path::Path,
        config: &ImageConfig,
        cancel: &CancellationToken,
    ) -> Result<Prepared, Ending> {
        let container_id = format!(
            "perfbox-{id}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        // The dataset it asked for, by name, from this node's config (checked at submission;
        // a node configured otherwise fails the job rather than run it without).
        let dataset = dir.build_options().dataset;
        let input = match &dataset {
            None => None,
            Some(name) => match self.inner.cfg.dataset(name) {
                Some(d) => Some(d.path.clone()),
                None => {
                    return Err((
                        JobStatus::RunFailed,
                        format!("dataset {name:?} is not configured on this node"),
                    ));
                }
            },
        };
        let prepared = self
            .inner
            .runner
            .prepare(RunRequest {
                job_dir: dir.path(),
                rootfs,
                image: config,
                container_id: &container_id,
                limits: None,
                input: input.as_deref(),
                cancel: cancel.child_token(),
            })
            .await
            .map_err(|e| {
                (
                    JobStatus::RunFailed,
                    format!("the sandbox could not prepare the run: {e}"),
                )
            })?;
        let sandbox = Patch {
            spec_sha256: Some(prepared.spec_sha256.clone()),
            runtime_version: Some(prepared.runtime_version.clone()),
            runtime: Some(prepared.runtime.to_string()),
            cgroup: Some(prepared.cgroup_version.to_owned()),
            limits: serde_json::to_value(&prepared.applied).ok(),
            run_dir: std::path::absolute(dir.path())
                .ok()
                .map(|p| p.display().to_string()),
            dataset,
            holder: self.holder(id),
            ..Patch::default()
        };
        self.write_through(id, "the run's spec", || {
            self.inner
                .store
                .annotate(id, JobStatus::Running, sandbox.clone())
        })
        .await
        .map_err(|e| {
            (
                JobStatus::Interrupted,
                format!("cannot record the run's spec: {e}"),
            )
        })?;
        Ok(prepared)
    }

    /// The build scope tag of a job: its own, or its owner's ([`CacheScope`]).
    ///
    /// The tag ends with this service's instance id: services sharing one build daemon (and its
    /// cgroup parent) number their jobs independently, and must never share a scope.
    fn scope_tag(&self, rec: &JobRecord) -> String {
        let instance = &self.inner.instance;
        match self.inner.cfg.build.cache_scope {
            CacheScope::Job => format!("job-{}-{instance}", rec.id),
            CacheScope::Owner => {
                let who = rec.submitter.as_deref().unwrap_or("anonymous");
                let who = &hex::encode(Sha256::digest(who.as_bytes()))[..16];
                format!("owner-{who}-{instance}")
            }
        }
    }

    /// The job's context archive, if it brought one, unpacked into `<job>/context` (afresh).
    fn unpack_context(&self, dir: &JobDir) -> Result<Option<PathBuf>, String> {
        let Some(archive) = dir.context_archive() else {
            return Ok(None);
        };
        let target = dir.context_dir();
        let _ = std::fs::remove_dir_all(&target);
        std::fs::create_dir_all(&target).map_err(|e| e.to_string())?;
        super::context::unpack(&archive, &target, self.inner.cfg.context_caps())
            .map_err(|e| e.to_string())?;
        Ok(Some(target))
    }

    /// What a build in `scope` runs with, for its record.
    fn build_record(
        &self,
        scope: &str,
        cgroup: Option<&BuildCgroup>,
        context: bool,
    ) -> BuildRecord {
        let cfg = &self.inner.cfg;
        let policy = &if context {
            self.inner.policy.clone().with_context()
        } else {
            self.inner.policy.clone()
        };
        BuildRecord {
            context,
            scope: scope.to_owned(),
            cache_scope: cfg.build.cache_scope,
            network: cfg.build_network,
            frontend: FRONTEND,
            entitlements: crate::buildkit::ENTITLEMENTS
                .iter()
                .map(|e| (*e).to_owned())
                .collect(),
            source_policy: policy.rules_text(),
            registries: policy.registries().to_vec(),
            allowed_remote_sources: policy
                .remote_sources()
                .iter()
                .map(|r| r.pattern().to_owned())
                .collect(),
            max_image_bytes: cfg.build.max_image_bytes,
            cgroup: match (cgroup, &self.inner.build_cgroups) {
                (Some(cg), _) => BuildCgroupRecord::Own {
                    path: format!("/{}", cg.frontend_parent()),
                    limits: cg.limits(),
                    used: false,
                },
                (None, BuildCgroups::Unavailable { reason }) => BuildCgroupRecord::Shared {
                    shared_with_daemon: reason.clone(),
                },
                (None, _) => BuildCgroupRecord::Shared {
                    shared_with_daemon: "no cgroup was made for this build".into(),
                },
            },
        }
    }

    /// The cgroup for a build in `scope` (shared by the concurrent builds of one scope), if the
    /// host gives builds cgroups of their own. The last build to give it back removes it.
    fn build_cgroup(&self, scope: &str) -> Result<Option<CgroupLease>, String> {
        let mut live = self
            .inner
            .live_build_cgroups
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((cg, users)) = live.get_mut(scope) {
            *users += 1;
            return Ok(Some(CgroupLease {
                svc: self.clone(),
                scope: scope.to_owned(),
                cg: Some(cg.clone()),
            }));
        }
        let limits = BuildLimits {
            memory_bytes: self.inner.cfg.build.memory_bytes,
            pids: self.inner.cfg.build.pids,
        };
        match self.inner.build_cgroups.create(scope, limits) {
            Ok(Some(cg)) => {
                let cg = Arc::new(cg);
                live.insert(scope.to_owned(), (cg.clone(), 1));
                Ok(Some(CgroupLease {
                    svc: self.clone(),
                    scope: scope.to_owned(),
                    cg: Some(cg),
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Filesystems a build fills: BuildKit's root (when local) and perfbox's state dir.
    fn disk_watch_paths(&self) -> Vec<PathBuf> {
        let mut v = vec![self.inner.cfg.state_dir.clone()];
        if let Some(root) = &self.inner.cfg.buildkit_root {
            v.push(root.clone());
        }
        v
    }
}

/// A build's use of its scope's cgroup; the last one dropped removes the cgroup, under the lock
/// that [`JobService::build_cgroup`] takes.
struct CgroupLease {
    svc: JobService,
    scope: String,
    cg: Option<Arc<BuildCgroup>>,
}

impl std::ops::Deref for CgroupLease {
    type Target = BuildCgroup;

    fn deref(&self) -> &BuildCgroup {
        self.cg.as_deref().expect("held until dropped")
    }
}

impl Drop for CgroupLease {
    fn drop(&mut self) {
        let mut live = self
            .svc
            .inner
            .live_build_cgroups
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let last = match live.get_mut(&self.scope) {
            Some((_, users)) => {
                *users -= 1;
                *users == 0
            }
            None => false,
        };
        if last {
            live.remove(&self.scope);
        }
        // The last Arc goes here, with the lock held: BuildCgroup's Drop removes it.
        self.cg = None;
    }
}

impl Patch {
    /// This patch with `error` set.
    pub(super) fn with_error(mut self, error: String) -> Self {
        self.error = Some(error);
        self
    }
}

/// Free bytes for unprivileged users on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// The first watched filesystem with less than `min_free` bytes free, described.
fn low_disk(paths: &[PathBuf], min_free: u64) -> Option<String> {
    paths.iter().find_map(|p| {
        let free = free_bytes(p)?;
        (free < min_free).then(|| {
            format!(
                "the disk holding {} has {free} bytes free, below the {min_free} byte minimum (min_free_disk_bytes)",
                p.display()
            )
        })
    })
}

/// Resolves when a watched filesystem runs low (checked every 250 ms).
async fn disk_guard(paths: Vec<PathBuf>, min_free: u64) -> String {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(low) = low_disk(&paths, min_free) {
            return low;
        }
    }
}

/// Resolves, with the reason, once the RUN steps of a build have written more than `max_bytes`
/// or made more than `max_files` entries (sampled every 250 ms).
async fn watch_writes(mut w: BuildWrites, max_bytes: u64, max_files: u64) -> String {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok((back, u)) = tokio::task::spawn_blocking(move || {
            let u = w.sample();
            (w, u)
        })
        .await
        else {
            return std::future::pending().await;
        };
        w = back;
        if u.bytes > max_bytes {
            return format!(
                "its RUN steps wrote {} bytes to disk, past the {max_bytes} byte limit (max_image_bytes)",
                u.bytes
            );
        }
        if u.entries > max_files {
            return format!(
                "its RUN steps made {} files and directories, past the limit of {max_files} (max_image_files)",
                u.entries
            );
        }
    }
}
