//! Checkpoint loading and built-in architectures.
//!
//! Every checkpoint here is written by the test itself with the safetensors crate, in the names a
//! real `save_pretrained` / OpenAI / open_clip state dict uses, so the loader is checked value by
//! value (q/k/v stacking, the `visual.proj` transpose, the conv flattening, dtype conversion),
//! and every error path on a small, fast file.

use std::path::Path;

use prm::model::{
    builtin_architectures, builtin_config, load_model, random_model, Activation, Model, ModelError,
    ModelSource, Pooling, OPENAI_MEAN, OPENAI_STD,
};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

// Small dimensions that are all different, so a swapped axis cannot go unnoticed.
const D: usize = 64;
const P: usize = 4;
const G: usize = 3;
const T: usize = G * G + 1;
const L: usize = 2;
const M: usize = 96;
const E: usize = 32;

/// One tensor to write: name, dtype, shape, values (ignored for I64).
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    values: Vec<f32>,
}

struct Ckpt {
    entries: Vec<Entry>,
}

/// Deterministic, distinct values for tensor number `t`.
fn values(t: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + t * 104_729 + 17) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// What a value becomes after a round trip through `dtype`.
fn round_trip(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::F16 => half::f16::from_f32(x).to_f32(),
        Dtype::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

impl Ckpt {
    fn new() -> Self {
        Ckpt {
            entries: Vec::new(),
        }
    }

    fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize]) {
        let n = shape.iter().product();
        let t = self.entries.len();
        let values = values(t, n)
            .into_iter()
            .map(|x| round_trip(dtype, x))
            .collect();
        self.entries.push(Entry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            values,
        });
    }

    fn remove(&mut self, name: &str) {
        let before = self.entries.len();
        self.entries.retain(|e| e.name != name);
        assert_eq!(before, self.entries.len() + 1, "no tensor {name} to remove");
    }

    fn reshape(&mut self, name: &str, shape: &[usize]) {
        let e = self.entries.iter_mut().find(|e| e.name == name).unwrap();
        e.shape = shape.to_vec();
        e.values = values(0, shape.iter().product());
    }

    fn set_dtype(&mut self, name: &str, dtype: Dtype) {
        let e = self.entries.iter_mut().find(|e| e.name == name).unwrap();
        e.dtype = dtype;
    }

    fn get(&self, name: &str) -> &[f32] {
        &self.entries.iter().find(|e| e.name == name).unwrap().values
    }

    fn bytes(&self) -> Vec<u8> {
        let raw: Vec<Vec<u8>> = self
            .entries
            .iter()
            .map(|e| match e.dtype {
                Dtype::F32 => e.values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F16 => e
                    .values
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
                Dtype::BF16 => e
                    .values
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
                Dtype::I64 => (0..e.values.len() as i64)
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                Dtype::I32 => e
                    .values
                    .iter()
                    .flat_map(|&x| (x as i32).to_le_bytes())
                    .collect(),
                other => panic!("test writer does not handle {other:?}"),
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = self
            .entries
            .iter()
            .zip(&raw)
            .map(|(e, r)| {
                (
                    e.name.clone(),
                    TensorView::new(e.dtype, e.shape.clone(), r).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }

    /// Writes the tensors as `shards` files in `dir`, tensor i into shard i % shards (so every
    /// shard holds vision tensors), and the index `transformers` writes beside them; returns
    /// the index's path.
    fn write_sharded(&self, dir: &Path, shards: usize) -> std::path::PathBuf {
        let name = |k: usize| format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
        let mut weight_map = serde_json::Map::new();
        for k in 0..shards {
            let shard = Ckpt {
                entries: (self.entries.iter().enumerate())
                    .filter(|(i, _)| i % shards == k)
                    .map(|(_, e)| Entry {
                        name: e.name.clone(),
                        dtype: e.dtype,
                        shape: e.shape.clone(),
                        values: e.values.clone(),
                    })
                    .collect(),
            };
            for e in &shard.entries {
                weight_map.insert(e.name.clone(), name(k).into());
            }
            shard.write(&dir.join(name(k)));
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, index.to_string()).unwrap();
        path
    }
}

/// A HF `CLIPModel` checkpoint as `save_pretrained` writes it (position_ids, text tower, ...).
fn hf_ckpt(dtype: Dtype) -> Ckpt {
    let mut c = Ckpt::new();
    let v = "vision_model";
    c.add("logit_scale", Dtype::F32, &[]);
    c.add(
        "text_model.embeddings.token_embedding.weight",
        dtype,
        &[50, 16],
    );
    c.add(
        "text_model.encoder.layers.0.mlp.fc1.weight",
        dtype,
        &[64, 16],
    );
    c.add("text_model.embeddings.position_ids", Dtype::I64, &[1, 7]);
    c.add("text_projection.weight", dtype, &[E, 16]);
    c.add(
        &format!("{v}.embeddings.patch_embedding.weight"),
        dtype,
        &[D, 3, P, P],
    );
    c.add(&format!("{v}.embeddings.class_embedding"), dtype, &[D]);
    c.add(
        &format!("{v}.embeddings.position_embedding.weight"),
        dtype,
        &[T, D],
    );
    c.add(&format!("{v}.embeddings.position_ids"), Dtype::I64, &[1, T]);
    c.add(&format!("{v}.pre_layrnorm.weight"), dtype, &[D]);
    c.add(&format!("{v}.pre_layrnorm.bias"), dtype, &[D]);
    for i in 0..L {
        let b = format!("{v}.encoder.layers.{i}");
        for ln in ["layer_norm1", "layer_norm2"] {
            c.add(&format!("{b}.{ln}.weight"), dtype, &[D]);
            c.add(&format!("{b}.{ln}.bias"), dtype, &[D]);
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            c.add(&format!("{b}.self_attn.{proj}.weight"), dtype, &[D, D]);
            c.add(&format!("{b}.self_attn.{proj}.bias"), dtype, &[D]);
        }
        c.add(&format!("{b}.mlp.fc1.weight"), dtype, &[M, D]);
        c.add(&format!("{b}.mlp.fc1.bias"), dtype, &[M]);
        c.add(&format!("{b}.mlp.fc2.weight"), dtype, &[D, M]);
        c.add(&format!("{b}.mlp.fc2.bias"), dtype, &[D]);
    }
    c.add(&format!("{v}.post_layernorm.weight"), dtype, &[D]);
    c.add(&format!("{v}.post_layernorm.bias"), dtype, &[D]);
    c.add("visual_projection.weight", dtype, &[E, D]);
    c
}

/// An OpenAI / open_clip state dict, every name under `prefix` (e.g. `module.`).
fn openai_ckpt(dtype: Dtype, prefix: &str) -> Ckpt {
    let mut c = Ckpt::new();
    let v = format!("{prefix}visual");
    c.add(&format!("{prefix}logit_scale"), Dtype::F32, &[]);
    c.add(&format!("{prefix}token_embedding.weight"), dtype, &[50, 16]);
    c.add(
        &format!("{prefix}transformer.resblocks.0.attn.in_proj_weight"),
        dtype,
        &[48, 16],
    );
    c.add(&format!("{prefix}text_projection"), dtype, &[16, E]);
    c.add(&format!("{v}.conv1.weight"), dtype, &[D, 3, P, P]);
    c.add(&format!("{v}.class_embedding"), dtype, &[D]);
    c.add(&format!("{v}.positional_embedding"), dtype, &[T, D]);
    c.add(&format!("{v}.ln_pre.weight"), dtype, &[D]);
    c.add(&format!("{v}.ln_pre.bias"), dtype, &[D]);
    for i in 0..L {
        let b = format!("{v}.transformer.resblocks.{i}");
        for ln in ["ln_1", "ln_2"] {
            c.add(&format!("{b}.{ln}.weight"), dtype, &[D]);
            c.add(&format!("{b}.{ln}.bias"), dtype, &[D]);
        }
        c.add(&format!("{b}.attn.in_proj_weight"), dtype, &[3 * D, D]);
        c.add(&format!("{b}.attn.in_proj_bias"), dtype, &[3 * D]);
        c.add(&format!("{b}.attn.out_proj.weight"), dtype, &[D, D]);
        c.add(&format!("{b}.attn.out_proj.bias"), dtype, &[D]);
        c.add(&format!("{b}.mlp.c_fc.weight"), dtype, &[M, D]);
        c.add(&format!("{b}.mlp.c_fc.bias"), dtype, &[M]);
        c.add(&format!("{b}.mlp.c_proj.weight"), dtype, &[D, M]);
        c.add(&format!("{b}.mlp.c_proj.bias"), dtype, &[D]);
    }
    c.add(&format!("{v}.ln_post.weight"), dtype, &[D]);
    c.add(&format!("{v}.ln_post.bias"), dtype, &[D]);
    c.add(&format!("{v}.proj"), dtype, &[D, E]);
    c
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn load(path: &Path) -> Result<Model, ModelError> {
    load_model(path.to_str().unwrap())
}

fn load_err(path: &Path) -> ModelError {
    match load(path) {
        Ok(_) => panic!("{} loaded, expected an error", path.display()),
        Err(e) => e,
    }
}

fn write_json(dir: &Path, name: &str, json: &str) {
    std::fs::write(dir.join(name), json).unwrap();
}

fn check_dims(m: &Model, heads: usize) {
    let c = &m.config;
    assert_eq!(
        (
            c.width,
            c.layers,
            c.heads,
            c.patch,
            c.grid,
            c.mlp,
            c.embed_dim
        ),
        (D, L, heads, P, G, M, Some(E))
    );
    let w = &m.weights;
    assert_eq!(w.blocks.len(), L);
    assert_eq!(w.patch_embed.out_features, D);
    assert_eq!(w.patch_embed.in_features, 3 * P * P);
    assert!(w.patch_embed.bias.is_none());
    for b in &w.blocks {
        assert_eq!((b.qkv.out_features, b.qkv.in_features), (3 * D, D));
        assert_eq!(b.qkv.weight.len(), 3 * D * D);
        assert_eq!(b.qkv.bias.as_ref().unwrap().len(), 3 * D);
        assert_eq!((b.fc1.out_features, b.fc1.in_features), (M, D));
        assert_eq!((b.fc2.out_features, b.fc2.in_features), (D, M));
    }
}

/// Every loaded weight equals what the HF checkpoint holds.
fn check_hf_values(m: &Model, c: &Ckpt) {
    let w = &m.weights;
    let v = "vision_model";
    // [D,3,p,p] row-major is the [D, 3·p·p] weight flattened (channel, row, col).
    assert_eq!(
        w.patch_embed.weight,
        c.get(&format!("{v}.embeddings.patch_embedding.weight"))
    );
    assert_eq!(
        w.class_embedding.as_deref(),
        Some(c.get(&format!("{v}.embeddings.class_embedding")))
    );
    assert_eq!(
        w.position_embedding,
        c.get(&format!("{v}.embeddings.position_embedding.weight"))
    );
    assert_eq!(
        w.ln_pre.as_ref().unwrap().weight,
        c.get(&format!("{v}.pre_layrnorm.weight"))
    );
    assert_eq!(
        w.ln_pre.as_ref().unwrap().bias,
        c.get(&format!("{v}.pre_layrnorm.bias"))
    );
    assert_eq!(
        w.ln_post.weight,
        c.get(&format!("{v}.post_layernorm.weight"))
    );
    assert_eq!(w.ln_post.bias, c.get(&format!("{v}.post_layernorm.bias")));
    for (i, b) in w.blocks.iter().enumerate() {
        let p = format!("{v}.encoder.layers.{i}");
        let g = |s: &str| c.get(&format!("{p}.{s}")).to_vec();
        let qkv_w = [
            g("self_attn.q_proj.weight"),
            g("self_attn.k_proj.weight"),
            g("self_attn.v_proj.weight"),
        ]
        .concat();
        let qkv_b = [
            g("self_attn.q_proj.bias"),
            g("self_attn.k_proj.bias"),
            g("self_attn.v_proj.bias"),
        ]
        .concat();
        assert_eq!(b.qkv.weight, qkv_w, "block {i} qkv weight");
        assert_eq!(b.qkv.bias.as_ref().unwrap(), &qkv_b, "block {i} qkv bias");
        // Row r of q is row r of qkv; row r of k is row D + r; spot-check one element directly.
        assert_eq!(
            b.qkv.weight[(D + 5) * D + 7],
            g("self_attn.k_proj.weight")[5 * D + 7]
        );
        assert_eq!(b.out_proj.weight, g("self_attn.out_proj.weight"));
        assert_eq!(
            b.out_proj.bias.as_ref().unwrap(),
            &g("self_attn.out_proj.bias")
        );
        assert_eq!(b.ln1.weight, g("layer_norm1.weight"));
        assert_eq!(b.ln1.bias, g("layer_norm1.bias"));
        assert_eq!(b.ln2.weight, g("layer_norm2.weight"));
        assert_eq!(b.ln2.bias, g("layer_norm2.bias"));
        assert_eq!(b.fc1.weight, g("mlp.fc1.weight"));
        assert_eq!(b.fc1.bias.as_ref().unwrap(), &g("mlp.fc1.bias"));
        assert_eq!(b.fc2.weight, g("mlp.fc2.weight"));
        assert_eq!(b.fc2.bias.as_ref().unwrap(), &g("mlp.fc2.bias"));
    }
    let proj = w.projection.as_ref().unwrap();
    assert_eq!((proj.out_features, proj.in_features), (E, D));
    assert!(proj.bias.is_none());
    assert_eq!(proj.weight, c.get("visual_projection.weight"));
}

/// Every loaded weight equals what the OpenAI checkpoint holds.
fn check_openai_values(m: &Model, c: &Ckpt, prefix: &str) {
    let w = &m.weights;
    let v = format!("{prefix}visual");
    assert_eq!(w.patch_embed.weight, c.get(&format!("{v}.conv1.weight")));
    assert_eq!(
        w.class_embedding.as_deref(),
        Some(c.get(&format!("{v}.class_embedding")))
    );
    assert_eq!(
        w.position_embedding,
        c.get(&format!("{v}.positional_embedding"))
    );
    assert_eq!(
        w.ln_pre.as_ref().unwrap().weight,
        c.get(&format!("{v}.ln_pre.weight"))
    );
    assert_eq!(w.ln_post.bias, c.get(&format!("{v}.ln_post.bias")));
    for (i, b) in w.blocks.iter().enumerate() {
        let p = format!("{v}.transformer.resblocks.{i}");
        let g = |s: &str| c.get(&format!("{p}.{s}")).to_vec();
        assert_eq!(b.qkv.weight, g("attn.in_proj_weight"));
        assert_eq!(b.qkv.bias.as_ref().unwrap(), &g("attn.in_proj_bias"));
        assert_eq!(b.out_proj.weight, g("attn.out_proj.weight"));
        assert_eq!(b.out_proj.bias.as_ref().unwrap(), &g("attn.out_proj.bias"));
        assert_eq!(b.ln1.weight, g("ln_1.weight"));
        assert_eq!(b.ln2.bias, g("ln_2.bias"));
        assert_eq!(b.fc1.weight, g("mlp.c_fc.weight"));
        assert_eq!(b.fc1.bias.as_ref().unwrap(), &g("mlp.c_fc.bias"));
        assert_eq!(b.fc2.weight, g("mlp.c_proj.weight"));
        assert_eq!(b.fc2.bias.as_ref().unwrap(), &g("mlp.c_proj.bias"));
    }
    // visual.proj is [D, E] used as x·P; ours is [E, D] used as x·Wᵀ, so W[e][d] = P[d][e].
    let p = c.get(&format!("{v}.proj"));
    let proj = w.projection.as_ref().unwrap();
    assert_eq!((proj.out_features, proj.in_features), (E, D));
    for e in 0..E {
        for d in 0..D {
            assert_eq!(proj.weight[e * D + d], p[d * E + e], "proj[{e}][{d}]");
        }
    }
}

// ---------------------------------------------------------------- HF checkpoints

#[test]
fn hf_f32_with_gelu_config_and_preprocessor() {
    let dir = tmp();
    let c = hf_ckpt(Dtype::F32);
    c.write(&dir.path().join("model.safetensors"));
    write_json(
        dir.path(),
        "config.json",
        r#"{"architectures": ["CLIPModel"], "model_type": "clip",
            "text_config": {"hidden_act": "weird_text_act"},
            "vision_config": {"hidden_act": "gelu", "num_attention_heads": 4,
                              "layer_norm_eps": 1e-6, "patch_size": 32}}"#,
    );
    write_json(
        dir.path(),
        "preprocessor_config.json",
        r#"{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0], "crop_size": 224}"#,
    );
    // Loading the directory picks model.safetensors.
    let m = load(dir.path()).unwrap();
    check_dims(&m, 4);
    check_hf_values(&m, &c);
    assert_eq!(m.config.activation, Activation::Gelu);
    assert_eq!(m.config.ln_eps, 1e-6);
    assert_eq!(m.config.mean, [0.5, 0.5, 0.5]);
    assert_eq!(m.config.std, [0.25, 0.5, 1.0]);
    assert_eq!(
        m.source,
        ModelSource::HuggingFace {
            path: dir.path().join("model.safetensors")
        }
    );
    // Loading the file directly gives the same model.
    let m2 = load(&dir.path().join("model.safetensors")).unwrap();
    assert_eq!(m2.config, m.config);
}

#[test]
fn hf_vision_config_dict_overrides_vision_config() {
    let dir = tmp();
    hf_ckpt(Dtype::F32).write(&dir.path().join("model.safetensors"));
    write_json(
        dir.path(),
        "config.json",
        r#"{"vision_config": {"hidden_act": "gelu", "num_attention_heads": 4, "layer_norm_eps": 1e-6},
            "vision_config_dict": {"hidden_act": "quick_gelu", "num_attention_heads": 2}}"#,
    );
    let m = load(dir.path()).unwrap();
    check_dims(&m, 2);
    assert_eq!(m.config.activation, Activation::QuickGelu);
    // Keys absent from the dict keep vision_config's value.
    assert_eq!(m.config.ln_eps, 1e-6);
}

#[test]
fn hf_vision_model_config_at_top_level() {
    let dir = tmp();
    let mut c = hf_ckpt(Dtype::F32);
    // A CLIPVisionModel checkpoint: no text tower, no projection.
    c.entries.retain(|e| e.name.starts_with("vision_model."));
    c.write(&dir.path().join("model.safetensors"));
    write_json(
        dir.path(),
        "config.json",
        r#"{"model_type": "clip_vision_model", "hidden_act": "gelu", "num_attention_heads": 8}"#,
    );
    let m = load(dir.path()).unwrap();
    assert_eq!(m.config.heads, 8);
    assert_eq!(m.config.activation, Activation::Gelu);
    assert_eq!(m.config.embed_dim, None);
    assert!(m.weights.projection.is_none());
}

/// transformers' names for GELU's tanh approximation (`gelu_pytorch_tanh`, `gelu_new`) load as
/// `gelu_tanh`, on the vision and the text tower (the tiny CLIPModel of the eval golden data,
/// its config's `hidden_act` changed).
#[test]
fn hf_tanh_gelu_names_load_as_gelu_tanh() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/eval/clip_tiny");
    let dir = tmp();
    std::fs::copy(
        golden.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden.join("config.json")).unwrap())
            .unwrap();
    let spec = dir.path().to_str().unwrap();
    for (vision_act, text_act) in [
        ("gelu_pytorch_tanh", "gelu_new"),
        ("gelu_new", "gelu_pytorch_tanh"),
    ] {
        let mut c = config.clone();
        c["vision_config"]["hidden_act"] = vision_act.into();
        c["text_config"]["hidden_act"] = text_act.into();
        write_json(dir.path(), "config.json", &c.to_string());
        let m = load(dir.path()).unwrap();
        assert_eq!(m.config.activation, Activation::GeluTanh, "{vision_act}");
        assert_eq!(m.config.activation.name(), "gelu_tanh");
        let text = prm::model::load_text_tower(spec)
            .unwrap()
            .expect("a text tower");
        assert_eq!(text.config.activation, Activation::GeluTanh, "{text_act}");
    }
    // transformers' other spellings of the formula are not read, on the text tower either.
    let mut c = config;
    c["text_config"]["hidden_act"] = "gelu_fast".into();
    write_json(dir.path(), "config.json", &c.to_string());
    let e = match prm::model::load_text_tower(spec) {
        Ok(_) => panic!("gelu_fast loaded"),
        Err(e) => e,
    };
    assert_msg(&e, &["gelu_fast", "gelu_pytorch_tanh"]);
}

#[test]
fn hf_defaults_without_config() {
    let dir = tmp();
    let c = hf_ckpt(Dtype::F32);
    c.write(&dir.path().join("model.safetensors"));
    let m = load(dir.path()).unwrap();
    check_dims(&m, D / 64);
    check_hf_values(&m, &c);
    assert_eq!(m.config.activation, Activation::QuickGelu);
    assert_eq!(m.config.ln_eps, 1e-5);
    assert_eq!((m.config.mean, m.config.std), (OPENAI_MEAN, OPENAI_STD));
}

#[test]
fn hf_bf16_and_f16() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let dir = tmp();
        let c = hf_ckpt(dtype);
        c.write(&dir.path().join("model.safetensors"));
        write_json(
            dir.path(),
            "config.json",
            r#"{"vision_config": {"num_attention_heads": 2}}"#,
        );
        let m = load(dir.path()).unwrap();
        check_dims(&m, 2);
        check_hf_values(&m, &c);
        // The values really went through the narrow type (not all exactly representable in it).
        let raw = values(5, 3);
        assert_ne!(
            raw.iter()
                .map(|&x| round_trip(dtype, x))
                .collect::<Vec<_>>(),
            raw
        );
    }
}

