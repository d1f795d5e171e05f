//! `prm manifest merge`: combine the manifests of a sharded run into one and report what is
//! missing or failed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use prm::io::{list_inputs_with, read_manifest_detailed, ListOptions, ManifestRecord, Status};

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
    /// Where to write the merged manifest (written atomically: a temporary file, then rename)
    #[arg(long)]
    output: PathBuf,
    /// The inputs of the run (directory or list file, as given to `prm attack --input`): inputs
    /// with no record are reported as missing
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

fn merge(args: MergeArgs) -> anyhow::Result<ExitCode> {
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

    let mut missing = Vec::new();
    if let Some(input) = &args.input {
        // Like `prm attack`, skip the (first) manifest's output directory when it lies inside
        // the input directory, but never the input directory itself.
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        let exclude = args.manifests[0]
            .parent()
            .filter(|p| p.is_dir() && canon(p) != canon(input));
        let inputs = list_inputs_with(
            input,
            &ListOptions {
                exclude_dirs: exclude.into_iter().map(Path::to_path_buf).collect(),
                exclude: args.exclude.clone(),
            },
        )?;
        let have: std::collections::BTreeSet<&str> =
            merged.iter().map(|r| r.input.as_str()).collect();
        missing = inputs
            .items
            .iter()
            .filter(|i| !have.contains(i.rel.as_str()))
            .map(|i| i.rel.clone())
            .collect();
    }
    write_atomic(&args.output, &merged)?;

    let failed: Vec<&ManifestRecord> = merged.iter().filter(|r| r.status != Status::Ok).collect();
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
    let ok = merged.len() - failed.len();
    println!(
        "merged {} manifest(s) into {}: {} ok, {} failed, {} missing{}",
        args.manifests.len(),
        args.output.display(),
        ok,
        failed.len(),
        missing.len(),
        if args.input.is_none() {
            " (no --input: missing inputs not checked)"
        } else {
            ""
        }
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
