//! The downstream targets, each a model assembled from a CLIP vision tower, and the engine
//! trait that runs them on any device.
//!
//! Dense targets (the MaskCLIP family) take x, the residual stream entering the last block
//! (F_{L−1}), and replace that block:
//! - **maskclip**: `o = out_proj(v_proj(LN1(x)))` (no q·k attention), `z = x + o`,
//!   `z = z + MLP(LN2(z))`;
//! - **sclip**: `o = out_proj(softmax(q·qᵀ·s)·v + softmax(k·kᵀ·s)·v)`, residual and FFN kept;
//! - **clearclip**: `z = out_proj(softmax(q·qᵀ·s)·v)`, no residual, no FFN.
//!
//! Then, for every token: post-LayerNorm, the visual projection, L2 normalisation; the cosine
//! with each class embedding gives the patch logits `[gh·gw, C]` (CLS dropped). Upsampling and
//! argmax happen on the host ([`super::ops::upsample_argmax`]) for every device. `s` is
//! `1/√head_dim`, the model's own attention scale.
//!
//! **zeroshot** is the CLS image embedding (post-LN, projection, normalised) against the class
//! embeddings. **features** compares F_0..F_L. **probe** applies a user linear head to one
//! layer's tokens.

use rayon::prelude::*;

use super::ops::{
    attention_variant, dot_logits, linear, linear_rows, normalize_rows, token_sums, Scores,
    TokenSums,
};
use super::EvalError;
use crate::attack::image::Planar;
use crate::model::{ImageHead, Model};
use crate::reference::ops::{activation, layer_norm};
use crate::reference::pooling::pooled_embeddings;
use crate::reference::ReferenceVit;

/// A downstream target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    MaskClip,
    Sclip,
    ClearClip,
    ZeroShot,
    Features,
    Probe,
}

impl TargetKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "maskclip" => TargetKind::MaskClip,
            "sclip" => TargetKind::Sclip,
            "clearclip" => TargetKind::ClearClip,
            "zeroshot" => TargetKind::ZeroShot,
            "features" => TargetKind::Features,
            "probe" => TargetKind::Probe,
            other => {
                return Err(format!(
                    "unknown target `{other}`; known: maskclip, sclip, clearclip, zeroshot, \
                     features, probe"
                ))
            }
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::MaskClip => "maskclip",
            TargetKind::Sclip => "sclip",
            TargetKind::ClearClip => "clearclip",
            TargetKind::ZeroShot => "zeroshot",
            TargetKind::Features => "features",
            TargetKind::Probe => "probe",
        }
    }
    /// The targets whose output is a label map.
    pub fn is_dense(self) -> bool {
        matches!(
            self,
            TargetKind::MaskClip | TargetKind::Sclip | TargetKind::ClearClip
        )
    }
}

/// The replacement of the last block used by a dense target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseHead {
    MaskClip,
    Sclip,
    ClearClip,
}

impl DenseHead {
    pub fn of(kind: TargetKind) -> Option<Self> {
        match kind {
            TargetKind::MaskClip => Some(DenseHead::MaskClip),
            TargetKind::Sclip => Some(DenseHead::Sclip),
            TargetKind::ClearClip => Some(DenseHead::ClearClip),
            _ => None,
        }
    }
}

/// A linear / 1×1 head on one layer's tokens (`prm eval --target probe`).
#[derive(Clone, Debug)]
pub struct Probe {
    /// `[K, D]`.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub classes: usize,
    /// Feature layer l of F_0..F_L.
    pub layer: usize,
    /// Dense (every patch token → label map) or CLS-token classification.
    pub dense: bool,
    pub names: Vec<String>,
}

/// Patch logits of a dense target or probe: `[grid_h · grid_w, classes]`.
#[derive(Clone, Debug)]
pub struct PatchLogits {
    pub grid_h: usize,
    pub grid_w: usize,
    pub classes: usize,
    pub logits: Vec<f32>,
}

/// The L2-normalised token embeddings of a dense head, `[1 + grid_h · grid_w, dim]`: the CLS
/// row first, then the patches in row-major grid order.
#[derive(Clone, Debug)]
pub struct TokenEmbeddings {
    pub grid_h: usize,
    pub grid_w: usize,
    pub dim: usize,
    pub rows: Vec<f32>,
}

impl TokenEmbeddings {
    /// Cosine logits of the patch rows with `classes [C, dim]` (rows already L2-normalised).
    pub fn patch_logits(&self, classes: &[f32]) -> PatchLogits {
        patch_logits_from_embeddings(&self.rows, self.dim, self.grid_h, self.grid_w, classes)
    }
}

