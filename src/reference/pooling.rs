//! The image embedding a tower pools from its last features F_L, and its gradient.
//!
//! - CLIP ([`ImageHead::Projection`]): `e = ln_post(F_L[CLS]) · Wᵀ`; only the CLS row is read.
//! - SigLIP ([`ImageHead::AttentionPool`]): `y = ln_post(F_L)` over every token, then the
//!   attention-pooling head: `a = out_proj(MHA(probe, y, y))`, `e = a + MLP(LN(a))`.
//! - CLIPA ([`ImageHead::PatchAverage`]): `e = ln_post(mean_t x_t) · Wᵀ` over the patch tokens
//!   (or `mean_t ln_post(x_t) · Wᵀ`, open_clip without `final_ln_after_pool`).
//!
//! SigLIP's query is a constant (the probe), so head h's scores are `y_t · A_h` with
//! `A_h = W_k,hᵀ q_h / √d_h` (`A [H, D]`, formed once per call), and because a head's
//! probabilities sum to one its output is `W_v,h · (Σ_t p_t,h y_t) + b_v,h`. The keys and values
//! `[T, 2D]` are therefore never formed. This is the same function torch computes: the key bias
//! shifts all of a head's scores equally, and softmax ignores a shift. It costs O(T·D·H) per
//! image instead of O(T·D²), which is what lets the GPU engine run it on the host beside the
//! device.
//!
//! The head's vector-by-matrix products (values, out_proj, the MLP, both ways) run over the
//! batch in blocks of images that share each weight row's read, every output with a summation
//! order of its own: an image's embedding and gradient have the same bits alone as in any batch,
//! as the engines' results must (DESIGN §2, Output).
//!
//! Layout: F_L is `[T, D]` row-major per image. For CLIP, the CLS row alone is enough.
//! Precision: f32 storage; the per-image token products on the `gemm` crate, the head's
//! products in f32 lanes summed in f64; f64 LayerNorm statistics and softmax sums.

use rayon::prelude::*;

use super::linalg::{dot_f64 as dot, matmul_nn_serial, matmul_nt_serial, matmul_tn_serial, MatRef};
use super::ops::{activation, activation_backward, layer_norm, layer_norm_backward, softmax_rows};
use crate::model::{AttentionPoolHead, ImageHead, Linear, Model};

/// The image embeddings of a batch, with what their backward needs.
pub struct PooledEmbeddings {
    /// `[images, dim]`, not normalised.
    pub embeddings: Vec<f32>,
    /// The embedding dimension E.
    pub dim: usize,
    tape: Tape,
}

enum Tape {
    /// The post-LayerNorm statistics of each image's CLS row.
    Projection {
        stats: Vec<(f32, f32)>,
    },
    AttentionPool(Box<PoolTape>),
    PatchAverage(Vec<AverageTape>),
}

struct PoolTape {
    /// `A [H, D]`: each head's query folded into its key projection, scaled by `1/√d_h`.
    keys: Vec<f32>,
    images: Vec<ImageTape>,
}

/// What one image's backward needs.
struct ImageTape {
    /// `y = ln_post(F_L)`, `[T, D]`, and its row statistics.
    normed: Vec<f32>,
    stats: Vec<(f32, f32)>,
    /// The attention probabilities `[H, T]`.
    probs: Vec<f32>,
    /// `a [D]`, the attention's output after `out_proj` (the MLP's residual input).
    pooled: Vec<f32>,
    pooled_stats: Vec<(f32, f32)>,
    /// `fc1`'s output before the activation, `[M]`.
    hidden: Vec<f32>,
}

/// Images whose head products run together: each weight row is read once per this many.
const IMAGE_BLOCK: usize = 8;

