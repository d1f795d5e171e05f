//! The CLIP text tower forward (CPU reference) and class embeddings for `--classes`.
//!
//! Text forward: `h = token_embedding[ids] + position_embedding[0..n]`; per block, pre-LN causal
//! attention and MLP with residuals (the vision block's structure); the final LayerNorm; the row
//! of the end-of-text token (the first position of the largest id, `torch.argmax`); the text
//! projection.
//!
//! `--classes FILE`:
//! - `*.safetensors`: tensor `class_embeddings` `[C, E]` (F32/F16/BF16/F64) with the metadata key
//!   `names` holding C distinct names (a JSON array, or comma-separated); rows, none of them
//!   zero, are L2-normalised on load;
//! - anything else: a UTF-8 text file, one class name per line (blank lines skipped, surrounding
//!   white space and a byte-order mark trimmed, every name distinct). Each name is put into
//!   every prompt template (the 80 ImageNet templates of OpenAI's CLIP,
//!   `assets/prompt_templates.txt`), each prompt is embedded with the checkpoint's text tower
//!   and L2-normalised, the prompts of a class are averaged, and the mean is L2-normalised
//!   again.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::ops::{attention_variant, linear, normalize_rows, Scores};
use super::tokenizer::ClipTokenizer;
use super::EvalError;
use crate::model::TextTower;
use crate::reference::ops::{activation, layer_norm};

/// OpenAI CLIP's 80 ImageNet prompt templates, `{}` standing for the class name.
pub const PROMPT_TEMPLATES: &str = include_str!("../../assets/prompt_templates.txt");

/// The prompt templates, one per line.
pub fn prompt_templates() -> Vec<&'static str> {
    PROMPT_TEMPLATES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Position of the end-of-text token: the first maximum of the ids (OpenAI's `argmax`).
pub fn eot_position(ids: &[u32]) -> usize {
    let mut best = 0;
    for (i, &id) in ids.iter().enumerate() {
        if id > ids[best] {
            best = i;
        }
    }
    best
}

/// Checks ids against the tower (vocabulary, context) before a forward.
pub fn check_ids(tower: &TextTower, ids: &[u32]) -> Result<(), EvalError> {
    let c = &tower.config;
    if ids.is_empty() || ids.len() > c.context {
        return Err(EvalError::Text(format!(
            "a token sequence of length {} does not fit the text tower's context of {}",
            ids.len(),
            c.context
        )));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab) {
        return Err(EvalError::Text(format!(
            "token id {bad} is outside the text tower's vocabulary of {} ids: the tokenizer does \
             not belong to this checkpoint",
            c.vocab
        )));
    }
    Ok(())
}

/// Text embedding `[E]` (not normalised) of one token sequence, on the CPU reference.
pub fn encode_text_reference(tower: &TextTower, ids: &[u32]) -> Result<Vec<f32>, EvalError> {
    check_ids(tower, ids)?;
    let c = &tower.config;
    let w = &tower.weights;
    let (n, d) = (ids.len(), c.width);
    let mut h = vec![0.0f32; n * d];
    for (t, &id) in ids.iter().enumerate() {
        let tok = &w.token_embedding[id as usize * d..(id as usize + 1) * d];
        let pos = &w.position_embedding[t * d..(t + 1) * d];
        for ((o, a), b) in h[t * d..(t + 1) * d].iter_mut().zip(tok).zip(pos) {
            *o = a + b;
        }
    }
    let mut normed = vec![0.0f32; n * d];
    let mut context = vec![0.0f32; n * d];
    let mut qkv = vec![0.0f32; n * 3 * d];
    let mut hidden = vec![0.0f32; n * c.mlp];
    for b in &w.blocks {
        layer_norm(&h, d, &b.ln1, c.ln_eps, &mut normed);
        linear(&normed, n, &b.qkv, &mut qkv, false);
        attention_variant(&qkv, n, d, c.heads, Scores::QK, true, &mut context);
        linear(&context, n, &b.out_proj, &mut h, true);
        layer_norm(&h, d, &b.ln2, c.ln_eps, &mut normed);
        linear(&normed, n, &b.fc1, &mut hidden, false);
        activation(c.activation, &mut hidden);
        linear(&hidden, n, &b.fc2, &mut h, true);
    }
    let e = eot_position(ids);
    let mut pooled = vec![0.0f32; d];
    layer_norm(
        &h[e * d..(e + 1) * d],
        d,
        &w.ln_final,
        c.ln_eps,
        &mut pooled,
    );
    let mut out = vec![0.0f32; c.embed_dim];
    linear(&pooled, 1, &w.projection, &mut out, false);
    Ok(out)
}

/// Anything that embeds token sequences with a text tower (the CPU reference, or the GPU
/// engine's kernels).
pub trait TextEncoder {
    fn tower(&self) -> &TextTower;
    /// Embeddings `[n, E]` of `n` sequences (not normalised).
    fn encode_batch(&self, sequences: &[Vec<u32>]) -> Result<Vec<f32>, EvalError>;
}

/// The CPU reference text encoder.
pub struct ReferenceText<'t>(pub &'t TextTower);

