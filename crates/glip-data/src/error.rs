//! Data errors: every one names the file and the record it is about.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A JSON file (or one JSON line) does not parse.
    #[error("{path}{}: malformed json: {msg}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Json { path: PathBuf, line: Option<usize>, msg: String },
    /// An image is missing or cannot be decoded.
    #[error("{path}: image {what}")]
    Image { path: PathBuf, what: String },
    /// A record is invalid.
    #[error("{file}: {record}: {problem}")]
    Record { file: PathBuf, record: String, problem: String },
    /// Several problems, listed in full (validation collects them all).
    #[error("{} problem(s) in {file}:\n  {}", problems.len(), problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Many { file: PathBuf, problems: Vec<Problem> },
    /// A tensor error while batching.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One problem found in a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// The record: `annotation id 17`, `image id 3 (000001.jpg)`, `line 12`, ...
    pub record: String,
    /// What is wrong with it.
    pub problem: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.record, self.problem)
    }
}

impl From<Problem> for DataError {
    fn from(p: Problem) -> Self {
        DataError::Record { file: p.file, record: p.record, problem: p.problem }
    }
}

/// What a dataset does with an invalid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorPolicy {
    /// Stop with an error naming the record (default).
    #[default]
    Fail,
    /// Leave the record out, count it, and report a summary.
    Skip,
}

/// What a dataset left out under [`ErrorPolicy::Skip`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SkipReport {
    /// Every problem, in file order.
    pub problems: Vec<Problem>,
}

impl SkipReport {
    /// A one-line summary (`3 records skipped: 2 box with zero size, 1 unknown category`).
    pub fn summary(&self) -> String {
        if self.problems.is_empty() {
            return "no record skipped".into();
        }
        let mut kinds: Vec<(String, usize)> = Vec::new();
        for p in &self.problems {
            let k = p.problem.split(':').next().unwrap_or("").to_string();
            match kinds.iter_mut().find(|x| x.0 == k) {
                Some(x) => x.1 += 1,
                None => kinds.push((k, 1)),
            }
        }
        let parts: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!("{} record(s) skipped: {}", self.problems.len(), parts.join(", "))
    }
}

/// Collects problems according to a policy: under `Fail` the first problem is returned as an
/// error at [`Collector::finish`]; under `Skip` all are kept for the report.
#[derive(Debug, Clone, Default)]
pub struct Collector {
    /// Problems found so far.
    pub problems: Vec<Problem>,
}

impl Collector {
    /// Records a problem.
    pub fn push(
        &mut self,
        file: &std::path::Path,
        record: impl Into<String>,
        problem: impl Into<String>,
    ) {
        self.problems.push(Problem {
            file: file.to_path_buf(),
            record: record.into(),
            problem: problem.into(),
        });
    }

    /// Applies `policy`: an error listing every problem under `Fail`, the report under `Skip`.
    pub fn finish(
        self,
        file: &std::path::Path,
        policy: ErrorPolicy,
    ) -> Result<SkipReport, DataError> {
        match (policy, self.problems.len()) {
            (_, 0) => Ok(SkipReport::default()),
            (ErrorPolicy::Fail, 1) => Err(self.problems.into_iter().next().expect("one").into()),
            (ErrorPolicy::Fail, _) => {
                Err(DataError::Many { file: file.to_path_buf(), problems: self.problems })
            }
            (ErrorPolicy::Skip, _) => Ok(SkipReport { problems: self.problems }),
        }
    }
}