/// `W · x_i + b` for every row `x_i [k]`, `W [n, k]` row-major: each output is one dot product
/// of fixed order ([`dot_lanes`]) whatever rows share its block, so an image's embedding has
/// the same bits alone as in any batch, while the weight matrix is read once per
/// [`IMAGE_BLOCK`] images rather than once per image (a head's weights are megabytes).
fn rows_times_weight_t(
    xs: &[&[f32]],
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<Vec<f32>> {
    xs.par_chunks(IMAGE_BLOCK)
        .flat_map_iter(|block| {
            let mut outs = vec![vec![0.0f32; n]; block.len()];
            for (j, row) in w.chunks_exact(k).take(n).enumerate() {
                let b = bias.map_or(0.0, |b| b[j]);
                for (x, out) in block.iter().zip(&mut outs) {
                    out[j] = dot_lanes(x, row) + b;
                }
            }
            outs
        })
        .collect()
}

/// `dy_i · W` for every row `dy_i [n]`, `W [n, k]` row-major (a linear layer's input gradient):
/// each output element accumulates its n terms in the same order whatever rows share its block
/// (batch-invariant, as [`rows_times_weight_t`]).
fn rows_times_weight(dys: &[&[f32]], w: &[f32], n: usize, k: usize) -> Vec<Vec<f32>> {
    dys.par_chunks(IMAGE_BLOCK)
        .flat_map_iter(|block| {
            let mut outs = vec![vec![0.0f32; k]; block.len()];
            for (j, row) in w.chunks_exact(k).take(n).enumerate() {
                for (dy, out) in block.iter().zip(&mut outs) {
                    let g = dy[j];
                    out.iter_mut().zip(row).for_each(|(o, &w)| *o += g * w);
                }
            }
            outs
        })
        .collect()
}

/// `Σ a_i b_i` over eight interleaved f32 lanes, added in f64 in a fixed order: a loop that
/// vectorises, with the same value on every machine.
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    for ((l, &x), &y) in lanes.iter_mut().zip(ta).zip(tb) {
        *l += x * y;
    }
    lanes.iter().map(|&l| l as f64).sum::<f64>() as f32
}

/// Borrows each row of a list.
fn rows(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(Vec::as_slice).collect()
}

/// `r_i[from..from + len]` of each row.
fn columns(v: &[Vec<f32>], from: usize, len: usize) -> Vec<&[f32]> {
    v.iter().map(|r| &r[from..from + len]).collect()
}

/// The image embeddings of images whose last features are `last` (`[T_i, D]` each; for CLIP
/// the CLS row alone suffices), or why this tower has none.
pub fn pooled_embeddings(model: &Model, last: &[&[f32]]) -> Result<PooledEmbeddings, String> {
    let head = model.image_head()?;
    let d = model.config.width;
    if let Some(bad) = last.iter().find(|f| f.is_empty() || f.len() % d != 0) {
        return Err(format!(
            "last features of {} values are not rows of width {d}",
            bad.len()
        ));
    }
    Ok(match head {
        ImageHead::Projection(proj) => project_cls(model, proj, last),
        ImageHead::AttentionPool(head) => attention_pool(model, head, last),
        ImageHead::PatchAverage {
            projection,
            norm_first,
        } => patch_average(model, projection, norm_first, last),
    })
}

/// CLIP: `ln_post(cls) · Wᵀ`, one f64 dot product per output.
fn project_cls(model: &Model, proj: &Linear, last: &[&[f32]]) -> PooledEmbeddings {
    let d = model.config.width;
    let cls: Vec<f32> = last.iter().flat_map(|f| f[..d].iter().copied()).collect();
    let mut normed = vec![0.0f32; cls.len()];
    let stats = layer_norm(
        &cls,
        d,
        &model.weights.ln_post,
        model.config.ln_eps,
        &mut normed,
    );
    let embeddings = normed
        .chunks_exact(d)
        .flat_map(|n| project(proj, n))
        .collect();
    PooledEmbeddings {
        embeddings,
        dim: proj.out_features,
        tape: Tape::Projection { stats },
    }
}

/// `W · v`, `W [E, D]`: one f64 dot product per output.
fn project(proj: &Linear, v: &[f32]) -> Vec<f32> {
    proj.weight
        .chunks_exact(proj.in_features)
        .map(|w| dot(w, v) as f32)
        .collect()
}

