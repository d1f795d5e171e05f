//! Tests of the row-wise kernels (kernels/layernorm.cu, activation.cu, embed.cu) against their
//! reference twins in `src/reference/`, on the simulator always and on CUDA when a device is
//! present ("skipped: no CUDA device" otherwise).
//!
//! Inputs are fresh random data, outputs are poisoned (NaN) before every launch, sizes are odd
//! (50, 197, 1201 rows; images whose sides are not multiples of the patch; mixed-size batches).
//!
//! Tolerances (fp32 kernels against the f64-accumulating reference):
//! - LayerNorm forward and backward, activation backward: `|got − want| ≤ 1e-5 · max(|want|,
//!   rms(want row))` — relative, with the row's rms as the floor where an element of the row is
//!   close to zero (LayerNorm backward subtracts means, so its small elements are only accurate to
//!   the row's scale).
//! - mean, rstd, activation forward: `≤ 1e-5 · max(|want|, 1e-3)`.
//! - patchify, assemble, CLS drop, col2im: bit-exact against plain-Rust twins of the reference.
//! - bf16 storage variants (LayerNorm, activation), against the reference run on the
//!   bf16-rounded inputs: `≤ 2⁻⁷ · max(|want|, rms(want row))` (one or two bf16 roundings).
//! - full patch embedding (kernels + device GEMM) against `reference::embedding::{embed,
//!   embed_backward}`: `1e-5 · max(|want|, rms(want row))` (the GEMMs sum in another order).

use crate::common;

use common::devices;
use common::kernel::Rng;

use half::bf16;
use prm::gpu::gemm::{matmul_f32, MatmulShape};
use prm::gpu::kernels::embed::PackedImages;
use prm::gpu::kernels::{activation, embed, layernorm};
use prm::gpu::{Buffer, Device};
use prm::model::{Activation, LayerNormWeights, Linear, Pooling, VisionConfig};
use prm::reference::{embedding, ops};

fn poisoned(dev: &Device, len: usize) -> Buffer<f32> {
    let mut b = dev.alloc::<f32>(len).unwrap();
    dev.poison(&mut b).unwrap();
    b
}

/// Checks `|got − want| ≤ rel · max(|want|, floor_i)` elementwise, with `floor_i` the rms of the
/// element's row (`cols` wide) when `row_floor`, else `abs_floor`. Returns the worst ratio
/// `err / max(|want|, floor)`.
fn check(
    what: &str,
    got: &[f32],
    want: &[f32],
    cols: usize,
    rel: f64,
    row_floor: bool,
    abs_floor: f64,
) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (r, (g, w)) in got.chunks(cols).zip(want.chunks(cols)).enumerate() {
        let floor = if row_floor {
            (w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64).sqrt()
        } else {
            abs_floor
        };
        for (c, (&g, &w)) in g.iter().zip(w).enumerate() {
            assert!(
                g.is_finite(),
                "{what}: non-finite {g} at [{r}, {c}] (want {w})"
            );
            let scale = (w as f64).abs().max(floor).max(1e-30);
            let ratio = (g as f64 - w as f64).abs() / scale;
            assert!(
                ratio <= rel,
                "{what}: [{r}, {c}] got {g}, want {w} (error {:.3e} of scale {scale:.3e}, limit {rel:e})",
                (g as f64 - w as f64).abs()
            );
            worst = worst.max(ratio);
        }
    }
    worst
}

fn exact(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}: element {i} got {g}, want {w}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// Widths on both sides of the backward kernels' 768-wide and 1024-wide register variants,
/// and past them (streamed rows).
const LN_SHAPES: [(usize, usize); 8] = [
    (50, 64),
    (197, 100),
    (197, 768),
    (1201, 768),
    (197, 128),
    (50, 769),
    (50, 1024),
    (50, 1280),
];

fn ln_weights(rng: &mut Rng, dim: usize) -> LayerNormWeights {
    LayerNormWeights {
        weight: rng.vec(dim, 0.5, 1.5),
        bias: rng.vec(dim, -0.3, 0.3),
    }
}

/// Rows with a per-row offset and scale, so the mean is far from 0 and the spread varies.
fn ln_input(rng: &mut Rng, rows: usize, dim: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(rows * dim);
    for _ in 0..rows {
        let (offset, scale) = (rng.uniform(-4.0, 4.0), rng.uniform(0.2, 3.0));
        x.extend((0..dim).map(|_| offset + scale * rng.uniform(-1.0, 1.0)));
    }
    x
}

#[test]
fn layernorm_forward_matches_reference() {
    for dev in devices() {
        for (case, &(rows, dim)) in LN_SHAPES.iter().enumerate() {
            let mut rng = Rng::new(100 + case as u64);
            let x = ln_input(&mut rng, rows, dim);
            let ln = ln_weights(&mut rng, dim);
            let eps = 1e-5;
            let mut want = vec![0.0f32; rows * dim];
            let stats = ops::layer_norm(&x, dim, &ln, eps, &mut want);

            let xb = dev.upload(&x).unwrap();
            let (g, b) = (
                dev.upload(&ln.weight).unwrap(),
                dev.upload(&ln.bias).unwrap(),
            );
            let mut y = poisoned(&dev, rows * dim);
            let (mut mean, mut rstd) = (poisoned(&dev, rows), poisoned(&dev, rows));
            layernorm::layernorm_forward_f32(
                &dev, &xb, &g, &b, &mut y, &mut mean, &mut rstd, rows, dim, eps,
            )
            .unwrap();
            let what = format!("{} layernorm forward {rows}x{dim}", dev.name());
            let wy = check(
                &what,
                &dev.download(&y).unwrap(),
                &want,
                dim,
                1e-5,
                true,
                0.0,
            );
            let want_mean: Vec<f32> = stats.iter().map(|s| s.0).collect();
            let want_rstd: Vec<f32> = stats.iter().map(|s| s.1).collect();
            let wm = check(
                &format!("{what} mean"),
                &dev.download(&mean).unwrap(),
                &want_mean,
                1,
                1e-5,
                false,
                1e-3,
            );
            let wr = check(
                &format!("{what} rstd"),
                &dev.download(&rstd).unwrap(),
                &want_rstd,
                1,
                1e-5,
                false,
                1e-3,
            );
            println!("{what}: worst relative error y {wy:.2e}, mean {wm:.2e}, rstd {wr:.2e}");
        }
    }
}

#[test]
fn layernorm_backward_matches_reference() {
    for dev in devices() {
        for (case, &(rows, dim)) in LN_SHAPES.iter().enumerate() {
            for accumulate in [false, true] {
                let mut rng = Rng::new(200 + 2 * case as u64 + accumulate as u64);
                let x = ln_input(&mut rng, rows, dim);
                let ln = ln_weights(&mut rng, dim);
                let dy = rng.vec(rows * dim, -1.0, 1.0);
                let dx0 = rng.vec(rows * dim, -0.5, 0.5);
                let mut scratch = vec![0.0f32; rows * dim];
                let stats = ops::layer_norm(&x, dim, &ln, 1e-5, &mut scratch);
                let mut want = dx0.clone();
                ops::layer_norm_backward(&x, &dy, dim, &ln, &stats, &mut want, accumulate);

                let xb = dev.upload(&x).unwrap();
                let dyb = dev.upload(&dy).unwrap();
                let g = dev.upload(&ln.weight).unwrap();
                let mean = dev
                    .upload(&stats.iter().map(|s| s.0).collect::<Vec<_>>())
                    .unwrap();
                let rstd = dev
                    .upload(&stats.iter().map(|s| s.1).collect::<Vec<_>>())
                    .unwrap();
                let mut dx = if accumulate {
                    dev.upload(&dx0).unwrap()
                } else {
                    poisoned(&dev, rows * dim)
                };
                layernorm::layernorm_backward_f32(
                    &dev, &xb, &dyb, &g, &mean, &rstd, &mut dx, rows, dim, accumulate,
                )
                .unwrap();
                let what = format!(
                    "{} layernorm backward {rows}x{dim} accumulate={accumulate}",
                    dev.name()
                );
                let w = check(
                    &what,
                    &dev.download(&dx).unwrap(),
                    &want,
                    dim,
                    1e-5,
                    true,
                    0.0,
                );
                println!("{what}: worst scale-relative error {w:.2e}");
            }
        }
    }
}

