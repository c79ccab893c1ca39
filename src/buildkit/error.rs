//! [`BuildError`], the one error type of the BuildKit client, and the decoding of BuildKit's
//! rich gRPC errors into it.
//!
//! BuildKit puts a `google.rpc.Status` in the `grpc-status-details-bin` trailer. Its `details` are
//! `Any`s whose payload is JSON (type URLs end in `+json`); two of them matter to us:
//! * `…errdefs.Source+json`: the Dockerfile plus `ranges[].start.line`, the failing line;
//! * `…ExitMessage+json`: `{"Code": <exit code>}` of a failed `RUN`.
//!
//! BuildKit's own message is kept verbatim in every variant that has one.

use std::path::PathBuf;

use prost::Message;

use super::definition::DefinitionError;
use super::proto::{Any, RpcStatus};

/// Why a build (or a call to the daemon) failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    // ---- the user's Dockerfile ----
    /// The Dockerfile does not parse (or uses an unknown instruction or flag).
    #[error("Dockerfile syntax error{}: {message}", line_suffix(*line))]
    DockerfileSyntax {
        /// 1-based Dockerfile line, when BuildKit reported one.
        line: Option<u32>,
        /// BuildKit's message, verbatim.
        message: String,
    },
    /// A `RUN` step exited non-zero.
    #[error("RUN failed{}: {message}", line_suffix(*line))]
    RunFailed {
        /// BuildKit's message, verbatim (`process "/bin/sh -c …" did not complete successfully: exit code: N`).
        message: String,
        /// The process exit code.
        exit_code: Option<i32>,
        /// 1-based Dockerfile line of the `RUN`.
        line: Option<u32>,
    },
    /// The Dockerfile names a source the build's policy denies (an image from another registry,
    /// an `http(s)://` or git source, a `# syntax=` frontend image...). Nothing was fetched.
    #[error("{}", source_denied_text(denied, instruction.as_ref()))]
    SourceDenied {
        /// The source as BuildKit names it (`http://…`, `docker-image://…`, `git://…`).
        denied: String,
        /// 1-based line and text of the instruction that names it, when found in the Dockerfile.
        instruction: Option<(u32, String)>,
        /// BuildKit's message, verbatim.
        message: String,
    },
    /// A `FROM` image cannot be resolved in any configured registry.
    #[error("base image {image:?} not found: {message}")]
    BaseImageNotFound {
        /// The image reference as BuildKit resolved it (e.g. `docker.io/library/x:latest`).
        image: String,
        /// BuildKit's message, verbatim.
        message: String,
    },

    // ---- the daemon ----
    /// The daemon cannot be reached (not running, socket missing, connect timeout).
    #[error("buildkitd at {addr} is unavailable: {message}")]
    DaemonUnavailable {
        /// The address given to [`super::BuildkitClient::connect`].
        addr: String,
        /// What failed.
        message: String,
    },
    /// The connection to the daemon broke while a build was running (the daemon died or restarted).
    #[error("lost connection to buildkitd during the build: {message}")]
    DaemonLost {
        /// The transport error.
        message: String,
    },

    // ---- our side ----
    /// Receiving or unpacking the exported rootfs failed.
    #[error("export failed: {0}")]
    Export(#[from] ExportError),
    /// A Definition failed validation and was not sent (sending it could crash buildkitd).
    #[error("refusing to send invalid LLB definition: {0}")]
    InvalidDefinition(#[from] DefinitionError),
    /// The request itself is unusable (bad address, bad rootfs directory, ...).
    #[error("invalid build request: {message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
    },
    /// The build was cancelled by the caller.
    #[error("build cancelled")]
    Cancelled,
    /// Any other BuildKit failure (kept verbatim).
    #[error("build failed: {message}")]
    Other {
        /// BuildKit's message, verbatim.
        message: String,
    },
}

