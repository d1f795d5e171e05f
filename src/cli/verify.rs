//! `prm verify`: every clean input has an adversarial output of the same size within ε.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::Args;
use prm::io::IoError;

use super::{pixel_value, EXIT_SOME_FAILED};

#[derive(Args)]
pub struct VerifyArgs {
    /// The clean images (directory, list file or tar shards), as given to `prm attack --input`
    #[arg(long)]
    clean: PathBuf,
    /// Inputs left out of the run, as given to `prm attack --exclude` (repeatable)
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Pixel budget for decoding, as given to `prm attack --max-pixels`
    #[arg(long, default_value_t = prm::io::DEFAULT_MAX_PIXELS, value_parser = clap::value_parser!(u64).range(1..))]
    max_pixels: u64,
    /// The attack's output directory
    #[arg(long)]
    adv: PathBuf,
    /// The L∞ budget, e.g. 8/255
    #[arg(long, value_parser = pixel_value)]
    eps: f32,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    // The attack's own check: `--eps 8` (a forgotten /255) or `--eps 0` would otherwise turn
    // the checker into one that passes everything, or fails everything.
    if !(args.eps > 0.0 && args.eps <= 1.0) {
        bail!(
            "--eps {} is outside (0, 1]; pixel values are in [0, 1], e.g. --eps 8/255",
            args.eps
        );
    }
    let report = prm::io::verify_with(
        &args.clean,
        &args.adv,
        args.eps,
        &prm::io::VerifyOptions {
            exclude: args.exclude.clone(),
            max_pixels: args.max_pixels,
        },
    )
    .map_err(|e| name_the_flags(e, &args))?;
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    for v in &report.violations {
        println!("VIOLATION {v}");
    }
    // A maximum over no measurement would read as "all outputs equal their clean images".
    let linf = match report.measured {
        0 => "L∞ not measured, no output could be compared".to_string(),
        n if n == report.checked => format!("max L∞ {:.3}/255", report.max_linf_255),
        n => format!(
            "max L∞ {:.3}/255 over the {n} measured",
            report.max_linf_255
        ),
    };
    println!(
        "checked {} image(s); {linf} (ε = {:.3}/255); {} violation(s){}",
        report.checked,
        args.eps * 255.0,
        report.violations.len(),
        if report.manifest_checked {
            "; manifest cross-checked"
        } else {
            ""
        }
    );
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_SOME_FAILED)
    })
}

/// The library's input errors are worded for any caller ("the output directory", "a single
/// image is not accepted as input"); here the flags are known, so the message names them.
fn name_the_flags(e: IoError, args: &VerifyArgs) -> anyhow::Error {
    match e {
        IoError::OutputIsInput { .. } => anyhow!(
            "--clean and --adv are the same directory ({}): every image would be compared with \
             itself; give --adv the --output directory of the attack",
            args.adv.display()
        ),
        IoError::OutputOverwritesInput { pairs, .. } => {
            let shown: Vec<String> = pairs
                .iter()
                .take(5)
                .map(|(out, input)| format!("`{out}` is the clean `{input}`"))
                .collect();
            anyhow!(
                "--adv {} holds the clean images themselves ({} of them: {}{}), so they would \
                 be compared with themselves; give --adv the --output directory of the attack",
                args.adv.display(),
                pairs.len(),
                shown.join(", "),
                if pairs.len() > 5 { ", ..." } else { "" }
            )
        }
        e @ (IoError::SingleImage { .. } | IoError::NotAListFile { .. }) => {
            anyhow::Error::new(e).context("--clean")
        }
        e => e.into(),
    }
}