/// What an engine computes for one image and a target.
pub trait EvalEngine {
    fn model(&self) -> &Model;

    /// The normalised token embeddings of a dense head (post-LayerNorm, projection, L2
    /// normalisation of every token).
    fn dense_embeddings(
        &self,
        image: &Planar,
        head: DenseHead,
    ) -> Result<TokenEmbeddings, EvalError>;

    /// Patch logits of a dense head: cosine of each normalised patch embedding with each row of
    /// `classes [C, E]` (rows already L2-normalised). Computed on the host for every engine, so
    /// that the evaluation can do it off the engine's thread.
    fn dense_logits(
        &self,
        image: &Planar,
        head: DenseHead,
        classes: &[f32],
    ) -> Result<PatchLogits, EvalError> {
        Ok(self.dense_embeddings(image, head)?.patch_logits(classes))
    }

    /// The normalised CLS image embedding `[E]`.
    fn image_embedding(&self, image: &Planar) -> Result<Vec<f32>, EvalError>;

    /// F_0..F_L, each `[T, D]`.
    fn features(&self, image: &Planar) -> Result<Vec<Vec<f32>>, EvalError>;

    /// F_layer alone, `[T, D]` (a probe's input). An engine may stop its forward there.
    fn layer_features(&self, image: &Planar, layer: usize) -> Result<Vec<f32>, EvalError> {
        Ok(self.features(image)?.swap_remove(layer))
    }

    // Several images at once: one result per image, in order, each the one its single-image
    // method gives. An engine that batches (the GPU engine packs the images into one pass)
    // overrides these; the defaults run one image after another. An error fails the whole call:
    // the caller checks image sizes first (`check_image`) and runs images alone to find which.
    //
    // `next` is a hint: the images of the batch call that will follow this one (empty when not
    // known). An engine may start moving them to its device while this call computes (the GPU
    // engine stages them on a copy stream); no result ever depends on it, and a hint that turns
    // out wrong costs only the copy.

    /// [`EvalEngine::dense_embeddings`] of each image.
    fn dense_embeddings_batch(
        &self,
        images: &[Planar],
        _next: &[Planar],
        head: DenseHead,
    ) -> Result<Vec<TokenEmbeddings>, EvalError> {
        images
            .iter()
            .map(|im| self.dense_embeddings(im, head))
            .collect()
    }

    /// Whether this engine forms the cosine logits itself ([`EvalEngine::dense_logits_batch`],
    /// [`EvalEngine::image_logits_batch`]: the GPU engine, on its device), so that the evaluation
    /// asks it for logits rather than embeddings. `false` by default: the evaluation then forms
    /// them from the embeddings on the host, off the engine's thread. The bits are the same
    /// either way.
    fn forms_logits(&self) -> bool {
        false
    }

    /// The patch logits of a dense head for each image: the cosine of each normalised patch
    /// embedding with each row of `classes [C, E]` (rows L2-normalised), the bits of
    /// [`TokenEmbeddings::patch_logits`] of [`EvalEngine::dense_embeddings_batch`]. The default
    /// forms them so, on the host.
    fn dense_logits_batch(
        &self,
        images: &[Planar],
        next: &[Planar],
        head: DenseHead,
        classes: &[f32],
    ) -> Result<Vec<PatchLogits>, EvalError> {
        Ok(self
            .dense_embeddings_batch(images, next, head)?
            .iter()
            .map(|e| e.patch_logits(classes))
            .collect())
    }

    /// The cosine logits `[C]` of each image's normalised image embedding with each row of
    /// `classes [C, E]`: the bits of [`crate::eval::ops::dot_logits`] over
    /// [`EvalEngine::image_embedding_batch`]. The default forms them so, on the host.
    fn image_logits_batch(
        &self,
        images: &[Planar],
        next: &[Planar],
        classes: &[f32],
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        Ok(self
            .image_embedding_batch(images, next)?
            .par_iter()
            .map(|e| dot_logits(e, classes, e.len()))
            .collect())
    }

    /// [`EvalEngine::image_embedding`] of each image.
    fn image_embedding_batch(
        &self,
        images: &[Planar],
        _next: &[Planar],
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        images.iter().map(|im| self.image_embedding(im)).collect()
    }

    /// [`EvalEngine::features`] of each image.
    fn features_batch(
        &self,
        images: &[Planar],
        _next: &[Planar],
    ) -> Result<Vec<Vec<Vec<f32>>>, EvalError> {
        images.iter().map(|im| self.features(im)).collect()
    }