fn source_denied_text(source: &str, instruction: Option<&(u32, String)>) -> String {
    let at = match instruction {
        Some((line, text)) => format!(" (line {line}: {text})"),
        None => String::new(),
    };
    format!(
        "the Dockerfile names {source}{at}, which perfbox does not fetch: builds may use images only from perfbox's registries, and other remote sources (http, https, git) only where the operator allowed them (allowed_remote_sources)"
    )
}

impl BuildError {
    /// Name the instruction of `dockerfile` behind a [`BuildError::SourceDenied`].
    pub(crate) fn locate_in(self, dockerfile: &str) -> Self {
        match self {
            BuildError::SourceDenied {
                denied,
                instruction: None,
                message,
            } => BuildError::SourceDenied {
                instruction: super::policy::instruction_naming(dockerfile, &denied),
                denied,
                message,
            },
            other => other,
        }
    }
}

fn line_suffix(line: Option<u32>) -> String {
    line.map(|l| format!(" on line {l}")).unwrap_or_default()
}

/// Why the exported image could not be received or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The rootfs target exists and is not an empty directory.
    #[error("rootfs directory {path:?} exists and is not an empty directory")]
    TargetNotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// Creating or inspecting the rootfs directory failed.
    #[error("cannot prepare rootfs directory {path:?}: {source}")]
    Target {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A tar entry would land outside the rootfs (`..`, symlinked parent) and was refused.
    #[error("tar entry {entry:?} would escape the rootfs: {reason}")]
    UnsafeEntry {
        /// The entry's path as written in the archive.
        entry: String,
        /// Why it was refused.
        reason: String,
    },
    /// Reading the tar stream or writing an entry failed.
    #[error("unpacking tar into {path:?} failed: {source}")]
    Unpack {
        /// The rootfs directory.
        path: PathBuf,
        /// The I/O error (includes the entry path where known).
        source: std::io::Error,
    },
    /// The image is larger than the build allows (`max_image_bytes`); the export stopped before
    /// writing the entry that would pass the limit.
    #[error(
        "the image is larger than the {limit} byte limit (max_image_bytes): {entry:?} alone is {size} bytes (apparent size) and would pass it; the export was stopped before writing it"
    )]
    TooLarge {
        /// The limit.
        limit: u64,
        /// The entry that would have passed it.
        entry: String,
        /// Its apparent size.
        size: u64,
    },
    /// The daemon finished the build without sending the tar.
    #[error("daemon finished without sending the exported tar")]
    NothingReceived,
    /// The unpacking thread panicked or was cancelled.
    #[error("unpacker task failed: {0}")]
    Task(String),
}

/// An error and its sources, for humans: `message: cause: cause…`, each cause once (a cause whose
/// text the message already holds is not repeated). The one walker of error sources in the
/// BuildKit client.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// What BuildKit attached to an error, decoded from `grpc-status-details-bin`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ErrorDetails {
    /// First line of the first `errdefs.Source` range.
    pub line: Option<u32>,
    /// `ExitMessage.Code` of a failed process.
    pub exit_code: Option<i32>,
    /// Whether an `errdefs.Source` detail was present at all.
    pub has_source: bool,
}

impl ErrorDetails {
    /// Decode the bytes of `grpc-status-details-bin` (a `google.rpc.Status`). Anything that does
    /// not decode is ignored: details are a bonus, the message is what counts.
    pub(crate) fn decode(bytes: &[u8]) -> Self {
        match RpcStatus::decode(bytes) {
            Ok(status) => Self::from_anys(&status.details),
            Err(_) => Self::default(),
        }
    }

    fn from_anys(details: &[Any]) -> Self {
        let mut out = Self::default();
        for any in details {
            let url = any.type_url.as_str();
            if url.ends_with("errdefs.Source+json") {
                out.has_source = true;
                if out.line.is_none() {
                    out.line = serde_json::from_slice::<serde_json::Value>(&any.value)
                        .ok()
                        .and_then(|v| source_line(&v));
                }
            } else if url.ends_with("ExitMessage+json")
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&any.value)
            {
                let code = v.get("Code").or_else(|| v.get("code"));
                out.exit_code = code
                    .and_then(serde_json::Value::as_i64)
                    .and_then(|c| i32::try_from(c).ok());
            }
        }
        out
    }
}

