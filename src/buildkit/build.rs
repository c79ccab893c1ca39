//! One build on the daemon ([`run`]), through the gateway forwarder (see [`crate::buildkit`] for the
//! sequence of calls), and the pieces it is made of: the frontend options perfbox sets, reading
//! the frontend's result, the status stream.
//!
//! A [`Build`] owns everything a build starts — the session (which serves the export), the status
//! task and the unpacker — and [`Build::finish`] is the one place they are wound down, on every
//! path.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::client::{BuildkitClient, MAX_MESSAGE};
use super::definition::{self, DefinitionError};
use super::error::{self, BuildError};
use super::export::{self, ExportOutcome, Unpacker};
use super::proto::control::{ControlClient, Exporter, SolveRequest, SolveResponse, StatusRequest};
use super::proto::gateway::{self, GatewayResult, LlbBridgeClient, ReturnRequest};
use super::proto::{RpcStatus, pb};
use super::session::Session;
use super::status::{BuildLog, StatusSummary, StatusTracker};
use super::{AbortOnDrop, BuildRequest, BuiltImage, ENTITLEMENTS, ExportError};
use crate::image::ImageConfig;

/// Metadata that routes LLBBridge calls to the build with this ref (gateway forwarder).
const BUILD_ID_HEADER: &str = "buildkit-controlapi-buildid";
/// How long to wait for the tail of a finished build (status stream end, error propagation).
const WIND_DOWN: Duration = Duration::from_secs(5);

/// Build `req` on `client`'s daemon, writing progress to `log`, and unpack the image into
/// `req.rootfs_dir`.
pub(super) async fn run(
    client: &BuildkitClient,
    req: BuildRequest,
    log: Arc<dyn BuildLog>,
) -> Result<BuiltImage, BuildError> {
    let frontend_opt = frontend_options(&req)?;
    let def = definition::dockerfile_definition(&req.dockerfile)?;
    export::prepare_target(&req.rootfs_dir)?;
    client.info_version().await?;
    if let Some(directive) = syntax_directive(&String::from_utf8_lossy(&req.dockerfile)) {
        log.line(&format!(
            "perfbox: ignoring the directive `{directive}`: perfbox builds every Dockerfile with BuildKit's built-in Dockerfile frontend and never runs a frontend image"
        ));
    }
    let mut build = Build::start(client, &req, log);
    let solved = build.solve(&req, frontend_opt, def).await;
    build.finish(solved, req.rootfs_dir).await
}

/// What a solve produced.
struct Solved {
    config: ImageConfig,
    config_digest: Option<String>,
    rootfs_key: Option<String>,
    /// None: the caller had the root filesystem already, nothing was exported.
    export: Option<ExportOutcome>,
}

/// A build in progress and what it started.
struct Build<'c> {
    client: &'c BuildkitClient,
    build_ref: String,
    log: Arc<dyn BuildLog>,
    session: Option<Session>,
    status: Option<AbortOnDrop<StatusSummary>>,
    unpacker: Option<Unpacker>,
    started: Instant,
}

impl<'c> Build<'c> {
    /// Open the session (serving the export into the unpacker) and start following the status.
    fn start(client: &'c BuildkitClient, req: &BuildRequest, log: Arc<dyn BuildLog>) -> Self {
        let build_ref = format!("perfbox-{}", uuid::Uuid::new_v4().simple());
        let (sink, unpacker) = export::start(req.rootfs_dir.clone(), req.max_image_bytes);
        let session = Session::start(
            client.channel.clone(),
            sink,
            &client.credentials,
            req.context_dir.clone(),
        );
        let status = AbortOnDrop::new(tokio::spawn(stream_status(
            client.control(),
            build_ref.clone(),
            log.clone(),
        )));
        Build {
            client,
            build_ref,
            log,
            session: Some(session),
            status: Some(status),
            unpacker: Some(unpacker),
            started: Instant::now(),
        }
    }

