//! Audits of jobs (`perfbox audit`, `GET /job/{id}/audit`): every rule a job must satisfy,
//! checked against what the job left behind, each reported pass or fail with its evidence.
//!
//! Three kinds of rule, run in this order:
//! 1. [`RECORD_RULES`]: the build, as its record says it ran (network, entitlements, frontend,
//!    source policy, cgroup); evidence is a JSON pointer into the job record (`/build/network`).
//! 2. `spec_integrity`: the spec file's SHA-256 equals the digest recorded when the sandbox
//!    wrote it (a changed or missing file fails, and so does a file without a recorded digest).
//! 3. The sandbox rules of [`crate::sandbox::audit::RULES`], on the spec file itself.
//!
//! A job is audited on what it has: one that never started building has nothing to audit, one
//! that never reached the sandbox only its build. A job that built without a build record (from
//! before perfbox kept them) fails `build_recorded`. [`JobAudit::not_audited`] says which parts
//! were left out and why; they do not fail the audit.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{JobId, JobRecord, JobStatus};
use crate::sandbox::audit::{Evidence, Expect, Finding, audit_spec};

/// [`Finding::source`] of the record rules.
pub const RECORD_SOURCE: &str = "job record";

/// The largest spec file an audit reads (the sandbox writes a few KiB).
const MAX_SPEC_BYTES: u64 = 4 << 20;

/// One job's audit.
#[derive(Debug, Clone, Serialize)]
pub struct JobAudit {
    /// The job.
    pub job: JobId,
    /// Its status when audited.
    pub status: JobStatus,
    /// Every finding passed.
    pub ok: bool,
    /// The rules' verdicts, record rules first.
    pub findings: Vec<Finding>,
    /// Parts of the job not audited, and why (not failures: there was nothing to check).
    pub not_audited: Vec<String>,
}

/// What the audit compares a job with.
#[derive(Debug, Clone, Copy)]
pub struct AuditBasis<'a> {
    /// The job's directory.
    pub job_dir: &'a Path,
    /// The digest of the seccomp section the sandbox writes ([`crate::sandbox::Sandbox::seccomp_digest`]).
    pub seccomp_digest: &'a str,
    /// The frontend every build runs with.
    pub frontend: &'a str,
    /// The datasets configured (a job's `dataset` names one: the only other host path its
    /// run may have).
    pub datasets: &'a [crate::config::Dataset],
}

