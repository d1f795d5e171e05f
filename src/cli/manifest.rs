//! `prm manifest merge`: combine the manifests of a sharded run into one and report what is
//! missing or failed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use prm::io::paths::{check_file_writable, resolved};
use prm::io::{
    list_inputs_with, read_manifest_detailed, InputItem, ListOptions, ManifestRecord, Status,
};

use super::EXIT_SOME_FAILED;

#[derive(Args)]
pub struct ManifestArgs {
    #[command(subcommand)]
    command: ManifestCommand,
}

#[derive(Subcommand)]
enum ManifestCommand {
    /// Combine per-shard manifests into one: the latest record of each input wins, but an ok
    /// record is never replaced by a later error. Exits 0 when every input is ok, 1 when any
    /// failed or (with --input) has no record
    Merge(MergeArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// Where to write the merged manifest, a FILE.jsonl that is not one of the inputs (may be
    /// one of the manifests merged; written atomically: a temporary file, then rename)
    #[arg(long, value_name = "FILE.jsonl")]
    output: PathBuf,
    /// The inputs of the run (directory or list file, as given to `prm attack --input`): inputs
    /// with no record are reported as missing, and only these inputs' records are counted
    /// (records of other inputs are kept in the merged manifest)
    #[arg(long)]
    input: Option<PathBuf>,
    /// Inputs left out of the run, as given to `prm attack --exclude` (repeatable): not missing
    #[arg(long, value_name = "GLOB", requires = "input")]
    exclude: Vec<String>,
    /// The manifests to merge, in order (later records win)
    #[arg(required = true)]
    manifests: Vec<PathBuf>,
}

pub fn run(args: ManifestArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ManifestCommand::Merge(a) => merge(a),
    }
}

/// Latest record per input, except that an ok record is never replaced by an error.
fn merge_records(records: impl IntoIterator<Item = ManifestRecord>) -> Vec<ManifestRecord> {
    let mut merged: BTreeMap<String, ManifestRecord> = BTreeMap::new();
    for r in records {
        let keep_old = merged
            .get(&r.input)
            .is_some_and(|old| old.status == Status::Ok && r.status != Status::Ok);
        if !keep_old {
            merged.insert(r.input.clone(), r);
        }
    }
    merged.into_values().collect()
}