    /// [`EvalEngine::layer_features`] of each image.
    fn layer_features_batch(
        &self,
        images: &[Planar],
        _next: &[Planar],
        layer: usize,
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        images
            .iter()
            .map(|im| self.layer_features(im, layer))
            .collect()
    }

    /// For each (clean, adversarial) pair of `images` (clean then adversarial, the two of one
    /// size), the [`TokenSums`] of every token at every layer F_0..F_L: `[layer][token]` a pair.
    /// The default computes them on the host from [`EvalEngine::features_batch`]; the GPU engine
    /// computes them on its device, so that only the sums come back (the same bits).
    fn feature_sums_batch(
        &self,
        images: &[Planar],
        next: &[Planar],
    ) -> Result<Vec<PairSums>, EvalError> {
        check_pairs(images)?;
        let dim = self.model().config.width;
        let mut features = self.features_batch(images, next)?.into_iter();
        let mut out = Vec::with_capacity(images.len() / 2);
        while let (Some(clean), Some(adv)) = (features.next(), features.next()) {
            out.push(
                clean
                    .iter()
                    .zip(&adv)
                    .map(|(c, a)| token_sums(a, c, dim))
                    .collect(),
            );
        }
        Ok(out)
    }
}

/// One pair's [`TokenSums`], `[layer][token]` (see [`EvalEngine::feature_sums_batch`]).
pub type PairSums = Vec<Vec<TokenSums>>;

/// `images` are (clean, adversarial) pairs, the two of a pair of one size; else a usage error.
pub(crate) fn check_pairs(images: &[Planar]) -> Result<(), EvalError> {
    if !images.len().is_multiple_of(2) {
        return Err(EvalError::Usage(format!(
            "{} images: the drift needs (clean, adversarial) pairs",
            images.len()
        )));
    }
    for pair in images.chunks_exact(2) {
        let (c, a) = (&pair[0], &pair[1]);
        if (c.height, c.width) != (a.height, a.width) {
            return Err(EvalError::Usage(format!(
                "an adversarial image of {}x{} paired with a clean one of {}x{}",
                a.width, a.height, c.width, c.height
            )));
        }
    }
    Ok(())
}

/// What forms the image embedding, or a clear error when the tower has none (no projection or
/// pooling head, or a pooling prm does not build).
pub(crate) fn require_image_head(model: &Model) -> Result<ImageHead<'_>, EvalError> {
    model.image_head().map_err(EvalError::NoImageEmbedding)
}

/// The projection the dense targets apply to every token, or a clear error when the tower has
/// none (no projection, or a tower that pools otherwise, such as SigLIP's attention head).
pub(crate) fn require_projection(model: &Model) -> Result<&crate::model::Linear, EvalError> {
    model
        .image_projection()
        .map_err(EvalError::NoImageEmbedding)
}

/// The reference (CPU) implementation of the last-block replacement: from `x [T, D]` (F_{L−1})
/// returns the token matrix `z [T, D]` entering the post-LayerNorm.
pub fn dense_head_reference(model: &Model, x: &[f32], tokens: usize, head: DenseHead) -> Vec<f32> {
    let c = &model.config;
    let d = c.width;
    let b = model.weights.blocks.last().expect("at least one block");
    let mut normed = vec![0.0f32; tokens * d];
    layer_norm(x, d, &b.ln1, c.ln_eps, &mut normed);
    let mut context = vec![0.0f32; tokens * d];
    match head {
        DenseHead::MaskClip => {
            let v = linear_rows(&b.qkv, 2 * d, d);
            linear(&normed, tokens, &v, &mut context, false);
        }
        DenseHead::Sclip | DenseHead::ClearClip => {
            let mut qkv = vec![0.0f32; tokens * 3 * d];
            linear(&normed, tokens, &b.qkv, &mut qkv, false);
            attention_variant(&qkv, tokens, d, c.heads, Scores::QQ, false, &mut context);
            if head == DenseHead::Sclip {
                let mut kk = vec![0.0f32; tokens * d];
                attention_variant(&qkv, tokens, d, c.heads, Scores::KK, false, &mut kk);
                context.iter_mut().zip(&kk).for_each(|(a, b)| *a += b);
            }
        }
    }
    if head == DenseHead::ClearClip {
        let mut z = vec![0.0f32; tokens * d];
        linear(&context, tokens, &b.out_proj, &mut z, false);
        return z;
    }
    let mut z = x.to_vec();
    linear(&context, tokens, &b.out_proj, &mut z, true);
    layer_norm(&z, d, &b.ln2, c.ln_eps, &mut normed);
    let mut hidden = vec![0.0f32; tokens * c.mlp];
    linear(&normed, tokens, &b.fc1, &mut hidden, false);
    activation(c.activation, &mut hidden);
    linear(&hidden, tokens, &b.fc2, &mut z, true);
    z
}

