//! The host's share of saving an attacked batch in `prm attack`: quantising each adversarial
//! image within ε, the saved levels as floats (what the final evaluation reads) and the saved
//! image's L∞, one image per rayon task, as the campaign runs it after the step loop. On a GPU
//! the device waits for this (`prm attack --profile`'s "quantisation" phase: 44 ms for 77 images
//! of about 320×240 on the H200 machine at fba7e63).
//!
//! Run: `cargo bench --bench saving`. Two variants on the same 77 images of 3×240×320:
//! `three passes` (quantise, convert, L∞ as three calls, the code before the one-pass function)
//! and `one pass` ([`prm::io::quantize_for_saving`], the campaign's code now).

use criterion::{criterion_group, criterion_main, Criterion};
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

criterion_group!(benches, saving);
criterion_main!(benches);
