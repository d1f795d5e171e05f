//! `run.json`: what an attack that writes into an output directory does, so that a run with
//! other settings does not take that directory's outputs as its own.
//!
//! A re-run with the same `--output` resumes: it skips every image already done. With other
//! settings (another ε, more steps, another model) that would leave the old outputs in place and
//! report them as done, so `prm attack` refuses before any work and says what differs. A
//! directory whose manifest holds no record yet (a run that stopped before its first image) is
//! taken over, its record replaced. Shards of one campaign share the directory and write the
//! same record.
//!
//! The record holds the attack's meaning only: the model (where it was loaded from, and the
//! fingerprint of its weights, [`crate::model::Model::fingerprint`]), the precision of the
//! products, and the settings its optimiser reads (`lr` and weight decay for AdamW, the step size and momentum
//! for the sign methods). Where and how fast it runs (device, batch size, shard, `--profile`) and
//! what is saved besides the PNGs (`--save-float`) may change between runs.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::output::write_atomic;
use super::IoError;

/// The record's file name inside the output directory.
pub const RUN_RECORD_FILE: &str = "run.json";

/// What [`check_or_write`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunRecordState {
    /// There was no record: this run's was written.
    Written,
    /// The directory's record is this run's.
    Same,
}

/// The directory holds another run's record.
#[derive(Debug, thiserror::Error)]
#[error(
    "{dir} holds the outputs of an attack with other settings ({file}): {differences}. \
     Resuming would keep its outputs as this run's: give another --output (to go on from these \
     images with more steps: --init from:{dir}), or delete {file} to take the outputs as they \
     are",
    dir = dir.display(),
    file = dir.join(RUN_RECORD_FILE).display(),
    differences = differences.join("; ")
)]
pub struct OtherRun {
    pub dir: PathBuf,
    /// `key: there X, here Y`, one per differing field.
    pub differences: Vec<String>,
}

/// Compares `record` with `<dir>/run.json`, or writes it there (atomically) when there is none,
/// or when the directory's manifest holds no record yet (a run that stopped before its first
/// image left nothing a resume would keep). A record that cannot be parsed is an error like a
/// different one, naming the file.
pub fn check_or_write(dir: &Path, record: &Value) -> Result<RunRecordState, RunRecordError> {
    let path = dir.join(RUN_RECORD_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let stored = serde_json::from_str::<Value>(&text);
            let compared = stored.as_ref().map(|v| differences(v, record));
            if compared.as_ref().is_ok_and(Vec::is_empty) {
                // A record written before fingerprints gains this run's.
                let older = stored.is_ok_and(|v| v.get(WEIGHTS).is_none());
                if older && record.get(WEIGHTS).is_some() {
                    write(&path, record)?;
                }
                return Ok(RunRecordState::Same);
            }
            let stored = compared;
            if !has_records(dir)? {
                write(&path, record)?;
                return Ok(RunRecordState::Written);
            }
            match stored {
                Ok(differences) => Err(RunRecordError::OtherRun(OtherRun {
                    dir: dir.to_path_buf(),
                    differences,
                })),
                Err(e) => Err(RunRecordError::Unreadable {
                    path,
                    message: e.to_string(),
                }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write(&path, record)?;
            Ok(RunRecordState::Written)
        }
        Err(source) => Err(IoError::Read { path, source }.into()),
    }
}

/// `<dir>/run.json` as JSON, when there is one and it parses (for reports and notes; a resume
/// checks it with [`check_or_write`]).
pub fn read(dir: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(dir.join(RUN_RECORD_FILE)).ok()?).ok()
}

fn write(path: &Path, record: &Value) -> Result<(), IoError> {
    let text = serde_json::to_string_pretty(record).expect("JSON values serialise") + "\n";
    write_atomic(path, |file| {
        std::io::Write::write_all(file, text.as_bytes()).map_err(|source| IoError::Write {
            path: path.to_path_buf(),
            source,
        })
    })
}

