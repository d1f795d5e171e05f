//! The attack objectives and their gradients with respect to the features they read.
//!
//! Each loss returns its value, its per-layer terms, and dL/dF_l for the layers it reads, ready
//! to be injected into the engine's backward. Clean features never carry gradient.

use super::settings::{LossKind, TokenSelection};
use crate::model::Model;
use crate::reference::ops::{layer_norm, layer_norm_backward};

/// Norms below this are treated as this, as `torch.nn.functional.normalize` does (eps 1e-12).
const NORM_FLOOR: f64 = 1e-12;

/// A loss bound to a model's layer count and a token selection.
#[derive(Clone, Debug)]
pub struct Objective {
    pub kind: LossKind,
    /// Selected feature layers, sorted, within 0..=L.
    pub layers: Vec<usize>,
    pub tokens: TokenSelection,
    feature_layers: usize,
}

/// The value of a loss at one point and, optionally, its feature gradients.
#[derive(Clone, Debug)]
pub struct LossValue {
    pub value: f64,
    /// dL/dF_l per feature layer (None where the loss does not read F_l); empty without gradient.
    pub feature_grads: Vec<Option<Vec<f32>>>,
}

fn selected_rows(tokens: usize, sel: TokenSelection) -> std::ops::Range<usize> {
    match sel {
        TokenSelection::All => 0..tokens,
        TokenSelection::Patch => 1..tokens,
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Mean over the selected tokens of cos(a_t, c_t), and optionally its gradient w.r.t. `a`.
pub fn mean_token_cosine(
    a: &[f32],
    c: &[f32],
    dim: usize,
    sel: TokenSelection,
    grad: Option<&mut [f32]>,
) -> f64 {
    let rows = selected_rows(a.len() / dim, sel);
    let n = rows.len() as f64;
    let mut total = 0.0;
    let mut grad = grad;
    if let Some(g) = grad.as_deref_mut() {
        g.fill(0.0);
    }
    for t in rows {
        let (at, ct) = (&a[t * dim..(t + 1) * dim], &c[t * dim..(t + 1) * dim]);
        let na = dot(at, at).sqrt().max(NORM_FLOOR);
        let nc = dot(ct, ct).sqrt().max(NORM_FLOOR);
        let cos = dot(at, ct) / (na * nc);
        total += cos;
        if let Some(g) = grad.as_deref_mut() {
            // d cos / d a = c / (|a||c|) − cos · a / |a|²
            let (u, w) = (1.0 / (na * nc * n), cos / (na * na * n));
            for ((gi, &ai), &ci) in g[t * dim..(t + 1) * dim].iter_mut().zip(at).zip(ct) {
                *gi = (ci as f64 * u - ai as f64 * w) as f32;
            }
        }
    }
    total / n
}

/// Per-layer mean token cosine between two feature stacks (all layers), for reports.
pub fn layer_cosines(
    adv: &[Vec<f32>],
    clean: &[Vec<f32>],
    dim: usize,
    sel: TokenSelection,
) -> Vec<f64> {
    adv.iter()
        .zip(clean)
        .map(|(a, c)| mean_token_cosine(a, c, dim, sel, None))
        .collect()
}

impl Objective {
    pub fn new(
        kind: LossKind,
        layers: Vec<usize>,
        tokens: TokenSelection,
        model: &Model,
    ) -> Result<Self, String> {
        let feature_layers = model.config.feature_layers();
        if let Some(&bad) = layers.iter().find(|&&l| l >= feature_layers) {
            return Err(format!(
                "layer {bad} does not exist: this model has features F_0..F_{}",
                feature_layers - 1
            ));
        }
        if kind == LossKind::Embed {
            if let Some(reason) = model.image_embedding_unavailable() {
                return Err(format!(
                    "--loss embed needs the image embedding, and {reason}"
                ));
            }
        }
        // Without a class token every token is a patch token: `patch` selects them all, and
        // skipping the first row would drop a patch.
        let tokens = if model.config.class_token {
            tokens
        } else {
            TokenSelection::All
        };
        Ok(Objective {
            kind,
            layers,
            tokens,
            feature_layers,
        })
    }

    /// The transformer blocks a forward must run for this loss. F_l is block l's output (F_0
    /// the embedding's), so it is the deepest selected layer (`embed` reads the last): the
    /// blocks above it can change neither the loss nor its gradient, which is exactly zero
    /// there, so the engines neither run them forward nor carry that zero back through them.
    pub fn blocks_needed(&self) -> usize {
        match self.kind {
            LossKind::Embed => self.feature_layers - 1,
            _ => self.layers.iter().copied().max().unwrap_or(0),
        }
    }

    /// Evaluates the loss at features `adv` against `clean` (both F_0..F_L, `[T, D]` each).
    pub fn evaluate(
        &self,
        model: &Model,
        adv: &[Vec<f32>],
        clean: &[Vec<f32>],
        with_grad: bool,
    ) -> LossValue {
        let dim = model.config.width;
        let mut grads: Vec<Option<Vec<f32>>> = if with_grad {
            vec![None; self.feature_layers]
        } else {
            Vec::new()
        };
        if self.kind == LossKind::Embed {
            let last = self.feature_layers - 1;
            let (value, g) = embed_cosine(model, &adv[last][..dim], &clean[last][..dim], with_grad);
            if let Some(g) = g {
                let mut full = vec![0.0f32; adv[last].len()];
                full[..dim].copy_from_slice(&g);
                grads[last] = Some(full);
            }
            return LossValue {
                value,
                feature_grads: grads,
            };
        }
        let mut value = 0.0;
        for &l in &self.layers {
            let (a, c) = (&adv[l], &clean[l]);
            let mut g = if with_grad {
                Some(vec![0.0f32; a.len()])
            } else {
                None
            };
            value += match self.kind {
                LossKind::Prm => mean_token_cosine(a, c, dim, self.tokens, g.as_deref_mut()),
                LossKind::Nrd => {
                    neg_mean_squared_distance(a, c, dim, self.tokens, g.as_deref_mut())
                }
                LossKind::Dr => dispersion(a, dim, self.tokens, 1.0, g.as_deref_mut()),
                LossKind::DrOfficial => dispersion(a, dim, self.tokens, -1.0, g.as_deref_mut()),
                LossKind::Embed => unreachable!("handled above"),
            };
            if with_grad {
                grads[l] = g;
            }
        }
        LossValue {
            value,
            feature_grads: grads,
        }
    }
}

/// −mean_{t,d} (a − c)² over the selected tokens.
fn neg_mean_squared_distance(
    a: &[f32],
    c: &[f32],
    dim: usize,
    sel: TokenSelection,
    grad: Option<&mut [f32]>,
) -> f64 {
    let rows = selected_rows(a.len() / dim, sel);
    let range = rows.start * dim..rows.end * dim;
    let n = range.len() as f64;
    let sum: f64 = a[range.clone()]
        .iter()
        .zip(&c[range.clone()])
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    if let Some(g) = grad {
        g.fill(0.0);
        for i in range {
            g[i] = (-2.0 * (a[i] as f64 - c[i] as f64) / n) as f32;
        }
    }
    -sum / n
}

/// `sign · std(a)` over all selected elements, with torch's default unbiased estimator.
fn dispersion(
    a: &[f32],
    dim: usize,
    sel: TokenSelection,
    sign: f64,
    grad: Option<&mut [f32]>,
) -> f64 {
    let rows = selected_rows(a.len() / dim, sel);
    let range = rows.start * dim..rows.end * dim;
    let n = range.len() as f64;
    let mean = a[range.clone()].iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = a[range.clone()]
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    let std = var.sqrt();
    if let Some(g) = grad {
        g.fill(0.0);
        let scale = sign / ((n - 1.0) * std.max(NORM_FLOOR));
        for i in range {
            g[i] = ((a[i] as f64 - mean) * scale) as f32;
        }
    }
    sign * std
}

/// `ln_post(cls) · Wᵀ`, the CLIP image embedding, with the LayerNorm statistics for the backward.
fn image_embedding(model: &Model, cls: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<(f32, f32)>) {
    let w = &model.weights;
    let proj = w.projection.as_ref().expect("checked in Objective::new");
    let mut normed = vec![0.0f32; cls.len()];
    let stats = layer_norm(cls, cls.len(), &w.ln_post, model.config.ln_eps, &mut normed);
    let embed: Vec<f32> = proj
        .weight
        .chunks(proj.in_features)
        .map(|row| dot(row, &normed) as f32)
        .collect();
    (embed, normed, stats)
}

/// cos(embed(adv CLS), embed(clean CLS)) and its gradient w.r.t. the adversarial CLS row.
fn embed_cosine(
    model: &Model,
    adv_cls: &[f32],
    clean_cls: &[f32],
    with_grad: bool,
) -> (f64, Option<Vec<f32>>) {
    let (ea, _, stats) = image_embedding(model, adv_cls);
    let (ec, _, _) = image_embedding(model, clean_cls);
    let e = ea.len();
    let mut d_embed = vec![0.0f32; e];
    let value = mean_token_cosine(
        &ea,
        &ec,
        e,
        TokenSelection::All,
        with_grad.then_some(&mut d_embed[..]),
    );
    if !with_grad {
        return (value, None);
    }
    let proj = model
        .weights
        .projection
        .as_ref()
        .expect("checked in Objective::new");
    let d = adv_cls.len();
    // d normed = d_embed · W   (W is [E, D])
    let mut d_normed = vec![0.0f64; d];
    for (row, &g) in proj.weight.chunks(proj.in_features).zip(&d_embed) {
        for (acc, &wv) in d_normed.iter_mut().zip(row) {
            *acc += g as f64 * wv as f64;
        }
    }
    let d_normed: Vec<f32> = d_normed.into_iter().map(|v| v as f32).collect();
    let mut d_cls = vec![0.0f32; d];
    layer_norm_backward(
        adv_cls,
        &d_normed,
        d,
        &model.weights.ln_post,
        &stats,
        &mut d_cls,
        false,
    );
    (value, Some(d_cls))
}
