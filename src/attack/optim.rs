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
        *v = project_pixel(*v, c, eps);
    }
}

/// One pixel of [`project`].
pub fn project_pixel(v: f32, c: f32, eps: f32) -> f32 {
    v.clamp(c - eps, c + eps).clamp(0.0, 1.0)
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

    /// The first step from a start where the gradient vanishes (δ = 0 for a loss that compares
    /// with the clean image): every pixel moves by one step with the seeded sign in `signs`.
    ///
    /// For AdamW this is what PyTorch does with a gradient of pure rounding noise: with
    /// |g| ≫ eps the first update is exactly −lr·sign(g) after the weight decay, and the
    /// moments it leaves behind (of order |g|) are negligible. The step counter advances as it
    /// does there, so later bias corrections match the official trajectory.
    pub fn escape_step(&mut self, signs: &[f32]) {
        assert_eq!(
            signs.len(),
            self.clean.len(),
            "signs do not match the image"
        );
        match self.kind {
            OptimizerKind::Adamw => {
                self.adam_step += 1;
                let decay = 1.0 - self.lr255 * self.weight_decay;
                for (d, &s) in self.delta255.iter_mut().zip(signs) {
                    *d = *d * decay - self.lr255 * s;
                }
            }
            OptimizerKind::Pgd | OptimizerKind::Mifgsm => {
                for (x, &s) in self.x.iter_mut().zip(signs) {
                    *x -= self.step_size * s;
                }
                project(&mut self.x, &self.clean, self.eps);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::settings::Preset;

    /// A trajectory of `torch.optim.AdamW(lr=0.5, weight_decay=0.01)` on δ in 0–255 units with
    /// x = clamp(clean·255 + clamp(δ, −8, 8), 0, 255) and loss Σ wₜ·x (torch 2.15, f32).
    /// Pixel 2 and 3 cross the ε clamp, pixel 4 sits below 0 and pixel 5 crosses 255, so the
    /// gradient masks of both clamps are exercised.
    #[test]
    fn adamw_matches_torch_trajectory_in_255_units() {
        let clean = [0.5f32, 0.5, 0.5, 0.5, 1.0 / 255.0, 254.0 / 255.0];
        let delta0 = [0.0f32, 3.0, -7.9, 7.95, -2.0, 0.7];
        let settings = Preset::Paper.settings();
        let start: Vec<f32> = clean
            .iter()
            .zip(&delta0)
            .map(|(c, d)| c + d / 255.0)
            .collect();
        let mut opt = Optimizer::new(&settings, &clean, &start);
        // Exact δ (the start above is rounded through [0,1] units; set it as torch has it).
        opt.delta255 = delta0.to_vec();
        let ws = [
            [1e-3f32, -2e-3, 5e-4, -1e-3, 3e-3, -4e-3],
            [2e-3, 1e-3, -5e-4, -3e-3, 1e-3, 1e-3],
            [-1e-3, 1e-3, 1e-4, 2e-3, -2e-3, -5e-3],
            [1e-4, -1e-4, 2e-4, -2e-4, 3e-4, -3e-4],
        ];
        let torch_delta = [
            [
                -0.499_995,
                3.484_997_7,
                -8.360_491,
                8.410_245,
                -1.99,
                1.196_498_8,
            ],
            [
                -0.980_083,
                3.600_740_4,
                -8.653_708,
                8.703_218,
                -1.980_05,
                1.525_544_2,
            ],
            [
                -1.185_225_7,
                3.546_198_4,
                -8.869_41,
                8.918_676,
                -1.970_149_8,
                1.776_893_9,
            ],
            [
                -1.363_074_5,
                3.510_429_4,
                -9.037_193,
                9.086_218,
                -1.960_299,
                1.980_147_7,
            ],
        ];
        for (w, want) in ws.iter().zip(&torch_delta) {
            // loss = Σ w·x₂₅₅ = Σ (255·w)·x₀₁
            let grad: Vec<f32> = w.iter().map(|v| v * 255.0).collect();
            opt.step(&grad);
            for (got, want) in opt.delta255.iter().zip(want) {
                assert!(
                    (got - want).abs() <= 2e-6 * want.abs().max(1.0),
                    "δ {got} vs torch {want}"
                );
            }
        }
        let want_x = [
            0.494_654_6,
            0.513_766_4,
            0.468_627_45,
            0.531_372_55,
            0.0,
            1.0,
        ];
        for (got, want) in opt.image().iter().zip(want_x) {
            assert!((got - want).abs() < 1e-6, "x {got} vs torch {want}");
        }
    }

    #[test]
    fn pgd_steps_by_sign_and_stays_in_the_ball() {
        let settings = Preset::Pgd.settings();
        let clean = [0.5f32, 0.0, 1.0, 0.5];
        let mut opt = Optimizer::new(&settings, &clean, &clean);
        for _ in 0..10 {
            opt.step(&[1.0, 1.0, -1.0, 0.0]);
        }
        let eps = settings.eps;
        assert_eq!(opt.image(), vec![0.5 - eps, 0.0, 1.0, 0.5]);
    }
}
