//! perfbox's configuration: a TOML file (`/etc/perfbox/config.toml` by default), then
//! `PERFBOX_*` environment variables, then command-line flags — each overriding the previous.
//! Every option and its default is documented in `systemd/config.example.toml`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sandbox::policy::Limits;
use crate::sandbox::runtime::RuntimeKind;

/// The default config file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/perfbox/config.toml";

/// One API token and the name its jobs are filed under. The token is kept as its SHA-256
/// (`sha256`, what `perfbox token new` prints), or, for compatibility, in clear (`token`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// Owner name (shown in job records).
    pub name: String,
    /// The bearer token in clear (discouraged: anyone who reads the config can use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The SHA-256 of the bearer token, 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl Token {
    /// A token given in clear.
    pub fn clear(name: &str, token: &str) -> Self {
        Self {
            name: name.into(),
            token: Some(token.into()),
            sha256: None,
        }
    }

    /// The SHA-256 a presented token must hash to (None if the entry is invalid; see
    /// [`Config::validate`]).
    pub fn digest(&self) -> Option<[u8; 32]> {
        use sha2::Digest;
        match (&self.token, &self.sha256) {
            (Some(t), None) => Some(sha2::Sha256::digest(t.as_bytes()).into()),
            (None, Some(h)) => hex::decode(h.trim()).ok()?.try_into().ok(),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// A read-only dataset a job may ask for (`[[datasets]]`), mounted at `/input` in its run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    /// What submissions call it (`dataset` field, `perfbox submit --dataset`).
    pub name: String,
    /// The host directory (absolute), readable by the runtime user.
    pub path: PathBuf,
}

/// Callbacks (`[callbacks]`): where submissions may ask for their answer to be POSTed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Callbacks {
    /// Hosts (`host` or `host:port`) a `callback_url` may name; empty: callbacks are off.
    pub allowed_hosts: Vec<String>,
    /// The HMAC-SHA256 key every callback body is signed with (required with hosts).
    pub secret: Option<String>,
    /// Tries per callback (backoff 1 s, doubling, at most a minute).
    pub max_attempts: u32,
}

impl Default for Callbacks {
    fn default() -> Self {
        Self {
            allowed_hosts: vec![],
            secret: None,
            max_attempts: 5,
        }
    }
}

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callbacks")
            .field("allowed_hosts", &self.allowed_hosts)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

/// Build contexts (`[context]`): what a submission's archive may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContextLimits {
    /// The archive as uploaded (413 past it).
    pub max_archive_bytes: u64,
    /// Its files' apparent size once unpacked (a small archive may hold much: 400 past it).
    pub max_unpacked_bytes: u64,
    /// Its entries (files, directories, links).
    pub max_entries: u64,
}

impl Default for ContextLimits {
    fn default() -> Self {
        Self {
            max_archive_bytes: 64 << 20,
            max_unpacked_bytes: 512 << 20,
            max_entries: 100_000,
        }
    }
}

/// TLS on the API (`[tls]`): PEM files, read at start and again on SIGHUP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain (server certificate first).
    pub cert: Option<PathBuf>,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Both files, when TLS is on.
    pub fn paths(&self) -> Option<(&Path, &Path)> {
        Some((self.cert.as_deref()?, self.key.as_deref()?))
    }
}

/// What one owner (a token, or a client address without tokens) may take (`[quotas]`). Build
/// slots per owner are `build.max_builds_per_owner`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    /// Submissions per minute (a token bucket of this size, refilled evenly): 429 past it.
    pub submissions_per_minute: u32,
    /// Jobs of one owner waiting at once: 429 past it.
    pub queued_per_owner: usize,
    /// Runs of one owner at once (on each node); its other built jobs wait their turn.
    pub runs_per_owner: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            submissions_per_minute: 60,
            queued_per_owner: 100,
            runs_per_owner: 2,
        }
    }
}

/// Which way perf ranks (`[leaderboard] direction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A higher perf is better (a score).
    #[default]
    Higher,
    /// A lower perf is better (a time, an error).
    Lower,
}

/// The leaderboard (`[leaderboard]`): `GET /leaderboard` and the web page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LeaderboardConfig {
    /// Which way perf ranks.
    pub direction: Direction,
    /// Every caller sees every owner's entries (rank, owner, perf, when), though not their jobs:
    /// a shared board for a challenge. Off by default: a token sees its own jobs only, as
    /// everywhere else.
    pub public: bool,
}

/// How the API treats connections (`[http]`): slow or idle clients are cut off, never a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Time for a client to finish its TLS handshake and send a request's headers.
    pub header_timeout_secs: u64,
    /// Time from the headers of a request with a body (POST, PUT, DELETE) to the start of its
    /// answer (the body must arrive within it): 408 past it. GET requests are not limited here
    /// (`?wait=` holds its answer on purpose).
    pub request_timeout_secs: u64,
    /// Connections open at once; further ones wait to be accepted.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout_secs: 10,
            request_timeout_secs: 60,
            max_connections: 512,
        }
    }
}

/// Network for RUN steps of builds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildNetworkSetting {
    /// No network at all (force-network-mode=none). The default.
    #[default]
    None,
    /// A network that cannot reach the host's loopback, through the separate networked buildkitd
    /// (`buildkit_net_addr`).
    Isolated,
}

