//! What the GPU engine no longer copies per batch: starts derived on the device from the clean
//! images (`--init random|zero`) and clean images staged ahead on a copy stream. Both must give
//! byte-identical adversarial images to the plain uploads they replace. Runs in the simulator,
//! and on a GPU when one is present.

mod common;

use common::{small_model, Draw};
use prm::attack::image::Starts;
use prm::attack::*;
use prm::gpu::engine::GpuVit;
use prm::gpu::Device;
use prm::model::Activation;
use prm::rng::ImageRng;

fn devices() -> Vec<Device> {
    let mut d = vec![Device::sim()];
    if Device::cuda_available() {
        d.push(Device::cuda(0).expect("CUDA device"));
    } else {
        eprintln!("skipped on CUDA: no CUDA device");
    }
    d
}

/// Mixed sizes, sides no multiple of the patch.
fn batch(d: &mut Draw) -> Vec<(Vec<f32>, usize, usize)> {
    [(27usize, 45usize), (32, 32), (41, 23)]
        .iter()
        .map(|&(h, w)| (d.vec(3 * h * w, 0.0, 1.0), h, w))
        .collect()
}

fn images(clean: &[(Vec<f32>, usize, usize)]) -> Vec<(Planar<'_>, ImageRng)> {
    clean
        .iter()
        .enumerate()
        .map(|(i, (x, h, w))| {
            (
                Planar {
                    data: x,
                    height: *h,
                    width: *w,
                },
                ImageRng::new(9, &format!("img{i}")),
            )
        })
        .collect()
}

#[test]
fn device_derived_starts_give_the_same_images_as_uploaded_starts() {
    let model = small_model(64, 2, 2, 8, 4, Activation::Gelu, 5);
    let mut d = Draw::new(8);
    let clean = batch(&mut d);
    for dev in devices() {
        let gpu = GpuVit::new(&dev, &model).unwrap();
        for (optimizer, init, loss) in [
            (OptimizerKind::Pgd, Init::Random, LossKind::Prm),
            (OptimizerKind::Mifgsm, Init::Random, LossKind::Nrd),
            (OptimizerKind::Adamw, Init::Random, LossKind::Prm),
            (OptimizerKind::Adamw, Init::Zero, LossKind::Prm),
            // A zero start that is no stationary point: no escape step.
            (OptimizerKind::Pgd, Init::Zero, LossKind::Dr),
        ] {
            let settings = AttackSettings {
                optimizer,
                init: init.clone(),
                loss,
                steps: 3,
                dynamic_scale: None,
                resolution: Resolution::Native,
                step_size: 1.0 / 255.0,
                lr: 2.0 / 255.0,
                ..Preset::Pgd.settings()
            };
            let layers = LayerSelection::All
                .resolve(model.config.feature_layers())
                .unwrap();
            let obj = Objective::new(loss, layers, TokenSelection::All, &model).unwrap();
            let attack = Attack::new(&gpu, &obj, &settings, images(&clean)).unwrap();
            let derived = attack.starts(&[None, None, None]);
            assert!(
                derived.derived().is_some(),
                "{init:?}: starts should follow from the clean images"
            );
            let uploaded = Starts::given(derived.images().to_vec());
            let a = attack.run_from(uploaded, |_| {}).unwrap();
            let b = attack.run_from(derived, |_| {}).unwrap();
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&a.adversarial),
                    bits(&b.adversarial),
                    "{} {optimizer:?} {init:?} {loss:?} image {i}: derived start differs",
                    dev.name()
                );
                assert_eq!(a.loss_initial.to_bits(), b.loss_initial.to_bits());
            }
        }
    }
}
