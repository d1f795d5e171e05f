//! The attack loop for one image: geometry (native, fixed size, dynamic scale), the start, the
//! steps, and the measurements the manifest records.

use super::loss::{layer_cosines, LossValue, Objective};
use super::optim::{project, Optimizer};
use super::settings::{AttackSettings, Init, LossKind, Resolution};
use crate::reference::resize::{bicubic_resize, bicubic_resize_backward, scaled_size};
use crate::reference::ReferenceVit;
use crate::rng::{ImageRng, STREAM_ESCAPE, STREAM_INIT, STREAM_SCALE};

/// A planar `[3, height, width]` image in [0, 1].
#[derive(Clone, Copy, Debug)]
pub struct Planar<'a> {
    pub data: &'a [f32],
    pub height: usize,
    pub width: usize,
}

/// What one attack produced.
#[derive(Clone, Debug)]
pub struct AttackOutcome {
    /// The final adversarial image (float, native size).
    pub adversarial: Vec<f32>,
    /// The loss at the start, at the evaluation geometry (no dynamic scale).
    pub loss_initial: f64,
    pub steps: usize,
}

/// A loss value with per-layer cosines, at the evaluation geometry.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub loss: f64,
    pub layer_cosine: Vec<f64>,
}

/// One image under attack: the clean image and its features at the evaluation geometry.
pub struct ImageAttack<'a> {
    engine: &'a ReferenceVit<'a>,
    objective: &'a Objective,
    settings: &'a AttackSettings,
    clean: Planar<'a>,
    rng: ImageRng,
    /// Clean features at the evaluation geometry (native or the fixed size).
    clean_eval: Vec<Vec<f32>>,
}

impl<'a> ImageAttack<'a> {
    pub fn new(
        engine: &'a ReferenceVit<'a>,
        objective: &'a Objective,
        settings: &'a AttackSettings,
        clean: Planar<'a>,
        rng: ImageRng,
    ) -> Result<Self, String> {
        let p = engine.model().config.patch;
        if clean.height < p || clean.width < p {
            return Err(format!(
                "image is {}x{}, smaller than one {p}x{p} patch of this model",
                clean.width, clean.height
            ));
        }
        let mut attack = ImageAttack {
            engine,
            objective,
            settings,
            clean,
            rng,
            clean_eval: Vec::new(),
        };
        let (img, h, w) = attack.at_eval_geometry(clean.data);
        attack.clean_eval = engine.forward(&img, h, w, false).features;
        Ok(attack)
    }

    /// The geometry the model sees when no dynamic scale is drawn.
    fn eval_size(&self) -> (usize, usize) {
        match self.settings.resolution {
            Resolution::Native => (self.clean.height, self.clean.width),
            Resolution::Fixed(n) => (n, n),
        }
    }

    fn resize_to(&self, x: &[f32], size: (usize, usize)) -> Vec<f32> {
        if size == (self.clean.height, self.clean.width) {
            x.to_vec()
        } else {
            bicubic_resize(x, 3, self.clean.height, self.clean.width, size.0, size.1)
        }
    }

    fn at_eval_geometry(&self, x: &[f32]) -> (Vec<f32>, usize, usize) {
        let (h, w) = self.eval_size();
        (self.resize_to(x, (h, w)), h, w)
    }

    /// The working size at `step`: the evaluation size, or a dynamic-scale draw from it.
    fn working_size(&self, step: usize) -> (usize, usize) {
        let (h, w) = self.eval_size();
        match self.settings.dynamic_scale {
            None => (h, w),
            Some((lo, hi)) => {
                let r = lo + (hi - lo) * self.rng.uniform(STREAM_SCALE, step as u64);
                let p = self.engine.model().config.patch;
                let (sh, sw) = scaled_size(h, w, r);
                (sh.max(p), sw.max(p))
            }
        }
    }

