//! `prm eval` gives the device several images at once: the GPU engine packs a batch into one
//! pass (or several, of at most a token budget each). On the simulator a product row gets the
//! same bits whatever the row count, so each image must get the bits it gets alone, for every
//! target, in fp32 and bf16, whatever the batch and however it is cut into passes. On CUDA
//! (gpu-check) the same is asked of batch-invariant products (`--batch-invariant`).

use std::path::PathBuf;

use prm::attack::image::Planar;
use prm::eval::gpu::GpuTargets;
use prm::eval::targets::DenseHead;
use prm::eval::{EvalEngine, EvalError, ReferenceTargets};
use prm::gpu::engine::Precision;
use prm::gpu::Device;
use prm::model::{AttentionPoolHead, LayerNormWeights, Linear, Model};

/// Mixed sizes for random:tiny (patch 16): 197 tokens (224²), sides that are not multiples of
/// the patch, a single-patch image.
const SIZES: [(usize, usize); 6] = [
    (224, 224),
    (45, 61),
    (33, 17),
    (100, 64),
    (16, 16),
    (70, 50),
];

fn pixels(seed: u64, len: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// Planar pixels for each of [`SIZES`], image i drawn from seed `seed + i`.
fn size_pixels(seed: u64) -> Vec<Vec<f32>> {
    SIZES
        .iter()
        .enumerate()
        .map(|(i, (h, w))| pixels(seed + i as u64, 3 * h * w))
        .collect()
}

fn images(data: &[Vec<f32>]) -> Vec<Planar<'_>> {
    SIZES
        .iter()
        .zip(data)
        .map(|(&(height, width), data)| Planar {
            data,
            height,
            width,
        })
        .collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The simulator, and CUDA device 0 when there is one, each with batch-invariant products (on
/// the simulator a row's bits never depend on the batch; on CUDA they do unless asked).
fn devices() -> Vec<Device> {
    let mut devices = vec![Device::sim()];
    if Device::cuda_available() {
        devices.push(Device::cuda(0).expect("CUDA device 0"));
    } else {
        println!("no CUDA device: the simulator only");
    }
    for dev in &devices {
        dev.set_product_algorithms(prm::gpu::ProductAlgorithms::BatchInvariant);
    }
    devices
}

/// Every batched method against the single-image one, image by image. Each batch call names
/// the same images as the next call's (a GPU engine stages them ahead, and the next batch call
/// takes them: the single-image calls in between stage nothing).
fn check_batch_against_alone(engine: &dyn EvalEngine, images: &[Planar], what: &str) {
    let layers = engine.model().config.layers;
    for head in [DenseHead::MaskClip, DenseHead::Sclip, DenseHead::ClearClip] {
        let batch = engine.dense_embeddings_batch(images, images, head).unwrap();
        assert_eq!(batch.len(), images.len());
        for (k, (b, im)) in batch.iter().zip(images).enumerate() {
            let alone = engine.dense_embeddings(im, head).unwrap();
            assert_eq!(
                (b.grid_h, b.grid_w, b.dim),
                (alone.grid_h, alone.grid_w, alone.dim)
            );
            assert!(
                same_bits(&b.rows, &alone.rows),
                "{what}: {head:?}, image {k}"
            );
        }
    }
    let batch = engine.image_embedding_batch(images, images).unwrap();
    for (k, (b, im)) in batch.iter().zip(images).enumerate() {
        let alone = engine.image_embedding(im).unwrap();
        assert!(same_bits(b, &alone), "{what}: image embedding {k}");
    }
    let batch = engine.features_batch(images, images).unwrap();
    for (k, (b, im)) in batch.iter().zip(images).enumerate() {
        let alone = engine.features(im).unwrap();
        assert_eq!(b.len(), layers + 1);
        for (l, (x, y)) in b.iter().zip(&alone).enumerate() {
            assert!(same_bits(x, y), "{what}: F_{l} of image {k}");
        }
    }
    for layer in [0, 1, layers] {
        let batch = engine.layer_features_batch(images, images, layer).unwrap();
        for (k, (b, im)) in batch.iter().zip(images).enumerate() {
            let alone = engine.layer_features(im, layer).unwrap();
            assert!(same_bits(b, &alone), "{what}: F_{layer} alone, image {k}");
        }
    }
}

#[test]
fn a_batch_gives_each_image_the_bits_it_gets_alone() {
    let model = Model::load("random:tiny").unwrap();
    let data = size_pixels(1);
    let images = images(&data);
    for dev in devices() {
        for precision in [Precision::Fp32, Precision::Bf16] {
            // One pass; passes of about two images; one image a pass (the 197-token image
            // alone is over the budget, and still runs).
            for pass_tokens in [usize::MAX, 60, 1] {
                let gpu = GpuTargets::new(&dev, &model, precision)
                    .unwrap()
                    .with_pass_tokens(pass_tokens);
                let what = format!("{}, {precision:?}, passes of {pass_tokens}", dev.name());
                check_batch_against_alone(&gpu, &images, &what);
                let uploads = gpu.pass_uploads();
                assert!(
                    uploads.taken > 0,
                    "{what}: nothing staged was taken: {uploads:?}"
                );
            }
        }
    }
    // The reference engine's batch is its images one after another.
    check_batch_against_alone(&ReferenceTargets::new(&model), &images, "reference");
}

/// The next batch's pixels, staged while a batch computes, are taken by a pass only when they
/// are the very same pixels: not by the same host memory rewritten in place after staging (the
/// hazard an address-based key would have), whatever the `next` hint said. Every result equals
/// an engine's that stages nothing.
#[test]
fn staged_pixels_are_taken_only_by_a_pass_of_the_same_pixels() {
    let model = Model::load("random:tiny").unwrap();
    let (a, b) = (size_pixels(1), size_pixels(100));
    for dev in devices() {
        let plain = GpuTargets::new(&dev, &model, Precision::Fp32).unwrap();
        plain.set_staging(false);
        let head = DenseHead::MaskClip;
        let want = |data: &[Vec<f32>]| plain.dense_embeddings_batch(&images(data), &[], head);
        let rows = |r: Vec<prm::eval::targets::TokenEmbeddings>| -> Vec<Vec<f32>> {
            r.into_iter().map(|e| e.rows).collect()
        };
        let same = |x: Vec<Vec<f32>>, y: Vec<Vec<f32>>| {
            x.len() == y.len() && x.iter().zip(&y).all(|(p, q)| same_bits(p, q))
        };

        let gpu = GpuTargets::new(&dev, &model, Precision::Fp32).unwrap();
        let got = gpu
            .dense_embeddings_batch(&images(&a), &images(&b), head)
            .unwrap();
        assert!(same(rows(got), rows(want(&a).unwrap())), "{}", dev.name());
        let got = gpu.dense_embeddings_batch(&images(&b), &[], head).unwrap();
        assert!(same(rows(got), rows(want(&b).unwrap())), "{}", dev.name());
        let u = gpu.pass_uploads();
        assert_eq!((u.passes, u.staged, u.taken), (2, 1, 1), "{}", dev.name());

        // Staged, then the host memory is rewritten in place: the pass must not take it.
        let mut c = b.clone();
        gpu.dense_embeddings_batch(&images(&a), &images(&c), head)
            .unwrap();
        c[3][7] += 0.25;
        let got = gpu.dense_embeddings_batch(&images(&c), &[], head).unwrap();
        assert!(same(rows(got), rows(want(&c).unwrap())), "{}", dev.name());
        let u = gpu.pass_uploads();
        assert_eq!((u.passes, u.staged, u.taken), (4, 2, 1), "{}", dev.name());

        // Passes of a batch: each pass stages the next one.
        let gpu = GpuTargets::new(&dev, &model, Precision::Fp32)
            .unwrap()
            .with_pass_tokens(60);
        let got = gpu.dense_embeddings_batch(&images(&a), &[], head).unwrap();
        assert!(same(rows(got), rows(want(&a).unwrap())), "{}", dev.name());
        let u = gpu.pass_uploads();
        assert!(u.passes >= 2, "{u:?}");
        assert_eq!(
            (u.staged, u.taken),
            (u.passes - 1, u.passes - 1),
            "{}",
            dev.name()
        );
    }
}

/// The features target's drift sums, computed on the device for (clean, adversarial) pairs,
/// are the host's sums of the features each image gets alone, bit for bit, however the batch
/// is cut into passes (a pair is never split); a batch that is not pairs of one size is refused.
#[test]
fn drift_sums_of_a_batch_are_the_host_sums_of_each_pair_alone() {
    use prm::eval::ops::token_sums;
    let model = Model::load("random:tiny").unwrap();
    let (clean, adv): (Vec<Vec<f32>>, Vec<Vec<f32>>) = SIZES
        .iter()
        .enumerate()
        .map(|(i, (h, w))| {
            (
                pixels(i as u64 + 1, 3 * h * w),
                pixels(i as u64 + 50, 3 * h * w),
            )
        })
        .unzip();
    let (clean, adv) = (images(&clean), images(&adv));
    let pairs: Vec<Planar> = clean.iter().zip(&adv).flat_map(|(c, a)| [*c, *a]).collect();
    let dim = model.config.width;
    for dev in devices() {
        for pass_tokens in [usize::MAX, 60, 1] {
            let gpu = GpuTargets::new(&dev, &model, Precision::Fp32)
                .unwrap()
                .with_pass_tokens(pass_tokens);
            let what = format!("{}, passes of {pass_tokens}", dev.name());
            let sums = gpu.feature_sums_batch(&pairs, &pairs).unwrap();
            assert_eq!(sums.len(), SIZES.len(), "{what}");
            for (k, (pair_sums, (c, a))) in sums.iter().zip(clean.iter().zip(&adv)).enumerate() {
                let (fc, fa) = (gpu.features(c).unwrap(), gpu.features(a).unwrap());
                assert_eq!(pair_sums.len(), fc.len(), "{what}: layers of pair {k}");
                for (l, (got, (lc, la))) in pair_sums.iter().zip(fc.iter().zip(&fa)).enumerate() {
                    assert!(
                        got == &token_sums(la, lc, dim),
                        "{what}: pair {k}, layer {l}"
                    );
                }
            }
        }
        let gpu = GpuTargets::new(&dev, &model, Precision::Fp32).unwrap();
        let odd = gpu.feature_sums_batch(&pairs[..3], &[]);
        assert!(matches!(odd, Err(EvalError::Usage(_))), "{}", dev.name());
        let mismatched = gpu.feature_sums_batch(&pairs[1..3], &[]);
        assert!(
            matches!(mismatched, Err(EvalError::Usage(_))),
            "{}",
            dev.name()
        );
    }
    // The reference engine's default: the host's sums of its own features.
    let reference = ReferenceTargets::new(&model);
    let sums = reference.feature_sums_batch(&pairs[..4], &[]).unwrap();
    let (fc, fa) = (
        reference.features(&clean[1]).unwrap(),
        reference.features(&adv[1]).unwrap(),
    );
    assert!(sums[1][2] == token_sums(&fa[2], &fc[2], dim));
}

#[test]
fn a_batch_with_an_image_smaller_than_a_patch_fails_and_names_it() {
    let model = Model::load("random:tiny").unwrap();
    let dev = Device::sim();
    let gpu = GpuTargets::new(&dev, &model, Precision::Fp32).unwrap();
    let (big, small) = (pixels(1, 3 * 32 * 32), pixels(2, 3 * 12 * 40));
    let images = [
        Planar {
            data: &big,
            height: 32,
            width: 32,
        },
        Planar {
            data: &small,
            height: 12,
            width: 40,
        },
    ];
    match gpu.dense_embeddings_batch(&images, &[], DenseHead::MaskClip) {
        Err(EvalError::ImageTooSmall { width, height, .. }) => {
            assert_eq!((width, height), (40, 12))
        }
        other => panic!("expected ImageTooSmall, got {:?}", other.map(|v| v.len())),
    }
    assert!(gpu.image_embedding_batch(&[], &[]).unwrap().is_empty());
}

/// The reference engine, whose batched features fail with the error `fault` gives for the
/// call's images (and its index among the calls).
struct Faulty<'m, F> {
    inner: ReferenceTargets<'m>,
    fault: F,
    calls: std::sync::atomic::AtomicUsize,
}

impl<'m, F: Fn(&[Planar], usize) -> Option<EvalError> + Sync> Faulty<'m, F> {
    fn new(model: &'m Model, fault: F) -> Self {
        Faulty {
            inner: ReferenceTargets::new(model),
            fault,
            calls: Default::default(),
        }
    }
}

impl<F: Fn(&[Planar], usize) -> Option<EvalError> + Sync> EvalEngine for Faulty<'_, F> {
    fn model(&self) -> &Model {
        self.inner.model()
    }
    fn dense_embeddings(
        &self,
        image: &Planar,
        head: DenseHead,
    ) -> Result<prm::eval::targets::TokenEmbeddings, EvalError> {
        self.inner.dense_embeddings(image, head)
    }
    fn image_embedding(&self, image: &Planar) -> Result<Vec<f32>, EvalError> {
        self.inner.image_embedding(image)
    }
    fn features(&self, image: &Planar) -> Result<Vec<Vec<f32>>, EvalError> {
        self.inner.features(image)
    }
    fn features_batch(
        &self,
        images: &[Planar],
        _next: &[Planar],
    ) -> Result<Vec<Vec<Vec<f32>>>, EvalError> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(e) = (self.fault)(images, call) {
            return Err(e);
        }
        images.iter().map(|im| self.inner.features(im)).collect()
    }
}

