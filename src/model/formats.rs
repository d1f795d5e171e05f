//! The two checkpoint naming schemes and how each maps onto [`VisionWeights`].
//!
//! | role | HF | OpenAI / open_clip |
//! |---|---|---|
//! | patch conv [D,3,p,p] | `vision_model.embeddings.patch_embedding.weight` | `visual.conv1.weight` |
//! | class token [D] | `vision_model.embeddings.class_embedding` | `visual.class_embedding` |
//! | positions [T,D] | `vision_model.embeddings.position_embedding.weight` | `visual.positional_embedding` |
//! | pre-LN | `vision_model.pre_layrnorm.*` | `visual.ln_pre.*` |
//! | blocks | `vision_model.encoder.layers.i.*` (separate q/k/v) | `visual.transformer.resblocks.i.*` (`in_proj_*` = q,k,v stacked) |
//! | post-LN | `vision_model.post_layernorm.*` | `visual.ln_post.*` |
//! | projection | `visual_projection.weight` [E,D] | `visual.proj` [D,E], transposed on load |
//! | SigLIP pooling head | `vision_model.head.*` (`probe`, `attention.in_proj_*`, `attention.out_proj.*`, `layernorm.*`, `mlp.fc1/fc2.*`) | — |
//!
//! The conv weight [D,3,p,p] row-major is already the [D, 3·p·p] GEMM weight with patch vectors
//! flattened (channel, row, col), so it is taken as is.

use std::collections::BTreeSet;
use std::path::Path;

use super::config::{read_hf_config, read_open_clip_config, read_preprocessor};
use super::load::Tensors;
use super::{
    Activation, AttentionPoolHead, BlockWeights, Linear, Model, ModelError, ModelSource, Pooling,
    VisionConfig, VisionWeights, OPENAI_MEAN, OPENAI_STD,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    HuggingFace,
    OpenAi,
}

/// Tensor names of one format.
struct Names {
    conv: &'static str,
    conv_bias: &'static str,
    cls: &'static str,
    pos: &'static str,
    ln_pre: &'static str,
    ln_post: &'static str,
    blocks: &'static str,
    /// Every vision tensor's prefix.
    tower: &'static str,
}

const HF: Names = Names {
    conv: "vision_model.embeddings.patch_embedding.weight",
    conv_bias: "vision_model.embeddings.patch_embedding.bias",
    cls: "vision_model.embeddings.class_embedding",
    pos: "vision_model.embeddings.position_embedding.weight",
    ln_pre: "vision_model.pre_layrnorm",
    ln_post: "vision_model.post_layernorm",
    blocks: "vision_model.encoder.layers.",
    tower: "vision_model.",
};

const OPENAI: Names = Names {
    conv: "visual.conv1.weight",
    conv_bias: "visual.conv1.bias",
    cls: "visual.class_embedding",
    pos: "visual.positional_embedding",
    ln_pre: "visual.ln_pre",
    ln_post: "visual.ln_post",
    blocks: "visual.transformer.resblocks.",
    tower: "visual.",
};

fn detect(t: &Tensors<'_>) -> Result<Format, ModelError> {
    if t.names().any(|n| n.starts_with("vision_model.")) {
        return Ok(Format::HuggingFace);
    }
    if t.names().any(|n| n.starts_with("visual.")) {
        return Ok(Format::OpenAi);
    }
    let mut found: BTreeSet<String> = BTreeSet::new();
    for n in t.names() {
        let head = n.split('.').next().unwrap_or(n);
        found.insert(if head.len() < n.len() {
            format!("{head}.*")
        } else {
            head.to_string()
        });
    }
    let mut found: Vec<String> = found.into_iter().collect();
    if found.is_empty() {
        found.push("(no tensors)".to_string());
    } else if found.len() > 12 {
        let more = found.len() - 12;
        found.truncate(12);
        found.push(format!("... and {more} more"));
    }
    Err(ModelError::UnknownFormat {
        path: t.path.clone(),
        found,
    })
}

