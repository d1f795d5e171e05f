//! The ViT vision tower on the CPU: forward to the residual-stream features F_0..F_L, and the
//! backward from gradients injected at any subset of those features down to the input pixels.
//!
//! F_0 is `ln_pre([CLS; patches] + pos)` (the tokens themselves in a tower without LN_pre); F_l is the residual stream after block l. Only input
//! gradients are formed, never weight gradients. The forward keeps what the backward needs
//! (per block: q/k/v, the mid-block residual, the MLP pre-activation and LayerNorm statistics);
//! attention probabilities are recomputed in the backward because they grow with T².

use rayon::prelude::*;

use super::embedding::{embed, embed_backward, patch_grid};
use super::linalg::{matmul_nn, transpose, MatRef};
use super::ops::{
    activation, activation_backward, attention, attention_backward, layer_norm, layer_norm_backward,
};
use super::resize::PositionEmbeddingCache;
use crate::model::{BlockWeights, Linear, Model};

/// Saved activations of one block.
struct BlockTrace {
    ln1_stats: Vec<(f32, f32)>,
    qkv: Vec<f32>,
    mid: Vec<f32>,
    ln2_stats: Vec<(f32, f32)>,
    mlp_pre: Vec<f32>,
}

/// The features of one image and, when requested, what the backward needs.
pub struct Forward {
    pub height: usize,
    pub width: usize,
    pub tokens: usize,
    /// F_0..F_L, each `[tokens, D]`.
    pub features: Vec<Vec<f32>>,
    embedded: Vec<f32>,
    ln_pre_stats: Vec<(f32, f32)>,
    blocks: Vec<BlockTrace>,
    saved: bool,
}

/// Rows per rayon task when adding a bias.
const ROWS_PER_TASK: usize = 16;

/// A block's linear weights transposed to `[in, out]`, made once per engine, for the forward.
///
/// Why: the forward's `x · Wᵀ` with `W` stored `[out, in]` makes the gemm crate pack `W` by a
/// strided transposition on every call (measured 5–30% slower than the same product with `W`
/// stored `[in, out]`, at ViT-B/16's shapes on one AVX-512 core). The backward's `dy · W` reads
/// the stored `W` as it is. The price is a second copy of the block weights (~340 MB for
/// ViT-B/16, ~1.2 GB for ViT-L/14) for the engine's lifetime.
struct ForwardWeights {
    qkv: Vec<f32>,
    out_proj: Vec<f32>,
    fc1: Vec<f32>,
    fc2: Vec<f32>,
}

impl ForwardWeights {
    fn new(b: &BlockWeights) -> Self {
        let t = |l: &Linear| transpose(&l.weight, l.out_features, l.in_features);
        ForwardWeights {
            qkv: t(&b.qkv),
            out_proj: t(&b.out_proj),
            fc1: t(&b.fc1),
            fc2: t(&b.fc2),
        }
    }
}

/// The reference engine for one model. Holds the per-grid position-embedding cache and the
/// transposed block weights of the forward.
pub struct ReferenceVit<'m> {
    model: &'m Model,
    positions: PositionEmbeddingCache,
    forward_weights: Vec<ForwardWeights>,
}

/// `out (+)= x · Wᵀ + bias`, with `weight_t` = `Wᵀ` (`[in, out]`).
fn linear(x: &[f32], rows: usize, l: &Linear, weight_t: &[f32], out: &mut [f32], accumulate: bool) {
    matmul_nn(
        MatRef::new(x, rows, l.in_features),
        MatRef::new(weight_t, l.in_features, l.out_features),
        out,
        accumulate,
    );
    if let Some(b) = &l.bias {
        out.par_chunks_mut(l.out_features * ROWS_PER_TASK)
            .for_each(|rows| {
                rows.chunks_mut(l.out_features)
                    .for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b))
            });
    }
}

/// `dx (+)= dy · W`, the input gradient of [`linear`].
fn linear_backward(dy: &[f32], rows: usize, l: &Linear, dx: &mut [f32], accumulate: bool) {
    matmul_nn(
        MatRef::new(dy, rows, l.out_features),
        MatRef::new(&l.weight, l.out_features, l.in_features),
        dx,
        accumulate,
    );
}

impl<'m> ReferenceVit<'m> {
    pub fn new(model: &'m Model) -> Self {
        let c = &model.config;
        let positions =
            PositionEmbeddingCache::new(model.weights.position_embedding.clone(), c.width, c.grid);
        let forward_weights = model
            .weights
            .blocks
            .iter()
            .map(ForwardWeights::new)
            .collect();
        ReferenceVit {
            model,
            positions,
            forward_weights,
        }
    }

    pub fn model(&self) -> &Model {
        self.model
    }

    /// Runs the tower on a planar `[3, height, width]` image in [0, 1]. With `save`, keeps the
    /// activations for [`ReferenceVit::backward`].
    pub fn forward(&self, image: &[f32], height: usize, width: usize, save: bool) -> Forward {
        self.forward_blocks(image, height, width, save, self.model.config.layers)
    }