/// `ranges[0].start.line` of an `errdefs.Source` (JSON), when positive.
fn source_line(v: &serde_json::Value) -> Option<u32> {
    v.get("ranges")?
        .as_array()?
        .iter()
        .filter_map(|r| r.get("start")?.get("line")?.as_u64())
        .find(|&l| l > 0)
        .and_then(|l| u32::try_from(l).ok())
}

/// Whether a status was produced by our transport (connection refused, reset, closed) rather
/// than sent by the daemon.
pub(crate) fn is_transport_error(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    if status.code() == tonic::Code::Unavailable {
        return true;
    }
    // A status the daemon sent has no local error source; one tonic made from a broken
    // connection does.
    if status.source().is_some() {
        return true;
    }
    let m = status.message();
    m == "transport error"
        || m.starts_with("h2 protocol error")
        || m.contains("error reading a body from connection")
        || m.contains("connection reset")
        || m.contains("broken pipe")
}

/// Map a status the daemon returned for a build to a [`BuildError`].
pub(crate) fn classify(status: &tonic::Status) -> BuildError {
    let message = status.message().to_owned();
    let details = ErrorDetails::decode(status.details());
    classify_parts(status.code(), message, details)
}

pub(crate) fn classify_parts(
    code: tonic::Code,
    message: String,
    details: ErrorDetails,
) -> BuildError {
    if is_daemon_shutdown(&message) {
        return BuildError::DaemonLost { message };
    }
    if code == tonic::Code::Cancelled && message.contains("context canceled") {
        return BuildError::Cancelled;
    }
    if let Some(denied) = super::policy::denied_source(&message) {
        return BuildError::SourceDenied {
            denied,
            instruction: None,
            message,
        };
    }
    let exit_from_message = exit_code_from_message(&message);
    if details.exit_code.is_some() || exit_from_message.is_some() {
        return BuildError::RunFailed {
            exit_code: details.exit_code.or(exit_from_message),
            line: details.line,
            message,
        };
    }
    if let Some(image) = unresolvable_image(&message) {
        return BuildError::BaseImageNotFound { image, message };
    }
    if message.contains("dockerfile parse error") || is_frontend_syntax(&message) {
        let line = details.line.or_else(|| line_from_message(&message));
        return BuildError::DockerfileSyntax { line, message };
    }
    BuildError::Other { message }
}

/// A build the daemon ended as cancelled though perfbox never cancelled it: buildkitd, stopping
/// on SIGTERM, cancels its solves and says `context canceled` before the connection breaks.
/// That is the daemon going away, not a cancel.
pub(crate) fn unasked_cancel_is_daemon_lost<T>(
    result: Result<T, BuildError>,
    asked: bool,
) -> Result<T, BuildError> {
    match result {
        Err(BuildError::Cancelled) if !asked => Err(BuildError::DaemonLost {
            message:
                "buildkitd cancelled the build though perfbox did not ask (the daemon was stopping)"
                    .to_owned(),
        }),
        r => r,
    }
}

/// Messages with which a stopping buildkitd (SIGTERM) or its gRPC server fails running builds.
fn is_daemon_shutdown(message: &str) -> bool {
    message.contains("SIGTERM/SIGINTs, forcing shutdown")
        || message.contains("grpc: the server has been stopped")
        || message.contains("transport is closing")
}

/// Other frontend messages that are about the Dockerfile's text, not its execution.
fn is_frontend_syntax(message: &str) -> bool {
    message.contains("unknown instruction")
        || message.contains("unknown flag")
        || message.contains("failed to parse stage name")
        || message.contains("file with no instructions")
}