    /// The outer solve (no frontend, the tar exporter, the source policy), the Dockerfile
    /// frontend through the gateway, then `Return`: the result (the daemon exports it into our
    /// session) or, when the caller already holds that root filesystem, a cancellation.
    async fn solve(
        &mut self,
        req: &BuildRequest,
        frontend_opt: HashMap<String, String>,
        def: pb::Definition,
    ) -> Result<Solved, BuildError> {
        let session_id = self
            .session
            .as_ref()
            .map(|s| s.id().to_owned())
            .unwrap_or_default();
        let mut control = self.client.control();
        let outer = SolveRequest {
            r#ref: self.build_ref.clone(),
            session: session_id,
            exporters: vec![Exporter {
                r#type: "tar".to_owned(),
                attrs: HashMap::new(),
            }],
            // Evaluated on the daemon for every source of this build, the frontend's included.
            source_policy: Some(match req.context_dir {
                Some(_) => req.source_policy.clone().with_context().to_proto(),
                None => req.source_policy.to_proto(),
            }),
            entitlements: ENTITLEMENTS.iter().map(|e| (*e).to_owned()).collect(),
            ..Default::default()
        };
        // It stays open until the frontend's result (or error) is handed back with Return.
        let mut outer_solve = pin!(control.solve(outer));
        let mut bridge = LlbBridgeClient::new(self.client.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let inner = gateway::SolveRequest {
            frontend: "dockerfile.v0".to_owned(),
            frontend_opt,
            frontend_inputs: match req.context_dir {
                // The frontend reads the context from the session (FileSync, the one directory
                // the submission brought).
                Some(_) => HashMap::from([("dockerfile".to_owned(), def)]),
                // The context is the same single-file tree (see `definition`): nothing on this
                // machine is ever exposed to the daemon.
                None => HashMap::from([
                    ("dockerfile".to_owned(), def.clone()),
                    ("context".to_owned(), def),
                ]),
            },
            allow_result_return: true,
            allow_result_array_ref: true,
            evaluate: true,
            ..Default::default()
        };
        let result = self.frontend(&mut bridge, &mut outer_solve, inner).await?;
        let (config, config_digest) = image_config(&result)?;
        check_result_defs(&result)?;
        let rootfs_key = rootfs_key(&result);
        if let (Some(key), Some(filter)) = (&rootfs_key, &req.skip_export)
            && (filter.0)(key)
        {
            // The caller already has this filesystem: end the build without exporting it.
            let skip = RpcStatus {
                code: tonic::Code::Cancelled as i32,
                message: "perfbox: root filesystem already cached; export skipped".to_owned(),
                details: vec![],
            };
            self.hand_back(&mut bridge, None, skip).await;
            let _ = tokio::time::timeout(WIND_DOWN, &mut outer_solve).await;
            self.log.line(&format!(
                "perfbox: root filesystem {key} is already cached; export skipped"
            ));
            return Ok(Solved {
                config,
                config_digest,
                rootfs_key,
                export: None,
            });
        }
        let ret = ReturnRequest {
            result: Some(result),
            error: None,
        };
        if let Err(status) = bridge.r#return(self.with_build_id(ret)?).await {
            return Err(self.client.solve_error(&status));
        }
        // The daemon answers only after our DiffCopy handler returned, so the export is complete
        // (or failed) by now; the session is no longer needed.
        let outer = outer_solve.await;
        self.session = None;
        let export = self.export(outer).await?;
        self.log.line(&format!(
            "unpacked {} entries ({:.1} MB) into {} in {:.2}s, skipped {} device nodes/FIFOs",
            export.stats.entries,
            export.bytes as f64 / 1e6,
            req.rootfs_dir.display(),
            export.duration.as_secs_f64(),
            export.stats.skipped_special,
        ));
        Ok(Solved {
            config,
            config_digest,
            rootfs_key,
            export: Some(export),
        })
    }

