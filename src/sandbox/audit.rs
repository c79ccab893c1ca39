//! The sandbox rules, checked against the OCI spec a job ran with (its `config.json`): each rule
//! is a small named check that reports pass or fail with the evidence from the spec (a JSON
//! pointer and the value there). They are the one statement in code of what every job's sandbox
//! must be; [`RULES`] lists them and [`audit_spec`] runs them all. The rules on what a job's
//! record says (its build, the spec's digest) are in [`crate::jobs::audit`], which runs both.
//!
//! The spec is read as JSON, not as `oci_spec` types: an audit must report what the file says,
//! including fields a hand-edited or foreign spec may add.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What the rules compare the spec with.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// The job's own output directory: the one writable host path allowed, at `/data`.
    pub out_dir: &'a Path,
    /// The dataset the job asked for (its configured path): the one other host path allowed,
    /// read-only at `/input`.
    pub dataset: Option<&'a Path>,
    /// The digest ([`seccomp_digest`]) of the seccomp section the sandbox writes.
    pub seccomp_digest: &'a str,
    /// What the job record says applied (`limits`), when the record has it.
    pub applied: Option<&'a Value>,
}

/// A value from the spec that a finding rests on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    /// JSON pointer into the spec (`/process/noNewPrivileges`).
    pub path: String,
    /// What is there (`null` when absent).
    pub value: Value,
}

/// One rule's verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// The rule's name.
    pub rule: &'static str,
    /// What the evidence is read from (`config.json`, or `job record` for the rules of
    /// [`crate::jobs::audit`]).
    pub source: &'static str,
    /// Passed.
    pub ok: bool,
    /// What was found, and why it fails when it does.
    pub detail: String,
    /// The spec values behind the verdict.
    pub evidence: Vec<Evidence>,
}

/// A rule: its name, what it requires, and the check.
pub struct Rule {
    /// Name (stable: reports and tests use it).
    pub name: &'static str,
    /// What it requires, for humans.
    pub requires: &'static str,
    /// The check.
    pub check: fn(&Value, &Expect<'_>) -> (bool, String, Vec<Evidence>),
}

/// [`Finding::source`] of these rules.
pub const SPEC_SOURCE: &str = "config.json";

/// Every sandbox rule, in the order reports list them.
pub const RULES: &[Rule] = &[
    Rule {
        name: "user_namespace",
        requires: "a user namespace of its own, and no mapping of host uid or gid 0",
        check: user_namespace,
    },
    Rule {
        name: "private_namespaces",
        requires: "mount, pid, ipc, uts, cgroup and network namespaces of its own (none joined from a path)",
        check: private_namespaces,
    },
    Rule {
        name: "no_capabilities",
        requires: "every capability set empty",
        check: no_capabilities,
    },
    Rule {
        name: "no_new_privileges",
        requires: "process.noNewPrivileges = true",
        check: no_new_privileges,
    },
    Rule {
        name: "seccomp",
        requires: "a seccomp filter that denies by default (errno or kill), equal to the shipped profile",
        check: seccomp,
    },
    Rule {
        name: "read_only_root",
        requires: "root.readonly = true",
        check: read_only_root,
    },
    Rule {
        name: "only_data_from_host",
        requires: "no host bind mount but the job's own output directory at /data (read-write, nosuid, nodev) and the dataset it asked for at /input (read-only, nosuid, nodev, noexec)",
        check: only_data_from_host,
    },
    Rule {
        name: "masked_and_read_only_paths",
        requires: "runc's default masked and read-only /proc and /sys paths",
        check: masked_and_read_only_paths,
    },
    Rule {
        name: "limits_as_recorded",
        requires: "the spec's cgroup limits and rlimits equal to what the job record says applied",
        check: limits_as_recorded,
    },
    Rule {
        name: "default_devices_only",
        requires: "no device beyond the default set (null, zero, full, random, urandom, tty)",
        check: default_devices_only,
    },
];

/// Run every rule on `spec`.
pub fn audit_spec(spec: &Value, expect: &Expect<'_>) -> Vec<Finding> {
    RULES
        .iter()
        .map(|r| {
            let (ok, detail, evidence) = (r.check)(spec, expect);
            Finding {
                rule: r.name,
                source: SPEC_SOURCE,
                ok,
                detail,
                evidence,
            }
        })
        .collect()
}

/// `sha256:` of a seccomp section as canonical JSON (object keys sorted, no spaces).
pub fn seccomp_digest(seccomp: &Value) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(
            serde_json::to_vec(seccomp).unwrap_or_default()
        ))
    )
}

