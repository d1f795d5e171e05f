//! `--classes`: the class embeddings a dense or zero-shot target compares image tokens with.

use anyhow::{bail, Context};
use prm::eval::targets::TargetKind;
use prm::eval::text::{is_safetensors, read_class_safetensors, ClassEmbeddings};
use prm::eval::EvalError;
use prm::gpu::engine::Precision;
use prm::gpu::Device;
use prm::model::{load_text_tower, Model};

use super::EvalArgs;

/// The class embeddings of a target that needs them: read from a `.safetensors` (made by
/// `prm classes`) or embedded here from a text file of class names, and checked against the
/// model's embedding width. `None` for the targets that take no `--classes`.
pub(super) fn load_classes(
    args: &EvalArgs,
    model: &Model,
    dev: Option<&Device>,
    precision: Precision,
) -> anyhow::Result<Option<ClassEmbeddings>> {
    let needs = matches!(
        args.target,
        TargetKind::MaskClip | TargetKind::Sclip | TargetKind::ClearClip | TargetKind::ZeroShot
    );
    let Some(path) = &args.classes else {
        if needs {
            bail!(
                "--target {} needs --classes FILE (a .safetensors of class embeddings or a text \
                 file of class names)",
                args.target.name()
            );
        }
        return Ok(None);
    };
    if !needs {
        bail!(
            "--target {} takes no --classes (its classes come from {})",
            args.target.name(),
            if args.target == TargetKind::Probe {
                "the probe file"
            } else {
                "nowhere: it compares features"
            }
        );
    }
    if !path.is_file() {
        bail!("--classes {}: no such file", path.display());
    }
    // The dense targets project every patch token with CLIP's projection; zeroshot reads the
    // image embedding, however the tower pools it.
    let e = if args.target.is_dense() {
        model.image_projection().map(|p| p.out_features)
    } else {
        model.image_head().map(|h| h.dim())
    }
    .map_err(EvalError::NoImageEmbedding)
    .context("class embeddings need image embeddings")?;
    let classes = if is_safetensors(path) {
        let mut classes = read_class_safetensors(path)?;
        // Compared when both are known: a file that names its text tower, and a checkpoint
        // with one (a vision-only checkpoint cannot say).
        if let Some(theirs) = &classes.text_weights {
            if let Ok(Some(tower)) = load_text_tower(&args.model) {
                classes.text_weights_match = Some(tower.fingerprint() == *theirs);
            }
        }
        classes
    } else {
        crate::cli::classes::embed_names_file(
            &args.model,
            path,
            args.tokenizer.as_deref(),
            args.single_template,
            dev,
            precision,
        )?
    };
    if classes.dim != e {
        return Err(EvalError::EmbedDim {
            classes: classes.dim,
            model: e,
        }
        .into());
    }
    Ok(Some(classes))
}
