//! What an attack needs from an engine, for a batch of images: clean features, the loss with
//! its input gradient, and an evaluation. The CPU reference engine and the GPU engine (cuda or
//! the simulator) both implement it, so one attack loop drives every device.

use super::image::{Evaluation, Planar};
use super::loss::{layer_cosines, Objective};
use super::settings::AttackSettings;
use crate::gpu::GpuError;
use crate::model::Model;
use crate::reference::ReferenceVit;
use crate::rng::ImageRng;

/// An engine failure. The reference engine never fails; the GPU engine reports device errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

impl EngineError {
    /// Whether the device ran out of memory (the batch can be retried smaller).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, EngineError::Gpu(GpuError::OutOfMemory { .. }))
    }

    /// Whether the device is gone for this process (a fault that ends the CUDA context): every
    /// later batch on it would fail the same way, so the run stops instead of recording each
    /// remaining image as failed.
    pub fn ends_the_device(&self) -> bool {
        matches!(self, EngineError::Gpu(e) if e.ends_the_context())
    }
}

/// A loss value and its gradient with respect to one image's pixels (planar, same size).
#[derive(Clone, Debug)]
pub struct LossAndGradient {
    pub loss: f64,
    pub gradient: Vec<f32>,
}

/// Everything about a batch's attack that an engine needs to run the whole step loop itself,
/// with the geometry of every step decided in advance by the attack (so the random draws are
/// the same whichever loop runs).
pub struct StepPlan<'a> {
    pub objective: &'a Objective,
    pub settings: &'a AttackSettings,
    /// Clean images at native size.
    pub clean: Vec<Planar<'a>>,
    pub rngs: Vec<ImageRng>,
    /// Starting images, already in the ε-ball.
    pub starts: &'a [Vec<f32>],
    /// `Some`: every start is this pure function of its clean image (and its `rngs` entry and
    /// `settings.eps`), so an engine may compute the starts next to the clean images instead of
    /// copying `starts` (the GPU engine then uploads half as much per batch). `starts` holds
    /// the same values either way, bit for bit.
    pub derived_start: Option<DerivedStart>,
    /// Identifies this batch's clean images for an upload staged ahead with
    /// [`Engine::stage`]; `None`: nothing was staged for it.
    pub stage_key: Option<&'a StageKey>,
    /// Every image starts at the clean image with a loss that is stationary there: the first
    /// step is the seeded escape step (see `Optimizer::escape_step`).
    pub escape: bool,
    /// Each image's evaluation size (native or `--resolution`).
    pub eval_sizes: Vec<(usize, usize)>,
    /// `sizes[step][i]`: image i's working size at each step.
    pub sizes: Vec<Vec<(usize, usize)>>,
    /// A loss curve was asked for (`prm attack --plot`): called after every step that computed
    /// a loss, with the step and one value per image. `None` (the default) keeps the loop free
    /// of per-step host syncs.
    pub loss_sink: Option<LossSink<'a>>,
    /// `Some`: finish the batch as `prm attack` saves it, where the images are (see
    /// [`SaveRequest`]); every [`StepLoopResult::saved`] is then set.
    pub save: Option<SaveRequest>,
}

/// Asks a device-resident loop to quantise its final images within ε the way they are saved
/// ([`crate::io::quantize_for_saving`], bit for bit) and to evaluate the saved images, on its
/// own device: only the 8-bit levels come back (a quarter of the float images), and the
/// evaluation reads the saved values where they already are instead of uploading them again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaveRequest {
    /// Also read back the unquantised final images (`prm attack --save-float`).
    pub keep_float: bool,
}

/// A final image as saved, with its evaluation: what a device-resident loop returns for a
/// [`SaveRequest`] (and what the attack's host path makes from its own quantisation).
#[derive(Clone, Debug)]
pub struct SavedByEngine {
    /// The 8-bit levels, planar like the image.
    pub levels: Vec<u8>,
    /// Their L∞ distance to the clean image, in 1/255 units.
    pub linf_255: f64,
    /// The loss and layer cosines of the saved image (`levels / 255`), at the evaluation
    /// geometry.
    pub evaluation: Evaluation,
}