/// `... did not complete successfully: exit code: 3` → 3.
fn exit_code_from_message(message: &str) -> Option<i32> {
    let (_, rest) = message.rsplit_once("did not complete successfully: exit code: ")?;
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

/// `dockerfile parse error on line 7: ...` → 7.
fn line_from_message(message: &str) -> Option<u32> {
    let (_, rest) = message.split_once("on line ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The image reference in a "cannot resolve base image" message, if it is one.
fn unresolvable_image(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("failed to resolve source metadata for ")?;
    // The reference ends where the cause starts (`<ref>: <cause>`).
    let image = rest.split(": ").next().unwrap_or_default().trim();
    if image.is_empty() {
        None
    } else {
        Some(image.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(url: &str, json: &str) -> Any {
        Any {
            type_url: url.to_owned(),
            value: json.as_bytes().to_vec(),
        }
    }

    fn details_bytes(anys: Vec<Any>) -> Vec<u8> {
        RpcStatus {
            code: 2,
            message: "x".into(),
            details: anys,
        }
        .encode_to_vec()
    }

    #[test]
    fn decodes_source_line_and_exit_code() {
        let bytes = details_bytes(vec![
            any(
                "github.com/moby/buildkit/stack.Stack+json",
                r#"{"frames":[]}"#,
            ),
            any(
                "github.com/moby/buildkit/errdefs.Source+json",
                r#"{"info":{"filename":"Dockerfile","data":"RlJN"},"ranges":[{"start":{"line":2},"end":{"line":2}}]}"#,
            ),
            any(
                "github.com/moby/buildkit/errdefs.Vertex+json",
                r#"{"digest":"sha256:ab"}"#,
            ),
            any(
                "github.com/moby/buildkit/frontend/gateway/pb.ExitMessage+json",
                r#"{"Code":3}"#,
            ),
        ]);
        let d = ErrorDetails::decode(&bytes);
        assert_eq!(
            d,
            ErrorDetails {
                line: Some(2),
                exit_code: Some(3),
                has_source: true
            }
        );
    }

    #[test]
    fn garbage_details_are_ignored() {
        assert_eq!(
            ErrorDetails::decode(b"\xff\xff\x00"),
            ErrorDetails::default()
        );
        let bytes = details_bytes(vec![any("x/errdefs.Source+json", "not json")]);
        assert_eq!(ErrorDetails::decode(&bytes).line, None);
    }

    #[test]
    fn classifies_syntax_error_with_line() {
        let msg = "dockerfile parse error on line 1: unknown instruction: FRM (did you mean FROM?)";
        let e = classify_parts(tonic::Code::Unknown, msg.into(), ErrorDetails::default());
        match e {
            BuildError::DockerfileSyntax { line, message } => {
                assert_eq!(line, Some(1));
                assert_eq!(message, msg);
            }
            other => panic!("wrong variant {other:?}"),
        }
    }

    #[test]
    fn classifies_run_failure_from_details_or_message() {
        let msg = r#"process "/bin/sh -c exit 3" did not complete successfully: exit code: 3"#;
        let d = ErrorDetails {
            line: Some(2),
            exit_code: Some(3),
            has_source: true,
        };
        assert!(matches!(
            classify_parts(tonic::Code::Unknown, msg.into(), d),
            BuildError::RunFailed {
                exit_code: Some(3),
                line: Some(2),
                ..
            }
        ));
        assert!(matches!(
            classify_parts(tonic::Code::Unknown, msg.into(), ErrorDetails::default()),
            BuildError::RunFailed {
                exit_code: Some(3),
                line: None,
                ..
            }
        ));
    }

    #[test]
    fn classifies_unknown_base_image() {
        let msg = "docker.io/library/nosuchimage-xyz:latest: failed to resolve source metadata for docker.io/library/nosuchimage-xyz:latest: docker.io/library/nosuchimage-xyz:latest: not found";
        match classify_parts(tonic::Code::Unknown, msg.into(), ErrorDetails::default()) {
            BuildError::BaseImageNotFound { image, message } => {
                assert_eq!(image, "docker.io/library/nosuchimage-xyz:latest");
                assert_eq!(message, msg);
            }
            other => panic!("wrong variant {other:?}"),
        }
    }

    #[test]
    fn policy_denials_name_the_source_and_instruction() {
        let msg = r#"failed to load LLB: error evaluating the source policy: source "http://127.0.0.1:8080/healthz" denied by policy: source denied by policy"#;
        let e = classify_parts(tonic::Code::Unknown, msg.into(), ErrorDetails::default())
            .locate_in("FROM busybox\nADD http://127.0.0.1:8080/healthz /x\n");
        match &e {
            BuildError::SourceDenied {
                denied,
                instruction,
                message,
            } => {
                assert_eq!(denied, "http://127.0.0.1:8080/healthz");
                assert_eq!(
                    instruction,
                    &Some((2, "ADD http://127.0.0.1:8080/healthz /x".to_owned()))
                );
                assert_eq!(message, msg);
            }
            other => panic!("wrong variant {other:?}"),
        }
        assert!(
            e.to_string().starts_with("the Dockerfile names http://127.0.0.1:8080/healthz (line 2: ADD http://127.0.0.1:8080/healthz /x), which perfbox does not fetch"),
            "{e}"
        );
        // A denied image is not "not found".
        let msg = r#"failed to resolve source metadata for quay.io/foo/bar:1: could not resolve image due to policy: source "docker-image://quay.io/foo/bar:1" denied by policy"#;
        assert!(matches!(
            classify_parts(tonic::Code::Unknown, msg.into(), ErrorDetails::default()),
            BuildError::SourceDenied { .. }
        ));
    }

    #[test]
    fn daemon_shutdown_is_daemon_lost() {
        let msg = "got 1 SIGTERM/SIGINTs, forcing shutdown";
        assert!(matches!(
            classify_parts(tonic::Code::Unknown, msg.into(), ErrorDetails::default()),
            BuildError::DaemonLost { ref message } if message == msg
        ));
    }

    #[test]
    fn a_cancel_nobody_asked_for_is_the_daemon_going_away() {
        let unasked = unasked_cancel_is_daemon_lost::<()>(Err(BuildError::Cancelled), false);
        assert!(
            matches!(unasked, Err(BuildError::DaemonLost { ref message }) if message.contains("did not ask")),
            "{unasked:?}"
        );
        let asked = unasked_cancel_is_daemon_lost::<()>(Err(BuildError::Cancelled), true);
        assert!(matches!(asked, Err(BuildError::Cancelled)), "{asked:?}");
        let other = unasked_cancel_is_daemon_lost::<()>(Ok(()), false);
        assert!(other.is_ok());
    }

    #[test]
    fn other_errors_keep_message() {
        let e = classify_parts(
            tonic::Code::Unknown,
            "weird".into(),
            ErrorDetails::default(),
        );
        assert!(matches!(e, BuildError::Other { ref message } if message == "weird"));
        assert_eq!(e.to_string(), "build failed: weird");
    }

    #[test]
    fn display_strings() {
        let e = BuildError::DockerfileSyntax {
            line: Some(1),
            message: "m".into(),
        };
        assert_eq!(e.to_string(), "Dockerfile syntax error on line 1: m");
        let e = BuildError::DaemonUnavailable {
            addr: "unix:///x.sock".into(),
            message: "refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "buildkitd at unix:///x.sock is unavailable: refused"
        );
    }

    #[test]
    fn transport_errors_are_recognised() {
        assert!(is_transport_error(&tonic::Status::unavailable("x")));
        assert!(is_transport_error(&tonic::Status::unknown(
            "transport error"
        )));
        assert!(!is_transport_error(&tonic::Status::unknown("exit code: 3")));
    }
}
