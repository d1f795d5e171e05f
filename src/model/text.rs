//! CLIP text towers: configuration, weights, and loading from the same checkpoints as the
//! vision tower (HF `text_model.*` / OpenAI `transformer.*`, `token_embedding`, ...).
//!
//! | role | HF | OpenAI / open_clip | shape |
//! |---|---|---|---|
//! | token table | `text_model.embeddings.token_embedding.weight` | `token_embedding.weight` | [V, W] |
//! | positions | `text_model.embeddings.position_embedding.weight` | `positional_embedding` | [ctx, W] |
//! | blocks | `text_model.encoder.layers.i.*` (separate q/k/v) | `transformer.resblocks.i.*` (`in_proj_*`) | |
//! | final LN | `text_model.final_layer_norm.*` | `ln_final.*` | [W] |
//! | projection | `text_projection.weight` [E, W], y = x·Wᵀ | `text_projection` [W, E], y = x·P | |
//!
//! The tower is causal and pools at the end-of-text token, which is the largest token id of
//! each sequence (OpenAI's `argmax`). The text tower is optional: a vision-only checkpoint
//! loads as `None`, and only class names given as text need it.
//!
//! The heads: HF `config.json` `text_config.num_attention_heads` (default 8, the
//! `CLIPTextConfig` default); OpenAI state dicts use `open_clip_config.json`
//! `model_cfg.text_cfg.heads` (8 when the file is there without it, open_clip's
//! `CLIPTextCfg` default), else W / 64 (true of every OpenAI CLIP). The
//! activation and LayerNorm eps follow `text_config` (HF) or `open_clip_config.json`
//! (OpenAI/open_clip: the one `quick_gelu` flag of both towers, with `text_cfg.act_kwargs`,
//! and `text_cfg.norm_kwargs.eps`; QuickGELU and 1e-5 without the file).

use std::path::Path;

use serde_json::Value;

use super::formats::{count_layers, load_block, transpose, Format};
use super::load::Tensors;
use super::{Activation, BlockWeights, LayerNormWeights, Linear, ModelError};

/// Ids of the tokenizer bundled for `random:ARCH` models (`assets/tokenizer/`), which is the
/// vocabulary of their random text towers; `<|endoftext|>` is id 613, the largest.
pub const BUNDLED_TOKENIZER_VOCAB: usize = 614;

/// Shape and numerics of a CLIP text tower.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TextConfig {
    /// Residual width W.
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp: usize,
    /// Vocabulary size V (rows of the token table).
    pub vocab: usize,
    /// Rows of the position table (77 for CLIP): the longest sequence.
    pub context: usize,
    /// Output embedding dimension E.
    pub embed_dim: usize,
    pub activation: Activation,
    pub ln_eps: f32,
}

/// All weights of a text tower, in f32, PyTorch layout.
#[derive(Clone, Debug)]
pub struct TextWeights {
    /// `[V, W]`.
    pub token_embedding: Vec<f32>,
    /// `[context, W]`.
    pub position_embedding: Vec<f32>,
    pub blocks: Vec<BlockWeights>,
    pub ln_final: LayerNormWeights,
    /// `text_embed = ln_final(h_eot) · Wᵀ`, W `[E, W]`.
    pub projection: Linear,
}

/// A loaded text tower.
#[derive(Clone, Debug)]
pub struct TextTower {
    pub config: TextConfig,
    pub weights: TextWeights,
}

/// Loads the text tower of `spec` (`random:ARCH[@SEED]`, a checkpoint file or a directory).
/// `Ok(None)` when the checkpoint holds no text tower.
pub fn load_text_tower(spec: &str) -> Result<Option<TextTower>, ModelError> {
    if let Some(rest) = spec.strip_prefix("random:") {
        let (arch, seed) = match rest.split_once('@') {
            None => (rest, 0),
            Some((arch, seed)) => {
                let seed = seed.parse::<u64>().map_err(|_| ModelError::BadSpec {
                    spec: spec.to_string(),
                    reason: format!("seed `{seed}` is not a non-negative integer"),
                })?;
                (arch, seed)
            }
        };
        return super::builtin::random_text_tower(arch, seed).map(Some);
    }
    let file = super::resolve_checkpoint(&super::locate(spec)?)?;
    let checkpoint = super::checkpoint::Checkpoint::open(&file)?;
    build_text_tower(&checkpoint.tensors()?)
}

struct TextNames {
    tok: &'static str,
    pos: &'static str,
    blocks: &'static str,
    ln_final: &'static str,
    proj: &'static str,
    /// The prefix of the tower's own tensors (the embeddings' and blocks').
    tower: &'static str,
}

const HF_TEXT: TextNames = TextNames {
    tok: "text_model.embeddings.token_embedding.weight",
    pos: "text_model.embeddings.position_embedding.weight",
    blocks: "text_model.encoder.layers.",
    ln_final: "text_model.final_layer_norm",
    proj: "text_projection.weight",
    tower: "text_model.",
};

