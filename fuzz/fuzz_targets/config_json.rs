//! The JSON files read next to a checkpoint: `config.json` (Hugging Face), `preprocessor_config.json`
//! and `open_clip_config.json`, beside a valid tiny checkpoint of either format. The input is the
//! three files' contents separated by 0xFF bytes (not valid UTF-8, so never inside a JSON text);
//! its first byte picks the checkpoint format.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static HF: &[u8] = include_bytes!("../seeds/checkpoint/hf.safetensors");
static OPENAI: &[u8] = include_bytes!("../seeds/checkpoint/openai.safetensors");

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap().keep())
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.split(|&b| b == 0xFF);
    let dir = dir();
    for name in [
        "config.json",
        "preprocessor_config.json",
        "open_clip_config.json",
    ] {
        let path = dir.join(name);
        match parts.next() {
            Some(text) if !text.is_empty() => std::fs::write(&path, text).unwrap(),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let ckpt = if which % 2 == 0 { HF } else { OPENAI };
    let _ = prm::model::load_safetensors_bytes(&dir.join("model.safetensors"), ckpt);
});