/// `Wᵀ · g`, the input gradient of [`project`], accumulated in f64.
fn project_backward(proj: &Linear, g: &[f32]) -> Vec<f32> {
    let mut acc = vec![0.0f64; proj.in_features];
    for (row, &g) in proj.weight.chunks_exact(proj.in_features).zip(g) {
        for (a, &w) in acc.iter_mut().zip(row) {
            *a += g as f64 * w as f64;
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// open_clip's average pooling (CLIPA): the patch tokens' mean (f64 sums), then `ln_post` and
/// the projection; with `norm_first`, `ln_post` of every patch token, then their mean.
fn patch_average(
    model: &Model,
    proj: &Linear,
    norm_first: bool,
    last: &[&[f32]],
) -> PooledEmbeddings {
    let (d, lead) = (model.config.width, model.config.class_tokens());
    let ln = &model.weights.ln_post;
    let mean_of = |rows: &[f32]| -> Vec<f32> {
        let n = (rows.len() / d) as f64;
        let mut sum = vec![0.0f64; d];
        for row in rows.chunks_exact(d) {
            sum.iter_mut().zip(row).for_each(|(s, &x)| *s += x as f64);
        }
        sum.into_iter().map(|s| (s / n) as f32).collect()
    };
    let (pooled, tapes): (Vec<Vec<f32>>, Vec<AverageTape>) = last
        .par_iter()
        .map(|f| {
            let patches = &f[lead * d..];
            if norm_first {
                let mut normed = vec![0.0f32; patches.len()];
                let stats = layer_norm(patches, d, ln, model.config.ln_eps, &mut normed);
                let mean = Vec::new(); // the backward needs only the patches' statistics
                (mean_of(&normed), AverageTape { mean, stats })
            } else {
                let mean = mean_of(patches);
                let mut normed = vec![0.0f32; d];
                let stats = layer_norm(&mean, d, ln, model.config.ln_eps, &mut normed);
                (normed, AverageTape { mean, stats })
            }
        })
        .unzip();
    PooledEmbeddings {
        embeddings: pooled.iter().flat_map(|v| project(proj, v)).collect(),
        dim: proj.out_features,
        tape: Tape::PatchAverage(tapes),
    }
}

/// What one image's average-pool backward needs: the mean `[D]` (empty with `norm_first`) and
/// the post-LayerNorm statistics of the mean (or of each patch, `norm_first`).
struct AverageTape {
    mean: Vec<f32>,
    stats: RowStats,
}

fn patch_average_backward(
    model: &Model,
    proj: &Linear,
    norm_first: bool,
    tapes: &[AverageTape],
    last: &[&[f32]],
    d_embeddings: &[f32],
) -> Vec<Vec<f32>> {
    let (d, lead) = (model.config.width, model.config.class_tokens());
    let ln = &model.weights.ln_post;
    last.par_iter()
        .zip(d_embeddings.par_chunks_exact(proj.out_features))
        .zip(tapes)
        .map(|((f, de), tape)| {
            let patches = &f[lead * d..];
            let n = patches.len() / d;
            let d_pooled = project_backward(proj, de);
            let mut grad = vec![0.0f32; f.len()];
            if norm_first {
                // Each patch's normed row gets 1/n of the pooled gradient.
                let share: Vec<f32> = d_pooled.iter().map(|g| g / n as f32).collect();
                let dy: Vec<f32> = share.iter().copied().cycle().take(patches.len()).collect();
                let grad_patches = &mut grad[lead * d..];
                layer_norm_backward(patches, &dy, d, ln, &tape.stats, grad_patches, false);
            } else {
                // Through ln_post at the mean, then 1/n of it to each patch.
                let mut d_mean = vec![0.0f32; d];
                let stats = &tape.stats;
                layer_norm_backward(&tape.mean, &d_pooled, d, ln, stats, &mut d_mean, false);
                for row in grad[lead * d..].chunks_exact_mut(d) {
                    row.iter_mut()
                        .zip(&d_mean)
                        .for_each(|(g, &m)| *g = m / n as f32);
                }
            }
            grad
        })
        .collect()
}

/// SigLIP's attention-pooling head (module docs).
fn attention_pool(model: &Model, head: &AttentionPoolHead, last: &[&[f32]]) -> PooledEmbeddings {
    let c = &model.config;
    let (d, heads, hd) = (c.width, c.heads, c.head_dim());
    let w_in = &head.in_proj.weight;
    let b_in = head.in_proj.bias.as_deref();
    let bias = |j: usize| b_in.map_or(0.0, |b| b[j] as f64);
    // q = W_q · probe + b_q, then A_h = Σ_{j ∈ head h} q_j · W_k[j, :] / √d_h.
    let q: Vec<f64> = (0..d)
        .map(|j| dot(&w_in[j * d..(j + 1) * d], &head.probe) + bias(j))
        .collect();
    let scale = 1.0 / (hd as f64).sqrt();
    let mut keys = vec![0.0f32; heads * d];
    for (h, row) in keys.chunks_exact_mut(d).enumerate() {
        let mut acc = vec![0.0f64; d];
        for j in h * hd..(h + 1) * hd {
            let w_k = &w_in[(d + j) * d..(d + j + 1) * d];
            acc.iter_mut()
                .zip(w_k)
                .for_each(|(a, &w)| *a += q[j] * w as f64);
        }
        row.iter_mut()
            .zip(&acc)
            .for_each(|(r, &a)| *r = (a * scale) as f32);
    }
    // Per image: y = ln_post(F_L), p = softmax_t(A · yᵀ) [H, T], z = p · y [H, D].
    let (attended, mixed): (Vec<Attended>, Vec<Vec<f32>>) = last
        .par_iter()
        .map(|f| {
            let t = f.len() / d;
            let mut normed = vec![0.0f32; f.len()];
            let stats = layer_norm(f, d, &model.weights.ln_post, c.ln_eps, &mut normed);
            let mut probs = vec![0.0f32; heads * t];
            matmul_nt_serial(
                MatRef::new(&keys, heads, d),
                MatRef::new(&normed, t, d),
                &mut probs,
                false,
            );
            softmax_rows(&mut probs, t);
            let mut z = vec![0.0f32; heads * d];
            matmul_nn_serial(
                MatRef::new(&probs, heads, t),
                MatRef::new(&normed, t, d),
                &mut z,
                false,
            );
            (
                Attended {
                    normed,
                    stats,
                    probs,
                },
                z,
            )
        })
        .unzip();
    // The values, o_h = W_v,h · z_h + b_v,h, then a = out_proj(o) and e = a + MLP(LN(a)): the
    // products over the batch, each image's bits its own.
    let mut values = vec![vec![0.0f32; d]; last.len()];
    for h in 0..heads {
        let v = 2 * d + h * hd;
        let o_h = rows_times_weight_t(
            &columns(&mixed, h * d, d),
            &w_in[v * d..(v + hd) * d],
            hd,
            d,
            b_in.map(|b| &b[v..v + hd]),
        );
        for (o, o_h) in values.iter_mut().zip(o_h) {
            o[h * hd..(h + 1) * hd].copy_from_slice(&o_h);
        }
    }
    let pooled = linear_rows(&rows(&values), &head.out_proj);
    let (normed, pooled_stats): (Vec<Vec<f32>>, Vec<RowStats>) = pooled
        .iter()
        .map(|a| {
            let mut n = vec![0.0f32; d];
            let stats = layer_norm(a, d, &head.layer_norm, c.ln_eps, &mut n);
            (n, stats)
        })
        .unzip();
    let hidden = linear_rows(&rows(&normed), &head.fc1);
    let activated: Vec<Vec<f32>> = hidden
        .iter()
        .map(|u| {
            let mut g = u.clone();
            activation(c.activation, &mut g);
            g
        })
        .collect();
    let mlp = linear_rows(&rows(&activated), &head.fc2);
    let mut embeddings = Vec::with_capacity(last.len() * d);
    for (a, m) in pooled.iter().zip(&mlp) {
        embeddings.extend(a.iter().zip(m).map(|(a, m)| a + m));
    }
    let images = attended
        .into_iter()
        .zip(pooled)
        .zip(pooled_stats)
        .zip(hidden)
        .map(|(((att, pooled), pooled_stats), hidden)| ImageTape {
            normed: att.normed,
            stats: att.stats,
            probs: att.probs,
            pooled,
            pooled_stats,
            hidden,
        })
        .collect();
    PooledEmbeddings {
        embeddings,
        dim: d,
        tape: Tape::AttentionPool(Box::new(PoolTape { keys, images })),
    }
}

/// A LayerNorm's `(mean, rstd)` per row.
type RowStats = Vec<(f32, f32)>;

/// One image's attention over its tokens.
struct Attended {
    normed: Vec<f32>,
    stats: Vec<(f32, f32)>,
    probs: Vec<f32>,
}

/// `x_i · Wᵀ + b` of a linear layer for every row (batch-invariant, [`rows_times_weight_t`]).
fn linear_rows(xs: &[&[f32]], l: &Linear) -> Vec<Vec<f32>> {
    rows_times_weight_t(
        xs,
        &l.weight,
        l.out_features,
        l.in_features,
        l.bias.as_deref(),
    )
}

impl PooledEmbeddings {
    /// The gradient with respect to each image's last features (`[T_i, D]`, the shape of
    /// `last[i]`; for CLIP every row but the CLS row is zero) of a loss whose gradient with
    /// respect to the embeddings is `d_embeddings [images, E]`. `last` must be what
    /// [`pooled_embeddings`] was given.
    pub fn backward(&self, model: &Model, last: &[&[f32]], d_embeddings: &[f32]) -> Vec<Vec<f32>> {
        assert_eq!(d_embeddings.len(), self.embeddings.len());
        match (&self.tape, model.image_head()) {
            (Tape::Projection { stats }, Ok(ImageHead::Projection(proj))) => {
                project_cls_backward(model, proj, stats, last, d_embeddings)
            }
            (Tape::AttentionPool(tape), Ok(ImageHead::AttentionPool(head))) => {
                attention_pool_backward(model, head, tape, last, d_embeddings)
            }
            (
                Tape::PatchAverage(tapes),
                Ok(ImageHead::PatchAverage {
                    projection,
                    norm_first,
                }),
            ) => patch_average_backward(model, projection, norm_first, tapes, last, d_embeddings),
            _ => panic!("the embeddings were formed by another model's head"),
        }
    }
}

fn project_cls_backward(
    model: &Model,
    proj: &Linear,
    stats: &[(f32, f32)],
    last: &[&[f32]],
    d_embeddings: &[f32],
) -> Vec<Vec<f32>> {
    let d = model.config.width;
    last.iter()
        .zip(d_embeddings.chunks_exact(proj.out_features))
        .zip(stats)
        .map(|((f, de), &stat)| {
            let d_normed = project_backward(proj, de);
            let mut grad = vec![0.0f32; f.len()];
            layer_norm_backward(
                &f[..d],
                &d_normed,
                d,
                &model.weights.ln_post,
                &[stat],
                &mut grad[..d],
                false,
            );
            grad
        })
        .collect()
}

fn attention_pool_backward(
    model: &Model,
    head: &AttentionPoolHead,
    tape: &PoolTape,
    last: &[&[f32]],
    d_embeddings: &[f32],
) -> Vec<Vec<f32>> {
    let c = &model.config;
    let (d, heads, hd) = (c.width, c.heads, c.head_dim());
    let m = head.fc1.out_features;
    let w_in = &head.in_proj.weight;
    let de: Vec<&[f32]> = d_embeddings.chunks_exact(d).collect();
    // e = a + fc2(act(fc1(LN(a)))): da = de + LN'ᵀ(fc1ᵀ(act' ⊙ fc2ᵀ de)).
    let mut d_hidden = rows_times_weight(&de, &head.fc2.weight, d, m);
    for (g, im) in d_hidden.iter_mut().zip(&tape.images) {
        activation_backward(c.activation, &im.hidden, g);
    }
    let d_normed = rows_times_weight(&rows(&d_hidden), &head.fc1.weight, m, d);
    let d_pooled: Vec<Vec<f32>> = de
        .iter()
        .zip(&d_normed)
        .zip(&tape.images)
        .map(|((de, dn), im)| {
            let mut da = de.to_vec();
            layer_norm_backward(
                &im.pooled,
                dn,
                d,
                &head.layer_norm,
                &im.pooled_stats,
                &mut da,
                true,
            );
            da
        })
        .collect();
    let d_values = rows_times_weight(&rows(&d_pooled), &head.out_proj.weight, d, d);
    // dz_h = W_v,hᵀ · do_h: row i is image i's [H, D].
    let mut d_mixed = vec![vec![0.0f32; heads * d]; last.len()];
    for h in 0..heads {
        let v = 2 * d + h * hd;
        let dz_h = rows_times_weight(
            &columns(&d_values, h * hd, hd),
            &w_in[v * d..(v + hd) * d],
            hd,
            d,
        );
        for (dz, dz_h) in d_mixed.iter_mut().zip(dz_h) {
            dz[h * d..(h + 1) * d].copy_from_slice(&dz_h);
        }
    }
    last.par_iter()
        .zip(&tape.images)
        .zip(&d_mixed)
        .map(|((f, im), dz)| {
            let t = f.len() / d;
            // dp = dz · yᵀ [H, T]; ds = p ⊙ (dp − Σ_t p·dp) (softmax); dy = pᵀ·dz + dsᵀ·A.
            let mut ds = vec![0.0f32; heads * t];
            matmul_nt_serial(
                MatRef::new(dz, heads, d),
                MatRef::new(&im.normed, t, d),
                &mut ds,
                false,
            );
            for (ds, p) in ds.chunks_exact_mut(t).zip(im.probs.chunks_exact(t)) {
                let mean = dot(ds, p);
                for (g, &p) in ds.iter_mut().zip(p) {
                    *g = (p as f64 * (*g as f64 - mean)) as f32;
                }
            }
            let mut dy = vec![0.0f32; f.len()];
            matmul_tn_serial(
                MatRef::new(&im.probs, heads, t),
                MatRef::new(dz, heads, d),
                &mut dy,
                false,
            );
            matmul_tn_serial(
                MatRef::new(&ds, heads, t),
                MatRef::new(&tape.keys, heads, d),
                &mut dy,
                true,
            );
            let mut grad = vec![0.0f32; f.len()];
            layer_norm_backward(
                f,
                &dy,
                d,
                &model.weights.ln_post,
                &im.stats,
                &mut grad,
                false,
            );
            grad
        })
        .collect()
}
