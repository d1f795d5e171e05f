//! What `prm eval` refuses before the model loads: flags that contradict each other, paths
//! that do not exist, and outputs that would be written over inputs or over another file.

use std::path::{Path, PathBuf};

use anyhow::bail;
use prm::eval::ground_truth::LabelSource;
use prm::eval::labels::{check_lines_name_images, read_label_lines};
use prm::eval::outputs::{check_output_dir, check_outputs_spare_inputs, Inputs, Outputs};
use prm::eval::targets::TargetKind;
use prm::eval::text::is_safetensors;
use prm::io::InputItem;

use super::EvalArgs;

/// Checks every flag that can be checked before the images are listed and the model loads,
/// and returns `--resolution` (`None` for native).
pub(super) fn check_args(args: &EvalArgs) -> anyhow::Result<Option<usize>> {
    let resolution = match args.resolution.as_str() {
        "native" => None,
        s => match s.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => bail!("--resolution {s}: use native or a positive size N"),
        },
    };
    if !args.clean.exists() && !prm::io::webdataset::is_tar_spec(&args.clean.to_string_lossy()) {
        bail!(
            "--clean {}: no such file or directory",
            args.clean.display()
        );
    }
    if !args.adv.exists() {
        bail!(
            "--adv {}: no such directory (give the output directory of prm attack)",
            args.adv.display()
        );
    }
    if !args.adv.is_dir() {
        bail!(
            "--adv {}: a file, not a directory (give the output directory of prm attack)",
            args.adv.display()
        );
    }
    if let Some(LabelSource::Path(l)) = &args.labels {
        if !l.exists() {
            bail!("--labels {}: no such file or directory", l.display());
        }
    }
    if (args.target == TargetKind::Probe) != args.probe.is_some() {
        bail!("--probe FILE is required by --target probe, and used by it only");
    }
    check_text_class_flags(args)?;
    for (flag, dir) in [
        ("--pictures", &args.pictures),
        ("--save-predictions", &args.save_predictions),
    ] {
        if let Some(dir) = dir {
            check_output_dir(flag, dir)?;
        }
    }
    if let Some(report) = &args.report {
        if report.is_dir() {
            bail!(
                "--report {}: is a directory; give a FILE.json",
                report.display()
            );
        }
        // The summary is a second file the user did not name: it may replace an earlier
        // summary, never another file (a LICENSE.md beside a LICENSE.json report).
        let summary = report_paths(report);
        if summary.is_file() {
            let head = std::fs::read(&summary).unwrap_or_default();
            if !head.starts_with(b"# prm eval") {
                bail!(
                    "--report {} writes its summary to {}, which holds another file; give the \
                     report another name",
                    report.display(),
                    summary.display()
                );
            }
        }
    }
    Ok(resolution)
}

pub(super) fn report_paths(report: &Path) -> PathBuf {
    report.with_extension("md")
}

/// `--tokenizer` and `--single-template` say how class names are embedded: with embeddings
/// read from a `.safetensors` (made once, by `prm classes`), or with no `--classes` at all,
/// they would be ignored, and the report would claim settings that were not used.
fn check_text_class_flags(args: &EvalArgs) -> anyhow::Result<()> {
    let flags = [
        (args.single_template, "--single-template"),
        (args.tokenizer.is_some(), "--tokenizer"),
    ];
    for flag in flags.iter().filter(|f| f.0).map(|f| f.1) {
        match &args.classes {
            None => bail!(
                "{flag} applies to class names given as a text file with --classes, and there \
                 is no --classes"
            ),
            Some(c) if is_safetensors(c) => bail!(
                "{flag} applies to class names embedded here, but --classes {} holds embeddings \
                 made already; leave {flag} out, or give it to `prm classes` when making them",
                c.display()
            ),
            Some(_) => {}
        }
    }
    if let Some(t) = &args.tokenizer {
        if !t.is_file() {
            bail!("--tokenizer {}: no such file", t.display());
        }
    }
    Ok(())
}

/// Refuses, before the model loads, outputs that would be written over inputs
/// ([`check_outputs_spare_inputs`]): `--pictures` in `--adv` would replace the adversarial
/// images with their pictures, and so on.
pub(super) fn check_outputs(args: &EvalArgs, items: &[InputItem]) -> anyhow::Result<()> {
    let label_path = match &args.labels {
        Some(LabelSource::Path(p)) => Some(p.as_path()),
        _ => None,
    };
    let mut files: Vec<(&'static str, &Path)> = [
        ("--classes", args.classes.as_deref()),
        ("--probe", args.probe.as_deref()),
        ("--tokenizer", args.tokenizer.as_deref()),
        ("--labels", label_path.filter(|p| p.is_file())),
    ]
    .into_iter()
    .filter_map(|(flag, p)| Some((flag, p?)))
    .collect();
    if args.clean.is_file() {
        // A list file (or a single tar shard, protected with its members anyway).
        files.push(("--clean", &args.clean));
    }
    let summary = args.report.as_deref().map(report_paths);
    let written: Vec<(&'static str, &Path)> = [args.report.as_deref(), summary.as_deref()]
        .into_iter()
        .flatten()
        .map(|p| ("--report", p))
        .collect();
    check_outputs_spare_inputs(
        items,
        &Inputs {
            adv: Some(&args.adv),
            label_dir: label_path.filter(|p| p.is_dir()),
            files,
        },
        &Outputs {
            pictures: args.pictures.as_deref(),
            save_predictions: args.save_predictions.as_deref(),
            files: written,
        },
    )?;
    Ok(())
}

/// A classification `--labels FILE` none of whose lines names an image is refused before the
/// model loads (its classes are checked once the class names are known).
pub(super) fn check_label_file(args: &EvalArgs, items: &[InputItem]) -> anyhow::Result<()> {
    let Some(LabelSource::Path(p)) = &args.labels else {
        return Ok(());
    };
    match args.target {
        TargetKind::Features => bail!(
            "--labels {}: the features target takes no labels",
            p.display()
        ),
        t if t.is_dense() && !p.is_dir() => bail!(
            "--labels {}: --target {} needs a directory of label PNGs",
            p.display(),
            t.name()
        ),
        TargetKind::ZeroShot | TargetKind::Probe if p.is_file() => {
            check_lines_name_images(p, &read_label_lines(p)?, items)?;
        }
        _ => {}
    }
    Ok(())
}