#[test]
fn hf_config_omitting_heads_means_transformers_default_of_12() {
    // save_pretrained drops fields equal to CLIPVisionConfig's defaults (12 heads).
    let dir = tmp();
    let mut c = Ckpt::new();
    // Width 768 / 12 = 64: consistent; build a 1-layer model of that width cheaply.
    let v = "vision_model";
    let d = 768;
    c.add(
        &format!("{v}.embeddings.patch_embedding.weight"),
        Dtype::BF16,
        &[d, 3, 2, 2],
    );
    c.add(
        &format!("{v}.embeddings.class_embedding"),
        Dtype::BF16,
        &[d],
    );
    c.add(
        &format!("{v}.embeddings.position_embedding.weight"),
        Dtype::BF16,
        &[5, d],
    );
    for n in ["pre_layrnorm", "post_layernorm"] {
        c.add(&format!("{v}.{n}.weight"), Dtype::BF16, &[d]);
        c.add(&format!("{v}.{n}.bias"), Dtype::BF16, &[d]);
    }
    let b = format!("{v}.encoder.layers.0");
    for ln in ["layer_norm1", "layer_norm2"] {
        c.add(&format!("{b}.{ln}.weight"), Dtype::BF16, &[d]);
        c.add(&format!("{b}.{ln}.bias"), Dtype::BF16, &[d]);
    }
    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        c.add(
            &format!("{b}.self_attn.{proj}.weight"),
            Dtype::BF16,
            &[d, d],
        );
        c.add(&format!("{b}.self_attn.{proj}.bias"), Dtype::BF16, &[d]);
    }
    c.add(&format!("{b}.mlp.fc1.weight"), Dtype::BF16, &[8, d]);
    c.add(&format!("{b}.mlp.fc1.bias"), Dtype::BF16, &[8]);
    c.add(&format!("{b}.mlp.fc2.weight"), Dtype::BF16, &[d, 8]);
    c.add(&format!("{b}.mlp.fc2.bias"), Dtype::BF16, &[d]);
    c.write(&dir.path().join("model.safetensors"));
    write_json(
        dir.path(),
        "config.json",
        r#"{"vision_config": {"hidden_act": "gelu"}}"#,
    );
    let m = load(dir.path()).unwrap();
    assert_eq!(
        (m.config.width, m.config.heads, m.config.layers),
        (768, 12, 1)
    );
    assert_eq!((m.config.patch, m.config.grid, m.config.mlp), (2, 2, 8));
}

