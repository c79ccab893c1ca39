//! Turning the `Control.Status` stream into human-readable build log lines, and counting steps.
//!
//! The daemon sends incremental updates: a vertex (one LLB op, named like
//! `[2/3] RUN make`) appears several times as it starts, is found in cache, completes or fails;
//! the last update wins. Output lines follow `buildctl --progress=plain`:
//! `#3 [2/3] RUN make`, `#3 CACHED`, `#3 <process output>`, `#3 DONE 1.2s`, `#3 ERROR: ...`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::proto::control::StatusResponse;

/// Where build progress lines go. Implementations must be cheap: they are called from the
/// status stream task once per line.
pub trait BuildLog: Send + Sync + 'static {
    /// One complete line of build output, without its trailing newline.
    fn line(&self, line: &str);
}

impl<F: Fn(&str) + Send + Sync + 'static> BuildLog for F {
    fn line(&self, line: &str) {
        self(line)
    }
}

/// Discards every line.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullLog;

impl BuildLog for NullLog {
    fn line(&self, _line: &str) {}
}

/// Appends lines to a file, flushing after each one so `tail -f` follows the build live.
#[derive(Debug)]
pub struct FileLog {
    file: Mutex<std::fs::File>,
}

impl FileLog {
    /// Open (create if needed) `path` for appending.
    pub fn append(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }
}

impl BuildLog for FileLog {
    fn line(&self, line: &str) {
        // A full disk or a poisoned lock must not fail the build; the log is best effort.
        if let Ok(mut f) = self.file.lock() {
            let _ = f.write_all(format!("{line}\n").as_bytes());
            let _ = f.flush();
        }
    }
}

/// Keeps lines in memory (for tests, or to attach the log to an error report).
#[derive(Debug, Clone, Default)]
pub struct MemoryLog {
    lines: Arc<Mutex<Vec<String>>>,
}

impl MemoryLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl BuildLog for MemoryLog {
    fn line(&self, line: &str) {
        if let Ok(mut l) = self.lines.lock() {
            l.push(line.to_owned());
        }
    }
}

/// What the status stream told us, once it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StatusSummary {
    /// Dockerfile steps (`[N/M] ...` and `[stage N/M] ...` vertices, FROM excluded).
    pub total_steps: usize,
    /// Of those, the ones BuildKit took from its cache.
    pub cached_steps: usize,
    /// `(vertex name, error)` of vertices that failed.
    pub errors: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct VertexState {
    /// `#N` in the log, assigned when the vertex first prints something.
    number: Option<usize>,
    name: String,
    announced: bool,
    cached: bool,
    cached_reported: bool,
    completed_reported: bool,
    error: String,
    /// Output not yet terminated by a newline, per stream.
    partial: HashMap<i64, Vec<u8>>,
}

/// Accumulates status updates and writes log lines.
pub(crate) struct StatusTracker {
    log: Arc<dyn BuildLog>,
    vertices: HashMap<String, VertexState>,
    next_number: usize,
}

impl StatusTracker {
    pub(crate) fn new(log: Arc<dyn BuildLog>) -> Self {
        Self {
            log,
            vertices: HashMap::new(),
            next_number: 1,
        }
    }

    /// A line that is not about a vertex (client-side events).
    pub(crate) fn note(&self, line: &str) {
        self.log.line(line);
    }

    /// The state of `digest` and its log number (assigned now if it had none).
    fn vertex(&mut self, digest: &str) -> (&mut VertexState, usize) {
        let st = self.vertices.entry(digest.to_owned()).or_default();
        let n = *st.number.get_or_insert_with(|| {
            self.next_number += 1;
            self.next_number - 1
        });
        (st, n)
    }

    pub(crate) fn apply(&mut self, resp: &StatusResponse) {
        let mut out = Vec::new();
        for v in &resp.vertexes {
            let visible = v.started.is_some() || v.cached || v.completed.is_some();
            if !visible && !self.vertices.contains_key(&v.digest) {
                // Not started yet: remember the name, number it when it starts.
                self.vertices
                    .entry(v.digest.clone())
                    .or_default()
                    .name
                    .clone_from(&v.name);
                continue;
            }
            let (st, n) = self.vertex(&v.digest);
            if !v.name.is_empty() {
                st.name.clone_from(&v.name);
            }
            if !st.announced && visible {
                st.announced = true;
                out.push(format!("#{n} {}", st.name));
            }
            if v.cached {
                st.cached = true;
                if !st.cached_reported {
                    st.cached_reported = true;
                    out.push(format!("#{n} CACHED"));
                }
            }
            if !v.error.is_empty() && st.error.is_empty() {
                st.error.clone_from(&v.error);
                out.push(format!("#{n} ERROR: {}", v.error));
            }
            if let (Some(start), Some(end)) = (&v.started, &v.completed)
                && v.error.is_empty()
                && !st.cached
                && !st.completed_reported
            {
                st.completed_reported = true;
                let secs =
                    (end.seconds - start.seconds) as f64 + f64::from(end.nanos - start.nanos) / 1e9;
                out.push(format!("#{n} DONE {secs:.1}s"));
            }
        }
        for s in &resp.statuses {
            if s.completed.is_some() {
                let n = self.vertex(&s.vertex).1;
                let id = if s.name.is_empty() { &s.id } else { &s.name };
                out.push(format!("#{n} {id} done"));
            }
        }
        for l in &resp.logs {
            let (st, n) = self.vertex(&l.vertex);
            let buf = st.partial.entry(l.stream).or_default();
            buf.extend_from_slice(&l.msg);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let rest = buf.split_off(pos + 1);
                let line = String::from_utf8_lossy(&buf[..pos])
                    .trim_end_matches('\r')
                    .to_owned();
                *buf = rest;
                out.push(format!("#{n} {line}"));
            }
        }
        for w in &resp.warnings {
            let n = self.vertex(&w.vertex).1;
            out.push(format!("#{n} WARN: {}", String::from_utf8_lossy(&w.short)));
        }
        for line in out {
            self.log.line(&line);
        }
    }

    /// Flush partial output lines and summarise.
    pub(crate) fn finish(&mut self) -> StatusSummary {
        let mut vertices: Vec<&mut VertexState> = self.vertices.values_mut().collect();
        vertices.sort_by_key(|v| v.number.unwrap_or(usize::MAX));
        let mut summary = StatusSummary::default();
        for v in vertices {
            for (_, buf) in v.partial.drain() {
                if !buf.is_empty() {
                    let n = v.number.unwrap_or_default();
                    self.log
                        .line(&format!("#{n} {}", String::from_utf8_lossy(&buf)));
                }
            }
            if is_dockerfile_step(&v.name) {
                summary.total_steps += 1;
                if v.cached {
                    summary.cached_steps += 1;
                }
            }
            if !v.error.is_empty() {
                summary.errors.push((v.name.clone(), v.error.clone()));
            }
        }
        summary
    }
}

