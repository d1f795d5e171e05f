//! Image decoding as `prm attack` does it for every input: format sniffing, the `--max-pixels`
//! header check (a small budget here, so bombs are cut off before any allocation), EXIF
//! orientation, and conversion of every colour form to planar RGB in [0, 1].
//!
//! A panic inside a decoder (another crate's bug; zune-jpeg 0.5.15 has one) is caught by
//! `read_image_bytes` and returned as the file's `Decode` error, as `prm` reports it. libFuzzer's
//! panic hook aborts on any panic, caught or not, so the target lets those through and aborts on
//! every other panic as before.
#![no_main]

use std::path::Path;
use std::sync::Once;

use libfuzzer_sys::fuzz_target;

static HOOK: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    HOOK.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !prm::io::inside_image_decoder() {
                abort(info);
            }
        }));
    });
    if let Ok(img) = prm::io::read_image_bytes(data, Path::new("fuzz"), 1 << 20) {
        assert_eq!(img.data.len(), 3 * img.width * img.height);
        assert!(img.width * img.height <= 1 << 20);
        assert!(img.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }
});
