//! Row-wise operators of the ViT block, forward and input-gradient backward.
//!
//! All tensors are row-major `[tokens, features]`. Reductions (LayerNorm statistics, softmax
//! sums, dot products) accumulate in f64 so that the reference stays an oracle for f32 kernels.

use rayon::prelude::*;

use super::exp::{exp, map_in_place, zip_map_in_place};
use super::linalg::{matmul_nn_serial, matmul_nt_serial, matmul_tn_serial, MatRef};
use crate::model::{Activation, LayerNormWeights};

/// Rows handled per rayon task in the row-wise operators.
const ROWS_PER_TASK: usize = 16;

/// Elements handled per rayon task in the element-wise operators (activations).
const ELEMENTS_PER_TASK: usize = 8192;

/// Sum in f64 over eight interleaved partial sums (element i goes to sum i mod 8), added at the
/// end in a fixed order: the same value on every machine, and a loop that vectorises, unlike
/// one running sum whose every add waits for the previous one.
fn sum_f64(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v as f64;
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(tail) {
        *lane += v as f64;
    }
    lanes.iter().sum()
}

/// LayerNorm forward. Writes `out` and returns per-row `(mean, rstd)` for the backward.
pub fn layer_norm(
    x: &[f32],
    dim: usize,
    ln: &LayerNormWeights,
    eps: f32,
    out: &mut [f32],
) -> Vec<(f32, f32)> {
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % dim, 0);
    let mut stats = vec![(0.0f32, 0.0f32); x.len() / dim];
    out.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(x.par_chunks(dim * ROWS_PER_TASK))
        .zip(stats.par_chunks_mut(ROWS_PER_TASK))
        .for_each(|((out, x), stats)| {
            for ((o, row), s) in out.chunks_mut(dim).zip(x.chunks(dim)).zip(stats.iter_mut()) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                for (i, (o, &v)) in o.iter_mut().zip(row).enumerate() {
                    *o = (((v as f64 - mean) * rstd) as f32) * ln.weight[i] + ln.bias[i];
                }
                *s = (mean as f32, rstd as f32);
            }
        });
    stats
}

/// LayerNorm input gradient: `dx (+)= rstd · (g − mean(g) − x̂ · mean(g · x̂))` with `g = dy · γ`.
pub fn layer_norm_backward(
    x: &[f32],
    dy: &[f32],
    dim: usize,
    ln: &LayerNormWeights,
    stats: &[(f32, f32)],
    dx: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(x.len(), dy.len());
    assert_eq!(x.len(), dx.len());
    dx.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(x.par_chunks(dim * ROWS_PER_TASK))
        .zip(dy.par_chunks(dim * ROWS_PER_TASK))
        .zip(stats.par_chunks(ROWS_PER_TASK))
        .for_each(|(((dx, x), dy), stats)| {
            for (((dx, x), dy), &(mean, rstd)) in dx
                .chunks_mut(dim)
                .zip(x.chunks(dim))
                .zip(dy.chunks(dim))
                .zip(stats)
            {
                let (mean, rstd) = (mean as f64, rstd as f64);
                let mut sum_g = 0.0f64;
                let mut sum_gx = 0.0f64;
                for i in 0..dim {
                    let g = dy[i] as f64 * ln.weight[i] as f64;
                    let xhat = (x[i] as f64 - mean) * rstd;
                    sum_g += g;
                    sum_gx += g * xhat;
                }
                let (mean_g, mean_gx) = (sum_g / dim as f64, sum_gx / dim as f64);
                for i in 0..dim {
                    let g = dy[i] as f64 * ln.weight[i] as f64;
                    let xhat = (x[i] as f64 - mean) * rstd;
                    let v = (rstd * (g - mean_g - xhat * mean_gx)) as f32;
                    if accumulate {
                        dx[i] += v;
                    } else {
                        dx[i] = v;
                    }
                }
            }
        });
}

/// `1 / (1 + e⁻ˣ)`, on the vectorisable [`exp`].
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// The Gauss error function in f64, from the `libm` crate so exact GELU does not depend on the
/// platform's C library.
fn erf(x: f64) -> f64 {
    libm::erf(x)
}

/// Exact GELU `x · Φ(x)` and its derivative `Φ(x) + x · φ(x)`.
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}
fn gelu_grad(x: f32) -> f32 {
    let x = x as f64;
    let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (cdf + x * pdf) as f32
}

