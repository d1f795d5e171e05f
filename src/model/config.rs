//! The JSON files that may sit next to a checkpoint, and the few settings we take from them.
//!
//! Dimensions always come from tensor shapes (a re-saved `config.json` omits default fields, and
//! the default `patch_size` is 32). From the JSON we take only what shapes cannot tell:
//! - HF `config.json`: `num_attention_heads`, `hidden_act`, `layer_norm_eps`, read from
//!   `vision_config`, overridden key by key by the older `vision_config_dict`, or from the top
//!   level for a `CLIPVisionConfig`-style file. Absent keys take `CLIPVisionConfig`'s defaults
//!   (12 heads, `quick_gelu`, 1e-5), which is what transformers itself would use.
//! - HF `preprocessor_config.json`: `image_mean`, `image_std`.
//! - open_clip `open_clip_config.json`: `model_cfg.quick_gelu` (absent or false means exact
//!   GELU in open_clip) with `model_cfg.vision_cfg.act_kwargs` (`approximate: "tanh"` makes it
//!   GELU's tanh approximation), `model_cfg.vision_cfg.head_width` (default 64),
//!   `preprocess_cfg.mean/std`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{Activation, ModelError, Pooling};

/// Per-channel (mean, std) for pixels in [0, 1].
pub(crate) type MeanStd = ([f32; 3], [f32; 3]);

/// What a HF `config.json` says about the vision tower.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct HfVisionSettings {
    pub heads: usize,
    pub activation: Activation,
    pub ln_eps: f32,
    /// A SigLIP tower (`model_type` `siglip` / `siglip_vision_model`), whose defaults differ
    /// from CLIP's: `gelu_pytorch_tanh`, LayerNorm eps 1e-6, mean and std 0.5.
    pub siglip: bool,
}

/// What an `open_clip_config.json` says about the vision tower.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OpenClipSettings {
    pub head_width: usize,
    pub activation: Activation,
    pub mean_std: Option<MeanStd>,
    /// `vision_cfg.norm_kwargs.eps`, else PyTorch's LayerNorm default.
    pub ln_eps: f32,
    /// `vision_cfg.no_ln_pre` is false (or absent): the tower has `visual.ln_pre`.
    pub ln_pre: bool,
    /// `vision_cfg.pool_type` (`tok` or `avg`; `global_average_pool` is the older `avg`).
    pub pooling: Pooling,
}

/// open_clip's LayerNorm eps for a tower config (`norm_kwargs.eps`), else 1e-5.
pub(crate) fn open_clip_ln_eps(
    path: &Path,
    tower_cfg: &Map<String, Value>,
) -> Result<f32, ModelError> {
    let empty = Map::new();
    let norm = object(path, tower_cfg, "norm_kwargs")?.unwrap_or(&empty);
    match norm.get("eps") {
        None | Some(Value::Null) => Ok(1e-5),
        Some(v) => match v.as_f64() {
            Some(e) if e > 0.0 && e.is_finite() => Ok(e as f32),
            _ => Err(bad(
                path,
                format!("`norm_kwargs.eps` must be a positive number, got {v}"),
            )),
        },
    }
}

