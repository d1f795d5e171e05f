//! The image embedding a tower pools from its last features F_L, and its gradient.
//!
//! - CLIP ([`ImageHead::Projection`]): `e = ln_post(F_L[CLS]) · Wᵀ`; only the CLS row is read.
//! - SigLIP ([`ImageHead::AttentionPool`]): `y = ln_post(F_L)` over every token, then the
//!   attention-pooling head: `a = out_proj(MHA(probe, y, y))`, `e = a + MLP(LN(a))`.
//!
//! The head's query is a constant (the probe), so head h's scores are `y_t · A_h` with
//! `A_h = W_k,hᵀ q_h / √d_h` (`A [H, D]`, formed once per call), and because a head's
//! probabilities sum to one its output is `W_v,h · (Σ_t p_t,h y_t) + b_v,h`. The keys and values
//! `[T, 2D]` are therefore never formed. This is the same function torch computes: the key bias
//! shifts all of a head's scores equally, and softmax ignores a shift. It costs O(T·D·H) per
//! image instead of O(T·D²), which is what lets the GPU engine run it on the host beside the
//! device.
//!
//! Layout: F_L is `[T, D]` row-major per image. For CLIP, the CLS row alone is enough.
//! Precision: f32 storage and matrix products (the `gemm` crate), with f64 dot products,
//! LayerNorm statistics and softmax sums.

use rayon::prelude::*;

use super::linalg::{matmul_nn_serial, matmul_nt_serial, matmul_tn_serial, MatRef};
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
}

struct PoolTape {
    /// `A [H, D]`: each head's query folded into its key projection, scaled by `1/√d_h`.
    keys: Vec<f32>,
    images: Vec<ImageTape>,
}

/// What one image's backward needs. Each image goes through the head on its own, with
/// products of one row, so its embedding has the same bits alone as in any batch.
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

/// `x · Wᵀ + b` for one row `x`, single-threaded (inside the per-image loop).
fn linear_row(x: &[f32], l: &Linear, out: &mut [f32], accumulate: bool) {
    matmul_nt_serial(
        MatRef::new(x, 1, l.in_features),
        MatRef::new(&l.weight, l.out_features, l.in_features),
        out,
        accumulate,
    );
    if let Some(b) = &l.bias {
        out.iter_mut().zip(b).for_each(|(o, b)| *o += b);
    }
}

/// `dy · W` for one row `dy`, the input gradient of [`linear_row`].
fn linear_row_backward(dy: &[f32], l: &Linear) -> Vec<f32> {
    let mut dx = vec![0.0f32; l.in_features];
    matmul_nn_serial(
        MatRef::new(dy, 1, l.out_features),
        MatRef::new(&l.weight, l.out_features, l.in_features),
        &mut dx,
        false,
    );
    dx
}

/// `Σ a_i b_i` in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
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
        .flat_map(|n| proj.weight.chunks_exact(d).map(move |w| dot(w, n) as f32))
        .collect();
    PooledEmbeddings {
        embeddings,
        dim: proj.out_features,
        tape: Tape::Projection { stats },
    }
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
    let (tapes, embeddings): (Vec<ImageTape>, Vec<Vec<f32>>) = last
        .par_iter()
        .map(|f| {
            // y = ln_post(F_L), p = softmax_t(A · yᵀ) [H, T], z = p · y [H, D].
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
            let mut mixed = vec![0.0f32; heads * d];
            matmul_nn_serial(
                MatRef::new(&probs, heads, t),
                MatRef::new(&normed, t, d),
                &mut mixed,
                false,
            );
            // The values: o_h = W_v,h · z_h + b_v,h.
            let mut values = vec![0.0f32; d];
            for (h, o) in values.chunks_exact_mut(hd).enumerate() {
                matmul_nt_serial(
                    MatRef::new(&mixed[h * d..], 1, d),
                    MatRef::new(&w_in[(2 * d + h * hd) * d..], hd, d),
                    o,
                    false,
                );
                if let Some(b) = b_in {
                    o.iter_mut()
                        .zip(&b[2 * d + h * hd..])
                        .for_each(|(o, b)| *o += b);
                }
            }
            // a = out_proj(o); e = a + fc2(act(fc1(LN(a)))).
            let mut pooled = vec![0.0f32; d];
            linear_row(&values, &head.out_proj, &mut pooled, false);
            let mut pooled_normed = vec![0.0f32; d];
            let pooled_stats =
                layer_norm(&pooled, d, &head.layer_norm, c.ln_eps, &mut pooled_normed);
            let mut hidden = vec![0.0f32; head.fc1.out_features];
            linear_row(&pooled_normed, &head.fc1, &mut hidden, false);
            let mut activated = hidden.clone();
            activation(c.activation, &mut activated);
            let mut embedding = pooled.clone();
            linear_row(&activated, &head.fc2, &mut embedding, true);
            let tape = ImageTape {
                normed,
                stats,
                probs,
                pooled,
                pooled_stats,
                hidden,
            };
            (tape, embedding)
        })
        .unzip();
    PooledEmbeddings {
        embeddings: embeddings.concat(),
        dim: d,
        tape: Tape::AttentionPool(Box::new(PoolTape {
            keys,
            images: tapes,
        })),
    }
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
            // d normed = d_embed · W   (W is [E, D])
            let mut d_normed = vec![0.0f64; d];
            for (row, &g) in proj.weight.chunks_exact(d).zip(de) {
                for (acc, &w) in d_normed.iter_mut().zip(row) {
                    *acc += g as f64 * w as f64;
                }
            }
            let d_normed: Vec<f32> = d_normed.into_iter().map(|v| v as f32).collect();
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
    let w_in = &head.in_proj.weight;
    last.par_iter()
        .zip(&tape.images)
        .zip(d_embeddings.par_chunks_exact(d))
        .map(|((f, im), de)| {
            let t = f.len() / d;
            // e = a + fc2(act(fc1(LN(a)))): da = de + LN'ᵀ(fc1ᵀ(act' ⊙ fc2ᵀ de)).
            let mut d_hidden = linear_row_backward(de, &head.fc2);
            activation_backward(c.activation, &im.hidden, &mut d_hidden);
            let d_normed = linear_row_backward(&d_hidden, &head.fc1);
            let mut d_pooled = de.to_vec();
            layer_norm_backward(
                &im.pooled,
                &d_normed,
                d,
                &head.layer_norm,
                &im.pooled_stats,
                &mut d_pooled,
                true,
            );
            let d_values = linear_row_backward(&d_pooled, &head.out_proj);
            // dz_h = W_v,hᵀ · do_h  [H, D].
            let mut dz = vec![0.0f32; heads * d];
            for (h, dz) in dz.chunks_exact_mut(d).enumerate() {
                matmul_nn_serial(
                    MatRef::new(&d_values[h * hd..], 1, hd),
                    MatRef::new(&w_in[(2 * d + h * hd) * d..], hd, d),
                    dz,
                    false,
                );
            }
            // dp = dz · yᵀ [H, T]; ds = p ⊙ (dp − Σ_t p·dp) (softmax); dy = pᵀ·dz + dsᵀ·A.
            let mut ds = vec![0.0f32; heads * t];
            matmul_nt_serial(
                MatRef::new(&dz, heads, d),
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
                MatRef::new(&dz, heads, d),
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