    /// The Dockerfile frontend through the gateway: its result, or its error (handed back to
    /// the outer solve so that it ends with it).
    async fn frontend<F>(
        &self,
        bridge: &mut LlbBridgeClient<Channel>,
        outer_solve: &mut std::pin::Pin<&mut F>,
        inner: gateway::SolveRequest,
    ) -> Result<GatewayResult, BuildError>
    where
        F: std::future::Future<Output = Result<tonic::Response<SolveResponse>, tonic::Status>>,
    {
        let frontend = tokio::select! {
            outer = outer_solve.as_mut() => {
                // The outer solve cannot succeed before the frontend returned.
                return Err(match outer {
                    Err(status) => self.client.solve_error(&status),
                    Ok(_) => BuildError::Other {
                        message: "solve finished before the frontend returned".to_owned(),
                    },
                });
            }
            r = bridge.solve(self.with_build_id(inner)?) => r,
        };
        match frontend {
            Ok(resp) => resp.into_inner().result.ok_or_else(|| BuildError::Other {
                message: "frontend returned no result".to_owned(),
            }),
            Err(status) if error::is_transport_error(&status) => {
                Err(self.client.solve_error(&status))
            }
            Err(status) => {
                // Hand the error back so the outer solve ends with it, then report the
                // frontend's status (it carries the Dockerfile line and exit code details).
                self.hand_back(bridge, None, rpc_status(&status)).await;
                let _ = tokio::time::timeout(WIND_DOWN, outer_solve.as_mut()).await;
                Err(error::classify(&status))
            }
        }
    }

    /// What the unpacker made of the export, once the outer solve has ended with `outer`.
    async fn export(
        &mut self,
        outer: Result<tonic::Response<SolveResponse>, tonic::Status>,
    ) -> Result<ExportOutcome, BuildError> {
        let unpacker = self.unpacker.take().ok_or_else(|| BuildError::Other {
            message: "the export was already collected".to_owned(),
        })?;
        let export = tokio::time::timeout(WIND_DOWN, unpacker.finish()).await;
        if let Err(status) = outer {
            if error::is_transport_error(&status) {
                return Err(self.client.solve_error(&status));
            }
            // If our unpacker failed, the daemon only saw an aborted DiffCopy: report the cause.
            if let Ok(Err(e)) = export
                && !matches!(e, ExportError::NothingReceived)
            {
                return Err(e.into());
            }
            return Err(error::classify(&status));
        }
        Ok(export.map_err(|_| ExportError::Task("unpacker did not finish".into()))??)
    }