const OPENAI_TEXT: TextNames = TextNames {
    tok: "token_embedding.weight",
    pos: "positional_embedding",
    blocks: "transformer.resblocks.",
    ln_final: "ln_final",
    proj: "text_projection",
    tower: "transformer.",
};

/// Settings the JSON next to the checkpoint gives: (heads, activation, ln_eps), each optional.
type TextJson = (Option<usize>, Option<Activation>, Option<f32>);

fn read_json(path: &Path) -> Result<Option<Value>, ModelError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::BadConfig {
            path: path.to_path_buf(),
            reason: format!("invalid JSON: {e}"),
        })
}

fn activation_of(path: &Path, v: &Value) -> Result<Option<Activation>, ModelError> {
    let act = match v {
        Value::Null => return Ok(None),
        Value::String(s) => super::config::hf_activation(s),
        _ => None,
    };
    act.map(Some).ok_or_else(|| ModelError::BadConfig {
        path: path.to_path_buf(),
        reason: format!(
            "unsupported text hidden_act {v} (supported: {})",
            super::config::HF_ACTIVATIONS
        ),
    })
}

fn hf_text_json(dir: &Path) -> Result<TextJson, ModelError> {
    let path = dir.join("config.json");
    let Some(top) = read_json(&path)? else {
        return Ok((None, None, None));
    };
    let mut text = top.get("text_config").cloned().unwrap_or(Value::Null);
    if let Some(Value::Object(over)) = top.get("text_config_dict") {
        if let Value::Object(m) = &mut text {
            for (k, v) in over {
                m.insert(k.clone(), v.clone());
            }
        } else {
            text = Value::Object(over.clone());
        }
    }
    let heads = text
        .get("num_attention_heads")
        .and_then(Value::as_u64)
        .map(|h| h as usize);
    let act = match text.get("hidden_act") {
        Some(v) => activation_of(&path, v)?,
        None => None,
    };
    let eps = text
        .get("layer_norm_eps")
        .and_then(Value::as_f64)
        .map(|e| e as f32);
    Ok((heads, act, eps))
}

fn open_clip_text_json(dir: &Path) -> Result<TextJson, ModelError> {
    let path = dir.join("open_clip_config.json");
    let Some(top) = read_json(&path)? else {
        return Ok((None, None, None));
    };
    let empty = serde_json::Map::new();
    let model_cfg = top
        .get("model_cfg")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let text_cfg = model_cfg
        .get("text_cfg")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    // open_clip's `CLIPTextCfg` has 8 heads unless the config says otherwise (not width / 64).
    let heads = match text_cfg.get("heads") {
        None | Some(Value::Null) => Some(8),
        Some(v) => match v.as_u64() {
            Some(h) if h > 0 => Some(h as usize),
            _ => {
                return Err(ModelError::BadConfig {
                    path,
                    reason: format!("`text_cfg.heads` must be a positive integer, got {v}"),
                })
            }
        },
    };
    let act = Some(super::config::open_clip_activation(
        &path, model_cfg, text_cfg, "text_cfg",
    )?);
    // Options that change the tower without tensors that would say so: the embedding must be
    // the end-of-text token's (prm's zero-shot classes are embedded that way).
    let refuse = |what: String| ModelError::BadConfig {
        path: path.clone(),
        reason: format!(
            "{what}: prm implements open_clip's standard text tower (causal, pooled at the \
             end-of-text token) and would embed the class names with another model"
        ),
    };
    if let Some(pool) = text_cfg
        .get("pool_type")
        .and_then(Value::as_str)
        .filter(|p| *p != "argmax")
    {
        return Err(refuse(format!("`text_cfg.pool_type` is \"{pool}\"")));
    }
    for option in ["embed_cls", "no_causal_mask"] {
        if text_cfg.get(option) == Some(&Value::Bool(true)) {
            return Err(refuse(format!("`text_cfg.{option}` is true")));
        }
    }
    let eps = super::config::open_clip_ln_eps(&path, text_cfg)?;
    Ok((heads, act, Some(eps)))
}

