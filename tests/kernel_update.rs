//! Kernel tests of kernels/update.cu against `prm::attack::optim::Optimizer` and
//! `prm::rng::ImageRng`.
//!
//! Every update is asserted bit-identical to the optimiser twin (the kernels use the twin's
//! f32 operations in the twin's order), the Philox draws bit-identical to `ImageRng::uniform`.

#![allow(dead_code)]

use prm::attack::image::random_start;
use prm::attack::optim::{project, Optimizer};
use prm::attack::settings::{OptimizerKind, Preset};
use prm::gpu::kernels::update::{
    adamw_image_f32, adamw_init_f32, adamw_step_f32, escape_adamw_f32, escape_sign_step_f32,
    mifgsm_step_f32, pgd_step_f32, random_start_f32, uniform_f32, AdamwScalars, ImageBatch,
};
use prm::gpu::{Device, GpuError};
use prm::rng::{ImageRng, STREAM_ESCAPE, STREAM_INIT, STREAM_SCALE};

use crate::common::kernel as kernel_common;
use kernel_common::{on_devices, Rng};

/// Three odd-sized planar images with their own radii and keys.
const SHAPES: [(usize, usize); 3] = [(17, 23), (50, 31), (8, 9)];
const EPS: [f32; 3] = [8.0 / 255.0, 4.0 / 255.0, 16.0 / 255.0];
const PATHS: [&str; 3] = ["a/one.png", "b/two.jpg", "three.webp"];

struct Case {
    lens: Vec<usize>,
    offsets: Vec<usize>,
    rngs: Vec<ImageRng>,
    clean: Vec<f32>,
}

impl Case {
    fn new(seed: u64) -> Self {
        let lens: Vec<usize> = SHAPES.iter().map(|(h, w)| 3 * h * w).collect();
        let mut offsets = vec![0];
        for l in &lens {
            offsets.push(offsets.last().unwrap() + l);
        }
        let mut rng = Rng::new(seed);
        // Pixels in [0, 1] with some exactly at the bounds (clamps of both kinds are hit).
        let clean: Vec<f32> = (0..offsets[3])
            .map(|i| match i % 17 {
                0 => 0.0,
                1 => 1.0,
                2 => 1.0 / 255.0,
                _ => rng.unit(),
            })
            .collect();
        Case {
            lens,
            offsets,
            rngs: PATHS.iter().map(|p| ImageRng::new(seed, p)).collect(),
            clean,
        }
    }
    fn batch(&self, dev: &Device) -> Result<ImageBatch, GpuError> {
        ImageBatch::with_rngs(dev, &self.lens, &EPS, &self.rngs)
    }
    fn image<'a>(&self, v: &'a [f32], b: usize) -> &'a [f32] {
        &v[self.offsets[b]..self.offsets[b + 1]]
    }
    /// Gradients with exact zeros sprinkled in.
    fn grad(&self, rng: &mut Rng) -> Vec<f32> {
        (0..self.clean.len())
            .map(|i| {
                if i % 11 == 0 {
                    0.0
                } else {
                    rng.unit() * 2e-3 - 1e-3
                }
            })
            .collect()
    }
    /// The seeded escape signs of `attack::image` for image b.
    fn signs(&self, b: usize) -> Vec<f32> {
        (0..self.lens[b])
            .map(|i| {
                if self.rngs[b].uniform(STREAM_ESCAPE, i as u64) < 0.5 {
                    -1.0
                } else {
                    1.0
                }
            })
            .collect()
    }
    /// The random start of `attack::image` (Init::Random) for image b.
    fn random_start(&self, b: usize) -> Vec<f32> {
        let clean = self.image(&self.clean, b);
        let mut x: Vec<f32> = clean
            .iter()
            .enumerate()
            .map(|(i, &c)| c + EPS[b] * (2.0 * self.rngs[b].uniform(STREAM_INIT, i as u64) - 1.0))
            .collect();
        project(&mut x, clean, EPS[b]);
        x
    }
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let differ: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    assert!(
        differ.is_empty(),
        "{what}: {} of {} values differ, first at {}: got {} want {}",
        differ.len(),
        got.len(),
        differ[0],
        got[differ[0]],
        want[differ[0]]
    );
}