impl TextEncoder for ReferenceText<'_> {
    fn tower(&self) -> &TextTower {
        self.0
    }
    fn encode_batch(&self, sequences: &[Vec<u32>]) -> Result<Vec<f32>, EvalError> {
        let mut out = Vec::with_capacity(sequences.len() * self.0.config.embed_dim);
        for s in sequences {
            out.extend(encode_text_reference(self.0, s)?);
        }
        Ok(out)
    }
}

/// Class names and their L2-normalised embeddings `[C, E]`.
#[derive(Clone, Debug)]
pub struct ClassEmbeddings {
    pub names: Vec<String>,
    pub embeddings: Vec<f32>,
    pub dim: usize,
    /// How they were made, for reports.
    pub source: String,
    /// The fingerprint of the text tower that embedded the names
    /// ([`crate::model::TextTower::fingerprint`]): this run's, or the one a file made by
    /// `prm classes` records; `None` for precomputed embeddings that do not say.
    pub text_weights: Option<String>,
    /// For embeddings read from a file: whether `text_weights` is the evaluated checkpoint's
    /// own text tower (`None` when either is unknown). Embeddings of another tower lie in
    /// another space, and every prediction made with them is meaningless.
    pub text_weights_match: Option<bool>,
}

impl ClassEmbeddings {
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Builds class embeddings from names with the prompt ensemble.
pub fn embed_class_names(
    names: &[String],
    encoder: &dyn TextEncoder,
    tokenizer: &ClipTokenizer,
    templates: &[&str],
) -> Result<ClassEmbeddings, EvalError> {
    let tower = encoder.tower();
    let c = &tower.config;
    let e = c.embed_dim;
    let mut embeddings = Vec::with_capacity(names.len() * e);
    for name in names {
        let seqs = templates
            .iter()
            .map(|t| tokenizer.encode(&t.replace("{}", name), c.context))
            .collect::<Result<Vec<_>, _>>()?;
        let mut emb = encoder.encode_batch(&seqs)?;
        normalize_rows(&mut emb, e);
        let mut mean = vec![0.0f64; e];
        for row in emb.chunks(e) {
            mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
        }
        let n = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
        embeddings.extend(
            mean.iter()
                .map(|v| if n > 0.0 { (v / n) as f32 } else { 0.0 }),
        );
    }
    let text_weights = tower.fingerprint();
    Ok(ClassEmbeddings {
        names: names.to_vec(),
        embeddings,
        dim: e,
        source: format!(
            "{} names x {} prompt templates, text tower {text_weights}, tokenizer {}",
            names.len(),
            templates.len(),
            tokenizer.source
        ),
        text_weights: Some(text_weights),
        text_weights_match: None,
    })
}

/// Reads class names, one per line (blank lines skipped, white space and a byte-order mark
/// trimmed). Two lines of one name are refused: they embed to the same vector, so the second
/// could never be predicted (argmax takes the first of a tie), and a label naming it would
/// always mean the first.
pub fn read_class_names(path: &Path) -> Result<Vec<String>, EvalError> {
    let bad = |reason: String| EvalError::Classes {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(format!("cannot read as UTF-8 text: {e}")))?;
    let (numbers, names): (Vec<usize>, Vec<String>) = super::labels::strip_bom(&text)
        .lines()
        .map(str::trim)
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| (i + 1, l.to_string()))
        .unzip();
    if names.is_empty() {
        return Err(bad("no class names (one per line expected)".into()));
    }
    if let Some((name, i, j)) = repeated_name(&names) {
        return Err(bad(format!(
            "class `{name}` is listed twice (lines {} and {}); give each class its own name \
             (e.g. `crane (bird)` and `crane (machine)`)",
            numbers[i], numbers[j]
        )));
    }
    Ok(names)
}