/// Builds the text tower held by a checkpoint's tensors, or `None` when it has none.
pub(crate) fn build_text_tower(t: &Tensors<'_>) -> Result<Option<TextTower>, ModelError> {
    let (names, hf) = if t.contains(HF_TEXT.tok) && t.contains("text_model.head.weight") {
        // SigLIP's text tower: no causal mask, the last token pooled through `head`, a sigmoid
        // loss's logit bias. Loading it as CLIP's would embed the names wrongly.
        return Err(t.inconsistent(
            "the text tower is SigLIP's (`text_model.head.*`), not CLIP's, and prm builds only \
             CLIP text towers; make the class embeddings for prm eval --target zeroshot \
             --classes with tools/class_embeddings.py (transformers), which pads SigLIP's \
             prompts as its processor does",
        ));
    } else if t.contains(HF_TEXT.tok) {
        (&HF_TEXT, true)
    } else if t.contains(OPENAI_TEXT.tok) {
        (&OPENAI_TEXT, false)
    } else if t.names().any(|n| n.starts_with("text.")) {
        // open_clip's CustomTextCLIP keeps its tower under `text.*` (EVA, SigLIP, MobileCLIP,
        // Hugging Face text encoders): not "no text tower", which would send the user looking
        // for another checkpoint.
        return Err(t.inconsistent(
            "the text tower is stored under `text.*` (open_clip's CustomTextCLIP layout), which \
             prm does not read; embed the class names with open_clip and give prm eval --classes \
             a .safetensors of `class_embeddings` [C, E] with metadata `names`",
        ));
    } else {
        return Ok(None);
    };
    let dir = t.path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let tok_shape = t.shape(names.tok)?;
    let (vocab, width) = match tok_shape {
        [v, w] if *v > 0 && *w > 0 => (*v, *w),
        _ => return Err(t.bad_shape(names.tok, "[V, W]", tok_shape)),
    };
    let pos_shape = t.shape(names.pos)?;
    let context = match pos_shape {
        [c, w] if *w == width && *c > 1 => *c,
        _ => return Err(t.bad_shape(names.pos, format!("[context, {width}]"), pos_shape)),
    };
    let layers = count_layers(t, names.blocks)?;
    let fc1_name = if hf {
        format!("{}0.mlp.fc1.weight", names.blocks)
    } else {
        format!("{}0.mlp.c_fc.weight", names.blocks)
    };
    let fc1_shape = t.shape(&fc1_name)?;
    let mlp = match fc1_shape {
        [m, w] if *w == width && *m > 0 => *m,
        _ => return Err(t.bad_shape(&fc1_name, format!("[mlp, {width}]"), fc1_shape)),
    };
    let proj_shape = t.shape(names.proj)?;
    let embed_dim = match (hf, proj_shape) {
        (true, [e, w]) if *w == width && *e > 0 => *e,
        (false, [w, e]) if *w == width && *e > 0 => *e,
        _ => {
            let want = if hf {
                format!("[E, {width}]")
            } else {
                format!("[{width}, E]")
            };
            return Err(t.bad_shape(names.proj, want, proj_shape));
        }
    };
    let (heads, activation, ln_eps) = if hf {
        let (h, a, e) = hf_text_json(&dir)?;
        (
            h.unwrap_or(8),
            a.unwrap_or(Activation::QuickGelu),
            e.unwrap_or(1e-5),
        )
    } else {
        let (h, a, e) = open_clip_text_json(&dir)?;
        let act = if dir.join("open_clip_config.json").is_file() {
            a.unwrap_or(Activation::Gelu)
        } else {
            Activation::QuickGelu
        };
        // With an open_clip_config.json the heads are its (8 by default); without one, an
        // OpenAI checkpoint, whose text towers all have heads of 64.
        let heads = match h {
            Some(h) => h,
            None if width % 64 == 0 => width / 64,
            None => {
                return Err(t.inconsistent(format!(
                    "cannot infer the text tower's heads: width {width} is not a multiple of 64; \
                     put the model's open_clip_config.json beside the checkpoint"
                )))
            }
        };
        (heads, act, e.unwrap_or(1e-5))
    };
    if heads == 0 || width % heads != 0 {
        return Err(t.inconsistent(format!(
            "text tower: {heads} heads do not divide the width {width}"
        )));
    }

    let d = width;
    let format = if hf {
        Format::HuggingFace
    } else {
        Format::OpenAi
    };
    let blocks = (0..layers)
        .map(|i| load_block(t, format, &format!("{}{i}.", names.blocks), d, mlp))
        .collect::<Result<Vec<_>, _>>()?;
    let projection = if hf {
        t.load(names.proj, &[embed_dim, d])?
    } else {
        transpose(&t.load(names.proj, &[d, embed_dim])?, d, embed_dim)
    };
    let token_embedding = t.load(names.tok, &[vocab, d])?;
    let position_embedding = t.load(names.pos, &[context, d])?;
    let ln_final = t.layer_norm(names.ln_final, d)?;
    t.refuse_unread(&[names.tower], "text")?;
    Ok(Some(TextTower {
        config: TextConfig {
            width,
            layers,
            heads,
            mlp,
            vocab,
            context,
            embed_dim,
            activation,
            ln_eps,
        },
        weights: TextWeights {
            token_embedding,
            position_embedding,
            blocks,
            ln_final,
            projection: Linear {
                weight: projection,
                bias: None,
                out_features: embed_dim,
                in_features: d,
            },
        },
    }))
}