#[test]
fn philox_uniforms_are_bit_identical_to_image_rng() {
    on_devices("philox uniforms", |dev| {
        let case = Case::new(11);
        let batch = case.batch(dev)?;
        for stream in [0, STREAM_INIT, STREAM_SCALE, STREAM_ESCAPE, 0xdead_beef] {
            let mut out = dev.alloc::<f32>(batch.total())?;
            dev.poison(&mut out)?;
            uniform_f32(dev, &batch, stream, &mut out)?;
            let got = dev.download(&out)?;
            for b in 0..3 {
                let want: Vec<f32> = (0..case.lens[b])
                    .map(|i| case.rngs[b].uniform(stream, i as u64))
                    .collect();
                assert_bits(
                    &format!("uniform stream {stream} image {b}"),
                    case.image(&got, b),
                    &want,
                );
            }
        }
        Ok(())
    });
}

#[test]
fn random_start_matches_attack_start() {
    on_devices("random start", |dev| {
        let case = Case::new(12);
        let batch = case.batch(dev)?;
        let clean = dev.upload(&case.clean)?;
        let mut x = dev.alloc::<f32>(batch.total())?;
        dev.poison(&mut x)?;
        random_start_f32(dev, &batch, &mut x, &clean)?;
        let got = dev.download(&x)?;
        for b in 0..3 {
            assert_bits(
                &format!("random start image {b}"),
                case.image(&got, b),
                &case.random_start(b),
            );
        }
        Ok(())
    });
}

/// The device-derived start of `prm attack --init random` against the attack's own host
/// computation ([`prm::attack::image::random_start`]), on odd sizes mixed in one batch (a single
/// pixel, one long thin image, sides that are no multiple of any block), bit for bit.
#[test]
fn random_start_kernel_matches_the_attack_on_odd_sizes() {
    on_devices("random start, odd sizes", |dev| {
        let shapes = [(45usize, 61usize), (197, 3), (1, 1), (13, 200)];
        let eps = [8.0 / 255.0, 16.0 / 255.0, 1.0 / 255.0, 0.5];
        let lens: Vec<usize> = shapes.iter().map(|(h, w)| 3 * h * w).collect();
        let rngs: Vec<ImageRng> = (0..shapes.len())
            .map(|i| ImageRng::new(77, &format!("odd/{i}.png")))
            .collect();
        let mut rng = Rng::new(31);
        // Pixels at and near both bounds, so both clamps of the projection are hit.
        let images: Vec<Vec<f32>> = lens
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|i| match i % 13 {
                        0 => 0.0,
                        1 => 1.0,
                        2 => 0.999,
                        _ => rng.unit(),
                    })
                    .collect()
            })
            .collect();
        let batch = ImageBatch::with_rngs(dev, &lens, &eps, &rngs)?;
        let clean = dev.upload(&images.concat())?;
        let mut x = dev.alloc::<f32>(batch.total())?;
        dev.poison(&mut x)?;
        random_start_f32(dev, &batch, &mut x, &clean)?;
        let got = dev.download(&x)?;
        let mut offset = 0;
        for (b, image) in images.iter().enumerate() {
            let want = random_start(image, &rngs[b], eps[b]);
            assert_bits(
                &format!("random start {:?}", shapes[b]),
                &got[offset..offset + lens[b]],
                &want,
            );
            offset += lens[b];
        }
        Ok(())
    });
}

/// PGD or MI-FGSM from a random start: an escape step, then `steps` gradient steps, against
/// one `Optimizer` per image.
fn sign_method(dev: &Device, kind: OptimizerKind, seed: u64) -> Result<(), GpuError> {
    let case = Case::new(seed);
    let batch = case.batch(dev)?;
    let mut settings = Preset::Pgd.settings();
    settings.optimizer = kind;
    settings.momentum = 0.9;
    let mut opts: Vec<Optimizer> = (0..3)
        .map(|b| {
            let mut s = settings.clone();
            s.eps = EPS[b];
            Optimizer::new(&s, case.image(&case.clean, b), &case.random_start(b))
        })
        .collect();
    let clean = dev.upload(&case.clean)?;
    let mut x = dev.alloc::<f32>(batch.total())?;
    dev.poison(&mut x)?;
    random_start_f32(dev, &batch, &mut x, &clean)?;
    let mut m = dev.alloc::<f32>(batch.total())?;
    let mut inv = dev.alloc::<f32>(3)?;
    escape_sign_step_f32(dev, &batch, &mut x, &clean, settings.step_size)?;
    for (b, opt) in opts.iter_mut().enumerate() {
        opt.escape_step(&case.signs(b));
    }
    let mut rng = Rng::new(seed + 100);
    for step in 0..4 {
        let g = case.grad(&mut rng);
        let gb = dev.upload(&g)?;
        match kind {
            OptimizerKind::Pgd => {
                pgd_step_f32(dev, &batch, &mut x, &clean, &gb, settings.step_size)?
            }
            _ => {
                dev.poison(&mut inv)?;
                mifgsm_step_f32(
                    dev,
                    &batch,
                    &mut x,
                    &mut m,
                    &clean,
                    &gb,
                    &mut inv,
                    settings.step_size,
                    settings.momentum,
                )?
            }
        }
        let got = dev.download(&x)?;
        for (b, opt) in opts.iter_mut().enumerate() {
            opt.step(case.image(&g, b));
            assert_bits(
                &format!("{kind:?} step {step} image {b}"),
                case.image(&got, b),
                &opt.image(),
            );
        }
    }
    Ok(())
}

