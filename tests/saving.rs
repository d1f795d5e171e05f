//! An attacked batch finished on the device (`Attack::run_and_save` on the GPU engine): the
//! final images quantised within ε there, only their 8-bit levels read back, and the saved
//! images evaluated where they are. It must save and measure exactly what quantising and
//! evaluating on the host saves and measures: the same levels, L∞, loss and layer cosines, bit
//! for bit. Runs in the simulator, and on a GPU when one is present.

use crate::common;

use common::{attack_images, devices, small_model, Draw};
use prm::attack::*;
use prm::gpu::engine::{GpuVit, Precision};
use prm::gpu::Device;
use prm::io::quantize_for_saving;
use prm::model::{Activation, Model};
use prm::rng::ImageRng;

/// Mixed sizes, sides no multiple of the patch; clean values on the 8-bit grid, as decoded.
fn batch(d: &mut Draw) -> Vec<(Vec<f32>, usize, usize)> {
    [(27usize, 45usize), (32, 32), (41, 23)]
        .iter()
        .map(|&(h, w)| {
            let x = d
                .vec(3 * h * w, 0.0, 1.0)
                .into_iter()
                .map(|v| (v * 255.0).round() / 255.0)
                .collect();
            (x, h, w)
        })
        .collect()
}

fn images(clean: &[(Vec<f32>, usize, usize)]) -> Vec<(Planar<'_>, ImageRng)> {
    attack_images(clean, 3)
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The settings the device path must cover: the default preset, a fixed resolution (resizes
/// on both sides), the paper's AdamW under dynamic scale from a zero start (escape step, and
/// the initial loss measured apart from the steps), MI-FGSM with a per-image loss on the host
/// (`embed`), and a radius off the 8-bit grid.
fn cases() -> Vec<(&'static str, AttackSettings)> {
    let pgd = Preset::Pgd.settings();
    vec![
        (
            "pgd native",
            AttackSettings {
                steps: 3,
                resolution: Resolution::Native,
                ..pgd.clone()
            },
        ),
        (
            "pgd fixed 24",
            AttackSettings {
                steps: 2,
                resolution: Resolution::Fixed(24),
                ..pgd.clone()
            },
        ),
        (
            "paper, zero start",
            AttackSettings {
                steps: 3,
                init: Init::Zero,
                ..Preset::Paper.settings()
            },
        ),
        (
            "mifgsm embed",
            AttackSettings {
                steps: 2,
                optimizer: OptimizerKind::Mifgsm,
                loss: LossKind::Embed,
                resolution: Resolution::Native,
                ..pgd.clone()
            },
        ),
        (
            "eps off the grid",
            AttackSettings {
                steps: 2,
                eps: 0.0123,
                resolution: Resolution::Native,
                ..pgd
            },
        ),
    ]
}

fn check(dev: &Device, model: &Model, precision: Precision, clean: &[(Vec<f32>, usize, usize)]) {
    let gpu = GpuVit::new_with_precision(dev, model, precision).unwrap();
    for (name, settings) in cases() {
        let what = format!("{} {precision:?} {name}", dev.name());
        let layers = LayerSelection::All
            .resolve(model.config.feature_layers())
            .unwrap();
        let obj = Objective::new(settings.loss, layers, TokenSelection::All, model).unwrap();
        // The host's way: the final floats read back, quantised and evaluated on the host.
        let host = Attack::new(&gpu, &obj, &settings, images(clean)).unwrap();
        let outcomes = host.run_from(host.starts(&[None; 3]), |_| {}).unwrap();
        let saved: Vec<_> = outcomes
            .iter()
            .zip(clean)
            .map(|(o, (c, _, _))| quantize_for_saving(&o.adversarial, c, settings.eps))
            .collect();
        let values: Vec<Vec<f32>> = saved.iter().map(|s| s.values.clone()).collect();
        let evaluations = host.evaluate(&values).unwrap();

        for keep_float in [false, true] {
            let device = Attack::new(&gpu, &obj, &settings, images(clean)).unwrap();
            dev.start_timeline().unwrap();
            let (got, phases) = device
                .run_and_save(device.starts(&[None; 3]), keep_float, |_| {})
                .unwrap();
            let t = dev.finish_timeline().unwrap();
            assert!(
                t.ops.iter().any(|o| o.label == "prm_save_quantize_f32"),
                "{what}: not quantised on the device"
            );
            assert!(phases.quantize_seconds > 0.0 && phases.evaluate_seconds > 0.0);
            for (i, (g, ((o, s), e))) in got
                .iter()
                .zip(outcomes.iter().zip(&saved).zip(&evaluations))
                .enumerate()
            {
                let what = format!("{what} keep_float {keep_float} image {i}");
                assert_eq!(g.levels, s.levels, "{what}: levels");
                assert_eq!(g.linf_255.to_bits(), s.linf_255.to_bits(), "{what}: L∞");
                assert_eq!(
                    g.evaluation.loss.to_bits(),
                    e.loss.to_bits(),
                    "{what}: final loss {} against {}",
                    g.evaluation.loss,
                    e.loss
                );
                assert_eq!(
                    bits(&g.evaluation.layer_cosine),
                    bits(&e.layer_cosine),
                    "{what}: layer cosines"
                );
                assert_eq!(
                    g.loss_initial.to_bits(),
                    o.loss_initial.to_bits(),
                    "{what}: initial loss"
                );
                match &g.adversarial {
                    Some(a) => {
                        assert!(keep_float, "{what}: floats read back unasked");
                        let f32_bits =
                            |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(f32_bits(a), f32_bits(&o.adversarial), "{what}: floats");
                    }
                    None => assert!(!keep_float, "{what}: floats missing"),
                }
            }
        }
    }
}

#[test]
fn saving_on_the_device_saves_and_measures_what_the_host_does() {
    let model = small_model(64, 1, 2, 8, 4, Activation::QuickGelu, 5);
    let mut d = Draw::new(31);
    let clean = batch(&mut d);
    for dev in devices() {
        for precision in [Precision::Fp32, Precision::Bf16] {
            check(&dev, &model, precision, &clean);
        }
    }
}