    /// `Return` with no result and `error` (the build then ends with it), best effort.
    async fn hand_back(
        &self,
        bridge: &mut LlbBridgeClient<Channel>,
        result: Option<GatewayResult>,
        error: RpcStatus,
    ) {
        let ret = ReturnRequest {
            result,
            error: Some(error),
        };
        if let Ok(r) = self.with_build_id(ret) {
            let _ = tokio::time::timeout(WIND_DOWN, bridge.r#return(r)).await;
        }
    }

    /// `msg` addressed to this build (gateway forwarder metadata).
    fn with_build_id<T>(&self, msg: T) -> Result<tonic::Request<T>, BuildError> {
        let mut request = tonic::Request::new(msg);
        let value =
            MetadataValue::try_from(self.build_ref.as_str()).map_err(|e| BuildError::Other {
                message: format!("build ref {:?} is not a valid header: {e}", self.build_ref),
            })?;
        request.metadata_mut().insert(BUILD_ID_HEADER, value);
        Ok(request)
    }

    /// The one way out: close the session, let the status stream end (it counts the steps), and
    /// report.
    async fn finish(
        mut self,
        solved: Result<Solved, BuildError>,
        rootfs: PathBuf,
    ) -> Result<BuiltImage, BuildError> {
        self.session = None;
        let summary = match self.status.take() {
            Some(task) => match tokio::time::timeout(WIND_DOWN, task.join()).await {
                Ok(Ok(s)) => s,
                _ => StatusSummary::default(),
            },
            None => StatusSummary::default(),
        };
        let solved = solved?;
        let (export_bytes, export_duration, exported) = match &solved.export {
            Some(e) => (e.bytes, e.duration, true),
            None => (0, Duration::ZERO, false),
        };
        Ok(BuiltImage {
            rootfs,
            config: solved.config,
            config_digest: solved.config_digest,
            cached_steps: summary.cached_steps,
            total_steps: summary.total_steps,
            export_bytes,
            export_duration,
            duration: self.started.elapsed(),
            rootfs_key: solved.rootfs_key,
            exported,
        })
    }
}

/// The `dockerfile.v0` options for `req`.
///
/// Options perfbox always sets, after the caller's build args so that none can override them:
/// - `force-network-mode` (none unless the caller chose the isolated network);
/// - `cmdline` (present, empty): the frontend then ignores `# syntax=` and `BUILDKIT_SYNTAX`
///   instead of running the named frontend image (which could reach the host's network);
/// - with a scope: `build-arg:BUILDKIT_CACHE_MOUNT_NS` and `hostname` (see [`BuildScope`]);
/// - with a cgroup parent: `cgroup-parent`.
///
/// Build args named `BUILDKIT_*` (any case) are refused: they are BuildKit's own knobs
/// (cache-mount namespace, syntax, hostname...), not the Dockerfile's.
fn frontend_options(req: &BuildRequest) -> Result<HashMap<String, String>, BuildError> {
    let invalid = |message: String| BuildError::InvalidRequest { message };
    let mut opts = HashMap::new();
    for (name, value) in &req.build_args {
        super::check_build_arg_name(name).map_err(invalid)?;
        opts.insert(format!("build-arg:{name}"), value.clone());
    }
    if let Some(target) = &req.target {
        if target.is_empty() || target.chars().any(char::is_whitespace) {
            return Err(invalid(format!("bad target {target:?}")));
        }
        opts.insert("target".to_owned(), target.clone());
    }
    if let Some(platform) = &req.platform {
        if platform.is_empty() || platform.contains(',') {
            return Err(invalid(format!(
                "bad platform {platform:?} (exactly one platform, e.g. linux/amd64)"
            )));
        }
        opts.insert("platform".to_owned(), platform.clone());
    }
    if req.no_cache {
        opts.insert("no-cache".to_owned(), String::new());
    }
    if req.dockerfile.is_empty() {
        return Err(invalid("empty Dockerfile".to_owned()));
    }
    opts.insert(
        "force-network-mode".to_owned(),
        req.network.as_frontend_value().to_owned(),
    );
    opts.insert("cmdline".to_owned(), String::new());
    if let Some(scope) = &req.scope {
        opts.insert(
            "build-arg:BUILDKIT_CACHE_MOUNT_NS".to_owned(),
            scope.as_str().to_owned(),
        );
        opts.insert("hostname".to_owned(), scope.as_str().to_owned());
    }
    if let Some(parent) = &req.cgroup_parent {
        let ok = !parent.is_empty()
            && parent.split('/').all(|c| {
                !c.is_empty() && c != "." && c != ".." && !c.contains(char::is_whitespace)
            });
        if !ok {
            return Err(invalid(format!("bad cgroup parent {parent:?}")));
        }
        opts.insert("cgroup-parent".to_owned(), parent.clone());
    }
    Ok(opts)
}

/// The `# syntax=…` (or `// syntax=…`) directive of a Dockerfile, as written, if it has one:
/// directives are the comment lines at the very top (after an optional `#!` line) of the form
/// `# key=value`, keys case-insensitive (BuildKit's `DetectSyntax`).
fn syntax_directive(dockerfile: &str) -> Option<String> {
    for (i, line) in dockerfile.lines().enumerate() {
        let t = line.trim();
        if i == 0 && t.starts_with("#!") {
            continue;
        }
        let body = t.strip_prefix('#').or_else(|| t.strip_prefix("//"))?;
        let (key, value) = body.split_once('=')?;
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return None; // an ordinary comment ends the directives
        }
        if key.eq_ignore_ascii_case("syntax") && !value.trim().is_empty() {
            return Some(t.to_owned());
        }
    }
    None
}