#[test]
fn pgd_matches_optimizer() {
    on_devices("pgd", |dev| sign_method(dev, OptimizerKind::Pgd, 21));
}

#[test]
fn mifgsm_matches_optimizer() {
    on_devices("mifgsm", |dev| sign_method(dev, OptimizerKind::Mifgsm, 22));
}

/// AdamW from the zero start (escape step first, as the paper preset does) and from a random
/// start (no escape), several steps, against one `Optimizer` per image.
fn adamw(dev: &Device, seed: u64, escape: bool) -> Result<(), GpuError> {
    let case = Case::new(seed);
    let batch = case.batch(dev)?;
    let settings = Preset::Paper.settings();
    let starts: Vec<Vec<f32>> = (0..3)
        .map(|b| {
            if escape {
                case.image(&case.clean, b).to_vec()
            } else {
                case.random_start(b)
            }
        })
        .collect();
    let mut opts: Vec<Optimizer> = (0..3)
        .map(|b| {
            let mut s = settings.clone();
            s.eps = EPS[b];
            Optimizer::new(&s, case.image(&case.clean, b), &starts[b])
        })
        .collect();
    let clean = dev.upload(&case.clean)?;
    let start = dev.upload(&starts.concat())?;
    let mut delta = dev.alloc::<f32>(batch.total())?;
    dev.poison(&mut delta)?;
    adamw_init_f32(dev, &batch, &mut delta, &start, &clean)?;
    let mut m = dev.alloc::<f32>(batch.total())?;
    let mut v = dev.alloc::<f32>(batch.total())?;
    let mut x = dev.alloc::<f32>(batch.total())?;
    let lr255 = settings.lr * 255.0;
    let mut t = 0;
    if escape {
        t += 1;
        let s = AdamwScalars::new(lr255, settings.weight_decay, t);
        escape_adamw_f32(dev, &batch, &mut delta, s.decay, lr255)?;
        for (b, opt) in opts.iter_mut().enumerate() {
            opt.escape_step(&case.signs(b));
        }
    }
    let mut rng = Rng::new(seed + 200);
    for step in 0..5 {
        // Gradients large enough to push δ across the ε clamp within a few steps.
        let g: Vec<f32> = case.grad(&mut rng).iter().map(|v| v * 1e3).collect();
        let gb = dev.upload(&g)?;
        t += 1;
        let s = AdamwScalars::new(lr255, settings.weight_decay, t);
        adamw_step_f32(dev, &batch, &mut delta, &mut m, &mut v, &clean, &gb, s)?;
        dev.poison(&mut x)?;
        adamw_image_f32(dev, &batch, &mut x, &delta, &clean)?;
        let got = dev.download(&x)?;
        for (b, opt) in opts.iter_mut().enumerate() {
            opt.step(case.image(&g, b));
            assert_bits(
                &format!("adamw step {step} image {b}"),
                case.image(&got, b),
                &opt.image(),
            );
        }
    }
    Ok(())
}

#[test]
fn adamw_from_zero_start_with_escape_matches_optimizer() {
    on_devices("adamw escape", |dev| adamw(dev, 31, true));
}

#[test]
fn adamw_from_random_start_matches_optimizer() {
    on_devices("adamw random start", |dev| adamw(dev, 32, false));
}

#[test]
fn adamw_scalars_match_the_optimizer_formula() {
    let s = AdamwScalars::new(0.5, 0.01, 1);
    assert_eq!(s.decay, 1.0 - 0.5f32 * 0.01);
    assert_eq!(s.step, (0.5f64 / (1.0 - 0.9f32 as f64)) as f32);
    assert_eq!(s.bias2_sqrt, (1.0 - 0.999f32 as f64).sqrt() as f32);
}
