//! The source policy every solve carries: which sources a Dockerfile may make the daemon fetch.
//!
//! buildkitd runs with the host's network (rootlesskit `--net=host`: it must reach the loopback
//! registry), and it fetches `ADD http(s)://…`, git sources, `FROM`/`COPY --from` images and
//! `# syntax=` frontend images *itself*, outside any RUN step's network namespace. Without a policy
//! a Dockerfile could read any HTTP service the host reaches: perfbox's own API, the registry, a
//! cloud metadata server (`ADD http://127.0.0.1:8080/healthz /x`, `FROM 127.0.0.1:8080/x`).
//!
//! BuildKit evaluates the policy on the daemon for every source operation of the build, those of
//! frontends included, before anything is fetched; a Dockerfile cannot bypass it. Within one
//! policy the last matching ALLOW or DENY wins, and a CONVERT restarts the evaluation on the new
//! identifier. The rules, in order ([`SourcePolicy::to_proto`]):
//!
//! 1. `DENY *`: every source.
//! 2. `CONVERT docker-image://docker.io/*` → `docker-image://<first registry>/*`: an image named
//!    without a registry (`FROM busybox` is `docker.io/library/busybox`) comes from perfbox's
//!    registry, and a missing one is "not found" there; the daemon never falls back to Docker Hub.
//! 3. `ALLOW docker-image://<registry>/*` for each configured registry.
//! 4. `ALLOW <pattern>` for each configured remote source ([`RemoteSource`]): opt-in, and never a
//!    loopback, link-local, unspecified or metadata address, or one of the host's own.

use std::collections::HashMap;
use std::net::IpAddr;

use super::proto::sourcepolicy::{MatchType, Policy, PolicyAction, Rule, Selector, Update};

/// The one local source a build may read: the submission's context, served by perfbox's session.
pub const LOCAL_CONTEXT: &str = "local://context";

/// What a build may fetch. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePolicy {
    registries: Vec<String>,
    remote: Vec<RemoteSource>,
    /// The build reads the submission's own files from perfbox's session (`local://context`).
    context: bool,
}

/// Why a policy setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No registry: no image could be built.
    #[error("at least one registry is needed (images come only from configured registries)")]
    NoRegistry,
    /// A registry is not `host[:port]`.
    #[error("registry {0:?} is not host[:port] (no scheme, no path, no wildcard)")]
    BadRegistry(String),
    /// A remote source pattern is not of the accepted form.
    #[error("remote source {pattern:?}: {reason}")]
    BadRemote {
        /// The pattern as configured.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Default for SourcePolicy {
    /// Images from perfbox's default registry (`127.0.0.1:5000`) only.
    fn default() -> Self {
        Self {
            registries: vec![DEFAULT_REGISTRY.to_owned()],
            remote: Vec::new(),
            context: false,
        }
    }
}

/// perfbox's registry of base images when none is configured.
pub const DEFAULT_REGISTRY: &str = "127.0.0.1:5000";

