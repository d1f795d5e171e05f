//! Host-side operators of the evaluation targets: the CPU reference twins of what the GPU path
//! runs in kernels (attention variants with a causal flag, linear layers), and the
//! post-processing every device shares (per-token projection and normalisation, cosine logits,
//! bilinear upsampling with argmax).
//!
//! Layouts are row-major `[tokens, features]`, as in [`crate::reference`].

use rayon::prelude::*;

use crate::model::Linear;
pub use crate::reference::linalg::linear;
use crate::reference::linalg::{matmul_nn_serial, matmul_nt_serial, MatRef};

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
///
/// Each logit is one f64 sum over `dim` in index order, starting from −0 (as `Iterator::sum`),
/// and rounded to f32 once: the bits of the one-class-at-a-time loop (its twin in tests). `b`
/// is transposed to `[dim, classes]` so that the sums of a block of classes advance together,
/// one vector lane each; no sum is reassociated. (A product of two f32 values is exact in f64,
/// so contracting the multiply-add would not change a bit either.)
pub fn dot_logits(a: &[f32], b: &[f32], dim: usize) -> Vec<f32> {
    let classes = b.len() / dim;
    // Transposing costs about as much as one row's sums: not worth it for an image embedding.
    if a.len() / dim < 8 || classes == 0 {
        return dot_logits_one_class_at_a_time(a, b, dim);
    }
    let mut bt = vec![0.0f64; b.len()];
    for (c, row) in b.chunks(dim).enumerate() {
        for (d, &v) in row.iter().enumerate() {
            bt[d * classes + c] = v as f64;
        }
    }
    let mut out = vec![0.0f32; a.len() / dim * classes];
    // Two rows at a time share each load of `bt`; two rows × 32 classes are many vectors of
    // sums in flight, enough to hide the adds' latency.
    out.par_chunks_mut(2 * classes)
        .zip(a.par_chunks(2 * dim))
        .for_each(|(o, rows)| {
            let (r0, r1) = rows.split_at(dim.min(rows.len()));
            let (o0, o1) = o.split_at_mut(classes.min(o.len()));
            row_pair_logits(r0, r1, &bt, classes, o0, o1);
        });
    out
}

/// The logits of rows `r0` and `r1` (`r1` and `o1` empty for a last odd row) into `o0`, `o1`.
fn row_pair_logits(
    r0: &[f32],
    r1: &[f32],
    bt: &[f64],
    classes: usize,
    o0: &mut [f32],
    o1: &mut [f32],
) {
    let mut c0 = 0;
    while c0 + 32 <= classes {
        block_logits::<32>(r0, r1, bt, classes, c0, o0, o1);
        c0 += 32;
    }
    // The rest in blocks of 8, then one by one: one sum at a time waits on each add.
    while c0 + 8 <= classes {
        block_logits::<8>(r0, r1, bt, classes, c0, o0, o1);
        c0 += 8;
    }
    for c in c0..classes {
        block_logits::<1>(r0, r1, bt, classes, c, o0, o1);
    }
}

/// Classes `c0..c0 + B` of [`row_pair_logits`].
fn block_logits<const B: usize>(
    r0: &[f32],
    r1: &[f32],
    bt: &[f64],
    classes: usize,
    c0: usize,
    o0: &mut [f32],
    o1: &mut [f32],
) {
    let (s0, s1) = block_sums::<B>(r0, r1, bt, classes, c0);
    let store = |out: &mut [f32], sums: &[f64; B]| {
        out.iter_mut().zip(sums).for_each(|(o, &s)| *o = s as f32);
    };
    store(&mut o0[c0..c0 + B], &s0);
    if !o1.is_empty() {
        store(&mut o1[c0..c0 + B], &s1);
    }
}

