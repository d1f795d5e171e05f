//! Throughput measurement: whole attacks on synthetic images, timed end to end, and the GEMM
//! ceiling they are compared against (`prm bench`).
//!
//! An attack here is what `prm attack` does per batch in steady state minus file I/O,
//! quantisation and the final evaluation: upload, clean features, every step, and the download
//! of the adversarial images. An engine that stages uploads ([`Engine::stage`], the GPU engine
//! unless `PRM_NO_STAGING=1`) has each attack's batch staged ahead while the previous attack
//! runs, as `prm attack`'s workers stage the next batch; the staging's host time is inside the
//! timed attack that queued it. Timings are wall-clock around whole attacks, which end in a
//! device-to-host copy, so the device is idle at both ends. Inputs are random 8-bit levels,
//! never zeros (zeros can run faster than real data).

pub mod flops;

use std::time::Instant;

use rayon::prelude::*;

use crate::attack::engine::{Engine, EngineError, StageKey};
use crate::attack::image::{Attack, Planar};
use crate::attack::loss::Objective;
use crate::attack::settings::AttackSettings;
use crate::gpu::gemm::{matmul_bf16, MatmulShape};
use crate::gpu::{Device, GpuError};
use crate::reference::linalg::{matmul_nn, MatRef};
use crate::rng::{ImageRng, STREAM_INIT};

/// `count` random planar RGB images of `height × width` on 8-bit levels, seeded.
pub fn synthetic_images(count: usize, height: usize, width: usize, seed: u64) -> Vec<Vec<f32>> {
    (0..count)
        .map(|i| {
            let rng = ImageRng::new(seed, &format!("bench/{i}"));
            (0..3 * height * width)
                .into_par_iter()
                .map(|j| (rng.uniform(STREAM_INIT, j as u64) * 255.0).floor() / 255.0)
                .collect()
        })
        .collect()
}

/// The `run` of the bench's stage keys: far from the small counter campaigns number their
/// runs with, so a bench and a campaign in one process never share a key.
const STAGE_RUN: u64 = 0xbe9c_0000_0000_0000;

/// What one timed attack did.
#[derive(Clone, Debug)]
pub struct AttackTiming {
    pub seconds: f64,
    /// The phases of `seconds`: clean features (with the batch's upload), the start points
    /// (host), and every step with the download of the results.
    pub clean_seconds: f64,
    pub start_seconds: f64,
    pub steps_seconds: f64,
    /// FLOPs of the attack by the analytic count ([`flops`]): the clean forward at each
    /// image's evaluation size, and per step the forward + input-gradient backward at the
    /// step's working sizes, plus the clean forward again where a step's size differs (dynamic
    /// scale recomputes clean features at the step's scale).
    pub flops: f64,
}