/// A rule on the job record's `build` (what the solve ran with).
pub struct RecordRule {
    /// Name (stable: reports and tests use it).
    pub name: &'static str,
    /// What it requires, for humans.
    pub requires: &'static str,
    /// The check, given the record's `build` and the basis.
    pub check: fn(&Value, &AuditBasis<'_>) -> (bool, String, Vec<Evidence>),
}

/// Every rule on the build record, in the order reports list them.
pub const RECORD_RULES: &[RecordRule] = &[
    RecordRule {
        name: "build_network",
        requires: "RUN steps with no network, or the isolated one that cannot reach the host",
        check: build_network,
    },
    RecordRule {
        name: "build_entitlements",
        requires: "no entitlement granted to the solve (no network.host, no security.insecure)",
        check: build_entitlements,
    },
    RecordRule {
        name: "build_frontend",
        requires: "BuildKit's built-in Dockerfile frontend (no # syntax= image)",
        check: build_frontend,
    },
    RecordRule {
        name: "build_source_policy",
        requires: "a source policy that denies every source first, then allows only the configured registries and remote sources",
        check: build_source_policy,
    },
    RecordRule {
        name: "build_cgroup",
        requires: "RUN steps in a cgroup of the build's own, with limits",
        check: build_cgroup,
    },
];

type Verdict = (bool, String, Vec<Evidence>);

fn field(build: &Value, name: &str) -> Evidence {
    Evidence {
        path: format!("/build/{name}"),
        value: build.get(name).cloned().unwrap_or(Value::Null),
    }
}

fn build_network(build: &Value, _: &AuditBasis<'_>) -> Verdict {
    let e = field(build, "network");
    match e.value.as_str() {
        Some("none") => (true, "no network: only lo".into(), vec![e]),
        Some("isolated") => (
            true,
            "the isolated network (no host loopback, through the networked daemon)".into(),
            vec![e],
        ),
        _ => (
            false,
            "not a network mode perfbox runs builds with".into(),
            vec![e],
        ),
    }
}

fn build_entitlements(build: &Value, _: &AuditBasis<'_>) -> Verdict {
    let e = field(build, "entitlements");
    match e.value.as_array() {
        Some(list) if list.is_empty() => (true, "none granted".into(), vec![e]),
        Some(_) => (false, "entitlements were granted".into(), vec![e]),
        None => (
            false,
            "the record does not say which entitlements the solve had".into(),
            vec![e],
        ),
    }
}

fn build_frontend(build: &Value, basis: &AuditBasis<'_>) -> Verdict {
    let e = field(build, "frontend");
    if e.value.as_str() == Some(basis.frontend) {
        (true, "the built-in Dockerfile frontend".into(), vec![e])
    } else {
        (
            false,
            format!("not the built-in frontend ({})", basis.frontend),
            vec![e],
        )
    }
}

fn build_source_policy(build: &Value, _: &AuditBasis<'_>) -> Verdict {
    let e = field(build, "source_policy");
    let Some(rules) = e.value.as_array() else {
        return (false, "the record has no source policy".into(), vec![e]);
    };
    let rules: Vec<&str> = rules.iter().filter_map(Value::as_str).collect();
    if rules.first() != Some(&"DENY *") {
        return (
            false,
            "the policy does not deny every source first".into(),
            vec![e],
        );
    }
    let strings = |name: &str| -> Vec<String> {
        build[name]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let registries = strings("registries");
    let remote = strings("allowed_remote_sources");
    for rule in &rules[1..] {
        let allowed = match rule.split_once(' ') {
            Some(("ALLOW", what)) => {
                (what == crate::buildkit::policy::LOCAL_CONTEXT && build["context"] == true)
                    || remote.iter().any(|r| r == what)
                    || registries
                        .iter()
                        .any(|r| what == format!("docker-image://{r}/*"))
            }
            Some(("CONVERT", what)) => what.split_once(" => ").is_some_and(|(_, to)| {
                registries
                    .iter()
                    .any(|r| to.starts_with(&format!("docker-image://{r}/")))
            }),
            _ => false,
        };
        if !allowed {
            return (
                false,
                format!(
                    "rule {rule:?} lets in more than the configured registries and remote sources"
                ),
                vec![
                    e,
                    field(build, "registries"),
                    field(build, "allowed_remote_sources"),
                ],
            );
        }
    }
    (
        true,
        format!(
            "deny by default; {} registries and {} remote sources allowed",
            registries.len(),
            remote.len()
        ),
        vec![e],
    )
}

fn build_cgroup(build: &Value, _: &AuditBasis<'_>) -> Verdict {
    let e = field(build, "cgroup");
    if e.value["path"].is_string() && e.value["limits"].is_object() {
        return (true, format!("own cgroup {}", e.value["path"]), vec![e]);
    }
    let why = e.value["shared_with_daemon"]
        .as_str()
        .unwrap_or("the record does not say")
        .to_owned();
    (
        false,
        format!("RUN steps shared the build daemon's cgroup: {why}"),
        vec![e],
    )
}

/// Audit one job.
pub fn audit_job(rec: &JobRecord, basis: &AuditBasis<'_>) -> JobAudit {
    let mut findings = vec![];
    let mut not_audited = vec![];
    match rec.build_json() {
        Some(build) => findings.extend(RECORD_RULES.iter().map(|r| {
            let (ok, detail, evidence) = (r.check)(&build, basis);
            Finding {
                rule: r.name,
                source: RECORD_SOURCE,
                ok,
                detail,
                evidence,
            }
        })),
        // It built, but the record does not say with what (a job from before perfbox kept
        // build records): that cannot be shown to be right.
        None if rec.build_started_at.is_some() => findings.push(Finding {
            rule: "build_recorded",
            source: RECORD_SOURCE,
            ok: false,
            detail: "the job built, but its record does not say what the build ran with".into(),
            evidence: vec![Evidence {
                path: "/build".into(),
                value: Value::Null,
            }],
        }),
        None => not_audited.push(format!(
            "build: the job is {} and never started a build",
            rec.status
        )),
    }
    let spec_path = basis.job_dir.join(crate::sandbox::SPEC_FILE);
    if rec.spec_sha256.is_none() && !spec_path.exists() {
        not_audited.push(format!(
            "sandbox: the job is {} and no spec was written for it (it never reached the sandbox)",
            rec.status
        ));
    } else {
        let (integrity, spec) = spec_integrity(rec, &spec_path);
        findings.push(integrity);
        match spec {
            Ok(spec) => {
                let applied: Option<Value> = rec
                    .limits
                    .as_ref()
                    .and_then(|l| serde_json::from_str(l.get()).ok());
                // Where the job ran (another node's directory, in a cluster), else here.
                let ran_in = rec
                    .run_dir
                    .as_ref()
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| {
                        std::path::absolute(basis.job_dir)
                            .unwrap_or_else(|_| basis.job_dir.to_path_buf())
                    });
                let out_dir = ran_in.join(crate::sandbox::OUT_DIR);
                findings.extend(audit_spec(
                    &spec,
                    &Expect {
                        out_dir: &out_dir,
                        dataset: rec
                            .dataset
                            .as_deref()
                            .and_then(|n| basis.datasets.iter().find(|d| d.name == n))
                            .map(|d| d.path.as_path()),
                        seccomp_digest: basis.seccomp_digest,
                        applied: applied.as_ref(),
                    },
                ));
            }
            Err(why) => findings.extend(crate::sandbox::audit::RULES.iter().map(|r| Finding {
                rule: r.name,
                source: crate::sandbox::audit::SPEC_SOURCE,
                ok: false,
                detail: format!("cannot check: {why}"),
                evidence: vec![],
            })),
        }
    }
    JobAudit {
        job: rec.id,
        status: rec.status,
        ok: findings.iter().all(|f| f.ok),
        findings,
        not_audited,
    }
}

/// The `spec_integrity` finding, and the spec (parsed) or why it cannot be read.
fn spec_integrity(rec: &JobRecord, path: &Path) -> (Finding, Result<Value, String>) {
    let recorded = Evidence {
        path: "/spec_sha256".into(),
        value: rec.spec_sha256.clone().map_or(Value::Null, Value::String),
    };
    let finding = |ok: bool, detail: String, evidence: Vec<Evidence>| Finding {
        rule: "spec_integrity",
        source: "config.json + job record",
        ok,
        detail,
        evidence,
    };
    let bytes = match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_SPEC_BYTES => {
            Err(format!("{} is {} bytes", path.display(), m.len()))
        }
        Ok(_) => std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display())),
        Err(e) => Err(format!("{} is missing: {e}", path.display())),
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(why) => return (finding(false, why.clone(), vec![recorded]), Err(why)),
    };
    let actual = hex::encode(Sha256::digest(&bytes));
    let evidence = vec![
        recorded.clone(),
        Evidence {
            path: "sha256(config.json)".into(),
            value: Value::String(actual.clone()),
        },
    ];
    let verdict = match &rec.spec_sha256 {
        None => finding(
            false,
            "no digest was recorded for this spec: it cannot be shown to be the one the job ran with".into(),
            evidence,
        ),
        Some(want) if *want != actual => finding(
            false,
            "the spec file changed after the job ran (its SHA-256 differs from the recorded one)".into(),
            evidence,
        ),
        Some(_) => finding(true, "the file is the one the sandbox wrote".into(), evidence),
    };
    let spec = serde_json::from_slice(&bytes).map_err(|e| format!("the spec is not JSON: {e}"));
    (verdict, spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRONTEND: &str = "dockerfile.v0 (built in)";

    fn good_build() -> Value {
        serde_json::json!({
            "scope": "job-1-abcd0123",
            "cache_scope": "job",
            "network": "none",
            "frontend": FRONTEND,
            "entitlements": [],
            "source_policy": [
                "DENY *",
                "CONVERT docker-image://docker.io/* => docker-image://127.0.0.1:5000/${1}",
                "ALLOW docker-image://127.0.0.1:5000/*",
                "ALLOW https://files.example.org/data/*"
            ],
            "registries": ["127.0.0.1:5000"],
            "allowed_remote_sources": ["https://files.example.org/data/*"],
            "max_image_bytes": 1,
            "cgroup": {"path": "/perfbox-build/runs/buildkit/job-1", "limits": {"memory_bytes": 1}, "used": true}
        })
    }

    fn check(rule: &str, build: &Value) -> (bool, String, Vec<Evidence>) {
        let basis = AuditBasis {
            job_dir: Path::new("/nonexistent"),
            seccomp_digest: "",
            frontend: FRONTEND,
            datasets: &[],
        };
        let r = RECORD_RULES.iter().find(|r| r.name == rule).unwrap();
        (r.check)(build, &basis)
    }

    fn broken(rule: &str, edit: impl FnOnce(&mut Value)) -> (bool, String, Vec<Evidence>) {
        let mut b = good_build();
        edit(&mut b);
        check(rule, &b)
    }

    #[test]
    fn a_build_as_perfbox_runs_it_passes_every_record_rule() {
        for r in RECORD_RULES {
            let (ok, detail, evidence) = check(r.name, &good_build());
            assert!(ok, "{}: {detail}", r.name);
            assert!(evidence[0].path.starts_with("/build/"));
        }
        assert!(check("build_network", &serde_json::json!({"network": "isolated"})).0);
    }

    #[test]
    fn build_network_fails_with_the_host_network() {
        let (ok, _, e) = broken("build_network", |b| b["network"] = "host".into());
        assert!(!ok);
        assert_eq!(
            (e[0].path.as_str(), &e[0].value),
            ("/build/network", &Value::from("host"))
        );
    }

    #[test]
    fn build_entitlements_fail_when_granted_or_unrecorded() {
        let (ok, _, e) = broken("build_entitlements", |b| {
            b["entitlements"] = serde_json::json!(["security.insecure"])
        });
        assert!(!ok);
        assert_eq!(e[0].value, serde_json::json!(["security.insecure"]));
        assert!(
            !broken("build_entitlements", |b| b
                .as_object_mut()
                .unwrap()
                .retain(|k, _| k != "entitlements"))
            .0
        );
    }

    #[test]
    fn build_frontend_fails_with_another() {
        assert!(
            !broken("build_frontend", |b| b["frontend"] =
                "gateway.v0 docker/dockerfile:1".into())
            .0
        );
    }

    #[test]
    fn build_source_policy_fails_without_deny_first_or_with_an_extra_allow() {
        let (ok, detail, _) = broken("build_source_policy", |b| {
            b["source_policy"].as_array_mut().unwrap().remove(0);
        });
        assert!(!ok && detail.contains("deny"), "{detail}");
        let (ok, detail, _) = broken("build_source_policy", |b| {
            b["source_policy"]
                .as_array_mut()
                .unwrap()
                .push("ALLOW http://127.0.0.1:8080/*".into());
        });
        assert!(!ok && detail.contains("127.0.0.1:8080"), "{detail}");
        let (ok, _, _) = broken("build_source_policy", |b| {
            b["source_policy"][1] =
                "CONVERT docker-image://docker.io/* => docker-image://docker.io/${1}".into();
        });
        assert!(!ok);
    }

    #[test]
    fn a_job_that_built_without_a_build_record_fails_one_that_never_built_is_not_audited() {
        let record = |build_started_at: Option<f64>| -> JobRecord {
            let row = serde_json::json!({
                "id": 1, "filename": "d", "status": "build_failed", "dockerfile_sha256": "a",
                "created_at": 1.0, "build_started_at": build_started_at,
            });
            serde_json::from_str(&row.to_string()).unwrap()
        };
        let basis = AuditBasis {
            job_dir: Path::new("/nonexistent"),
            seccomp_digest: "",
            frontend: FRONTEND,
            datasets: &[],
        };
        let a = audit_job(&record(Some(2.0)), &basis);
        assert!(!a.ok);
        assert_eq!(a.findings[0].rule, "build_recorded");
        assert_eq!(a.findings[0].evidence[0].path, "/build");
        let a = audit_job(&record(None), &basis);
        assert!(a.ok && a.findings.is_empty());
        assert_eq!(a.not_audited.len(), 2, "{:?}", a.not_audited);
    }

    #[test]
    fn build_cgroup_fails_when_shared_with_the_daemon() {
        let (ok, detail, _) = broken("build_cgroup", |b| {
            b["cgroup"] =
                serde_json::json!({"shared_with_daemon": "no cgroup v1 memory hierarchy"});
        });
        assert!(!ok && detail.contains("no cgroup v1 memory"), "{detail}");
    }
}
