//! `manifest.jsonl`: one JSON line per processed image, appended as the run goes.
//!
//! The manifest is how a campaign is audited and resumed, so it is written line by line and
//! flushed after each record: a crash loses at most the record being written. The reader accepts
//! such a truncated last line (and says so); on reopening for append, the writer cuts it off so
//! that new records start on a fresh line.
//!
//! Several processes (the shards of a campaign) may append to one manifest. Each line goes out in
//! one write under an exclusive lock of the file (`flock`), and the writer that opens the file
//! takes the same lock before it looks for a cut-off line: a line another shard is writing at
//! that moment is never mistaken for a crash's leftovers. Where the file system has no locks,
//! the writer goes on without them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
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
    /// The input's size in bytes when it was attacked (the file, or the tar member): a resume
    /// attacks again an input whose size changed since (another image under the same name).
    /// Absent in manifests written before it was recorded, and in error records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_bytes: Option<u64>,
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
        let locked = lock(&file).map_err(werr)?;
        let cut = end_of_last_line(&mut file).and_then(|keep| match keep {
            Some(keep) => file.set_len(keep),
            None => Ok(()),
        });
        if locked {
            let _ = file.unlock();
        }
        cut.map_err(werr)?;
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
        // One write call per line keeps concurrent readers from seeing interleaved fragments; the
        // lock keeps a shard that opens the file meanwhile from cutting the line short.
        let werr = |source| IoError::Write {
            path: self.path.clone(),
            source,
        };
        let locked = lock(&self.file).map_err(werr)?;
        let written = self.file.write_all(&line).and_then(|_| self.file.flush());
        if locked {
            let _ = self.file.unlock();
        }
        written.map_err(werr)
    }

    /// Forces the manifest to stable storage (fsync).
    pub fn sync(&mut self) -> Result<(), IoError> {
        self.file.sync_all().map_err(|source| IoError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Takes the file's exclusive lock, waiting for another writer's line: `false` (and no lock)
/// where the file system does not support locks.
fn lock(file: &File) -> std::io::Result<bool> {
    // Linux's ENOLCK (an NFS mount without its lock service), ENOSYS and EOPNOTSUPP.
    const NO_LOCKS: [i32; 3] = [37, 38, 95];
    match file.lock() {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(false),
        Err(e) if e.raw_os_error().is_some_and(|c| NO_LOCKS.contains(&c)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where the file's last whole line ends, when something follows it (a line cut short):
/// `Some(length to keep)`; `None` when the file is empty or ends with a newline. Reads backwards
/// from the end, so a long manifest costs a seek.
fn end_of_last_line(file: &mut File) -> std::io::Result<Option<u64>> {
    let len = file.seek(SeekFrom::End(0))?;
    let mut end = len;
    let mut chunk = vec![0u8; 1 << 16];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..n])?;
        if end == len && chunk[n - 1] == b'\n' {
            return Ok(None);
        }
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64 + 1));
        }
        end = start;
    }
    Ok((len > 0).then_some(0))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of the last whole line, against a plain scan, for files around the 64 KiB chunk.
    #[test]
    fn end_of_last_line_reads_backwards_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let want = |bytes: &[u8]| -> Option<u64> {
            if bytes.is_empty() || bytes.last() == Some(&b'\n') {
                None
            } else {
                Some(bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) as u64)
            }
        };
        let chunk = 1usize << 16;
        for len in [0, 1, 2, 100, chunk - 1, chunk, chunk + 1, 3 * chunk + 7] {
            for newline_at in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                let mut bytes = vec![b'x'; len];
                if let Some(i) = newline_at.filter(|&i| i < len) {
                    bytes[i] = b'\n';
                }
                std::fs::write(&path, &bytes).unwrap();
                let mut f = File::open(&path).unwrap();
                assert_eq!(
                    end_of_last_line(&mut f).unwrap(),
                    want(&bytes),
                    "{len} bytes, newline at {newline_at:?}"
                );
            }
        }
    }
}
