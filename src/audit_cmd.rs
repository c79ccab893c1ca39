//! `perfbox audit`, `perfbox receipt`, `perfbox verify` and `perfbox keygen`: the auditor's
//! commands. `audit` and `receipt` ask the service (`GET /job/{id}/audit`, `/job/{id}/receipt`);
//! `verify` needs nothing but the receipt and the public key; `keygen` makes the service's key
//! pair at install.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::ClientArgs;
use perfbox::jobs::receipt;

/// Which jobs `perfbox audit` checks.
pub struct Selection {
    /// These ids.
    pub ids: Vec<i64>,
    /// Every job visible to the caller.
    pub all: bool,
    /// With `all`: only jobs submitted at or after this time (RFC 3339, or a date).
    pub since: Option<String>,
}

/// `2026-11-30` or `2026-11-30T04:00:00Z` → Unix seconds.
fn parse_since(s: &str) -> Result<f64> {
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    let t = humantime::parse_rfc3339_weak(&full).with_context(|| {
        format!("--since {s:?}: expected a date (2026-11-30) or an RFC 3339 time")
    })?;
    Ok(t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64())
}

/// The ids of every job visible to the caller, oldest first, submitted at or after `since`.
async fn all_ids(client: &ClientArgs, since: Option<f64>) -> Result<Vec<i64>> {
    let mut ids = vec![];
    let mut path = "/jobs?limit=1000".to_owned();
    'pages: loop {
        let page = client.json(&path).await?;
        for job in page["jobs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if since.is_some_and(|s| job["created_at"].as_f64().unwrap_or(0.0) < s) {
                break 'pages; // newest first: the rest are older
            }
            ids.push(job["id"].as_i64().context("a job without an id")?);
        }
        match page["next"].as_str() {
            Some(next) => path = next.to_owned(),
            None => break,
        }
    }
    ids.reverse();
    Ok(ids)
}

/// Audit the selected jobs; print a report (or JSON); `Ok(true)` when every one passed.
pub async fn audit(sel: Selection, json: bool, verbose: bool, client: &ClientArgs) -> Result<bool> {
    let ids = match (sel.all, sel.ids.is_empty()) {
        (true, true) => {
            let since = sel.since.as_deref().map(parse_since).transpose()?;
            all_ids(client, since).await?
        }
        (false, false) if sel.since.is_none() => sel.ids,
        (false, false) => bail!("--since goes with --all"),
        (true, false) => bail!("give job ids or --all, not both"),
        (false, true) => bail!("give job ids, or --all"),
    };
    let mut audits = Vec::with_capacity(ids.len());
    for id in ids {
        audits.push(client.json(&format!("/job/{id}/audit")).await?);
    }
    let ok = audits.iter().all(|a| a["ok"] == true);
    if json {
        let report = serde_json::json!({ "ok": ok, "jobs": audits });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ok);
    }
    let failed = audits.iter().filter(|a| a["ok"] != true).count();
    for a in &audits {
        print_audit(a, verbose);
    }
    let n = audits.len();
    let jobs = if n == 1 { "job" } else { "jobs" };
    println!("{n} {jobs} audited: {} passed, {failed} failed", n - failed);
    Ok(ok)
}

fn print_audit(a: &Value, verbose: bool) {
    let findings = a["findings"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let verdict = if a["ok"] == true { "PASS" } else { "FAIL" };
    println!(
        "job {} ({}): {verdict} ({} rules checked)",
        a["job"],
        a["status"].as_str().unwrap_or("?"),
        findings.len()
    );
    for f in findings {
        let ok = f["ok"] == true;
        if ok && !verbose {
            continue;
        }
        println!(
            "  {} {} ({}): {}",
            if ok { "pass" } else { "FAIL" },
            f["rule"].as_str().unwrap_or("?"),
            f["source"].as_str().unwrap_or("?"),
            f["detail"].as_str().unwrap_or("")
        );
        for e in f["evidence"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            println!(
                "       {} = {}",
                e["path"].as_str().unwrap_or(""),
                e["value"]
            );
        }
    }
    for n in a["not_audited"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        println!("  not audited: {}", n.as_str().unwrap_or(""));
    }
}

/// `perfbox receipt ID`: the signed receipt, as the service issues it.
pub async fn receipt(id: i64, client: &ClientArgs) -> Result<()> {
    let r = client.json(&format!("/job/{id}/receipt")).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

/// Where the public key is when `--key` is not given: `$PERFBOX_STATE_DIR/receipt.pub`, or the
/// default state dir's.
pub fn default_key() -> PathBuf {
    std::env::var_os("PERFBOX_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| perfbox::config::Config::default().state_dir)
        .join(receipt::PUB_FILE)
}

/// `perfbox verify RECEIPT [--key PUBKEY]`: `Ok(true)` when the receipt is well formed and signed
/// by the key; what failed is printed otherwise.
pub fn verify(receipt_path: &Path, key_path: &Path) -> Result<bool> {
    let text = if receipt_path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read the receipt from stdin")?
    } else {
        std::fs::read_to_string(receipt_path)
            .with_context(|| format!("cannot read {}", receipt_path.display()))?
    };
    let key_text = std::fs::read_to_string(key_path)
        .with_context(|| format!("cannot read the public key {}", key_path.display()))?;
    let key = receipt::parse_public_key(&key_text)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{}", key_path.display()))?;
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            println!("INVALID: the receipt is not JSON: {e}");
            return Ok(false);
        }
    };
    match receipt::verify(&value, &key) {
        Ok(body) => {
            println!(
                "OK: job {} {} (perf {}), Dockerfile sha256 {}, spec sha256 {}, signed by {}",
                body["job"],
                body["status"].as_str().unwrap_or("?"),
                body["perf"],
                body["dockerfile_sha256"].as_str().unwrap_or("?"),
                body["spec_sha256"].as_str().unwrap_or("none"),
                receipt::key_id(&key)
            );
            Ok(true)
        }
        Err(e) => {
            println!("INVALID: {e}");
            Ok(false)
        }
    }
}

/// `perfbox keygen`: make the receipt key pair in `state_dir` unless it is there.
pub fn keygen(state_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let (key, made) = receipt::ReceiptKey::load_or_create(state_dir)?;
    println!(
        "receipt key {} {}: public key {}",
        key.public()["key_id"].as_str().unwrap_or("?"),
        if made { "made" } else { "already there" },
        state_dir.join(receipt::PUB_FILE).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_date_or_a_time() {
        assert_eq!(parse_since("1970-01-02").unwrap(), 86400.0);
        assert_eq!(parse_since("1970-01-01T00:01:00Z").unwrap(), 60.0);
        assert!(parse_since("yesterday").is_err());
    }
}