/// The MLP activation open_clip builds for a tower config (`vision_cfg` / `text_cfg`):
/// `model_cfg.quick_gelu` picks QuickGELU, else `nn.GELU` (absent or false), and the tower's
/// `act_kwargs` go to that class's constructor (open_clip 3.3.0 `_build_vision_tower` /
/// `_build_text_tower`). `nn.GELU` takes `approximate`: "none" (exact GELU) or "tanh" (its tanh
/// approximation, SigLIP2's text towers). QuickGELU takes no option at all, so open_clip fails
/// to build a QuickGELU tower with `act_kwargs`; prm refuses it, and any other option, rather
/// than compute another model.
pub(crate) fn open_clip_activation(
    path: &Path,
    model_cfg: &Map<String, Value>,
    tower_cfg: &Map<String, Value>,
    tower: &str,
) -> Result<Activation, ModelError> {
    let quick_gelu = match model_cfg.get("quick_gelu") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(v) => {
            return Err(bad(
                path,
                format!("`model_cfg.quick_gelu` must be a boolean, got {v}"),
            ))
        }
    };
    let mut activation = if quick_gelu {
        Activation::QuickGelu
    } else {
        Activation::Gelu
    };
    let empty = Map::new();
    for (key, value) in object(path, tower_cfg, "act_kwargs")?.unwrap_or(&empty) {
        let why = match (quick_gelu, key.as_str(), value.as_str()) {
            (false, "approximate", Some("none")) => {
                activation = Activation::Gelu;
                continue;
            }
            (false, "approximate", Some("tanh")) => {
                activation = Activation::GeluTanh;
                continue;
            }
            (true, _, _) => {
                "open_clip's QuickGELU (`model_cfg.quick_gelu`) takes no options, and open_clip \
                 cannot build this tower"
            }
            _ => {
                "prm computes open_clip's GELU with `approximate` \"none\" or \"tanh\" and no \
                 other option, and would compute another model"
            }
        };
        return Err(bad(
            path,
            format!("`{tower}.act_kwargs` sets {key} = {value}: {why}"),
        ));
    }
    Ok(activation)
}

/// The pooling open_clip's vision options choose, refusing the options that change what the
/// tower computes without leaving tensors that would say so (the loader refuses unknown tensors
/// separately). Average pooling and `no_ln_pre` (CLIPA) change no feature F_0..F_L beyond
/// LN_pre's absence, which the loader builds; the average-pooled image embedding is built
/// (`reference::pooling`), with the post-LayerNorm before or after the average as the config
/// says.
fn open_clip_vision_pooling(
    path: &Path,
    vision: &Map<String, Value>,
) -> Result<Pooling, ModelError> {
    let is_true = |k: &str| matches!(vision.get(k), Some(Value::Bool(true)));
    let string = |k: &str| vision.get(k).and_then(Value::as_str);
    let unsupported = |what: String| {
        Err(bad(
            path,
            format!(
                "{what}: prm implements open_clip's standard ViT (class-token or average pooling, \
                 learned positions) and would compute another model"
            ),
        ))
    };
    // The post-LayerNorm comes after the average with `final_ln_after_pool` (CLIPA), before it
    // otherwise; a single token's pooling is the same either way.
    let average = if is_true("final_ln_after_pool") {
        Pooling::PatchAverage
    } else {
        Pooling::NormedPatchAverage
    };
    let pooling = match string("pool_type") {
        None | Some("tok") if !is_true("global_average_pool") => Pooling::ClassToken,
        None | Some("tok") | Some("avg") => average,
        Some(pool) => return unsupported(format!("`vision_cfg.pool_type` is \"{pool}\"")),
    };
    if is_true("attentional_pool") {
        return unsupported("`vision_cfg.attentional_pool` is true".into());
    }
    if let Some(kind) = string("pos_embed_type").filter(|p| *p != "learnable") {
        return unsupported(format!("`vision_cfg.pos_embed_type` is \"{kind}\""));
    }
    if let Some(name) = string("timm_model_name") {
        return unsupported(format!(
            "`vision_cfg.timm_model_name` is \"{name}\" (a timm tower)"
        ));
    }
    Ok(pooling)
}

fn bad(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::BadConfig {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a JSON object from `path`, or `None` when there is no such file.
fn read_json(path: &Path) -> Result<Option<Map<String, Value>>, ModelError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| bad(path, format!("invalid JSON: {e}")))?;
    match value {
        Value::Object(map) => Ok(Some(map)),
        _ => Err(bad(path, "expected a JSON object at the top level")),
    }
}

fn object<'a>(
    path: &Path,
    map: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, ModelError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(bad(path, format!("`{key}` is not a JSON object"))),
    }
}