/// post-LN → projection → L2 normalisation of every row of `z [rows, D]`; returns `[rows, E]`.
pub fn embed_tokens_reference(
    model: &Model,
    z: &[f32],
    rows: usize,
) -> Result<Vec<f32>, EvalError> {
    let c = &model.config;
    let proj = require_projection(model)?;
    let mut normed = vec![0.0f32; rows * c.width];
    layer_norm(z, c.width, &model.weights.ln_post, c.ln_eps, &mut normed);
    let mut e = vec![0.0f32; rows * proj.out_features];
    linear(&normed, rows, proj, &mut e, false);
    normalize_rows(&mut e, proj.out_features);
    Ok(e)
}

/// Cosine logits of the patch rows (row 0, the CLS token, dropped).
pub fn patch_logits_from_embeddings(
    emb: &[f32],
    dim: usize,
    grid_h: usize,
    grid_w: usize,
    classes: &[f32],
) -> PatchLogits {
    let n = classes.len() / dim;
    PatchLogits {
        grid_h,
        grid_w,
        classes: n,
        logits: dot_logits(&emb[dim..], classes, dim),
    }
}

/// The CPU reference engine for targets.
pub struct ReferenceTargets<'m> {
    vit: ReferenceVit<'m>,
}

impl<'m> ReferenceTargets<'m> {
    pub fn new(model: &'m Model) -> Self {
        ReferenceTargets {
            vit: ReferenceVit::new(model),
        }
    }
}

/// The patch grid `(H / p, W / p)` the model sees, or [`EvalError::ImageTooSmall`] when the image
/// holds no whole patch.
pub(crate) fn check_image(model: &Model, image: &Planar) -> Result<(usize, usize), EvalError> {
    let p = model.config.patch;
    let (gh, gw) = (image.height / p, image.width / p);
    if gh == 0 || gw == 0 {
        return Err(EvalError::ImageTooSmall {
            width: image.width,
            height: image.height,
            patch: p,
        });
    }
    Ok((gh, gw))
}

impl EvalEngine for ReferenceTargets<'_> {
    fn model(&self) -> &Model {
        self.vit.model()
    }

    fn dense_embeddings(
        &self,
        image: &Planar,
        head: DenseHead,
    ) -> Result<TokenEmbeddings, EvalError> {
        let model = self.vit.model();
        let (gh, gw) = check_image(model, image)?;
        require_projection(model)?;
        let fwd = self
            .vit
            .forward(image.data, image.height, image.width, false);
        let l = model.config.layers;
        let z = dense_head_reference(model, &fwd.features[l - 1], fwd.tokens, head);
        let rows = embed_tokens_reference(model, &z, fwd.tokens)?;
        Ok(TokenEmbeddings {
            grid_h: gh,
            grid_w: gw,
            dim: rows.len() / fwd.tokens,
            rows,
        })
    }

    fn image_embedding(&self, image: &Planar) -> Result<Vec<f32>, EvalError> {
        let model = self.vit.model();
        check_image(model, image)?;
        let head = require_image_head(model)?;
        let fwd = self
            .vit
            .forward(image.data, image.height, image.width, false);
        let last = fwd.features.last().expect("features");
        match head {
            // The dense targets' path for one row, as the GPU engine forms it.
            ImageHead::Projection(_) => {
                embed_tokens_reference(model, &last[..model.config.width], 1)
            }
            ImageHead::AttentionPool(_) | ImageHead::PatchAverage { .. } => {
                let pooled =
                    pooled_embeddings(model, &[last]).map_err(EvalError::NoImageEmbedding)?;
                let mut e = pooled.embeddings;
                normalize_rows(&mut e, pooled.dim);
                Ok(e)
            }
        }
    }

    fn features(&self, image: &Planar) -> Result<Vec<Vec<f32>>, EvalError> {
        check_image(self.vit.model(), image)?;
        Ok(self
            .vit
            .forward(image.data, image.height, image.width, false)
            .features)
    }
}