/// The first name that `names` holds twice, with its two positions: class names must be
/// distinct, since a label naming a class would otherwise be ambiguous.
pub(crate) fn repeated_name(names: &[String]) -> Option<(&str, usize, usize)> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    names
        .iter()
        .enumerate()
        .find_map(|(i, n)| first.insert(n, i).map(|j| (n.as_str(), j, i)))
}

/// Reads `class_embeddings [C, E]` and the `names` metadata from a safetensors file.
pub fn read_class_safetensors(path: &Path) -> Result<ClassEmbeddings, EvalError> {
    let bad = |reason: String| EvalError::Classes {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let view = st
        .tensor("class_embeddings")
        .map_err(|_| bad("has no tensor `class_embeddings` [C, E]".into()))?;
    let (c, e) = match view.shape() {
        [c, e] if *c > 0 && *e > 0 => (*c, *e),
        s => {
            return Err(bad(format!(
                "`class_embeddings` has shape {s:?}, expected [C, E]"
            )))
        }
    };
    let mut v = crate::model::tensor_to_f32(&view).ok_or_else(|| {
        bad(format!(
            "`class_embeddings` has dtype {:?}; expected a float (F32, F16, BF16 or F64)",
            view.dtype()
        ))
    })?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(bad("`class_embeddings` holds NaN or infinite values".into()));
    }
    let metadata = meta.metadata().as_ref();
    let names: Vec<String> = match metadata.and_then(|m| m.get("names")) {
        Some(s) => parse_names(s),
        None => {
            return Err(bad(
                "has no metadata key `names` (a JSON array of class names, or the names \
                 separated by commas)"
                    .into(),
            ))
        }
    };
    if names.len() != c {
        return Err(bad(format!(
            "metadata `names` lists {} names for {c} rows of `class_embeddings`",
            names.len()
        )));
    }
    if let Some((name, i, j)) = repeated_name(&names) {
        return Err(bad(format!(
            "metadata `names` holds `{name}` twice (names {i} and {j}, from 0); give each class \
             its own name"
        )));
    }
    // A zero row has no direction: normalising it is undefined, its cosine with every image is
    // 0, and on ties argmax makes class 0 win everywhere, which would read as "the attack has
    // no effect". A row too small to square in f32 is fine: the norm is taken in f64.
    if let Some(k) = v.chunks(e).position(|row| row.iter().all(|&x| x == 0.0)) {
        return Err(bad(format!(
            "row {k} of `class_embeddings` (class `{}`) is all zeros: an embedding needs a \
             direction; embed the class again (e.g. with `prm classes`) or leave it out",
            names[k]
        )));
    }
    normalize_rows(&mut v, e);
    Ok(ClassEmbeddings {
        names,
        embeddings: v,
        dim: e,
        source: match metadata.and_then(|m| m.get("source")) {
            Some(made) => format!("{} ({c} precomputed embeddings: {made})", path.display()),
            None => format!("{} ({c} precomputed embeddings)", path.display()),
        },
        text_weights: metadata.and_then(|m| m.get("text_weights")).cloned(),
        text_weights_match: None,
    })
}

/// The `names` metadata of a `--classes` or `--probe` file: a JSON array of strings (what
/// [`write_class_safetensors`] writes, so that a name may hold a comma, as "tench, Tinca tinca"
/// does), else comma-separated names.
pub(crate) fn parse_names(text: &str) -> Vec<String> {
    if text.trim_start().starts_with('[') {
        if let Ok(names) = serde_json::from_str::<Vec<String>>(text) {
            return names;
        }
    }
    text.split(',').map(|n| n.trim().to_string()).collect()
}

