//! Image decoding as `prm attack` does it for every input: format sniffing, the `--max-pixels`
//! header check (a small budget here, so bombs are cut off before any allocation), EXIF
//! orientation, and conversion of every colour form to planar RGB in [0, 1].
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = prm::io::read_image_bytes(data, Path::new("fuzz"), 1 << 20) {
        assert_eq!(img.data.len(), 3 * img.width * img.height);
        assert!(img.width * img.height <= 1 << 20);
        assert!(img.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }
});
