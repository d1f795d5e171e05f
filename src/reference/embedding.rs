//! Patch embedding: normalise, cut into p×p patches (im2col), project (plus the convolution's
//! bias, when it has one), prepend CLS (when the tower has a class token), add position.
//!
//! Pixels beyond the last whole patch are dropped, exactly as a stride-p convolution drops them;
//! their input gradient is therefore zero.

use super::linalg::{matmul_nn, matmul_nt, MatRef};
use crate::model::{Linear, VisionConfig};

/// The patch grid an image of `height × width` pixels produces.
pub fn patch_grid(height: usize, width: usize, patch: usize) -> (usize, usize) {
    (height / patch, width / patch)
}

/// Normalised patches `[gh·gw, 3·p·p]`, each flattened as (channel, row, column).
fn im2col(image: &[f32], height: usize, width: usize, cfg: &VisionConfig) -> Vec<f32> {
    let p = cfg.patch;
    let (gh, gw) = patch_grid(height, width, p);
    let cols = 3 * p * p;
    let mut patches = vec![0.0f32; gh * gw * cols];
    for (n, row) in patches.chunks_mut(cols).enumerate() {
        let (i, j) = (n / gw, n % gw);
        for c in 0..3 {
            let inv_std = 1.0 / cfg.std[c];
            for r in 0..p {
                let src = c * height * width + (i * p + r) * width + j * p;
                let dst = c * p * p + r * p;
                for s in 0..p {
                    row[dst + s] = (image[src + s] - cfg.mean[c]) * inv_std;
                }
            }
        }
    }
    patches
}

/// Tokens `[c + gh·gw, D]`: `[CLS; patches · Wᵀ + b] + pos`, where `c` is 1 with a class
/// embedding and 0 without (SigLIP: the patches alone), and `pos` is already interpolated to
/// the grid (`[c + gh·gw, D]`).
pub fn embed(
    image: &[f32],
    height: usize,
    width: usize,
    cfg: &VisionConfig,
    patch_embed: &Linear,
    class_embedding: Option<&[f32]>,
    pos: &[f32],
) -> Vec<f32> {
    let (gh, gw) = patch_grid(height, width, cfg.patch);
    let (n, d) = (gh * gw, cfg.width);
    let lead = usize::from(class_embedding.is_some());
    assert_eq!(
        image.len(),
        3 * height * width,
        "image buffer does not match {height}x{width}"
    );
    assert_eq!(
        pos.len(),
        (n + lead) * d,
        "position embedding does not match the {gh}x{gw} grid"
    );
    let patches = im2col(image, height, width, cfg);
    let mut tokens = vec![0.0f32; (n + lead) * d];
    let w = MatRef::new(&patch_embed.weight, d, 3 * cfg.patch * cfg.patch);
    matmul_nt(
        MatRef::new(&patches, n, w.cols),
        w,
        &mut tokens[lead * d..],
        false,
    );
    if let Some(bias) = &patch_embed.bias {
        for row in tokens[lead * d..].chunks_exact_mut(d) {
            row.iter_mut().zip(bias).for_each(|(t, b)| *t += b);
        }
    }
    if let Some(cls) = class_embedding {
        tokens[..d].copy_from_slice(cls);
    }
    tokens.iter_mut().zip(pos).for_each(|(t, p)| *t += p);
    tokens
}

/// Input-pixel gradient of [`embed`]: `d_tokens [c + gh·gw, D]` → `d_image [3, H, W]` (zero
/// in dropped pixels). The CLS row (`c` = [`VisionConfig::class_tokens`]), the bias and the
/// position embedding have no pixel path.
pub fn embed_backward(
    d_tokens: &[f32],
    height: usize,
    width: usize,
    cfg: &VisionConfig,
    patch_embed: &Linear,
) -> Vec<f32> {
    let p = cfg.patch;
    let (gh, gw) = patch_grid(height, width, p);
    let (n, d, cols) = (gh * gw, cfg.width, 3 * p * p);
    let lead = cfg.class_tokens();
    let mut d_patches = vec![0.0f32; n * cols];
    matmul_nn(
        MatRef::new(&d_tokens[lead * d..], n, d),
        MatRef::new(&patch_embed.weight, d, cols),
        &mut d_patches,
        false,
    );
    let mut d_image = vec![0.0f32; 3 * height * width];
    for (idx, row) in d_patches.chunks(cols).enumerate() {
        let (i, j) = (idx / gw, idx % gw);
        for c in 0..3 {
            let inv_std = 1.0 / cfg.std[c];
            for r in 0..p {
                let dst = c * height * width + (i * p + r) * width + j * p;
                let src = c * p * p + r * p;
                for s in 0..p {
                    d_image[dst + s] = row[src + s] * inv_std;
                }
            }
        }
    }
    d_image
}