/// A HF `SiglipModel` checkpoint's vision tower: no class token, a patch convolution with a
/// bias, `[g·g, D]` positions, no pre-LayerNorm, and the attention-pooling head `head.*`.
fn siglip_ckpt() -> Ckpt {
    let v = "vision_model";
    let mut c = hf_ckpt(Dtype::F32);
    c.remove(&format!("{v}.embeddings.class_embedding"));
    c.remove(&format!("{v}.embeddings.position_ids"));
    c.reshape(
        &format!("{v}.embeddings.position_embedding.weight"),
        &[G * G, D],
    );
    c.add(
        &format!("{v}.embeddings.patch_embedding.bias"),
        Dtype::F32,
        &[D],
    );
    c.remove(&format!("{v}.pre_layrnorm.weight"));
    c.remove(&format!("{v}.pre_layrnorm.bias"));
    c.remove("visual_projection.weight");
    c.add(&format!("{v}.head.probe"), Dtype::F32, &[1, 1, D]);
    c.add(
        &format!("{v}.head.attention.in_proj_weight"),
        Dtype::F32,
        &[3 * D, D],
    );
    c.add(
        &format!("{v}.head.attention.in_proj_bias"),
        Dtype::F32,
        &[3 * D],
    );
    for (name, shape) in [
        ("attention.out_proj.weight", &[D, D][..]),
        ("attention.out_proj.bias", &[D]),
        ("layernorm.weight", &[D]),
        ("layernorm.bias", &[D]),
        ("mlp.fc1.weight", &[M, D]),
        ("mlp.fc1.bias", &[M]),
        ("mlp.fc2.weight", &[D, M]),
        ("mlp.fc2.bias", &[D]),
    ] {
        c.add(&format!("{v}.head.{name}"), Dtype::F32, shape);
    }
    c
}

#[test]
fn hf_siglip_loads_without_a_class_token_with_its_defaults() {
    let dir = tmp();
    let c = siglip_ckpt();
    c.write(&dir.path().join("model.safetensors"));
    // SiglipConfig's defaults fill what a re-saved config omits: here the activation is given
    // (gelu), the eps (1e-6) and the mean/std (0.5, no preprocessor_config.json) are not.
    write_json(
        dir.path(),
        "config.json",
        r#"{"model_type": "siglip", "vision_config": {"model_type": "siglip_vision_model",
            "num_attention_heads": 2, "hidden_act": "gelu"}}"#,
    );
    let m = load(dir.path()).unwrap();
    let cfg = &m.config;
    assert!(!cfg.class_token);
    assert_eq!((cfg.width, cfg.heads, cfg.layers, cfg.grid), (D, 2, L, G));
    assert_eq!(cfg.tokens(G, G), G * G);
    assert_eq!(cfg.activation, Activation::Gelu);
    assert_eq!(cfg.ln_eps, 1e-6);
    assert_eq!((cfg.mean, cfg.std), ([0.5; 3], [0.5; 3]));
    assert_eq!(cfg.pooling, prm::model::Pooling::AttentionHead);
    let w = &m.weights;
    assert!(w.class_embedding.is_none() && w.ln_pre.is_none() && w.projection.is_none());
    assert_eq!(
        w.patch_embed.bias.as_deref(),
        Some(c.get("vision_model.embeddings.patch_embedding.bias"))
    );
    assert_eq!(
        w.position_embedding,
        c.get("vision_model.embeddings.position_embedding.weight")
    );
    // The attention-pooling head is read, tensor for tensor: it forms the image embedding.
    let head = w.attention_head.as_ref().expect("the head is read");
    assert_eq!(head.probe, c.get("vision_model.head.probe"));
    assert_eq!(
        head.in_proj.weight,
        c.get("vision_model.head.attention.in_proj_weight")
    );
    assert_eq!(head.fc2.weight, c.get("vision_model.head.mlp.fc2.weight"));
    assert_eq!(cfg.embed_dim, Some(D));
    assert!(m.image_embedding_unavailable().is_none());
    // A head missing a tensor is an error naming it, not a tower without its embedding.
    let mut partial = siglip_ckpt();
    partial.remove("vision_model.head.mlp.fc2.bias");
    partial.write(&dir.path().join("model.safetensors"));
    let e = load(dir.path()).unwrap_err();
    assert_msg(&e, &["vision_model.head.mlp.fc2.bias"]);
    c.write(&dir.path().join("model.safetensors"));
    // A preprocessor_config.json overrides the default normalisation.
    write_json(
        dir.path(),
        "preprocessor_config.json",
        r#"{"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}"#,
    );
    assert_eq!(load(dir.path()).unwrap().config.mean, [0.4, 0.5, 0.6]);
}

/// `SiglipVisionModel` / `CLIPVisionModel` built on their own save without `vision_model.`:
/// the same tower loads, and messages name the tensors as the file does.
#[test]
fn a_vision_model_saved_on_its_own_loads_without_the_prefix() {
    let dir = tmp();
    let mut bare = siglip_ckpt();
    bare.entries.retain(|e| e.name.starts_with("vision_model."));
    for e in &mut bare.entries {
        e.name = e.name["vision_model.".len()..].to_string();
    }
    bare.write(&dir.path().join("model.safetensors"));
    write_json(
        dir.path(),
        "config.json",
        r#"{"model_type": "siglip_vision_model", "hidden_act": "gelu", "num_attention_heads": 2}"#,
    );
    let m = load(dir.path()).unwrap();
    assert!(!m.config.class_token);
    assert_eq!(
        m.weights.position_embedding,
        bare.get("embeddings.position_embedding.weight")
    );
    bare.add("encoder.layers.0.extra.weight", Dtype::F32, &[D]);
    bare.write(&dir.path().join("model.safetensors"));
    let e = load(dir.path()).unwrap_err();
    assert_msg(&e, &["encoder.layers.0.extra.weight"]);
    assert!(!e.to_string().contains("vision_model."), "{e}");
}

/// A vision-language model's checkpoint (LLaVA: `model.vision_tower.vision_model.*` beside the
/// language model; PaliGemma: `vision_tower.vision_model.*`, a SigLIP without its pooling head):
/// its vision tower loads with the `vision_config` of the VLM's config, and messages name the
/// tensors as the file does.
#[test]
fn a_vision_language_model_checkpoint_loads_its_vision_tower() {
    let nest = |c: &Ckpt, prefix: &str| {
        let mut out = Ckpt::new();
        for e in c
            .entries
            .iter()
            .filter(|e| e.name.starts_with("vision_model."))
        {
            out.add(&format!("{prefix}{}", e.name), e.dtype, &e.shape);
        }
        // The language model beside the tower, which the loader does not look at.
        let outer = prefix.trim_end_matches("vision_tower.");
        out.add(
            &format!("{outer}language_model.layers.0.mlp.weight"),
            Dtype::F32,
            &[4, 4],
        );
        out.add("lm_head.weight", Dtype::F32, &[8, 4]);
        out
    };
    let dir = tmp();
    let llava = nest(&hf_ckpt(Dtype::F32), "model.vision_tower.");
    llava.write(&dir.path().join("model.safetensors"));
    write_json(
        dir.path(),
        "config.json",
        r#"{"model_type": "llava", "text_config": {"model_type": "llama"},
            "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu",
                              "num_attention_heads": 4}}"#,
    );
    let m = load(dir.path()).unwrap();
    assert!(m.config.class_token);
    assert_eq!((m.config.width, m.config.heads), (D, 4));
    assert_eq!(
        m.weights.position_embedding,
        llava.get("model.vision_tower.vision_model.embeddings.position_embedding.weight")
    );

    let dir = tmp();
    let mut paligemma = nest(&siglip_ckpt(), "vision_tower.");
    paligemma
        .entries
        .retain(|e| !e.name.starts_with("vision_tower.vision_model.head."));
    paligemma.write(&dir.path().join("model.safetensors"));
    write_json(
        dir.path(),
        "config.json",
        r#"{"model_type": "paligemma", "vision_config": {"model_type": "siglip_vision_model",
            "num_attention_heads": 2, "vision_use_head": false}}"#,
    );
    let m = load(dir.path()).unwrap();
    assert!(!m.config.class_token);
    assert_eq!(m.config.activation, Activation::GeluTanh);
    assert_eq!(m.config.pooling, prm::model::Pooling::Unpooled);
    paligemma.add(
        "vision_tower.vision_model.encoder.layers.0.extra.weight",
        Dtype::F32,
        &[D],
    );
    paligemma.write(&dir.path().join("model.safetensors"));
    let e = load(dir.path()).unwrap_err();
    assert_msg(
        &e,
        &["vision_tower.vision_model.encoder.layers.0.extra.weight"],
    );
}

#[test]
fn towers_without_a_class_token_need_a_siglip_config() {
    let dir = tmp();
    siglip_ckpt().write(&dir.path().join("model.safetensors"));
    // No config: the activation and eps cannot be told.
    let e = load(dir.path()).unwrap_err();
    assert_msg(&e, &["no class token", "config.json"]);
    // A CLIP config: not a SigLIP.
    write_json(
        dir.path(),
        "config.json",
        r#"{"vision_config": {"hidden_act": "gelu"}}"#,
    );
    let e = load(dir.path()).unwrap_err();
    assert_msg(&e, &["no class token", "siglip"]);
    // SigLIP 2 is another embedding.
    write_json(
        dir.path(),
        "config.json",
        r#"{"model_type": "siglip2", "vision_config": {"model_type": "siglip2_vision_model"}}"#,
    );
    let e = load(dir.path()).unwrap_err();
    assert_msg(&e, &["SigLIP 2"]);
    // A SigLIP config over a checkpoint with an extra pre-LayerNorm: refused, not dropped.
    let mut c = siglip_ckpt();
    c.add("vision_model.pre_layrnorm.weight", Dtype::F32, &[D]);
    c.write(&dir.path().join("model.safetensors"));
    write_json(
        dir.path(),
        "config.json",
        r#"{"model_type": "siglip_vision_model", "hidden_act": "gelu", "num_attention_heads": 2}"#,
    );
    let e = load(dir.path()).unwrap_err();
    assert_msg(&e, &["pre_layrnorm"]);
    // A SigLIP config over a CLIP tower (a class token): another model, refused.
    hf_ckpt(Dtype::F32).write(&dir.path().join("model.safetensors"));
    let e = load(dir.path()).unwrap_err();
    assert_msg(&e, &["SigLIP", "class_embedding"]);
}

// ---------------------------------------------------------------- OpenAI / open_clip