fn positive_int(
    path: &Path,
    map: &Map<String, Value>,
    key: &str,
) -> Result<Option<usize>, ModelError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 && n <= u32::MAX as u64 => Ok(Some(n as usize)),
            _ => Err(bad(
                path,
                format!("`{key}` must be a positive integer, got {v}"),
            )),
        },
    }
}

fn triple(
    path: &Path,
    map: &Map<String, Value>,
    key: &str,
) -> Result<Option<[f32; 3]>, ModelError> {
    let Some(v) = map.get(key) else {
        return Ok(None);
    };
    if v.is_null() {
        return Ok(None);
    }
    let err = || {
        bad(
            path,
            format!("`{key}` must be a list of 3 numbers, got {v}"),
        )
    };
    let list = v.as_array().ok_or_else(err)?;
    if list.len() != 3 {
        return Err(err());
    }
    let mut out = [0.0f32; 3];
    for (o, x) in out.iter_mut().zip(list) {
        *o = x.as_f64().ok_or_else(err)? as f32;
        if !o.is_finite() {
            return Err(err());
        }
    }
    Ok(Some(out))
}

/// Checks a mean/std pair: std must be positive.
fn mean_std(path: &Path, mean: [f32; 3], std: [f32; 3]) -> Result<MeanStd, ModelError> {
    if std.iter().any(|&s| s <= 0.0) {
        return Err(bad(
            path,
            format!("image std must be positive, got {std:?}"),
        ));
    }
    Ok((mean, std))
}