/// Seconds spent on each part of finishing an attacked batch ([`SaveRequest`], or the host's
/// quantisation and evaluation).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SavePhases {
    pub steps_seconds: f64,
    pub quantize_seconds: f64,
    pub evaluate_seconds: f64,
}

/// How the starts of a batch follow from its clean images (see [`StepPlan::derived_start`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DerivedStart {
    /// The start is the clean image (`--init zero`).
    Clean,
    /// `project(clean + ε·(2u − 1))` with u = `rng.uniform(STREAM_INIT, j)` (`--init random`;
    /// [`crate::attack::image::random_start`]).
    Random,
}

/// Names the clean images of one batch exactly: the run they belong to and their indices in
/// that run's inputs, in batch order. An upload staged under one key is only ever used by a
/// batch with an equal key (and the same image sizes), so a batch that was halved after an
/// out-of-memory error, abandoned at an interrupt, or belongs to another run can never run on
/// another batch's staged pixels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StageKey {
    pub run: u64,
    pub images: Vec<usize>,
}

/// Counters of the uploads an engine staged ahead (cumulative over the engine's life; the
/// pipeline reports differences per batch).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StagingCounters {
    /// Uploads staged ([`Engine::stage`] calls that queued a copy).
    pub staged: u64,
    /// Batches that found their clean images staged and used them.
    pub used: u64,
    /// Of those, batches whose staged copy had not finished when the batch took it: the
    /// compute stream waited for the copy (always 0 on the simulator, whose copies are
    /// synchronous).
    pub copy_pending: u64,
    /// Host seconds spent staging (packing into pinned memory and queueing the copy).
    pub host_seconds: f64,
}

/// Receives one step's per-image loss values: `(step, values)`.
pub type LossSink<'a> = &'a dyn Fn(usize, &[f64]);

/// What a device-resident loop returns per image: the final adversarial image, the loss at the
/// start when the loop measured it at the evaluation geometry, and the saved image when the plan
/// asked for one.
pub struct StepLoopResult {
    /// `None` only when a [`SaveRequest`] did not keep the float images.
    pub adversarial: Option<Vec<f32>>,
    pub loss_initial: Option<f64>,
    pub saved: Option<SavedByEngine>,
}

/// What a device-resident loop returns: one [`StepLoopResult`] per image, and the clean features
/// at the evaluation geometry that the loop computed for itself (`None` if it computed none).
/// The attack keeps them for its final evaluation instead of computing them a second time: they
/// are the same values, the forward of the same images at the same sizes (the device's resize is
/// bit-identical to the host's).
pub struct StepLoopOutput<C> {
    pub images: Vec<StepLoopResult>,
    pub clean_eval: Option<C>,
    /// With a [`SaveRequest`]: the seconds its quantisation and evaluation took (the rest of
    /// the call is the steps').
    pub save_phases: Option<SavePhases>,
}

/// A forward/backward engine for batches of images of any sizes.
pub trait Engine {
    /// Clean features of a batch, kept wherever the engine keeps them.
    type Clean;

    fn model(&self) -> &Model;

    /// Features of clean images, to compare adversarial features against.
    fn clean_features(&self, images: &[Planar]) -> Result<Self::Clean, EngineError>;

    /// Features of clean images that only `objective`'s loss will read (a step's clean batch
    /// under dynamic scale): an engine may stop at the deepest layer the loss reads
    /// ([`Objective::blocks_needed`]). The default computes every layer.
    fn clean_features_for_loss(
        &self,
        images: &[Planar],
        objective: &Objective,
    ) -> Result<Self::Clean, EngineError> {
        let _ = objective;
        self.clean_features(images)
    }

    /// Per image: the loss at `adv[i]` against `clean` image i, and its input gradient.
    fn loss_and_gradient(
        &self,
        adv: &[Planar],
        clean: &Self::Clean,
        objective: &Objective,
    ) -> Result<Vec<LossAndGradient>, EngineError>;