fn at(spec: &Value, path: &str) -> Evidence {
    Evidence {
        path: path.to_owned(),
        value: spec.pointer(path).cloned().unwrap_or(Value::Null),
    }
}

fn array<'v>(spec: &'v Value, path: &str) -> &'v [Value] {
    spec.pointer(path)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn namespace<'v>(spec: &'v Value, kind: &str) -> Option<(usize, &'v Value)> {
    array(spec, "/linux/namespaces")
        .iter()
        .enumerate()
        .find(|(_, n)| n["type"] == kind)
}

type Verdict = (bool, String, Vec<Evidence>);

fn user_namespace(spec: &Value, _: &Expect<'_>) -> Verdict {
    let mut evidence = vec![
        at(spec, "/linux/uidMappings"),
        at(spec, "/linux/gidMappings"),
    ];
    let Some((i, ns)) = namespace(spec, "user") else {
        evidence.insert(0, at(spec, "/linux/namespaces"));
        return (false, "no user namespace".into(), evidence);
    };
    evidence.insert(0, at(spec, &format!("/linux/namespaces/{i}")));
    if ns.get("path").is_some() {
        return (
            false,
            "the user namespace is joined from a path, not its own".into(),
            evidence,
        );
    }
    for which in ["uidMappings", "gidMappings"] {
        let maps = array(spec, &format!("/linux/{which}"));
        if maps.is_empty() {
            return (
                false,
                format!("no {which}: host ids would be used as they are"),
                evidence,
            );
        }
        for m in maps {
            let host = m["hostID"].as_u64().unwrap_or(0);
            let size = m["size"].as_u64().unwrap_or(0);
            if host == 0 && size > 0 {
                return (
                    false,
                    format!("{which} maps host id 0 (root) into the container"),
                    evidence,
                );
            }
        }
    }
    (
        true,
        "own user namespace; host root is not mapped".into(),
        evidence,
    )
}

fn private_namespaces(spec: &Value, _: &Expect<'_>) -> Verdict {
    let mut evidence = vec![];
    for kind in ["mount", "pid", "ipc", "uts", "cgroup", "network"] {
        match namespace(spec, kind) {
            None => {
                return (
                    false,
                    format!("no {kind} namespace: the host's is shared"),
                    vec![at(spec, "/linux/namespaces")],
                );
            }
            Some((i, ns)) => {
                let e = at(spec, &format!("/linux/namespaces/{i}"));
                if ns.get("path").is_some() {
                    return (
                        false,
                        format!("the {kind} namespace is joined from a path, not its own"),
                        vec![e],
                    );
                }
                evidence.push(e);
            }
        }
    }
    (true, "all six namespaces of its own".into(), evidence)
}

fn no_capabilities(spec: &Value, _: &Expect<'_>) -> Verdict {
    let mut evidence = vec![];
    for set in [
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    ] {
        let path = format!("/process/capabilities/{set}");
        if !array(spec, &path).is_empty() {
            evidence.push(at(spec, &path));
        }
    }
    if evidence.is_empty() {
        (
            true,
            "every capability set is empty".into(),
            vec![at(spec, "/process/capabilities")],
        )
    } else {
        (false, "capabilities are granted".into(), evidence)
    }
}

/// The verdict on a flag that must be `true` at `path`.
fn flag_set(spec: &Value, path: &str, set: &str, unset: &str) -> Verdict {
    let e = at(spec, path);
    let ok = e.value == Value::Bool(true);
    (ok, if ok { set } else { unset }.into(), vec![e])
}

fn no_new_privileges(spec: &Value, _: &Expect<'_>) -> Verdict {
    flag_set(
        spec,
        "/process/noNewPrivileges",
        "set",
        "not set: setuid binaries could raise privileges",
    )
}

