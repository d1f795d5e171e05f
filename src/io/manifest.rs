//! `manifest.jsonl`: one JSON line per processed image, appended as the run goes.
//!
//! The manifest is how a campaign is audited and resumed, so it is written line by line and
//! flushed after each record: a crash loses at most the record being written. The reader accepts
//! such a truncated last line (and says so); on reopening for append, the writer cuts it off so
//! that new records start on a fresh line.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::IoError;

/// File name of the manifest inside the output directory.
pub const MANIFEST_FILE: &str = "manifest.jsonl";

/// Outcome of one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
}

/// One manifest line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// The input's relative path ([`InputItem::rel`](super::InputItem::rel)).
    pub input: String,
    /// The output's path relative to the output directory; `None` when nothing was written.
    pub output: Option<String>,
    pub status: Status,
    /// What went wrong, for `status: "error"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub width: usize,
    pub height: usize,
    pub loss_initial: Option<f64>,
    pub loss_final: Option<f64>,
    /// Final mean cosine per selected layer. (JSON has no NaN: serde_json writes it as `null`,
    /// which reads back as NaN.)
    #[serde(default, deserialize_with = "nullable_f64_vec")]
    pub layer_cosine: Option<Vec<f64>>,
    /// L∞ distance of the *saved* image from the clean one, in 1/255 units.
    pub linf: Option<f64>,
    pub steps: usize,
    #[serde(deserialize_with = "nullable_f64")]
    pub seconds: f64,
}

fn nullable_f64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn nullable_f64_vec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
    let v = Option::<Vec<Option<f64>>>::deserialize(d)?;
    Ok(v.map(|v| v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect()))
}

/// Appends records to `<output>/manifest.jsonl`, one line each, flushed after every line.
pub struct ManifestWriter {
    path: PathBuf,
    file: File,
}

impl ManifestWriter {
    /// Opens (creating the directory and file if needed) `<output_dir>/manifest.jsonl` for
    /// appending. A partial last line left by a crash is cut off first, so open the writer
    /// before starting work, not while another process is mid-line.
    pub fn open(output_dir: &Path) -> Result<Self, IoError> {
        std::fs::create_dir_all(output_dir).map_err(|source| IoError::Write {
            path: output_dir.to_path_buf(),
            source,
        })?;
        let path = output_dir.join(MANIFEST_FILE);
        let werr = |source| IoError::Write {
            path: path.clone(),
            source,
        };
        // O_APPEND: every line lands at the current end even when several processes (shards)
        // share one output directory, since each line goes out in a single write.
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(werr)?;
        let mut content = Vec::new();
        file.read_to_end(&mut content).map_err(werr)?;
        if !content.is_empty() && content.last() != Some(&b'\n') {
            let keep = content
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            file.set_len(keep as u64).map_err(werr)?;
        }
        Ok(ManifestWriter { path, file })
    }

    /// Path of the manifest file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a single line and flushes it.
    pub fn append(&mut self, record: &ManifestRecord) -> Result<(), IoError> {
        let mut line = serde_json::to_vec(record).map_err(|e| IoError::Encode {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        // One write call per line keeps concurrent readers from seeing interleaved fragments.
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .map_err(|source| IoError::Write {
                path: self.path.clone(),
                source,
            })
    }

    /// Forces the manifest to stable storage (fsync).
    pub fn sync(&mut self) -> Result<(), IoError> {
        self.file.sync_all().map_err(|source| IoError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// A manifest as read back, with what was tolerated.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestContents {
    pub records: Vec<ManifestRecord>,
    /// 1-based line number of an unterminated, unparsable last line that was ignored (a record
    /// cut short by a crash), if any.
    pub ignored_partial_line: Option<usize>,
}

/// Reads every record; see [`read_manifest_detailed`] for what is tolerated.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestRecord>, IoError> {
    read_manifest_detailed(path).map(|c| c.records)
}

/// Reads every record. Blank lines are skipped. A last line with no terminating newline that does
/// not parse is ignored and reported in [`ManifestContents::ignored_partial_line`]; any other bad
/// line is an [`IoError::Manifest`].
pub fn read_manifest_detailed(path: &Path) -> Result<ManifestContents, IoError> {
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            IoError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            IoError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let mut records = Vec::new();
    let mut ignored_partial_line = None;
    let terminated = bytes.last() == Some(&b'\n');
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // `split` yields a final empty piece after a trailing newline.
    let n = if terminated {
        lines.len() - 1
    } else {
        lines.len()
    };
    for (i, line) in lines[..n].iter().enumerate() {
        let is_last_unterminated = !terminated && i + 1 == n;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<ManifestRecord>(line) {
            Ok(r) => records.push(r),
            Err(_) if is_last_unterminated => ignored_partial_line = Some(i + 1),
            Err(e) => {
                return Err(IoError::Manifest {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(ManifestContents {
        records,
        ignored_partial_line,
    })
}