/// The image config from the frontend result's metadata (`containerimage.config`, or
/// `containerimage.config/<platform>` for a platform-keyed result).
fn image_config(result: &GatewayResult) -> Result<(ImageConfig, Option<String>), BuildError> {
    let raw = result.metadata.get("containerimage.config").or_else(|| {
        let mut keyed: BTreeMap<&String, &Vec<u8>> = result
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("containerimage.config/"))
            .collect();
        keyed.pop_first().map(|(_, v)| v)
    });
    let Some(raw) = raw else {
        return Err(BuildError::Other {
            message: "frontend result has no containerimage.config".to_owned(),
        });
    };
    let config = ImageConfig::from_image_config_json(raw).map_err(|e| BuildError::Other {
        message: format!("cannot parse the image config returned by the frontend: {e}"),
    })?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(raw)));
    Ok((config, Some(digest)))
}

/// `llb-` + sha256 over the ops of the result's definition (length-prefixed, in order): the
/// identity of the root filesystem, independent of the image config (CMD, ENV...) and of op
/// metadata such as progress names.
fn rootfs_key(result: &GatewayResult) -> Option<String> {
    use super::proto::gateway_result::Kind;
    let def = match &result.result {
        Some(Kind::Ref(r)) => r.def.as_ref()?,
        _ => return None,
    };
    let mut h = Sha256::new();
    for op in &def.def {
        h.update((op.len() as u64).to_le_bytes());
        h.update(op);
    }
    Some(format!("llb-{}", hex::encode(h.finalize())))
}

/// The result we hand back in `Return` contains Definitions (the daemon's own); they are
/// validated like ours before being sent.
fn check_result_defs(result: &GatewayResult) -> Result<(), DefinitionError> {
    use super::proto::gateway_result::Kind;
    let defs: Vec<&pb::Definition> = match &result.result {
        Some(Kind::Ref(r)) => r.def.iter().collect(),
        Some(Kind::Refs(m)) => m.refs.values().filter_map(|r| r.def.as_ref()).collect(),
        _ => Vec::new(),
    };
    defs.into_iter().try_for_each(definition::validate)
}

/// A `google.rpc.Status` equivalent of `status` (code, message, decoded details).
fn rpc_status(status: &tonic::Status) -> RpcStatus {
    let details = RpcStatus::decode(status.details())
        .map(|s| s.details)
        .unwrap_or_default();
    RpcStatus {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details,
    }
}

/// Follow `Control.Status` for `build_ref` until the build ends, writing log lines.
async fn stream_status(
    mut control: ControlClient<Channel>,
    build_ref: String,
    log: Arc<dyn BuildLog>,
) -> StatusSummary {
    let mut tracker = StatusTracker::new(log);
    match control.status(StatusRequest { r#ref: build_ref }).await {
        Ok(resp) => {
            let mut stream = resp.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(update)) => tracker.apply(&update),
                    Ok(None) => break,
                    Err(status) => {
                        tracker.note(&format!("status stream ended: {}", status.message()));
                        break;
                    }
                }
            }
        }
        Err(status) => tracker.note(&format!("status unavailable: {}", status.message())),
    }
    tracker.finish()
}

#[cfg(test)]
mod tests {
    use super::super::BuildNetwork;
    use super::*;

    #[test]
    fn frontend_options_defaults_to_no_network_and_no_syntax_forwarding() {
        let req = BuildRequest::new("FROM busybox\n", "/tmp/x");
        let opts = frontend_options(&req).expect("valid");
        assert_eq!(
            opts.get("force-network-mode").map(String::as_str),
            Some("none")
        );
        assert_eq!(opts.get("cmdline").map(String::as_str), Some(""));
        assert_eq!(opts.len(), 2);
    }