/// The dockerfile frontend names the vertices of Dockerfile instructions `[N/M] ...` or
/// `[stage N/M] ...`; internal ones are `[internal] ...` and the export has no brackets.
/// `FROM` vertices are not counted: they are image sources that BuildKit resolves (and pulls
/// once), never executes, and never reports as cached.
fn is_dockerfile_step(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('[') else {
        return false;
    };
    let Some((label, instruction)) = rest.split_once(']') else {
        return false;
    };
    if instruction.trim_start().starts_with("FROM ") {
        return false;
    }
    let counter = label.rsplit(' ').next().unwrap_or_default();
    matches!(counter.split_once('/'), Some((a, b))
        if !a.is_empty() && !b.is_empty()
            && a.chars().all(|c| c.is_ascii_digit())
            && b.chars().all(|c| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::super::proto::Timestamp;
    use super::super::proto::control::{Vertex, VertexLog};
    use super::*;

    fn ts(s: i64) -> Option<Timestamp> {
        Some(Timestamp {
            seconds: s,
            nanos: 0,
        })
    }

    #[test]
    fn recognises_dockerfile_steps() {
        assert!(is_dockerfile_step("[2/2] RUN echo built > /built"));
        assert!(!is_dockerfile_step(
            "[stage-0 1/2] FROM docker.io/library/busybox"
        ));
        assert!(is_dockerfile_step("[stage-0 2/2] RUN true"));
        assert!(is_dockerfile_step("[builder 3/4] COPY . ."));
        assert!(!is_dockerfile_step("[internal] load build definition"));
        assert!(!is_dockerfile_step("exporting to client tarball"));
        assert!(!is_dockerfile_step("[a/b] nope"));
    }

    #[test]
    fn writes_plain_progress_and_counts_cached_steps() {
        let log = MemoryLog::new();
        let mut t = StatusTracker::new(Arc::new(log.clone()));
        let run = Vertex {
            digest: "sha256:r".into(),
            name: "[2/2] RUN echo hi".into(),
            started: ts(10),
            ..Default::default()
        };
        let from = Vertex {
            digest: "sha256:f".into(),
            name: "[1/2] FROM docker.io/library/busybox".into(),
            cached: true,
            started: ts(9),
            completed: ts(9),
            ..Default::default()
        };
        t.apply(&StatusResponse {
            vertexes: vec![from, run.clone()],
            ..Default::default()
        });
        t.apply(&StatusResponse {
            logs: vec![
                VertexLog {
                    vertex: "sha256:r".into(),
                    stream: 1,
                    msg: b"hel".to_vec(),
                    ..Default::default()
                },
                VertexLog {
                    vertex: "sha256:r".into(),
                    stream: 1,
                    msg: b"lo\npartial".to_vec(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        t.apply(&StatusResponse {
            vertexes: vec![Vertex {
                completed: ts(12),
                ..run
            }],
            ..Default::default()
        });
        let s = t.finish();
        assert_eq!(
            log.lines(),
            vec![
                "#1 [1/2] FROM docker.io/library/busybox",
                "#1 CACHED",
                "#2 [2/2] RUN echo hi",
                "#2 hello",
                "#2 DONE 2.0s",
                "#2 partial",
            ]
        );
        // FROM is not a step; the RUN ran.
        assert_eq!(s.total_steps, 1);
        assert_eq!(s.cached_steps, 0);
        assert!(s.errors.is_empty());
    }

    #[test]
    fn records_vertex_errors_once() {
        let log = MemoryLog::new();
        let mut t = StatusTracker::new(Arc::new(log.clone()));
        let v = Vertex {
            digest: "sha256:x".into(),
            name: "[2/2] RUN exit 3".into(),
            started: ts(1),
            completed: ts(2),
            error: "exit code: 3".into(),
            ..Default::default()
        };
        t.apply(&StatusResponse {
            vertexes: vec![v.clone(), v],
            ..Default::default()
        });
        let s = t.finish();
        assert_eq!(
            log.lines(),
            vec!["#1 [2/2] RUN exit 3", "#1 ERROR: exit code: 3"]
        );
        assert_eq!(
            s.errors,
            vec![("[2/2] RUN exit 3".to_owned(), "exit code: 3".to_owned())]
        );
    }

    #[test]
    fn file_log_appends_lines() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("build.log");
        let log = FileLog::append(&p).expect("open");
        log.line("a");
        log.line("b");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "a\nb\n");
    }
}
