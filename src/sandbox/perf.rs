//! The job's result: `/data/perf.json` (`{"perf": <finite number>}`), read from the host side
//! with [`safe_read`](super::safe_read) after the container has exited.

use std::path::Path;

use super::safe_read::{SafeReadError, read_beneath};

/// Largest perf.json read.
pub const MAX_PERF_BYTES: u64 = 64 * 1024;

/// Why no perf value could be taken from a job's output.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PerfError {
    /// The job wrote no /data/perf.json.
    #[error("the job wrote no /data/perf.json")]
    Missing,
    /// perf.json is a symlink (never followed).
    #[error("/data/perf.json is a symlink; refused without following it")]
    Symlink,
    /// perf.json is not a regular file.
    #[error("/data/perf.json is not a regular file (it is a {0})")]
    NotRegular(&'static str),
    /// perf.json is larger than [`MAX_PERF_BYTES`].
    #[error("/data/perf.json is {0} bytes, more than the {MAX_PERF_BYTES} allowed")]
    TooBig(u64),
    /// Not JSON, or not an object with a `perf` key.
    #[error("/data/perf.json is not JSON of the form {{\"perf\": <number>}}: {0}")]
    NotJson(String),
    /// `perf` present but not a number.
    #[error("\"perf\" in /data/perf.json is not a number: {0}")]
    NotANumber(String),
    /// `perf` is NaN or infinite (or a number too large for f64).
    #[error("\"perf\" in /data/perf.json is not finite: {0}")]
    NotFinite(String),
    /// Reading failed for another reason.
    #[error("cannot read /data/perf.json: {0}")]
    Io(String),
}

/// Read and validate `perf.json` in the job's output dir (the dir mounted at /data).
pub fn read_perf(out_dir: &Path) -> Result<f64, PerfError> {
    let bytes = read_beneath(out_dir, "perf.json", MAX_PERF_BYTES).map_err(|e| match e {
        SafeReadError::Missing(_) => PerfError::Missing,
        SafeReadError::Symlink(_) => PerfError::Symlink,
        SafeReadError::NotRegular { kind, .. } => PerfError::NotRegular(kind),
        SafeReadError::TooBig { size, .. } => PerfError::TooBig(size),
        SafeReadError::Io { message, .. } => PerfError::Io(message),
    })?;
    parse_perf(&bytes)
}

/// Validate the bytes of a perf.json.
pub fn parse_perf(bytes: &[u8]) -> Result<f64, PerfError> {
    let text = std::str::from_utf8(bytes).map_err(|e| PerfError::NotJson(e.to_string()))?;
    // Python's json.dump writes NaN/Infinity for non-finite floats: name them precisely.
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            if ["NaN", "Infinity", "-Infinity"]
                .iter()
                .any(|w| text.contains(w))
            {
                return Err(PerfError::NotFinite(text.trim().chars().take(80).collect()));
            }
            return Err(PerfError::NotJson(e.to_string()));
        }
    };
    let perf = value
        .as_object()
        .ok_or_else(|| PerfError::NotJson("top level is not an object".into()))?
        .get("perf")
        .ok_or_else(|| PerfError::NotJson("no \"perf\" key".into()))?;
    match perf {
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() => Ok(f),
            _ => Err(PerfError::NotFinite(n.to_string())),
        },
        other => Err(PerfError::NotANumber(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_finite_numbers_only() {
        assert_eq!(parse_perf(br#"{"perf": 0.9876}"#), Ok(0.9876));
        assert_eq!(parse_perf(b"{\"perf\":-3}\n"), Ok(-3.0));
        assert_eq!(parse_perf(br#"{"perf": 1, "other": "x"}"#), Ok(1.0));
        assert!(matches!(
            parse_perf(br#"{"perf": "0.9"}"#),
            Err(PerfError::NotANumber(_))
        ));
        assert!(matches!(
            parse_perf(br#"{"perf": null}"#),
            Err(PerfError::NotANumber(_))
        ));
        assert!(matches!(
            parse_perf(br#"{"perf": NaN}"#),
            Err(PerfError::NotFinite(_))
        ));
        assert!(matches!(
            parse_perf(br#"{"perf": Infinity}"#),
            Err(PerfError::NotFinite(_))
        ));
        assert!(matches!(
            parse_perf(br#"{"perf": 1e999}"#),
            Err(PerfError::NotFinite(_)) | Err(PerfError::NotJson(_))
        ));
        assert!(matches!(parse_perf(b"0.9"), Err(PerfError::NotJson(_))));
        assert!(matches!(
            parse_perf(b"{\"perf\""),
            Err(PerfError::NotJson(_))
        ));
        assert!(matches!(
            parse_perf(br#"{"score": 1}"#),
            Err(PerfError::NotJson(_))
        ));
        assert!(matches!(
            parse_perf(b"\xff\xfe"),
            Err(PerfError::NotJson(_))
        ));
    }
}
