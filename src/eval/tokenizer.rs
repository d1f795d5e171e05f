//! CLIP tokenisation through Hugging Face's `tokenizers` crate, reading a `tokenizer.json`.
//!
//! Where the tokenizer comes from:
//! - an explicit `--tokenizer FILE` (a `tokenizer.json`) always wins;
//! - a Hugging Face CLIP directory ships `tokenizer.json` next to `model.safetensors`: it is used;
//! - an OpenAI / open_clip state dict has no tokenizer file of its own. All OpenAI CLIP models
//!   (and open_clip models trained with the OpenAI tokenizer) share one BPE vocabulary of 49,408
//!   tokens: put the `tokenizer.json` of any Hugging Face OpenAI CLIP repository (e.g.
//!   `openai/clip-vit-base-patch16`) next to the checkpoint, or pass it with `--tokenizer`;
//! - `random:ARCH` models use the small CLIP-style byte-level BPE bundled with prm
//!   (`assets/tokenizer/tiny-clip-tokenizer.json`, 614 ids, built by
//!   `tools/golden/make_tokenizer.py`): random weights come without tokenizer files, and a
//!   49,408-row random token table would only cost memory. Its structure is CLIP's (NFC,
//!   whitespace collapse, lower-casing, CLIP's split regex, byte-level BPE with `</w>`,
//!   `<|startoftext|> … <|endoftext|>`), and `<|endoftext|>` is its largest id, as in CLIP.
//!
//! Sequences are `<|startoftext|> tokens <|endoftext|>`, cut to the tower's context length (the
//! last kept position becomes `<|endoftext|>`, as OpenAI's `clip.tokenize(truncate=True)`).
//! No padding: the tower is causal, so padding after the end token changes nothing.

use std::path::{Path, PathBuf};

use super::EvalError;

/// The bundled tokenizer of the built-in architectures.
pub const BUNDLED_TOKENIZER: &str = include_str!("../../assets/tokenizer/tiny-clip-tokenizer.json");

const SOT: &str = "<|startoftext|>";
const EOT: &str = "<|endoftext|>";

/// A CLIP tokenizer.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    sot: u32,
    eot: u32,
    /// Where it came from, for reports.
    pub source: String,
}

impl ClipTokenizer {
    /// The tokenizer bundled for `random:ARCH` models.
    pub fn bundled() -> Result<Self, EvalError> {
        let inner: tokenizers::Tokenizer =
            BUNDLED_TOKENIZER
                .parse()
                .map_err(|e: tokenizers::Error| EvalError::Tokenizer {
                    path: PathBuf::from("<bundled>"),
                    reason: e.to_string(),
                })?;
        Self::wrap(
            inner,
            "bundled tiny CLIP BPE".into(),
            Path::new("<bundled>"),
        )
    }

    /// Reads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, EvalError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| EvalError::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::wrap(inner, path.display().to_string(), path)
    }

    fn wrap(
        mut inner: tokenizers::Tokenizer,
        source: String,
        path: &Path,
    ) -> Result<Self, EvalError> {
        let id = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| EvalError::Tokenizer {
                path: path.to_path_buf(),
                reason: format!("has no `{tok}` token; not a CLIP tokenizer"),
            })
        };
        let (sot, eot) = (id(SOT)?, id(EOT)?);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| EvalError::Tokenizer {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(ClipTokenizer {
            inner,
            sot,
            eot,
            source,
        })
    }

    /// The tokenizer for model `spec`: `explicit` if given, the bundled one for `random:*`,
    /// else `tokenizer.json` next to the checkpoint.
    pub fn for_model(spec: &str, explicit: Option<&Path>) -> Result<Self, EvalError> {
        if let Some(p) = explicit {
            return Self::from_file(p);
        }
        if spec.starts_with("random:") {
            return Self::bundled();
        }
        // A hub id's tokenizer.json is in its cache snapshot.
        let located = crate::model::locate(spec).unwrap_or_else(|_| spec.into());
        let p = located.as_path();
        let dir = if p.is_dir() {
            p.to_path_buf()
        } else {
            p.parent().unwrap_or(Path::new(".")).to_path_buf()
        };
        let file = dir.join("tokenizer.json");
        if file.is_file() {
            return Self::from_file(&file);
        }
        Err(EvalError::NoTokenizer { dir })
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eot(&self) -> u32 {
        self.eot
    }

    /// `<|startoftext|> … <|endoftext|>` for `text`, at most `context` ids.
    pub fn encode(&self, text: &str, context: usize) -> Result<Vec<u32>, EvalError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| EvalError::Tokenizer {
                path: PathBuf::from(&self.source),
                reason: format!("cannot encode {text:?}: {e}"),
            })?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 2);
        ids.push(self.sot);
        ids.extend_from_slice(enc.get_ids());
        ids.push(self.eot);
        if ids.len() > context {
            ids.truncate(context);
            ids[context - 1] = self.eot;
        }
        Ok(ids)
    }
}