/// Clean images of every size in `SIZES` under `root/clean`, and adversarial ones (the clean
/// one with its first row darkened) under `root/adv`.
fn write_pairs(root: &std::path::Path) -> (PathBuf, PathBuf) {
    let (clean, adv) = (root.join("clean"), root.join("adv"));
    std::fs::create_dir_all(&clean).unwrap();
    std::fs::create_dir_all(&adv).unwrap();
    for (i, &(h, w)) in SIZES.iter().enumerate() {
        let px = pixels(i as u64 + 7, 3 * h * w);
        let im = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let at = |c: usize| (px[(c * h + y as usize) * w + x as usize] * 255.0) as u8;
            image::Rgb([at(0), at(1), at(2)])
        });
        im.save(clean.join(format!("img{i}.png"))).unwrap();
        let mut a = im.clone();
        for x in 0..w as u32 {
            a.put_pixel(x, 0, image::Rgb([0, 0, 0]));
        }
        a.save(adv.join(format!("img{i}.png"))).unwrap();
    }
    (clean, adv)
}

/// The features target on `random:tiny` on the CPU, `batch_size` pairs a batch.
fn features_settings(batch_size: usize) -> prm::eval::run::EvalSettings {
    prm::eval::run::EvalSettings {
        target: prm::eval::TargetKind::Features,
        resolution: None,
        ignore_index: 255,
        labels: None,
        save_predictions: None,
        pictures: None,
        probe: None,
        exclude: Vec::new(),
        max_pixels: prm::io::DEFAULT_MAX_PIXELS,
        batch_size,
        product_algorithms: None,
        weights: None,
        model_spec: "random:tiny".into(),
        weights_random: true,
        device: "cpu".into(),
        precision: "fp32".into(),
    }
}

