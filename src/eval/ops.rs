//! Host-side operators of the evaluation targets: the CPU reference twins of what the GPU path
//! runs in kernels (attention variants with a causal flag, linear layers), and the
//! post-processing every device shares (per-token projection and normalisation, cosine logits,
//! bilinear upsampling with argmax).
//!
//! Layouts are row-major `[tokens, features]`, as in [`crate::reference`].

use rayon::prelude::*;

use crate::model::Linear;
use crate::reference::linalg::{matmul_nn_serial, matmul_nt, matmul_nt_serial, MatRef};

/// Which score matrix an attention forms (`s = x·yᵀ/√d`, softmax over rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scores {
    /// `q·kᵀ`, standard attention.
    QK,
    /// `q·qᵀ` (SCLIP, ClearCLIP).
    QQ,
    /// `k·kᵀ` (SCLIP).
    KK,
}

/// `out (+)= x · Wᵀ + b`, `x [rows, in]`.
pub fn linear(x: &[f32], rows: usize, l: &Linear, out: &mut [f32], accumulate: bool) {
    matmul_nt(
        MatRef::new(x, rows, l.in_features),
        MatRef::new(&l.weight, l.out_features, l.in_features),
        out,
        accumulate,
    );
    if let Some(b) = &l.bias {
        out.chunks_mut(l.out_features)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
    }
}

/// Rows `[from, from + len)` of a linear layer, as a layer of its own (e.g. v_proj out of the
/// stacked q/k/v projection).
pub fn linear_rows(l: &Linear, from: usize, len: usize) -> Linear {
    Linear {
        weight: l.weight[from * l.in_features..(from + len) * l.in_features].to_vec(),
        bias: l.bias.as_ref().map(|b| b[from..from + len].to_vec()),
        out_features: len,
        in_features: l.in_features,
    }
}

/// Multi-head attention `softmax(x·yᵀ/√d [causal]) · v` for one sequence, `qkv [T, 3D]` (q, k, v
/// stacked along features); writes `out [T, D]`. With `causal`, query `i` sees keys `j ≤ i`.
pub fn attention_variant(
    qkv: &[f32],
    tokens: usize,
    width: usize,
    heads: usize,
    scores: Scores,
    causal: bool,
    out: &mut [f32],
) {
    let hd = width / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (xo, yo) = match scores {
        Scores::QK => (0, width),
        Scores::QQ => (0, 0),
        Scores::KK => (width, width),
    };
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let x = MatRef::strided(&qkv[xo + h * hd..], tokens, hd, 3 * width);
            let y = MatRef::strided(&qkv[yo + h * hd..], tokens, hd, 3 * width);
            let v = MatRef::strided(&qkv[2 * width + h * hd..], tokens, hd, 3 * width);
            let mut p = vec![0.0f32; tokens * tokens];
            matmul_nt_serial(x, y, &mut p, false);
            for (i, row) in p.chunks_mut(tokens).enumerate() {
                row.iter_mut().for_each(|s| *s *= scale);
                if causal {
                    row[i + 1..].iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
                }
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut sum = 0.0f64;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s as f64;
                }
                let inv = (1.0 / sum) as f32;
                row.iter_mut().for_each(|s| *s *= inv);
            }
            let mut o = vec![0.0f32; tokens * hd];
            matmul_nn_serial(MatRef::new(&p, tokens, tokens), v, &mut o, false);
            o
        })
        .collect();
    for (h, o) in per_head.iter().enumerate() {
        for t in 0..tokens {
            out[t * width + h * hd..t * width + (h + 1) * hd]
                .copy_from_slice(&o[t * hd..(t + 1) * hd]);
        }
    }
}

/// L2-normalises every row of `x [rows, dim]` in place (rows of norm 0 stay 0).
pub fn normalize_rows(x: &mut [f32], dim: usize) {
    x.par_chunks_mut(dim).for_each(|row| {
        let n = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        if n > 0.0 {
            let inv = 1.0 / n;
            row.iter_mut().for_each(|v| *v = (*v as f64 * inv) as f32);
        }
    });
}

