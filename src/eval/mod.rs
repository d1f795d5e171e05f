//! Transfer evaluation: downstream targets built on a CLIP checkpoint, class embeddings, and
//! metrics comparing clean and adversarial images.
//!
//! - [`targets`]: maskclip / sclip / clearclip (dense, open-vocabulary segmentation), zeroshot
//!   (CLS embedding top-1), features (per-layer drift), probe (a user linear head), and the
//!   [`EvalEngine`] trait with the CPU reference implementation;
//! - [`gpu`]: the same targets on the GPU engine's kernels (CUDA or the simulator);
//! - [`text`]: the CLIP text tower and `--classes` (safetensors embeddings or names + prompts);
//! - [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate;
//! - [`metrics`]: confusion matrices, mIoU, pixel accuracy, fwIoU, top-1;
//! - [`ground_truth`]: where `--labels` reads from (files, or members of the clean tar shards);
//! - [`labels`]: label PNGs in, prediction PNGs out, classification label files;
//! - [`outputs`]: the checks that no output is written over an input;
//! - [`run`]: a whole evaluation over a clean and an adversarial directory, and its report.

pub mod gpu;
pub mod ground_truth;
pub mod labels;
pub mod metrics;
pub mod ops;
pub mod outputs;
mod pipeline;
pub mod run;
pub mod targets;
pub mod text;
pub mod tokenizer;

use std::path::PathBuf;

pub use pipeline::EngineTime;
pub use targets::{EvalEngine, ReferenceTargets, TargetKind};

/// Everything evaluation can report. Messages name the file and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error(transparent)]
    Viz(#[from] crate::viz::VizError),
    #[error("{}: bad --classes file: {reason}", path.display())]
    Classes { path: PathBuf, reason: String },
    #[error("{}: bad probe file: {reason}", path.display())]
    Probe { path: PathBuf, reason: String },
    #[error("{}: bad tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error(
        "{}: no tokenizer.json next to the checkpoint; class names given as text need the \
         checkpoint's tokenizer. Hugging Face CLIP repositories ship tokenizer.json; for an \
         OpenAI / open_clip state dict copy the tokenizer.json of any Hugging Face OpenAI CLIP \
         repository (they share one vocabulary) next to it, or pass --tokenizer FILE",
        dir.display()
    )]
    NoTokenizer { dir: PathBuf },
    #[error(
        "the checkpoint has no text tower, so class names in a text file cannot be embedded; \
         give --classes a .safetensors file with `class_embeddings` [C, E] and metadata `names`, \
         or use a checkpoint that includes the text tower"
    )]
    NoTextTower,
    #[error("this target needs image embeddings, and {0}")]
    NoImageEmbedding(String),
    #[error("class embeddings have dimension {classes}, the model's image embeddings {model}")]
    EmbedDim { classes: usize, model: usize },
    #[error("image {width}x{height} is smaller than one {patch}-pixel patch")]
    ImageTooSmall {
        width: usize,
        height: usize,
        patch: usize,
    },
    #[error("text tower: {0}")]
    Text(String),
    #[error("{0}")]
    Usage(String),
    #[error("{}: {reason}", path.display())]
    Labels { path: PathBuf, reason: String },
    /// A device failed for good during the evaluation (its CUDA context is gone): every later
    /// pass on it would fail, so the evaluation stops without a report.
    #[error("a device failed during the evaluation: {0}; the evaluation stops without a report (files already written stay); run it again, leaving that device out of --device if it keeps failing")]
    DeviceLost(String),
}

impl EvalError {
    /// Whether this is a fault that ends the device's CUDA context ([`crate::gpu::GpuError::ends_the_context`]).
    pub fn ends_the_device(&self) -> bool {
        matches!(self, EvalError::Gpu(e) if e.ends_the_context())
    }
}
