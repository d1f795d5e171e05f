//! The analytic FLOP count of an attack step, shared with `tools/torch_prm.py` so that both
//! sides of a comparison divide by the same number.
//!
//! One step on one image is a forward pass and the input-gradient backward (no weight
//! gradient is ever formed). Counted: every matrix product, as 2 FLOPs per multiply-add.
//! - linear layers: 2·T·(4D² + 2DM) forward (q, k, v, out, fc1, fc2), the same again for dX;
//! - attention: 4·T²·D forward (S = QKᵀ and PV), 8·T²·D backward (dV, dP, dQ, dK);
//! - patch embedding: 2·P·3p²·D forward and the same for its dX.
//!
//! LayerNorm, activations, softmax, resize and the loss are left out: they are memory-bound
//! and small next to the products. ViT-B/16 at 224 px: ≈ 35 GFLOP forward + 37 backward.

use crate::model::VisionConfig;

/// FLOPs of one forward + input-gradient backward on one `height × width` image.
pub fn step_flops(config: &VisionConfig, height: usize, width: usize) -> f64 {
    step_flops_through(config, config.layers, height, width)
}

/// [`step_flops`] for a loss that reads no layer past F_`blocks`: the engines run (and
/// differentiate) the first `blocks` blocks only.
pub fn step_flops_through(
    config: &VisionConfig,
    blocks: usize,
    height: usize,
    width: usize,
) -> f64 {
    let f = PassFlops::new(config, height, width);
    blocks as f64 * (2.0 * f.linear + (f.attention_forward + f.attention_backward)) + 2.0 * f.embed
}

/// FLOPs of one forward pass alone (clean features) on one image.
pub fn forward_flops(config: &VisionConfig, height: usize, width: usize) -> f64 {
    forward_flops_through(config, config.layers, height, width)
}

/// [`forward_flops`] through the first `blocks` blocks.
pub fn forward_flops_through(
    config: &VisionConfig,
    blocks: usize,
    height: usize,
    width: usize,
) -> f64 {
    let f = PassFlops::new(config, height, width);
    blocks as f64 * (f.linear + f.attention_forward) + f.embed
}

/// One image's FLOPs by kind, as the module's doc counts them: the input-gradient backward
/// repeats the linear and embedding products (their dX) and has its own attention count.
struct PassFlops {
    /// One block's products, q, k, v, out, fc1 and fc2, in one direction.
    linear: f64,
    /// One block's S = QKᵀ and PV.
    attention_forward: f64,
    /// One block's dV, dP, dQ and dK (recomputing S is not counted).
    attention_backward: f64,
    /// The patch embedding's product.
    embed: f64,
}

impl PassFlops {
    fn new(config: &VisionConfig, height: usize, width: usize) -> Self {
        let (d, m, p) = (config.width as f64, config.mlp as f64, config.patch);
        let patches = ((height / p) * (width / p)) as f64;
        let t = patches + config.class_tokens() as f64;
        PassFlops {
            linear: 2.0 * t * (4.0 * d * d + 2.0 * d * m),
            attention_forward: 4.0 * t * t * d,
            attention_backward: 8.0 * t * t * d,
            embed: 2.0 * patches * 3.0 * (p * p) as f64 * d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::builtin_config;

    #[test]
    fn vit_b_16_at_224_is_about_72_gflop_per_step() {
        let c = builtin_config("vit-b-16").unwrap();
        let f = forward_flops(&c, 224, 224) / 1e9;
        let s = step_flops(&c, 224, 224) / 1e9;
        assert!((34.0..36.5).contains(&f), "forward {f} GFLOP");
        assert!((70.0..74.0).contains(&s), "step {s} GFLOP");
    }

    #[test]
    fn a_shallow_loss_counts_its_blocks_only() {
        let c = builtin_config("vit-b-16").unwrap();
        let (s, f) = (step_flops(&c, 224, 224), forward_flops(&c, 224, 224));
        let (s0, f0) = (
            step_flops_through(&c, 0, 224, 224),
            forward_flops_through(&c, 0, 224, 224),
        );
        let (s6, f6) = (
            step_flops_through(&c, 6, 224, 224),
            forward_flops_through(&c, 6, 224, 224),
        );
        assert_eq!(step_flops_through(&c, 12, 224, 224), s);
        assert!(((s6 - s0) * 2.0 - (s - s0)).abs() < 1.0);
        assert!(((f6 - f0) * 2.0 - (f - f0)).abs() < 1.0);
    }

    #[test]
    fn pixels_past_the_last_patch_add_nothing() {
        let c = builtin_config("vit-b-16").unwrap();
        assert_eq!(step_flops(&c, 224, 224), step_flops(&c, 239, 230));
    }
}