/// Builds the model held by a checkpoint's tensors, reading the JSON files next to it.
pub(crate) fn build_model(t: &Tensors<'_>) -> Result<Model, ModelError> {
    let format = detect(t)?;
    let names = match format {
        Format::HuggingFace => &HF,
        Format::OpenAi => &OPENAI,
    };
    let dir = t.path.parent().unwrap_or(Path::new(".")).to_path_buf();
    if format == Format::OpenAi && !t.contains(names.cls) {
        refuse_other_towers(t)?;
    }

    // Dimensions from shapes. A tower without a class token (SigLIP) takes its width from the
    // patch convolution.
    let class_token = t.contains(names.cls);
    let width = if class_token {
        let cls_shape = t.shape(names.cls)?;
        match cls_shape {
            [d] if *d > 0 => *d,
            _ => return Err(t.bad_shape(names.cls, "[D] with D > 0", cls_shape)),
        }
    } else {
        match t.shape(names.conv)? {
            [d, 3, _, _] if *d > 0 => *d,
            other => {
                return Err(t.bad_shape(names.conv, "[D, 3, p, p]", other));
            }
        }
    };
    let conv_shape = t.shape(names.conv)?;
    let patch = match conv_shape {
        [d, 3, p, q] if *d == width && p == q && *p > 0 => *p,
        _ => return Err(t.bad_shape(names.conv, format!("[{width}, 3, p, p]"), conv_shape)),
    };
    let pos_shape = t.shape(names.pos)?;
    let extra = usize::from(class_token);
    let grid_rows = if class_token {
        format!("[g·g + 1, {width}]: a square patch grid plus the class token")
    } else {
        format!("[g·g, {width}]: a square patch grid")
    };
    let grid = match pos_shape {
        [rows, d] if *d == width && *rows > extra => {
            let g = (*rows - extra).isqrt();
            if g * g + extra != *rows {
                return Err(t.bad_shape(names.pos, grid_rows, pos_shape));
            }
            g
        }
        _ => return Err(t.bad_shape(names.pos, grid_rows, pos_shape)),
    };
    let layers = count_layers(t, names.blocks)?;
    let fc1_name = match format {
        Format::HuggingFace => format!("{}0.mlp.fc1.weight", names.blocks),
        Format::OpenAi => format!("{}0.mlp.c_fc.weight", names.blocks),
    };
    let fc1_shape = t.shape(&fc1_name)?;
    let mlp = match fc1_shape {
        [m, d] if *d == width && *m > 0 => *m,
        _ => return Err(t.bad_shape(&fc1_name, format!("[mlp, {width}]"), fc1_shape)),
    };

    // Settings from JSON, with per-format defaults.
    let (heads, activation, ln_eps, mean_std, source, has_ln_pre, pooling) = match format {
        Format::HuggingFace => {
            let config = read_hf_config(&dir)?;
            let siglip = config.as_ref().is_some_and(|(_, s)| s.siglip);
            if !class_token && !siglip {
                return Err(missing_class_token(t, names, config.is_some()));
            }
            if class_token && siglip {
                return Err(t.inconsistent(format!(
                    "config.json says SigLIP, whose towers have no class token, but the \
                     checkpoint holds `{}`: it is another model",
                    t.display_name(names.cls)
                )));
            }
            let (heads, activation, ln_eps) = match config {
                Some((path, s)) => {
                    if width % s.heads != 0 {
                        return Err(ModelError::BadConfig {
                            path,
                            reason: format!(
                                "num_attention_heads = {} (explicit, or the CLIPVisionConfig \
                                 default when absent) does not divide the width {width}",
                                s.heads
                            ),
                        });
                    }
                    (s.heads, s.activation, s.ln_eps)
                }
                None => (heads_from_width(t, width)?, Activation::QuickGelu, 1e-5),
            };
            let source = ModelSource::HuggingFace {
                path: t.path.clone(),
            };
            let mut mean_std = read_preprocessor(&dir)?;
            let pooling = if siglip {
                // SiglipImageProcessor's defaults, for a directory without its
                // preprocessor_config.json.
                mean_std = mean_std.or(Some(([0.5; 3], [0.5; 3])));
                if t.names().any(|n| n.starts_with(SIGLIP_HEAD)) {
                    Pooling::AttentionHead
                } else {
                    Pooling::Unpooled
                }
            } else {
                Pooling::ClassToken
            };
            // SigLIP has no pre-LayerNorm: F_0 is the embedded tokens.
            (
                heads, activation, ln_eps, mean_std, source, !siglip, pooling,
            )
        }
        Format::OpenAi => {
            if !class_token {
                return Err(missing_class_token(t, names, false));
            }
            let (heads, activation, mean_std, ln_eps, has_ln_pre, pooling) =
                match read_open_clip_config(&dir)? {
                    Some(s) => {
                        if width % s.head_width != 0 {
                            return Err(ModelError::BadConfig {
                                path: dir.join("open_clip_config.json"),
                                reason: format!(
                                    "head_width {} does not divide the width {width}",
                                    s.head_width
                                ),
                            });
                        }
                        let heads = width / s.head_width;
                        (
                            heads,
                            s.activation,
                            s.mean_std,
                            s.ln_eps,
                            s.ln_pre,
                            s.pooling,
                        )
                    }
                    None => (
                        heads_from_width(t, width)?,
                        Activation::QuickGelu,
                        None,
                        1e-5,
                        true,
                        Pooling::ClassToken,
                    ),
                };
            let source = ModelSource::OpenAi {
                path: t.path.clone(),
            };
            (
                heads, activation, ln_eps, mean_std, source, has_ln_pre, pooling,
            )
        }
    };
    let (mean, std) = mean_std.unwrap_or((OPENAI_MEAN, OPENAI_STD));

    // Weights, every shape checked exactly.
    let d = width;
    let patch_in = 3 * patch * patch;
    let patch_embed = Linear {
        weight: t.load(names.conv, &[d, 3, patch, patch])?,
        bias: if t.contains(names.conv_bias) {
            Some(t.load(names.conv_bias, &[d])?)
        } else {
            None
        },
        out_features: d,
        in_features: patch_in,
    };
    let class_embedding = if class_token {
        Some(t.load(names.cls, &[d])?)
    } else {
        None
    };
    let position_embedding = t.load(names.pos, &[grid * grid + extra, d])?;
    // Without LN_pre (open_clip `no_ln_pre`), a `ln_pre` tensor is unread and refused below.
    let ln_pre = if has_ln_pre {
        Some(t.layer_norm(names.ln_pre, d)?)
    } else {
        None
    };
    let ln_post = t.layer_norm(names.ln_post, d)?;
    let blocks = (0..layers)
        .map(|i| load_block(t, format, &format!("{}{i}.", names.blocks), d, mlp))
        .collect::<Result<Vec<_>, _>>()?;
    let projection = match format {
        Format::HuggingFace => {
            let name = "visual_projection.weight";
            if t.contains(name) {
                let shape = t.shape(name)?;
                match shape {
                    [e, dd] if *dd == d && *e > 0 => {
                        let e = *e;
                        Some(Linear {
                            weight: t.load(name, &[e, d])?,
                            bias: None,
                            out_features: e,
                            in_features: d,
                        })
                    }
                    _ => return Err(t.bad_shape(name, format!("[E, {d}]"), shape)),
                }
            } else {
                None
            }
        }
        Format::OpenAi => {
            let name = "visual.proj";
            if t.contains(name) {
                let shape = t.shape(name)?;
                match shape {
                    [dd, e] if *dd == d && *e > 0 => {
                        let e = *e;
                        let p = t.load(name, &[d, e])?;
                        Some(Linear {
                            weight: transpose(&p, d, e),
                            bias: None,
                            out_features: e,
                            in_features: d,
                        })
                    }
                    _ => return Err(t.bad_shape(name, format!("[{d}, E]"), shape)),
                }
            } else {
                None
            }
        }
    };
    let attention_head = if pooling == Pooling::AttentionHead {
        let h = SIGLIP_HEAD;
        let probe = format!("{h}probe");
        Some(AttentionPoolHead {
            probe: t.load(&probe, &[1, 1, d])?,
            in_proj: t.in_projection(&format!("{h}attention."), d)?,
            out_proj: t.linear(&format!("{h}attention.out_proj"), d, d)?,
            layer_norm: t.layer_norm(&format!("{h}layernorm"), d)?,
            fc1: t.linear(&format!("{h}mlp.fc1"), mlp, d)?,
            fc2: t.linear(&format!("{h}mlp.fc2"), d, mlp)?,
        })
    } else {
        None
    };
    let embed_dim = match &attention_head {
        Some(h) => Some(h.out_proj.out_features),
        None => projection.as_ref().map(|p| p.out_features),
    };
    t.refuse_unread(&[names.tower], "vision")?;

    Ok(Model {
        config: VisionConfig {
            width,
            layers,
            heads,
            patch,
            grid,
            class_token,
            mlp,
            embed_dim,
            activation,
            ln_eps,
            mean,
            std,
            pooling,
        },
        weights: VisionWeights {
            patch_embed,
            class_embedding,
            position_embedding,
            ln_pre,
            blocks,
            ln_post,
            projection,
            attention_head,
        },
        source,
    })
}