/// Whose build cache a build may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Its own only: cache mounts and RUN results never cross jobs (the default).
    #[default]
    Job,
    /// Those of jobs submitted with the same token (or, without tokens, from the same client
    /// address), never wider.
    Owner,
}

/// How builds are kept apart from each other and from the host (`[build]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildIsolation {
    /// Registries images may come from (`host:port`); an image named without one comes from the
    /// first. Must match the daemon's mirror (sandbox/buildkitd.toml.in).
    pub registries: Vec<String>,
    /// Remote sources (`http://`, `https://`, `git://` patterns with a literal host) a Dockerfile
    /// may fetch; empty by default. Loopback, link-local, metadata and host addresses are refused.
    pub allowed_remote_sources: Vec<String>,
    /// Whose cache a build may use.
    pub cache_scope: CacheScope,
    /// The cgroup (inside the hierarchy) under which each build's RUN steps get a cgroup of their
    /// own with the limits below; prepared by setup (a local daemon only). Empty: none.
    pub cgroup_parent: String,
    /// Memory limit of one build's RUN steps (cgroup).
    pub memory_bytes: u64,
    /// Process limit of one build's RUN steps (cgroup pids.max).
    pub pids: u64,
    /// Largest image a build may export (apparent size), and most disk its RUN steps may fill
    /// while it runs: the build stops and the job fails past it.
    pub max_image_bytes: u64,
    /// Most files and directories a build's RUN steps may create, and its image may hold.
    pub max_image_files: u64,
    /// Build slots one owner (token, or client address without tokens) may hold at once.
    pub max_builds_per_owner: usize,
    /// Logins for registries that ask for one (the daemon asks perfbox's session for them).
    pub registry_logins: Vec<RegistryLogin>,
}

/// A login for one registry (`[[build.registry_logins]]`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryLogin {
    /// The registry host as the daemon names it (`127.0.0.1:5000`, `registry.example.org`).
    pub host: String,
    /// User name.
    pub username: String,
    /// Password or token (never printed).
    pub secret: String,
}

impl std::fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryLogin")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Default for BuildIsolation {
    fn default() -> Self {
        Self {
            registries: vec![crate::buildkit::policy::DEFAULT_REGISTRY.into()],
            allowed_remote_sources: vec![],
            cache_scope: CacheScope::Job,
            cgroup_parent: "/perfbox-build/runs".into(),
            memory_bytes: 2 << 30,
            pids: 512,
            max_image_bytes: 8 << 30,
            max_image_files: 1_000_000,
            max_builds_per_owner: 1,
            registry_logins: vec![],
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP listen address.
    pub bind: String,
    /// Where the SQLite database and job directories live.
    pub state_dir: PathBuf,
    /// buildkitd address: `unix:///path`, `/path` or `tcp://host:port`.
    pub buildkit_addr: String,
    /// TLS for a `tcp://` buildkitd (None: plaintext, for loopback only).
    pub buildkit_tls: Option<crate::buildkit::TlsOptions>,
    /// Network for build RUN steps.
    pub build_network: BuildNetworkSetting,
    /// The networked buildkitd used when `build_network = "isolated"`.
    pub buildkit_net_addr: String,
    /// OCI runtime.
    pub runtime: RuntimeKind,
    /// Unprivileged user that runs containers when perfbox itself runs as root (else: ourselves).
    pub runtime_user: Option<String>,
    /// Parent cgroup of job cgroups (inside the hierarchy).
    pub cgroup_parent: Option<String>,
    /// Concurrent builds.
    pub max_concurrent_builds: usize,
    /// Concurrent runs.
    pub max_concurrent_runs: usize,
    /// Wall clock for one build.
    pub build_timeout_secs: u64,
    /// Largest Dockerfile accepted.
    pub max_dockerfile_bytes: usize,
    /// Jobs waiting at most (further submissions get 503).
    pub max_queued_jobs: usize,
    /// Size bound of the shared image cache (root filesystems), LRU-evicted, never under a job.
    pub image_cache_bytes: u64,
    /// A build is refused, or stopped, when the disk holding `state_dir` or `buildkit_root` has
    /// less free space than this (a RUN step can write until the disk is full).
    pub min_free_disk_bytes: u64,
    /// BuildKit's root directory, when the daemon is local (watched for free space).
    pub buildkit_root: Option<PathBuf>,
    /// Build isolation.
    pub build: BuildIsolation,
    /// Sandbox limits for each run.
    pub limits: Limits,
    /// API tokens; empty = no authentication.
    pub tokens: Vec<Token>,
    /// Serve a non-loopback `bind` with no tokens (anyone who reaches it may run jobs).
    pub allow_anonymous_public: bool,
    /// TLS on the API.
    pub tls: TlsFiles,
    /// Per-owner quotas.
    pub quotas: Quotas,
    /// Connection hygiene.
    pub http: HttpLimits,
    /// How the leaderboard ranks, and who sees it.
    pub leaderboard: LeaderboardConfig,
    /// Datasets jobs may ask for (read-only at `/input` in the run).
    pub datasets: Vec<Dataset>,
    /// Callbacks.
    pub callbacks: Callbacks,
    /// Build contexts.
    pub context: ContextLimits,
    /// The job store: None for the embedded SQLite file in `state_dir`; a `postgres://` URL for
    /// a PostgreSQL database that several perfbox nodes share (see docs/scaling.md).
    pub database_url: Option<String>,
    /// This node's API as other nodes and `GET /nodes` show it (default: `http://<bind>`).
    pub node_url: Option<String>,
    /// How long a node's claim on a job holds without renewal (renewed every third of it); a
    /// node silent for longer loses its jobs to the others.
    pub lease_secs: u64,
    /// With a shared (PostgreSQL) store: how many times a job may be claimed before a lost node
    /// ends it `interrupted` rather than queueing it again. With SQLite a job whose perfbox
    /// stopped is `interrupted` at once.
    pub max_attempts: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            state_dir: "/var/lib/perfbox/service".into(),
            buildkit_addr: "unix:///run/perfbox/buildkit/buildkitd.sock".into(),
            buildkit_tls: None,
            build_network: BuildNetworkSetting::None,
            buildkit_net_addr: "unix:///run/perfbox/buildkit-net/buildkitd.sock".into(),
            runtime: RuntimeKind::Runc,
            runtime_user: None,
            cgroup_parent: None,
            max_concurrent_builds: 2,
            max_concurrent_runs: 4,
            build_timeout_secs: 300,
            max_dockerfile_bytes: 1 << 20,
            max_queued_jobs: 10_000,
            image_cache_bytes: 10 << 30,
            min_free_disk_bytes: 2 << 30,
            buildkit_root: Some("/var/lib/perfbox/buildkit/root".into()),
            build: BuildIsolation::default(),
            limits: Limits::default(),
            tokens: vec![],
            allow_anonymous_public: false,
            tls: TlsFiles::default(),
            quotas: Quotas::default(),
            http: HttpLimits::default(),
            leaderboard: LeaderboardConfig::default(),
            datasets: vec![],
            callbacks: Callbacks::default(),
            context: ContextLimits::default(),
            database_url: None,
            node_url: None,
            lease_secs: 60,
            max_attempts: 3,
        }
    }
}