/// The f64 sums of classes `c0..c0 + B` for rows `r0` and `r1` (`r1` may be empty: its sums are
/// then unused), each in index order from −0.
fn block_sums<const B: usize>(
    r0: &[f32],
    r1: &[f32],
    bt: &[f64],
    classes: usize,
    c0: usize,
) -> ([f64; B], [f64; B]) {
    let (mut s0, mut s1) = ([-0.0f64; B], [-0.0f64; B]);
    for d in 0..r0.len() {
        let e: &[f64; B] = bt[d * classes + c0..d * classes + c0 + B]
            .try_into()
            .expect("B classes");
        let x0 = r0[d] as f64;
        let x1 = r1.get(d).map_or(0.0, |&x| x as f64);
        for j in 0..B {
            s0[j] += x0 * e[j];
            s1[j] += x1 * e[j];
        }
    }
    (s0, s1)
}

/// [`dot_logits`] one class at a time, the plain form: its twin in tests, and the faster one for
/// a few rows.
fn dot_logits_one_class_at_a_time(a: &[f32], b: &[f32], dim: usize) -> Vec<f32> {
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
///
/// Each value is the arithmetic of the one-class-at-a-time loop with a running maximum (its twin
/// in tests), and only classes that cannot win are left out, so the label maps are the same.
///
/// The pixels between the same two grid rows and two grid columns (about a patch's area of them)
/// interpolate the same four corner values; the classes that cannot win anywhere in that cell are
/// found once for it (`contenders`). A pixel then forms only the other classes' values, in class
/// order, with the scan's strict `>`.
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
    let (y_cells, y_cell_of) = cells(&ty);
    let (x_cells, x_cell_of) = cells(&tx);
    let corner = |y: usize, x: usize| &logits[(y * gw + x) * classes..(y * gw + x + 1) * classes];
    let candidates: Vec<Vec<Option<Vec<u32>>>> = y_cells
        .par_iter()
        .map(|&(y0, y1)| {
            x_cells
                .iter()
                .map(|&(x0, x1)| {
                    contenders([
                        corner(y0, x0),
                        corner(y0, x1),
                        corner(y1, x0),
                        corner(y1, x1),
                    ])
                })
                .collect()
        })
        .collect();
    let mut out = vec![0u16; out_h * out_w];
    out.par_chunks_mut(out_w).enumerate().for_each(|(y, row)| {
        let col = interpolate_grid_row(logits, gw, classes, ty[y]);
        let candidates = &candidates[y_cell_of[y]];
        let mut values = vec![0.0f32; classes];
        for (x, o) in row.iter_mut().enumerate() {
            let (x0, x1, lx) = tx[x];
            let (a, b) = (
                &col[x0 * classes..(x0 + 1) * classes],
                &col[x1 * classes..(x1 + 1) * classes],
            );
            let wa = 1.0 - lx;
            *o = match &candidates[x_cell_of[x]] {
                Some(candidates) => {
                    let (mut best, mut arg) = (f32::NEG_INFINITY, 0);
                    for &c in candidates {
                        let v = wa * a[c as usize] + lx * b[c as usize];
                        if v > best {
                            best = v;
                            arg = c as usize;
                        }
                    }
                    arg
                }
                None => {
                    values
                        .iter_mut()
                        .zip(a.iter().zip(b))
                        .for_each(|(v, (&a, &b))| *v = wa * a + lx * b);
                    argmax(&values)
                }
            } as u16;
        }
    });
    out
}

/// The distinct source pairs `(i0, i1)` of a side's taps, in order, and each output index's.
fn cells(taps: &[(usize, usize, f32)]) -> (Vec<(usize, usize)>, Vec<usize>) {
    let mut distinct: Vec<(usize, usize)> = Vec::new();
    let of = taps
        .iter()
        .map(|&(i0, i1, _)| {
            if distinct.last() != Some(&(i0, i1)) {
                distinct.push((i0, i1));
            }
            distinct.len() - 1
        })
        .collect();
    (distinct, of)
}

