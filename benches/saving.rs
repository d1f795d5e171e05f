//! The host's share of saving an attacked batch in `prm attack`: quantising each adversarial
//! image within ε, the saved levels as floats (what the final evaluation reads) and the saved
//! image's L∞, one image per rayon task, as the campaign runs it after the step loop. On a GPU
//! the device waits for this (`prm attack --profile`'s "quantisation" phase: 44 ms for 77 images
//! of about 320×240 on the H200 machine at fba7e63).
//!
//! Run: `cargo bench --bench saving`. Two variants on the same 77 images of 3×240×320:
//! `three passes` (quantise, convert, L∞ as three calls, the code before the one-pass function)
//! and `one pass` ([`prm::io::quantize_for_saving`], the campaign's code now).
//!
//! `png encode` times the writer's encoding of one saved adversarial image (a bundled photo,
//! tiled to 500×375 like an ImageNet validation image, with a ±8/255 sign perturbation, as a
//! pgd attack leaves it) at each of the `png` crate's compression levels, and prints each
//! level's file size once.

use criterion::{criterion_group, criterion_main, Criterion};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::ImageEncoder;
use prm::io::{linf_255, quantize_for_saving, quantize_within_eps};
use prm::rng::ImageRng;
use rayon::prelude::*;

const IMAGES: usize = 77;
const VALUES: usize = 3 * 240 * 320;
const EPS: f32 = 8.0 / 255.0;

fn saving(c: &mut Criterion) {
    let rng = ImageRng::new(0, "bench");
    let clean: Vec<Vec<f32>> = (0..IMAGES)
        .map(|i| {
            (0..VALUES)
                .map(|j| (rng.uniform(i as u32, j as u64) * 255.0).round() / 255.0)
                .collect()
        })
        .collect();
    let adv: Vec<Vec<f32>> = clean
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.iter()
                .enumerate()
                .map(|(j, &v)| v + (rng.uniform(1000 + i as u32, j as u64) - 0.5) * 0.07)
                .collect()
        })
        .collect();
    let mut g = c.benchmark_group(format!("save {IMAGES} images of 3x240x320"));
    g.sample_size(20);
    g.bench_function("three passes", |b| {
        b.iter(|| {
            let saved: Vec<Vec<u8>> = adv
                .par_iter()
                .zip(&clean)
                .map(|(a, c)| quantize_within_eps(a, c, EPS))
                .collect();
            let values: Vec<Vec<f32>> = saved
                .par_iter()
                .map(|s| s.iter().map(|&q| q as f32 / 255.0).collect())
                .collect();
            let linf: Vec<f64> = saved
                .par_iter()
                .zip(&clean)
                .map(|(s, c)| linf_255(s, c))
                .collect();
            (saved, values, linf)
        })
    });
    g.bench_function("one pass", |b| {
        b.iter(|| {
            adv.par_iter()
                .zip(&clean)
                .map(|(a, c)| quantize_for_saving(a, c, EPS))
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

/// A 500×375 RGB photo with a ±8/255 sign perturbation: the bundled astronaut, tiled.
fn adversarial_photo() -> (Vec<u8>, u32, u32) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("samples");
    let photo = image::open(dir.join("astronaut.png")).unwrap().to_rgb8();
    let (w, h) = (500u32, 375u32);
    let rng = ImageRng::new(0, "png bench");
    let mut out = Vec::with_capacity((3 * w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            let p = photo.get_pixel(x % photo.width(), y % photo.height());
            for (c, &v) in p.0.iter().enumerate() {
                let i = ((y * w + x) * 3 + c as u32) as u64;
                let sign = if rng.uniform(0, i) < 0.5 { -8 } else { 8 };
                out.push((v as i32 + sign).clamp(0, 255) as u8);
            }
        }
    }
    (out, w, h)
}

fn encode(rgb: &[u8], w: u32, h: u32, level: CompressionType) -> Vec<u8> {
    let mut bytes = Vec::new();
    let encoder = PngEncoder::new_with_quality(&mut bytes, level, FilterType::Adaptive);
    encoder
        .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    bytes
}

fn png_encode(c: &mut Criterion) {
    let (rgb, w, h) = adversarial_photo();
    let levels = [
        ("fast", CompressionType::Fast),
        ("default", CompressionType::Default),
        ("best", CompressionType::Best),
    ];
    let mut g = c.benchmark_group(format!("png encode {w}x{h} adversarial photo"));
    g.sample_size(20);
    for (name, level) in levels {
        let size = encode(&rgb, w, h, level).len();
        eprintln!(
            "png {name}: {size} bytes ({:.2} bytes a pixel)",
            size as f64 / (w * h) as f64
        );
        g.bench_function(name, |b| b.iter(|| encode(&rgb, w, h, level)));
    }
    g.finish();
}

criterion_group!(benches, saving, png_encode);
criterion_main!(benches);
