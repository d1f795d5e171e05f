//! Bicubic resize with exact PyTorch semantics, its exact transpose, and position-embedding
//! interpolation.
//!
//! # Semantics
//!
//! [`bicubic_resize`] reproduces
//! `torch.nn.functional.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False)`
//! (no antialias, `size` given so no `scale_factor`), as computed by ATen's CPU kernel
//! (`UpSample.h`, `UpSampleKernel.cpp`, `HelperInterpCubic`) for `float32` inputs:
//!
//! - `scale = (in as f32) / (out as f32)` in f32 (`compute_scales_value`);
//! - `src = scale * (dst as f32 + 0.5) - 0.5` in f32, **not** clamped at 0 (cubic);
//! - `i0 = min(floor(src), in - 1)`, `t = clamp(src - i0, 0, 1)` (`guard_index_and_lambda`);
//! - weights from `get_cubic_upsample_coefficients` with `A = -0.75`, evaluated in f32 with the
//!   same expression shapes as ATen;
//! - taps `i0 - 1 ..= i0 + 2`, each clamped into `[0, in - 1]` (borders repeat edge pixels);
//! - accumulation order and precision as ATen's `Interpolate<2>`: for each of the 4 row taps,
//!   an f32 row sum `((p0*wx0 + p1*wx1) + p2*wx2) + p3*wx3`; then
//!   `out = ((r0*wy0 + r1*wy1) + r2*wy2) + r3*wy3`, all in f32, no fused multiply-add.
//!
//! With that, the forward is meant to be bit-identical to torch's CPU float32 result (assuming
//! torch's build does not contract the multiply-adds into FMAs); against an f64 evaluation of the
//! same formula it agrees to a few f32 ulps.
//!
//! When `in == out` in both dimensions the input is copied exactly (ATen's weights are then
//! `(0, 1, 0, 0)`, which gives the same values for finite inputs).
//!
//! [`bicubic_resize_backward`] is the exact transpose of the same linear map (same f32 weights
//! and clamped taps), written in gather form (each input pixel sums the contributions that
//! reach it, in a fixed order) with f64 accumulation rounded once to f32. It is deterministic
//! and independent of the thread count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

/// Work (output elements × taps) above which the resize runs on rayon.
const PAR_THRESHOLD: usize = 1 << 15;

/// `A` of the cubic convolution kernel, as in PyTorch.
const CUBIC_A: f32 = -0.75;

#[inline]
fn cubic_convolution1(x: f32, a: f32) -> f32 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

#[inline]
fn cubic_convolution2(x: f32, a: f32) -> f32 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

/// ATen `get_cubic_upsample_coefficients` in f32.
#[inline]
fn cubic_coefficients(t: f32) -> [f32; 4] {
    let x1 = t;
    let x2 = 1.0 - t;
    [
        cubic_convolution2(x1 + 1.0, CUBIC_A),
        cubic_convolution1(x1, CUBIC_A),
        cubic_convolution1(x2, CUBIC_A),
        cubic_convolution2(x2 + 1.0, CUBIC_A),
    ]
}

/// Taps and weights for one output index along one dimension.
#[derive(Clone, Copy, Debug)]
struct Taps {
    idx: [usize; 4],
    w: [f32; 4],
}

/// The per-output-index taps of a 1-D bicubic resize `in_size -> out_size`, exactly as ATen's
/// `HelperInterpCubic::compute_indices_weights` computes them.
fn axis_taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    assert!(in_size > 0, "bicubic resize: input size must be positive");
    // compute_scales_value: static_cast<float>(input_size) / output_size (in float).
    let scale = in_size as f32 / out_size as f32;
    let last = in_size as i64 - 1;
    (0..out_size)
        .map(|dst| {
            // area_pixel_compute_source_index(cubic = true): no clamp at 0.
            let src = scale * (dst as f32 + 0.5) - 0.5;
            // guard_index_and_lambda.
            let i0 = (src.floor() as i64).min(last);
            let t = (src - i0 as f32).clamp(0.0, 1.0);
            let w = cubic_coefficients(t);
            let mut idx = [0usize; 4];
            for (j, slot) in idx.iter_mut().enumerate() {
                *slot = (i0 - 1 + j as i64).clamp(0, last) as usize;
            }
            Taps { idx, w }
        })
        .collect()
}

