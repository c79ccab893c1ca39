//! Signed result receipts: a job's result, bound to what produced it, signed with the service's
//! Ed25519 key, checkable offline by anyone holding the public key (`perfbox verify`).
//!
//! # Format
//! ```json
//! { "receipt": { "format": "perfbox-receipt/1", "job": 7, "dockerfile_sha256": "…",
//!                "image_digest": "sha256:…", "spec_sha256": "…", "runtime": "runc",
//!                "runtime_version": "runc version 1.1.5+ds1", "limits": {…},
//!                "status": "succeeded", "perf": 0.9876, "created_at": "2026-…Z", …,
//!                "issued_at": "2026-…Z" },
//!   "key_id": "ed25519:…", "signature": "<base64>" }
//! ```
//! The signature is over [`SIGNING_PREFIX`] followed by the canonical encoding of `receipt`:
//! JSON with object keys sorted bytewise, no whitespace, numbers as serde_json writes them
//! (shortest round-trip form). Timestamps are RFC 3339 strings, so that the only float is `perf`.
//!
//! # Keys
//! `<state_dir>/receipt.key` holds the 32-byte secret seed (base64, mode 0600, the service
//! user's); `<state_dir>/receipt.pub` the public key (base64, mode 0644), also served at
//! `GET /receipt-key`. A key id is `ed25519:` and the first 16 hex digits of the public key's
//! SHA-256.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{JobRecord, JobStatus};

/// What a receipt's `format` says.
pub const FORMAT: &str = "perfbox-receipt/1";
/// Signed before the canonical receipt (so a signature over a receipt means nothing else).
pub const SIGNING_PREFIX: &[u8] = b"perfbox-receipt/1\n";
/// The secret key's file in the state dir.
pub const KEY_FILE: &str = "receipt.key";
/// The public key's file in the state dir.
pub const PUB_FILE: &str = "receipt.pub";

/// Why the key pair cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Filesystem failure.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("{0} does not hold an Ed25519 key (one base64 line of 32 bytes)")]
    Malformed(PathBuf),
    /// Others may read the secret key.
    #[error(
        "{path} is mode {mode:o}: the secret key must be readable only by its owner (chmod 600)"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// No random bytes.
    #[error("no randomness for a new key: {0}")]
    Random(getrandom::Error),
}

/// The service's signing key.
#[derive(Clone)]
pub struct ReceiptKey {
    key: SigningKey,
}

impl std::fmt::Debug for ReceiptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptKey")
            .field("key_id", &key_id(&self.key.verifying_key()))
            .finish_non_exhaustive()
    }
}

/// `ed25519:` and the first 16 hex digits of the public key's SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    format!(
        "ed25519:{}",
        &hex::encode(Sha256::digest(key.as_bytes()))[..16]
    )
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + use<> {
    let path = path.to_path_buf();
    move |source| KeyError::Io { what, path, source }
}

/// Decode one base64 line of 32 bytes.
fn key_bytes(text: &str, path: &Path) -> Result<[u8; 32], KeyError> {
    B64.decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| KeyError::Malformed(path.to_path_buf()))
}

impl ReceiptKey {
    /// Load the key pair from `dir`, or make one there if there is none. Returns the key and
    /// whether it was made now. New files belong to the calling user (the secret one 0600).
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool), KeyError> {
        let secret = dir.join(KEY_FILE);
        if secret.exists() {
            return Ok((Self::load(&secret)?, false));
        }
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(KeyError::Random)?;
        let key = SigningKey::from_bytes(&seed);
        // Written whole under a temporary name, then renamed: a crash leaves no half key.
        let tmp = dir.join(format!("{KEY_FILE}.new"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("cannot create", &tmp))?;
        writeln!(f, "{}", B64.encode(seed))
            .and_then(|()| f.sync_all())
            .map_err(io("cannot write", &tmp))?;
        let public = dir.join(PUB_FILE);
        std::fs::write(
            &public,
            format!("{}\n", B64.encode(key.verifying_key().as_bytes())),
        )
        .map_err(io("cannot write", &public))?;
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644))
            .map_err(io("cannot chmod", &public))?;
        std::fs::rename(&tmp, &secret).map_err(io("cannot rename", &tmp))?;
        Ok((Self { key }, true))
    }

    /// Load the secret key file (refused if others may read it); rewrite the public key file
    /// if it does not match.
    pub fn load(secret: &Path) -> Result<Self, KeyError> {
        let meta = std::fs::metadata(secret).map_err(io("cannot stat", secret))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: secret.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(secret).map_err(io("cannot read", secret))?;
        let key = SigningKey::from_bytes(&key_bytes(&text, secret)?);
        let public = secret.with_file_name(PUB_FILE);
        let want = format!("{}\n", B64.encode(key.verifying_key().as_bytes()));
        if std::fs::read_to_string(&public).ok().as_deref() != Some(want.as_str()) {
            std::fs::write(&public, want).map_err(io("cannot write", &public))?;
            let _ = std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644));
        }
        Ok(Self { key })
    }

    /// The public half, as `GET /receipt-key` serves it.
    pub fn public(&self) -> Value {
        let public = self.key.verifying_key();
        json!({
            "algorithm": "ed25519",
            "key_id": key_id(&public),
            "public_key": B64.encode(public.as_bytes()),
        })
    }

    /// The signed receipt of a finished job.
    pub fn receipt(&self, rec: &JobRecord, issued_at: SystemTime) -> Value {
        let body = receipt_body(rec, issued_at);
        let signature = self.key.sign(&signed_bytes(&body));
        json!({
            "receipt": body,
            "key_id": key_id(&self.key.verifying_key()),
            "signature": B64.encode(signature.to_bytes()),
        })
    }
}

