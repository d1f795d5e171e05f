//! `prm classes`: class names embedded once with a checkpoint's text tower, written as the
//! `--classes FILE.safetensors` that `prm eval` reads, so that later evaluations (and other
//! tools) skip the text tower.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use prm::eval::gpu::GpuText;
use prm::eval::text::{
    embed_class_names, prompt_templates, read_class_names, write_class_safetensors,
    ClassEmbeddings, ReferenceText, TextEncoder,
};
use prm::eval::tokenizer::ClipTokenizer;
use prm::eval::EvalError;
use prm::gpu::engine::Precision;
use prm::gpu::Device;
use prm::model::load_text_tower;

#[derive(Args)]
pub struct ClassesArgs {
    /// A Hugging Face CLIP directory (sharded ones too) or hub id in the local cache
    /// (owner/name[@revision]), an OpenAI/open_clip .safetensors file, or random:ARCH: the
    /// checkpoint whose text tower embeds the names
    #[arg(long)]
    model: String,
    /// Class names, one per line (blank lines skipped)
    #[arg(long)]
    names: PathBuf,
    /// The class embeddings to write, FILE.safetensors: `class_embeddings` [C, E] (F32, rows
    /// L2-normalised) with metadata `names` (a JSON array), `source` and `text_weights`
    #[arg(long)]
    output: PathBuf,
    /// tokenizer.json for the names (default: next to the checkpoint; bundled for random:ARCH)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Only the template "a photo of a {}." instead of the 80-template ensemble
    #[arg(long)]
    single_template: bool,
    /// auto (CUDA device 0 if there is one, else cpu), cpu, cuda[:N] or sim
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp32, or bf16 (GPU engine only: bf16 inputs to the matrix products)
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// No summary
    #[arg(long, short)]
    quiet: bool,
}

/// The class names in `names` embedded with the text tower of `model` and the prompt templates
/// (all 80, or "a photo of a {}." alone), on `dev` or the CPU reference.
pub(super) fn embed_names_file(
    model: &str,
    names: &Path,
    tokenizer: Option<&Path>,
    single_template: bool,
    dev: Option<&Device>,
    precision: Precision,
) -> anyhow::Result<ClassEmbeddings> {
    let names = read_class_names(names)?;
    let tower = load_text_tower(model)
        .with_context(|| format!("cannot load the text tower of '{model}'"))?
        .ok_or(EvalError::NoTextTower)?;
    let tokenizer = ClipTokenizer::for_model(model, tokenizer)?;
    let templates = if single_template {
        vec!["a photo of a {}."]
    } else {
        prompt_templates()
    };
    let encoder: Box<dyn TextEncoder + '_> = match dev {
        Some(d) => Box::new(
            GpuText::new(d, &tower, precision)
                .with_context(|| format!("cannot load the text tower onto {}", d.name()))?,
        ),
        None => Box::new(ReferenceText(&tower)),
    };
    Ok(embed_class_names(
        &names,
        encoder.as_ref(),
        &tokenizer,
        &templates,
    )?)
}

/// The shared errors are worded for `prm eval --classes`; here the names come from `--names`,
/// and "give --classes a .safetensors" would be advice for another command.
fn in_this_commands_words(e: anyhow::Error, model: &str) -> anyhow::Error {
    match e.downcast::<EvalError>() {
        Ok(EvalError::Classes { path, reason }) => {
            anyhow::anyhow!("--names {}: {reason}", path.display())
        }
        Ok(EvalError::NoTextTower) => anyhow::anyhow!(
            "'{model}' has no text tower to embed the names with; give prm classes a checkpoint \
             that holds one (a CLIPModel, or an OpenAI / open_clip state dict with its text \
             tower)"
        ),
        Ok(other) => other.into(),
        Err(e) => e,
    }
}

pub fn run(args: ClassesArgs) -> anyhow::Result<ExitCode> {
    super::require_extension(
        &args.output,
        "--output",
        "class embeddings are written as safetensors",
        "safetensors",
    )?;
    if args.names.is_dir() {
        anyhow::bail!(
            "--names {}: is a directory; give a text file of class names, one per line",
            args.names.display()
        );
    }
    if !args.names.is_file() {
        anyhow::bail!("--names {}: no such file", args.names.display());
    }
    if args.output.is_dir() {
        anyhow::bail!("--output {}: is a directory", args.output.display());
    }
    let (dev, precision) = super::device::choose_device(&args.device, &args.precision)?;
    let classes = embed_names_file(
        &args.model,
        &args.names,
        args.tokenizer.as_deref(),
        args.single_template,
        dev.as_ref(),
        precision,
    )
    .map_err(|e| in_this_commands_words(e, &args.model))?;
    write_class_safetensors(&args.output, &classes)?;
    if !args.quiet {
        eprintln!(
            "wrote {} class embeddings of dimension {} to {} ({})",
            classes.len(),
            classes.dim,
            args.output.display(),
            classes.source
        );
        if args.model.starts_with("random:") {
            eprintln!(
                "note: the text tower's weights are random (--model {})",
                args.model
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