impl SourcePolicy {
    /// Images only from `registries` (`host[:port]`; names without a registry go to the first),
    /// and nothing else. Remote sources are added with [`Self::allow_remote`].
    pub fn new<S: AsRef<str>>(registries: &[S]) -> Result<Self, PolicyError> {
        if registries.is_empty() {
            return Err(PolicyError::NoRegistry);
        }
        let registries = registries
            .iter()
            .map(|r| {
                let r = r.as_ref();
                let ok = !r.is_empty()
                    && r.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')
                    });
                if ok {
                    Ok(r.to_owned())
                } else {
                    Err(PolicyError::BadRegistry(r.to_owned()))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            registries,
            remote: Vec::new(),
            context: false,
        })
    }

    /// This policy, also letting the build read the submission's context from perfbox's own
    /// session (`local://context`, and no other local name).
    pub fn with_context(mut self) -> Self {
        self.context = true;
        self
    }

    /// Also allow the remote sources matching `source`.
    pub fn allow_remote(mut self, source: RemoteSource) -> Self {
        self.remote.push(source);
        self
    }

    /// The registries images may come from.
    pub fn registries(&self) -> &[String] {
        &self.registries
    }

    /// The remote sources allowed besides images.
    pub fn remote_sources(&self) -> &[RemoteSource] {
        &self.remote
    }

    /// The policy in BuildKit's protocol form, for `SolveRequest.source_policy`.
    pub(crate) fn to_proto(&self) -> Policy {
        let rule = |action: PolicyAction, identifier: String, update: Option<String>| Rule {
            action: action as i32,
            selector: Some(Selector {
                identifier,
                match_type: MatchType::Wildcard as i32,
                constraints: Vec::new(),
            }),
            updates: update.map(|identifier| Update {
                identifier,
                attrs: HashMap::new(),
            }),
        };
        let mut rules = vec![
            rule(PolicyAction::Deny, "*".into(), None),
            rule(
                PolicyAction::Convert,
                "docker-image://docker.io/*".into(),
                Some(format!("docker-image://{}/${{1}}", self.registries[0])),
            ),
        ];
        for r in &self.registries {
            rules.push(rule(
                PolicyAction::Allow,
                format!("docker-image://{r}/*"),
                None,
            ));
        }
        for r in &self.remote {
            rules.push(rule(PolicyAction::Allow, r.pattern.clone(), None));
        }
        if self.context {
            rules.push(rule(PolicyAction::Allow, LOCAL_CONTEXT.into(), None));
        }
        Policy { version: 1, rules }
    }

    /// The rules of [`Self::to_proto`], one line each (`DENY *`, `CONVERT a => b`, `ALLOW a`), in
    /// order: what a job record keeps as the policy its build ran under.
    pub fn rules_text(&self) -> Vec<String> {
        self.to_proto()
            .rules
            .iter()
            .map(|r| {
                let action =
                    PolicyAction::try_from(r.action).map_or("UNKNOWN", |a| a.as_str_name());
                let from = r.selector.as_ref().map_or("", |s| s.identifier.as_str());
                match &r.updates {
                    Some(u) => format!("{action} {from} => {}", u.identifier),
                    None => format!("{action} {from}"),
                }
            })
            .collect()
    }
}

/// An opt-in remote source a Dockerfile may fetch: `http://`, `https://` or `git://` (BuildKit's
/// name for every git URL), a literal host (no wildcard: BuildKit's `*` also matches `/` and `@`,
/// so a wildcard in the host could match any URL), then a path where `*` matches anything.
/// Example: `https://files.example.org/datasets/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSource {
    pattern: String,
}

impl RemoteSource {
    /// Check `pattern`; `host_addrs` are the host's own addresses, which are refused like
    /// loopback (the daemon shares the host's network).
    pub fn parse(pattern: &str, host_addrs: &[IpAddr]) -> Result<Self, PolicyError> {
        let bad = |reason: &str| PolicyError::BadRemote {
            pattern: pattern.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = ["http://", "https://", "git://"]
            .iter()
            .find_map(|s| pattern.strip_prefix(s))
            .ok_or_else(|| bad("must start with http://, https:// or git://"))?;
        let (authority, _path) = rest
            .split_once('/')
            .ok_or_else(|| bad("needs a path after the host (e.g. https://host/dir/*)"))?;
        if authority.is_empty() {
            return Err(bad("has no host"));
        }
        if authority.contains(['*', '@', '?', '#', '\\', ' ']) {
            return Err(bad(
                "the host must be literal: no wildcard, user info or special characters",
            ));
        }
        let host = host_of(authority);
        let lower = host.to_ascii_lowercase();
        if lower == "localhost"
            || lower.ends_with(".localhost")
            || lower == "metadata"
            || lower.starts_with("metadata.")
            || lower.ends_with(".internal")
        {
            return Err(bad(
                "names the host itself or a metadata server, which builds may never reach",
            ));
        }
        if let Ok(ip) = lower.parse::<IpAddr>() {
            if let Some(why) = forbidden_ip(&ip, host_addrs) {
                return Err(bad(&format!("{ip} is {why}, which builds may never reach")));
            }
        } else if lower.chars().all(|c| c.is_ascii_digit() || c == '.') || lower.starts_with("0x") {
            // 2130706433 or 0x7f.1: forms of an address that `IpAddr` does not parse.
            return Err(bad("the host must be a name or a dotted IPv4/IPv6 address"));
        }
        Ok(Self {
            pattern: pattern.to_owned(),
        })
    }

    /// The pattern as configured.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
}

/// `host` of `host[:port]` or `[v6]:port`.
fn host_of(authority: &str) -> &str {
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// Why `ip` may never be a build source, if it may not.
fn forbidden_ip(ip: &IpAddr, host_addrs: &[IpAddr]) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(*ip, IpAddr::V4),
        IpAddr::V4(_) => *ip,
    };
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    if ip.is_unspecified() {
        return Some("the unspecified address (the host itself)");
    }
    if host_addrs.contains(&ip) {
        return Some("an address of this host");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("link-local (169.254.0.0/16 holds cloud metadata servers)")
        }
        IpAddr::V4(v4) if v4.is_broadcast() || v4.is_multicast() => Some("not a unicast address"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local"),
        IpAddr::V6(v6) if v6.segments()[0] == 0xfd00 && v6.segments()[1..4] == [0xec2, 0, 0] => {
            Some("a cloud metadata address")
        }
        IpAddr::V6(v6) if v6.is_multicast() => Some("not a unicast address"),
        _ => None,
    }
}