    /// The loss at `x` (native size) and its gradient with respect to `x`, at `size`.
    pub fn loss_and_gradient(&self, x: &[f32], size: (usize, usize)) -> (LossValue, Vec<f32>) {
        let model = self.engine.model();
        let adv = self.resize_to(x, size);
        let fwd = self.engine.forward(&adv, size.0, size.1, true);
        let clean_features;
        let clean = if size == self.eval_size() {
            &self.clean_eval
        } else {
            let c = self.resize_to(self.clean.data, size);
            clean_features = self.engine.forward(&c, size.0, size.1, false).features;
            &clean_features
        };
        let loss = self.objective.evaluate(model, &fwd.features, clean, true);
        let grad = self.engine.backward(&fwd, &loss.feature_grads);
        let grad = if size == (self.clean.height, self.clean.width) {
            grad
        } else {
            bicubic_resize_backward(
                &grad,
                3,
                self.clean.height,
                self.clean.width,
                size.0,
                size.1,
            )
        };
        (loss, grad)
    }

    /// Loss and per-layer cosine of `x` at the evaluation geometry.
    pub fn evaluate(&self, x: &[f32]) -> Evaluation {
        let (img, h, w) = self.at_eval_geometry(x);
        let features = self.engine.forward(&img, h, w, false).features;
        let model = self.engine.model();
        let loss = self
            .objective
            .evaluate(model, &features, &self.clean_eval, false)
            .value;
        let layer_cosine = layer_cosines(
            &features,
            &self.clean_eval,
            model.config.width,
            self.objective.tokens,
        );
        Evaluation { loss, layer_cosine }
    }

    /// The starting image: zero, a seeded uniform point in the ε-ball, or `start` (from an
    /// earlier run) projected into the ε-ball.
    pub fn start(&self, start: Option<&[f32]>) -> Vec<f32> {
        let eps = self.settings.eps;
        let mut x: Vec<f32> = match (&self.settings.init, start) {
            (Init::From(_), Some(s)) => s.to_vec(),
            (Init::Random, _) => self
                .clean
                .data
                .iter()
                .enumerate()
                .map(|(i, &c)| c + eps * (2.0 * self.rng.uniform(STREAM_INIT, i as u64) - 1.0))
                .collect(),
            _ => self.clean.data.to_vec(),
        };
        project(&mut x, self.clean.data, eps);
        x
    }

    /// Whether `start` is a point where the loss gradient vanishes: the clean image itself, for
    /// a loss that compares with the clean image (cosine at its maximum, distance at zero).
    fn starts_at_stationary_point(&self, start: &[f32]) -> bool {
        matches!(
            self.settings.loss,
            LossKind::Prm | LossKind::Nrd | LossKind::Embed
        ) && start == self.clean.data
    }

    /// The seeded ±1 signs of the first step out of a stationary start.
    fn escape_signs(&self) -> Vec<f32> {
        (0..self.clean.data.len())
            .map(|i| {
                if self.rng.uniform(STREAM_ESCAPE, i as u64) < 0.5 {
                    -1.0
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// Runs every step from `start`. `on_step` is called after each update (for progress).
    ///
    /// From a stationary start (see [`Optimizer::escape_step`]) the first step moves every pixel
    /// by one step with seeded random signs instead of following a gradient of rounding noise.
    pub fn run(&self, start: Vec<f32>, mut on_step: impl FnMut(usize)) -> AttackOutcome {
        let mut opt = Optimizer::new(self.settings, self.clean.data, &start);
        let mut loss_initial = None;
        let escape = self.starts_at_stationary_point(&start);
        for step in 0..self.settings.steps {
            if step == 0 && escape {
                // The loss there is known without a forward: |S| for prm, 0 for nrd, 1 for embed.
                opt.escape_step(&self.escape_signs());
                on_step(step);
                continue;
            }
            let x = opt.image();
            let size = self.working_size(step);
            let (loss, grad) = self.loss_and_gradient(&x, size);
            if step == 0 && self.settings.dynamic_scale.is_none() {
                loss_initial = Some(loss.value);
            }
            opt.step(&grad);
            on_step(step);
        }
        let loss_initial = loss_initial.unwrap_or_else(|| self.evaluate(&start).loss);
        AttackOutcome {
            adversarial: opt.image(),
            loss_initial,
            steps: self.settings.steps,
        }
    }
}
