//! perfbox's configuration: a TOML file (`/etc/perfbox/config.toml` by default), then
//! `PERFBOX_*` environment variables, then command-line flags — each overriding the previous.
//! Every option and its default is documented in `systemd/config.example.toml`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sandbox::policy::Limits;
use crate::sandbox::runtime::RuntimeKind;

/// The default config file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/perfbox/config.toml";

/// One API token and the name its jobs are filed under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// Owner name (shown in job records).
    pub name: String,
    /// The bearer token.
    pub token: String,
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

impl Config {
    /// Load `path` (or the default file if it exists), then apply `PERFBOX_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(p) => Self::from_file(p)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => Self::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    /// Parse a TOML file.
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

    /// Apply `PERFBOX_*` overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &str, v: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.parse().map_err(|e: T::Err| ConfigError::Env {
                var: var.into(),
                message: e.to_string(),
            })
        }
        if let Some(v) = get("PERFBOX_BIND") {
            self.bind = v;
        }
        if let Some(v) = get("PERFBOX_STATE_DIR") {
            self.state_dir = v.into();
        }
        if let Some(v) = get("PERFBOX_BUILDKIT_ADDR") {
            self.buildkit_addr = v;
        }
        if let Some(v) = get("PERFBOX_RUNTIME") {
            self.runtime = parse("PERFBOX_RUNTIME", v)?;
        }
        if let Some(v) = get("PERFBOX_RUNTIME_USER") {
            self.runtime_user = Some(v);
        }
        if let Some(v) = get("PERFBOX_CGROUP_PARENT") {
            self.cgroup_parent = Some(v);
        }
        if let Some(v) = get("PERFBOX_BUILDKIT_ROOT") {
            self.buildkit_root = (!v.is_empty()).then(|| v.into());
        }
        if let Some(v) = get("PERFBOX_REGISTRIES") {
            self.build.registries = v
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(v) = get("PERFBOX_BUILD_CGROUP_PARENT") {
            self.build.cgroup_parent = v;
        }
        if let Some(v) = get("PERFBOX_BUILD_CACHE_SCOPE") {
            self.build.cache_scope = match v.as_str() {
                "job" => CacheScope::Job,
                "owner" => CacheScope::Owner,
                _ => {
                    return Err(ConfigError::Env {
                        var: "PERFBOX_BUILD_CACHE_SCOPE".into(),
                        message: format!("{v:?} is not job or owner"),
                    });
                }
            };
        }
        if let Some(v) = get("PERFBOX_MAX_IMAGE_BYTES") {
            self.build.max_image_bytes = parse("PERFBOX_MAX_IMAGE_BYTES", v)?;
        }
        if let Some(v) = get("PERFBOX_MAX_BUILDS_PER_OWNER") {
            self.build.max_builds_per_owner = parse("PERFBOX_MAX_BUILDS_PER_OWNER", v)?;
        }
        if let Some(v) = get("PERFBOX_MAX_CONCURRENT_BUILDS") {
            self.max_concurrent_builds = parse("PERFBOX_MAX_CONCURRENT_BUILDS", v)?;
        }
        if let Some(v) = get("PERFBOX_MAX_CONCURRENT_RUNS") {
            self.max_concurrent_runs = parse("PERFBOX_MAX_CONCURRENT_RUNS", v)?;
        }
        if let Some(v) = get("PERFBOX_RUN_TIMEOUT_SECS") {
            self.limits.timeout_secs = parse("PERFBOX_RUN_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = get("PERFBOX_BUILD_TIMEOUT_SECS") {
            self.build_timeout_secs = parse("PERFBOX_BUILD_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = get("PERFBOX_MIN_FREE_DISK_BYTES") {
            self.min_free_disk_bytes = parse("PERFBOX_MIN_FREE_DISK_BYTES", v)?;
        }
        if let Some(v) = get("PERFBOX_DATA_BYTES") {
            self.limits.data_bytes = parse("PERFBOX_DATA_BYTES", v)?;
        }
        if let Some(v) = get("PERFBOX_MEMORY_BYTES") {
            self.limits.memory_bytes = parse("PERFBOX_MEMORY_BYTES", v)?;
        }
        if let Some(v) = get("PERFBOX_TOKENS") {
            // name=token,name=token
            self.tokens = v
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|pair| {
                    let (name, token) = pair.split_once('=').ok_or_else(|| ConfigError::Env {
                        var: "PERFBOX_TOKENS".into(),
                        message: "expected name=token[,name=token...]".into(),
                    })?;
                    Ok(Token {
                        name: name.into(),
                        token: token.into(),
                    })
                })
                .collect::<Result<_, ConfigError>>()?;
        }
        Ok(())
    }

    /// Reject unusable combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        if self.tokens.iter().any(|t| t.token.len() < 8) {
            return Err(ConfigError::Invalid(
                "every token must be at least 8 characters".into(),
            ));
        }
        Ok(())
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
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "PERFBOX_REGISTRIES" => Some("127.0.0.1:5001,reg.example".into()),
            "PERFBOX_BUILD_CACHE_SCOPE" => Some("owner".into()),
            "PERFBOX_MAX_IMAGE_BYTES" => Some("1000".into()),
            "PERFBOX_BUILD_CGROUP_PARENT" => Some("".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.build.registries, ["127.0.0.1:5001", "reg.example"]);
        assert_eq!(c.build.cache_scope, CacheScope::Owner);
        assert_eq!(c.build.max_image_bytes, 1000);
        assert_eq!(c.build.cgroup_parent, "");
        assert!(
            c.apply_env(|k| (k == "PERFBOX_BUILD_CACHE_SCOPE").then(|| "all".into()))
                .is_err()
        );
    }

    #[test]
    fn file_then_env_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "bind = \"127.0.0.1:9000\"\nruntime = \"crun\"\n[limits]\nmemory_bytes = 1\npids = 2\ncpu_millicores = 3\ntmpfs_bytes = 4\nnofile = 5\nnproc = 6\nfsize_bytes = 7\ntimeout_secs = 8\nlog_bytes = 9\n").unwrap();
        let mut c = Config::from_file(&f).unwrap();
        assert_eq!(c.bind, "127.0.0.1:9000");
        assert_eq!(c.runtime, RuntimeKind::Crun);
        assert_eq!(c.limits.timeout_secs, 8);
        assert_eq!(c.max_concurrent_runs, 4, "unset keys keep defaults");
        c.apply_env(|k| match k {
            "PERFBOX_RUNTIME" => Some("youki".into()),
            "PERFBOX_TOKENS" => Some("alice=aaaaaaaaaa,bob=bbbbbbbbbb".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.runtime, RuntimeKind::Youki);
        assert_eq!(c.tokens.len(), 2);
        c.validate().unwrap();
        std::fs::write(&f, "bogus_option = 1\n").unwrap();
        assert!(matches!(
            Config::from_file(&f),
            Err(ConfigError::Parse { .. })
        ));
        assert!(
            c.apply_env(|k| (k == "PERFBOX_RUNTIME").then(|| "docker".into()))
                .is_err()
        );
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
    }
}