fn seccomp(spec: &Value, expect: &Expect<'_>) -> Verdict {
    let action = at(spec, "/linux/seccomp/defaultAction");
    let Some(section) = spec.pointer("/linux/seccomp") else {
        return (false, "no seccomp filter".into(), vec![action]);
    };
    let digest = seccomp_digest(section);
    let evidence = vec![
        action.clone(),
        Evidence {
            path: "/linux/seccomp (sha256 of its canonical JSON)".into(),
            value: Value::String(digest.clone()),
        },
    ];
    let denies = matches!(
        action.value.as_str(),
        Some("SCMP_ACT_ERRNO" | "SCMP_ACT_KILL" | "SCMP_ACT_KILL_PROCESS" | "SCMP_ACT_KILL_THREAD")
    );
    if !denies {
        return (false, "the default action does not deny".into(), evidence);
    }
    if digest != expect.seccomp_digest {
        return (
            false,
            format!(
                "the filter differs from the shipped profile ({})",
                expect.seccomp_digest
            ),
            evidence,
        );
    }
    (
        true,
        "deny by default; the shipped profile".into(),
        evidence,
    )
}

fn read_only_root(spec: &Value, _: &Expect<'_>) -> Verdict {
    flag_set(
        spec,
        "/root/readonly",
        "read-only",
        "the root filesystem is writable",
    )
}

/// Mount types that never bring a host path in.
const KERNEL_MOUNTS: [&str; 7] = [
    "proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "cgroup2",
];