/// The classes, in order, that can hold a cell's largest interpolated value; `None` (every
/// class) when a corner value is not finite or too large for the bound below, or when more than a
/// quarter of the classes can.
///
/// A pixel's value of class c mixes the cell's four corner values `p_c` twice: along y,
/// `fl(fl(w·p) + fl(l·q))` with `w = fl(1 − l)`, `l ∈ [0, 1)`, then the same along x. One such
/// mix lies within `2⁻²¹·(|p| + |q|)` of `[min(p, q), max(p, q)]` (the weights sum to 1 within
/// 2⁻²⁴ and three roundings of 2⁻²⁴ bound the rest: more than twice over), so the pixel's value
/// lies within `r_c = 2⁻²⁰·Σ|p_c|` (plus 10⁻³⁷ for subnormal products) of the corners'
/// `[min_c, max_c]`. A class whose `max_c + r_c` is below `L = max_k (min_k − r_k)` is beaten
/// strictly by that k at every pixel of the cell: it can neither be the argmax nor tie with it.
/// The bounds are computed in f64, exact enough to need no margin of their own.
fn contenders(corners: [&[f32]; 4]) -> Option<Vec<u32>> {
    const LIMIT: f32 = 1e30;
    let fits = |v: &f32| v.abs() < LIMIT; // false for NaN and ±∞ too
    if !corners.iter().all(|c| c.iter().all(fits)) {
        return None;
    }
    let bounds = |c: usize| {
        let v = corners.map(|corner| corner[c] as f64);
        let r = v.iter().map(|x| x.abs()).sum::<f64>() * f64::powi(2.0, -20) + 1e-37;
        let low = v.iter().copied().fold(f64::INFINITY, f64::min);
        let high = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (low - r, high + r)
    };
    let classes = corners[0].len();
    let bounds: Vec<(f64, f64)> = (0..classes).map(bounds).collect();
    let floor = bounds
        .iter()
        .fold(f64::NEG_INFINITY, |l, &(low, _)| l.max(low));
    let candidates: Vec<u32> = (0..classes)
        .filter(|&c| bounds[c].1 >= floor)
        .map(|c| c as u32)
        .collect();
    // Past a quarter of the classes, forming every value (vectorised) is the faster way.
    (candidates.len() <= classes / 4).then_some(candidates)
}

/// One output row's interpolation along y: the grid rows `y0` and `y1` mixed, `[gw, C]`. The
/// same separable order as PyTorch's CPU kernel (each output is a 4-tap sum, y first).
fn interpolate_grid_row(
    logits: &[f32],
    gw: usize,
    classes: usize,
    (y0, y1, ly): (usize, usize, f32),
) -> Vec<f32> {
    let (a, b) = (
        &logits[y0 * gw * classes..(y0 + 1) * gw * classes],
        &logits[y1 * gw * classes..(y1 + 1) * gw * classes],
    );
    a.iter()
        .zip(b)
        .map(|(&a, &b)| (1.0 - ly) * a + ly * b)
        .collect()
}

/// [`upsample_argmax`] one class at a time with a running maximum, the plain form: its twin in
/// tests.
#[cfg(test)]
fn upsample_argmax_one_class_at_a_time(
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
    for (y, row) in out.chunks_mut(out_w).enumerate() {
        let (y0, y1, ly) = ty[y];
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
    }
    out
}

/// One (clean, adversarial) token pair's sums for the feature drift, each over the row in
/// index order in f64 (every element widened first): a·c, a·a, c·c and (a − c)·(a − c), with a
/// the adversarial row and c the clean one. The GPU engine computes them on the device
/// (`kernels/drift.cu`) with the same bits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TokenSums {
    pub ac: f64,
    pub aa: f64,
    pub cc: f64,
    pub dd: f64,
}

impl TokenSums {
    /// From the device's `[.., 4]` rows.
    pub fn from_row(row: &[f64]) -> Self {
        TokenSums {
            ac: row[0],
            aa: row[1],
            cc: row[2],
            dd: row[3],
        }
    }
}

/// [`TokenSums`] of every row of `adv` and `clean` (`[T, dim]` each).
pub fn token_sums(adv: &[f32], clean: &[f32], dim: usize) -> Vec<TokenSums> {
    assert_eq!(adv.len(), clean.len(), "token_sums: rows of two sizes");
    adv.chunks(dim)
        .zip(clean.chunks(dim))
        .map(|(ra, rc)| {
            let mut s = TokenSums::default();
            for (&x, &y) in ra.iter().zip(rc) {
                let (x, y) = (x as f64, y as f64);
                // Each product and sum rounded once (Rust never fuses them), as the kernel.
                s.ac += x * y;
                s.aa += x * x;
                s.cc += y * y;
                let d = x - y;
                s.dd += d * d;
            }
            s
        })
        .collect()
}