/// Errors loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An environment variable is not valid.
    #[error("invalid value for {var}: {message}")]
    Env {
        /// Variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// The combination is not valid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One option of the configuration: where it sits in the TOML file, and the environment variable
/// and `perfbox serve` flag that set it. Each option is declared once here (its type, default and
/// meaning are its field of [`Config`]); the file, the environment and the flags are all resolved
/// from this table, and a unit test checks that it names every option exactly once.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    /// Path in the file (`build.max_image_bytes` is `max_image_bytes` in `[build]`).
    pub path: &'static str,
    /// Environment variable, if the option can be set from the environment.
    pub env: Option<&'static str>,
    /// `perfbox serve --<flag>`, if any.
    pub flag: Option<&'static str>,
}

const fn opt(path: &'static str, env: &'static str, flag: Option<&'static str>) -> Opt {
    Opt {
        path,
        env: Some(env),
        flag,
    }
}

/// Options set in the file only (tables and secrets).
const fn file_only(path: &'static str) -> Opt {
    Opt {
        path,
        env: None,
        flag: None,
    }
}

/// Every option (see [`Opt`]). Lists take comma-separated values from the environment (`tokens`:
/// `name=token,name=token`); an empty value unsets an optional path.
pub const OPTIONS: &[Opt] = &[
    opt("bind", "PERFBOX_BIND", Some("bind")),
    opt("state_dir", "PERFBOX_STATE_DIR", Some("state-dir")),
    opt(
        "buildkit_addr",
        "PERFBOX_BUILDKIT_ADDR",
        Some("buildkit-addr"),
    ),
    file_only("buildkit_tls"),
    opt("build_network", "PERFBOX_BUILD_NETWORK", None),
    opt("buildkit_net_addr", "PERFBOX_BUILDKIT_NET_ADDR", None),
    opt("runtime", "PERFBOX_RUNTIME", Some("runtime")),
    opt("runtime_user", "PERFBOX_RUNTIME_USER", None),
    opt("cgroup_parent", "PERFBOX_CGROUP_PARENT", None),
    opt(
        "max_concurrent_builds",
        "PERFBOX_MAX_CONCURRENT_BUILDS",
        None,
    ),
    opt("max_concurrent_runs", "PERFBOX_MAX_CONCURRENT_RUNS", None),
    opt("build_timeout_secs", "PERFBOX_BUILD_TIMEOUT_SECS", None),
    opt("max_dockerfile_bytes", "PERFBOX_MAX_DOCKERFILE_BYTES", None),
    opt("max_queued_jobs", "PERFBOX_MAX_QUEUED_JOBS", None),
    opt("image_cache_bytes", "PERFBOX_IMAGE_CACHE_BYTES", None),
    opt("min_free_disk_bytes", "PERFBOX_MIN_FREE_DISK_BYTES", None),
    opt("buildkit_root", "PERFBOX_BUILDKIT_ROOT", None),
    opt("build.registries", "PERFBOX_REGISTRIES", None),
    opt(
        "build.allowed_remote_sources",
        "PERFBOX_ALLOWED_REMOTE_SOURCES",
        None,
    ),
    opt("build.cache_scope", "PERFBOX_BUILD_CACHE_SCOPE", None),
    opt("build.cgroup_parent", "PERFBOX_BUILD_CGROUP_PARENT", None),
    opt("build.memory_bytes", "PERFBOX_BUILD_JOB_MEMORY_BYTES", None),
    opt("build.pids", "PERFBOX_BUILD_JOB_PIDS", None),
    opt("build.max_image_bytes", "PERFBOX_MAX_IMAGE_BYTES", None),
    opt("build.max_image_files", "PERFBOX_MAX_IMAGE_FILES", None),
    opt(
        "build.max_builds_per_owner",
        "PERFBOX_MAX_BUILDS_PER_OWNER",
        None,
    ),
    file_only("build.registry_logins"),
    opt("limits.memory_bytes", "PERFBOX_MEMORY_BYTES", None),
    opt("limits.pids", "PERFBOX_PIDS", None),
    opt("limits.cpu_millicores", "PERFBOX_CPU_MILLICORES", None),
    opt("limits.tmpfs_bytes", "PERFBOX_TMPFS_BYTES", None),
    opt("limits.nofile", "PERFBOX_NOFILE", None),
    opt("limits.nproc", "PERFBOX_NPROC", None),
    opt("limits.fsize_bytes", "PERFBOX_FSIZE_BYTES", None),
    opt("limits.timeout_secs", "PERFBOX_RUN_TIMEOUT_SECS", None),
    opt("limits.log_bytes", "PERFBOX_LOG_BYTES", None),
    opt("limits.data_bytes", "PERFBOX_DATA_BYTES", None),
    opt("limits.data_files", "PERFBOX_DATA_FILES", None),
    opt("tokens", "PERFBOX_TOKENS", None),
    opt(
        "allow_anonymous_public",
        "PERFBOX_ALLOW_ANONYMOUS_PUBLIC",
        None,
    ),
    opt(
        "leaderboard.direction",
        "PERFBOX_LEADERBOARD_DIRECTION",
        None,
    ),
    opt("leaderboard.public", "PERFBOX_LEADERBOARD_PUBLIC", None),
    opt("tls.cert", "PERFBOX_TLS_CERT", Some("tls-cert")),
    opt("tls.key", "PERFBOX_TLS_KEY", Some("tls-key")),
    opt(
        "quotas.submissions_per_minute",
        "PERFBOX_SUBMISSIONS_PER_MINUTE",
        None,
    ),
    opt("quotas.queued_per_owner", "PERFBOX_QUEUED_PER_OWNER", None),
    opt("quotas.runs_per_owner", "PERFBOX_RUNS_PER_OWNER", None),
    opt(
        "http.header_timeout_secs",
        "PERFBOX_HEADER_TIMEOUT_SECS",
        None,
    ),
    opt(
        "http.request_timeout_secs",
        "PERFBOX_REQUEST_TIMEOUT_SECS",
        None,
    ),
    opt("http.max_connections", "PERFBOX_MAX_CONNECTIONS", None),
    file_only("datasets"),
    opt("callbacks.allowed_hosts", "PERFBOX_CALLBACK_HOSTS", None),
    opt("callbacks.secret", "PERFBOX_CALLBACK_SECRET", None),
    opt(
        "context.max_archive_bytes",
        "PERFBOX_CONTEXT_MAX_ARCHIVE_BYTES",
        None,
    ),
    opt(
        "context.max_unpacked_bytes",
        "PERFBOX_CONTEXT_MAX_UNPACKED_BYTES",
        None,
    ),
    opt("context.max_entries", "PERFBOX_CONTEXT_MAX_ENTRIES", None),
    opt(
        "callbacks.max_attempts",
        "PERFBOX_CALLBACK_MAX_ATTEMPTS",
        None,
    ),
    opt("database_url", "PERFBOX_DATABASE_URL", Some("database-url")),
    opt("node_url", "PERFBOX_NODE_URL", None),
    opt("lease_secs", "PERFBOX_LEASE_SECS", None),
    opt("max_attempts", "PERFBOX_MAX_ATTEMPTS", None),
];