fn rfc3339(unix: f64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs_f64(unix.max(0.0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// What a receipt binds, from a job record.
pub fn receipt_body(rec: &JobRecord, issued_at: SystemTime) -> Value {
    let time = |t: Option<f64>| t.map_or(Value::Null, |t| Value::String(rfc3339(t)));
    json!({
        "format": FORMAT,
        "job": rec.id,
        "dockerfile_sha256": rec.dockerfile_sha256,
        "image_digest": rec.image_digest,
        "spec_sha256": rec.spec_sha256,
        "runtime": rec.runtime,
        "runtime_version": rec.runtime_version,
        "limits": rec.limits.as_ref().and_then(|l| serde_json::from_str::<Value>(l.get()).ok()),
        "status": rec.status,
        "perf": rec.perf,
        "created_at": rfc3339(rec.created_at),
        "build_started_at": time(rec.build_started_at),
        "run_started_at": time(rec.run_started_at),
        "finished_at": time(rec.finished_at),
        "issued_at": humantime::format_rfc3339_millis(issued_at).to_string(),
    })
}

/// The bytes a signature covers: [`SIGNING_PREFIX`], then the canonical JSON of `body`.
pub fn signed_bytes(body: &Value) -> Vec<u8> {
    // serde_json's map is ordered by key (no `preserve_order`), and `to_vec` writes no spaces.
    let mut out = SIGNING_PREFIX.to_vec();
    out.extend(serde_json::to_vec(body).unwrap_or_default());
    out
}

/// Why a receipt does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A field is missing or malformed.
    #[error("field {field}: {why}")]
    Field {
        /// JSON path of the field (`receipt.perf`).
        field: String,
        /// What is wrong.
        why: String,
    },
    /// Signed by another key than the one given.
    #[error("key: the receipt names key {receipt}, the key given is {given}")]
    OtherKey {
        /// The receipt's key id.
        receipt: String,
        /// The given key's id.
        given: String,
    },
    /// The signature does not match the receipt.
    #[error(
        "signature: it does not match the receipt (a field was changed after signing, or another key signed it)"
    )]
    Signature,
}

/// The public key in `text`: one base64 line, or the JSON of `GET /receipt-key`.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let b64 = match serde_json::from_str::<Value>(text) {
        Ok(v) => v["public_key"]
            .as_str()
            .ok_or("the JSON has no public_key")?
            .to_owned(),
        Err(_) => text.trim().to_owned(),
    };
    let bytes: [u8; 32] = B64
        .decode(b64)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("not a base64 Ed25519 public key (32 bytes)")?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

fn bad(field: &str, why: impl Into<String>) -> VerifyError {
    VerifyError::Field {
        field: field.to_owned(),
        why: why.into(),
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Check each field of a receipt's body, then the signature over it with `key`. Returns the
/// body.
pub fn verify<'r>(receipt: &'r Value, key: &VerifyingKey) -> Result<&'r Value, VerifyError> {
    let body = receipt
        .get("receipt")
        .filter(|b| b.is_object())
        .ok_or_else(|| bad("receipt", "missing or not an object"))?;
    check_fields(body)?;
    let given = key_id(key);
    match receipt["key_id"].as_str() {
        Some(id) if id == given => {}
        Some(id) => {
            return Err(VerifyError::OtherKey {
                receipt: id.to_owned(),
                given,
            });
        }
        None => return Err(bad("key_id", "missing or not a string")),
    }
    let sig = receipt["signature"]
        .as_str()
        .and_then(|s| B64.decode(s).ok())
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .ok_or_else(|| bad("signature", "missing, or not base64 of 64 bytes"))?;
    key.verify_strict(&signed_bytes(body), &Signature::from_bytes(&sig))
        .map_err(|_| VerifyError::Signature)?;
    Ok(body)
}

