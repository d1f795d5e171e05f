//! Ground-truth label maps as `prm eval --labels DIR` reads them: any bytes as a class-index
//! PNG (8- or 16-bit grayscale, 1/2/4/8-bit palette indices; other colour types refused).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((w, h, labels)) = prm::eval::labels::read_label_png_bytes(data, Path::new("fuzz")) {
        assert_eq!(labels.len(), w * h);
        assert!(labels.iter().all(|&v| v < 1 << 16));
    }
});