/// Writes class embeddings as a `--classes` file, atomically: tensor `class_embeddings` `[C, E]`
/// F32 (the rows as given, L2-normalised), metadata `names` (a JSON array), and, for embeddings
/// made from names, `source` (names, templates, text tower and tokenizer) and `text_weights`
/// (the text tower's fingerprint), which [`read_class_safetensors`] carries into reports.
pub fn write_class_safetensors(path: &Path, classes: &ClassEmbeddings) -> Result<(), EvalError> {
    let bad = |reason: String| EvalError::Classes {
        path: path.to_path_buf(),
        reason,
    };
    if classes.embeddings.len() != classes.names.len() * classes.dim || classes.dim == 0 {
        return Err(bad(format!(
            "{} values for {} classes of dimension {}",
            classes.embeddings.len(),
            classes.names.len(),
            classes.dim
        )));
    }
    let view = safetensors::tensor::TensorView::new(
        Dtype::F32,
        vec![classes.names.len(), classes.dim],
        bytemuck::cast_slice(&classes.embeddings),
    )
    .map_err(|e| bad(e.to_string()))?;
    let mut meta = std::collections::HashMap::new();
    let names = serde_json::to_string(&classes.names).map_err(|e| bad(e.to_string()))?;
    meta.insert("names".to_string(), names);
    meta.insert("source".to_string(), classes.source.clone());
    if let Some(t) = &classes.text_weights {
        meta.insert("text_weights".to_string(), t.clone());
    }
    let mut buf = safetensors::serialize([("class_embeddings", view)], Some(meta))
        .map_err(|e| bad(e.to_string()))?;
    crate::io::output::sort_safetensors_header(&mut buf).map_err(bad)?;
    super::labels::write_bytes_atomic(path, &buf)
}

/// Whether a `--classes` file is a safetensors file (by extension).
pub fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

#[cfg(test)]
mod tests {
    use super::{parse_names, read_class_safetensors};
    use safetensors::{tensor::TensorView, Dtype};

    /// A `--classes` file of two classes, `[[1, 2], [3, 4]]`, stored as `dtype`.
    fn classes_file(dir: &std::path::Path, dtype: Dtype) -> std::path::PathBuf {
        let values = [1.0f64, 2.0, 3.0, 4.0];
        let bytes: Vec<u8> = match dtype {
            Dtype::F64 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F32 => values
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
                .collect(),
            Dtype::BF16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f64(v).to_le_bytes())
                .collect(),
            _ => values
                .iter()
                .flat_map(|&v| (v as i64).to_le_bytes())
                .collect(),
        };
        let view = TensorView::new(dtype, vec![2, 2], &bytes).unwrap();
        let meta = [("names".to_string(), r#"["cat", "dog"]"#.to_string())];
        let path = dir.join(format!("{dtype:?}.safetensors"));
        let data = safetensors::serialize([("class_embeddings", view)], Some(meta.into())).unwrap();
        std::fs::write(&path, data).unwrap();
        path
    }

    #[test]
    fn class_embeddings_of_every_float_dtype_read_and_integers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let want = [1.0 / 5f32.sqrt(), 2.0 / 5f32.sqrt()];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            let classes = read_class_safetensors(&classes_file(dir.path(), dtype)).unwrap();
            assert_eq!((classes.names.len(), classes.dim), (2, 2), "{dtype:?}");
            for (got, want) in classes.embeddings[..2].iter().zip(want) {
                assert!((got - want).abs() < 1e-6, "{dtype:?}: {got} against {want}");
            }
        }
        let e = match read_class_safetensors(&classes_file(dir.path(), Dtype::I64)) {
            Ok(_) => panic!("an I64 file was read"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("has dtype I64; expected a float"), "{e}");
    }

    #[test]
    fn names_are_a_json_array_or_separated_by_commas() {
        assert_eq!(
            parse_names(r#"["tench, Tinca tinca", "dog"]"#),
            ["tench, Tinca tinca", "dog"]
        );
        assert_eq!(parse_names("cat, dog ,sky"), ["cat", "dog", "sky"]);
        // Not a JSON array of strings: taken as comma-separated.
        assert_eq!(parse_names("[a, b]"), ["[a", "b]"]);
    }
}
