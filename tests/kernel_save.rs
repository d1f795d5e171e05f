//! Kernel tests of kernels/save.cu against `prm::io::quantize_for_saving`: the levels, their
//! float values and each image's L∞ must be the twin's bit for bit, for every kind of value the
//! twin treats specially.

use prm::gpu::kernels::save::{quantize_for_saving_f32, SavedOnDevice};
use prm::gpu::kernels::update::ImageBatch;
use prm::gpu::Device;
use prm::io::quantize_for_saving;
use prm::rng::ImageRng;

use crate::common::kernel as kernel_common;
use kernel_common::{on_devices, Rng};

/// Odd sides (none a multiple of a patch), one image past a block, one of many blocks.
const SHAPES: [(usize, usize); 5] = [(17, 23), (1, 1), (37, 41), (8, 9), (200, 301)];

/// A clean value: mostly on the 8-bit grid (as decoded images are), some off it (16-bit
/// images), the bounds, and the rare non-finite value the twin still defines.
fn clean_value(rng: &mut Rng, i: usize) -> f32 {
    match i % 23 {
        0 => 0.0,
        1 => 1.0,
        2 => (rng.unit() * 65535.0).floor() / 65535.0,
        3 => rng.unit(),
        4 if i % 1000 == 4 => f32::NAN,
        _ => (rng.unit() * 256.0).floor().min(255.0) / 255.0,
    }
}

/// An adversarial value near `clean` (inside and outside the ball), out of [0, 1], exactly
/// half-way between levels, or non-finite.
fn adversarial_value(rng: &mut Rng, i: usize, clean: f32, eps: f32) -> f32 {
    match i % 29 {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => -0.25,
        4 => 1.5,
        5 => ((clean * 255.0).round() + 0.5) / 255.0,
        _ => clean + eps * (4.0 * rng.unit() - 2.0),
    }
}

#[test]
fn quantize_matches_the_host_twin_bit_for_bit() {
    on_devices("quantize_for_saving_f32", |dev: &Device| {
        // Usual radii, zero, one below half a level (an empty interval off the grid) and a
        // negative one (always empty).
        for (seed, eps_set) in [
            (
                1u64,
                [8.0 / 255.0, 4.0 / 255.0, 16.0 / 255.0, 1.0, 0.5 / 255.0],
            ),
            (
                2,
                [0.0, 1.0 / 1000.0, -1.0 / 255.0, 8.0 / 255.0, 2.0 / 255.0],
            ),
        ] {
            let mut rng = Rng::new(seed);
            let lens: Vec<usize> = SHAPES.iter().map(|(h, w)| 3 * h * w).collect();
            let mut clean = Vec::new();
            let mut adv = Vec::new();
            for (b, &len) in lens.iter().enumerate() {
                for i in 0..len {
                    let c = clean_value(&mut rng, i);
                    clean.push(c);
                    adv.push(adversarial_value(&mut rng, i + b, c, eps_set[b]));
                }
            }
            let keys: Vec<[u32; 2]> = (0..lens.len())
                .map(|b| ImageRng::new(seed, &format!("{b}.png")).key())
                .collect();
            let batch = ImageBatch::new(dev, &lens, &eps_set, &keys)?;
            let adv_d = dev.upload(&adv)?;
            let clean_d = dev.upload(&clean)?;
            let mut out = SavedOnDevice::alloc(dev, &batch)?;
            dev.poison(&mut out.levels)?;
            dev.poison(&mut out.values)?;
            dev.poison(&mut out.linf_bits)?;
            quantize_for_saving_f32(dev, &batch, &adv_d, &clean_d, &mut out)?;
            let levels = dev.download(&out.levels)?;
            let values = dev.download(&out.values)?;
            let linf = out.linf_255(dev)?;
            let mut offset = 0;
            for (b, &len) in lens.iter().enumerate() {
                let range = offset..offset + len;
                let want =
                    quantize_for_saving(&adv[range.clone()], &clean[range.clone()], eps_set[b]);
                assert_eq!(
                    levels[range.clone()],
                    want.levels[..],
                    "seed {seed} image {b}: levels"
                );
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&values[range.clone()]),
                    bits(&want.values),
                    "seed {seed} image {b}: float values"
                );
                assert_eq!(
                    linf[b].to_bits(),
                    want.linf_255.to_bits(),
                    "seed {seed} image {b}: L∞ {} against {}",
                    linf[b],
                    want.linf_255
                );
                offset += len;
            }
        }
        Ok(())
    });
}
