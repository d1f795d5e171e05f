//! `prm verify`: every clean input has an adversarial output of the same size within ε.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

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
    let report = prm::io::verify_with(
        &args.clean,
        &args.adv,
        args.eps,
        &prm::io::VerifyOptions {
            exclude: args.exclude.clone(),
            max_pixels: args.max_pixels,
        },
    )?;
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    for v in &report.violations {
        println!("VIOLATION {v}");
    }
    println!(
        "checked {} image(s); max L∞ {:.3}/255 (ε = {:.3}/255); {} violation(s){}",
        report.checked,
        report.max_linf_255,
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