/// The slot of `path` (`a.b`) in a JSON tree.
fn lookup<'a>(tree: &'a mut serde_json::Value, path: &str) -> Option<&'a mut serde_json::Value> {
    path.split('.')
        .try_fold(tree, |node, key| node.get_mut(key))
}

/// `raw` (from the environment or a flag) as a JSON value of the kind `current` is.
fn value_like(
    current: &serde_json::Value,
    path: &str,
    raw: &str,
) -> Result<serde_json::Value, String> {
    use serde_json::Value;
    let list = || raw.split(',').filter(|s| !s.is_empty());
    Ok(match current {
        Value::Number(_) => Value::Number(
            raw.trim()
                .parse::<u64>()
                .map_err(|e| format!("{raw:?} is not a whole number: {e}"))?
                .into(),
        ),
        Value::Bool(_) => Value::Bool(
            raw.trim()
                .parse()
                .map_err(|_| format!("{raw:?} is not true or false"))?,
        ),
        Value::Array(_) if path == "tokens" => Value::Array(
            list()
                .map(|pair| {
                    let (name, token) = pair
                        .split_once('=')
                        .ok_or("expected name=token[,name=sha256:<hex>...]")?;
                    Ok(match token.strip_prefix("sha256:") {
                        Some(hash) => serde_json::json!({ "name": name, "sha256": hash }),
                        None => serde_json::json!({ "name": name, "token": token }),
                    })
                })
                .collect::<Result<_, String>>()?,
        ),
        Value::Array(_) => Value::Array(list().map(|s| Value::String(s.to_owned())).collect()),
        // An optional setting (null by default, or the optional buildkit_root) set to "" is unset.
        Value::Null | Value::String(_)
            if raw.is_empty() && (current.is_null() || path == "buildkit_root") =>
        {
            Value::Null
        }
        Value::Null | Value::String(_) => Value::String(raw.to_owned()),
        Value::Object(_) => return Err(format!("{path} is a table: set it in the config file")),
    })
}

