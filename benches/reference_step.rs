//! The CPU reference engine's cost of one PRM attack step (forward of the adversarial image,
//! loss, input-gradient backward) and of a forward alone, on built-in random architectures; and
//! of SigLIP's attention-pooling head (the embed loss's image embedding, forward and backward),
//! which the GPU engine also runs on the host, for a batch of images.
//!
//! Run: `cargo bench --bench reference_step` (add `-- vit-b-16` to pick one case).

use criterion::{criterion_group, criterion_main, Criterion};
use prm::attack::{Attack, Objective, Planar, Preset};
use prm::model::Model;
use prm::reference::pooling::pooled_embeddings;
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

/// The pooling head alone on `images` images' F_L (random values), embeddings and gradient.
fn pooling_head(c: &mut Criterion, arch: &str, side: usize, images: usize) {
    let model = Model::load(&format!("random:{arch}")).expect("built-in model");
    let cfg = &model.config;
    let tokens = cfg.tokens(side / cfg.patch, side / cfg.patch);
    let rng = ImageRng::new(0, "bench-pooling");
    let last: Vec<Vec<f32>> = (0..images)
        .map(|i| {
            (0..tokens * cfg.width)
                .map(|j| rng.uniform(i as u32, j as u64) - 0.5)
                .collect()
        })
        .collect();
    let last: Vec<&[f32]> = last.iter().map(Vec::as_slice).collect();
    let d_embed = vec![1e-3f32; images * cfg.width];
    let mut group = c.benchmark_group(format!("{arch}@{side}x{images}"));
    group.sample_size(10);
    group.bench_function("pooling_head", |b| {
        b.iter(|| {
            let e = pooled_embeddings(&model, &last).unwrap();
            e.backward(&model, &last, &d_embed)
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    step(c, "tiny", 64);
    step(c, "vit-b-16", 224);
    pooling_head(c, "siglip-b-16", 224, 64);
    pooling_head(c, "siglip-so400m-14-384", 384, 16);
}

criterion_group!(reference, benches);
criterion_main!(reference);