/// `layernorm_backward_f32_bf16copy` (the bf16 engine's LN2 backward): its fp32 `dx` is the
/// fp32 kernel's bit for bit, and its copy is that `dx` rounded to bf16, on every shape
/// (registers and streamed rows alike), accumulating or not.
#[test]
fn layernorm_backward_bf16_copy_is_the_f32_result_rounded() {
    for dev in devices() {
        for (case, &(rows, dim)) in LN_SHAPES.iter().enumerate() {
            for accumulate in [false, true] {
                let mut rng = Rng::new(900 + 2 * case as u64 + accumulate as u64);
                let x = ln_input(&mut rng, rows, dim);
                let ln = ln_weights(&mut rng, dim);
                let dy = rng.vec(rows * dim, -1.0, 1.0);
                let dx0 = rng.vec(rows * dim, -0.5, 0.5);
                let mut scratch = vec![0.0f32; rows * dim];
                let stats = ops::layer_norm(&x, dim, &ln, 1e-5, &mut scratch);
                let up = |v: &[f32]| dev.upload(v).unwrap();
                let (xb, dyb, g) = (up(&x), up(&dy), up(&ln.weight));
                let mean = up(&stats.iter().map(|s| s.0).collect::<Vec<_>>());
                let rstd = up(&stats.iter().map(|s| s.1).collect::<Vec<_>>());
                let start = |dev: &Device| {
                    if accumulate {
                        dev.upload(&dx0).unwrap()
                    } else {
                        poisoned(dev, rows * dim)
                    }
                };
                let mut want = start(&dev);
                layernorm::layernorm_backward_f32(
                    &dev, &xb, &dyb, &g, &mean, &rstd, &mut want, rows, dim, accumulate,
                )
                .unwrap();
                let mut got = start(&dev);
                let mut copy = poisoned_bf16(&dev, rows * dim);
                layernorm::layernorm_backward_f32_bf16copy(
                    &dev, &xb, &dyb, &g, &mean, &rstd, &mut got, &mut copy, rows, dim, accumulate,
                )
                .unwrap();
                let (want, got) = (dev.download(&want).unwrap(), dev.download(&got).unwrap());
                let what = format!(
                    "{} layernorm backward bf16 copy {rows}x{dim} accumulate={accumulate}",
                    dev.name()
                );
                assert!(
                    want.iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: fp32 dx differs from the fp32 kernel's"
                );
                assert_eq!(dev.download(&copy).unwrap(), to_bf16(&want), "{what}: copy");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activation

/// Every activation the kernels compute (activation.cu's `PRM_ACT_*`).
const ACTIVATIONS: [Activation; 3] = [
    Activation::QuickGelu,
    Activation::Gelu,
    Activation::GeluTanh,
];

/// Columns that are multiples of 8 take the kernels' 8-wide path; 75 takes the one-element path
/// (and leaves the backward a tail of n % 8 = 7).
const ACT_SHAPES: [(usize, usize); 4] = [(50, 64), (197, 768), (1201, 96), (197, 75)];

#[test]
fn bias_activation_forward_matches_reference() {
    for dev in devices() {
        for act in ACTIVATIONS {
            for (case, &(rows, cols)) in ACT_SHAPES.iter().enumerate() {
                let mut rng = Rng::new(300 + case as u64);
                let x = rng.vec(rows * cols, -7.0, 7.0);
                let bias = rng.vec(cols, -1.0, 1.0);
                let want_pre: Vec<f32> = x
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v + bias[i % cols])
                    .collect();
                let mut want = want_pre.clone();
                ops::activation(act, &mut want);

                let xb = dev.upload(&x).unwrap();
                let bb = dev.upload(&bias).unwrap();
                let what = format!("{} {act:?} forward {rows}x{cols}", dev.name());

                // Out of place, bias fused, pre saved.
                let mut pre = poisoned(&dev, rows * cols);
                let mut out = poisoned(&dev, rows * cols);
                activation::bias_activation_forward_f32(
                    &dev,
                    act,
                    &xb,
                    Some(&bb),
                    Some(&mut pre),
                    &mut out,
                    rows,
                    cols,
                )
                .unwrap();
                exact(
                    &format!("{what} pre"),
                    &dev.download(&pre).unwrap(),
                    &want_pre,
                );
                let w1 = check(
                    &what,
                    &dev.download(&out).unwrap(),
                    &want,
                    cols,
                    1e-5,
                    false,
                    1e-3,
                );

                // In place, bias fused, pre saved.
                let mut h = dev.upload(&x).unwrap();
                let mut pre = poisoned(&dev, rows * cols);
                activation::bias_activation_inplace_f32(
                    &dev,
                    act,
                    &mut h,
                    Some(&bb),
                    Some(&mut pre),
                    rows,
                    cols,
                )
                .unwrap();
                exact(
                    &format!("{what} in place pre"),
                    &dev.download(&pre).unwrap(),
                    &want_pre,
                );
                check(
                    &format!("{what} in place"),
                    &dev.download(&h).unwrap(),
                    &want,
                    cols,
                    1e-5,
                    false,
                    1e-3,
                );

                // No bias (added by the GEMM), no pre.
                let preb = dev.upload(&want_pre).unwrap();
                let mut out = poisoned(&dev, rows * cols);
                activation::bias_activation_forward_f32(
                    &dev, act, &preb, None, None, &mut out, rows, cols,
                )
                .unwrap();
                check(
                    &format!("{what} no bias"),
                    &dev.download(&out).unwrap(),
                    &want,
                    cols,
                    1e-5,
                    false,
                    1e-3,
                );
                println!("{what}: worst relative error {w1:.2e}");
            }
        }
    }
}

#[test]
fn activation_backward_matches_reference() {
    for dev in devices() {
        for act in ACTIVATIONS {
            for (case, &(rows, cols)) in ACT_SHAPES.iter().enumerate() {
                let mut rng = Rng::new(400 + case as u64);
                let pre = rng.vec(rows * cols, -7.0, 7.0);
                let dy = rng.vec(rows * cols, -1.0, 1.0);
                let mut want = dy.clone();
                ops::activation_backward(act, &pre, &mut want);

                let preb = dev.upload(&pre).unwrap();
                let dyb = dev.upload(&dy).unwrap();
                let what = format!("{} {act:?} backward {rows}x{cols}", dev.name());
                let mut dx = poisoned(&dev, rows * cols);
                activation::activation_backward_f32(&dev, act, &preb, &dyb, &mut dx, rows, cols)
                    .unwrap();
                let w = check(
                    &what,
                    &dev.download(&dx).unwrap(),
                    &want,
                    cols,
                    1e-5,
                    true,
                    0.0,
                );

                let mut d = dev.upload(&dy).unwrap();
                activation::activation_backward_inplace_f32(&dev, act, &preb, &mut d, rows, cols)
                    .unwrap();
                check(
                    &format!("{what} in place"),
                    &dev.download(&d).unwrap(),
                    &want,
                    cols,
                    1e-5,
                    true,
                    0.0,
                );
                println!("{what}: worst scale-relative error {w:.2e}");
            }
        }
    }
}

/// The tanh GELU's polynomial overflows f32 far out (2u ∝ z³ from |z| ≈ 1.2e13, z² from
/// 1.8e19): there the kernels still give the function (z, or −0) and its derivative (1, or 0)
/// as the reference does in f64, on the 8-wide and the one-element paths, not ∞ · 0 = NaN.
#[test]
fn tanh_gelu_stays_finite_where_its_polynomial_overflows() {
    let act = Activation::GeluTanh;
    let far = [1e12f32, 1e13, 2e13, 1e19, 1e20, 1e30, f32::MAX];
    // 56 values: whole groups of 8 and whole launches of 7.
    let z: Vec<f32> = far.iter().flat_map(|&v| [v, -v]).cycle().take(56).collect();
    let n = z.len();
    let mut want = z.clone();
    ops::activation(act, &mut want);
    let mut want_dx = vec![1.0f32; n];
    ops::activation_backward(act, &z, &mut want_dx);
    assert!(
        want.iter().zip(&z).all(|(&a, &v)| a == v.max(0.0))
            && want_dx == z.iter().map(|&v| f32::from(v > 0.0)).collect::<Vec<_>>(),
        "the reference: {want:?} {want_dx:?}"
    );
    for dev in devices() {
        let zb = dev.upload(&z).unwrap();
        let ones = dev.upload(&vec![1.0f32; n]).unwrap();
        for cols in [8, 7] {
            let mut out = poisoned(&dev, n);
            <f32 as ActivationStorage>::forward(&dev, act, &zb, &mut out, n / cols, cols);
            assert_eq!(
                dev.download(&out).unwrap(),
                want,
                "{} forward, rows of {cols}",
                dev.name()
            );
        }
        let grouped = <f32 as ActivationStorage>::backward(&dev, act, &zb, &ones);
        assert_eq!(grouped, want_dx, "{} backward, groups of 8", dev.name());
        let mut single = Vec::with_capacity(n);
        for zc in z.chunks(7) {
            let ones = dev.upload(&vec![1.0f32; zc.len()]).unwrap();
            single.extend(<f32 as ActivationStorage>::backward(
                &dev,
                act,
                &dev.upload(zc).unwrap(),
                &ones,
            ));
        }
        assert_eq!(
            single,
            want_dx,
            "{} backward, one element at a time",
            dev.name()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Patch embedding

/// Mixed-size batches: sides not multiples of the patch, one image of 197 tokens at p = 16.
/// (patch, width, image sizes).
type Batch = (usize, usize, &'static [(usize, usize)]);

const BATCHES: [Batch; 2] = [
    (16, 64, &[(37, 53), (64, 64), (30, 97), (224, 230)]),
    (14, 96, &[(37, 53), (64, 64), (30, 97)]),
];

fn vision_config(patch: usize, width: usize) -> VisionConfig {
    VisionConfig {
        width,
        layers: 1,
        heads: 1,
        patch,
        grid: 7,
        class_token: true,
        mlp: 4 * width,
        embed_dim: None,
        activation: Activation::QuickGelu,
        ln_eps: 1e-5,
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        pooling: Pooling::ClassToken,
    }
}

/// Plain-Rust twin of the reference im2col over a packed batch.
fn im2col_twin(images: &[f32], packing: &PackedImages, cfg: &VisionConfig) -> Vec<f32> {
    let p = packing.patch;
    let cols = 3 * p * p;
    let mut out = vec![0.0f32; packing.total_patches * cols];
    for m in &packing.images {
        let img = &images[m.pixel_offset..m.pixel_offset + m.pixels()];
        for n in 0..m.patches() {
            let (a, b) = (n / m.grid_w, n % m.grid_w);
            let row = &mut out[(m.patch_offset + n) * cols..][..cols];
            for c in 0..3 {
                let inv_std = 1.0 / cfg.std[c];
                for r in 0..p {
                    for s in 0..p {
                        let v = img[c * m.height * m.width + (a * p + r) * m.width + b * p + s];
                        row[c * p * p + r * p + s] = (v - cfg.mean[c]) * inv_std;
                    }
                }
            }
        }
    }
    out
}

/// Plain-Rust twin of the reference col2im (zero in dropped pixels).
fn col2im_twin(d_patches: &[f32], packing: &PackedImages, cfg: &VisionConfig) -> Vec<f32> {
    let p = packing.patch;
    let cols = 3 * p * p;
    let mut out = vec![0.0f32; packing.total_pixels];
    for m in &packing.images {
        let img = &mut out[m.pixel_offset..m.pixel_offset + m.pixels()];
        for n in 0..m.patches() {
            let (a, b) = (n / m.grid_w, n % m.grid_w);
            let row = &d_patches[(m.patch_offset + n) * cols..][..cols];
            for c in 0..3 {
                let inv_std = 1.0 / cfg.std[c];
                for r in 0..p {
                    for s in 0..p {
                        img[c * m.height * m.width + (a * p + r) * m.width + b * p + s] =
                            row[c * p * p + r * p + s] * inv_std;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn packed_images_layout() {
    let sizes = [(37, 53), (64, 64), (30, 97)];
    let packing = PackedImages::new(&sizes, 16);
    assert_eq!(packing.len(), 3);
    assert_eq!(packing.total_pixels, 3 * (37 * 53 + 64 * 64 + 30 * 97));
    assert_eq!(packing.total_patches, 2 * 3 + 4 * 4 + 6);
    assert_eq!(packing.total_tokens, 28 + 3);
    // Per image: pixel offset, H, W, gh, gw, patch offset, token offset, class tokens.
    #[rustfmt::skip]
    let table = vec![
        0, 37, 53, 2, 3, 0, 0, 1,
        3 * 37 * 53, 64, 64, 4, 4, 6, 7, 1,
        3 * (37 * 53 + 64 * 64), 30, 97, 1, 6, 22, 24, 1,
    ];
    assert_eq!(packing.table(), table);
    assert_eq!(packing.cu_seqlens(), vec![0, 7, 24, 31]);
    assert_eq!(packing.patch_cols(), 768);

    // Without a class token the tokens are the patches.
    let bare = PackedImages::with_class_tokens(&sizes, 16, 0);
    assert_eq!(bare.total_tokens, 28);
    #[rustfmt::skip]
    let table = vec![
        0, 37, 53, 2, 3, 0, 0, 0,
        3 * 37 * 53, 64, 64, 4, 4, 6, 6, 0,
        3 * (37 * 53 + 64 * 64), 30, 97, 1, 6, 22, 22, 0,
    ];
    assert_eq!(bare.table(), table);
    assert_eq!(bare.cu_seqlens(), vec![0, 6, 22, 28]);
}

#[test]
fn embed_kernels_match_twins() {
    for dev in devices() {
        // With a class token (CLIP) and without one (SigLIP: the tokens are the patches).
        for (case, (class_tokens, &(patch, width, sizes))) in [1usize, 0]
            .into_iter()
            .flat_map(|c| BATCHES.iter().map(move |b| (c, b)))
            .enumerate()
        {
            let cfg = vision_config(patch, width);
            let packing = PackedImages::with_class_tokens(sizes, patch, class_tokens);
            let table = packing.upload_table(&dev).unwrap();
            let cols = packing.patch_cols();
            let mut rng = Rng::new(500 + case as u64);
            let what = format!(
                "{} p={patch} {sizes:?} class tokens {class_tokens}",
                dev.name()
            );

            // patchify
            let images = rng.vec(packing.total_pixels, 0.0, 1.0);
            let imb = dev.upload(&images).unwrap();
            let mut patches = poisoned(&dev, packing.total_patches * cols);
            embed::patchify_f32(
                &dev,
                &packing,
                &table,
                &imb,
                &mut patches,
                cfg.mean,
                cfg.std,
            )
            .unwrap();
            exact(
                &format!("{what} patchify"),
                &dev.download(&patches).unwrap(),
                &im2col_twin(&images, &packing, &cfg),
            );

            // assemble_tokens
            let pt = rng.vec(packing.total_patches * width, -1.0, 1.0);
            let cls = rng.vec(width, -1.0, 1.0);
            let pos = rng.vec(packing.total_tokens * width, -1.0, 1.0);
            let mut want = Vec::with_capacity(packing.total_tokens * width);
            for m in &packing.images {
                if class_tokens == 1 {
                    want.extend_from_slice(&cls);
                }
                want.extend_from_slice(
                    &pt[m.patch_offset * width..(m.patch_offset + m.patches()) * width],
                );
            }
            want.iter_mut().zip(&pos).for_each(|(t, p)| *t += p);
            let (ptb, clsb, posb) = (
                dev.upload(&pt).unwrap(),
                dev.upload(&cls).unwrap(),
                dev.upload(&pos).unwrap(),
            );
            let mut tokens = poisoned(&dev, packing.total_tokens * width);
            embed::assemble_tokens_f32(
                &dev,
                &packing,
                &table,
                &ptb,
                (class_tokens == 1).then_some(&clsb),
                &posb,
                &mut tokens,
                width,
            )
            .unwrap();
            exact(
                &format!("{what} assemble_tokens"),
                &dev.download(&tokens).unwrap(),
                &want,
            );

            // tokens_to_patch_grads
            let dt = rng.vec(packing.total_tokens * width, -1.0, 1.0);
            let mut want = Vec::with_capacity(packing.total_patches * width);
            for m in &packing.images {
                want.extend_from_slice(
                    &dt[(m.token_offset + class_tokens) * width
                        ..(m.token_offset + m.tokens()) * width],
                );
            }
            let dtb = dev.upload(&dt).unwrap();
            let mut dpt = poisoned(&dev, packing.total_patches * width);
            embed::tokens_to_patch_grads_f32(&dev, &packing, &table, &dtb, &mut dpt, width)
                .unwrap();
            exact(
                &format!("{what} tokens_to_patch_grads"),
                &dev.download(&dpt).unwrap(),
                &want,
            );

            // col2im
            let dp = rng.vec(packing.total_patches * cols, -1.0, 1.0);
            let dpb = dev.upload(&dp).unwrap();
            let mut dimg = poisoned(&dev, packing.total_pixels);
            embed::col2im_f32(&dev, &packing, &table, &dpb, &mut dimg, cfg.std).unwrap();
            exact(
                &format!("{what} col2im"),
                &dev.download(&dimg).unwrap(),
                &col2im_twin(&dp, &packing, &cfg),
            );
        }
    }
}

/// The whole patch embedding, kernels plus device GEMMs, against `reference::embedding`.
#[test]
fn embed_pipeline_matches_reference() {
    for dev in devices() {
        for (case, (class_tokens, &(patch, width, sizes))) in [1usize, 0]
            .into_iter()
            .flat_map(|c| BATCHES.iter().map(move |b| (c, b)))
            .enumerate()
        {
            let mut cfg = vision_config(patch, width);
            cfg.class_token = class_tokens == 1;
            let packing = PackedImages::with_class_tokens(sizes, patch, class_tokens);
            let table = packing.upload_table(&dev).unwrap();
            let cols = packing.patch_cols();
            let mut rng = Rng::new(600 + case as u64);
            let a = (3.0 / cols as f32).sqrt();
            let weight = Linear {
                weight: rng.vec(width * cols, -a, a),
                bias: None,
                out_features: width,
                in_features: cols,
            };
            let cls = rng.vec(width, -1.0, 1.0);
            let images = rng.vec(packing.total_pixels, 0.0, 1.0);
            let pos = rng.vec(packing.total_tokens * width, -1.0, 1.0);
            let d_tokens = rng.vec(packing.total_tokens * width, -1.0, 1.0);
            let what = format!(
                "{} p={patch} D={width} {sizes:?} class tokens {class_tokens}",
                dev.name()
            );

            let mut want_tokens = Vec::new();
            let mut want_dimg = Vec::new();
            for m in &packing.images {
                let img = &images[m.pixel_offset..m.pixel_offset + m.pixels()];
                let rows = m.token_offset * width..(m.token_offset + m.tokens()) * width;
                want_tokens.extend(embedding::embed(
                    img,
                    m.height,
                    m.width,
                    &cfg,
                    &weight,
                    (class_tokens == 1).then_some(&cls[..]),
                    &pos[rows.clone()],
                ));
                want_dimg.extend(embedding::embed_backward(
                    &d_tokens[rows],
                    m.height,
                    m.width,
                    &cfg,
                    &weight,
                ));
            }

            // forward
            let imb = dev.upload(&images).unwrap();
            let wb = dev.upload(&weight.weight).unwrap();
            let (clsb, posb) = (dev.upload(&cls).unwrap(), dev.upload(&pos).unwrap());
            let mut patches = poisoned(&dev, packing.total_patches * cols);
            embed::patchify_f32(
                &dev,
                &packing,
                &table,
                &imb,
                &mut patches,
                cfg.mean,
                cfg.std,
            )
            .unwrap();
            let mut pt = poisoned(&dev, packing.total_patches * width);
            let shape = MatmulShape {
                m: packing.total_patches,
                n: width,
                k: cols,
                b_transposed: true,
            };
            matmul_f32(&dev, shape, &patches, &wb, None, &mut pt, false).unwrap();
            let mut tokens = poisoned(&dev, packing.total_tokens * width);
            embed::assemble_tokens_f32(
                &dev,
                &packing,
                &table,
                &pt,
                (class_tokens == 1).then_some(&clsb),
                &posb,
                &mut tokens,
                width,
            )
            .unwrap();
            let wf = check(
                &format!("{what} embed"),
                &dev.download(&tokens).unwrap(),
                &want_tokens,
                width,
                1e-5,
                true,
                0.0,
            );

            // backward
            let dtb = dev.upload(&d_tokens).unwrap();
            let mut dpt = poisoned(&dev, packing.total_patches * width);
            embed::tokens_to_patch_grads_f32(&dev, &packing, &table, &dtb, &mut dpt, width)
                .unwrap();
            let mut dp = poisoned(&dev, packing.total_patches * cols);
            let shape = MatmulShape {
                m: packing.total_patches,
                n: cols,
                k: width,
                b_transposed: false,
            };
            matmul_f32(&dev, shape, &dpt, &wb, None, &mut dp, false).unwrap();
            let mut dimg = poisoned(&dev, packing.total_pixels);
            embed::col2im_f32(&dev, &packing, &table, &dp, &mut dimg, cfg.std).unwrap();
            let got = dev.download(&dimg).unwrap();
            // Dropped pixels must be exactly zero; the rest within tolerance of the reference.
            for (i, (&g, &w)) in got.iter().zip(&want_dimg).enumerate() {
                if w == 0.0 {
                    assert!(
                        g == 0.0,
                        "{what} embed backward: pixel {i} should be 0, got {g}"
                    );
                }
            }
            let wb_ = check(
                &format!("{what} embed backward"),
                &got,
                &want_dimg,
                1,
                1e-5,
                false,
                0.1,
            );
            println!("{what}: worst error forward {wf:.2e}, backward {wb_:.2e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 storage variants

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}
fn from_bf16(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}
fn poisoned_bf16(dev: &Device, len: usize) -> Buffer<bf16> {
    let mut b = dev.alloc::<bf16>(len).unwrap();
    dev.poison(&mut b).unwrap();
    b
}

const BF16_TOL: f64 = 1.0 / 128.0;

#[test]
fn layernorm_bf16_matches_reference() {
    for dev in devices() {
        // 768 and below run the `_d768` kernels; 1024 (ViT-L) and 1100 (streamed) the others.
        let shapes = [(197usize, 768usize), (50, 64), (13, 1024), (7, 1100)];
        for (case, &(rows, dim)) in shapes.iter().enumerate() {
            let mut rng = Rng::new(700 + case as u64);
            let x = from_bf16(&to_bf16(&ln_input(&mut rng, rows, dim)));
            let ln = ln_weights(&mut rng, dim);
            let mut want = vec![0.0f32; rows * dim];
            let stats = ops::layer_norm(&x, dim, &ln, 1e-5, &mut want);
            let what = format!("{} layernorm bf16 {rows}x{dim}", dev.name());

            let xb = dev.upload(&to_bf16(&x)).unwrap();
            let (g, b) = (
                dev.upload(&ln.weight).unwrap(),
                dev.upload(&ln.bias).unwrap(),
            );
            let mut y = poisoned_bf16(&dev, rows * dim);
            let (mut mean, mut rstd) = (poisoned(&dev, rows), poisoned(&dev, rows));
            layernorm::layernorm_forward_bf16(
                &dev, &xb, &g, &b, &mut y, &mut mean, &mut rstd, rows, dim, 1e-5,
            )
            .unwrap();
            let wy = check(
                &what,
                &from_bf16(&dev.download(&y).unwrap()),
                &want,
                dim,
                BF16_TOL,
                true,
                0.0,
            );
            let want_rstd: Vec<f32> = stats.iter().map(|s| s.1).collect();
            check(
                &format!("{what} rstd"),
                &dev.download(&rstd).unwrap(),
                &want_rstd,
                1,
                1e-5,
                false,
                1e-3,
            );

            for accumulate in [false, true] {
                let dy = from_bf16(&to_bf16(&rng.vec(rows * dim, -1.0, 1.0)));
                let dx0 = from_bf16(&to_bf16(&rng.vec(rows * dim, -0.5, 0.5)));
                let mut want = dx0.clone();
                ops::layer_norm_backward(&x, &dy, dim, &ln, &stats, &mut want, accumulate);
                let dyb = dev.upload(&to_bf16(&dy)).unwrap();
                let meanb = dev
                    .upload(&stats.iter().map(|s| s.0).collect::<Vec<_>>())
                    .unwrap();
                let rstdb = dev.upload(&want_rstd).unwrap();
                let mut dx = if accumulate {
                    dev.upload(&to_bf16(&dx0)).unwrap()
                } else {
                    poisoned_bf16(&dev, rows * dim)
                };
                layernorm::layernorm_backward_bf16(
                    &dev, &xb, &dyb, &g, &meanb, &rstdb, &mut dx, rows, dim, accumulate,
                )
                .unwrap();
                let w = check(
                    &format!("{what} backward accumulate={accumulate}"),
                    &from_bf16(&dev.download(&dx).unwrap()),
                    &want,
                    dim,
                    BF16_TOL,
                    true,
                    0.0,
                );
                println!("{what}: backward accumulate={accumulate} worst {w:.2e}");
            }
            println!("{what}: forward worst {wy:.2e}");
        }
    }
}

#[test]
fn activation_bf16_matches_reference() {
    for dev in devices() {
        for (act, (rows, cols)) in ACTIVATIONS
            .into_iter()
            .flat_map(|a| [(a, (197usize, 256usize)), (a, (31, 77))])
        {
            let mut rng = Rng::new(800 + cols as u64);
            let x = from_bf16(&to_bf16(&rng.vec(rows * cols, -7.0, 7.0)));
            let bias = rng.vec(cols, -1.0, 1.0);
            // pre is stored in bf16, and the activation is evaluated on the stored value.
            let want_pre: Vec<f32> = from_bf16(&to_bf16(
                &x.iter()
                    .enumerate()
                    .map(|(i, &v)| v + bias[i % cols])
                    .collect::<Vec<_>>(),
            ));
            let mut want = want_pre.clone();
            ops::activation(act, &mut want);
            let what = format!("{} {act:?} bf16 {rows}x{cols}", dev.name());

            let xb = dev.upload(&to_bf16(&x)).unwrap();
            let bb = dev.upload(&bias).unwrap();
            let mut pre = poisoned_bf16(&dev, rows * cols);
            let mut out = poisoned_bf16(&dev, rows * cols);
            activation::bias_activation_forward_bf16(
                &dev,
                act,
                &xb,
                Some(&bb),
                Some(&mut pre),
                &mut out,
                rows,
                cols,
            )
            .unwrap();
            exact(
                &format!("{what} pre"),
                &from_bf16(&dev.download(&pre).unwrap()),
                &want_pre,
            );
            let wf = check(
                &what,
                &from_bf16(&dev.download(&out).unwrap()),
                &want,
                cols,
                BF16_TOL,
                false,
                1e-3,
            );

            // Without `pre`, the activation sees the unrounded x + bias.
            let mut want_unrounded: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| v + bias[i % cols])
                .collect();
            ops::activation(act, &mut want_unrounded);
            let mut h = dev.upload(&to_bf16(&x)).unwrap();
            activation::bias_activation_inplace_bf16(
                &dev,
                act,
                &mut h,
                Some(&bb),
                None,
                rows,
                cols,
            )
            .unwrap();
            check(
                &format!("{what} in place"),
                &from_bf16(&dev.download(&h).unwrap()),
                &want_unrounded,
                cols,
                BF16_TOL,
                false,
                1e-3,
            );

            let dy = from_bf16(&to_bf16(&rng.vec(rows * cols, -1.0, 1.0)));
            let mut want_dx = dy.clone();
            ops::activation_backward(act, &want_pre, &mut want_dx);
            let dyb = dev.upload(&to_bf16(&dy)).unwrap();
            let mut dx = poisoned_bf16(&dev, rows * cols);
            activation::activation_backward_bf16(&dev, act, &pre, &dyb, &mut dx, rows, cols)
                .unwrap();
            let wb = check(
                &format!("{what} backward"),
                &from_bf16(&dev.download(&dx).unwrap()),
                &want_dx,
                cols,
                BF16_TOL,
                true,
                0.0,
            );
            let mut d = dev.upload(&to_bf16(&dy)).unwrap();
            activation::activation_backward_inplace_bf16(&dev, act, &pre, &mut d, rows, cols)
                .unwrap();
            check(
                &format!("{what} backward in place"),
                &from_bf16(&dev.download(&d).unwrap()),
                &want_dx,
                cols,
                BF16_TOL,
                true,
                0.0,
            );
            println!("{what}: worst forward {wf:.2e}, backward {wb:.2e}");
        }
    }
}

#[test]
fn embed_bf16_kernels_match_twins() {
    let r = |v: &[f32]| from_bf16(&to_bf16(v));
    for dev in devices() {
        for (case, &(patch, width, sizes)) in BATCHES.iter().enumerate() {
            let cfg = vision_config(patch, width);
            let packing = PackedImages::new(sizes, patch);
            let table = packing.upload_table(&dev).unwrap();
            let cols = packing.patch_cols();
            let mut rng = Rng::new(900 + case as u64);
            let what = format!("{} bf16 p={patch} {sizes:?}", dev.name());

            let images = rng.vec(packing.total_pixels, 0.0, 1.0);
            let imb = dev.upload(&images).unwrap();
            let mut patches = poisoned_bf16(&dev, packing.total_patches * cols);
            embed::patchify_bf16(
                &dev,
                &packing,
                &table,
                &imb,
                &mut patches,
                cfg.mean,
                cfg.std,
            )
            .unwrap();
            exact(
                &format!("{what} patchify"),
                &from_bf16(&dev.download(&patches).unwrap()),
                &r(&im2col_twin(&images, &packing, &cfg)),
            );

            let pt = r(&rng.vec(packing.total_patches * width, -1.0, 1.0));
            let cls = rng.vec(width, -1.0, 1.0);
            let pos = rng.vec(packing.total_tokens * width, -1.0, 1.0);
            let mut want = Vec::with_capacity(packing.total_tokens * width);
            for m in &packing.images {
                want.extend_from_slice(&cls);
                want.extend_from_slice(
                    &pt[m.patch_offset * width..(m.patch_offset + m.patches()) * width],
                );
            }
            want.iter_mut().zip(&pos).for_each(|(t, p)| *t += p);
            let ptb = dev.upload(&to_bf16(&pt)).unwrap();
            let (clsb, posb) = (dev.upload(&cls).unwrap(), dev.upload(&pos).unwrap());
            let mut tokens = poisoned_bf16(&dev, packing.total_tokens * width);
            embed::assemble_tokens_bf16(
                &dev,
                &packing,
                &table,
                &ptb,
                Some(&clsb),
                &posb,
                &mut tokens,
                width,
            )
            .unwrap();
            exact(
                &format!("{what} assemble_tokens"),
                &from_bf16(&dev.download(&tokens).unwrap()),
                &r(&want),
            );

            let dt = r(&rng.vec(packing.total_tokens * width, -1.0, 1.0));
            let mut want = Vec::with_capacity(packing.total_patches * width);
            for m in &packing.images {
                want.extend_from_slice(
                    &dt[(m.token_offset + 1) * width..(m.token_offset + m.tokens()) * width],
                );
            }
            let dtb = dev.upload(&to_bf16(&dt)).unwrap();
            let mut dpt = poisoned_bf16(&dev, packing.total_patches * width);
            embed::tokens_to_patch_grads_bf16(&dev, &packing, &table, &dtb, &mut dpt, width)
                .unwrap();
            exact(
                &format!("{what} tokens_to_patch_grads"),
                &from_bf16(&dev.download(&dpt).unwrap()),
                &want,
            );
            // fp32 gradient in, the patch GEMM's bf16 operand out: the gathered rows rounded.
            let dt32 = rng.vec(packing.total_tokens * width, -1.0, 1.0);
            let mut want = Vec::with_capacity(packing.total_patches * width);
            for m in &packing.images {
                want.extend_from_slice(
                    &dt32[(m.token_offset + 1) * width..(m.token_offset + m.tokens()) * width],
                );
            }
            let mut dpt = poisoned_bf16(&dev, packing.total_patches * width);
            let dt32b = dev.upload(&dt32).unwrap();
            embed::tokens_to_patch_grads_f32_bf16out(
                &dev, &packing, &table, &dt32b, &mut dpt, width,
            )
            .unwrap();
            assert_eq!(
                dev.download(&dpt).unwrap(),
                to_bf16(&want),
                "{what} tokens_to_patch_grads f32 → bf16"
            );

            let dp = r(&rng.vec(packing.total_patches * cols, -1.0, 1.0));
            let dpb = dev.upload(&to_bf16(&dp)).unwrap();
            let mut dimg = poisoned(&dev, packing.total_pixels);
            embed::col2im_bf16(&dev, &packing, &table, &dpb, &mut dimg, cfg.std).unwrap();
            exact(
                &format!("{what} col2im"),
                &dev.download(&dimg).unwrap(),
                &col2im_twin(&dp, &packing, &cfg),
            );
        }
    }
}

/// Repeated launches give bit-identical results (fixed-order reductions, no atomics).
#[test]
fn layernorm_is_deterministic() {
    for dev in devices() {
        let (rows, dim) = (1201, 768);
        let mut rng = Rng::new(1000);
        let x = dev.upload(&ln_input(&mut rng, rows, dim)).unwrap();
        let ln = ln_weights(&mut rng, dim);
        let dy = dev.upload(&rng.vec(rows * dim, -1.0, 1.0)).unwrap();
        let (g, b) = (
            dev.upload(&ln.weight).unwrap(),
            dev.upload(&ln.bias).unwrap(),
        );
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut y = poisoned(&dev, rows * dim);
            let (mut mean, mut rstd) = (poisoned(&dev, rows), poisoned(&dev, rows));
            layernorm::layernorm_forward_f32(
                &dev, &x, &g, &b, &mut y, &mut mean, &mut rstd, rows, dim, 1e-5,
            )
            .unwrap();
            let mut dx = poisoned(&dev, rows * dim);
            layernorm::layernorm_backward_f32(
                &dev, &x, &dy, &g, &mean, &rstd, &mut dx, rows, dim, false,
            )
            .unwrap();
            runs.push((dev.download(&y).unwrap(), dev.download(&dx).unwrap()));
        }
        exact("layernorm forward repeat", &runs[0].0, &runs[1].0);
        exact("layernorm backward repeat", &runs[0].1, &runs[1].1);
    }
}

/// The `_bf16out` activation variants (fp32 in, bf16 out) equal the fp32 kernels' results
/// rounded to bf16, bit for bit: same fp32 arithmetic, one rounding at the store.
#[test]
fn activation_bf16out_variants_round_the_fp32_kernels() {
    for dev in devices() {
        for act in ACTIVATIONS {
            for (case, &(rows, cols)) in [(197usize, 3072usize), (13, 37)].iter().enumerate() {
                let mut rng = Rng::new(900 + case as u64);
                let x = rng.vec(rows * cols, -7.0, 7.0);
                let bias = rng.vec(cols, -1.0, 1.0);
                let dy = rng.vec(rows * cols, -1.0, 1.0);
                let (xb, bb, dyb) = (
                    dev.upload(&x).unwrap(),
                    dev.upload(&bias).unwrap(),
                    dev.upload(&dy).unwrap(),
                );
                let what = format!("{} {act:?} bf16out {rows}x{cols}", dev.name());
                let n = rows * cols;
                let (mut pre32, mut out32) = (poisoned(&dev, n), poisoned(&dev, n));
                activation::bias_activation_forward_f32(
                    &dev,
                    act,
                    &xb,
                    Some(&bb),
                    Some(&mut pre32),
                    &mut out32,
                    rows,
                    cols,
                )
                .unwrap();
                let (mut pre, mut out) = (poisoned(&dev, n), poisoned_bf16(&dev, n));
                activation::bias_activation_forward_f32_bf16out(
                    &dev,
                    act,
                    &xb,
                    Some(&bb),
                    Some(&mut pre),
                    &mut out,
                    rows,
                    cols,
                )
                .unwrap();
                let want = to_bf16(&dev.download(&out32).unwrap());
                assert_eq!(dev.download(&out).unwrap(), want, "{what}: forward");
                exact(
                    &format!("{what} pre"),
                    &dev.download(&pre).unwrap(),
                    &dev.download(&pre32).unwrap(),
                );

                let mut dx32 = poisoned(&dev, n);
                activation::activation_backward_f32(&dev, act, &pre32, &dyb, &mut dx32, rows, cols)
                    .unwrap();
                let mut dx = poisoned_bf16(&dev, n);
                activation::activation_backward_f32_bf16out(
                    &dev, act, &pre, &dyb, &mut dx, rows, cols,
                )
                .unwrap();
                let want = to_bf16(&dev.download(&dx32).unwrap());
                assert_eq!(dev.download(&dx).unwrap(), want, "{what}: backward");
            }
        }
    }
}

/// `layernorm_forward_f32_bf16out` equals the fp32 kernel's output rounded to bf16, with the
/// same statistics, bit for bit.
#[test]
fn layernorm_bf16out_rounds_the_fp32_kernel() {
    for dev in devices() {
        for (case, &(rows, dim)) in [(197usize, 768usize), (13, 64), (5, 1030)]
            .iter()
            .enumerate()
        {
            let mut rng = Rng::new(950 + case as u64);
            let x = ln_input(&mut rng, rows, dim);
            let ln = ln_weights(&mut rng, dim);
            let xb = dev.upload(&x).unwrap();
            let (g, b) = (
                dev.upload(&ln.weight).unwrap(),
                dev.upload(&ln.bias).unwrap(),
            );
            let (mut y32, mut m32, mut r32) = (
                poisoned(&dev, rows * dim),
                poisoned(&dev, rows),
                poisoned(&dev, rows),
            );
            layernorm::layernorm_forward_f32(
                &dev, &xb, &g, &b, &mut y32, &mut m32, &mut r32, rows, dim, 1e-5,
            )
            .unwrap();
            let (mut y, mut m, mut r) = (
                poisoned_bf16(&dev, rows * dim),
                poisoned(&dev, rows),
                poisoned(&dev, rows),
            );
            layernorm::layernorm_forward_f32_bf16out(
                &dev, &xb, &g, &b, &mut y, &mut m, &mut r, rows, dim, 1e-5,
            )
            .unwrap();
            let what = format!("{} layernorm bf16out {rows}x{dim}", dev.name());
            assert_eq!(
                dev.download(&y).unwrap(),
                to_bf16(&dev.download(&y32).unwrap()),
                "{what}: y"
            );
            exact(
                &format!("{what} mean"),
                &dev.download(&m).unwrap(),
                &dev.download(&m32).unwrap(),
            );
            exact(
                &format!("{what} rstd"),
                &dev.download(&r).unwrap(),
                &dev.download(&r32).unwrap(),
            );
        }
    }
}

/// The engine's bf16 MLP: the bf16 forward with no bias and no `pre` (bf16 pre-activation in,
/// bf16 hidden out) and the bf16 backward (bf16 pre and dy, bf16 dx) equal the fp32 kernels run
/// on the widened bf16 values, rounded once to bf16, bit for bit, and track the reference
/// twins within one bf16 rounding. Their outputs may be longer than `[rows, cols]` (an operand
/// scratch): the tail stays untouched.
#[test]
fn activation_bf16_engine_path_rounds_the_fp32_kernels() {
    for dev in devices() {
        for act in ACTIVATIONS {
            for (case, &(rows, cols)) in [(197usize, 3072usize), (1201, 100), (13, 37)]
                .iter()
                .enumerate()
            {
                let mut rng = Rng::new(1300 + case as u64);
                let pre = from_bf16(&to_bf16(&rng.vec(rows * cols, -7.0, 7.0)));
                let dy = from_bf16(&to_bf16(&rng.vec(rows * cols, -1.0, 1.0)));
                let what = format!("{} {act:?} bf16 engine path {rows}x{cols}", dev.name());
                let n = rows * cols;
                let (pre32, dy32) = (dev.upload(&pre).unwrap(), dev.upload(&dy).unwrap());
                let (preb, dyb) = (
                    dev.upload(&to_bf16(&pre)).unwrap(),
                    dev.upload(&to_bf16(&dy)).unwrap(),
                );

                let mut out32 = poisoned(&dev, n);
                activation::bias_activation_forward_f32(
                    &dev, act, &pre32, None, None, &mut out32, rows, cols,
                )
                .unwrap();
                let mut out = poisoned_bf16(&dev, n + 5);
                activation::bias_activation_forward_bf16(
                    &dev, act, &preb, None, None, &mut out, rows, cols,
                )
                .unwrap();
                let got = dev.download(&out).unwrap();
                assert_eq!(
                    got[..n],
                    to_bf16(&dev.download(&out32).unwrap())[..],
                    "{what}: forward"
                );
                assert!(got[n..].iter().all(|v| v.is_nan()), "{what}: forward tail");
                let mut want = pre.clone();
                ops::activation(act, &mut want);
                let wf = check(
                    &what,
                    &from_bf16(&got[..n]),
                    &want,
                    cols,
                    BF16_TOL,
                    false,
                    1e-3,
                );

                let mut dx32 = poisoned(&dev, n);
                activation::activation_backward_f32(
                    &dev, act, &pre32, &dy32, &mut dx32, rows, cols,
                )
                .unwrap();
                let mut dx = poisoned_bf16(&dev, n + 5);
                activation::activation_backward_bf16(&dev, act, &preb, &dyb, &mut dx, rows, cols)
                    .unwrap();
                let got = dev.download(&dx).unwrap();
                assert_eq!(
                    got[..n],
                    to_bf16(&dev.download(&dx32).unwrap())[..],
                    "{what}: backward"
                );
                assert!(got[n..].iter().all(|v| v.is_nan()), "{what}: backward tail");
                let mut want_dx = dy.clone();
                ops::activation_backward(act, &pre, &mut want_dx);
                let wb = check(
                    &format!("{what} backward"),
                    &from_bf16(&got[..n]),
                    &want_dx,
                    cols,
                    BF16_TOL,
                    true,
                    0.0,
                );
                println!("{what}: worst forward {wf:.2e}, backward {wb:.2e}");
            }
        }
    }
}

/// Storage types of the activation kernels, for the path-agreement test below.
trait ActivationStorage: prm::gpu::Element + Copy {
    fn store(v: &[f32]) -> Vec<Self>;
    fn widen(v: Self) -> f32;
    fn forward(
        dev: &Device,
        act: Activation,
        x: &Buffer<Self>,
        out: &mut Buffer<Self>,
        rows: usize,
        cols: usize,
    );
    fn backward(dev: &Device, act: Activation, pre: &Buffer<Self>, dy: &Buffer<Self>) -> Vec<Self>;
}

impl ActivationStorage for f32 {
    fn store(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn widen(v: f32) -> f32 {
        v
    }
    fn forward(
        dev: &Device,
        act: Activation,
        x: &Buffer<f32>,
        out: &mut Buffer<f32>,
        r: usize,
        c: usize,
    ) {
        activation::bias_activation_forward_f32(dev, act, x, None, None, out, r, c).unwrap();
    }
    fn backward(dev: &Device, act: Activation, pre: &Buffer<f32>, dy: &Buffer<f32>) -> Vec<f32> {
        let mut dx = poisoned(dev, pre.len());
        activation::activation_backward_f32(dev, act, pre, dy, &mut dx, 1, pre.len()).unwrap();
        dev.download(&dx).unwrap()
    }
}

impl ActivationStorage for bf16 {
    fn store(v: &[f32]) -> Vec<bf16> {
        to_bf16(v)
    }
    fn widen(v: bf16) -> f32 {
        v.to_f32()
    }
    fn forward(
        dev: &Device,
        act: Activation,
        x: &Buffer<bf16>,
        out: &mut Buffer<bf16>,
        r: usize,
        c: usize,
    ) {
        activation::bias_activation_forward_bf16(dev, act, x, None, None, out, r, c).unwrap();
    }
    fn backward(dev: &Device, act: Activation, pre: &Buffer<bf16>, dy: &Buffer<bf16>) -> Vec<bf16> {
        let mut dx = poisoned_bf16(dev, pre.len());
        activation::activation_backward_bf16(dev, act, pre, dy, &mut dx, 1, pre.len()).unwrap();
        dev.download(&dx).unwrap()
    }
}

/// Pre-activations where the sigmoid-form activations' arithmetic has edges: every f32 around
/// the z where the sigmoid's denominator 1 + e^(−x) crosses 2^126 (the 8-wide path's reciprocal
/// is exact only below it), x = 1.702z for QuickGELU (z ≈ −51.31) and x = 2√(2/π)(z +
/// 0.044715z³) for the tanh GELU (z ≈ −10.00); a sweep of [−60, 60], the tails (where the tanh
/// GELU's z³ and z² overflow, and ±16, where its derivative caps z²), zeros, subnormals, ±∞ and
/// NaN, and ordinary values. A multiple of 56 long (whole groups of 8, whole launches of 7).
fn activation_edge_values() -> Vec<f32> {
    let mut z = Vec::new();
    let x_threshold = -126.0 * std::f64::consts::LN_2;
    let tanh_gelu_x =
        |z: f64| 2.0 * (2.0 / std::f64::consts::PI).sqrt() * (z + 0.044715 * z.powi(3));
    let (mut lo, mut hi) = (-20.0f64, 0.0f64); // x is increasing in z: bisect for x(z) = threshold
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if tanh_gelu_x(mid) < x_threshold {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    for threshold in [(x_threshold / 1.702) as f32, lo as f32] {
        let mut v = threshold;
        for _ in 0..1200 {
            v = f32::from_bits(v.to_bits() - 1); // towards zero: above the threshold
        }
        for _ in 0..2400 {
            z.push(v);
            v = f32::from_bits(v.to_bits() + 1);
        }
    }
    z.extend((0..2400).map(|i| -60.0 + 0.05 * i as f32));
    z.extend([
        0.0,
        -0.0,
        f32::from_bits(1),
        -f32::from_bits(1),
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-30,
        -1e-30,
        16.0,
        -16.0,
        88.0,
        -88.0,
        89.0,
        -89.0,
        100.0,
        -100.0,
        1e10,
        -1e10,
        1e13,
        -1e13,
        1e20,
        -1e20,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ]);
    let mut rng = Rng::new(4242);
    while z.len() % 56 != 0 || z.len() < 6000 {
        z.push(rng.uniform(-12.0, 12.0));
    }
    z
}

fn same_bits<T: ActivationStorage>(what: &str, got: &[T], want: &[T], input: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (T::widen(g), T::widen(w));
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}: element {i} (z = {:e}) got {g:e}, want {w:e}",
            input[i]
        );
    }
}

fn vector_and_scalar_paths_agree<T: ActivationStorage>(dev: &Device, act: Activation) {
    let z = activation_edge_values();
    let n = z.len();
    let mut rng = Rng::new(77);
    let mut dy = rng.vec(n, -1.0, 1.0);
    dy[..3].copy_from_slice(&[f32::INFINITY, f32::NAN, 0.0]);
    let (zt, dyt) = (T::store(&z), T::store(&dy));
    let zb = dev.upload(&zt).unwrap();
    let what = format!("{} {act:?} {}", dev.name(), std::any::type_name::<T>());

    // Forward: rows 8 wide run in groups of 8, rows 7 wide one element at a time.
    let mut grouped = dev.alloc::<T>(n).unwrap();
    dev.poison(&mut grouped).unwrap();
    T::forward(dev, act, &zb, &mut grouped, n / 8, 8);
    let mut single = dev.alloc::<T>(n).unwrap();
    dev.poison(&mut single).unwrap();
    T::forward(dev, act, &zb, &mut single, n / 7, 7);
    same_bits(
        &format!("{what} forward"),
        &dev.download(&grouped).unwrap(),
        &dev.download(&single).unwrap(),
        &z,
    );

    // Backward: the whole run in groups of 8; launches of 7 elements have no group at all.
    let grouped = T::backward(dev, act, &zb, &dev.upload(&dyt).unwrap());
    let mut single = Vec::with_capacity(n);
    for (zc, dc) in zt.chunks(7).zip(dyt.chunks(7)) {
        single.extend(T::backward(
            dev,
            act,
            &dev.upload(zc).unwrap(),
            &dev.upload(dc).unwrap(),
        ));
    }
    same_bits(&format!("{what} backward"), &grouped, &single, &z);
}

/// The 8-wide path of the activation kernels (aligned groups of 8, where QuickGELU and the tanh
/// GELU take their sigmoid's reciprocals without the IEEE division's guard) gives the
/// one-element path's bits (the IEEE division), forward and backward, fp32 and bf16, on the
/// values where they could part: on CUDA this checks the unguarded reciprocal against the
/// hardware's division.
#[test]
fn activation_vector_and_scalar_paths_agree_bit_for_bit() {
    for dev in devices() {
        for act in ACTIVATIONS {
            vector_and_scalar_paths_agree::<f32>(&dev, act);
            vector_and_scalar_paths_agree::<bf16>(&dev, act);
        }
    }
}

/// The LayerNorm `_d768` kernels (24 slots a lane, and no bounds tests for rows of exactly 768)
/// give the 1024-wide kernels' bits (32 slots, every slot tested): the forward in fp32 and with
/// bf16 output, the backward accumulating with its bf16 copy. The launchers pick `_d768` for
/// these widths; the 1024-wide kernels are launched by name.
#[test]
fn layernorm_widths_give_the_same_bits() {
    use prm::gpu::{KernelArgs, LaunchConfig};
    for dev in devices() {
        for (case, &(rows, dim)) in [(197usize, 768usize), (50, 100), (13, 64), (5, 767)]
            .iter()
            .enumerate()
        {
            let mut rng = Rng::new(1500 + case as u64);
            let x = ln_input(&mut rng, rows, dim);
            let ln = ln_weights(&mut rng, dim);
            let xb = dev.upload(&x).unwrap();
            let (g, b) = (
                dev.upload(&ln.weight).unwrap(),
                dev.upload(&ln.bias).unwrap(),
            );
            let what = format!("{} layernorm forward widths {rows}x{dim}", dev.name());
            let stats = |dev: &Device| (poisoned(dev, rows), poisoned(dev, rows));
            let wide = |name: &str, y: &mut dyn FnMut(&mut KernelArgs)| {
                let (mut mean, mut rstd) = stats(&dev);
                let mut args = KernelArgs::new();
                args.input(&xb).input(&g).input(&b);
                y(&mut args);
                args.output(&mut mean)
                    .output(&mut rstd)
                    .i32(rows as i32)
                    .i32(dim as i32)
                    .f32(1e-5);
                let cfg = LaunchConfig::linear(rows.div_ceil(4) as u32, 128, 0);
                dev.launch(name, cfg, &mut args).unwrap();
                (dev.download(&mean).unwrap(), dev.download(&rstd).unwrap())
            };

            let (mut y, (mut mean, mut rstd)) = (poisoned(&dev, rows * dim), stats(&dev));
            layernorm::layernorm_forward_f32(
                &dev, &xb, &g, &b, &mut y, &mut mean, &mut rstd, rows, dim, 1e-5,
            )
            .unwrap();
            let mut y_wide = poisoned(&dev, rows * dim);
            let (mean_wide, rstd_wide) = wide("prm_layernorm_forward_f32", &mut |a| {
                a.output(&mut y_wide);
            });
            let y_wide = dev.download(&y_wide).unwrap();
            exact(&format!("{what} y"), &dev.download(&y).unwrap(), &y_wide);
            exact(
                &format!("{what} mean"),
                &dev.download(&mean).unwrap(),
                &mean_wide,
            );
            exact(
                &format!("{what} rstd"),
                &dev.download(&rstd).unwrap(),
                &rstd_wide,
            );

            let mut yb = poisoned_bf16(&dev, rows * dim);
            layernorm::layernorm_forward_f32_bf16out(
                &dev, &xb, &g, &b, &mut yb, &mut mean, &mut rstd, rows, dim, 1e-5,
            )
            .unwrap();
            let mut yb_wide = poisoned_bf16(&dev, rows * dim);
            wide("prm_layernorm_forward_f32_bf16out", &mut |a| {
                a.output(&mut yb_wide);
            });
            assert_eq!(
                dev.download(&yb).unwrap(),
                dev.download(&yb_wide).unwrap(),
                "{what}: bf16 y"
            );

            // The backward, accumulating into dx and writing its bf16 copy (the engine's call).
            let dy = dev.upload(&rng.vec(rows * dim, -1.0, 1.0)).unwrap();
            let dx0 = rng.vec(rows * dim, -1.0, 1.0);
            let (mut dx, mut copy) = (dev.upload(&dx0).unwrap(), poisoned_bf16(&dev, rows * dim));
            layernorm::layernorm_backward_f32_bf16copy(
                &dev, &xb, &dy, &g, &mean, &rstd, &mut dx, &mut copy, rows, dim, true,
            )
            .unwrap();
            let (mut dx_wide, mut copy_wide) =
                (dev.upload(&dx0).unwrap(), poisoned_bf16(&dev, rows * dim));
            let mut args = KernelArgs::new();
            args.input(&xb)
                .input(&dy)
                .input(&g)
                .input(&mean)
                .input(&rstd)
                .output(&mut dx_wide)
                .output(&mut copy_wide)
                .i32(rows as i32)
                .i32(dim as i32)
                .i32(1);
            let cfg = LaunchConfig::linear(rows.div_ceil(4) as u32, 128, 0);
            dev.launch("prm_layernorm_backward_f32_bf16copy", cfg, &mut args)
                .unwrap();
            exact(
                &format!("{what} dx"),
                &dev.download(&dx).unwrap(),
                &dev.download(&dx_wide).unwrap(),
            );
            assert_eq!(
                dev.download(&copy).unwrap(),
                dev.download(&copy_wide).unwrap(),
                "{what}: dx bf16 copy"
            );
        }
    }
}