/// One layer's drift from its tokens' sums: (mean token cosine, relative L2 ‖a − c‖ / ‖c‖ over
/// the whole layer), the sums over tokens taken in token order.
pub fn drift_of(sums: &[TokenSums]) -> (f64, f64) {
    let (mut cos_sum, mut diff, mut norm) = (0.0f64, 0.0f64, 0.0f64);
    for s in sums {
        cos_sum += s.ac / (s.aa.sqrt() * s.cc.sqrt()).max(1e-12);
        diff += s.dd;
        norm += s.cc;
    }
    (
        cos_sum / sums.len() as f64,
        diff.sqrt() / norm.sqrt().max(1e-12),
    )
}

/// Argmax of a vector: the first index of its largest value; NaNs are passed over, and 0 when
/// nothing exceeds −∞ (the running `v > best` scan's answer, from −∞ at index 0).
///
/// One pass that vectorises: sixteen lanes each keep a running maximum and the index where it was
/// first reached (a lane takes a value only when it is larger, so no NaN enters and ties keep the
/// earlier index, ±0 included, as the scan); the answer is the smallest such index among the
/// lanes that hold the overall maximum, else the first of the remainder that does.
pub fn argmax(v: &[f32]) -> usize {
    const LANES: usize = 16;
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut first = [0u32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for (k, chunk) in chunks.by_ref().enumerate() {
        for j in 0..LANES {
            let larger = chunk[j] > best[j];
            best[j] = if larger { chunk[j] } else { best[j] };
            first[j] = if larger {
                (k * LANES + j) as u32
            } else {
                first[j]
            };
        }
    }
    let max = best
        .iter()
        .chain(chunks.remainder())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    // The lanes' first indices come before every index of the remainder.
    let in_lanes = (0..LANES)
        .filter(|&j| best[j] == max)
        .map(|j| first[j] as usize)
        .min();
    in_lanes.unwrap_or_else(|| {
        let tail = v.len() - chunks.remainder().len();
        tail + chunks
            .remainder()
            .iter()
            .position(|&x| x == max)
            .expect("the maximum is in the remainder")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift values in [0, 1).
    fn uniform(state: &mut u64) -> f32 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Values with many exact ties (a coarse grid), both zeros and, when `specials`, NaN and ±∞.
    fn awkward(state: &mut u64, n: usize, specials: bool) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = uniform(state);
                let pick = (uniform(state) * 20.0) as u32;
                match pick {
                    0 if specials => f32::NAN,
                    1 if specials => f32::NEG_INFINITY,
                    2 if specials && u < 0.3 => f32::INFINITY,
                    3 => -0.0,
                    4 => 0.0,
                    5..=9 => (u * 8.0).floor() / 8.0 - 0.5,
                    _ => u * 2.0 - 1.0,
                }
            })
            .collect()
    }

    fn argmax_by_scan(v: &[f32]) -> usize {
        let (mut best, mut arg) = (f32::NEG_INFINITY, 0);
        for (i, &x) in v.iter().enumerate() {
            if x > best {
                best = x;
                arg = i;
            }
        }
        arg
    }

    #[test]
    fn argmax_is_the_running_scan() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for n in (0..70).chain([150, 1000]) {
            for _ in 0..200 {
                let v = awkward(&mut state, n, true);
                assert_eq!(argmax(&v), argmax_by_scan(&v), "{v:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NAN, -0.0, 0.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
    }

    #[test]
    fn dot_logits_is_one_class_at_a_time_bit_for_bit() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for (rows, dim, classes) in [
            (1, 512, 1000),
            (8, 512, 1000),
            (9, 512, 1000),
            (1201, 512, 150),
            (1200, 768, 64),
            (197, 7, 17),
            (3, 1, 16),
            (9, 1, 40), // products of one pair: −0 sums show the start value
            (16, 2, 33),
            (5, 64, 15),
            (2, 33, 1),
            (4, 8, 0),
            (0, 8, 3),
        ] {
            let a = awkward(&mut state, rows * dim, false);
            let b = awkward(&mut state, classes * dim, false);
            let got = dot_logits(&a, &b, dim);
            let want = dot_logits_one_class_at_a_time(&a, &b, dim);
            assert_eq!(got.len(), want.len());
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "rows {rows} dim {dim} classes {classes}");
        }
    }

    /// Logits that vary smoothly across the grid, with a few ulps of noise.
    fn smooth_logits(
        logits: &mut [f32],
        gh: usize,
        gw: usize,
        classes: usize,
        ties: bool,
        state: &mut u64,
    ) {
        for y in 0..gh {
            for x in 0..gw {
                for c in 0..classes {
                    let (yf, xf, cf) = (y as f32, x as f32, c as f32);
                    let v = 0.2 + 0.1 * (0.3 * yf + cf).sin() * (0.25 * xf + 0.5 * cf).cos();
                    let ulps = (uniform(state) * 8.0) as i32 - 4;
                    logits[(y * gw + x) * classes + c] =
                        f32::from_bits((v.to_bits() as i32 + ulps) as u32);
                }
                if ties && classes >= 3 {
                    let at = (y * gw + x) * classes;
                    logits[at + 1] = logits[at];
                    let step = 1 + (uniform(state) * 2.0) as u32;
                    logits[at + 2] = f32::from_bits(logits[at].to_bits() + step);
                }
            }
        }
    }

    #[test]
    fn upsample_argmax_is_one_class_at_a_time() {
        let mut state = 0x1234_5678_9abc_def1u64;
        for (gh, gw, classes, out_h, out_w) in [
            (30, 40, 150, 480, 640),
            (5, 7, 5, 83, 117),
            (1, 1, 3, 4, 5),
            (2, 3, 1, 7, 2),
            (13, 17, 16, 20, 300),
            (4, 4, 17, 64, 64),
            (3, 9, 33, 2, 5),
        ] {
            for kind in 0..6 {
                let specials = kind == 1;
                let mut logits = awkward(&mut state, gh * gw * classes, specials);
                if kind == 2 {
                    // Near ties: within a few hundred ulps of 0.25 or −0.5 (cosines cluster).
                    for (i, v) in logits.iter_mut().enumerate() {
                        let base: f32 = if i % 3 == 0 { -0.5 } else { 0.25 };
                        let ulps = (uniform(&mut state) * 600.0) as i32 - 300;
                        *v = f32::from_bits((base.to_bits() as i32 + ulps) as u32);
                    }
                }
                if kind >= 3 {
                    // Smooth over the grid, as real logits are: few classes contend in a cell,
                    // so the pruned path runs. Kind 4 makes class 1 a copy of class 0 (exact
                    // ties) and class 2 class 0 moved by an ulp or two (ties within the margin).
                    smooth_logits(&mut logits, gh, gw, classes, kind == 4, &mut state);
                    if kind == 5 && classes >= 2 {
                        // Classes 0 and 1 lead everywhere, class 0 one ulp below class 1: where
                        // the roundings make them equal, class 0 wins. Only the margin keeps it.
                        for cell in logits.chunks_mut(classes) {
                            cell[1] = 0.7;
                            cell[0] = f32::from_bits(0.7f32.to_bits() - 1);
                        }
                    }
                    let pruned = (0..gh.saturating_sub(1) * gw.saturating_sub(1)).any(|k| {
                        let (y, x) = (k / (gw - 1), k % (gw - 1));
                        let at = |y: usize, x: usize| {
                            &logits[(y * gw + x) * classes..(y * gw + x + 1) * classes]
                        };
                        contenders([at(y, x), at(y, x + 1), at(y + 1, x), at(y + 1, x + 1)])
                            .is_some()
                    });
                    assert!(pruned || classes < 8 || gh < 2 || gw < 2, "nothing pruned");
                }
                let got = upsample_argmax(&logits, gh, gw, classes, out_h, out_w);
                let want =
                    upsample_argmax_one_class_at_a_time(&logits, gh, gw, classes, out_h, out_w);
                assert!(
                    got == want,
                    "grid {gh}x{gw}, {classes} classes, {out_h}x{out_w}, kind {kind}"
                );
            }
        }
    }

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