/// Writes the records as JSON lines to `path` through a temporary file in the same directory.
fn write_atomic(path: &Path, records: &[ManifestRecord]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let mut buf = Vec::new();
    for r in records {
        serde_json::to_writer(&mut buf, r)?;
        buf.push(b'\n');
    }
    tmp.write_all(&buf)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Refuses an `--output` that would replace one of the run's inputs: the `--input` list file
/// itself, or a listed input file. Only inputs with `--output`'s file name are resolved, so a
/// list of a million images costs no million `canonicalize` calls.
fn check_not_an_input(output: &Path, input: &Path, items: &[InputItem]) -> anyhow::Result<()> {
    let out = resolved(output);
    let name = output.file_name();
    let clash = std::iter::once(input)
        .chain(items.iter().map(|i| i.path.as_path()))
        .filter(|p| p.file_name() == name)
        .find(|p| resolved(p) == out);
    if let Some(p) = clash {
        anyhow::bail!(
            "--output {} is one of the inputs (--input {} lists {}): writing the merged \
             manifest there would replace it; give another --output FILE.jsonl",
            output.display(),
            input.display(),
            p.display()
        );
    }
    Ok(())
}

fn merge(args: MergeArgs) -> anyhow::Result<ExitCode> {
    // Usage checks before any work. The extension keeps the merged manifest off images and
    // `run.json`; merging in place (--output is one of the manifests merged) stays allowed, as
    // the README says, since the file is then rewritten with a superset of its records.
    super::require_extension(
        &args.output,
        "--output",
        "the merged manifest is JSON lines",
        "jsonl",
    )?;
    check_file_writable(&args.output).map_err(|e| anyhow::anyhow!("--output {e}"))?;
    let inputs = match &args.input {
        Some(input) => {
            // Like `prm attack`, skip the (first) manifest's output directory when it lies
            // inside the input directory, but never the input directory itself.
            let canon = |p: &Path| std::fs::canonicalize(p).ok();
            let exclude = args.manifests[0]
                .parent()
                .filter(|p| p.is_dir() && canon(p) != canon(input));
            let list = list_inputs_with(
                input,
                &ListOptions {
                    exclude_dirs: exclude.into_iter().map(Path::to_path_buf).collect(),
                    exclude: args.exclude.clone(),
                },
            )?;
            check_not_an_input(&args.output, input, &list.items)?;
            Some(list)
        }
        None => None,
    };

    let mut all = Vec::new();
    for m in &args.manifests {
        let contents = read_manifest_detailed(m)?;
        if let Some(line) = contents.ignored_partial_line {
            eprintln!(
                "note: {}: ignored a partial last line ({line}), left by an interrupted run",
                m.display()
            );
        }
        all.extend(contents.records);
    }
    let merged = merge_records(all);

    // With --input the counts and the exit code follow the listed inputs only: a record of an
    // excluded input, or of a file that is not an input at all (another data set's manifest),
    // says nothing about this run. Such records are still written to the merged manifest: merge
    // never drops data, and merging in place with a mistyped --input or --exclude would
    // otherwise delete records from the shared manifest. They are counted separately.
    let listed: Option<BTreeSet<&str>> = inputs
        .as_ref()
        .map(|l| l.items.iter().map(|i| i.rel.as_str()).collect());
    let counted = |r: &ManifestRecord| listed.as_ref().is_none_or(|l| l.contains(r.input.as_str()));
    let unlisted: Vec<&ManifestRecord> = merged.iter().filter(|r| !counted(r)).collect();
    let missing: Vec<&str> = match &inputs {
        Some(list) => {
            let have: BTreeSet<&str> = merged.iter().map(|r| r.input.as_str()).collect();
            list.items
                .iter()
                .map(|i| i.rel.as_str())
                .filter(|rel| !have.contains(rel))
                .collect()
        }
        None => Vec::new(),
    };
    write_atomic(&args.output, &merged)?;

    let failed: Vec<&ManifestRecord> = merged
        .iter()
        .filter(|r| counted(r) && r.status != Status::Ok)
        .collect();
    for r in &failed {
        println!(
            "FAILED {}: {}",
            r.input,
            r.error.as_deref().unwrap_or("(no message)")
        );
    }
    for rel in &missing {
        println!("MISSING {rel}");
    }
    let ok = merged.len() - unlisted.len() - failed.len();
    let tail = match (&args.input, unlisted.first()) {
        (None, _) => " (no --input: missing inputs not checked)".to_string(),
        (Some(_), None) => String::new(),
        (Some(input), Some(first)) => format!(
            "; {} record(s) name no input of --input {} (excluded, or not there; e.g. {}): \
             kept in the merged manifest, not counted",
            unlisted.len(),
            input.display(),
            first.input
        ),
    };
    println!(
        "merged {} manifest(s) into {}: {} ok, {} failed, {} missing{tail}",
        args.manifests.len(),
        args.output.display(),
        ok,
        failed.len(),
        missing.len(),
    );
    Ok(if failed.is_empty() && missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_SOME_FAILED)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(input: &str, status: Status, steps: usize) -> ManifestRecord {
        ManifestRecord {
            input: input.to_string(),
            output: (status == Status::Ok).then(|| format!("{input}.png")),
            status,
            error: (status == Status::Error).then(|| "boom".to_string()),
            width: 4,
            height: 4,
            loss_initial: None,
            loss_final: None,
            layer_cosine: None,
            linf: None,
            steps,
            seconds: 0.0,
            input_bytes: None,
        }
    }

    #[test]
    fn latest_wins_but_ok_beats_error() {
        let merged = merge_records(vec![
            rec("b", Status::Ok, 1),
            rec("a", Status::Error, 1),
            rec("a", Status::Ok, 2),
            rec("b", Status::Error, 3),
            rec("c", Status::Ok, 1),
            rec("c", Status::Ok, 5),
            rec("d", Status::Error, 1),
            rec("d", Status::Error, 2),
        ]);
        let got: Vec<(&str, Status, usize)> = merged
            .iter()
            .map(|r| (r.input.as_str(), r.status, r.steps))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", Status::Ok, 2),
                ("b", Status::Ok, 1),
                ("c", Status::Ok, 5),
                ("d", Status::Error, 2)
            ]
        );
    }
}
