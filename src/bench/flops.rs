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
    let (d, m, p) = (config.width as f64, config.mlp as f64, config.patch);
    let patches = ((height / p) * (width / p)) as f64;
    let t = patches + 1.0;
    let linear = 2.0 * t * (4.0 * d * d + 2.0 * d * m);
    let attention = 4.0 * t * t * d + 8.0 * t * t * d;
    let embed = 2.0 * patches * 3.0 * (p * p) as f64 * d;
    config.layers as f64 * (2.0 * linear + attention) + 2.0 * embed
}

/// FLOPs of one forward pass alone (clean features) on one image.
pub fn forward_flops(config: &VisionConfig, height: usize, width: usize) -> f64 {
    let (d, m, p) = (config.width as f64, config.mlp as f64, config.patch);
    let patches = ((height / p) * (width / p)) as f64;
    let t = patches + 1.0;
    let linear = 2.0 * t * (4.0 * d * d + 2.0 * d * m);
    let attention = 4.0 * t * t * d;
    let embed = 2.0 * patches * 3.0 * (p * p) as f64 * d;
    config.layers as f64 * (linear + attention) + embed
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
    fn pixels_past_the_last_patch_add_nothing() {
        let c = builtin_config("vit-b-16").unwrap();
        assert_eq!(step_flops(&c, 224, 224), step_flops(&c, 239, 230));
    }
}