/// GELU's tanh approximation, `½x(1 + tanh u)` with `u = √(2/π)(x + 0.044715x³)`, and its
/// derivative `½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²)`, `t = tanh u`, evaluated in
/// f64 through the identities `½(1 + tanh u) = σ(2u)` and `½(1 − t²) = 2σ(2u)(1 − σ(2u))`:
/// `1 + tanh u` cancels for negative x (from x ≈ −7.3 on, f64's tanh u is −1 and the tanh
/// form gives 0 where the function is −4e−18 at x = −7.5), while the sigmoid keeps full
/// relative precision in that tail, as erf's complement does for exact GELU. The kernels
/// evaluate the same form in f32. For every finite f32 x the polynomial and the slope stay
/// finite in f64 (|x³| < 4e115), and so do the function and its derivative.
fn gelu_tanh_parts(x: f64) -> (f64, f64) {
    const TWICE_SQRT_2_OVER_PI: f64 = 2.0 * 0.797_884_560_802_865_4; // 2√(2/π)
    let x2 = x * x;
    let arg = TWICE_SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x2); // 2u
    let slope = TWICE_SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x2); // d(2u)/dx
    (1.0 / (1.0 + libm::exp(-arg)), slope)
}
fn gelu_tanh(x: f32) -> f32 {
    let x = x as f64;
    (x * gelu_tanh_parts(x).0) as f32
}
fn gelu_tanh_grad(x: f32) -> f32 {
    let x = x as f64;
    let (s, slope) = gelu_tanh_parts(x);
    (s + x * s * (1.0 - s) * slope) as f32
}

/// Applies the activation in place.
pub fn activation(act: Activation, x: &mut [f32]) {
    match act {
        Activation::QuickGelu => x
            .par_chunks_mut(ELEMENTS_PER_TASK)
            .for_each(|x| map_in_place(x, |v| v * sigmoid(1.702 * v))),
        Activation::Gelu => x.par_iter_mut().for_each(|v| *v = gelu(*v)),
        Activation::GeluTanh => x.par_iter_mut().for_each(|v| *v = gelu_tanh(*v)),
    }
}

/// `dx = dy · act'(pre)`, in place on `dy`.
pub fn activation_backward(act: Activation, pre: &[f32], dy: &mut [f32]) {
    match act {
        Activation::QuickGelu => dy
            .par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(pre.par_chunks(ELEMENTS_PER_TASK))
            .for_each(|(dy, pre)| {
                zip_map_in_place(dy, pre, |d, x| {
                    let s = sigmoid(1.702 * x);
                    d * (s + 1.702 * x * s * (1.0 - s))
                })
            }),
        Activation::Gelu => dy
            .par_iter_mut()
            .zip(pre)
            .for_each(|(d, &x)| *d *= gelu_grad(x)),
        Activation::GeluTanh => dy
            .par_iter_mut()
            .zip(pre)
            .for_each(|(d, &x)| *d *= gelu_tanh_grad(x)),
    }
}