/// Runs `warmup + repeats` whole attacks of `images` (each `height × width`) and returns the
/// timed ones. `after_step` runs after every engine step (a memory sampler, say).
#[allow(clippy::too_many_arguments)]
pub fn time_attacks<E: Engine>(
    engine: &E,
    objective: &Objective,
    settings: &AttackSettings,
    images: &[Vec<f32>],
    height: usize,
    width: usize,
    warmup: usize,
    repeats: usize,
    mut after_step: impl FnMut(),
) -> Result<Vec<AttackTiming>, EngineError> {
    let config = &engine.model().config;
    let mut timings = Vec::with_capacity(repeats);
    let stages = engine.stages_uploads();
    let planars: Vec<Planar> = images
        .iter()
        .map(|data| Planar {
            data,
            height,
            width,
        })
        .collect();
    // One key per round, so that a round can only ever take its own staged upload.
    let key = |round: usize| StageKey {
        run: STAGE_RUN ^ round as u64,
        images: (0..images.len()).collect(),
    };
    if stages {
        engine.stage(&key(0), &planars);
    }
    for round in 0..warmup + repeats {
        let targets: Vec<(Planar, ImageRng)> = planars
            .iter()
            .enumerate()
            .map(|(i, &planar)| (planar, ImageRng::new(settings.seed, &format!("bench/{i}"))))
            .collect();
        let start = Instant::now();
        let mut attack = Attack::new(engine, objective, settings, targets)?;
        if stages {
            attack.staged_as(key(round));
            if round + 1 < warmup + repeats {
                engine.stage(&key(round + 1), &planars);
            }
        }
        // Else the first step would compute them, and their time would count as the steps'.
        attack.compute_clean_features()?;
        let clean_seconds = start.elapsed().as_secs_f64();
        let starts = attack.starts(&vec![None; attack.len()]);
        let start_seconds = start.elapsed().as_secs_f64() - clean_seconds;
        let outcomes = attack.run_from(starts, |_| after_step())?;
        let seconds = start.elapsed().as_secs_f64();
        let steps_seconds = seconds - clean_seconds - start_seconds;
        assert_eq!(outcomes.len(), images.len());
        if round >= warmup {
            let eval = attack.eval_sizes();
            let mut total: f64 = eval
                .iter()
                .map(|&(h, w)| flops::forward_flops(config, h, w))
                .sum();
            // The steps run the blocks the loss reads; the clean features at the evaluation
            // geometry are every layer's (the evaluation reports them all).
            let blocks = objective.blocks_needed();
            for step in 0..settings.steps {
                for (&(h, w), &e) in attack.step_sizes(step).iter().zip(&eval) {
                    total += flops::step_flops_through(config, blocks, h, w);
                    if (h, w) != e {
                        total += flops::forward_flops_through(config, blocks, h, w);
                    }
                }
            }
            timings.push(AttackTiming {
                seconds,
                clean_seconds,
                start_seconds,
                steps_seconds,
                flops: total,
            });
        }
    }
    Ok(timings)
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// The matrix-product ceiling in TFLOP/s, measured now: on CUDA a bf16 cuBLASLt product of
/// 8192³ (fp32 accumulation), the median of 10 after 3 warm-ups; on the CPU (`None`) the
/// reference engine's f32 GEMM at 1024³. The simulator has no meaningful ceiling: `None`.
pub fn gemm_ceiling_tflops(device: Option<&Device>) -> Result<Option<f64>, GpuError> {
    match device {
        Some(dev) if dev.is_sim() => Ok(None),
        Some(dev) => {
            let n = 8192;
            let rng = ImageRng::new(0, "bench/gemm");
            let random: Vec<half::bf16> = (0..n * n)
                .map(|j| half::bf16::from_f32(rng.uniform(STREAM_INIT, j as u64) - 0.5))
                .collect();
            let a = dev.upload(&random)?;
            let b = dev.upload(&random)?;
            let mut c = dev.alloc::<f32>(n * n)?;
            let shape = MatmulShape {
                m: n,
                n,
                k: n,
                b_transposed: true,
            };
            let mut times = Vec::new();
            for i in 0..13 {
                dev.synchronize()?;
                let t = Instant::now();
                matmul_bf16(dev, shape, &a, &b, None, &mut c, false)?;
                dev.synchronize()?;
                if i >= 3 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            Ok(Some(2.0 * (n as f64).powi(3) / median(&times) / 1e12))
        }
        None => {
            let n = 1024;
            let rng = ImageRng::new(0, "bench/gemm");
            let a: Vec<f32> = (0..n * n)
                .map(|j| rng.uniform(STREAM_INIT, j as u64) - 0.5)
                .collect();
            let mut c = vec![0.0f32; n * n];
            let mut times = Vec::new();
            for i in 0..8 {
                let t = Instant::now();
                matmul_nn(MatRef::new(&a, n, n), MatRef::new(&a, n, n), &mut c, false);
                if i >= 2 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            Ok(Some(2.0 * (n as f64).powi(3) / median(&times) / 1e12))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_images_are_seeded_8_bit_levels_and_not_flat() {
        let a = synthetic_images(2, 5, 7, 1);
        assert_eq!(a, synthetic_images(2, 5, 7, 1));
        assert_ne!(a[0], a[1]);
        assert!(a[0]
            .iter()
            .all(|&v| (0.0..=1.0).contains(&v) && (v * 255.0 - (v * 255.0).round()).abs() < 1e-4));
        assert!(a[0].iter().any(|&v| v > 0.5) && a[0].iter().any(|&v| v < 0.5));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