/// Reads `config.json` in `dir`, if there is one.
pub(crate) fn read_hf_config(
    dir: &Path,
) -> Result<Option<(PathBuf, HfVisionSettings)>, ModelError> {
    let path = dir.join("config.json");
    let Some(top) = read_json(&path)? else {
        return Ok(None);
    };
    let nested = object(&path, &top, "vision_config")?;
    let nested_dict = object(&path, &top, "vision_config_dict")?;
    let vision: Map<String, Value> = match (nested, nested_dict) {
        (None, None) => top.clone(),
        (a, b) => {
            let mut merged = a.cloned().unwrap_or_default();
            if let Some(b) = b {
                for (k, v) in b {
                    merged.insert(k.clone(), v.clone());
                }
            }
            merged
        }
    };
    let model_type = |m: &Map<String, Value>| {
        m.get("model_type")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let kind = model_type(&vision).or_else(|| model_type(&top));
    if let Some(kind) = kind.as_deref().filter(|k| k.starts_with("siglip2")) {
        return Err(bad(
            &path,
            format!(
                "model_type `{kind}`: SigLIP 2 towers (NaFlex patch embedding and position \
                 resizing) are not supported; SigLIP (`siglip`, `siglip_vision_model`) is"
            ),
        ));
    }
    let siglip = matches!(kind.as_deref(), Some("siglip" | "siglip_vision_model"));
    let heads = positive_int(&path, &vision, "num_attention_heads")?.unwrap_or(12);
    // The config classes' defaults when a field is absent (re-saved configs omit them).
    let default_act = if siglip {
        "gelu_pytorch_tanh"
    } else {
        "quick_gelu"
    };
    let activation = match vision.get("hidden_act") {
        None | Some(Value::Null) => hf_activation_or_refuse(&path, default_act)?,
        Some(Value::String(s)) => hf_activation_or_refuse(&path, s)?,
        Some(v) => {
            return Err(bad(
                &path,
                format!("`hidden_act` must be a string, got {v}"),
            ))
        }
    };
    let ln_eps = match vision.get("layer_norm_eps") {
        None | Some(Value::Null) if siglip => 1e-6,
        None | Some(Value::Null) => 1e-5,
        Some(v) => match v.as_f64() {
            Some(e) if e > 0.0 && e.is_finite() => e as f32,
            _ => {
                return Err(bad(
                    &path,
                    format!("`layer_norm_eps` must be a positive number, got {v}"),
                ))
            }
        },
    };
    Ok(Some((
        path,
        HfVisionSettings {
            heads,
            activation,
            ln_eps,
            siglip,
        },
    )))
}

/// The `hidden_act` names of transformers' activations that prm computes, for messages.
pub(crate) const HF_ACTIVATIONS: &str = "quick_gelu, gelu, gelu_pytorch_tanh, gelu_new";

/// The activation a HF `hidden_act` names: transformers' `ACT2FN` classes `QuickGELUActivation`,
/// `GELUActivation` (exact, erf), and `GELUTanh` (`gelu_pytorch_tanh`: `F.gelu(approximate=
/// "tanh")`) and `NewGELUActivation` (`gelu_new`: the same tanh formula written out in torch
/// ops), which are one function. transformers' other spellings of that formula
/// (`gelu_python_tanh`, `gelu_accurate`, and `gelu_fast` with √(2/π) to ten digits) are not
/// read.
pub(crate) fn hf_activation(name: &str) -> Option<Activation> {
    match name {
        "quick_gelu" => Some(Activation::QuickGelu),
        "gelu" => Some(Activation::Gelu),
        "gelu_pytorch_tanh" | "gelu_new" => Some(Activation::GeluTanh),
        _ => None,
    }
}

/// [`hf_activation`], or the error naming what prm reads.
fn hf_activation_or_refuse(path: &Path, name: &str) -> Result<Activation, ModelError> {
    hf_activation(name).ok_or_else(|| {
        bad(
            path,
            format!("unsupported hidden_act `{name}` (supported: {HF_ACTIVATIONS})"),
        )
    })
}

/// Reads `image_mean` / `image_std` from `preprocessor_config.json` in `dir`, if present.
pub(crate) fn read_preprocessor(dir: &Path) -> Result<Option<MeanStd>, ModelError> {
    let path = dir.join("preprocessor_config.json");
    let Some(map) = read_json(&path)? else {
        return Ok(None);
    };
    let mean = triple(&path, &map, "image_mean")?;
    let std = triple(&path, &map, "image_std")?;
    match (mean, std) {
        (None, None) => Ok(None),
        (m, s) => mean_std(
            &path,
            m.unwrap_or(super::OPENAI_MEAN),
            s.unwrap_or(super::OPENAI_STD),
        )
        .map(Some),
    }
}

/// Reads `open_clip_config.json` in `dir`, if present.
pub(crate) fn read_open_clip_config(dir: &Path) -> Result<Option<OpenClipSettings>, ModelError> {
    let path = dir.join("open_clip_config.json");
    let Some(top) = read_json(&path)? else {
        return Ok(None);
    };
    let empty = Map::new();
    let model_cfg = object(&path, &top, "model_cfg")?.unwrap_or(&empty);
    let vision_cfg = object(&path, model_cfg, "vision_cfg")?.unwrap_or(&empty);
    let pooling = open_clip_vision_pooling(&path, vision_cfg)?;
    let ln_pre = !matches!(vision_cfg.get("no_ln_pre"), Some(Value::Bool(true)));
    let head_width = positive_int(&path, vision_cfg, "head_width")?.unwrap_or(64);
    let ln_eps = open_clip_ln_eps(&path, vision_cfg)?;
    let activation = open_clip_activation(&path, model_cfg, vision_cfg, "vision_cfg")?;
    let pre = object(&path, &top, "preprocess_cfg")?.unwrap_or(&empty);
    let mean_std = match (triple(&path, pre, "mean")?, triple(&path, pre, "std")?) {
        (None, None) => None,
        (m, s) => Some(mean_std(
            &path,
            m.unwrap_or(super::OPENAI_MEAN),
            s.unwrap_or(super::OPENAI_STD),
        )?),
    };
    Ok(Some(OpenClipSettings {
        head_width,
        activation,
        mean_std,
        ln_eps,
        ln_pre,
        pooling,
    }))
}