    #[test]
    fn scope_and_cgroup_become_options_no_user_arg_overrides() {
        let mut req = BuildRequest::new("FROM busybox\n", "/tmp/x");
        req.scope = Some(super::super::BuildScope::new("job-7").unwrap());
        req.cgroup_parent = Some("perfbox-build/runs/job-7".into());
        let opts = frontend_options(&req).expect("valid");
        assert_eq!(opts["build-arg:BUILDKIT_CACHE_MOUNT_NS"], "job-7");
        assert_eq!(opts["hostname"], "job-7");
        assert_eq!(opts["cgroup-parent"], "perfbox-build/runs/job-7");
        for knob in [
            "BUILDKIT_CACHE_MOUNT_NS",
            "buildkit_syntax",
            "BuildKit_Sandbox_Hostname",
        ] {
            let mut r = req.clone();
            r.build_args.insert(knob.into(), "x".into());
            let e = frontend_options(&r).expect_err(knob);
            assert!(e.to_string().contains("BUILDKIT_"), "{e}");
        }
        for bad in ["", "/abs", "a/../b", "a//b", "a b"] {
            let mut r = req.clone();
            r.cgroup_parent = Some(bad.into());
            assert!(frontend_options(&r).is_err(), "{bad:?}");
        }
        assert!(super::super::BuildScope::new("a/b").is_err());
        assert!(super::super::BuildScope::new("").is_err());
    }

    #[test]
    fn syntax_directives_are_found_like_buildkit_does() {
        assert_eq!(
            syntax_directive("# syntax=docker/dockerfile:1\nFROM x\n").as_deref(),
            Some("# syntax=docker/dockerfile:1")
        );
        assert_eq!(
            syntax_directive("#!/bin/false\n# SYNTAX = docker/dockerfile:1.7-labs\nFROM x\n")
                .as_deref(),
            Some("# SYNTAX = docker/dockerfile:1.7-labs")
        );
        assert_eq!(
            syntax_directive("# escape=`\n//syntax=x\nFROM x\n").as_deref(),
            Some("//syntax=x")
        );
        assert_eq!(syntax_directive("FROM x\n# syntax=y\n"), None);
        assert_eq!(syntax_directive("# a comment\n# syntax=y\nFROM x\n"), None);
        assert_eq!(syntax_directive("FROM x\n"), None);
    }

    #[test]
    fn frontend_options_pass_through() {
        let mut req = BuildRequest::new("FROM busybox\n", "/tmp/x");
        req.build_args.insert("A".into(), "1".into());
        req.target = Some("build".into());
        req.platform = Some("linux/amd64".into());
        req.network = BuildNetwork::Sandbox;
        req.no_cache = true;
        let opts = frontend_options(&req).expect("valid");
        assert_eq!(opts["build-arg:A"], "1");
        assert_eq!(opts["target"], "build");
        assert_eq!(opts["platform"], "linux/amd64");
        assert_eq!(opts["force-network-mode"], "sandbox");
        assert_eq!(opts["no-cache"], "");
        req.build_args
            .insert("BUILDKIT_CACHE_MOUNT_NS".into(), "x".into());
        assert!(frontend_options(&req).is_err());
        req.build_args.remove("BUILDKIT_CACHE_MOUNT_NS");

        req.platform = Some("linux/amd64,linux/arm64".into());
        assert!(frontend_options(&req).is_err());
        req.platform = None;
        req.build_args.insert("B=C".into(), "1".into());
        assert!(frontend_options(&req).is_err());
    }

    #[test]
    fn config_is_read_from_result_metadata() {
        let json = br#"{"config":{"Cmd":["cat","/built"],"User":"1000"}}"#;
        let result = GatewayResult {
            metadata: HashMap::from([("containerimage.config".to_owned(), json.to_vec())]),
            ..Default::default()
        };
        let (config, digest) = image_config(&result).expect("config");
        assert_eq!(
            config.cmd,
            Some(vec!["cat".to_owned(), "/built".to_owned()])
        );
        assert_eq!(config.user.as_deref(), Some("1000"));
        assert!(digest.expect("digest").starts_with("sha256:"));

        let keyed = GatewayResult {
            metadata: HashMap::from([(
                "containerimage.config/linux/amd64".to_owned(),
                json.to_vec(),
            )]),
            ..Default::default()
        };
        assert!(image_config(&keyed).is_ok());
        assert!(image_config(&GatewayResult::default()).is_err());
    }
}
