//! Finding and opening a checkpoint's files: one `.safetensors` file, or the shards a
//! `*.safetensors.index.json` lists (as `transformers` writes large models), memory-mapped so
//! that only the tensors the loader reads are paged in (a `CLIPModel` file's text tower never
//! is) and a checkpoint is never copied whole into memory.
//!
//! PyTorch pickles (`torch.save` files and TorchScript archives such as OpenAI's `.pt`) are
//! recognised by their first bytes and refused with the command that converts them: a pickle
//! can run code when it is read, which is why prm reads safetensors only.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use super::hub::{self, HubId};
use super::load::{ModelError, Tensors};

/// What a model path may name, for messages.
const EXPECTED_SPEC: &str = "a .safetensors checkpoint file, a sharded checkpoint's \
     .safetensors.index.json, a directory holding model.safetensors, model.safetensors.index.json \
     or exactly one *.safetensors file, a Hugging Face hub id (owner/name) already in the local \
     cache, or random:ARCH[@SEED]";

/// The suffix of a sharded checkpoint's index.
const INDEX_SUFFIX: &str = ".safetensors.index.json";

/// The file names PyTorch checkpoints usually have, to point at the converter when a directory
/// holds one of them and no safetensors file.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt"];

/// The file or directory a model spec names: the path itself when it exists, else, for a hub
/// id (`owner/name[@revision]`, `hf-hub:owner/name`), its snapshot in the local Hugging Face
/// cache (found by the private `model::hub`). Not for `random:ARCH`.
pub fn locate(spec: &str) -> Result<PathBuf, ModelError> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match (HubId::parse(spec), hub::cache_dir()) {
        (Some(id), Some(cache)) => hub::snapshot(&id, &cache),
        _ => Err(not_found(path)),
    }
}

fn not_found(path: &Path) -> ModelError {
    ModelError::NotFound {
        path: path.to_path_buf(),
        expected: EXPECTED_SPEC.to_string(),
    }
}

/// Turns a file or directory path into the checkpoint to read: a `.safetensors` file or a
/// sharded checkpoint's index. In a directory, `model.safetensors` wins, then
/// `model.safetensors.index.json`, then the only `*.safetensors` file, then the only index.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf, ModelError> {
    if !path.exists() {
        return Err(not_found(path));
    }
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    for name in ["model.safetensors", "model.safetensors.index.json"] {
        let candidate = path.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let entries = std::fs::read_dir(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let named = |p: &PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let ends_with = |p: &PathBuf, suffix: &str| named(p).is_some_and(|n| n.ends_with(suffix));
    let singles: Vec<&PathBuf> = files
        .iter()
        .filter(|p| ends_with(p, ".safetensors"))
        .collect();
    let indexes: Vec<&PathBuf> = files
        .iter()
        .filter(|p| ends_with(p, INDEX_SUFFIX))
        .collect();
    let list = |ps: &[&PathBuf]| {
        ps.iter()
            .filter_map(|p| named(p))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (singles.as_slice(), indexes.as_slice()) {
        ([one], _) => Ok((*one).clone()),
        ([], [index]) => Ok((*index).clone()),
        ([], []) => {
            let pickles: Vec<&PathBuf> = files
                .iter()
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| PICKLE_EXTENSIONS.iter().any(|x| e == *x))
                })
                .collect();
            let reason = match pickles.first() {
                None => "directory holds no model.safetensors, no sharded checkpoint index \
                         (*.safetensors.index.json) and no other *.safetensors file"
                    .to_string(),
                Some(p) => format!(
                    "directory holds no safetensors checkpoint, only what looks like a PyTorch \
                     pickle ({}); {}",
                    list(&pickles),
                    convert_hint(p)
                ),
            };
            Err(ModelError::NoCheckpoint {
                dir: path.to_path_buf(),
                reason,
            })
        }
        ([], several) => Err(ModelError::NoCheckpoint {
            dir: path.to_path_buf(),
            reason: format!(
                "directory holds several sharded checkpoint indexes ({}); name the one to load",
                list(several)
            ),
        }),
        (several, _) => Err(ModelError::NoCheckpoint {
            dir: path.to_path_buf(),
            reason: format!(
                "directory holds no model.safetensors and several *.safetensors files ({}); \
                 name the file to load, or the *.safetensors.index.json of a sharded checkpoint",
                list(several)
            ),
        }),
    }
}

/// The command that turns a PyTorch checkpoint into one prm reads.
fn convert_hint(pickle: &Path) -> String {
    let stem = pickle
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let out = pickle.with_file_name(format!("{stem}.safetensors"));
    format!(
        "prm reads safetensors only (a pickle can run code when it is loaded); convert it once \
         with PyTorch: `python tools/to_safetensors.py {} {}` (tools/ is in prm's repository)",
        pickle.display(),
        out.display()
    )
}

/// One file of a checkpoint, mapped read-only.
struct MappedFile {
    path: PathBuf,
    bytes: Mapped,
}

/// A file's bytes: a memory map, or nothing for an empty file (which cannot be mapped).
enum Mapped {
    Map(memmap2::Mmap),
    Empty,
}