#[test]
fn openai_f16_with_module_prefix() {
    let dir = tmp();
    let c = openai_ckpt(Dtype::F16, "module.");
    let file = dir.path().join("ViT-tiny.safetensors");
    c.write(&file);
    // The only *.safetensors in the directory is picked.
    let m = load(dir.path()).unwrap();
    check_dims(&m, D / 64);
    check_openai_values(&m, &c, "module.");
    assert_eq!(m.config.activation, Activation::QuickGelu);
    assert_eq!(m.config.ln_eps, 1e-5);
    assert_eq!(m.source, ModelSource::OpenAi { path: file });
    assert_eq!(m.source.format_name(), "openai");
}

#[test]
fn openai_f32_plain_and_state_dict_prefix() {
    for prefix in ["", "state_dict.", "state_dict.module."] {
        let dir = tmp();
        let c = openai_ckpt(Dtype::F32, prefix);
        let file = dir.path().join("weights.safetensors");
        c.write(&file);
        let m = load(&file).unwrap();
        check_dims(&m, 1);
        check_openai_values(&m, &c, prefix);
    }
}

#[test]
fn open_clip_config_sets_activation_heads_and_normalisation() {
    let dir = tmp();
    openai_ckpt(Dtype::F32, "").write(&dir.path().join("open_clip_model.safetensors"));
    write_json(
        dir.path(),
        "open_clip_config.json",
        r#"{"model_cfg": {"embed_dim": 32, "vision_cfg": {"width": 64, "head_width": 32}},
            "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}"#,
    );
    let m = load(dir.path()).unwrap();
    assert_eq!(m.config.heads, 2);
    // open_clip builds nn.GELU unless quick_gelu is set.
    assert_eq!(m.config.activation, Activation::Gelu);
    assert_eq!((m.config.mean, m.config.std), ([0.5; 3], [0.5; 3]));
    write_json(
        dir.path(),
        "open_clip_config.json",
        r#"{"model_cfg": {"quick_gelu": true}}"#,
    );
    let m = load(dir.path()).unwrap();
    assert_eq!(
        (m.config.heads, m.config.activation),
        (1, Activation::QuickGelu)
    );
}