impl Config {
    /// Resolve the configuration: the defaults, then `path` (or the default file if it exists),
    /// then the environment ([`OPTIONS`]' variables), then `flags` (`perfbox serve` flags, as
    /// `(option path, value)`).
    pub fn load(path: Option<&Path>, flags: &[(&str, String)]) -> Result<Self, ConfigError> {
        let base = match path {
            Some(p) => Self::from_file(p)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => Self::default(),
        };
        base.overridden(|k| std::env::var(k).ok(), flags)
    }

    /// Parse a TOML file (options it does not name keep their defaults).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// This configuration with the environment (read through `env`) and then `flags` applied,
    /// option by option as [`OPTIONS`] declares them.
    pub fn overridden(
        &self,
        env: impl Fn(&str) -> Option<String>,
        flags: &[(&str, String)],
    ) -> Result<Self, ConfigError> {
        let mut tree =
            serde_json::to_value(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut cfg = self.clone();
        let from_env = OPTIONS.iter().filter_map(|o| {
            let var = o.env?;
            env(var).map(|raw| (o.path, raw, var.to_owned()))
        });
        let from_flags = flags.iter().map(|(path, raw)| {
            let flag = OPTIONS
                .iter()
                .find(|o| o.path == *path)
                .and_then(|o| o.flag)
                .map_or_else(|| path.to_string(), |f| format!("--{f}"));
            (*path, raw.clone(), flag)
        });
        for (path, raw, source) in from_env.chain(from_flags).collect::<Vec<_>>() {
            let invalid = |message: String| ConfigError::Env {
                var: source.clone(),
                message,
            };
            let slot =
                lookup(&mut tree, path).ok_or_else(|| invalid(format!("no option {path}")))?;
            *slot = value_like(slot, path, &raw).map_err(invalid)?;
            cfg = serde_json::from_value(tree.clone()).map_err(|e| invalid(e.to_string()))?;
        }
        Ok(cfg)
    }

    /// Reject unusable combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.lease_secs < 3 || self.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "lease_secs must be >= 3 and max_attempts >= 1".into(),
            ));
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid(format!(
                "database_url must be a postgres:// URL (got {url:?}); leave it out for SQLite"
            )));
        }
        if self.max_concurrent_builds == 0 || self.max_concurrent_runs == 0 {
            return Err(ConfigError::Invalid(
                "max_concurrent_builds and max_concurrent_runs must be >= 1".into(),
            ));
        }
        if self.limits.timeout_secs == 0 || self.build_timeout_secs == 0 {
            return Err(ConfigError::Invalid("timeouts must be >= 1 second".into()));
        }
        if self.build.max_builds_per_owner == 0 {
            return Err(ConfigError::Invalid(
                "build.max_builds_per_owner must be >= 1".into(),
            ));
        }
        if self.build.max_image_bytes == 0 {
            return Err(ConfigError::Invalid(
                "build.max_image_bytes must be >= 1".into(),
            ));
        }
        self.source_policy()?;
        self.validate_tokens()?;
        self.validate_datasets()?;
        if !self.callbacks.allowed_hosts.is_empty()
            && self
                .callbacks
                .secret
                .as_deref()
                .is_none_or(|s| s.len() < 16)
        {
            return Err(ConfigError::Invalid(
                "[callbacks] allowed_hosts needs a secret of at least 16 characters to sign with"
                    .into(),
            ));
        }
        if self.quotas.submissions_per_minute == 0
            || self.quotas.queued_per_owner == 0
            || self.quotas.runs_per_owner == 0
        {
            return Err(ConfigError::Invalid(
                "every [quotas] value must be >= 1".into(),
            ));
        }
        if self.http.header_timeout_secs == 0
            || self.http.request_timeout_secs == 0
            || self.http.max_connections == 0
        {
            return Err(ConfigError::Invalid(
                "every [http] value must be >= 1".into(),
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "[tls] needs both cert and key (PEM files)".into(),
            ));
        }
        let addr: std::net::SocketAddr = self.bind.parse().map_err(|e| {
            ConfigError::Invalid(format!("bind {:?} is not ip:port: {e}", self.bind))
        })?;
        if !addr.ip().is_loopback() && self.tokens.is_empty() && !self.allow_anonymous_public {
            return Err(ConfigError::Invalid(format!(
                "bind {addr} is not a loopback address and no tokens are configured: anyone who \
                 can reach it could run code on this machine. Either configure tokens \
                 ([[tokens]]; `perfbox token new NAME` makes one), or set \
                 allow_anonymous_public = true if an open service is really meant (README: \
                 \"Exposing perfbox on a VM\")"
            )));
        }
        Ok(())
    }

    fn validate_datasets(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for d in &self.datasets {
            let invalid =
                |why: String| ConfigError::Invalid(format!("dataset {:?}: {why}", d.name));
            if d.name.is_empty()
                || d.name.len() > 64
                || !d
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(invalid("a name is 1-64 of A-Z a-z 0-9 . _ -".into()));
            }
            if !seen.insert(&d.name) {
                return Err(invalid("named twice".into()));
            }
            if !d.path.is_absolute() {
                return Err(invalid(format!(
                    "path {} is not absolute",
                    d.path.display()
                )));
            }
        }
        Ok(())
    }

    /// What a context archive may hold once unpacked.
    pub fn context_caps(&self) -> crate::jobs::context::Caps {
        crate::jobs::context::Caps {
            bytes: self.context.max_unpacked_bytes,
            entries: self.context.max_entries,
        }
    }

    /// The dataset called `name`, if configured.
    pub fn dataset(&self, name: &str) -> Option<&Dataset> {
        self.datasets.iter().find(|d| d.name == name)
    }

    fn validate_tokens(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for t in &self.tokens {
            let invalid = |why: &str| ConfigError::Invalid(format!("token {:?}: {why}", t.name));
            if t.name.trim().is_empty() {
                return Err(ConfigError::Invalid("every token needs a name".into()));
            }
            match (&t.token, &t.sha256) {
                (Some(clear), None) if clear.len() < 8 => {
                    return Err(invalid("a token must be at least 8 characters"));
                }
                (Some(_), None) => {}
                (None, Some(_)) if t.digest().is_none() => {
                    return Err(invalid("sha256 must be 64 hex digits"));
                }
                (None, Some(_)) => {}
                _ => return Err(invalid("give exactly one of sha256 (or, in clear, token)")),
            }
            if !seen.insert(t.digest()) {
                return Err(invalid("the same token is configured twice"));
            }
        }
        Ok(())
    }

    /// Whether the API serves a non-loopback address.
    pub fn binds_publicly(&self) -> bool {
        self.bind
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback())
    }

    /// Why the API's setup is weaker than it should be, if it is: shown at start and in
    /// `/healthz`.
    pub fn exposure_warning(&self) -> Option<String> {
        if !self.binds_publicly() || self.tls.paths().is_some() {
            return None;
        }
        Some(if self.tokens.is_empty() {
            format!(
                "{} is served to the network with no tokens and no TLS \
                 (allow_anonymous_public = true): anyone who reaches it may run jobs",
                self.bind
            )
        } else {
            format!(
                "{} is served to the network without TLS: bearer tokens cross it in clear \
                 (set [tls] cert and key, or put a TLS proxy in front and bind to loopback)",
                self.bind
            )
        })
    }
}

