//! Checkpoint loading: resolving a model spec, reading a safetensors file, and the error type.
//!
//! A spec is `random:ARCH[@SEED]` (see [`super::builtin`]), a `.safetensors` file, a sharded
//! checkpoint's `*.safetensors.index.json`, a directory holding one of them, or a hub id in the
//! local Hugging Face cache ([`super::checkpoint`] and [`super::hub`] find and map the files).
//! The tensor names decide the format (Hugging Face `vision_model.*` or OpenAI/open_clip
//! `visual.*`, see [`super::formats`]); every dimension comes from tensor shapes, and the JSON
//! files next to the checkpoint only supply what shapes cannot (heads, activation, LayerNorm
//! eps, mean/std, see [`super::config`]). A tower's tensor that nothing reads is refused
//! ([`Tensors::refuse_unread`]). Nothing here panics on malformed input: every failure is a
//! [`ModelError`] naming the file and, where there is one, the tensor.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::checkpoint::{locate, resolve_checkpoint, Checkpoint};
use super::{LayerNormWeights, Linear, Model};

/// Everything that can go wrong while resolving a spec or loading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The spec names a path that does not exist.
    #[error("{path}: no such file or directory; expected {expected}")]
    NotFound { path: PathBuf, expected: String },
    /// Reading a file failed.
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A directory holds no checkpoint, or more than one.
    #[error("{dir}: {reason}")]
    NoCheckpoint { dir: PathBuf, reason: String },
    /// The file is not a valid safetensors file (empty, truncated, garbage, bad header).
    #[error(
        "{path}: cannot parse as safetensors ({reason}); the file may be truncated or not a \
         safetensors file"
    )]
    BadSafetensors { path: PathBuf, reason: String },
    /// The file is a PyTorch pickle, which prm does not read.
    #[error("{path}: this is {kind}, not a safetensors file; {hint}")]
    PickleCheckpoint {
        path: PathBuf,
        kind: String,
        hint: String,
    },
    /// A hub id (`owner/name`) that is not a path and not in the local Hugging Face cache.
    #[error(
        "`{id}` is not a file or directory, and the Hugging Face cache ({cache}) has no snapshot \
         of it: {reason}. prm never downloads; fetch it once, e.g. `hf download {id} --include \
         '*.safetensors' '*.json'`, or give the checkpoint's path"
    )]
    NotInHubCache {
        id: String,
        cache: PathBuf,
        reason: String,
    },
    /// A sharded checkpoint's index is malformed.
    #[error("{path}: bad sharded checkpoint index: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    /// The tensor names match neither checkpoint format.
    #[error(
        "{path}: unknown checkpoint format; found tensor name prefixes [{}]; expected Hugging Face \
         CLIP names (`vision_model.*`, optionally `visual_projection.weight`) or OpenAI/open_clip \
         names (`visual.*`), possibly under a `module.` or `state_dict.` prefix",
        .found.join(", ")
    )]
    UnknownFormat { path: PathBuf, found: Vec<String> },
    /// A tensor the vision tower needs is absent.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    /// A tower holds tensors the loader does not know, which would change what it computes.
    #[error(
        "{path}: the {tower} tower holds tensors prm does not know: {}; a CLIP variant \
         beyond the standard towers (scaled-cosine attention, attention pooling, extra norms) computes \
         something else, so prm refuses it rather than load it without them",
        .names.join(", ")
    )]
    UnknownTensors {
        path: PathBuf,
        tower: String,
        names: Vec<String>,
    },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected}")]
    BadShape {
        path: PathBuf,
        name: String,
        expected: String,
        got: Vec<usize>,
    },
    /// A tensor the vision tower needs is stored in a dtype we do not convert.
    #[error(
        "{path}: tensor `{name}` has dtype {dtype}; supported dtypes are F32, F16, BF16 and F64"
    )]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    /// Tensors are individually well-formed but do not make a model (block numbering, heads, ...).
    #[error("{path}: {reason}")]
    Inconsistent { path: PathBuf, reason: String },
    /// A JSON file next to the checkpoint is malformed or holds an unsupported value.
    #[error("{path}: bad config: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    /// `random:ARCH` with an ARCH we do not know.
    #[error("unknown built-in architecture `{arch}`; known architectures: {}", .known.join(", "))]
    UnknownArchitecture { arch: String, known: Vec<String> },
    /// A malformed spec, such as `random:tiny@notanumber`.
    #[error("bad model spec `{spec}`: {reason}")]
    BadSpec { spec: String, reason: String },
}