#[test]
fn open_clip_options_that_change_the_vision_tower_are_refused_and_its_eps_is_read() {
    let dir = tmp();
    openai_ckpt(Dtype::F32, "").write(&dir.path().join("open_clip_model.safetensors"));
    let config = |vision_cfg: &str| {
        write_json(
            dir.path(),
            "open_clip_config.json",
            &format!(r#"{{"model_cfg": {{"vision_cfg": {vision_cfg}}}}}"#),
        )
    };
    config(r#"{"norm_kwargs": {"eps": 1e-6}, "pool_type": "tok", "pos_embed_type": "learnable"}"#);
    assert_eq!(load(dir.path()).unwrap().config.ln_eps, 1e-6);
    config("{}");
    assert_eq!(load(dir.path()).unwrap().config.ln_eps, 1e-5);
    for (cfg, part) in [
        (r#"{"pool_type": "none"}"#, "pool_type"),
        (r#"{"attentional_pool": true}"#, "attentional_pool"),
        (r#"{"pos_embed_type": "sin_cos_2d"}"#, "pos_embed_type"),
        (r#"{"timm_model_name": "vit_base_patch16_224"}"#, "timm"),
        (r#"{"norm_kwargs": {"eps": -1}}"#, "norm_kwargs.eps"),
    ] {
        config(cfg);
        let e = load_err(dir.path());
        assert!(matches!(e, ModelError::BadConfig { .. }), "{cfg}: {e:?}");
        assert_msg(&e, &["open_clip_config.json", part]);
    }
}

/// CLIPA's options: average pooling loads (the image embedding averages the patch tokens, with
/// the post-LayerNorm after the average where `final_ln_after_pool` says so, before it
/// otherwise; the dense targets are refused), and `no_ln_pre` loads a tower without `visual.ln_pre`,
/// whose `ln_pre` tensors, when present, are refused as unread.
#[test]
fn open_clip_average_pooling_and_no_ln_pre_load_as_clipa() {
    let dir = tmp();
    let file = dir.path().join("open_clip_model.safetensors");
    let config = |vision_cfg: &str| {
        write_json(
            dir.path(),
            "open_clip_config.json",
            &format!(r#"{{"model_cfg": {{"vision_cfg": {vision_cfg}}}}}"#),
        )
    };
    openai_ckpt(Dtype::F32, "").write(&file);
    let standard = load(dir.path()).unwrap();
    for (cfg, pooling) in [
        (r#"{"pool_type": "avg"}"#, Pooling::NormedPatchAverage),
        (
            r#"{"global_average_pool": true}"#,
            Pooling::NormedPatchAverage,
        ),
        (
            r#"{"pool_type": "avg", "final_ln_after_pool": true}"#,
            Pooling::PatchAverage,
        ),
    ] {
        config(cfg);
        let m = load(dir.path()).unwrap();
        assert_eq!(m.config.pooling, pooling, "{cfg}");
        assert!(m.weights.ln_pre.is_some());
        assert!(m.image_embedding_unavailable().is_none(), "{cfg}");
        let why = m.image_projection().expect_err("no dense targets");
        assert!(why.contains("average"), "{why}");
        assert_ne!(m.fingerprint(), standard.fingerprint());
    }
    // no_ln_pre with the ln_pre tensors still there: another model, refused.
    config(r#"{"no_ln_pre": true, "pool_type": "avg", "final_ln_after_pool": true}"#);
    let e = load_err(dir.path());
    assert_msg(&e, &["visual.ln_pre"]);
    let mut c = openai_ckpt(Dtype::F32, "");
    c.remove("visual.ln_pre.weight");
    c.remove("visual.ln_pre.bias");
    c.write(&file);
    let m = load(dir.path()).unwrap();
    assert!(m.weights.ln_pre.is_none());
    assert_eq!(m.config.pooling, Pooling::PatchAverage);
    assert_eq!(
        m.parameter_count() + 2 * m.config.width,
        standard.parameter_count()
    );
    // Without the config, a missing ln_pre is a missing tensor.
    std::fs::remove_file(dir.path().join("open_clip_config.json")).unwrap();
    assert_msg(&load_err(dir.path()), &["visual.ln_pre"]);
}

/// A complete OpenAI-format text tower (width 16, one block) beside [`openai_ckpt`]'s vision
/// tower, in place of that fixture's partial text tensors.
fn openai_ckpt_with_text() -> Ckpt {
    let mut c = openai_ckpt(Dtype::F32, "");
    for n in [
        "token_embedding.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
        "text_projection",
    ] {
        c.remove(n);
    }
    let (w, m, ctx) = (16, 32, 7);
    c.add("token_embedding.weight", Dtype::F32, &[50, w]);
    c.add("positional_embedding", Dtype::F32, &[ctx, w]);
    let b = "transformer.resblocks.0";
    for ln in ["ln_1", "ln_2"] {
        c.add(&format!("{b}.{ln}.weight"), Dtype::F32, &[w]);
        c.add(&format!("{b}.{ln}.bias"), Dtype::F32, &[w]);
    }
    c.add(&format!("{b}.attn.in_proj_weight"), Dtype::F32, &[3 * w, w]);
    c.add(&format!("{b}.attn.in_proj_bias"), Dtype::F32, &[3 * w]);
    c.add(&format!("{b}.attn.out_proj.weight"), Dtype::F32, &[w, w]);
    c.add(&format!("{b}.attn.out_proj.bias"), Dtype::F32, &[w]);
    c.add(&format!("{b}.mlp.c_fc.weight"), Dtype::F32, &[m, w]);
    c.add(&format!("{b}.mlp.c_fc.bias"), Dtype::F32, &[m]);
    c.add(&format!("{b}.mlp.c_proj.weight"), Dtype::F32, &[w, m]);
    c.add(&format!("{b}.mlp.c_proj.bias"), Dtype::F32, &[w]);
    c.add("ln_final.weight", Dtype::F32, &[w]);
    c.add("ln_final.bias", Dtype::F32, &[w]);
    c.add("text_projection", Dtype::F32, &[w, E]);
    c
}

#[test]
fn open_clip_text_options_that_change_the_embedding_are_refused_and_its_eps_is_read() {
    let dir = tmp();
    let mut c = openai_ckpt_with_text();
    c.write(&dir.path().join("open_clip_model.safetensors"));
    let spec = dir.path().to_str().unwrap();
    let text = |text_cfg: &str| {
        write_json(
            dir.path(),
            "open_clip_config.json",
            &format!(r#"{{"model_cfg": {{"text_cfg": {text_cfg}}}}}"#),
        );
        prm::model::load_text_tower(spec)
    };
    let tower = text(r#"{"heads": 2, "norm_kwargs": {"eps": 1e-6}, "pool_type": "argmax"}"#)
        .unwrap()
        .expect("a text tower");
    assert_eq!((tower.config.heads, tower.config.ln_eps), (2, 1e-6));
    // Without `heads`, open_clip's default of 8 (not width / 64, which 16 is not a multiple of).
    let tower = text("{}").unwrap().expect("a text tower");
    assert_eq!(tower.config.heads, 8);
    let tower = text(r#"{"heads": 2, "act_kwargs": {"approximate": "none"}}"#);
    let tower = tower.unwrap().expect("a text tower");
    assert_eq!(
        (tower.config.heads, tower.config.activation),
        (2, Activation::Gelu)
    );
    // GELU's tanh approximation (SigLIP2's text towers).
    let tower = text(r#"{"heads": 2, "act_kwargs": {"approximate": "tanh"}}"#);
    let tower = tower.unwrap().expect("a text tower");
    assert_eq!(tower.config.activation, Activation::GeluTanh);
    for (cfg, part) in [
        (r#"{"pool_type": "last"}"#, "pool_type"),
        (r#"{"embed_cls": true}"#, "embed_cls"),
        (r#"{"no_causal_mask": true}"#, "no_causal_mask"),
        (
            r#"{"heads": 2, "act_kwargs": {"approximate": "sigmoid"}}"#,
            "text_cfg.act_kwargs",
        ),
        (
            r#"{"heads": 2, "act_kwargs": {"inplace": true}}"#,
            "text_cfg.act_kwargs",
        ),
        (r#"{"heads": 0}"#, "text_cfg.heads"),
    ] {
        let e = match text(cfg) {
            Ok(_) => panic!("{cfg} loaded"),
            Err(e) => e,
        };
        assert!(matches!(e, ModelError::BadConfig { .. }), "{cfg}: {e:?}");
        assert_msg(&e, &["open_clip_config.json", part]);
    }
    // open_clip's LayerScale is folded into the text tower's branch outputs, as into the
    // vision tower's (the shared block loader).
    c.add("transformer.resblocks.0.ls_2.gamma", Dtype::F32, &[16]);
    c.write(&dir.path().join("open_clip_model.safetensors"));
    let tower = text(r#"{"heads": 2}"#).unwrap().expect("a text tower");
    let (w, g) = (
        c.get("transformer.resblocks.0.mlp.c_proj.weight"),
        c.get("transformer.resblocks.0.ls_2.gamma"),
    );
    let inputs = w.len() / g.len();
    let scaled: Vec<f32> = (0..w.len()).map(|i| w[i] * g[i / inputs]).collect();
    assert_eq!(tower.weights.blocks[0].fc2.weight, scaled);
    c.remove("transformer.resblocks.0.ls_2.gamma");
    // A text tensor the loader does not know (open_clip's `scale_attn` norm).
    c.add("transformer.resblocks.0.ln_attn.weight", Dtype::F32, &[16]);
    c.write(&dir.path().join("open_clip_model.safetensors"));
    let e = match text(r#"{"heads": 2}"#) {
        Ok(_) => panic!("loaded with an unknown text tensor"),
        Err(e) => e,
    };
    assert!(matches!(e, ModelError::UnknownTensors { .. }), "{e:?}");
    assert_msg(
        &e,
        &["transformer.resblocks.0.ln_attn.weight", "text tower"],
    );

    // A `quick_gelu` that is not a boolean.
    write_json(
        dir.path(),
        "open_clip_config.json",
        r#"{"model_cfg": {"quick_gelu": "yes", "text_cfg": {"heads": 2}}}"#,
    );
    c.remove("transformer.resblocks.0.ln_attn.weight");
    c.write(&dir.path().join("open_clip_model.safetensors"));
    let e = prm::model::load_text_tower(spec).expect_err("a string quick_gelu");
    assert_msg(&e, &["quick_gelu", "boolean"]);
}

/// open_clip's CustomTextCLIP keeps the text tower under `text.*`: said so, not "no text tower".
#[test]
fn a_text_tower_under_text_prefix_is_named_not_missed() {
    let dir = tmp();
    let mut c = openai_ckpt(Dtype::F32, "");
    for n in [
        "token_embedding.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
        "text_projection",
    ] {
        c.remove(n);
    }
    c.add("text.token_embedding.weight", Dtype::F32, &[50, 16]);
    c.write(&dir.path().join("open_clip_model.safetensors"));
    let e = prm::model::load_text_tower(dir.path().to_str().unwrap()).expect_err("text.* read");
    assert_msg(&e, &["`text.*`", "CustomTextCLIP", "--classes"]);
}

/// open_clip's `act_kwargs` on the vision tower go to `nn.GELU`: `approximate` "none" loads as
/// the exact GELU and "tanh" as its tanh approximation. Other options are refused, and so is
/// any option with `quick_gelu` (open_clip's QuickGELU takes none: open_clip cannot build it).
#[test]
fn open_clip_activation_options_select_the_gelu_or_are_refused() {
    let dir = tmp();
    openai_ckpt(Dtype::F32, "").write(&dir.path().join("open_clip_model.safetensors"));
    let config = |model_cfg: &str, act_kwargs: &str| {
        write_json(
            dir.path(),
            "open_clip_config.json",
            &format!(
                r#"{{"model_cfg": {{{model_cfg}"vision_cfg": {{"act_kwargs": {act_kwargs}}}}}}}"#
            ),
        )
    };
    for (act_kwargs, want) in [
        ("{}", Activation::Gelu),
        ("null", Activation::Gelu),
        (r#"{"approximate": "none"}"#, Activation::Gelu),
        (r#"{"approximate": "tanh"}"#, Activation::GeluTanh),
    ] {
        config("", act_kwargs);
        assert_eq!(
            load(dir.path()).unwrap().config.activation,
            want,
            "{act_kwargs}"
        );
        config(r#""quick_gelu": false, "#, act_kwargs);
        assert_eq!(
            load(dir.path()).unwrap().config.activation,
            want,
            "{act_kwargs}"
        );
    }
    config(r#""quick_gelu": true, "#, "{}");
    assert_eq!(
        load(dir.path()).unwrap().config.activation,
        Activation::QuickGelu
    );
    for (model_cfg, act_kwargs, parts) in [
        (
            "",
            r#"{"approximate": "TANH"}"#,
            &["approximate", "\"TANH\""][..],
        ),
        ("", r#"{"approximate": true}"#, &["approximate"][..]),
        ("", r#"{"inplace": true}"#, &["inplace"][..]),
        (
            "",
            r#"{"approximate": "tanh", "inplace": false}"#,
            &["inplace"][..],
        ),
        (
            r#""quick_gelu": true, "#,
            r#"{"approximate": "tanh"}"#,
            &["quick_gelu"][..],
        ),
        (
            r#""quick_gelu": true, "#,
            r#"{"approximate": "none"}"#,
            &["quick_gelu"][..],
        ),
        ("", "\"tanh\"", &["act_kwargs", "object"][..]),
    ] {
        config(model_cfg, act_kwargs);
        let e = load_err(dir.path());
        assert!(
            matches!(e, ModelError::BadConfig { .. }),
            "{act_kwargs}: {e:?}"
        );
        assert_msg(&e, &["open_clip_config.json"]);
        assert_msg(&e, parts);
        if act_kwargs != "\"tanh\"" {
            assert_msg(&e, &["vision_cfg.act_kwargs"]);
        }
    }
}

/// An open_clip ViT-H/14 state dict (width 1280; one block, a small MLP, a 1×1 grid) without a
/// config is refused: OpenAI's conventions would make it 20 heads of 64 with QuickGELU, another
/// model. With its open_clip_config.json beside it, it loads as 16 heads of 80 with GELU.
#[test]
fn open_clip_vit_h_without_a_config_is_refused() {
    let (d, m, p, t) = (1280usize, 8usize, 14usize, 2usize);
    let mut c = Ckpt::new();
    c.add("visual.conv1.weight", Dtype::BF16, &[d, 3, p, p]);
    c.add("visual.class_embedding", Dtype::BF16, &[d]);
    c.add("visual.positional_embedding", Dtype::BF16, &[t, d]);
    for ln in ["visual.ln_pre", "visual.ln_post"] {
        c.add(&format!("{ln}.weight"), Dtype::BF16, &[d]);
        c.add(&format!("{ln}.bias"), Dtype::BF16, &[d]);
    }
    let b = "visual.transformer.resblocks.0";
    for ln in ["ln_1", "ln_2"] {
        c.add(&format!("{b}.{ln}.weight"), Dtype::BF16, &[d]);
        c.add(&format!("{b}.{ln}.bias"), Dtype::BF16, &[d]);
    }
    c.add(
        &format!("{b}.attn.in_proj_weight"),
        Dtype::BF16,
        &[3 * d, d],
    );
    c.add(&format!("{b}.attn.in_proj_bias"), Dtype::BF16, &[3 * d]);
    c.add(&format!("{b}.attn.out_proj.weight"), Dtype::BF16, &[d, d]);
    c.add(&format!("{b}.attn.out_proj.bias"), Dtype::BF16, &[d]);
    c.add(&format!("{b}.mlp.c_fc.weight"), Dtype::BF16, &[m, d]);
    c.add(&format!("{b}.mlp.c_fc.bias"), Dtype::BF16, &[m]);
    c.add(&format!("{b}.mlp.c_proj.weight"), Dtype::BF16, &[d, m]);
    c.add(&format!("{b}.mlp.c_proj.bias"), Dtype::BF16, &[d]);
    c.add("visual.proj", Dtype::BF16, &[d, 16]);
    let dir = tmp();
    c.write(&dir.path().join("open_clip_model.safetensors"));
    let e = load_err(dir.path());
    assert_msg(
        &e,
        &[
            "ViT-H/14",
            "16 heads of 80",
            "20 heads of 64",
            "open_clip_config.json",
        ],
    );
    write_json(
        dir.path(),
        "open_clip_config.json",
        r#"{"model_cfg": {"embed_dim": 16, "vision_cfg": {"width": 1280, "head_width": 80}}}"#,
    );
    let m = load(dir.path()).unwrap();
    assert_eq!((m.config.heads, m.config.head_dim()), (16, 80));
    assert_eq!(m.config.activation, Activation::Gelu);
}

// ---------------------------------------------------------------- errors

fn assert_msg(e: &ModelError, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

#[test]
fn missing_path() {
    let dir = tmp();
    let path = dir.path().join("nope.safetensors");
    let e = load_err(&path);
    assert!(matches!(e, ModelError::NotFound { .. }), "{e:?}");
    assert_msg(&e, &["nope.safetensors", "safetensors", "random:"]);
}

#[test]
fn directory_without_or_with_several_checkpoints() {
    let dir = tmp();
    let e = load_err(dir.path());
    assert!(matches!(e, ModelError::NoCheckpoint { .. }), "{e:?}");
    hf_ckpt(Dtype::F32).write(&dir.path().join("a.safetensors"));
    hf_ckpt(Dtype::F32).write(&dir.path().join("b.safetensors"));
    let e = load_err(dir.path());
    assert!(matches!(e, ModelError::NoCheckpoint { .. }), "{e:?}");
    assert_msg(&e, &["a.safetensors", "b.safetensors"]);
    // model.safetensors wins over the others.
    hf_ckpt(Dtype::F32).write(&dir.path().join("model.safetensors"));
    load(dir.path()).unwrap();
}

#[test]
fn sharded_checkpoints_load_from_their_index_or_directory() {
    for (c, heads) in [
        (hf_ckpt(Dtype::BF16), 4),
        (openai_ckpt(Dtype::F16, "module."), 1),
    ] {
        let dir = tmp();
        let index = c.write_sharded(dir.path(), 3);
        if heads == 4 {
            write_json(
                dir.path(),
                "config.json",
                r#"{"vision_config": {"num_attention_heads": 4}}"#,
            );
        }
        let from_dir = load(dir.path()).unwrap();
        let from_index = load(&index).unwrap();
        assert_eq!(from_dir.config, from_index.config);
        if heads == 4 {
            check_dims(&from_dir, 4);
            check_hf_values(&from_dir, &c);
            assert_eq!(
                from_dir.source,
                ModelSource::HuggingFace {
                    path: index.clone()
                }
            );
        } else {
            check_openai_values(&from_dir, &c, "module.");
        }
        // The same tensors in one file give the same weights, bit for bit.
        let single = dir.path().join("single.safetensors");
        c.write(&single);
        assert_eq!(load(&single).unwrap().fingerprint(), from_dir.fingerprint());
    }
}

#[test]
fn a_directory_prefers_model_safetensors_then_its_index_then_a_lone_file() {
    let dir = tmp();
    let c = hf_ckpt(Dtype::F32);
    c.write_sharded(dir.path(), 2);
    // Shards alone (their names end in .safetensors too) resolve to the index.
    let m = load(dir.path()).unwrap();
    assert!(
        matches!(&m.source, ModelSource::HuggingFace { path } if path.ends_with("model.safetensors.index.json"))
    );
    c.write(&dir.path().join("model.safetensors"));
    let m = load(dir.path()).unwrap();
    assert!(
        matches!(&m.source, ModelSource::HuggingFace { path } if path.ends_with("model.safetensors"))
    );
    // An index of another name is taken when it is the only one and no lone file is there.
    let other = tmp();
    let index = c.write_sharded(other.path(), 2);
    std::fs::rename(&index, other.path().join("vision.safetensors.index.json")).unwrap();
    let e = load_err(other.path());
    assert_msg(&e, &["several *.safetensors files", "index"]);
    load(&other.path().join("vision.safetensors.index.json")).unwrap();
}

#[test]
fn broken_sharded_checkpoints_name_what_is_wrong() {
    let c = hf_ckpt(Dtype::F32);
    // A shard missing from the directory.
    let dir = tmp();
    let index = c.write_sharded(dir.path(), 2);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&index);
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    assert_msg(&e, &["model-00002-of-00002.safetensors"]);

    // The index places a tensor in a shard that does not hold it.
    let dir = tmp();
    let index = c.write_sharded(dir.path(), 2);
    let text = std::fs::read_to_string(&index).unwrap();
    let moved = text.replacen(
        r#""vision_model.post_layernorm.bias":"model-00001-of-00002.safetensors""#,
        r#""vision_model.post_layernorm.bias":"model-00002-of-00002.safetensors""#,
        1,
    );
    let moved = if moved == text {
        text.replacen(
            r#""vision_model.post_layernorm.bias":"model-00002-of-00002.safetensors""#,
            r#""vision_model.post_layernorm.bias":"model-00001-of-00002.safetensors""#,
            1,
        )
    } else {
        moved
    };
    assert_ne!(moved, text, "the test's index names post_layernorm.bias");
    std::fs::write(&index, moved).unwrap();
    let e = load_err(&index);
    assert!(matches!(e, ModelError::Inconsistent { .. }), "{e:?}");
    assert_msg(
        &e,
        &["vision_model.post_layernorm.bias", "does not hold it"],
    );

    // A tensor in two shards.
    let dir = tmp();
    let index = c.write_sharded(dir.path(), 2);
    c.write(&dir.path().join("model-00002-of-00002.safetensors"));
    let e = load_err(&index);
    assert!(matches!(e, ModelError::Inconsistent { .. }), "{e:?}");
    assert_msg(
        &e,
        &[
            "more than once",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ],
    );

    // Malformed indexes, and a shard outside the index's directory.
    for (json, part) in [
        ("not json", "invalid JSON"),
        ("{}", "weight_map"),
        (r#"{"weight_map": {}}"#, "lists no tensors"),
        (r#"{"weight_map": {"a": 3}}"#, "not a file name"),
        (
            r#"{"weight_map": {"a": "../model.safetensors"}}"#,
            "not a file name in the index's directory",
        ),
        (
            r#"{"weight_map": {"a": "/etc/passwd"}}"#,
            "not a file name in the index's directory",
        ),
    ] {
        let dir = tmp();
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(&index, json).unwrap();
        let e = load_err(&index);
        assert!(matches!(e, ModelError::BadIndex { .. }), "{json}: {e:?}");
        assert_msg(&e, &["sharded checkpoint index", part]);
    }
}

#[test]
fn tensors_the_loader_does_not_know_are_refused_not_dropped() {
    // open_clip's scaled-cosine attention norm and attention pooling, and an extra HF norm: each
    // would change what the tower computes.
    let cases: [(Ckpt, &str, &[usize]); 3] = [
        (
            openai_ckpt(Dtype::F32, ""),
            "visual.transformer.resblocks.1.attn.ln_inner.weight",
            &[D],
        ),
        (
            openai_ckpt(Dtype::F16, "module."),
            "module.visual.attn_pool.query",
            &[4, D],
        ),
        (
            hf_ckpt(Dtype::F32),
            "vision_model.encoder.layers.0.extra_norm.weight",
            &[D],
        ),
    ];
    for (mut c, extra, shape) in cases {
        c.add(extra, Dtype::F32, shape);
        let dir = tmp();
        let path = dir.path().join("m.safetensors");
        c.write(&path);
        if extra.starts_with("vision_model") {
            write_json(
                dir.path(),
                "config.json",
                r#"{"vision_config": {"num_attention_heads": 4}}"#,
            );
        }
        let e = load_err(&path);
        assert!(
            matches!(e, ModelError::UnknownTensors { .. }),
            "{extra}: {e:?}"
        );
        assert_msg(&e, &[extra, "vision tower", "attention pooling"]);
    }
    // position_ids (int64 index tables) and the text tower's tensors are no part of the vision
    // tower's computation: the fixtures hold both and load.
    let dir = tmp();
    let path = dir.path().join("m.safetensors");
    openai_ckpt(Dtype::F32, "").write(&path);
    load(&path).unwrap();
}

#[test]
fn open_clip_layer_scale_is_folded_into_the_branch_outputs() {
    // ls_1 scales the attention branch (out_proj's rows), ls_2 the MLP's (c_proj's), channel by
    // channel; block 1 has only ls_2.
    let mut c = openai_ckpt(Dtype::F32, "");
    let p = "visual.transformer.resblocks";
    c.add(&format!("{p}.0.ls_1.gamma"), Dtype::F32, &[D]);
    c.add(&format!("{p}.0.ls_2.gamma"), Dtype::F32, &[D]);
    c.add(&format!("{p}.1.ls_2.gamma"), Dtype::F32, &[D]);
    let dir = tmp();
    let path = dir.path().join("m.safetensors");
    c.write(&path);
    let m = load(&path).unwrap();
    let scaled = |linear: &str, gamma: &str, inputs: usize| {
        let (w, bias, g) = (
            c.get(&format!("{p}.{linear}.weight")),
            c.get(&format!("{p}.{linear}.bias")),
            c.get(&format!("{p}.{gamma}")),
        );
        let weight: Vec<f32> = (0..w.len()).map(|i| w[i] * g[i / inputs]).collect();
        let bias: Vec<f32> = bias.iter().zip(g).map(|(b, g)| b * g).collect();
        (weight, bias)
    };
    let (b0, b1) = (&m.weights.blocks[0], &m.weights.blocks[1]);
    let (w, b) = scaled("0.attn.out_proj", "0.ls_1.gamma", D);
    assert_eq!(
        (&b0.out_proj.weight, b0.out_proj.bias.as_ref().unwrap()),
        (&w, &b)
    );
    let (w, b) = scaled("0.mlp.c_proj", "0.ls_2.gamma", M);
    assert_eq!((&b0.fc2.weight, b0.fc2.bias.as_ref().unwrap()), (&w, &b));
    let (w, b) = scaled("1.mlp.c_proj", "1.ls_2.gamma", M);
    assert_eq!((&b1.fc2.weight, b1.fc2.bias.as_ref().unwrap()), (&w, &b));
    assert_eq!(
        b1.out_proj.weight,
        c.get(&format!("{p}.1.attn.out_proj.weight"))
    );
    // A gamma of the wrong length is named.
    c.reshape(&format!("{p}.1.ls_2.gamma"), &[D + 1]);
    c.write(&path);
    let e = load_err(&path);
    assert!(matches!(e, ModelError::BadShape { .. }), "{e:?}");
    assert_msg(&e, &["ls_2.gamma"]);
}

#[test]
fn towers_that_are_not_vits_are_named() {
    for (names, kind) in [
        (
            [
                "visual.layer1.0.conv1.weight",
                "visual.attnpool.c_proj.weight",
            ],
            "ResNet",
        ),
        (
            ["visual.trunk.stem.0.weight", "visual.head.proj.weight"],
            "timm",
        ),
    ] {
        let mut c = Ckpt::new();
        for n in names {
            c.add(n, Dtype::F32, &[4, 4]);
        }
        let dir = tmp();
        let path = dir.path().join("m.safetensors");
        c.write(&path);
        let e = load_err(&path);
        assert!(matches!(e, ModelError::Inconsistent { .. }), "{e:?}");
        assert_msg(&e, &[kind, "ViT towers only"]);
    }
}

#[test]
fn a_text_tower_with_tensors_the_loader_does_not_know_is_refused() {
    // The transformers-made tiny CLIPModel of the eval golden data, with one more text tensor.
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/eval/clip_tiny");
    let bytes = std::fs::read(golden.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let extra = vec![0u8; 4 * 8];
    let mut views: Vec<(String, TensorView<'_>)> =
        st.iter().map(|(n, v)| (n.to_string(), v)).collect();
    let name = "text_model.encoder.layers.0.ls_1.gamma";
    views.push((
        name.into(),
        TensorView::new(Dtype::F32, vec![8], &extra).unwrap(),
    ));
    let dir = tmp();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(golden.join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let spec = dir.path().to_str().unwrap();
    prm::model::load_text_tower(golden.to_str().unwrap())
        .unwrap()
        .expect("the golden model has a text tower");
    // The vision tower still loads (the extra tensor is the text tower's).
    load(dir.path()).unwrap();
    let e = match prm::model::load_text_tower(spec) {
        Ok(_) => panic!("loaded a text tower with an unknown tensor"),
        Err(e) => e,
    };
    assert!(matches!(e, ModelError::UnknownTensors { .. }), "{e:?}");
    assert_msg(&e, &[name, "text tower"]);
}

#[test]
fn pytorch_pickles_are_recognised_and_the_converter_is_named() {
    let dir = tmp();
    let zip = dir.path().join("ViT-B-16.pt");
    std::fs::write(&zip, b"PK\x03\x04archive/data.pkl and more").unwrap();
    let e = load_err(&zip);
    assert!(matches!(e, ModelError::PickleCheckpoint { .. }), "{e:?}");
    assert_msg(
        &e,
        &[
            "ViT-B-16.pt",
            "zip archive",
            "tools/to_safetensors.py",
            "ViT-B-16.safetensors",
        ],
    );
    let old = dir.path().join("old.bin");
    std::fs::write(&old, [0x80, 0x02, b'}', b'q', 0]).unwrap();
    let e = load_err(&old);
    assert!(matches!(e, ModelError::PickleCheckpoint { .. }), "{e:?}");
    assert_msg(&e, &["old.bin", "pickle", "tools/to_safetensors.py"]);

    // A directory holding only a PyTorch file says so.
    let hub = tmp();
    std::fs::write(
        hub.path().join("open_clip_pytorch_model.bin"),
        b"PK\x03\x04",
    )
    .unwrap();
    std::fs::write(hub.path().join("open_clip_config.json"), "{}").unwrap();
    let e = load_err(hub.path());
    assert!(matches!(e, ModelError::NoCheckpoint { .. }), "{e:?}");
    assert_msg(
        &e,
        &[
            "open_clip_pytorch_model.bin",
            "PyTorch pickle",
            "to_safetensors.py",
        ],
    );
}

#[test]
fn empty_truncated_and_garbage_files() {
    let dir = tmp();
    let good = hf_ckpt(Dtype::F32).bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.safetensors", Vec::new()),
        ("short.safetensors", vec![1, 2, 3]),
        ("truncated.safetensors", good[..good.len() / 2].to_vec()),
        (
            "one_byte_short.safetensors",
            good[..good.len() - 1].to_vec(),
        ),
        ("header_only.safetensors", good[..40].to_vec()),
        (
            "garbage.safetensors",
            (0..5000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
        ("huge_header_len.safetensors", {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        (
            "text.safetensors",
            b"this is not a safetensors file at all".to_vec(),
        ),
    ];
    for (name, bytes) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = load_err(&path);
        assert!(
            matches!(e, ModelError::BadSafetensors { .. }),
            "{name}: {e:?}"
        );
        assert_msg(&e, &[name, "truncated", "not a safetensors file"]);
    }
}

/// Handcrafts a safetensors file from a header string and a data section.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn adversarial_headers_never_panic() {
    let dir = tmp();
    let path = dir.path().join("x.safetensors");
    let d = "vision_model.embeddings";
    let headers = [
        // Overflowing shape.
        format!(
            r#"{{"{d}.class_embedding":{{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,0]}}}}"#
        ),
        // Offsets past the end.
        format!(
            r#"{{"{d}.class_embedding":{{"dtype":"F32","shape":[4],"data_offsets":[0,1000000]}}}}"#
        ),
        // Reversed offsets.
        format!(r#"{{"{d}.class_embedding":{{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}}}"#),
        // Unknown dtype.
        format!(r#"{{"{d}.class_embedding":{{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}}}}"#),
        // Not an object.
        "[1,2,3]".to_string(),
        "{".to_string(),
    ];
    for h in &headers {
        std::fs::write(&path, raw_file(h, &[0u8; 16])).unwrap();
        let e = load_err(&path);
        assert!(matches!(e, ModelError::BadSafetensors { .. }), "{h}: {e:?}");
    }
    // Valid files whose tensors are degenerate: zero width, zero-size patch, empty grid.
    let zero_width =
        format!(r#"{{"{d}.class_embedding":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}}}"#);
    std::fs::write(&path, raw_file(&zero_width, &[])).unwrap();
    assert!(matches!(load_err(&path), ModelError::BadShape { .. }));
    let mut c = hf_ckpt(Dtype::F32);
    c.reshape(&format!("{d}.patch_embedding.weight"), &[D, 3, 0, 0]);
    c.write(&path);
    assert!(matches!(load_err(&path), ModelError::BadShape { .. }));
    let mut c = hf_ckpt(Dtype::F32);
    c.reshape(&format!("{d}.position_embedding.weight"), &[1, D]);
    c.write(&path);
    assert!(matches!(load_err(&path), ModelError::BadShape { .. }));

    // Byte flips and truncations anywhere in a valid file give Ok or Err, never a panic.
    let good = hf_ckpt(Dtype::F32).bytes();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut state = 0x1234_5678_u32;
    for _ in 0..300 {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let mut b = good.clone();
        let pos = (state as usize >> 4) % (8 + header_len);
        b[pos] = (state >> 24) as u8;
        std::fs::write(&path, &b).unwrap();
        let _ = load(&path);
    }
    for cut in (0..good.len()).step_by(good.len() / 97 + 1) {
        std::fs::write(&path, &good[..cut]).unwrap();
        assert!(load(&path).is_err(), "cut at {cut}");
    }
}

#[test]
fn unknown_format_lists_prefixes() {
    let dir = tmp();
    let mut c = Ckpt::new();
    c.add("encoder.blocks.0.weight", Dtype::F32, &[2, 2]);
    c.add("head.weight", Dtype::F32, &[2]);
    let path = dir.path().join("other.safetensors");
    c.write(&path);
    let e = load_err(&path);
    assert!(matches!(e, ModelError::UnknownFormat { .. }), "{e:?}");
    assert_msg(&e, &["encoder.*", "head.*", "vision_model.", "visual."]);
}

#[test]
fn missing_block_tensor_is_named() {
    let dir = tmp();
    let path = dir.path().join("model.safetensors");
    let name = "vision_model.encoder.layers.1.mlp.fc2.bias";
    let mut c = hf_ckpt(Dtype::F32);
    c.remove(name);
    c.write(&path);
    let e = load_err(&path);
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e:?}");
    assert_msg(&e, &[name, "model.safetensors"]);

    // OpenAI naming with a prefix: the message gives the name as written in the file.
    let name = "module.visual.transformer.resblocks.0.attn.in_proj_bias";
    let mut c = openai_ckpt(Dtype::F16, "module.");
    c.remove(name);
    c.write(&path);
    assert_msg(&load_err(&path), &[name]);

    // A gap in the block numbering.
    let mut c = hf_ckpt(Dtype::F32);
    c.entries
        .retain(|e| !e.name.starts_with("vision_model.encoder.layers.0."));
    c.write(&path);
    let e = load_err(&path);
    assert!(matches!(e, ModelError::Inconsistent { .. }), "{e:?}");
    assert_msg(&e, &["contiguous", "0"]);
}

#[test]
fn mis_shaped_tensor_names_expected_and_got() {
    let dir = tmp();
    let path = dir.path().join("model.safetensors");
    let name = "vision_model.encoder.layers.1.self_attn.out_proj.weight";
    let mut c = hf_ckpt(Dtype::F32);
    c.reshape(name, &[D, D - 1]);
    c.write(&path);
    let e = load_err(&path);
    match &e {
        ModelError::BadShape { name: n, got, .. } => {
            assert_eq!(n, name);
            assert_eq!(got, &vec![D, D - 1]);
        }
        other => panic!("{other:?}"),
    }
    assert_msg(&e, &[name, "[64, 64]", "[64, 63]"]);

    let mut c = openai_ckpt(Dtype::F32, "");
    c.reshape("visual.proj", &[D + 1, E]);
    c.write(&path);
    assert_msg(&load_err(&path), &["visual.proj"]);
}

#[test]
fn non_square_position_table() {
    let dir = tmp();
    let path = dir.path().join("model.safetensors");
    let name = "vision_model.embeddings.position_embedding.weight";
    let mut c = hf_ckpt(Dtype::F32);
    c.reshape(name, &[T + 1, D]);
    c.write(&path);
    let e = load_err(&path);
    assert!(matches!(e, ModelError::BadShape { .. }), "{e:?}");
    assert_msg(&e, &[name, "square"]);
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = tmp();
    let path = dir.path().join("model.safetensors");
    let name = "vision_model.pre_layrnorm.bias";
    let mut c = hf_ckpt(Dtype::F32);
    c.set_dtype(name, Dtype::I32);
    c.write(&path);
    let e = load_err(&path);
    assert!(matches!(e, ModelError::UnsupportedDtype { .. }), "{e:?}");
    assert_msg(&e, &[name, "I32"]);
}

#[test]
fn bad_configs() {
    let dir = tmp();
    hf_ckpt(Dtype::F32).write(&dir.path().join("model.safetensors"));
    let cases = [
        (
            r#"{"vision_config": {"hidden_act": "gelu_fast"}}"#,
            "gelu_fast",
        ),
        (
            r#"{"vision_config": {"hidden_act": "relu", "num_attention_heads": 2}}"#,
            "relu",
        ),
        (
            r#"{"vision_config": {"num_attention_heads": 3}}"#,
            "num_attention_heads",
        ),
        (
            r#"{"vision_config": {"num_attention_heads": 0}}"#,
            "num_attention_heads",
        ),
        (
            r#"{"vision_config": {"num_attention_heads": 1, "layer_norm_eps": "x"}}"#,
            "layer_norm_eps",
        ),
        (r#"{"vision_config": 5}"#, "vision_config"),
        (r#"{"vision_config": {"#, "invalid JSON"),
        ("[]", "object"),
    ];
    for (json, part) in cases {
        write_json(dir.path(), "config.json", json);
        let e = load_err(dir.path());
        assert!(matches!(e, ModelError::BadConfig { .. }), "{json}: {e:?}");
        assert_msg(&e, &[part, "config.json"]);
    }
    write_json(
        dir.path(),
        "config.json",
        r#"{"vision_config": {"num_attention_heads": 1}}"#,
    );
    write_json(
        dir.path(),
        "preprocessor_config.json",
        r#"{"image_mean": [0.5, 0.5]}"#,
    );
    let e = load_err(dir.path());
    assert_msg(&e, &["preprocessor_config.json", "image_mean"]);
}

#[test]
fn heads_cannot_be_guessed_without_config() {
    // Width 64·k is required when there is no config.
    let dir = tmp();
    let mut c = Ckpt::new();
    let v = "visual";
    let d = 40;
    c.add(&format!("{v}.conv1.weight"), Dtype::F32, &[d, 3, 2, 2]);
    c.add(&format!("{v}.class_embedding"), Dtype::F32, &[d]);
    c.add(&format!("{v}.positional_embedding"), Dtype::F32, &[5, d]);
    c.add(
        &format!("{v}.transformer.resblocks.0.mlp.c_fc.weight"),
        Dtype::F32,
        &[8, d],
    );
    let path = dir.path().join("x.safetensors");
    c.write(&path);
    let e = load_err(&path);
    assert!(matches!(e, ModelError::Inconsistent { .. }), "{e:?}");
    assert_msg(&e, &["heads", "40"]);
}

// ---------------------------------------------------------------- built-in architectures

#[test]
fn unknown_random_arch_and_bad_seed() {
    let e = load_model("random:vit-g-14").unwrap_err();
    assert!(matches!(e, ModelError::UnknownArchitecture { .. }), "{e:?}");
    assert_msg(
        &e,
        &[
            "vit-g-14",
            "tiny",
            "vit-b-32",
            "vit-b-16",
            "vit-l-14",
            "vit-l-14-336",
            "vit-h-14",
        ],
    );
    let e = load_model("random:tiny@x").unwrap_err();
    assert!(matches!(e, ModelError::BadSpec { .. }), "{e:?}");
    assert!(random_model("", 0).is_err());
}

/// Parameter count from the configuration alone.
fn expected_params(arch: &str) -> (usize, usize) {
    let c = builtin_config(arch).unwrap();
    let (d, m, t) = (c.width, c.mlp, c.grid * c.grid + 1);
    let block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (m * d + m) + (d * m + d);
    let tower = d * 3 * c.patch * c.patch + d + t * d + 2 * d + c.layers * block + 2 * d;
    (tower, d * c.embed_dim.unwrap())
}

#[test]
fn builtin_configs_match_real_clip() {
    assert_eq!(
        builtin_architectures(),
        &[
            "tiny",
            "vit-b-32",
            "vit-b-16",
            "vit-l-14",
            "vit-l-14-336",
            "vit-h-14",
            "siglip-b-16",
            "siglip-so400m-14-384"
        ]
    );
    // (width, heads, layers, mlp, patch, grid, image, embed)
    let real = [
        ("tiny", (128, 2, 2, 512, 16, 4, 64, 64)),
        ("vit-b-32", (768, 12, 12, 3072, 32, 7, 224, 512)),
        ("vit-b-16", (768, 12, 12, 3072, 16, 14, 224, 512)),
        ("vit-l-14", (1024, 16, 24, 4096, 14, 16, 224, 768)),
        ("vit-l-14-336", (1024, 16, 24, 4096, 14, 24, 336, 768)),
        ("vit-h-14", (1280, 16, 32, 5120, 14, 16, 224, 1024)),
    ];
    for (arch, dims) in real {
        let c = builtin_config(arch).unwrap();
        assert_eq!(
            (
                c.width,
                c.heads,
                c.layers,
                c.mlp,
                c.patch,
                c.grid,
                c.image_size(),
                c.embed_dim.unwrap()
            ),
            dims,
            "{arch}"
        );
        // open_clip's LAION ViT-H/14: 16 heads of 80 and the exact GELU.
        let (head_dim, activation) = if arch == "vit-h-14" {
            (80, Activation::Gelu)
        } else {
            (64, Activation::QuickGelu)
        };
        assert_eq!(c.head_dim(), head_dim, "{arch}");
        assert_eq!(c.activation, activation, "{arch}");
        assert_eq!((c.ln_eps, c.mean, c.std), (1e-5, OPENAI_MEAN, OPENAI_STD));
    }
    // Well-known vision-tower sizes (without the projection).
    assert_eq!(expected_params("vit-b-16").0, 85_799_424);
    assert_eq!(expected_params("vit-b-32").0, 87_456_000);
    assert_eq!(expected_params("vit-l-14").0, 303_179_776);
    assert_eq!(expected_params("vit-l-14-336").0, 303_507_456);
    assert_eq!(expected_params("vit-h-14").0, 630_766_080);
}

/// SigLIP's vision towers (google/siglip-base-patch16-224, google/siglip-so400m-patch14-384)
/// with their attention-pooling head: no class token, a patch bias, no LN_pre, tanh GELU; the
/// parameter counts are `SiglipVisionModel`'s (92.9M and 428.2M).
#[test]
fn builtin_siglip_configs_match_real_siglip() {
    // (width, heads, layers, mlp, patch, grid, image covered, parameters with the head)
    let real = [
        ("siglip-b-16", (768, 12, 12, 3072, 16, 14, 224, 92_884_224)),
        (
            "siglip-so400m-14-384",
            // Its 384-pixel input is 27 patches of 14 and 6 dropped pixels: 378 covered.
            (1152, 16, 27, 4304, 14, 27, 378, 428_225_600),
        ),
    ];
    for (arch, (d, heads, layers, mlp, patch, grid, image, params)) in real {
        let c = builtin_config(arch).unwrap();
        assert_eq!(
            (
                c.width,
                c.heads,
                c.layers,
                c.mlp,
                c.patch,
                c.grid,
                c.image_size()
            ),
            (d, heads, layers, mlp, patch, grid, image),
            "{arch}"
        );
        assert!(!c.class_token && c.embed_dim == Some(d), "{arch}");
        assert_eq!(c.activation, Activation::GeluTanh, "{arch}");
        assert_eq!(
            (c.ln_eps, c.mean, c.std),
            (1e-6, [0.5; 3], [0.5; 3]),
            "{arch}"
        );
        let (m, p) = (mlp, 3 * patch * patch);
        let block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (m * d + m) + (d * m + d);
        let tower = d * p + d + grid * grid * d + layers * block + 2 * d;
        // probe, in_proj, out_proj, LayerNorm, MLP
        let head = d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (m * d + m) + (d * m + d);
        assert_eq!(tower + head, params, "{arch}");
    }
    // The small one is built whole: the weights match the count, no class token or LN_pre.
    let m = random_model("siglip-b-16", 0).unwrap();
    assert_eq!(m.parameter_count(), 92_884_224);
    assert!(m.weights.class_embedding.is_none() && m.weights.ln_pre.is_none());
    assert!(m.weights.patch_embed.bias.is_some());
    assert!(m.image_embedding_unavailable().is_none());
    assert!(prm::model::random_text_tower("siglip-b-16", 0).is_err());
}

fn check_shapes(m: &Model) {
    let c = &m.config;
    let w = &m.weights;
    let (d, pp) = (c.width, 3 * c.patch * c.patch);
    assert_eq!(w.patch_embed.weight.len(), d * pp);
    assert_eq!(
        (w.patch_embed.out_features, w.patch_embed.in_features),
        (d, pp)
    );
    assert_eq!(w.class_embedding.as_ref().map(Vec::len), Some(d));
    assert_eq!(w.position_embedding.len(), (c.grid * c.grid + 1) * d);
    assert_eq!(w.blocks.len(), c.layers);
    for b in &w.blocks {
        assert_eq!(b.qkv.weight.len(), 3 * d * d);
        assert_eq!(b.qkv.bias.as_ref().unwrap().len(), 3 * d);
        assert_eq!(b.out_proj.weight.len(), d * d);
        assert_eq!(b.fc1.weight.len(), c.mlp * d);
        assert_eq!(b.fc2.weight.len(), d * c.mlp);
        assert_eq!((b.fc2.out_features, b.fc2.in_features), (d, c.mlp));
        assert_eq!(b.ln1.weight.len(), d);
    }
    let p = w.projection.as_ref().unwrap();
    assert_eq!((p.out_features, p.in_features), (c.embed_dim.unwrap(), d));
}

#[test]
fn builtin_models_have_real_shapes_and_counts() {
    for arch in ["tiny", "vit-b-32", "vit-b-16"] {
        let m = random_model(arch, 0).unwrap();
        check_shapes(&m);
        let (tower, proj) = expected_params(arch);
        assert_eq!(m.parameter_count(), tower + proj, "{arch}");
        assert!(m.source.weights_are_random());
        assert_eq!(
            m.source,
            ModelSource::Random {
                arch: arch.to_string(),
                seed: 0
            }
        );
    }
}

fn all_weights(m: &Model) -> Vec<&[f32]> {
    let w = &m.weights;
    let mut v: Vec<&[f32]> = vec![
        &w.patch_embed.weight,
        w.class_embedding.as_deref().unwrap(),
        &w.position_embedding,
        &w.ln_pre.as_ref().unwrap().weight,
        &w.ln_pre.as_ref().unwrap().bias,
        &w.ln_post.weight,
        &w.ln_post.bias,
        &w.projection.as_ref().unwrap().weight,
    ];
    for b in &w.blocks {
        for l in [&b.qkv, &b.out_proj, &b.fc1, &b.fc2] {
            v.push(&l.weight);
            v.push(l.bias.as_ref().unwrap());
        }
        for l in [&b.ln1, &b.ln2] {
            v.push(&l.weight);
            v.push(&l.bias);
        }
    }
    v
}

#[test]
fn builtin_weights_are_deterministic_and_seeded() {
    let a = load_model("random:tiny@7").unwrap();
    let b = random_model("tiny", 7).unwrap();
    let c = load_model("random:tiny@8").unwrap();
    let z = load_model("random:tiny").unwrap();
    assert_eq!(
        z.source,
        ModelSource::Random {
            arch: "tiny".into(),
            seed: 0
        }
    );
    let (wa, wb, wc) = (all_weights(&a), all_weights(&b), all_weights(&c));
    assert_eq!(wa, wb);
    for (x, y) in wa.iter().zip(&wc) {
        assert_ne!(x, y, "seed 7 and 8 gave an identical tensor");
    }
    // Distinct tensors of one model are not copies of one another.
    assert_ne!(
        a.weights.blocks[0].qkv.weight[..64],
        a.weights.blocks[1].qkv.weight[..64]
    );
    // Independent of the thread count.
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| random_model("tiny", 3).unwrap());
    let three = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap()
        .install(|| random_model("tiny", 3).unwrap());
    assert!(all_weights(&one) == all_weights(&three));
}

#[test]
fn builtin_weight_scales_are_clip_like() {
    let m = random_model("vit-b-16", 1).unwrap();
    let stats = |v: &[f32]| {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    };
    let w = &m.weights;
    let b = &w.blocks[3];
    let close = |got: f64, want: f64| (got - want).abs() < 0.03 * want;
    assert!(close(stats(&b.qkv.weight).1, 1.0 / 768f64.sqrt()));
    assert!(close(stats(&b.fc2.weight).1, 1.0 / 3072f64.sqrt()));
    assert!(close(stats(&w.patch_embed.weight).1, 1.0 / 768f64.sqrt()));
    let (m_ln, s_ln) = stats(&b.ln1.weight);
    assert!((m_ln - 1.0).abs() < 0.02 && s_ln > 0.01 && s_ln < 0.1);
    assert!(b.ln1.weight.iter().all(|&x| x != 1.0));
    assert!(b
        .fc1
        .bias
        .as_ref()
        .unwrap()
        .iter()
        .all(|&x| x != 0.0 && x.abs() < 0.05));
    let (_, s_cls) = stats(w.class_embedding.as_deref().unwrap());
    assert!((0.02..0.1).contains(&s_cls), "class embedding std {s_cls}");
    let (_, s_pos) = stats(&w.position_embedding);
    assert!(
        (0.02..0.1).contains(&s_pos),
        "position embedding std {s_pos}"
    );
}

/// A naive f32 forward of the residual stream, to check that random weights keep it sane.
fn residual_norms(m: &Model, pixels: &[f32]) -> Vec<f64> {
    let c = &m.config;
    let w = &m.weights;
    let (d, p, g) = (c.width, c.patch, c.grid);
    let side = g * p;
    let t = g * g + 1;
    let ln = |x: &[f32], l: &prm::model::LayerNormWeights| -> Vec<f32> {
        let n = x.len() as f32;
        let mean = x.iter().sum::<f32>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
        let r = 1.0 / (var + c.ln_eps).sqrt();
        x.iter()
            .zip(l.weight.iter().zip(&l.bias))
            .map(|(v, (a, b))| (v - mean) * r * a + b)
            .collect()
    };
    let lin = |x: &[f32], l: &prm::model::Linear| -> Vec<f32> {
        (0..l.out_features)
            .map(|o| {
                let row = &l.weight[o * l.in_features..(o + 1) * l.in_features];
                row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>()
                    + l.bias.as_ref().map_or(0.0, |b| b[o])
            })
            .collect()
    };
    let mut h: Vec<Vec<f32>> = Vec::with_capacity(t);
    h.push(w.class_embedding.clone().unwrap());
    for gy in 0..g {
        for gx in 0..g {
            let mut patch = Vec::with_capacity(3 * p * p);
            for ch in 0..3 {
                for y in 0..p {
                    for x in 0..p {
                        let v = pixels[(ch * side + gy * p + y) * side + gx * p + x];
                        patch.push((v - c.mean[ch]) / c.std[ch]);
                    }
                }
            }
            h.push(lin(&patch, &w.patch_embed));
        }
    }
    for (i, tok) in h.iter_mut().enumerate() {
        for (v, pe) in tok
            .iter_mut()
            .zip(&w.position_embedding[i * d..(i + 1) * d])
        {
            *v += pe;
        }
    }
    let mut h: Vec<Vec<f32>> = h
        .iter()
        .map(|x| ln(x, w.ln_pre.as_ref().unwrap()))
        .collect();
    let norm = |h: &[Vec<f32>]| {
        (h.iter().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>() / h.len() as f64).sqrt()
    };
    let mut norms = vec![norm(&h)];
    let hd = c.head_dim();
    for b in &w.blocks {
        let qkv: Vec<Vec<f32>> = h.iter().map(|x| lin(&ln(x, &b.ln1), &b.qkv)).collect();
        let mut attn = vec![vec![0.0f32; d]; t];
        for head in 0..c.heads {
            let off = head * hd;
            for i in 0..t {
                let q = &qkv[i][off..off + hd];
                let s: Vec<f32> = (0..t)
                    .map(|j| {
                        let k = &qkv[j][d + off..d + off + hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                for j in 0..t {
                    for k in 0..hd {
                        attn[i][off + k] += e[j] / z * qkv[j][2 * d + off + k];
                    }
                }
            }
        }
        for i in 0..t {
            let o = lin(&attn[i], &b.out_proj);
            h[i].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let f: Vec<f32> = lin(&ln(&h[i], &b.ln2), &b.fc1)
                .into_iter()
                .map(|x| x / (1.0 + (-1.702 * x).exp()))
                .collect();
            let o = lin(&f, &b.fc2);
            h[i].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        norms.push(norm(&h));
    }
    norms
}

#[test]
fn builtin_residual_stream_stays_sane() {
    let m = random_model("tiny", 0).unwrap();
    let side = m.config.image_size();
    let pixels: Vec<f32> = (0..3 * side * side)
        .map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 1000.0)
        .collect();
    let norms = residual_norms(&m, &pixels);
    let d = m.config.width as f64;
    // Per-token RMS-like norm / sqrt(D): F_0 ≈ 1 after LN_pre; later layers grow slowly.
    for (l, n) in norms.iter().enumerate() {
        let r = n / d.sqrt();
        assert!(
            (0.5..4.0).contains(&r),
            "F_{l}: normalised norm {r} ({norms:?})"
        );
    }
}

/// The same check on ViT-B/32 (12 layers at real width), plus vit-l-14 generation; slow in
/// debug builds, so run on demand: `cargo test --test model_loading -- --ignored --nocapture`.
#[test]
#[ignore]
fn builtin_residual_stream_stays_sane_vit_b_32() {
    let m = random_model("vit-b-32", 0).unwrap();
    let side = m.config.image_size();
    let pixels: Vec<f32> = (0..3 * side * side)
        .map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 1000.0)
        .collect();
    let norms = residual_norms(&m, &pixels);
    let d = m.config.width as f64;
    let normalised: Vec<f64> = norms.iter().map(|n| n / d.sqrt()).collect();
    eprintln!("vit-b-32 per-token norm / sqrt(D), F_0..F_L: {normalised:.3?}");
    for (l, r) in normalised.iter().enumerate() {
        assert!((0.5..6.0).contains(r), "F_{l}: {r}");
    }
    let t = std::time::Instant::now();
    let l14 = random_model("vit-l-14", 0).unwrap();
    eprintln!(
        "vit-l-14: {} parameters generated in {:.2?}",
        l14.parameter_count(),
        t.elapsed()
    );
}