/// Softmax of each row of `scores` (length `n`) in place, max-subtracted, f64 sum.
pub(crate) fn softmax_rows(scores: &mut [f32], n: usize) {
    for row in scores.chunks_mut(n) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        map_in_place(row, |v| exp(v - max));
        let inv = (1.0 / sum_f64(row)) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Multi-head self-attention `softmax(q·kᵀ/√d)·v` for one sequence.
/// `qkv` is `[T, 3D]` (q, k, v stacked along features); writes the context `[T, D]`.
pub fn attention(qkv: &[f32], tokens: usize, width: usize, heads: usize, out: &mut [f32]) {
    let hd = width / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let q = MatRef::strided(&qkv[h * hd..], tokens, hd, 3 * width);
            let k = MatRef::strided(&qkv[width + h * hd..], tokens, hd, 3 * width);
            let v = MatRef::strided(&qkv[2 * width + h * hd..], tokens, hd, 3 * width);
            let mut p = vec![0.0f32; tokens * tokens];
            matmul_nt_serial(q, k, &mut p, false);
            p.iter_mut().for_each(|s| *s *= scale);
            softmax_rows(&mut p, tokens);
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

/// Input gradient of [`attention`]: given `d_out [T, D]`, returns `d_qkv [T, 3D]`.
/// The probabilities are recomputed from q and k rather than stored (they are T² per head).
pub fn attention_backward(
    qkv: &[f32],
    d_out: &[f32],
    tokens: usize,
    width: usize,
    heads: usize,
) -> Vec<f32> {
    let hd = width / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_head: Vec<[Vec<f32>; 3]> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let q = MatRef::strided(&qkv[h * hd..], tokens, hd, 3 * width);
            let k = MatRef::strided(&qkv[width + h * hd..], tokens, hd, 3 * width);
            let v = MatRef::strided(&qkv[2 * width + h * hd..], tokens, hd, 3 * width);
            let d_o = MatRef::strided(&d_out[h * hd..], tokens, hd, width);
            let mut p = vec![0.0f32; tokens * tokens];
            matmul_nt_serial(q, k, &mut p, false);
            p.iter_mut().for_each(|s| *s *= scale);
            softmax_rows(&mut p, tokens);
            // dV = Pᵀ · dO
            let mut dv = vec![0.0f32; tokens * hd];
            matmul_tn_serial(MatRef::new(&p, tokens, tokens), d_o, &mut dv, false);
            // dP = dO · Vᵀ, then dS = P ⊙ (dP − rowsum(P ⊙ dP)), scaled by 1/√d.
            let mut ds = vec![0.0f32; tokens * tokens];
            matmul_nt_serial(d_o, v, &mut ds, false);
            for (ds_row, p_row) in ds.chunks_mut(tokens).zip(p.chunks(tokens)) {
                let dot: f64 = ds_row
                    .iter()
                    .zip(p_row)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                let dot = dot as f32;
                for (d, &pv) in ds_row.iter_mut().zip(p_row) {
                    *d = pv * (*d - dot) * scale;
                }
            }
            let ds_m = MatRef::new(&ds, tokens, tokens);
            let mut dq = vec![0.0f32; tokens * hd];
            matmul_nn_serial(ds_m, k, &mut dq, false);
            let mut dk = vec![0.0f32; tokens * hd];
            matmul_tn_serial(ds_m, q, &mut dk, false);
            [dq, dk, dv]
        })
        .collect();
    let mut d_qkv = vec![0.0f32; tokens * 3 * width];
    for (h, grads) in per_head.iter().enumerate() {
        for (part, g) in grads.iter().enumerate() {
            for t in 0..tokens {
                let dst = t * 3 * width + part * width + h * hd;
                d_qkv[dst..dst + hd].copy_from_slice(&g[t * hd..(t + 1) * hd]);
            }
        }
    }
    d_qkv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (-1.5, -0.9661051464753108),
            (4.0, 0.9999999845827421),
        ] {
            assert!(
                (erf(x) - want).abs() < 1e-15,
                "erf({x}) = {} != {want}",
                erf(x)
            );
        }
    }

    /// GELU's tanh approximation and its derivative against values of PyTorch's formula
    /// `½x(1 + tanh(√(2/π)(x + 0.044715x³)))` and the derivative written out with t = tanh u,
    /// taken in 60-digit decimal arithmetic: within half an f32 ulp, the tail included.
    #[test]
    fn gelu_tanh_matches_known_values() {
        for (x, want, want_grad) in [
            (-9.0, -1.3364595947348725e-28, -2.515735285067425e-27),
            (-7.0, -2.315442262072549e-15, -2.765117350706602e-14),
            (-3.0, -0.003637392081773019, -0.011584166630969726),
            (-0.75, -0.1700394448343797, 0.0010617438625857023),
            (-0.5, -0.15428599017485609, 0.1326300964653577),
            (0.5, 0.34571400982514394, 0.8673699035346423),
            (1.0, 0.8411919906082767, 1.0829640838457826),
            (2.0, 1.954597694087775, 1.0860992566236183),
            (6.0, 5.9999999999156035, 1.0000000007709975),
        ] {
            let close = |got: f32, want: f64| (got as f64 - want).abs() <= 6e-8 * want.abs();
            let (a, g) = (gelu_tanh(x), gelu_tanh_grad(x));
            assert!(close(a, want), "gelu_tanh({x}) = {a:e}, want {want:e}");
            assert!(
                close(g, want_grad),
                "gelu_tanh'({x}) = {g:e}, want {want_grad:e}"
            );
        }
    }
}