/// Loads `random:ARCH[@SEED]`, a checkpoint (file, sharded index or directory), or a model in
/// the local Hugging Face cache by its hub id.
pub fn load_model(spec: &str) -> Result<Model, ModelError> {
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
        return super::random_model(arch, seed);
    }
    let checkpoint = Checkpoint::open(&resolve_checkpoint(&locate(spec)?)?)?;
    super::formats::build_model(&checkpoint.tensors()?)
}

/// Reads one safetensors checkpoint file (or a sharded checkpoint's index) and builds the
/// vision tower it holds.
pub fn load_safetensors(path: &Path) -> Result<Model, ModelError> {
    super::formats::build_model(&Checkpoint::open(path)?.tensors()?)
}

/// [`load_safetensors`] on a checkpoint already in memory: `path` names it in messages, and the
/// JSON files next to it (`config.json`, ...) are read from its directory. The fuzz targets
/// (`fuzz/`) drive the loader through this.
pub fn load_safetensors_bytes(path: &Path, bytes: &[u8]) -> Result<Model, ModelError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::BadSafetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let tensors = Tensors::new(path, &[(path, st)])?;
    super::formats::build_model(&tensors)
}

/// The tensors of one file, keyed by name with any `module.` / `state_dict.` prefix removed.
pub(crate) struct Tensors<'a> {
    pub path: PathBuf,
    map: HashMap<String, TensorView<'a>>,
    /// The wrapper prefix that was stripped (for messages), e.g. `module.`.
    prefix: String,
    /// The prefix added to every name of a Hugging Face vision model saved on its own
    /// (`vision_model.`; empty when the file's names carry it), removed again in messages.
    added: &'static str,
    /// The names [`Tensors::load`] has read, so that a tower's tensors nothing read can be
    /// refused ([`Tensors::refuse_unread`]).
    read: RefCell<HashSet<String>>,
}