/// `logits[r, c] = ⟨a_r, b_c⟩` for `a [rows, dim]`, `b [classes, dim]` (f64 accumulation).
pub fn dot_logits(a: &[f32], b: &[f32], dim: usize) -> Vec<f32> {
    let classes = b.len() / dim;
    let mut out = vec![0.0f32; a.len() / dim * classes];
    out.par_chunks_mut(classes.max(1))
        .zip(a.par_chunks(dim))
        .for_each(|(o, row)| {
            for (c, o) in o.iter_mut().enumerate() {
                let e = &b[c * dim..(c + 1) * dim];
                *o = row
                    .iter()
                    .zip(e)
                    .map(|(&x, &y)| x as f64 * y as f64)
                    .sum::<f64>() as f32;
            }
        });
    out
}

/// Source taps of one output index of PyTorch's `F.interpolate(mode="bilinear",
/// align_corners=False)`: `src = max((dst + 0.5)·in/out − 0.5, 0)`, `i0 = ⌊src⌋`,
/// `i1 = min(i0 + 1, in − 1)`, weights `(1 − λ, λ)` with `λ = src − i0`.
pub fn bilinear_taps(in_size: usize, out_size: usize) -> Vec<(usize, usize, f32)> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|o| {
            let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(in_size - 1);
            let i1 = (i0 + 1).min(in_size - 1);
            let lambda = src - i0 as f32;
            (i0, i1, lambda)
        })
        .collect()
}

/// Upsamples per-patch logits `[gh·gw, C]` (row-major over the grid) bilinearly
/// (align_corners=False) to `out_h × out_w` and takes the per-pixel argmax over classes (first
/// maximum on ties, as `torch.argmax`). Returns the label map `[out_h · out_w]`.
pub fn upsample_argmax(
    logits: &[f32],
    gh: usize,
    gw: usize,
    classes: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<u16> {
    assert_eq!(logits.len(), gh * gw * classes, "logits are not [gh·gw, C]");
    let ty = bilinear_taps(gh, out_h);
    let tx = bilinear_taps(gw, out_w);
    let mut out = vec![0u16; out_h * out_w];
    out.par_chunks_mut(out_w).enumerate().for_each(|(y, row)| {
        let (y0, y1, ly) = ty[y];
        // Interpolate along y first (one row of the grid per class), then along x: the same
        // separable order as PyTorch's CPU kernel computes (each output is a 4-tap sum).
        let mut col = vec![0.0f32; gw * classes];
        for (i, c) in col.iter_mut().enumerate() {
            let a = logits[y0 * gw * classes + i];
            let b = logits[y1 * gw * classes + i];
            *c = (1.0 - ly) * a + ly * b;
        }
        for (x, o) in row.iter_mut().enumerate() {
            let (x0, x1, lx) = tx[x];
            let mut best = f32::NEG_INFINITY;
            let mut arg = 0usize;
            for c in 0..classes {
                let v = (1.0 - lx) * col[x0 * classes + c] + lx * col[x1 * classes + c];
                if v > best {
                    best = v;
                    arg = c;
                }
            }
            *o = arg as u16;
        }
    });
    out
}

/// Argmax of a vector (first maximum).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = f32::NEG_INFINITY;
    let mut arg = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > best {
            best = x;
            arg = i;
        }
    }
    arg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_taps_match_torch_examples() {
        // F.interpolate(arange(2), size=4, mode="bilinear", align_corners=False) on a row:
        // src positions -0.25→0, 0.25, 0.75, 1.25 → (0,1,0), (0,1,.25), (0,1,.75), (1,1,.25)
        let t = bilinear_taps(2, 4);
        assert_eq!((t[0].0, t[0].1), (0, 1));
        assert!((t[0].2 - 0.0).abs() < 1e-7);
        assert!((t[1].2 - 0.25).abs() < 1e-7);
        assert!((t[2].2 - 0.75).abs() < 1e-7);
        assert_eq!((t[3].0, t[3].1), (1, 1));
    }

    #[test]
    fn upsample_of_constant_grid_is_constant() {
        // Two classes, class 1 wins everywhere.
        let logits = vec![0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.0, 1.0];
        let m = upsample_argmax(&logits, 2, 2, 2, 5, 7);
        assert!(m.iter().all(|&c| c == 1));
    }

    #[test]
    fn causal_attention_first_row_is_its_own_value() {
        let (t, w, h) = (3, 4, 1);
        let qkv: Vec<f32> = (0..t * 3 * w).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut out = vec![0.0; t * w];
        attention_variant(&qkv, t, w, h, Scores::QK, true, &mut out);
        assert_eq!(&out[..w], &qkv[2 * w..3 * w]);
    }
}
