//! What an attack does: loss, layers, tokens, optimiser, budget, start, geometry; and the presets.

use std::path::PathBuf;

/// The objective being minimised (DESIGN §2).
// The variants' docs are also `--loss`'s help text, where `x[t]` must read as indexing, not as
// an escaped intra-doc link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Σ_l mean_t cos(F_l(x_adv)[t], F_l(x)[t]): patch representation misalignment.
    Prm,
    /// −Σ_l mean_{t,d} (F_l(x_adv) − F_l(x))²: maximise the feature distance.
    Nrd,
    /// Σ_l std(F_l(x_adv)): dispersion reduction.
    Dr,
    /// −Σ_l std(F_l(x_adv)): the sign the official DR code uses.
    DrOfficial,
    /// cos(image_embed(x_adv), image_embed(x)): the classic CLIP-embedding attack.
    Embed,
}

/// Which tokens enter the per-layer means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenSelection {
    /// CLS and every patch token, as the official code does.
    All,
    /// Patch tokens only.
    Patch,
}

/// Which feature layers F_0..F_L the loss reads.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum LayerSelection {
    All,
    List(Vec<usize>),
}

impl LayerSelection {
    /// Parses `all` or a comma-separated list such as `0,4,12`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(LayerSelection::All);
        }
        let mut layers = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let l: usize = part.parse().map_err(|_| {
                format!("'{part}' is not a layer index; use 'all' or a list such as 0,4,12")
            })?;
            if !layers.contains(&l) {
                layers.push(l);
            }
        }
        if layers.is_empty() {
            return Err("no layers given; use 'all' or a list such as 0,4,12".into());
        }
        layers.sort_unstable();
        Ok(LayerSelection::List(layers))
    }

    /// The selected indices for a model with `feature_layers` = L + 1 features.
    pub fn resolve(&self, feature_layers: usize) -> Result<Vec<usize>, String> {
        match self {
            LayerSelection::All => Ok((0..feature_layers).collect()),
            LayerSelection::List(l) => match l.iter().find(|&&i| i >= feature_layers) {
                Some(bad) => Err(format!(
                    "layer {bad} does not exist: this model has features F_0..F_{} ({} blocks)",
                    feature_layers - 1,
                    feature_layers - 1
                )),
                None => Ok(l.clone()),
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// AdamW on a free perturbation δ with clamp re-parameterisation (the paper's optimiser).
    Adamw,
    /// Projected sign gradient descent.
    Pgd,
    /// Momentum iterative FGSM: momentum on the L1-normalised gradient, then a sign step.
    Mifgsm,
}

/// Where the perturbation starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Init {
    Zero,
    /// Uniform in the ε-ball, seeded per image.
    Random,
    /// Earlier adversarial images in a directory, projected into the ε-ball.
    From(PathBuf),
}

impl Init {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "zero" => Ok(Init::Zero),
            "random" => Ok(Init::Random),
            _ => match s.strip_prefix("from:") {
                Some(dir) if !dir.is_empty() => Ok(Init::From(PathBuf::from(dir))),
                _ => Err(format!(
                    "unknown start '{s}': use zero, random or from:<DIR>"
                )),
            },
        }
    }
}

/// The size the model sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Resolution {
    /// The image's own size, cropped to whole patches.
    Native,
    /// The whole image resized (bicubic) to N×N.
    Fixed(usize),
}

impl Resolution {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "native" {
            return Ok(Resolution::Native);
        }
        match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Resolution::Fixed(n)),
            _ => Err(format!(
                "'{s}' is not a resolution: use native or a side length in pixels such as 224"
            )),
        }
    }
}

/// Every setting of one attack. Pixel quantities are in [0, 1] units.
#[derive(Clone, Debug, PartialEq)]
pub struct AttackSettings {
    pub loss: LossKind,
    pub layers: LayerSelection,
    pub tokens: TokenSelection,
    pub optimizer: OptimizerKind,
    pub steps: usize,
    pub eps: f32,
    /// PGD / MI-FGSM step α.
    pub step_size: f32,
    /// AdamW learning rate.
    pub lr: f32,
    /// AdamW decoupled weight decay on δ.
    pub weight_decay: f32,
    /// MI-FGSM momentum μ.
    pub momentum: f32,
    pub init: Init,
    pub seed: u64,
    pub resolution: Resolution,
    /// Per-step scale ratio range [lo, hi), or `None` for no dynamic scale.
    pub dynamic_scale: Option<(f32, f32)>,
}