/// Gather lists of the transpose of one axis: for every input index, the `(output index, weight)`
/// pairs whose tap lands on it, in increasing output index then tap order.
fn axis_transpose(taps: &[Taps], in_size: usize) -> Vec<Vec<(usize, f32)>> {
    let mut lists: Vec<Vec<(usize, f32)>> = vec![Vec::new(); in_size];
    for (o, tap) in taps.iter().enumerate() {
        for j in 0..4 {
            lists[tap.idx[j]].push((o, tap.w[j]));
        }
    }
    lists
}

/// One output row of one channel, in ATen's accumulation order.
#[inline]
fn resize_row(plane: &[f32], in_w: usize, ty: &Taps, xtaps: &[Taps], out_row: &mut [f32]) {
    let rows = [
        &plane[ty.idx[0] * in_w..(ty.idx[0] + 1) * in_w],
        &plane[ty.idx[1] * in_w..(ty.idx[1] + 1) * in_w],
        &plane[ty.idx[2] * in_w..(ty.idx[2] + 1) * in_w],
        &plane[ty.idx[3] * in_w..(ty.idx[3] + 1) * in_w],
    ];
    for (o, tx) in out_row.iter_mut().zip(xtaps) {
        let mut acc = 0.0f32;
        for (i, row) in rows.iter().enumerate() {
            let mut r = row[tx.idx[0]] * tx.w[0];
            r += row[tx.idx[1]] * tx.w[1];
            r += row[tx.idx[2]] * tx.w[2];
            r += row[tx.idx[3]] * tx.w[3];
            if i == 0 {
                acc = r * ty.w[0];
            } else {
                acc += r * ty.w[i];
            }
        }
        *o = acc;
    }
}