impl Mapped {
    fn bytes(&self) -> &[u8] {
        match self {
            Mapped::Map(m) => m,
            Mapped::Empty => &[],
        }
    }
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let bytes = if len == 0 {
            Mapped::Empty
        } else {
            // SAFETY: the map is read-only and private to this process. Another process that
            // truncates or rewrites the file while it is mapped could change what is read (or
            // fault a read past the new end); a checkpoint is not written while a run loads it,
            // and the loader copies every tensor it keeps out of the map at once.
            Mapped::Map(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Ok(MappedFile {
            path: path.to_path_buf(),
            bytes,
        })
    }

    /// The file parsed as safetensors; a pickle or another file gets an error that says so.
    fn safetensors(&self) -> Result<SafeTensors<'_>, ModelError> {
        let bytes = self.bytes.bytes();
        SafeTensors::deserialize(bytes).map_err(|e| match pickle_kind(bytes) {
            Some(kind) => ModelError::PickleCheckpoint {
                path: self.path.clone(),
                kind: kind.to_string(),
                hint: convert_hint(&self.path),
            },
            None => ModelError::BadSafetensors {
                path: self.path.clone(),
                reason: e.to_string(),
            },
        })
    }
}

/// What kind of PyTorch file `bytes` starts like, if any: a zip archive (`torch.save` since
/// PyTorch 1.6, and TorchScript archives such as OpenAI's CLIP `.pt` files) or a bare pickle
/// (older `torch.save`, protocol 2 to 5).
fn pickle_kind(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [b'P', b'K', 3, 4, ..] => Some("a PyTorch zip archive (torch.save or TorchScript)"),
        [0x80, 2..=5, ..] => Some("a pickle (an older torch.save file)"),
        _ => None,
    }
}

/// The files of one checkpoint, mapped: one safetensors file, or every shard an index lists.
pub(crate) struct Checkpoint {
    /// The path messages name: the file, or the index of a sharded checkpoint. The JSON files
    /// next to it (config.json, ...) are read from its directory.
    path: PathBuf,
    files: Vec<MappedFile>,
    /// For a sharded checkpoint, (tensor, shard) as its index lists them.
    index: Option<Vec<(String, String)>>,
}

impl Checkpoint {
    /// Opens `path`, a `.safetensors` file or a `*.safetensors.index.json` (see
    /// [`resolve_checkpoint`] for directories).
    pub(crate) fn open(path: &Path) -> Result<Self, ModelError> {
        let is_index = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(INDEX_SUFFIX));
        if !is_index {
            return Ok(Checkpoint {
                path: path.to_path_buf(),
                files: vec![MappedFile::open(path)?],
                index: None,
            });
        }
        let weight_map = read_index(path)?;
        let shards: BTreeSet<&str> = weight_map.iter().map(|(_, f)| f.as_str()).collect();
        let dir = path.parent().unwrap_or(Path::new("."));
        let files = shards
            .iter()
            .map(|shard| MappedFile::open(&dir.join(shard)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            files,
            index: Some(weight_map),
        })
    }

    /// Every tensor of every file, under one name space. For a sharded checkpoint, each
    /// tensor the index lists must be in the shard it names.
    pub(crate) fn tensors(&self) -> Result<Tensors<'_>, ModelError> {
        let parsed = self
            .files
            .iter()
            .map(|f| Ok((f.path.as_path(), f.safetensors()?)))
            .collect::<Result<Vec<_>, ModelError>>()?;
        if let Some(index) = &self.index {
            // The shards by the file names the index gives them (read_index keeps them plain).
            let by_name: std::collections::HashMap<&str, &SafeTensors<'_>> = parsed
                .iter()
                .filter_map(|(p, st)| Some((p.file_name()?.to_str()?, st)))
                .collect();
            for (name, shard) in index {
                let holds = by_name
                    .get(shard.as_str())
                    .is_some_and(|st| st.tensor(name).is_ok());
                if !holds {
                    return Err(ModelError::Inconsistent {
                        path: self.path.clone(),
                        reason: format!(
                            "the index places tensor `{name}` in {shard}, which does not hold it; \
                             the shards may be from another download"
                        ),
                    });
                }
            }
        }
        Tensors::new(&self.path, &parsed)
    }
}

/// The `weight_map` of a sharded checkpoint's index, as (tensor, shard file name) pairs.
fn read_index(path: &Path) -> Result<Vec<(String, String)>, ModelError> {
    let bad = |reason: String| ModelError::BadIndex {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".to_string()))?;
    if map.is_empty() {
        return Err(bad("`weight_map` lists no tensors".to_string()));
    }
    map.iter()
        .map(|(name, shard)| {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(format!("the shard of `{name}` is not a file name")))?;
            // A shard is a file beside the index: a path elsewhere is refused, not followed.
            let plain = Path::new(shard)
                .file_name()
                .is_some_and(|n| n == std::ffi::OsStr::new(shard));
            if !plain {
                return Err(bad(format!(
                    "the shard of `{name}`, `{shard}`, is not a file name in the index's directory"
                )));
            }
            Ok((name.clone(), shard.to_string()))
        })
        .collect()
}