impl Config {
    /// The registry logins, as the BuildKit session serves them.
    pub fn registry_credentials(&self) -> crate::buildkit::RegistryCredentials {
        let mut creds = crate::buildkit::RegistryCredentials::new();
        for l in &self.build.registry_logins {
            creds.insert(l.host.clone(), l.username.clone(), l.secret.clone());
        }
        creds
    }

    /// The source policy of every build ([`crate::buildkit::policy`]), from `build.registries`
    /// and `build.allowed_remote_sources`.
    pub fn source_policy(&self) -> Result<crate::buildkit::SourcePolicy, ConfigError> {
        use crate::buildkit::{RemoteSource, SourcePolicy};
        let invalid =
            |e: crate::buildkit::PolicyError| ConfigError::Invalid(format!("[build] {e}"));
        let host = crate::buildkit::policy::host_addresses();
        let mut policy = SourcePolicy::new(&self.build.registries).map_err(invalid)?;
        for pattern in &self.build.allowed_remote_sources {
            policy = policy.allow_remote(RemoteSource::parse(pattern, &host).map_err(invalid)?);
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_isolation_settings_are_checked() {
        let mut c = Config::default();
        c.validate().unwrap();
        c.build.allowed_remote_sources = vec!["http://127.0.0.1:8080/*".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("loopback"), "{e}");
        c.build.allowed_remote_sources = vec!["https://files.example.org/*".into()];
        c.validate().unwrap();
        c.build.registries = vec![];
        assert!(c.validate().is_err());
        c.build.registries = vec!["127.0.0.1:5000".into()];
        c.build.max_builds_per_owner = 0;
        assert!(c.validate().is_err());
        let login: Config = toml::from_str(
            "[[build.registry_logins]]\nhost = \"reg.example\"\nusername = \"u\"\nsecret = \"s3cret\"\n",
        )
        .unwrap();
        assert!(!login.registry_credentials().is_empty());
        assert!(
            !format!("{login:?}").contains("s3cret"),
            "secrets are not printed"
        );
        let c = Config::default()
            .overridden(
                |k| match k {
                    "PERFBOX_REGISTRIES" => Some("127.0.0.1:5001,reg.example".into()),
                    "PERFBOX_BUILD_CACHE_SCOPE" => Some("owner".into()),
                    "PERFBOX_MAX_IMAGE_BYTES" => Some("1000".into()),
                    "PERFBOX_BUILD_CGROUP_PARENT" => Some("".into()),
                    _ => None,
                },
                &[],
            )
            .unwrap();
        assert_eq!(c.build.registries, ["127.0.0.1:5001", "reg.example"]);
        assert_eq!(c.build.cache_scope, CacheScope::Owner);
        assert_eq!(c.build.max_image_bytes, 1000);
        assert_eq!(c.build.cgroup_parent, "");
        assert!(
            c.overridden(
                |k| (k == "PERFBOX_BUILD_CACHE_SCOPE").then(|| "all".into()),
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn an_open_public_service_is_refused_and_weak_exposure_warned() {
        let public = |tokens: Vec<Token>, anon: bool, tls: bool| Config {
            bind: "0.0.0.0:8080".into(),
            tokens,
            allow_anonymous_public: anon,
            tls: if tls {
                TlsFiles {
                    cert: Some("/c.pem".into()),
                    key: Some("/k.pem".into()),
                }
            } else {
                TlsFiles::default()
            },
            ..Config::default()
        };
        let e = public(vec![], false, false)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("perfbox token new") && e.contains("allow_anonymous_public"),
            "{e}"
        );
        let anon = public(vec![], true, false);
        anon.validate().unwrap();
        assert!(anon.exposure_warning().unwrap().contains("no tokens"));
        let clear = public(vec![Token::clear("a", "secret-token")], false, false);
        clear.validate().unwrap();
        assert!(clear.exposure_warning().unwrap().contains("in clear"));
        assert_eq!(
            public(vec![Token::clear("a", "secret-token")], false, true).exposure_warning(),
            None
        );
        assert_eq!(Config::default().exposure_warning(), None, "loopback");
        let v6 = Config {
            bind: "[::1]:8080".into(),
            ..Config::default()
        };
        v6.validate().unwrap();
        let half_tls = Config {
            tls: TlsFiles {
                cert: Some("/c.pem".into()),
                key: None,
            },
            ..Config::default()
        };
        assert!(half_tls.validate().is_err());
    }

    #[test]
    fn tokens_are_hashed_or_clear_never_both() {
        use sha2::Digest;
        let hashed = |h: &str| Token {
            name: "a".into(),
            token: None,
            sha256: Some(h.into()),
        };
        let digest = hex::encode(sha2::Sha256::digest(b"secret-token"));
        let t = hashed(&digest);
        assert_eq!(t.digest(), Token::clear("a", "secret-token").digest());
        let with = |tokens| Config {
            tokens,
            ..Config::default()
        };
        with(vec![t.clone()]).validate().unwrap();
        assert!(with(vec![hashed("abc")]).validate().is_err(), "short hash");
        assert!(with(vec![Token::clear("a", "short")]).validate().is_err());
        let both = Token {
            token: Some("secret-token".into()),
            ..t.clone()
        };
        assert!(with(vec![both]).validate().is_err());
        assert!(
            with(vec![t.clone(), Token::clear("b", "secret-token")])
                .validate()
                .is_err(),
            "the same token twice"
        );
        let env = Config::default()
            .overridden(
                |k| (k == "PERFBOX_TOKENS").then(|| format!("a=sha256:{digest},b=clear-token")),
                &[],
            )
            .unwrap();
        assert_eq!(env.tokens[0], t);
        assert_eq!(env.tokens[1], Token::clear("b", "clear-token"));
        assert!(
            !format!("{env:?}").contains("clear-token"),
            "clear tokens are not printed"
        );
    }

    #[test]
    fn file_then_env_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "bind = \"127.0.0.1:9000\"\nruntime = \"crun\"\n[limits]\nmemory_bytes = 1\npids = 2\ncpu_millicores = 3\ntmpfs_bytes = 4\nnofile = 5\nnproc = 6\nfsize_bytes = 7\ntimeout_secs = 8\nlog_bytes = 9\n").unwrap();
        let c = Config::from_file(&f).unwrap();
        assert_eq!(c.bind, "127.0.0.1:9000");
        assert_eq!(c.runtime, RuntimeKind::Crun);
        assert_eq!(c.limits.timeout_secs, 8);
        assert_eq!(c.max_concurrent_runs, 4, "unset keys keep defaults");
        let env = |k: &str| match k {
            "PERFBOX_RUNTIME" => Some("youki".into()),
            "PERFBOX_TOKENS" => Some("alice=aaaaaaaaaa,bob=bbbbbbbbbb".into()),
            "PERFBOX_RUN_TIMEOUT_SECS" => Some("9".into()),
            "PERFBOX_BUILDKIT_ROOT" => Some("".into()),
            _ => None,
        };
        let c = c.overridden(env, &[]).unwrap();
        assert_eq!(c.runtime, RuntimeKind::Youki);
        assert_eq!(c.tokens.len(), 2);
        assert_eq!(c.tokens[1].name, "bob");
        assert_eq!(c.limits.timeout_secs, 9);
        assert_eq!(
            c.buildkit_root, None,
            "an empty value unsets an optional path"
        );
        c.validate().unwrap();
        // Flags win over the environment.
        let flagged = c
            .overridden(
                env,
                &[("runtime", "runc".into()), ("bind", "127.0.0.1:1".into())],
            )
            .unwrap();
        assert_eq!(
            (flagged.runtime, flagged.bind.as_str()),
            (RuntimeKind::Runc, "127.0.0.1:1")
        );
        std::fs::write(&f, "bogus_option = 1\n").unwrap();
        assert!(matches!(
            Config::from_file(&f),
            Err(ConfigError::Parse { .. })
        ));
        let bad = c.overridden(|k| (k == "PERFBOX_RUNTIME").then(|| "docker".into()), &[]);
        assert!(matches!(bad, Err(ConfigError::Env { ref var, .. }) if var == "PERFBOX_RUNTIME"));
        let bad = c.overridden(|k| (k == "PERFBOX_PIDS").then(|| "many".into()), &[]);
        assert!(matches!(bad, Err(ConfigError::Env { ref var, .. }) if var == "PERFBOX_PIDS"));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The scripts lay the machine out (scripts/lib/common.sh); the service's defaults must name
    /// the same places.
    #[test]
    fn defaults_match_the_scripts_layout() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lib/common.sh");
        let text = std::fs::read_to_string(path).unwrap();
        let default_of = |var: &str| -> String {
            let prefix = format!("{var}=${{{var}:-");
            let line = text
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("{var} has no default in common.sh"));
            line[prefix.len()..line.rfind('}').unwrap()].to_owned()
        };
        let c = Config::default();
        let state = default_of("PERFBOX_STATE");
        let run = default_of("PERFBOX_RUN");
        let cgroup = default_of("PERFBOX_CGROUP");
        assert_eq!(c.state_dir, Path::new(&state).join("service"));
        assert_eq!(
            c.buildkit_addr,
            format!("unix://{run}/buildkit/buildkitd.sock")
        );
        assert_eq!(
            c.buildkit_net_addr,
            format!("unix://{run}/buildkit-net/buildkitd.sock")
        );
        assert_eq!(
            c.buildkit_root.as_deref(),
            Some(Path::new(&state).join("buildkit/root").as_path())
        );
        assert_eq!(c.build.registries, [default_of("PERFBOX_REGISTRY")]);
        assert_eq!(c.build.cgroup_parent, format!("/{cgroup}-build/runs"));
        assert_eq!(c.bind, default_of("PERFBOX_BIND"));
        assert_eq!(
            crate::sandbox::cgroups::DEFAULT_PARENT,
            format!("/{cgroup}")
        );
    }

    /// The shipped example documents every option with its real default.
    #[test]
    fn example_config_is_complete_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/config.example.toml");
        let example = Config::from_file(&path).unwrap();
        assert_eq!(example, Config::default());
        let text = std::fs::read_to_string(&path).unwrap();
        let defaults = toml::to_string(&Config::default()).unwrap();
        for line in defaults.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            let documented =
                text.contains(&format!("{key} =")) || text.contains(&format!("[[{key}]]"));
            assert!(documented, "option {key} is not documented in the example");
        }
        for key in ["runtime_user", "cgroup_parent", "tokens"] {
            assert!(text.contains(key), "{key} is not documented");
        }
        // Every environment variable is named in the example, next to its option.
        for o in OPTIONS {
            if let Some(var) = o.env {
                assert!(text.contains(var), "{var} ({}) is not documented", o.path);
            }
        }
    }

    /// [`OPTIONS`] names every option of [`Config`] exactly once, and nothing else.
    #[test]
    fn every_option_is_declared_once() {
        fn leaves(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) if !prefix.is_empty() || !m.is_empty() => {
                    for (k, v) in m {
                        let path = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        // Tables of the file whose members are options of their own.
                        if matches!(
                            path.as_str(),
                            "build"
                                | "limits"
                                | "tls"
                                | "quotas"
                                | "http"
                                | "callbacks"
                                | "context"
                                | "leaderboard"
                        ) {
                            leaves(v, &path, out);
                        } else {
                            out.push(path);
                        }
                    }
                }
                _ => out.push(prefix.to_owned()),
            }
        }
        let mut paths = vec![];
        leaves(
            &serde_json::to_value(Config::default()).unwrap(),
            "",
            &mut paths,
        );
        let mut declared: Vec<String> = OPTIONS.iter().map(|o| o.path.to_owned()).collect();
        paths.sort();
        declared.sort();
        assert_eq!(declared, paths);
        let mut envs: Vec<&str> = OPTIONS.iter().filter_map(|o| o.env).collect();
        envs.sort();
        let n = envs.len();
        envs.dedup();
        assert_eq!(envs.len(), n, "an environment variable is used twice");
    }
}
