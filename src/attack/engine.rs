//! What an attack needs from an engine, for a batch of images: clean features, the loss with
//! its input gradient, and an evaluation. The CPU reference engine and the GPU engine (cuda or
//! the simulator) both implement it, so one attack loop drives every device.

use super::image::{Evaluation, Planar};
use super::loss::{layer_cosines, Objective};
use crate::gpu::GpuError;
use crate::model::Model;
use crate::reference::ReferenceVit;

/// An engine failure. The reference engine never fails; the GPU engine reports device errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// A loss value and its gradient with respect to one image's pixels (planar, same size).
#[derive(Clone, Debug)]
pub struct LossAndGradient {
    pub loss: f64,
    pub gradient: Vec<f32>,
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