/// Whether `<dir>/manifest.jsonl` holds a whole line (a record a resume would act on).
fn has_records(dir: &Path) -> Result<bool, IoError> {
    use std::io::Read;
    let path = dir.join(super::manifest::MANIFEST_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(IoError::Read { path, source }),
    };
    // A record is a few hundred bytes: the first line ends well within this.
    let mut head = Vec::with_capacity(1 << 16);
    file.take(1 << 16)
        .read_to_end(&mut head)
        .map_err(|source| IoError::Read { path, source })?;
    Ok(head.contains(&b'\n'))
}

/// Why [`check_or_write`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RunRecordError {
    #[error(transparent)]
    OtherRun(#[from] OtherRun),
    #[error("{}: not a run record ({message}); delete it, or give another --output", path.display())]
    Unreadable { path: PathBuf, message: String },
    #[error(transparent)]
    Io(#[from] IoError),
}

/// The key of the weights' fingerprint.
const WEIGHTS: &str = "weights";

/// The fields compared: every key of either record but `prm_version` (a newer prm resumes an
/// older one's directory), nested objects key by key. Where both records have the weights'
/// fingerprint and it agrees, `model` (the path it was loaded from) is not compared: the same
/// checkpoint moved resumes. A record without a fingerprint (written before them) is compared
/// by `model` alone.
fn differences(there: &Value, here: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (there.get(WEIGHTS), here.get(WEIGHTS));
    let ignored: &[&str] = match (a, b) {
        (Some(a), Some(b)) if a == b => &["prm_version", "model"],
        (Some(_), Some(_)) => &["prm_version"],
        _ => &["prm_version", WEIGHTS],
    };
    compare("", there, here, ignored, &mut out);
    out
}

fn compare(prefix: &str, there: &Value, here: &Value, ignored: &[&str], out: &mut Vec<String>) {
    let (a, b) = match (there, here) {
        (Value::Object(a), Value::Object(b)) => (a, b),
        _ => {
            if there != here {
                out.push(format!("{prefix}: there {there}, here {here}"));
            }
            return;
        }
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        if prefix.is_empty() && ignored.contains(&key.as_str()) {
            continue;
        }
        let name = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let missing = Value::String("(not set)".into());
        let (x, y) = (
            a.get(key).unwrap_or(&missing),
            b.get(key).unwrap_or(&missing),
        );
        if x.is_object() && y.is_object() {
            compare(&name, x, y, ignored, out);
        } else if x != y {
            out.push(format!("{name}: there {x}, here {y}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(eps: f64, steps: u64) -> Value {
        json!({
            "prm_version": "0.1.0",
            "model": "random:tiny",
            "precision": "fp32",
            "settings": {"eps": eps, "steps": steps, "optimizer": "pgd"},
        })
    }

    #[test]
    fn the_first_run_writes_its_record_and_the_same_run_finds_it() {
        let t = tempfile::tempdir().unwrap();
        let r = record(8.0 / 255.0, 10);
        assert_eq!(
            check_or_write(t.path(), &r).unwrap(),
            RunRecordState::Written
        );
        assert_eq!(check_or_write(t.path(), &r).unwrap(), RunRecordState::Same);
        // Another prm version reads the same record.
        let mut newer = r.clone();
        newer["prm_version"] = json!("9.9.9");
        assert_eq!(
            check_or_write(t.path(), &newer).unwrap(),
            RunRecordState::Same
        );
    }

    #[test]
    fn other_settings_are_refused_with_what_differs() {
        let t = tempfile::tempdir().unwrap();
        check_or_write(t.path(), &record(8.0 / 255.0, 10)).unwrap();
        std::fs::write(t.path().join("manifest.jsonl"), "{\"input\": \"a.png\"}\n").unwrap();
        let before = std::fs::read(t.path().join(RUN_RECORD_FILE)).unwrap();
        let mut other = record(4.0 / 255.0, 20);
        other["settings"]["lr"] = json!(0.001);
        let e = check_or_write(t.path(), &other).unwrap_err();
        let RunRecordError::OtherRun(o) = &e else {
            panic!("{e}")
        };
        assert_eq!(o.differences.len(), 3, "{:?}", o.differences);
        assert!(o.differences[0].starts_with("settings.eps: there 0.031"));
        assert_eq!(
            o.differences[1],
            "settings.lr: there \"(not set)\", here 0.001"
        );
        assert_eq!(o.differences[2], "settings.steps: there 10, here 20");
        assert!(e.to_string().contains("give another --output"), "{e}");
        // The directory's record is left as it was.
        assert_eq!(
            std::fs::read(t.path().join(RUN_RECORD_FILE)).unwrap(),
            before
        );
    }

    #[test]
    fn a_record_that_is_not_json_is_refused_once_there_are_outputs() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(RUN_RECORD_FILE), "{ half").unwrap();
        std::fs::write(t.path().join("manifest.jsonl"), "{\"input\": \"a.png\"}\n").unwrap();
        let e = check_or_write(t.path(), &record(0.1, 1)).unwrap_err();
        assert!(matches!(e, RunRecordError::Unreadable { .. }), "{e}");
        // Without a record in the manifest there is nothing to keep: the run takes it over.
        std::fs::write(t.path().join("manifest.jsonl"), "{\"input\": \"a.p").unwrap();
        let r = record(0.1, 1);
        assert_eq!(
            check_or_write(t.path(), &r).unwrap(),
            RunRecordState::Written
        );
        assert_eq!(check_or_write(t.path(), &r).unwrap(), RunRecordState::Same);
    }

    #[test]
    fn a_directory_without_records_takes_the_new_settings() {
        let t = tempfile::tempdir().unwrap();
        check_or_write(t.path(), &record(8.0 / 255.0, 10)).unwrap();
        // The first run stopped before any image: another attack may take the directory.
        let other = record(4.0 / 255.0, 10);
        assert_eq!(
            check_or_write(t.path(), &other).unwrap(),
            RunRecordState::Written
        );
        assert_eq!(
            check_or_write(t.path(), &other).unwrap(),
            RunRecordState::Same
        );
        std::fs::write(t.path().join("manifest.jsonl"), "").unwrap();
        let third = record(2.0 / 255.0, 10);
        assert_eq!(
            check_or_write(t.path(), &third).unwrap(),
            RunRecordState::Written
        );
    }

    #[test]
    fn weights_decide_where_both_records_have_them() {
        let t = tempfile::tempdir().unwrap();
        let with = |model: &str, weights: &str| {
            let mut r = record(8.0 / 255.0, 10);
            r["model"] = json!(model);
            r["weights"] = json!(weights);
            r
        };
        let first = with("/data/ckpt", "xxh3-128:aa");
        check_or_write(t.path(), &first).unwrap();
        std::fs::write(t.path().join("manifest.jsonl"), "{}\n").unwrap();
        // The same checkpoint moved resumes.
        let moved = with("/elsewhere/ckpt", "xxh3-128:aa");
        assert_eq!(
            check_or_write(t.path(), &moved).unwrap(),
            RunRecordState::Same
        );
        // Other weights at the same path do not.
        let retrained = with("/data/ckpt", "xxh3-128:bb");
        match check_or_write(t.path(), &retrained) {
            Err(RunRecordError::OtherRun(o)) => {
                assert_eq!(
                    o.differences,
                    ["weights: there \"xxh3-128:aa\", here \"xxh3-128:bb\""]
                );
            }
            other => panic!("expected OtherRun, got {other:?}"),
        }
    }

    #[test]
    fn a_record_from_before_fingerprints_is_compared_by_path_and_gains_one() {
        let t = tempfile::tempdir().unwrap();
        let old = record(8.0 / 255.0, 10);
        check_or_write(t.path(), &old).unwrap();
        std::fs::write(t.path().join("manifest.jsonl"), "{}\n").unwrap();
        let mut elsewhere = old.clone();
        elsewhere["model"] = json!("random:tiny@3");
        elsewhere["weights"] = json!("xxh3-128:cc");
        assert!(matches!(
            check_or_write(t.path(), &elsewhere),
            Err(RunRecordError::OtherRun(_))
        ));
        let mut now = old.clone();
        now["weights"] = json!("xxh3-128:cc");
        assert_eq!(
            check_or_write(t.path(), &now).unwrap(),
            RunRecordState::Same
        );
        assert_eq!(read(t.path()).unwrap(), now);
        // From then on the fingerprint is compared.
        let mut other = now.clone();
        other["weights"] = json!("xxh3-128:dd");
        assert!(matches!(
            check_or_write(t.path(), &other),
            Err(RunRecordError::OtherRun(_))
        ));
    }
}