/// The host's own addresses (every interface), which remote sources may not name.
pub fn host_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// A denied source named in a BuildKit error (`source "http://…" denied by policy`), if any.
pub(crate) fn denied_source(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("source \"")?;
    let (source, after) = rest.split_once('"')?;
    after
        .trim_start()
        .starts_with("denied by policy")
        .then(|| source.to_owned())
}

/// The Dockerfile line (1-based) and text of the instruction that names `source` (a BuildKit
/// source identifier such as `docker-image://quay.io/x:1` or `http://h/p`), for the error a user
/// reads. Continuation lines belong to the instruction they continue.
pub(crate) fn instruction_naming(dockerfile: &str, source: &str) -> Option<(u32, String)> {
    let bare = source.split_once("://").map_or(source, |(_, rest)| rest);
    // What a Dockerfile may have written for it: the URL itself, the image without the
    // registry that normalisation added, or (for git) the host.
    let image = bare
        .strip_prefix("docker.io/library/")
        .or_else(|| bare.strip_prefix("docker.io/"))
        .unwrap_or(bare);
    let image_no_tag = image.strip_suffix(":latest").unwrap_or(image);
    // A git URL is rewritten by BuildKit (`git@h:r.git` becomes `git://h/r.git`): its host is
    // the best clue left.
    let host = match source.strip_prefix("git://") {
        Some(rest) => rest.split(['/', ':']).next().unwrap_or(""),
        None => "",
    };
    let candidates = [source, bare, image, image_no_tag, host];
    let mut start = 0usize;
    let mut text = String::new();
    // (rank of the candidate matched, line, instruction): the most specific match wins.
    let mut found: Option<(usize, u32, String)> = None;
    for (i, line) in dockerfile.lines().enumerate() {
        if text.is_empty() {
            start = i;
        }
        let trimmed = line.trim_end();
        text.push_str(trimmed.trim_end_matches('\\'));
        if trimmed.ends_with('\\') {
            text.push(' ');
            continue;
        }
        let instruction = std::mem::take(&mut text);
        let t = instruction.trim_start();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        let rank = candidates
            .iter()
            .position(|c| !c.is_empty() && t.contains(c));
        if let Some(rank) = rank
            && found.as_ref().is_none_or(|(r, _, _)| rank < *r)
        {
            found = Some((rank, start as u32 + 1, t.to_owned()));
        }
    }
    found.map(|(_, line, text)| (line, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(p: &SourcePolicy) -> Vec<(i32, String, Option<String>)> {
        p.to_proto()
            .rules
            .into_iter()
            .map(|r| {
                (
                    r.action,
                    r.selector.unwrap().identifier,
                    r.updates.map(|u| u.identifier),
                )
            })
            .collect()
    }

    #[test]
    fn default_policy_denies_everything_but_the_registry() {
        let p = SourcePolicy::new(&["127.0.0.1:5000"]).unwrap();
        assert_eq!(
            rules(&p),
            vec![
                (PolicyAction::Deny as i32, "*".into(), None),
                (
                    PolicyAction::Convert as i32,
                    "docker-image://docker.io/*".into(),
                    Some("docker-image://127.0.0.1:5000/${1}".into())
                ),
                (
                    PolicyAction::Allow as i32,
                    "docker-image://127.0.0.1:5000/*".into(),
                    None
                ),
            ]
        );
        assert_eq!(p.to_proto().version, 1);
    }

    #[test]
    fn remote_sources_are_allowed_last() {
        let r = RemoteSource::parse("https://files.example.org/data/*", &[]).unwrap();
        let p = SourcePolicy::new(&["r.example:5000"])
            .unwrap()
            .allow_remote(r);
        let last = rules(&p).pop().unwrap();
        assert_eq!(
            last,
            (
                PolicyAction::Allow as i32,
                "https://files.example.org/data/*".into(),
                None
            )
        );
    }

    #[test]
    fn registries_must_be_plain_host_port() {
        assert_eq!(SourcePolicy::new::<&str>(&[]), Err(PolicyError::NoRegistry));
        for bad in ["", "http://x:5000", "x:5000/path", "*", "x y"] {
            assert!(SourcePolicy::new(&[bad]).is_err(), "{bad}");
        }
        assert!(SourcePolicy::new(&["127.0.0.1:5000", "[::1]:5000", "reg.example"]).is_ok());
    }

    #[test]
    fn remote_sources_never_reach_the_host_or_metadata() {
        let host = ["10.1.2.3".parse().unwrap()];
        for bad in [
            "http://127.0.0.1:8080/*",
            "http://127.1.2.3/x",
            "https://localhost/x",
            "https://api.localhost/x",
            "http://[::1]:5000/*",
            "http://[::ffff:127.0.0.1]/x",
            "http://0.0.0.0/x",
            "http://169.254.169.254/latest/*",
            "http://metadata.google.internal/*",
            "http://metadata/computeMetadata/*",
            "http://[fe80::1]/x",
            "http://[fd00:ec2::254]/x",
            "http://10.1.2.3:9000/x",
            "http://2130706433/x",
            "http://0x7f000001/x",
            "https://*.example.org/*",
            "https://*",
            "https://files.example.org@127.0.0.1/x",
            "https://files.example.org",
            "ftp://files.example.org/x",
            "docker-image://x/*",
            "file:///etc/passwd",
        ] {
            assert!(
                RemoteSource::parse(bad, &host).is_err(),
                "{bad} was allowed"
            );
        }
        for good in [
            "https://files.example.org/*",
            "http://10.9.9.9:8000/data/set.tar",
            "git://git.example.org/repo.git",
            "https://[2001:db8::1]/x/*",
        ] {
            assert!(
                RemoteSource::parse(good, &host).is_ok(),
                "{good} was refused"
            );
        }
    }

    #[test]
    fn denied_sources_are_found_in_messages() {
        let m = r#"failed to load LLB: error evaluating the source policy: source "http://127.0.0.1:8080/healthz" denied by policy: source denied by policy"#;
        assert_eq!(
            denied_source(m).as_deref(),
            Some("http://127.0.0.1:8080/healthz")
        );
        let m = r#"failed to resolve source metadata for quay.io/foo/bar:1: could not resolve image due to policy: source "docker-image://quay.io/foo/bar:1" denied by policy"#;
        assert_eq!(
            denied_source(m).as_deref(),
            Some("docker-image://quay.io/foo/bar:1")
        );
        assert_eq!(denied_source("exit code: 1"), None);
    }

    #[test]
    fn the_instruction_naming_a_source_is_found() {
        let df =
            "# syntax=x\nFROM busybox\nRUN echo \\\n  hi\nADD http://127.0.0.1:8080/healthz /x\n";
        assert_eq!(
            instruction_naming(df, "http://127.0.0.1:8080/healthz"),
            Some((5, "ADD http://127.0.0.1:8080/healthz /x".into()))
        );
        let df = "FROM busybox\nCOPY --from=quay.io/foo/bar:1 /a /b\n";
        assert_eq!(
            instruction_naming(df, "docker-image://quay.io/foo/bar:1"),
            Some((2, "COPY --from=quay.io/foo/bar:1 /a /b".into()))
        );
        let df = "FROM 127.0.0.1:8080/x\n";
        assert_eq!(
            instruction_naming(df, "docker-image://127.0.0.1:8080/x:latest"),
            Some((1, "FROM 127.0.0.1:8080/x".into()))
        );
        let df = "FROM busybox\nADD git@127.0.0.1:repo.git /r\n";
        assert_eq!(
            instruction_naming(df, "git://127.0.0.1/repo.git"),
            Some((2, "ADD git@127.0.0.1:repo.git /r".into()))
        );
        assert_eq!(instruction_naming("FROM busybox\n", "http://x/y"), None);
    }
}