/// Named bundles of settings; explicit flags override them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// The official PRM setting: AdamW lr 0.5/255, wd 0.01, 250 steps, ε 8/255, native
    /// resolution, dynamic scale U[0.5, 1), zero start, all layers, all tokens.
    Paper,
    /// A fast projected-gradient setting: 10 sign steps of 2/255, random start, no dynamic scale.
    Pgd,
}

impl Preset {
    pub fn settings(self) -> AttackSettings {
        let base = AttackSettings {
            loss: LossKind::Prm,
            layers: LayerSelection::All,
            tokens: TokenSelection::All,
            optimizer: OptimizerKind::Adamw,
            steps: 250,
            eps: 8.0 / 255.0,
            step_size: 2.0 / 255.0,
            lr: 0.5 / 255.0,
            weight_decay: 0.01,
            momentum: 1.0,
            init: Init::Zero,
            seed: 0,
            resolution: Resolution::Native,
            dynamic_scale: Some((0.5, 1.0)),
        };
        match self {
            Preset::Paper => base,
            Preset::Pgd => AttackSettings {
                optimizer: OptimizerKind::Pgd,
                steps: 10,
                init: Init::Random,
                dynamic_scale: None,
                ..base
            },
        }
    }
}

impl AttackSettings {
    /// Rejects settings that cannot describe a sensible attack, with a message saying what to do.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.eps > 0.0 && self.eps <= 1.0) {
            return Err(format!(
                "--eps {} is outside (0, 1]; pixel values are in [0, 1], e.g. --eps 8/255",
                self.eps
            ));
        }
        // Zero steps save the projected start: with a random start that is the uniform-noise
        // baseline, with from:<DIR> a re-projection of earlier images. From a zero start it
        // would save the clean image, which is surely a mistake.
        if self.steps == 0 && self.init == Init::Zero {
            return Err(
                "--steps must be at least 1 (--steps 0 is allowed only with --init \
                        random, the uniform-noise baseline, or --init from:<DIR>)"
                    .into(),
            );
        }
        for (name, v) in [("--step-size", self.step_size), ("--lr", self.lr)] {
            if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                return Err(format!(
                    "{name} {v} is outside (0, 1]; pixel values are in [0, 1], e.g. 2/255"
                ));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!(
                "--weight-decay {} must be a non-negative number",
                self.weight_decay
            ));
        }
        if !(self.momentum.is_finite() && self.momentum >= 0.0) {
            return Err(format!(
                "--momentum {} must be a non-negative number",
                self.momentum
            ));
        }
        if let Some((lo, hi)) = self.dynamic_scale {
            if !(lo > 0.0 && lo < hi && hi <= 1.0) {
                return Err(format!(
                    "--dynamic-scale {lo},{hi} must satisfy 0 < lo < hi <= 1"
                ));
            }
        }
        Ok(())
    }

    /// Rejects, before any work, a fixed working size (`--resolution N`) that the model cannot
    /// take ([`check_fixed_size`]). `budget_flag` names the flag that sets `max_pixels`.
    pub fn check_working_size(
        &self,
        patch: usize,
        max_pixels: u64,
        budget_flag: Option<&str>,
    ) -> Result<(), String> {
        match self.resolution {
            Resolution::Fixed(n) => check_fixed_size(n, patch, max_pixels, budget_flag),
            Resolution::Native => Ok(()),
        }
    }
}

/// Rejects a fixed working size `--resolution n` smaller than one of the model's `patch`-pixel
/// patches (every image would fail), or larger than `max_pixels` pixels (the working copies of
/// one image alone would take n² × 12 bytes several times over, and an allocation that fails
/// aborts the process). `budget_flag` names the flag that sets `max_pixels`, when there is one.
pub fn check_fixed_size(
    n: usize,
    patch: usize,
    max_pixels: u64,
    budget_flag: Option<&str>,
) -> Result<(), String> {
    if n < patch {
        return Err(format!(
            "--resolution {n} is smaller than one {patch}-pixel patch of this model"
        ));
    }
    let pixels = (n as u64).saturating_mul(n as u64);
    if pixels > max_pixels {
        return Err(format!(
            "--resolution {n} makes working images of {n}x{n} = {pixels} pixels, beyond the \
             budget of {max_pixels} pixels an image{}",
            budget_flag.map_or(String::new(), |f| format!(" ({f} raises it)"))
        ));
    }
    Ok(())
}