    /// Per image: the loss and the mean token cosine of every feature layer, without gradient.
    fn evaluate(
        &self,
        adv: &[Planar],
        clean: &Self::Clean,
        objective: &Objective,
    ) -> Result<Vec<Evaluation>, EngineError>;

    /// Frees memory the engine keeps cached between batches (after an out-of-memory error,
    /// before the batch is retried smaller). The default keeps nothing.
    fn release_cached_memory(&self) {}

    /// Whether [`Engine::stage`] does anything: the pipeline then claims the next batch ahead
    /// (when it is already decoded) to stage it while the current one runs.
    fn stages_uploads(&self) -> bool {
        false
    }

    /// Starts copying a batch's clean images (packed in order) to the device, on a copy stream
    /// that runs beside the compute stream, so that the batch [`StepPlan::stage_key`] names
    /// does not wait for its upload. Best effort: a staging that fails is forgotten and the
    /// batch uploads normally. The default stages nothing.
    fn stage(&self, _key: &StageKey, _clean: &[Planar]) {}

    /// Kernels the engine chose by timing them on its device (a GPU engine under
    /// `PRM_ATTENTION=auto`), a line each, for `--profile`. The default chose none.
    fn kernel_choices(&self) -> Vec<String> {
        Vec::new()
    }

    /// What [`Engine::stage`] did so far (zeros for an engine that never stages).
    fn staging_counters(&self) -> StagingCounters {
        StagingCounters::default()
    }

    /// Runs the whole step loop on the engine's own device (images, resizes, gradients and
    /// optimiser state stay there). `None`: this engine has no such loop; use the host loop.
    fn run_steps(
        &self,
        _plan: &StepPlan,
        _on_step: &mut dyn FnMut(usize),
    ) -> Option<Result<StepLoopOutput<Self::Clean>, EngineError>> {
        None
    }
}

impl Engine for ReferenceVit<'_> {
    type Clean = Vec<Vec<Vec<f32>>>;

    fn model(&self) -> &Model {
        ReferenceVit::model(self)
    }

    fn clean_features(&self, images: &[Planar]) -> Result<Self::Clean, EngineError> {
        Ok(images
            .iter()
            .map(|im| self.forward(im.data, im.height, im.width, false).features)
            .collect())
    }

    fn clean_features_for_loss(
        &self,
        images: &[Planar],
        objective: &Objective,
    ) -> Result<Self::Clean, EngineError> {
        let blocks = objective.blocks_needed();
        Ok(images
            .iter()
            .map(|im| {
                self.forward_blocks(im.data, im.height, im.width, false, blocks)
                    .features
            })
            .collect())
    }

    fn loss_and_gradient(
        &self,
        adv: &[Planar],
        clean: &Self::Clean,
        objective: &Objective,
    ) -> Result<Vec<LossAndGradient>, EngineError> {
        Ok(adv
            .iter()
            .zip(clean)
            .map(|(im, clean)| {
                let blocks = objective.blocks_needed();
                let fwd = self.forward_blocks(im.data, im.height, im.width, true, blocks);
                let loss = objective.evaluate(self.model(), &fwd.features, clean, true);
                LossAndGradient {
                    loss: loss.value,
                    gradient: self.backward(&fwd, &loss.feature_grads),
                }
            })
            .collect())
    }

    fn evaluate(
        &self,
        adv: &[Planar],
        clean: &Self::Clean,
        objective: &Objective,
    ) -> Result<Vec<Evaluation>, EngineError> {
        let width = self.model().config.width;
        Ok(adv
            .iter()
            .zip(clean)
            .map(|(im, clean)| {
                let features = self.forward(im.data, im.height, im.width, false).features;
                Evaluation {
                    loss: objective
                        .evaluate(self.model(), &features, clean, false)
                        .value,
                    layer_cosine: layer_cosines(&features, clean, width, objective.tokens),
                }
            })
            .collect())
    }
}