/// SigLIP's multi-head attention pooling head (`SiglipMultiheadAttentionPoolingHead`), read
/// only by the image embedding.
const SIGLIP_HEAD: &str = "vision_model.head.";

/// A checkpoint without a class token that is not known to be SigLIP: without its config,
/// neither the activation nor the LayerNorm eps can be told.
fn missing_class_token(t: &Tensors<'_>, names: &Names, has_config: bool) -> ModelError {
    let why = if has_config {
        "its config.json does not say `model_type: siglip` / `siglip_vision_model`, the only \
         towers without a class token prm knows"
    } else {
        "without a config.json saying `model_type: siglip` / `siglip_vision_model` (the only \
         towers without a class token prm knows) prm cannot tell its activation and LayerNorm \
         eps; put the model's config.json beside the checkpoint"
    };
    t.inconsistent(format!(
        "there is no class token `{}`: {why}",
        t.display_name(names.cls)
    ))
}

/// One residual block of either tower (the text tower's blocks are named as the vision
/// tower's), its weights under `b` (`…layers.3.` / `…resblocks.3.`), every shape checked.
/// open_clip's LayerScale is folded into `out_proj` and `fc2` ([`layer_scaled`]).
pub(super) fn load_block(
    t: &Tensors<'_>,
    format: Format,
    b: &str,
    d: usize,
    mlp: usize,
) -> Result<BlockWeights, ModelError> {
    Ok(match format {
        Format::HuggingFace => BlockWeights {
            ln1: t.layer_norm(&format!("{b}layer_norm1"), d)?,
            qkv: stack_qkv(
                t.linear(&format!("{b}self_attn.q_proj"), d, d)?,
                t.linear(&format!("{b}self_attn.k_proj"), d, d)?,
                t.linear(&format!("{b}self_attn.v_proj"), d, d)?,
            ),
            out_proj: t.linear(&format!("{b}self_attn.out_proj"), d, d)?,
            ln2: t.layer_norm(&format!("{b}layer_norm2"), d)?,
            fc1: t.linear(&format!("{b}mlp.fc1"), mlp, d)?,
            fc2: t.linear(&format!("{b}mlp.fc2"), d, mlp)?,
        },
        Format::OpenAi => BlockWeights {
            ln1: t.layer_norm(&format!("{b}ln_1"), d)?,
            qkv: t.in_projection(&format!("{b}attn."), d)?,
            out_proj: layer_scaled(t, t.linear(&format!("{b}attn.out_proj"), d, d)?, b, 1)?,
            ln2: t.layer_norm(&format!("{b}ln_2"), d)?,
            fc1: t.linear(&format!("{b}mlp.c_fc"), mlp, d)?,
            fc2: layer_scaled(t, t.linear(&format!("{b}mlp.c_proj"), d, mlp)?, b, 2)?,
        },
    })
}

