//! The optimisers: projected sign steps (PGD), MI-FGSM, and the paper's AdamW on δ.
//!
//! Every optimiser sees the gradient of the loss with respect to the adversarial image in
//! [0, 1] pixel units, and keeps the image inside the ε-ball around the clean image and [0, 1].

use super::settings::{AttackSettings, OptimizerKind};

/// AdamW's fixed hyper-parameters (PyTorch defaults, as the official code uses).
const ADAM_BETA1: f32 = 0.9;
const ADAM_BETA2: f32 = 0.999;
const ADAM_EPS: f32 = 1e-8;

/// Optimiser state for one image.
pub struct Optimizer {
    kind: OptimizerKind,
    clean: Vec<f32>,
    eps: f32,
    step_size: f32,
    momentum: f32,
    /// PGD / MI-FGSM: the current adversarial image.
    x: Vec<f32>,
    /// MI-FGSM accumulated direction, or AdamW's first moment.
    m: Vec<f32>,
    /// AdamW: δ in 0–255 units and its second moment.
    delta255: Vec<f32>,
    v: Vec<f32>,
    lr255: f32,
    weight_decay: f32,
    adam_step: i32,
}

/// Projects `x` into `[clean − eps, clean + eps] ∩ [0, 1]`.
pub fn project(x: &mut [f32], clean: &[f32], eps: f32) {
    for (v, &c) in x.iter_mut().zip(clean) {
        *v = v.clamp(c - eps, c + eps).clamp(0.0, 1.0);
    }
}

fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Optimizer {
    /// Starts at `start`, which must already lie in the ε-ball ∩ [0, 1].
    pub fn new(settings: &AttackSettings, clean: &[f32], start: &[f32]) -> Self {
        let n = clean.len();
        let adam = settings.optimizer == OptimizerKind::Adamw;
        Optimizer {
            kind: settings.optimizer,
            clean: clean.to_vec(),
            eps: settings.eps,
            step_size: settings.step_size,
            momentum: settings.momentum,
            x: start.to_vec(),
            m: vec![0.0; n],
            // The official code optimises δ in 0–255 pixel units; AdamW's eps and weight decay
            // do not commute with that scale, so the arithmetic runs in those units.
            delta255: if adam {
                start
                    .iter()
                    .zip(clean)
                    .map(|(s, c)| (s - c) * 255.0)
                    .collect()
            } else {
                Vec::new()
            },
            v: if adam { vec![0.0; n] } else { Vec::new() },
            lr255: settings.lr * 255.0,
            weight_decay: settings.weight_decay,
            adam_step: 0,
        }
    }

    /// The current adversarial image.
    pub fn image(&self) -> Vec<f32> {
        match self.kind {
            OptimizerKind::Adamw => {
                let eps255 = self.eps * 255.0;
                self.delta255
                    .iter()
                    .zip(&self.clean)
                    .map(|(d, c)| (c * 255.0 + d.clamp(-eps255, eps255)).clamp(0.0, 255.0) / 255.0)
                    .collect()
            }
            _ => self.x.clone(),
        }
    }

    /// One update from `grad` = dL/dx_adv in [0, 1] units.
    pub fn step(&mut self, grad: &[f32]) {
        assert_eq!(
            grad.len(),
            self.clean.len(),
            "gradient does not match the image"
        );
        match self.kind {
            OptimizerKind::Pgd => {
                for (x, &g) in self.x.iter_mut().zip(grad) {
                    *x -= self.step_size * sign(g);
                }
                project(&mut self.x, &self.clean, self.eps);
            }
            OptimizerKind::Mifgsm => {
                let l1: f64 = grad.iter().map(|g| g.abs() as f64).sum();
                let inv = if l1 > 0.0 { (1.0 / l1) as f32 } else { 0.0 };
                for ((x, m), &g) in self.x.iter_mut().zip(self.m.iter_mut()).zip(grad) {
                    *m = self.momentum * *m + g * inv;
                    *x -= self.step_size * sign(*m);
                }
                project(&mut self.x, &self.clean, self.eps);
            }
            OptimizerKind::Adamw => self.adamw_step(grad),
        }
    }

    /// `torch.optim.AdamW` (single-tensor path) on δ in 0–255 units, with the gradient passed
    /// through x_adv = clamp(x + clamp(δ, −ε, ε), 0, 255) where both clamps are inactive
    /// (PyTorch's clamp passes the gradient at the bounds too).
    fn adamw_step(&mut self, grad: &[f32]) {
        self.adam_step += 1;
        let t = self.adam_step;
        let eps255 = self.eps * 255.0;
        let lr = self.lr255;
        let bias1 = 1.0 - (ADAM_BETA1 as f64).powi(t);
        let bias2_sqrt = (1.0 - (ADAM_BETA2 as f64).powi(t)).sqrt() as f32;
        let step = (lr as f64 / bias1) as f32;
        let decay = 1.0 - lr * self.weight_decay;
        let state = self
            .delta255
            .iter_mut()
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut());
        for (((delta, m_i), v_i), (&clean, &grad)) in state.zip(self.clean.iter().zip(grad)) {
            let d = *delta;
            let y = clean * 255.0 + d.clamp(-eps255, eps255);
            let passes = (-eps255..=eps255).contains(&d) && (0.0..=255.0).contains(&y);
            // dL/dδ₂₅₅ = dL/dx · dx/dδ₂₅₅ = g / 255 where the clamps pass the gradient.
            let g = if passes { grad / 255.0 } else { 0.0 };
            let d = d * decay;
            let m = *m_i + (g - *m_i) * (1.0 - ADAM_BETA1);
            let v = *v_i * ADAM_BETA2 + (1.0 - ADAM_BETA2) * g * g;
            *m_i = m;
            *v_i = v;
            *delta = d - step * m / (v.sqrt() / bias2_sqrt + ADAM_EPS);
        }
    }
}