/// Bicubic resize of planar images `[channels, in_h, in_w]` (row-major) to
/// `[channels, out_h, out_w]`, with the exact semantics of PyTorch's
/// `F.interpolate(mode="bicubic", align_corners=False)` described in the module docs.
pub fn bicubic_resize(
    input: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<f32> {
    assert_eq!(
        input.len(),
        channels * in_h * in_w,
        "bicubic_resize: input length does not match [channels, in_h, in_w]"
    );
    if in_h == out_h && in_w == out_w {
        return input.to_vec();
    }
    let mut out = vec![0.0f32; channels * out_h * out_w];
    if out.is_empty() {
        return out;
    }
    let ytaps = axis_taps(in_h, out_h);
    let xtaps = axis_taps(in_w, out_w);
    let plane_in = in_h * in_w;
    let do_row = |(r, out_row): (usize, &mut [f32])| {
        let (c, oy) = (r / out_h, r % out_h);
        let plane = &input[c * plane_in..(c + 1) * plane_in];
        resize_row(plane, in_w, &ytaps[oy], &xtaps, out_row);
    };
    if out.len() * 16 >= PAR_THRESHOLD {
        out.par_chunks_mut(out_w).enumerate().for_each(do_row);
    } else {
        out.chunks_mut(out_w).enumerate().for_each(do_row);
    }
    out
}

/// Exact transpose (adjoint) of [`bicubic_resize`]: given `dL/d(output)` of shape
/// `[channels, out_h, out_w]`, returns `dL/d(input)` of shape `[channels, in_h, in_w]`.
///
/// Gather form with f64 accumulation: first along x (`T[c, oy, ix]`), then along y; each
/// element sums its contributions in a fixed order, so the result is deterministic.
pub fn bicubic_resize_backward(
    grad_output: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<f32> {
    assert_eq!(
        grad_output.len(),
        channels * out_h * out_w,
        "bicubic_resize_backward: gradient length does not match [channels, out_h, out_w]"
    );
    if in_h == out_h && in_w == out_w {
        return grad_output.to_vec();
    }
    let mut grad_in = vec![0.0f32; channels * in_h * in_w];
    if grad_in.is_empty() || grad_output.is_empty() {
        return grad_in;
    }
    let xcols = axis_transpose(&axis_taps(in_w, out_w), in_w);
    let yrows = axis_transpose(&axis_taps(in_h, out_h), in_h);
    let par = (grad_output.len() + grad_in.len()) * 8 >= PAR_THRESHOLD;

    // Pass 1, along x: t[c, oy, ix] = sum over (ox, w) in xcols[ix] of g[c, oy, ox] * w.
    let mut t = vec![0.0f64; channels * out_h * in_w];
    let pass_x = |(r, t_row): (usize, &mut [f64])| {
        let g_row = &grad_output[r * out_w..(r + 1) * out_w];
        for (dst, list) in t_row.iter_mut().zip(&xcols) {
            *dst = list
                .iter()
                .map(|&(ox, w)| g_row[ox] as f64 * w as f64)
                .sum();
        }
    };
    if par {
        t.par_chunks_mut(in_w).enumerate().for_each(pass_x);
    } else {
        t.chunks_mut(in_w).enumerate().for_each(pass_x);
    }

    // Pass 2, along y: grad_in[c, iy, ix] = sum over (oy, w) in yrows[iy] of t[c, oy, ix] * w.
    let pass_y = |(r, gi_row): (usize, &mut [f32])| {
        let (c, iy) = (r / in_h, r % in_h);
        let t_plane = &t[c * out_h * in_w..(c + 1) * out_h * in_w];
        let mut acc = vec![0.0f64; in_w];
        for &(oy, w) in &yrows[iy] {
            let t_row = &t_plane[oy * in_w..(oy + 1) * in_w];
            let w = w as f64;
            for (a, &v) in acc.iter_mut().zip(t_row) {
                *a += v * w;
            }
        }
        for (d, a) in gi_row.iter_mut().zip(acc) {
            *d = a as f32;
        }
    };
    if par {
        grad_in.par_chunks_mut(in_w).enumerate().for_each(pass_y);
    } else {
        grad_in.chunks_mut(in_w).enumerate().for_each(pass_y);
    }
    grad_in
}

/// Interpolates a position embedding `[lead + grid*grid, dim]` (the CLS row first, when the
/// tower has a class token, then the patch rows row-major over the grid) to `[lead + gh*gw,
/// dim]`. The `lead` rows before the grid (1 with a class token, 0 without; told apart by the
/// table's length) are kept; the patch part is
/// resized as a `[dim, grid, grid]` planar image to `(gh, gw)` with [`bicubic_resize`]
/// semantics (bit-identical to transposing, calling [`bicubic_resize`] and transposing back;
/// it is computed directly in the interleaved layout). Returns a clone when
/// `(gh, gw) == (grid, grid)`.
pub fn interpolate_position_embedding(
    pos: &[f32],
    dim: usize,
    grid: usize,
    gh: usize,
    gw: usize,
) -> Vec<f32> {
    let lead = leading_rows(pos.len(), dim, grid);
    if gh == grid && gw == grid {
        return pos.to_vec();
    }
    let mut out = vec![0.0f32; (lead + gh * gw) * dim];
    out[..lead * dim].copy_from_slice(&pos[..lead * dim]);
    if gh * gw == 0 || dim == 0 {
        return out;
    }
    let patches = &pos[lead * dim..];
    let ytaps = axis_taps(grid, gh);
    let xtaps = axis_taps(grid, gw);
    // One output token (a row of `dim` values) per chunk; the arithmetic per element is the
    // same sequence of f32 operations as `resize_row`.
    let do_token = |(k, out_tok): (usize, &mut [f32])| {
        let (ty, tx) = (&ytaps[k / gw], &xtaps[k % gw]);
        let mut r = vec![0.0f32; dim];
        for i in 0..4 {
            let row = ty.idx[i] * grid;
            let p = |j: usize| &patches[(row + tx.idx[j]) * dim..(row + tx.idx[j] + 1) * dim];
            let (p0, p1, p2, p3) = (p(0), p(1), p(2), p(3));
            for d in 0..dim {
                let mut s = p0[d] * tx.w[0];
                s += p1[d] * tx.w[1];
                s += p2[d] * tx.w[2];
                s += p3[d] * tx.w[3];
                r[d] = s;
            }
            let wy = ty.w[i];
            if i == 0 {
                for (o, &s) in out_tok.iter_mut().zip(&r) {
                    *o = s * wy;
                }
            } else {
                for (o, &s) in out_tok.iter_mut().zip(&r) {
                    *o += s * wy;
                }
            }
        }
    };
    let body = &mut out[lead * dim..];
    if body.len() * 16 >= PAR_THRESHOLD {
        body.par_chunks_mut(dim).enumerate().for_each(do_token);
    } else {
        body.chunks_mut(dim).enumerate().for_each(do_token);
    }
    out
}

/// The dynamic-scale working size: `(int(ratio * h), int(ratio * w))` as Python computes it when
/// `ratio` is a float32 tensor (the product is rounded to f32, then truncated), clamped to ≥ 1.
pub fn scaled_size(h: usize, w: usize, ratio: f32) -> (usize, usize) {
    let f = |n: usize| -> usize {
        let v = (ratio * n as f32).trunc();
        if v.is_nan() || v < 1.0 {
            1
        } else {
            v as usize
        }
    };
    (f(h), f(w))
}

/// Rows of a position table `[lead + grid·grid, dim]` before its patch grid: 1 for a tower with a
/// class token, 0 for one without (SigLIP). Panics when the length fits neither.
pub fn leading_rows(len: usize, dim: usize, grid: usize) -> usize {
    let patches = grid * grid * dim;
    match len.checked_sub(patches) {
        Some(0) => 0,
        Some(rest) if rest == dim => 1,
        _ => panic!(
            "position embedding of {len} values is neither [{grid}·{grid}, {dim}] nor \
             [1 + {grid}·{grid}, {dim}]"
        ),
    }
}

type GridMap = HashMap<(usize, usize), Arc<Vec<f32>>>;

/// The interpolated embeddings [`PositionEmbeddingCache`] keeps, at most (the model's own is
/// kept beyond it).
const MAX_CACHED_POSITION_BYTES: usize = 256 << 20;

/// A thread-safe cache of interpolated position embeddings keyed by `(gh, gw)`, since the attack
/// reuses the same grid size across steps.
#[derive(Debug)]
pub struct PositionEmbeddingCache {
    pos: Arc<Vec<f32>>,
    dim: usize,
    grid: usize,
    cache: Mutex<GridMap>,
    /// Bytes of embeddings kept ([`MAX_CACHED_POSITION_BYTES`] unless set).
    limit: usize,
}

impl PositionEmbeddingCache {
    /// `pos` is the model's position embedding `[1 + grid*grid, dim]` (`[grid*grid, dim]` for
    /// a tower without a class token).
    pub fn new(pos: Vec<f32>, dim: usize, grid: usize) -> Self {
        leading_rows(pos.len(), dim, grid);
        let pos = Arc::new(pos);
        let mut map = HashMap::new();
        map.insert((grid, grid), Arc::clone(&pos));
        PositionEmbeddingCache {
            pos,
            dim,
            grid,
            cache: Mutex::new(map),
            limit: MAX_CACHED_POSITION_BYTES,
        }
    }

    /// The same cache keeping at most `bytes` of interpolated embeddings (beyond the model's
    /// own); a grid that would pass the bound starts it afresh.
    pub fn with_limit(mut self, bytes: usize) -> Self {
        self.limit = bytes;
        self
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn grid(&self) -> usize {
        self.grid
    }

    /// Bytes of embeddings held, the model's own included.
    pub fn cached_bytes(&self) -> usize {
        self.lock().values().map(|e| e.len() * 4).sum()
    }

    /// The original (uninterpolated) embedding.
    pub fn base(&self) -> Arc<Vec<f32>> {
        Arc::clone(&self.pos)
    }

    /// The embedding for a `gh × gw` patch grid, `[1 + gh*gw, dim]` (`[gh*gw, dim]` without a
    /// class token).
    ///
    /// The lock is not held while interpolating (the interpolation may use rayon, and a rayon
    /// worker could re-enter `get`); if two threads race, both compute the same deterministic
    /// value and the first insert wins.
    pub fn get(&self, gh: usize, gw: usize) -> Arc<Vec<f32>> {
        if let Some(v) = self.lock().get(&(gh, gw)) {
            return Arc::clone(v);
        }
        let v = Arc::new(interpolate_position_embedding(
            &self.pos, self.dim, self.grid, gh, gw,
        ));
        let mut cache = self.lock();
        // Bounded: a dataset of many native sizes, under dynamic scale, meets many grids. The
        // model's own grid is kept; callers hold their embeddings by `Arc`.
        let held: usize = cache.values().map(|e| e.len() * 4).sum();
        if held + v.len() * 4 > self.limit + self.pos.len() * 4 {
            cache.retain(|&k, _| k == (self.grid, self.grid));
        }
        Arc::clone(cache.entry((gh, gw)).or_insert(v))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GridMap> {
        // A poisoned lock only means another thread panicked; the map itself stays valid.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}