/// open_clip's LayerScale (`ls_init_value`): block `b`'s residual branch `branch` (1: attention,
/// 2: MLP) is scaled per channel by `ls_{branch}.gamma` before it is added, `x + γ ⊙ f(x)`.
/// The scale is folded into the branch's last linear layer, `γ ⊙ (W h + c) = (diag(γ) W) h + γ ⊙
/// c`, so that every engine runs such a tower unchanged; the results differ from open_clip's
/// only by where fp32 rounds (tools/golden/open_clip_audit.py checks ViT-M-16-alt).
fn layer_scaled(t: &Tensors<'_>, mut l: Linear, b: &str, branch: u8) -> Result<Linear, ModelError> {
    let name = format!("{b}ls_{branch}.gamma");
    if !t.contains(&name) {
        return Ok(l);
    }
    let gamma = t.load(&name, &[l.out_features])?;
    for (row, g) in l.weight.chunks_exact_mut(l.in_features).zip(&gamma) {
        row.iter_mut().for_each(|w| *w *= g);
    }
    if let Some(bias) = &mut l.bias {
        bias.iter_mut().zip(&gamma).for_each(|(c, g)| *c *= g);
    }
    Ok(l)
}

/// OpenAI-style checkpoints whose vision tower is not a ViT: a clear refusal instead of a
/// missing `visual.class_embedding`.
fn refuse_other_towers(t: &Tensors<'_>) -> Result<(), ModelError> {
    let has = |prefix: &str| t.names().any(|n| n.starts_with(prefix));
    let kind = if has("visual.layer1.") || has("visual.attnpool.") {
        "a ResNet (OpenAI's RN50 / RN101 / RN50x4 ... family: `visual.layer1.*`, \
         `visual.attnpool.*`)"
    } else if has("visual.trunk.") {
        "a timm model (`visual.trunk.*`: open_clip's ConvNeXt and timm-backed towers)"
    } else {
        return Ok(());
    };
    Err(t.inconsistent(format!(
        "the vision tower is {kind}, not a CLIP ViT; prm attacks ViT towers only"
    )))
}

