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
}

/// Receives one step's per-image loss values: `(step, values)`.
pub type LossSink<'a> = &'a dyn Fn(usize, &[f64]);

/// What a device-resident loop returns per image: the final adversarial image and, when step 0
/// ran at the evaluation geometry, the loss at the start.
pub struct StepLoopResult {
    pub adversarial: Vec<f32>,
    pub loss_initial: Option<f64>,
}

/// A forward/backward engine for batches of images of any sizes.
pub trait Engine {
    /// Clean features of a batch, kept wherever the engine keeps them.
    type Clean;

    fn model(&self) -> &Model;

    /// Features of clean images, to compare adversarial features against.
    fn clean_features(&self, images: &[Planar]) -> Result<Self::Clean, EngineError>;

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

    /// Runs the whole step loop on the engine's own device (images, resizes, gradients and
    /// optimiser state stay there). `None`: this engine has no such loop; use the host loop.
    fn run_steps(
        &self,
        _plan: &StepPlan,
        _on_step: &mut dyn FnMut(usize),
    ) -> Option<Result<Vec<StepLoopResult>, EngineError>> {
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
                let fwd = self.forward(im.data, im.height, im.width, true);
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