/// Logits of a probe on the tokens `f [T, D]` of its feature layer (F_`probe.layer`): dense →
/// `[gh·gw, K]` over the patch tokens (the last gh·gw rows); otherwise `[1, K]` from the CLS
/// token (refused by [`read_probe`] for a tower without one).
pub fn probe_logits(probe: &Probe, f: &[f32], width: usize, grid: (usize, usize)) -> PatchLogits {
    let l = crate::model::Linear {
        weight: probe.weight.clone(),
        bias: probe.bias.clone(),
        out_features: probe.classes,
        in_features: width,
    };
    let (rows, src) = if probe.dense {
        // The patch tokens are the last gh·gw rows, after the CLS row when there is one.
        let patches = grid.0 * grid.1;
        (patches, &f[f.len() - patches * width..])
    } else {
        (1, &f[..width])
    };
    let mut out = vec![0.0f32; rows * probe.classes];
    linear(src, rows, &l, &mut out, false);
    let (grid_h, grid_w) = if probe.dense { grid } else { (1, 1) };
    PatchLogits {
        grid_h,
        grid_w,
        classes: probe.classes,
        logits: out,
    }
}

/// Reads a probe head from safetensors: `weight` `[K, D]` (or `[K, D, 1, 1]`, a 1×1 conv),
/// optional `bias` `[K]`; metadata (all optional) `layer` (default L, the last), `tokens`
/// (`patch`, the default: a dense head on every patch token; or `cls`), `names`
/// (comma-separated, K of them). `layer` and `dense` override the metadata.
pub fn read_probe(
    path: &std::path::Path,
    model: &Model,
    layer: Option<usize>,
    dense: Option<bool>,
) -> Result<Probe, EvalError> {
    use safetensors::SafeTensors;
    let bad = |reason: String| EvalError::Probe {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
    let d = model.config.width;
    let load = |name: &str| -> Result<(Vec<usize>, Vec<f32>), EvalError> {
        let v = st
            .tensor(name)
            .map_err(|_| bad(format!("has no tensor `{name}`")))?;
        let vals = crate::model::tensor_to_f32(&v).ok_or_else(|| {
            bad(format!(
                "`{name}` has dtype {:?}; expected a float (F32, F16, BF16 or F64)",
                v.dtype()
            ))
        })?;
        Ok((v.shape().to_vec(), vals))
    };
    let (shape, weight) = load("weight")?;
    let k = match shape.as_slice() {
        [k, dd] | [k, dd, 1, 1] if *dd == d && *k > 0 => *k,
        s => {
            return Err(bad(format!(
                "`weight` has shape {s:?}; expected [K, {d}] or [K, {d}, 1, 1] for this model"
            )))
        }
    };
    let bias = if st.names().contains(&"bias") {
        let (s, b) = load("bias")?;
        if s != [k] {
            return Err(bad(format!("`bias` has shape {s:?}, expected [{k}]")));
        }
        Some(b)
    } else {
        None
    };
    let m = meta.metadata().clone().unwrap_or_default();
    let requested = layer;
    let layer = match (layer, m.get("layer")) {
        (Some(l), _) => l,
        (None, Some(s)) => s
            .trim()
            .parse::<usize>()
            .map_err(|_| bad(format!("metadata `layer` = {s:?} is not a layer index")))?,
        (None, None) => model.config.layers,
    };
    if layer > model.config.layers {
        let reason = format!(
            "layer {layer} does not exist: the model has features F_0..F_{}",
            model.config.layers
        );
        // The layer came from the flag or from the file: the message blames the one it came
        // from, so that the fix is looked for in the right place.
        return Err(match requested {
            Some(_) => EvalError::Usage(format!("--probe-layer {layer}: {reason}")),
            None => bad(format!("metadata `layer`: {reason}")),
        });
    }
    let dense = match (dense, m.get("tokens").map(String::as_str)) {
        (Some(x), _) => x,
        (None, None | Some("patch")) => true,
        (None, Some("cls")) => false,
        (None, Some(o)) => return Err(bad(format!("metadata `tokens` = {o:?}: use patch or cls"))),
    };
    if !dense && !model.config.class_token {
        return Err(EvalError::Usage(
            "a probe on the CLS token (`--probe-cls`, or metadata `tokens` = cls) needs a tower with \
             a class token; this one has none (SigLIP): use a dense probe on the patch tokens"
                .into(),
        ));
    }
    let names: Vec<String> = match m.get("names") {
        Some(s) => super::text::parse_names(s),
        None => (0..k).map(|i| format!("class_{i}")).collect(),
    };
    if names.len() != k {
        return Err(bad(format!(
            "metadata `names` lists {} names for {k} outputs",
            names.len()
        )));
    }
    if let Some((name, i, j)) = super::text::repeated_name(&names) {
        return Err(bad(format!(
            "metadata `names` holds `{name}` twice (outputs {i} and {j}); give each class its \
             own name"
        )));
    }
    Ok(Probe {
        weight,
        bias,
        classes: k,
        layer,
        dense,
        names,
    })
}
