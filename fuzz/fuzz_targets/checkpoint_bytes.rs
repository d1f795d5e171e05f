//! Any bytes as `model.safetensors`: the safetensors header parser, then format detection,
//! tensor-name mapping, shape inference and dtype conversion. Must return a `ModelError`, never
//! panic, hang or allocate without bound. Seeds: the golden tiny checkpoints (HF and OpenAI).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A directory that does not exist: no JSON configs are read.
    let path = Path::new("/nonexistent-prm-fuzz/model.safetensors");
    let _ = prm::model::load_safetensors_bytes(path, data);
});