/// Each field of a receipt body has the type and form it must.
fn check_fields(body: &Value) -> Result<(), VerifyError> {
    let f = |name: &str| format!("receipt.{name}");
    if body["format"] != FORMAT {
        return Err(bad(&f("format"), format!("must be {FORMAT:?}")));
    }
    if body["job"].as_i64().is_none_or(|j| j <= 0) {
        return Err(bad(&f("job"), "must be a positive integer"));
    }
    if !body["dockerfile_sha256"].as_str().is_some_and(is_hex64) {
        return Err(bad(
            &f("dockerfile_sha256"),
            "must be 64 lowercase hex digits",
        ));
    }
    let optional = |name: &str, ok: &dyn Fn(&Value) -> bool, want: &str| {
        let v = &body[name];
        if v.is_null() || ok(v) {
            Ok(())
        } else {
            Err(bad(&f(name), format!("must be null or {want}")))
        }
    };
    optional(
        "image_digest",
        &|v| {
            v.as_str()
                .and_then(|s| s.strip_prefix("sha256:"))
                .is_some_and(is_hex64)
        },
        "sha256:<64 hex>",
    )?;
    optional(
        "spec_sha256",
        &|v| v.as_str().is_some_and(is_hex64),
        "64 hex digits",
    )?;
    optional("runtime", &Value::is_string, "a string")?;
    optional("runtime_version", &Value::is_string, "a string")?;
    optional("limits", &Value::is_object, "an object")?;
    let status = body["status"]
        .as_str()
        .and_then(JobStatus::parse)
        .filter(|s| s.is_terminal())
        .ok_or_else(|| bad(&f("status"), "must be the name of a final job status"))?;
    match (&body["perf"], status) {
        (Value::Number(n), JobStatus::Succeeded) if n.as_f64().is_some_and(f64::is_finite) => {}
        (_, JobStatus::Succeeded) => {
            return Err(bad(
                &f("perf"),
                "a succeeded job's perf must be a finite number",
            ));
        }
        (Value::Null, _) => {}
        (_, s) => return Err(bad(&f("perf"), format!("must be null for a {s} job"))),
    }
    let time = |v: &Value| {
        v.as_str()
            .is_some_and(|s| humantime::parse_rfc3339(s).is_ok())
    };
    for name in ["created_at", "issued_at"] {
        if !time(&body[name]) {
            return Err(bad(&f(name), "must be an RFC 3339 UTC time"));
        }
    }
    for name in ["build_started_at", "run_started_at", "finished_at"] {
        optional(name, &time, "an RFC 3339 UTC time")?;
    }
    let known = [
        "format",
        "job",
        "dockerfile_sha256",
        "image_digest",
        "spec_sha256",
        "runtime",
        "runtime_version",
        "limits",
        "status",
        "perf",
        "created_at",
        "build_started_at",
        "run_started_at",
        "finished_at",
        "issued_at",
    ];
    if let Some(extra) = body
        .as_object()
        .and_then(|o| o.keys().find(|k| !known.contains(&k.as_str())))
    {
        return Err(bad(&f(extra), "is not a field of this receipt format"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: JobStatus, perf: Option<f64>) -> JobRecord {
        let row = json!({
            "id": 7, "filename": "job.Dockerfile", "status": status, "error": null,
            "perf": perf, "dockerfile_sha256": "a".repeat(64), "created_at": 1_764_470_000.25,
            "build_started_at": 1_764_470_001.5, "build_finished_at": 1_764_470_002.0,
            "run_started_at": 1_764_470_002.0, "finished_at": 1_764_470_003.125,
            "image_digest": format!("sha256:{}", "b".repeat(64)), "cached_steps": 0,
            "total_steps": 2, "runtime": "runc", "cgroup": "v1",
            "limits": {"memory": {"by": "cgroup", "control": "v1 memory.limit_in_bytes", "value": "536870912"}},
            "exit_code": 0, "oom_killed": false, "image_cache": "miss", "build": null,
            "spec_sha256": "c".repeat(64), "runtime_version": "runc version 1.1.5+ds1",
        });
        serde_json::from_str(&row.to_string()).unwrap()
    }

    fn key() -> ReceiptKey {
        ReceiptKey {
            key: SigningKey::from_bytes(&[7; 32]),
        }
    }

    fn verifying(k: &ReceiptKey) -> VerifyingKey {
        k.key.verifying_key()
    }

    #[test]
    fn a_receipt_verifies_and_survives_a_round_trip_through_text() {
        let k = key();
        let r = k.receipt(
            &record(JobStatus::Succeeded, Some(0.9876)),
            UNIX_EPOCH + Duration::from_secs(1_764_470_010),
        );
        let text = serde_json::to_string_pretty(&r).unwrap();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        let body = verify(&parsed, &verifying(&k)).unwrap();
        assert_eq!(body["perf"], 0.9876);
        assert_eq!(body["created_at"], "2025-11-30T02:33:20.250Z");
        assert_eq!(body["spec_sha256"], "c".repeat(64));
        // Awkward floats survive the text round trip exactly.
        for p in [0.1 + 0.2, 1e-300, 123_456_789.123_456_78, -0.0] {
            let r = k.receipt(&record(JobStatus::Succeeded, Some(p)), SystemTime::now());
            let back: Value = serde_json::from_str(&r.to_string()).unwrap();
            verify(&back, &verifying(&k)).unwrap();
        }
    }

    #[test]
    fn a_changed_field_or_another_key_fails() {
        let k = key();
        let r = k.receipt(&record(JobStatus::Succeeded, Some(0.5)), SystemTime::now());
        let mut changed = r.clone();
        changed["receipt"]["perf"] = json!(0.99);
        assert_eq!(
            verify(&changed, &verifying(&k)),
            Err(VerifyError::Signature)
        );

        let other = ReceiptKey {
            key: SigningKey::from_bytes(&[8; 32]),
        };
        let err = verify(&r, &verifying(&other)).unwrap_err();
        assert!(matches!(err, VerifyError::OtherKey { .. }), "{err}");
        // Signed by another key that claims this key's id: the signature fails.
        let mut forged = other.receipt(&record(JobStatus::Succeeded, Some(0.5)), SystemTime::now());
        forged["key_id"] = json!(key_id(&verifying(&k)));
        assert_eq!(verify(&forged, &verifying(&k)), Err(VerifyError::Signature));
    }

    #[test]
    fn malformed_fields_are_named() {
        let k = key();
        let r = k.receipt(&record(JobStatus::Succeeded, Some(0.5)), SystemTime::now());
        let cases: [(&str, Value, &str); 6] = [
            ("perf", json!("0.5"), "receipt.perf"),
            ("status", json!("running"), "receipt.status"),
            ("spec_sha256", json!("xyz"), "receipt.spec_sha256"),
            ("created_at", json!(1.5), "receipt.created_at"),
            ("job", json!(-1), "receipt.job"),
            ("extra", json!(1), "receipt.extra"),
        ];
        for (name, value, field) in cases {
            let mut bad = r.clone();
            bad["receipt"][name] = value;
            match verify(&bad, &verifying(&k)) {
                Err(VerifyError::Field { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{name}: {other:?}"),
            }
        }
        let mut no_sig = r.clone();
        no_sig["signature"] = json!("AAAA");
        assert!(matches!(
            verify(&no_sig, &verifying(&k)),
            Err(VerifyError::Field { .. })
        ));
    }

    #[test]
    fn a_failed_job_has_a_receipt_without_perf() {
        let k = key();
        let r = k.receipt(&record(JobStatus::RunFailed, None), SystemTime::now());
        assert_eq!(r["receipt"]["perf"], Value::Null);
        verify(&r, &verifying(&k)).unwrap();
    }

    #[test]
    fn keys_are_made_once_kept_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (a, made) = ReceiptKey::load_or_create(dir.path()).unwrap();
        assert!(made);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, made) = ReceiptKey::load_or_create(dir.path()).unwrap();
        assert!(!made);
        assert_eq!(a.public(), b.public());
        let public = std::fs::read_to_string(dir.path().join(PUB_FILE)).unwrap();
        assert_eq!(parse_public_key(&public).unwrap(), verifying(&a));
        assert_eq!(
            parse_public_key(&a.public().to_string()).unwrap(),
            verifying(&a)
        );

        std::fs::set_permissions(
            dir.path().join(KEY_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = ReceiptKey::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::Exposed { .. }), "{err}");
    }
}
