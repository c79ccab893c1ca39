//! The outcome of a run: a pure function from what the sandbox reported to the job's final status
//! and the fields recorded with it. No I/O; every row of the table is a unit test.

use super::state::JobStatus;
use super::store::Patch;
use crate::sandbox::RunEnd;
use crate::sandbox::perf::PerfError;

/// What a run reported, as far as the outcome depends on it.
#[derive(Debug)]
pub struct RunFacts<'a> {
    /// How it ended.
    pub end: &'a RunEnd,
    /// Whether the OOM killer killed it.
    pub oom_killed: bool,
    /// `/data/perf.json`, validated.
    pub perf: &'a Result<f64, PerfError>,
    /// The end of its output (for the reason of a failure).
    pub log_tail: &'a str,
    /// Its memory limit (for the reason of an OOM kill).
    pub memory_limit: u64,
}

/// The job's final status and what to record with it (`exit_code`, `perf`, `error`); the caller
/// adds what it knows besides (runtime, limits...).
pub fn outcome(run: &RunFacts<'_>) -> (JobStatus, Patch) {
    let mut patch = Patch::default();
    let exit = |code: i32| Some(i64::from(code));
    let (status, error) = match (run.end, run.perf) {
        (RunEnd::Cancelled, _) => (
            JobStatus::Cancelled,
            Some("cancelled by request while running; the container was killed".to_owned()),
        ),
        (RunEnd::DataLimit { exceeded }, _) => (
            JobStatus::RunFailed,
            Some(format!(
                "the job wrote {exceeded}; it was killed and its /data removed"
            )),
        ),
        (RunEnd::TimedOut { after_secs }, _) => (
            JobStatus::TimedOut,
            Some(format!(
                "the run exceeded its {after_secs} s limit; the container was killed"
            )),
        ),
        (RunEnd::Exited { code }, _) if run.oom_killed => {
            patch.exit_code = exit(*code);
            (
                JobStatus::RunFailed,
                Some(format!(
                    "out of memory: the container was killed by the OOM killer at its {} byte memory limit",
                    run.memory_limit
                )),
            )
        }
        (RunEnd::Exited { code }, _) if *code != 0 => {
            patch.exit_code = exit(*code);
            let tail = match last_line(run.log_tail) {
                "" => String::new(),
                line => format!("; last output: {line}"),
            };
            (
                JobStatus::RunFailed,
                Some(format!("the container exited with code {code}{tail}")),
            )
        }
        (RunEnd::Exited { .. }, Ok(perf)) => {
            patch.exit_code = Some(0);
            patch.perf = Some(*perf);
            (JobStatus::Succeeded, None)
        }
        (RunEnd::Exited { .. }, Err(PerfError::Missing)) => {
            patch.exit_code = Some(0);
            (
                JobStatus::NoPerf,
                Some("the container exited 0 but wrote no /data/perf.json".to_owned()),
            )
        }
        (RunEnd::Exited { .. }, Err(e)) => {
            patch.exit_code = Some(0);
            (JobStatus::InvalidPerf, Some(e.to_string()))
        }
    };
    patch.error = error;
    (status, patch)
}

/// The last non-empty line of `text`.
fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status, exit code, perf, error.
    type Row = (JobStatus, Option<i64>, Option<f64>, Option<String>);

    fn run(end: RunEnd, oom: bool, perf: Result<f64, PerfError>, tail: &str) -> Row {
        let (status, patch) = outcome(&RunFacts {
            end: &end,
            oom_killed: oom,
            perf: &perf,
            log_tail: tail,
            memory_limit: 512,
        });
        (status, patch.exit_code, patch.perf, patch.error)
    }

    #[test]
    fn every_way_a_run_ends() {
        let exited = |code| RunEnd::Exited { code };
        let s = |x: &str| Some(x.to_owned());
        let table: Vec<(Row, Row)> = vec![
            (
                run(exited(0), false, Ok(0.5), ""),
                (JobStatus::Succeeded, Some(0), Some(0.5), None),
            ),
            (
                run(exited(0), false, Err(PerfError::Missing), ""),
                (
                    JobStatus::NoPerf,
                    Some(0),
                    None,
                    s("the container exited 0 but wrote no /data/perf.json"),
                ),
            ),
            (
                run(exited(3), false, Ok(0.5), "a\nboom\n\n"),
                (
                    JobStatus::RunFailed,
                    Some(3),
                    None,
                    s("the container exited with code 3; last output: boom"),
                ),
            ),
            (
                run(exited(1), false, Err(PerfError::Missing), ""),
                (
                    JobStatus::RunFailed,
                    Some(1),
                    None,
                    s("the container exited with code 1"),
                ),
            ),
            (
                run(exited(137), true, Err(PerfError::Missing), ""),
                (
                    JobStatus::RunFailed,
                    Some(137),
                    None,
                    s(
                        "out of memory: the container was killed by the OOM killer at its 512 byte memory limit",
                    ),
                ),
            ),
            (
                run(RunEnd::TimedOut { after_secs: 8 }, false, Ok(1.0), ""),
                (
                    JobStatus::TimedOut,
                    None,
                    None,
                    s("the run exceeded its 8 s limit; the container was killed"),
                ),
            ),
            (
                run(RunEnd::Cancelled, false, Ok(1.0), ""),
                (
                    JobStatus::Cancelled,
                    None,
                    None,
                    s("cancelled by request while running; the container was killed"),
                ),
            ),
            (
                run(
                    RunEnd::DataLimit {
                        exceeded: "300 MB to /data".into(),
                    },
                    false,
                    Ok(1.0),
                    "",
                ),
                (
                    JobStatus::RunFailed,
                    None,
                    None,
                    s("the job wrote 300 MB to /data; it was killed and its /data removed"),
                ),
            ),
        ];
        for (got, want) in table {
            assert_eq!(got, want);
        }
        let (status, _, _, error) = run(
            exited(0),
            false,
            Err(PerfError::NotANumber("\"x\"".into())),
            "",
        );
        assert_eq!(status, JobStatus::InvalidPerf);
        assert!(error.is_some());
    }
}