    /// [`ReferenceVit::forward`] through the first `blocks` transformer blocks only: features
    /// F_0..F_blocks (a loss that reads no deeper layer needs no more).
    pub fn forward_blocks(
        &self,
        image: &[f32],
        height: usize,
        width: usize,
        save: bool,
        blocks: usize,
    ) -> Forward {
        let cfg = &self.model.config;
        assert!(
            blocks <= cfg.layers,
            "{blocks} blocks asked of a {}-block tower",
            cfg.layers
        );
        let w = &self.model.weights;
        let (gh, gw) = patch_grid(height, width, cfg.patch);
        assert!(
            gh > 0 && gw > 0,
            "image {width}x{height} is smaller than one {}-pixel patch",
            cfg.patch
        );
        let t = cfg.tokens(gh, gw);
        let d = cfg.width;
        let pos = self.positions.get(gh, gw);
        let mut embedded = embed(
            image,
            height,
            width,
            cfg,
            &w.patch_embed,
            w.class_embedding.as_deref(),
            &pos,
        );
        // F_0 = LN_pre(tokens), or the tokens themselves in a tower without LN_pre.
        let (f0, ln_pre_stats) = match &w.ln_pre {
            Some(ln) => {
                let mut f0 = vec![0.0f32; t * d];
                let stats = layer_norm(&embedded, d, ln, cfg.ln_eps, &mut f0);
                (f0, stats)
            }
            // The backward needs the tokens only for LN_pre's backward.
            None => (std::mem::take(&mut embedded), Vec::new()),
        };

        let run = blocks;
        let mut features = Vec::with_capacity(run + 1);
        let mut blocks = Vec::with_capacity(if save { run } else { 0 });
        features.push(f0);
        let mut normed = vec![0.0f32; t * d];
        let mut context = vec![0.0f32; t * d];
        for (b, bt) in w.blocks.iter().zip(&self.forward_weights).take(run) {
            let x = features.last().expect("F_0 exists");
            let ln1_stats = layer_norm(x, d, &b.ln1, cfg.ln_eps, &mut normed);
            let mut qkv = vec![0.0f32; t * 3 * d];
            linear(&normed, t, &b.qkv, &bt.qkv, &mut qkv, false);
            attention(&qkv, t, d, cfg.heads, &mut context);
            let mut mid = x.clone();
            linear(&context, t, &b.out_proj, &bt.out_proj, &mut mid, true);
            let ln2_stats = layer_norm(&mid, d, &b.ln2, cfg.ln_eps, &mut normed);
            let mut mlp_pre = vec![0.0f32; t * cfg.mlp];
            linear(&normed, t, &b.fc1, &bt.fc1, &mut mlp_pre, false);
            let mut hidden = mlp_pre.clone();
            activation(cfg.activation, &mut hidden);
            let mut out = mid.clone();
            linear(&hidden, t, &b.fc2, &bt.fc2, &mut out, true);
            features.push(out);
            if save {
                blocks.push(BlockTrace {
                    ln1_stats,
                    qkv,
                    mid,
                    ln2_stats,
                    mlp_pre,
                });
            }
        }
        Forward {
            height,
            width,
            tokens: t,
            features,
            embedded,
            ln_pre_stats,
            blocks,
            saved: save,
        }
    }

    /// Input-pixel gradient `[3, height, width]` from `feature_grads[l]` = dL/dF_l (`None` where
    /// the loss does not read F_l). Requires a forward run with `save = true`; after
    /// [`ReferenceVit::forward_blocks`], the layers past its last block must have no gradient.
    pub fn backward(&self, fwd: &Forward, feature_grads: &[Option<Vec<f32>>]) -> Vec<f32> {
        let cfg = &self.model.config;
        let w = &self.model.weights;
        assert!(fwd.saved, "backward needs a forward run with save = true");
        assert_eq!(
            feature_grads.len(),
            cfg.layers + 1,
            "one optional gradient per feature layer F_0..F_L"
        );
        assert!(
            feature_grads[fwd.features.len()..]
                .iter()
                .all(Option::is_none),
            "a feature gradient past the forward's last block ({})",
            fwd.blocks.len()
        );
        let (t, d) = (fwd.tokens, cfg.width);
        let mut dh = vec![0.0f32; t * d];
        let add = |dh: &mut Vec<f32>, g: &Option<Vec<f32>>| {
            if let Some(g) = g {
                assert_eq!(g.len(), t * d, "feature gradient has the wrong shape");
                dh.iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
        };
        let mut d_normed = vec![0.0f32; t * d];
        let mut d_context = vec![0.0f32; t * d];
        for (l, (b, tr)) in w.blocks.iter().zip(&fwd.blocks).enumerate().rev() {
            add(&mut dh, &feature_grads[l + 1]);
            // out = mid + fc2(act(fc1(LN2(mid))))
            let mut d_hidden = vec![0.0f32; t * cfg.mlp];
            linear_backward(&dh, t, &b.fc2, &mut d_hidden, false);
            activation_backward(cfg.activation, &tr.mlp_pre, &mut d_hidden);
            linear_backward(&d_hidden, t, &b.fc1, &mut d_normed, false);
            layer_norm_backward(&tr.mid, &d_normed, d, &b.ln2, &tr.ln2_stats, &mut dh, true);
            // mid = x + out_proj(attn(LN1(x)))
            linear_backward(&dh, t, &b.out_proj, &mut d_context, false);
            let d_qkv = attention_backward(&tr.qkv, &d_context, t, d, cfg.heads);
            linear_backward(&d_qkv, t, &b.qkv, &mut d_normed, false);
            layer_norm_backward(
                &fwd.features[l],
                &d_normed,
                d,
                &b.ln1,
                &tr.ln1_stats,
                &mut dh,
                true,
            );
        }
        add(&mut dh, &feature_grads[0]);
        let d_embedded = match &w.ln_pre {
            Some(ln) => {
                let mut d_embedded = vec![0.0f32; t * d];
                layer_norm_backward(
                    &fwd.embedded,
                    &dh,
                    d,
                    ln,
                    &fwd.ln_pre_stats,
                    &mut d_embedded,
                    false,
                );
                d_embedded
            }
            None => dh,
        };
        embed_backward(&d_embedded, fwd.height, fwd.width, cfg, &w.patch_embed)
    }
}
