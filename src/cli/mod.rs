//! Command-line interface: argument definitions and dispatch to the subcommands.
//!
//! Exit codes (the contract scripts rely on): 0 every image succeeded; 1 the run finished but
//! some images failed (each is recorded in the manifest), or `verify` found violations;
//! 2 usage, model or configuration errors; 130 / 143 `attack` interrupted by SIGINT / SIGTERM
//! (finished images are saved and recorded; a re-run resumes).

mod attack;
mod bench;
mod classes;
mod device;
mod eval;
mod info;
mod manifest;
mod progress;
mod settings_args;
mod timeline;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Refuses an output file whose name does not end in `.ext` (any case), before any work:
/// "`flag` PATH: `what`; give a FILE.ext".
fn require_extension(
    path: &std::path::Path,
    flag: &str,
    what: &str,
    ext: &str,
) -> anyhow::Result<()> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
    {
        return Ok(());
    }
    anyhow::bail!("{flag} {}: {what}; give a FILE.{ext}", path.display())
}

/// Exit code for usage, model and configuration errors.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a run that finished with some per-image failures.
pub const EXIT_SOME_FAILED: u8 = 1;
/// Exit code for a run stopped by SIGINT (128 + 2).
pub const EXIT_SIGINT: u8 = 130;
/// Exit code for a run stopped by SIGTERM (128 + 15).
pub const EXIT_SIGTERM: u8 = 143;

#[derive(Parser)]
#[command(
    name = "prm",
    version,
    about = "Patch Representation Misalignment (PRM) transfer attacks on CLIP vision encoders",
    long_about = "Generates transfer adversarial examples against CLIP ViT image encoders with the PRM \
attack (Hu et al., arXiv 2403.12693) and checks them.\n\nPixel quantities accept fractions: --eps 8/255."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attack every image of a directory or list file and write the adversarial images.
    Attack(Box<attack::AttackArgs>),
    /// Time whole attacks on synthetic images: image-steps/s, TFLOP/s against a GEMM ceiling
    Bench(Box<bench::BenchArgs>),
    /// Embed class names once with a checkpoint's text tower, into a `--classes` file for eval
    Classes(classes::ClassesArgs),
    /// Evaluate transfer: a downstream target (maskclip, sclip, clearclip, zeroshot, features,
    /// probe) on clean vs adversarial images
    Eval(Box<eval::EvalArgs>),
    /// Describe a model: format, architecture, parameters, activation.
    Info(info::InfoArgs),
    /// Work with manifests: `merge` combines the manifests of a sharded run
    Manifest(manifest::ManifestArgs),
    /// Check a finished output: every input has an output of the same size within ε.
    Verify(verify::VerifyArgs),
}

pub fn main() -> ExitCode {
    quiet_decoder_panics();
    default_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Attack(args) => attack::run(*args),
        Command::Eval(args) => eval::run(*args),
        Command::Info(args) => info::run(args),
        Command::Bench(args) => bench::run(*args),
        Command::Classes(args) => classes::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Manifest(args) => manifest::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_message(&e));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// The error and its causes, `: `-separated, leaving out a cause whose text the message already
/// holds: prm's I/O errors name their OS cause in their own text, and the chain would repeat it
/// ("cannot read: Permission denied (os error 13): Permission denied (os error 13)").
fn error_message(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// A panic inside an image decoder (another crate's bug on a malformed file) becomes that
/// image's "corrupt or truncated" error, which the run reports with the file's name; the default
/// hook's panic message and backtrace on top of it would read as a crash of prm. Every other
/// panic still goes to the default hook.
fn quiet_decoder_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !prm::io::inside_image_decoder() {
            default_hook(info);
        }
    }));
}

/// `prm info | head -1`: when the reader of stdout goes away, end quietly as Unix tools do,
/// instead of panicking in `println!` with a backtrace (Rust ignores SIGPIPE, so the write fails
/// with EPIPE). A run piped through `tee` that dies ends the same way it would for any tool.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing on the main thread, before any other thread exists, setting a
    // signal's disposition back to the default; no handler runs Rust code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Parses a pixel quantity such as `8/255` or `0.03` for clap.
fn pixel_value(s: &str) -> Result<f32, String> {
    prm::io::parse_fraction(s)
}

/// Parses a dynamic-scale ratio range `LO,HI` for clap.
pub(crate) fn parse_scale_range(s: &str) -> Result<(f32, f32), String> {
    let err = || format!("'{s}' is not a scale range: use LO,HI such as 0.5,1.0");
    let (lo, hi) = s.split_once(',').ok_or_else(err)?;
    Ok((
        lo.trim().parse().map_err(|_| err())?,
        hi.trim().parse().map_err(|_| err())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::error_message;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "Permission denied");
        let e = anyhow::Error::new(prm::io::IoError::Read {
            path: "in/locked".into(),
            source: io,
        })
        .context("cannot list the inputs");
        let m = error_message(&e);
        assert_eq!(m.matches("Permission denied").count(), 1, "{m}");
        assert!(m.starts_with("cannot list the inputs: in/locked"), "{m}");
    }
}
