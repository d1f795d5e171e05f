//! The attack objectives and their gradients with respect to the features they read.
//!
//! Each loss returns its value, its per-layer terms, and dL/dF_l for the layers it reads, ready
//! to be injected into the engine's backward. Clean features never carry gradient.

use super::settings::{LossKind, TokenSelection};
use crate::model::Model;
use crate::reference::linalg::dot_f64 as dot;
use crate::reference::pooling::pooled_embeddings;

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
            let clean_embedding = embeddings(model, &[&clean[last]]);
            let (values, g) = embed_losses(model, &[&adv[last]], &clean_embedding, with_grad);
            if let Some(mut g) = g {
                grads[last] = g.pop();
            }
            return LossValue {
                value: values[0],
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

/// The image embeddings `[images, E]` (not normalised) of images whose last features are
/// `last` ([`crate::reference::pooling`]). The tower must have an image embedding, which
/// [`Objective::new`] checks for the embed loss.
pub fn embeddings(model: &Model, last: &[&[f32]]) -> Vec<f32> {
    pooled_embeddings(model, last)
        .expect("checked in Objective::new")
        .embeddings
}

/// The embed loss of each image, cos(embed(adv_i), clean_i) against the clean embeddings
/// `clean [images, E]` ([`embeddings`]), and with `with_grad` its gradient with respect to
/// each image's last features (the shape of `adv_last[i]`).
pub fn embed_losses(
    model: &Model,
    adv_last: &[&[f32]],
    clean: &[f32],
    with_grad: bool,
) -> (Vec<f64>, Option<Vec<Vec<f32>>>) {
    let adv = pooled_embeddings(model, adv_last).expect("checked in Objective::new");
    let e = adv.dim;
    assert_eq!(
        clean.len(),
        adv.embeddings.len(),
        "one clean embedding per image"
    );
    let mut d_embed = vec![0.0f32; if with_grad { clean.len() } else { 0 }];
    let values = adv
        .embeddings
        .chunks_exact(e)
        .zip(clean.chunks_exact(e))
        .enumerate()
        .map(|(i, (a, c))| {
            let grad = with_grad.then(|| &mut d_embed[i * e..(i + 1) * e]);
            mean_token_cosine(a, c, e, TokenSelection::All, grad)
        })
        .collect();
    let grads = with_grad.then(|| adv.backward(model, adv_last, &d_embed));
    (values, grads)
}
