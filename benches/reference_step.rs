//! The CPU reference engine's cost of one PRM attack step (forward of the adversarial image,
//! loss, input-gradient backward) and of a forward alone, on built-in random architectures.
//!
//! Run: `cargo bench --bench reference_step` (add `-- vit-b-16` to pick one case).

use criterion::{criterion_group, criterion_main, Criterion};
use prm::attack::{Attack, Objective, Planar, Preset};
use prm::model::Model;
use prm::reference::ReferenceVit;
use prm::rng::ImageRng;

fn step(c: &mut Criterion, arch: &str, side: usize) {
    let model = Model::load(&format!("random:{arch}")).expect("built-in model");
    let engine = ReferenceVit::new(&model);
    let settings = Preset::Pgd.settings();
    let layers = settings
        .layers
        .resolve(model.config.feature_layers())
        .unwrap();
    let objective = Objective::new(settings.loss, layers, settings.tokens, &model).unwrap();
    let rng = ImageRng::new(0, "bench");
    let clean: Vec<f32> = (0..3 * side * side)
        .map(|i| rng.uniform(0, i as u64))
        .collect();
    let planar = Planar {
        data: &clean,
        height: side,
        width: side,
    };
    let attack = Attack::new(&engine, &objective, &settings, vec![(planar, rng)]).unwrap();
    let x = attack.start(0, None);
    let mut group = c.benchmark_group(format!("{arch}@{side}"));
    group.sample_size(10);
    group.bench_function("prm_step", |b| {
        b.iter(|| {
            attack
                .loss_and_gradient(std::slice::from_ref(&x), &[(side, side)])
                .unwrap()
        })
    });
    group.bench_function("forward", |b| {
        b.iter(|| engine.forward(&x, side, side, false))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    step(c, "tiny", 64);
    step(c, "vit-b-16", 224);
}

criterion_group!(reference, benches);
criterion_main!(reference);