/// open_clip's LAION towers whose heads are not 64 wide, by width: (name, heads, head width).
/// Their checkpoints hold neither the head count nor the activation (GELU), and their widths
/// are multiples of 64, so OpenAI's conventions would load another model without a word.
const OPEN_CLIP_WIDE_HEADS: &[(usize, &str, usize, usize)] = &[
    (1280, "ViT-H/14", 16, 80),
    (1408, "ViT-g/14", 16, 88),
    (1664, "ViT-bigG/14", 16, 104),
];

/// heads = D / 64, the convention of every OpenAI CLIP tower, when no config says otherwise.
/// Refused for the widths of open_clip towers whose heads are not 64 wide (and whose activation
/// is GELU), which only a config can describe.
fn heads_from_width(t: &Tensors<'_>, width: usize) -> Result<usize, ModelError> {
    if let Some((_, name, heads, head_width)) =
        OPEN_CLIP_WIDE_HEADS.iter().find(|(w, ..)| *w == width)
    {
        return Err(t.inconsistent(format!(
            "width {width} is open_clip's {name} ({heads} heads of {head_width}, exact GELU), and \
             without a config prm would load it the OpenAI way ({} heads of 64, QuickGELU): \
             another model; put the checkpoint's open_clip_config.json (open_clip) or \
             config.json (Hugging Face) beside it, or write one that says how its heads are \
             split",
            width / 64
        )));
    }
    if width.is_multiple_of(64) {
        Ok(width / 64)
    } else {
        Err(t.inconsistent(format!(
            "cannot infer the number of attention heads: width {width} is not a multiple of 64 \
             and there is no config (config.json with num_attention_heads for HF checkpoints, \
             open_clip_config.json with head_width for open_clip ones)"
        )))
    }
}

/// Counts blocks `PREFIX{i}.*`; the indices must be exactly 0..L with L ≥ 1.
pub(crate) fn count_layers(t: &Tensors<'_>, prefix: &str) -> Result<usize, ModelError> {
    let mut seen = BTreeSet::new();
    for name in t.names() {
        if let Some(rest) = name.strip_prefix(prefix) {
            let idx = rest.split('.').next().unwrap_or("");
            match idx.parse::<usize>() {
                Ok(i) => {
                    seen.insert(i);
                }
                Err(_) => {
                    return Err(t.inconsistent(format!(
                        "tensor `{}` has a non-numeric block index",
                        t.display_name(name)
                    )))
                }
            }
        }
    }
    let layers = seen.len();
    if layers == 0 {
        return Err(ModelError::MissingTensor {
            path: t.path.clone(),
            name: t.display_name(&format!("{prefix}0.*")),
        });
    }
    if seen.last().copied() != Some(layers - 1) {
        let missing: Vec<String> = (0..layers + 1)
            .filter(|i| !seen.contains(i))
            .take(5)
            .map(|i| i.to_string())
            .collect();
        return Err(t.inconsistent(format!(
            "transformer blocks `{}{{i}}.*` are not numbered contiguously from 0: found {} \
             blocks, highest index {}, missing indices {}",
            t.display_name(prefix),
            layers,
            seen.last().copied().unwrap_or(0),
            missing.join(", ")
        )));
    }
    Ok(layers)
}

/// Stacks separate q, k, v projections into one `[3D, D]` linear (q rows first).
pub(crate) fn stack_qkv(q: Linear, k: Linear, v: Linear) -> Linear {
    let d = q.in_features;
    let mut weight = q.weight;
    weight.extend_from_slice(&k.weight);
    weight.extend_from_slice(&v.weight);
    let bias = match (q.bias, k.bias, v.bias) {
        (Some(mut b), Some(kb), Some(vb)) => {
            b.extend_from_slice(&kb);
            b.extend_from_slice(&vb);
            Some(b)
        }
        _ => None,
    };
    Linear {
        weight,
        bias,
        out_features: 3 * q.out_features,
        in_features: d,
    }
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major.
pub(crate) fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = a[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_small() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [2, 3]
        assert_eq!(transpose(&a, 2, 3), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
