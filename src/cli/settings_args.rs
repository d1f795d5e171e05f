//! The attack-setting flags that `prm attack` and `prm bench` share: each overrides one field
//! of the chosen preset (DESIGN §8), so a benchmark runs exactly the attack a user would.

use clap::Args;
use prm::attack::*;

use super::{parse_scale_range, pixel_value};

#[derive(Args)]
pub struct SettingsArgs {
    /// Objective to minimise [preset: prm]
    #[arg(long, value_enum)]
    loss: Option<LossKind>,
    /// Feature layers F_0..F_L the loss reads: all, or a list such as 0,4,12 [preset: all]
    #[arg(long, value_parser = LayerSelection::parse)]
    layers: Option<LayerSelection>,
    /// Tokens in the per-layer means [preset: all, CLS included]
    #[arg(long, value_enum)]
    tokens: Option<TokenSelection>,
    /// [paper: adamw; pgd: pgd]
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerKind>,
    /// Optimisation steps per image [paper: 250; pgd: 10]
    #[arg(long)]
    steps: Option<usize>,
    /// L∞ budget in [0,1] pixel units, e.g. 8/255 [preset: 8/255]
    #[arg(long, value_parser = pixel_value)]
    eps: Option<f32>,
    /// PGD / MI-FGSM step α [preset: 2/255]
    #[arg(long, value_parser = pixel_value)]
    step_size: Option<f32>,
    /// AdamW learning rate, in [0,1] pixel units [preset: 0.5/255]
    #[arg(long, value_parser = pixel_value)]
    lr: Option<f32>,
    /// AdamW decoupled weight decay on δ [preset: 0.01]
    #[arg(long)]
    weight_decay: Option<f32>,
    /// MI-FGSM momentum μ [default: 1.0]
    #[arg(long)]
    momentum: Option<f32>,
    /// Start: zero, random (uniform in the ε-ball) or from:<DIR> (an earlier run's output)
    /// [paper: zero; pgd: random]
    #[arg(long, value_parser = Init::parse)]
    pub init: Option<Init>,
    /// native (the image's own size) or N (resize the whole image to N×N) [preset: native]
    #[arg(long, value_parser = Resolution::parse)]
    resolution: Option<Resolution>,
    /// Per-step random rescale ratio range LO,HI [paper: 0.5,1.0; pgd: off]
    #[arg(long, value_parser = parse_scale_range, conflicts_with = "no_dynamic_scale")]
    dynamic_scale: Option<(f32, f32)>,
    /// Turn dynamic scale off
    #[arg(long)]
    no_dynamic_scale: bool,
}

impl SettingsArgs {
    /// `preset`'s settings, overridden by every flag that was given, with the run's `seed`.
    pub fn resolve(&self, preset: Preset, seed: u64) -> AttackSettings {
        let mut s = preset.settings();
        if let Some(v) = self.loss {
            s.loss = v;
        }
        if let Some(v) = &self.layers {
            s.layers = v.clone();
        }
        if let Some(v) = self.tokens {
            s.tokens = v;
        }
        if let Some(v) = self.optimizer {
            s.optimizer = v;
        }
        if let Some(v) = self.steps {
            s.steps = v;
        }
        if let Some(v) = self.eps {
            s.eps = v;
        }
        if let Some(v) = self.step_size {
            s.step_size = v;
        }
        if let Some(v) = self.lr {
            s.lr = v;
        }
        if let Some(v) = self.weight_decay {
            s.weight_decay = v;
        }
        if let Some(v) = self.momentum {
            s.momentum = v;
        }
        if let Some(v) = &self.init {
            s.init = v.clone();
        }
        if let Some(v) = self.resolution {
            s.resolution = v;
        }
        if self.no_dynamic_scale {
            s.dynamic_scale = None;
        } else if let Some(v) = self.dynamic_scale {
            s.dynamic_scale = Some(v);
        }
        s.seed = seed;
        s
    }
}