fn only_data_from_host(spec: &Value, expect: &Expect<'_>) -> Verdict {
    let mut data = None;
    let mut input = None;
    for (i, m) in array(spec, "/mounts").iter().enumerate() {
        let e = at(spec, &format!("/mounts/{i}"));
        let options: Vec<&str> = m["options"]
            .as_array()
            .map(|o| o.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let kind = m["type"].as_str().unwrap_or("");
        let bind = kind == "bind" || options.iter().any(|o| *o == "bind" || *o == "rbind");
        if !bind {
            let source = m["source"].as_str().unwrap_or("");
            if !KERNEL_MOUNTS.contains(&kind) || source.starts_with('/') {
                return (
                    false,
                    format!("mount {i} brings in {kind} {source}"),
                    vec![e],
                );
            }
            continue;
        }
        let source = m["source"].as_str().map(Path::new);
        if m["destination"] == "/input"
            && input.is_none()
            && source.is_some()
            && source == expect.dataset
        {
            let sealed = ["ro", "nosuid", "nodev", "noexec"]
                .iter()
                .all(|o| options.contains(o));
            if !sealed || options.contains(&"rw") || options.contains(&"rbind") {
                return (
                    false,
                    "/input is not read-only, nosuid, nodev, noexec and non-recursive".into(),
                    vec![e],
                );
            }
            input = Some(e);
            continue;
        }
        let is_data = m["destination"] == "/data" && source == Some(expect.out_dir);
        if !is_data || data.is_some() {
            return (
                false,
                format!("mount {i} binds a host path other than the job's output dir at /data"),
                vec![e],
            );
        }
        let rw = !options.contains(&"ro");
        if !(rw && options.contains(&"nosuid") && options.contains(&"nodev")) {
            return (
                false,
                "/data is not read-write, nosuid, nodev".into(),
                vec![e],
            );
        }
        data = Some(e);
    }
    if expect.dataset.is_some() && input.is_none() {
        return (
            false,
            "the job asked for a dataset but no /input mount of it is there".into(),
            vec![at(spec, "/mounts")],
        );
    }
    match data {
        Some(e) => match input {
            None => (
                true,
                "the job's own output dir at /data is the only host path".into(),
                vec![e],
            ),
            Some(i) => (
                true,
                "the job's own output dir at /data and its dataset, read-only at /input, are the only host paths".into(),
                vec![e, i],
            ),
        },
        None => (
            false,
            "no /data mount of the job's output dir".into(),
            vec![at(spec, "/mounts")],
        ),
    }
}

fn masked_and_read_only_paths(spec: &Value, _: &Expect<'_>) -> Verdict {
    let have = |p: &str| -> Vec<String> {
        array(spec, p)
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let (masked, ro) = (have("/linux/maskedPaths"), have("/linux/readonlyPaths"));
    let evidence = vec![
        at(spec, "/linux/maskedPaths"),
        at(spec, "/linux/readonlyPaths"),
    ];
    let missing: Vec<String> = oci_spec::runtime::get_default_maskedpaths()
        .into_iter()
        .filter(|p| !masked.contains(p))
        .chain(
            oci_spec::runtime::get_default_readonly_paths()
                .into_iter()
                .filter(|p| !ro.contains(p)),
        )
        .collect();
    if missing.is_empty() {
        (
            true,
            "runc's default masked and read-only paths".into(),
            evidence,
        )
    } else {
        (
            false,
            format!("not masked or read-only: {}", missing.join(", ")),
            evidence,
        )
    }
}

fn limits_as_recorded(spec: &Value, expect: &Expect<'_>) -> Verdict {
    let Some(applied) = expect.applied else {
        return (
            false,
            "the job record has no applied limits to compare with".into(),
            vec![],
        );
    };
    let rlimit = |name: &str| -> (Option<u64>, Evidence) {
        let list = array(spec, "/process/rlimits");
        let i = list.iter().position(|r| r["type"] == name);
        match i {
            Some(i) => (
                list[i]["hard"].as_u64(),
                at(spec, &format!("/process/rlimits/{i}")),
            ),
            None => (None, at(spec, "/process/rlimits")),
        }
    };
    let mut evidence = vec![];
    for (limit, cgroup_path) in [
        ("memory", "/linux/resources/memory/limit"),
        ("pids", "/linux/resources/pids/limit"),
        ("cpu", "/linux/resources/cpu/quota"),
        ("nofile", ""),
        ("fsize", ""),
    ] {
        let rec = &applied[limit];
        let (found, e) = match rec["by"].as_str() {
            Some("cgroup") => {
                let e = at(spec, cgroup_path);
                let value = if limit == "cpu" {
                    e.value.as_i64().map(|q| {
                        format!(
                            "{q}/{}",
                            spec.pointer("/linux/resources/cpu/period")
                                .and_then(Value::as_u64)
                                .unwrap_or(0)
                        )
                    })
                } else {
                    e.value.as_i64().map(|v| v.to_string())
                };
                (value == rec["value"].as_str().map(str::to_owned), e)
            }
            Some("rlimit") => {
                let (v, e) = rlimit(&format!(
                    "RLIMIT_{}",
                    rec["name"]
                        .as_str()
                        .unwrap_or("")
                        .trim_start_matches("RLIMIT_")
                ));
                (v.is_some() && v == rec["value"].as_u64(), e)
            }
            // Not applied, or enforced by the sandbox itself: nothing in the spec to compare.
            _ => (true, at(spec, "/linux/resources")),
        };
        if !found {
            return (
                false,
                format!("the record says {limit} applied as {rec}; the spec does not"),
                vec![e],
            );
        }
        evidence.push(e);
    }
    (
        true,
        "memory, pids, cpu, nofile and fsize as the record says".into(),
        evidence,
    )
}

fn default_devices_only(spec: &Value, _: &Expect<'_>) -> Verdict {
    const DEFAULT: [&str; 6] = [
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
        "/dev/tty",
    ];
    for (i, d) in array(spec, "/linux/devices").iter().enumerate() {
        if !DEFAULT.contains(&d["path"].as_str().unwrap_or("")) {
            return (
                false,
                format!("device {} is not in the default set", d["path"]),
                vec![at(spec, &format!("/linux/devices/{i}"))],
            );
        }
    }
    (
        true,
        "only the runtime's default devices".into(),
        vec![at(spec, "/linux/devices")],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::cgroups::{CgroupHost, Controller};
    use crate::sandbox::idmap::{HostIdentity, IdRange};
    use crate::sandbox::image_user::ProcessUser;
    use crate::sandbox::policy::Limits;
    use crate::sandbox::spec::{SpecInput, hardened_spec};

    /// The spec the sandbox writes for a job (v1 cgroups for memory and pids, none for cpu),
    /// the digest of its seccomp section, and the limits the record would hold.
    fn good() -> (Value, String, Value) {
        let identity = HostIdentity {
            name: "perfbox".into(),
            uid: 999,
            gid: 999,
            subuid: Some(IdRange {
                start: 100_000,
                count: 65536,
            }),
            subgid: Some(IdRange {
                start: 100_000,
                count: 65536,
            }),
        };
        let limits = Limits::default();
        let cgroups = CgroupHost::V1 {
            parent: "/perfbox".into(),
            controllers: vec![Controller::Memory, Controller::Pids],
        };
        let input = SpecInput {
            rootfs: "/var/lib/perfbox/images/x/rootfs".into(),
            out_dir: "/var/lib/perfbox/jobs/7/out".into(),
            input: None,
            args: vec!["true".into()],
            env: vec![],
            cwd: "/".into(),
            user: ProcessUser {
                uid: 0,
                gid: 0,
                additional_gids: vec![],
                home: None,
            },
            identity: &identity,
            limits: &limits,
            cgroups: &cgroups,
            container_id: "perfbox-7",
            seccomp: crate::sandbox::seccomp::default_profile(),
        };
        let (spec, applied) = hardened_spec(&input).unwrap();
        let spec = serde_json::to_value(&spec).unwrap();
        let digest = seccomp_digest(&spec["linux"]["seccomp"]);
        (spec, digest, serde_json::to_value(applied).unwrap())
    }

    fn run(spec: &Value, digest: &str, applied: &Value) -> Vec<Finding> {
        audit_spec(
            spec,
            &Expect {
                out_dir: Path::new("/var/lib/perfbox/jobs/7/out"),
                dataset: None,
                seccomp_digest: digest,
                applied: Some(applied),
            },
        )
    }

    /// The verdict of `rule` on the good spec changed by `edit`.
    fn broken(rule: &str, edit: impl FnOnce(&mut Value)) -> Finding {
        let (mut spec, digest, applied) = good();
        edit(&mut spec);
        run(&spec, &digest, &applied)
            .into_iter()
            .find(|f| f.rule == rule)
            .unwrap()
    }

    #[test]
    fn the_sandboxs_own_spec_passes_every_rule() {
        let (spec, digest, applied) = good();
        for f in run(&spec, &digest, &applied) {
            assert!(f.ok, "{} failed: {} {:?}", f.rule, f.detail, f.evidence);
            assert!(!f.detail.is_empty());
        }
        assert_eq!(RULES.len(), 10);
    }

    fn namespaces_without(spec: &mut Value, kind: &str) {
        let list = spec["linux"]["namespaces"].as_array_mut().unwrap();
        list.retain(|n| n["type"] != kind);
    }

    #[test]
    fn user_namespace_fails_without_it_or_with_host_root_mapped() {
        let f = broken("user_namespace", |s| namespaces_without(s, "user"));
        assert!(!f.ok);
        let f = broken("user_namespace", |s| {
            s["linux"]["uidMappings"][0]["hostID"] = 0.into();
        });
        assert!(!f.ok && f.detail.contains("host id 0"), "{f:?}");
        assert_eq!(f.evidence[1].path, "/linux/uidMappings");
        let f = broken("user_namespace", |s| {
            s["linux"]["gidMappings"] =
                serde_json::json!([{"containerID": 0, "hostID": 0, "size": 1}]);
        });
        assert!(!f.ok);
    }

    #[test]
    fn private_namespaces_fail_when_one_is_missing_or_joined() {
        let f = broken("private_namespaces", |s| namespaces_without(s, "network"));
        assert!(!f.ok && f.detail.contains("no network namespace"), "{f:?}");
        let f = broken("private_namespaces", |s| {
            let list = s["linux"]["namespaces"].as_array_mut().unwrap();
            let pid = list.iter_mut().find(|n| n["type"] == "pid").unwrap();
            pid["path"] = "/proc/1/ns/pid".into();
        });
        assert!(!f.ok && f.detail.contains("joined from a path"), "{f:?}");
        assert!(f.evidence[0].path.starts_with("/linux/namespaces/"));
    }

    #[test]
    fn no_capabilities_fails_with_one() {
        let f = broken("no_capabilities", |s| {
            s["process"]["capabilities"]["bounding"] = serde_json::json!(["CAP_SYS_ADMIN"]);
        });
        assert!(!f.ok);
        assert_eq!(f.evidence[0].path, "/process/capabilities/bounding");
        assert_eq!(f.evidence[0].value, serde_json::json!(["CAP_SYS_ADMIN"]));
    }

    #[test]
    fn no_new_privileges_fails_when_unset() {
        assert!(
            !broken("no_new_privileges", |s| s["process"]["noNewPrivileges"] =
                false.into())
            .ok
        );
        assert!(
            !broken("no_new_privileges", |s| {
                s["process"]
                    .as_object_mut()
                    .unwrap()
                    .remove("noNewPrivileges");
            })
            .ok
        );
    }

    #[test]
    fn seccomp_fails_when_allowing_by_default_changed_or_absent() {
        let f = broken("seccomp", |s| {
            s["linux"]["seccomp"]["defaultAction"] = "SCMP_ACT_ALLOW".into()
        });
        assert!(!f.ok && f.detail.contains("does not deny"), "{f:?}");
        let f = broken("seccomp", |s| {
            s["linux"]["seccomp"]["syscalls"]
                .as_array_mut()
                .unwrap()
                .pop();
        });
        assert!(
            !f.ok && f.detail.contains("differs from the shipped profile"),
            "{f:?}"
        );
        let f = broken("seccomp", |s| {
            s["linux"].as_object_mut().unwrap().remove("seccomp");
        });
        assert!(!f.ok);
    }

    #[test]
    fn read_only_root_fails_when_writable() {
        assert!(!broken("read_only_root", |s| s["root"]["readonly"] = false.into()).ok);
    }

    #[test]
    fn only_data_from_host_fails_with_another_bind_or_a_weak_data() {
        let f = broken("only_data_from_host", |s| {
            s["mounts"].as_array_mut().unwrap().push(serde_json::json!({
                "destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "ro"]
            }));
        });
        assert!(!f.ok, "{f:?}");
        assert_eq!(f.evidence[0].value["source"], "/");
        let f = broken("only_data_from_host", |s| {
            let m = s["mounts"].as_array_mut().unwrap();
            let data = m.iter_mut().find(|m| m["destination"] == "/data").unwrap();
            data["source"] = "/var/lib/perfbox/jobs/8/out".into();
        });
        assert!(!f.ok, "another job's output dir");
        let f = broken("only_data_from_host", |s| {
            let m = s["mounts"].as_array_mut().unwrap();
            let data = m.iter_mut().find(|m| m["destination"] == "/data").unwrap();
            data["options"] = serde_json::json!(["rbind", "rw"]);
        });
        assert!(!f.ok && f.detail.contains("nosuid"), "{f:?}");
        let f = broken("only_data_from_host", |s| {
            s["mounts"].as_array_mut().unwrap().push(serde_json::json!({
                "destination": "/etc/x", "type": "ext4", "source": "/dev/vda", "options": []
            }));
        });
        assert!(!f.ok);
    }

    #[test]
    fn masked_and_read_only_paths_fail_when_one_is_dropped() {
        let f = broken("masked_and_read_only_paths", |s| {
            s["linux"]["maskedPaths"]
                .as_array_mut()
                .unwrap()
                .retain(|p| p != "/proc/kcore");
        });
        assert!(!f.ok && f.detail.contains("/proc/kcore"), "{f:?}");
    }

    #[test]
    fn limits_as_recorded_fails_when_the_spec_differs() {
        let f = broken("limits_as_recorded", |s| {
            s["linux"]["resources"]["memory"]["limit"] = 1.into()
        });
        assert!(!f.ok && f.detail.contains("memory"), "{f:?}");
        assert_eq!(f.evidence[0].path, "/linux/resources/memory/limit");
        let f = broken("limits_as_recorded", |s| {
            let r = s["process"]["rlimits"].as_array_mut().unwrap();
            r.retain(|r| r["type"] != "RLIMIT_NOFILE");
        });
        assert!(!f.ok && f.detail.contains("nofile"), "{f:?}");
    }

    #[test]
    fn default_devices_only_fails_with_a_disk() {
        let f = broken("default_devices_only", |s| {
            s["linux"]["devices"] =
                serde_json::json!([{"path": "/dev/vda", "type": "b", "major": 254, "minor": 0}]);
        });
        assert!(!f.ok && f.detail.contains("/dev/vda"), "{f:?}");
    }
}