#[test]
fn a_batch_that_fails_as_a_whole_is_run_again_pair_by_pair() {
    use prm::eval::run::evaluate;
    let t = tempfile::tempdir().unwrap();
    let (clean, adv) = write_pairs(t.path());
    let model = Model::load("random:tiny").unwrap();
    // Batches of more than one pair (two images) are refused, with an error that is not the
    // device's memory: the evaluation runs such a batch again pair by pair, counts it, and
    // every record is the one batch 1 gives.
    let engine = Faulty::new(&model, |images: &[Planar], _| {
        (images.len() > 2).then(|| EvalError::Usage("one pair at a time".into()))
    });
    let run = |batch| {
        evaluate(
            &engine,
            &clean,
            &adv,
            None,
            &features_settings(batch),
            |_, _| {},
        )
        .unwrap()
    };
    let (one, four) = (run(1), run(4));
    assert_eq!(one.batches_rerun_alone, 0);
    assert!(four.batches_rerun_alone > 0);
    assert_eq!(four.report["batches_rerun_alone"], four.batches_rerun_alone);
    assert_eq!((one.failed, four.failed), (0, 0));
    assert_eq!(one.report["per_image"], four.report["per_image"]);
    assert_eq!(one.report["layers"], four.report["layers"]);
}

/// A device that fails for good stops the evaluation with an error naming the cause, instead
/// of failing every remaining pair on it (one by one, after each batch's retry) into a report.
#[test]
fn a_device_that_fails_for_good_stops_the_evaluation() {
    use prm::eval::run::evaluate;
    let t = tempfile::tempdir().unwrap();
    let (clean, adv) = write_pairs(t.path());
    let model = Model::load("random:tiny").unwrap();
    // The device fails for good (a fault that ends the CUDA context) from its second batch on.
    let engine = Faulty::new(&model, |_: &[Planar], call| {
        (call >= 1).then(|| {
            prm::gpu::GpuError::Cuda {
                context: "copy to host".into(),
                message: "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered"
                    .into(),
            }
            .into()
        })
    });
    match evaluate(
        &engine,
        &clean,
        &adv,
        None,
        &features_settings(1),
        |_, _| {},
    ) {
        Err(e @ EvalError::DeviceLost(_)) => {
            let text = e.to_string();
            assert!(text.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{text}");
            assert!(text.contains("--device"), "{text}");
        }
        Err(other) => panic!("expected DeviceLost, got {other}"),
        Ok(outcome) => panic!("the evaluation went on: {} failed", outcome.failed),
    }
}

/// The GPU engine forms the cosine logits on its device (`kernels/class_logits.cu`): they are
/// the host's logits of the embeddings it would otherwise bring back, bit for bit, for every
/// dense head and the image embedding, in fp32 and bf16, whatever the passes; other classes in
/// a later call are uploaded, not the first ones reused.
#[test]
fn logits_formed_on_the_device_are_the_host_logits_of_its_embeddings() {
    use prm::eval::ops::{dot_logits, normalize_rows};
    let model = Model::load("random:tiny").unwrap();
    let e = model
        .config
        .embed_dim
        .expect("random:tiny has a projection");
    let class_set = |seed: u64, count: usize| {
        let mut c: Vec<f32> = pixels(seed, count * e).iter().map(|v| v - 0.5).collect();
        normalize_rows(&mut c, e);
        c
    };
    let (first, second) = (class_set(7, 13), class_set(8, 5));
    let data = size_pixels(1);
    let images = images(&data);
    for dev in devices() {
        for precision in [Precision::Fp32, Precision::Bf16] {
            for pass_tokens in [usize::MAX, 60, 1] {
                let gpu = GpuTargets::new(&dev, &model, precision)
                    .unwrap()
                    .with_pass_tokens(pass_tokens);
                assert!(gpu.forms_logits());
                let what = format!("{}, {precision:?}, passes of {pass_tokens}", dev.name());
                for (head, classes) in [
                    (DenseHead::MaskClip, &first),
                    (DenseHead::Sclip, &second),
                    (DenseHead::ClearClip, &first),
                ] {
                    let logits = gpu
                        .dense_logits_batch(&images, &images, head, classes)
                        .unwrap();
                    let embeddings = gpu.dense_embeddings_batch(&images, &[], head).unwrap();
                    assert_eq!(logits.len(), images.len(), "{what}");
                    for (k, (l, emb)) in logits.iter().zip(&embeddings).enumerate() {
                        let want = emb.patch_logits(classes);
                        assert_eq!(
                            (l.grid_h, l.grid_w, l.classes),
                            (want.grid_h, want.grid_w, want.classes),
                            "{what}: {head:?}, image {k}"
                        );
                        assert!(
                            same_bits(&l.logits, &want.logits),
                            "{what}: {head:?} logits of image {k}"
                        );
                    }
                }
                let logits = gpu.image_logits_batch(&images, &images, &second).unwrap();
                let embeddings = gpu.image_embedding_batch(&images, &[]).unwrap();
                for (k, (l, emb)) in logits.iter().zip(&embeddings).enumerate() {
                    let want = dot_logits(emb, &second, e);
                    assert!(same_bits(l, &want), "{what}: image logits of image {k}");
                }
                let ragged = gpu.image_logits_batch(&images, &[], &first[..e + 1]);
                assert!(matches!(ragged, Err(EvalError::Usage(_))), "{what}");
                gpu.set_device_logits(false);
                assert!(!gpu.forms_logits());
            }
        }
    }
    assert!(!ReferenceTargets::new(&model).forms_logits());
}

/// Deterministic values `scale · sin(step · i)`.
fn waves(len: usize, step: f32, scale: f32) -> Vec<f32> {
    (0..len).map(|i| scale * (i as f32 * step).sin()).collect()
}

/// An attention-pooling head (SigLIP's `head.*`) for a tower of width `d` and MLP `mlp`.
fn pooling_head(d: usize, mlp: usize) -> AttentionPoolHead {
    let linear = |out: usize, inp: usize, step: f32| Linear {
        weight: waves(out * inp, step, 1.7 / (inp as f32).sqrt()),
        bias: Some(waves(out, step * 1.3, 0.05)),
        out_features: out,
        in_features: inp,
    };
    AttentionPoolHead {
        probe: waves(d, 0.71, 0.5),
        in_proj: linear(3 * d, d, 0.113),
        out_proj: linear(d, d, 0.271),
        layer_norm: LayerNormWeights {
            weight: waves(d, 0.39, 0.1).iter().map(|v| 1.0 + v).collect(),
            bias: waves(d, 0.53, 0.05),
        },
        fc1: linear(mlp, d, 0.173),
        fc2: linear(d, mlp, 0.319),
    }
}

/// A tower without a class token (SigLIP-style, from random:tiny): the device's features are
/// the reference engine's, each image of a batch gets its bits alone, and the drift sums run.
/// Without its attention-pooling head the targets on image embeddings are refused with the
/// reason; with it, the image embeddings and zero-shot logits are the reference's, each image's
/// the bits it gets alone.
#[test]
fn a_tower_without_a_class_token_evaluates_its_features() {
    let mut model = Model::load("random:tiny").unwrap();
    let d = model.config.width;
    model.config.class_token = false;
    model.config.pooling = prm::model::Pooling::AttentionHead;
    model.config.embed_dim = None;
    model.weights.class_embedding = None;
    model.weights.position_embedding.drain(..d);
    model.weights.patch_embed.bias = Some((0..d).map(|i| (i as f32 * 0.37).sin()).collect());
    model.weights.ln_pre = None;
    model.weights.projection = None;
    let mut pooled = model.clone();
    pooled.weights.attention_head = Some(pooling_head(d, model.config.mlp));
    pooled.config.embed_dim = Some(d);
    let data = size_pixels(3);
    let images = images(&data);
    let reference = ReferenceTargets::new(&model);
    for dev in devices() {
        let gpu = GpuTargets::new(&dev, &model, Precision::Fp32)
            .unwrap()
            .with_pass_tokens(60);
        let batch = gpu.features_batch(&images, &images).unwrap();
        for (k, (b, im)) in batch.iter().zip(&images).enumerate() {
            let want = reference.features(im).unwrap();
            let patches = (im.height / 16) * (im.width / 16);
            for (l, (x, y)) in b.iter().zip(&want).enumerate() {
                assert_eq!(x.len(), patches * d, "image {k}: F_{l} is its patches");
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 1e-4 * scale,
                    "{}: image {k}, F_{l}: error {err:.2e} of {scale:.2e}",
                    dev.name()
                );
            }
            assert!(
                b.iter()
                    .zip(&gpu.features(im).unwrap())
                    .all(|(x, y)| same_bits(x, y)),
                "{}: image {k} alone",
                dev.name()
            );
        }
        let pairs = [images[0], images[0], images[1], images[1]];
        assert_eq!(gpu.feature_sums_batch(&pairs, &[]).unwrap().len(), 2);
        let refused = gpu.image_embedding(&images[0]);
        assert!(
            matches!(&refused, Err(EvalError::NoImageEmbedding(why)) if why.contains("attention-pooling head")),
            "{}: {refused:?}",
            dev.name()
        );
    }
    let reference = ReferenceTargets::new(&pooled);
    let classes = waves(5 * d, 0.61, 1.0);
    for dev in devices() {
        let gpu = GpuTargets::new(&dev, &pooled, Precision::Fp32)
            .unwrap()
            .with_pass_tokens(60);
        let batch = gpu.image_embedding_batch(&images, &images).unwrap();
        let logits = gpu.image_logits_batch(&images, &[], &classes).unwrap();
        for (k, (e, im)) in batch.iter().zip(&images).enumerate() {
            let want = reference.image_embedding(im).unwrap();
            assert_eq!(e.len(), d, "the head's output is D wide");
            let err = e
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-4, "{}: image {k}: error {err:.2e}", dev.name());
            assert!(
                same_bits(e, &gpu.image_embedding(im).unwrap()),
                "image {k} alone"
            );
            assert_eq!(logits[k].len(), 5);
        }
    }
}