impl<'a> Tensors<'a> {
    /// The tensors of a checkpoint's files (one, or a sharded checkpoint's shards), named in
    /// messages by `path`.
    pub(crate) fn new(path: &Path, files: &[(&Path, SafeTensors<'a>)]) -> Result<Self, ModelError> {
        let mut map = HashMap::new();
        let mut origin: HashMap<String, &Path> = HashMap::new();
        let mut prefix = String::new();
        for (file, st) in files {
            for (name, view) in st.iter() {
                let (stripped, pre) = strip_wrappers(name);
                if !pre.is_empty()
                    && (stripped.starts_with("visual") || stripped.starts_with("vision"))
                {
                    prefix = pre.to_string();
                }
                if map.insert(stripped.to_string(), view).is_some() {
                    let first = origin.get(stripped).copied().unwrap_or(file);
                    let place = if first == *file {
                        String::new()
                    } else {
                        format!(" (in {} and in {})", first.display(), file.display())
                    };
                    return Err(ModelError::Inconsistent {
                        path: path.to_path_buf(),
                        reason: format!(
                            "tensor `{stripped}` appears more than once once `module.` / \
                             `state_dict.` prefixes are removed{place}"
                        ),
                    });
                }
                origin.insert(stripped.to_string(), file);
            }
        }
        // A vision-language model (LLaVA, PaliGemma, ...) keeps its vision tower, a whole
        // `CLIPVisionModel` / `SiglipVisionModel`, under `vision_tower.` (under `model.` as
        // well since transformers 5): that tower is the model read, the language model's
        // tensors are not looked at. Messages name tensors as the file does.
        let has =
            |map: &HashMap<String, TensorView<'a>>, p: &str| map.keys().any(|n| n.starts_with(p));
        if !has(&map, "vision_model.") && !has(&map, "visual.") {
            let nested = ["model.vision_tower.", "vision_tower."]
                .into_iter()
                .find(|p| has(&map, &format!("{p}vision_model.")));
            if let Some(p) = nested {
                map = map
                    .into_iter()
                    .filter_map(|(n, v)| n.strip_prefix(p).map(|rest| (rest.to_string(), v)))
                    .collect();
                prefix = format!("{prefix}{p}");
            }
        }
        // A `CLIPVisionModel` / `SiglipVisionModel` built on its own (not loaded from a
        // `CLIPModel`) saves its tensors without the `vision_model.` prefix of every other
        // Hugging Face checkpoint: `embeddings.*`, `encoder.layers.*`, `post_layernorm.*`.
        let bare_hf_vision = map.contains_key("embeddings.patch_embedding.weight")
            && map.keys().any(|n| n.starts_with("encoder.layers."))
            && !map
                .keys()
                .any(|n| n.starts_with("vision_model.") || n.starts_with("visual."));
        let added = if bare_hf_vision {
            map = map
                .into_iter()
                .map(|(n, v)| (format!("vision_model.{n}"), v))
                .collect();
            "vision_model."
        } else {
            ""
        };
        Ok(Tensors {
            path: path.to_path_buf(),
            map,
            prefix,
            added,
            read: RefCell::new(HashSet::new()),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The name as it is written in the file, for messages.
    pub fn display_name(&self, name: &str) -> String {
        let written = name.strip_prefix(self.added).unwrap_or(name);
        format!("{}{}", self.prefix, written)
    }

    fn view(&self, name: &str) -> Result<&TensorView<'a>, ModelError> {
        self.map.get(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.path.clone(),
            name: self.display_name(name),
        })
    }

    pub fn shape(&self, name: &str) -> Result<&[usize], ModelError> {
        Ok(self.view(name)?.shape())
    }

    pub fn bad_shape(&self, name: &str, expected: impl Into<String>, got: &[usize]) -> ModelError {
        ModelError::BadShape {
            path: self.path.clone(),
            name: self.display_name(name),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }

    pub fn inconsistent(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Inconsistent {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Fails when a tensor under one of `prefixes` was never read (int64 `position_ids`, an
    /// index table, aside). A tower's tensor that prm does not know changes what the tower
    /// computes (open_clip's scaled-cosine attention, attention pooling, extra norms): loading the rest
    /// as if it were not there would give another model without a word.
    pub(crate) fn refuse_unread(&self, prefixes: &[&str], tower: &str) -> Result<(), ModelError> {
        let read = self.read.borrow();
        let mut unread: Vec<&str> = self
            .names()
            .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
            .filter(|n| !n.ends_with("position_ids") && !read.contains(*n))
            .collect();
        if unread.is_empty() {
            return Ok(());
        }
        unread.sort_unstable();
        let count = unread.len();
        let mut names: Vec<String> = unread
            .iter()
            .take(6)
            .map(|n| self.display_name(n))
            .collect();
        if count > names.len() {
            names.push(format!("... ({count} in all)"));
        }
        Err(ModelError::UnknownTensors {
            path: self.path.clone(),
            tower: tower.to_string(),
            names,
        })
    }

    /// A LayerNorm: `{prefix}.weight` and `{prefix}.bias`, each `[width]`.
    pub fn layer_norm(&self, prefix: &str, width: usize) -> Result<LayerNormWeights, ModelError> {
        Ok(LayerNormWeights {
            weight: self.load(&format!("{prefix}.weight"), &[width])?,
            bias: self.load(&format!("{prefix}.bias"), &[width])?,
        })
    }

    /// A linear layer with a bias: `{prefix}.weight` `[out, inp]` and `{prefix}.bias` `[out]`.
    pub fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear, ModelError> {
        Ok(Linear {
            weight: self.load(&format!("{prefix}.weight"), &[out, inp])?,
            bias: Some(self.load(&format!("{prefix}.bias"), &[out])?),
            out_features: out,
            in_features: inp,
        })
    }

    /// The stacked q/k/v projection of PyTorch's `nn.MultiheadAttention` under `prefix`
    /// (`{prefix}in_proj_weight` `[3·width, width]` and `{prefix}in_proj_bias`), as OpenAI's
    /// and open_clip's towers store it.
    pub fn in_projection(&self, prefix: &str, width: usize) -> Result<Linear, ModelError> {
        Ok(Linear {
            weight: self.load(&format!("{prefix}in_proj_weight"), &[3 * width, width])?,
            bias: Some(self.load(&format!("{prefix}in_proj_bias"), &[3 * width])?),
            out_features: 3 * width,
            in_features: width,
        })
    }

    /// Reads a tensor as f32 after checking that its shape is exactly `expected`.
    pub fn load(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        self.read.borrow_mut().insert(name.to_string());
        let view = self.view(name)?;
        if view.shape() != expected {
            return Err(self.bad_shape(name, format!("{expected:?}"), view.shape()));
        }
        tensor_to_f32(view).ok_or_else(|| ModelError::UnsupportedDtype {
            path: self.path.clone(),
            name: self.display_name(name),
            dtype: format!("{:?}", view.dtype()),
        })
    }
}

/// Removes any number of leading `module.` / `state_dict.` wrappers; returns (rest, removed).
fn strip_wrappers(name: &str) -> (&str, &str) {
    let mut rest = name;
    loop {
        if let Some(r) = rest.strip_prefix("module.") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix("state_dict.") {
            rest = r;
        } else {
            break;
        }
    }
    (rest, &name[..name.len() - rest.len()])
}

/// Converts a floating-point tensor (F32, F16, BF16 or F64; little-endian, as safetensors stores
/// it) to f32; `None` for any other dtype.
pub fn tensor_to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let data = view.data();
    Some(match view.dtype() {
        Dtype::F32 => data
            .par_chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .par_chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .par_chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .par_chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        _ => return None,
    })
}
