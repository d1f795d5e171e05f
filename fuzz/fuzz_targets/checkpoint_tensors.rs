//! Structured checkpoints: a well-formed safetensors file whose tensor *names*, shapes and dtypes
//! come from the fuzzer (names drawn from the Hugging Face and OpenAI/open_clip vocabularies with
//! fuzzed block indices and prefixes). This reaches the name mapping and shape inference far more
//! often than raw bytes do.
#![no_main]

use std::path::Path;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

const PREFIXES: &[&str] = &["", "module.", "state_dict.", "model.", "visual."];
const HF: &[&str] = &[
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    "vision_model.embeddings.position_ids",
    "vision_model.pre_layrnorm.weight",
    "vision_model.pre_layrnorm.bias",
    "vision_model.post_layernorm.weight",
    "vision_model.post_layernorm.bias",
    "visual_projection.weight",
    "vision_model.encoder.layers.{}.layer_norm1.weight",
    "vision_model.encoder.layers.{}.layer_norm1.bias",
    "vision_model.encoder.layers.{}.layer_norm2.weight",
    "vision_model.encoder.layers.{}.layer_norm2.bias",
    "vision_model.encoder.layers.{}.self_attn.q_proj.weight",
    "vision_model.encoder.layers.{}.self_attn.q_proj.bias",
    "vision_model.encoder.layers.{}.self_attn.k_proj.weight",
    "vision_model.encoder.layers.{}.self_attn.k_proj.bias",
    "vision_model.encoder.layers.{}.self_attn.v_proj.weight",
    "vision_model.encoder.layers.{}.self_attn.v_proj.bias",
    "vision_model.encoder.layers.{}.self_attn.out_proj.weight",
    "vision_model.encoder.layers.{}.self_attn.out_proj.bias",
    "vision_model.encoder.layers.{}.mlp.fc1.weight",
    "vision_model.encoder.layers.{}.mlp.fc1.bias",
    "vision_model.encoder.layers.{}.mlp.fc2.weight",
    "vision_model.encoder.layers.{}.mlp.fc2.bias",
];
const OPENAI: &[&str] = &[
    "visual.class_embedding",
    "visual.conv1.weight",
    "visual.positional_embedding",
    "visual.ln_pre.weight",
    "visual.ln_pre.bias",
    "visual.ln_post.weight",
    "visual.ln_post.bias",
    "visual.proj",
    "visual.transformer.resblocks.{}.ln_1.weight",
    "visual.transformer.resblocks.{}.ln_1.bias",
    "visual.transformer.resblocks.{}.ln_2.weight",
    "visual.transformer.resblocks.{}.ln_2.bias",
    "visual.transformer.resblocks.{}.attn.in_proj_weight",
    "visual.transformer.resblocks.{}.attn.in_proj_bias",
    "visual.transformer.resblocks.{}.attn.out_proj.weight",
    "visual.transformer.resblocks.{}.attn.out_proj.bias",
    "visual.transformer.resblocks.{}.mlp.c_fc.weight",
    "visual.transformer.resblocks.{}.mlp.c_fc.bias",
    "visual.transformer.resblocks.{}.mlp.c_proj.weight",
    "visual.transformer.resblocks.{}.mlp.c_proj.bias",
];

#[derive(Arbitrary, Debug)]
struct Tensor {
    openai: bool,
    prefix: u8,
    name: u8,
    /// Block index; mostly small, sometimes huge.
    block: u32,
    dtype: u8,
    /// Up to 4 dimensions, each small (the data is allocated).
    dims: Vec<u8>,
    fill: u8,
}

#[derive(Arbitrary, Debug)]
struct Checkpoint {
    tensors: Vec<Tensor>,
}

fuzz_target!(|ck: Checkpoint| {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in ck.tensors.iter().take(64) {
        let vocab = if t.openai { OPENAI } else { HF };
        let template = vocab[t.name as usize % vocab.len()];
        let block = if t.block % 8 == 7 {
            t.block
        } else {
            t.block % 4
        };
        let name = format!(
            "{}{}",
            PREFIXES[t.prefix as usize % PREFIXES.len()],
            template.replace("{}", &block.to_string())
        );
        let dtype = [
            Dtype::F32,
            Dtype::F16,
            Dtype::BF16,
            Dtype::F64,
            Dtype::I64,
            Dtype::U8,
        ][t.dtype as usize % 6];
        let shape: Vec<usize> = t.dims.iter().take(4).map(|&d| (d % 17) as usize).collect();
        let n: usize = shape.iter().product();
        let bytes = vec![t.fill; n * dtype.bitsize() / 8];
        owned.push((name, dtype, shape, bytes));
    }
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    owned.dedup_by(|a, b| a.0 == b.0);
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .filter_map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .ok()
                .map(|v| (name.clone(), v))
        })
        .collect();
    let Ok(buf) = safetensors::serialize(views, None) else {
        return;
    };
    let path = Path::new("/nonexistent-prm-fuzz/model.safetensors");
    if let Ok(model) = prm::model::load_safetensors_bytes(path, &buf) {
        // Whatever loads must describe itself consistently.
        let _ = model.parameter_count();
        let _ = model.config.feature_layers();
    }
});
