//! The host's share of `prm eval`: reading each clean / adversarial pair, the cosine logits of
//! every patch embedding with the class embeddings, the per-pixel label maps (bilinear
//! upsampling of the patch logits and argmax over the classes), the confusion matrices and the
//! per-image records. The engine here hands over precomputed embeddings at once, as the GPU
//! engine does after its download, so what is timed is everything `prm eval` does on the host:
//! on a GPU machine, where one batch-1 forward of ViT-B/16 takes a few milliseconds, this is
//! most of an evaluation.
//!
//! Run: `cargo bench --bench eval_host`. 24 pairs of 640×480 (clean JPEG, adversarial PNG), a
//! segmentation target with 150 classes (ADE20K's count) at ViT-B/16's 40×30 patch grid and its
//! 512-wide embeddings, and a classification target (1,000 classes, ImageNet's count) on the
//! same pairs; each with an engine that answers at once, and with one that holds the calling
//! thread a few milliseconds a forward (two forwards a pair), as a device's synchronous download
//! would. The patch embeddings vary smoothly across the grid, as a real tower's do; one case
//! makes every patch unrelated to its neighbours, the label maps' worst case; one has the engine
//! hand over the logits, as the GPU engine does (formed on its device), leaving the host the
//! label maps. A second group times the logits and the label map of one image apart.

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use prm::attack::image::Planar;
use prm::eval::ops::{dot_logits, normalize_rows, upsample_argmax};
use prm::eval::run::{evaluate, EvalSettings};
use prm::eval::targets::{DenseHead, PatchLogits, TokenEmbeddings};
use prm::eval::text::ClassEmbeddings;
use prm::eval::{EvalEngine, EvalError, TargetKind};
use prm::model::{random_model, Model};

const PAIRS: usize = 24;
const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;
const PATCH: usize = 16;
const EMBED: usize = 512;
/// The class token and a 40×30 grid.
const MAX_TOKENS: usize = 1 + (WIDTH as usize / PATCH) * (HEIGHT as usize / PATCH);

/// An engine whose answers are normalised token embeddings computed once, taken as the GPU
/// engine's download would be, after holding the calling thread `wait` a forward: a stand-in
/// for a device, whose time the host's work can overlap.
struct InstantEngine {
    model: Model,
    embeddings: Vec<f32>,
    wait: Duration,
    /// With `Some`, the engine forms the dense logits itself ([`EvalEngine::forms_logits`], as
    /// the GPU engine does on its device): these, the patch rows' logits with the bench's
    /// classes, computed once. The host is then left the label maps.
    logits: Option<Vec<f32>>,
}

impl InstantEngine {
    /// `smooth`: neighbouring patches' embeddings differ a little, as a real tower's do, so few
    /// classes contend between them; otherwise every patch is unrelated to its neighbours (the
    /// label maps' worst case).
    fn new(wait: Duration, smooth: bool) -> Self {
        let grid_w = WIDTH as usize / PATCH;
        let mut embeddings: Vec<f32> = (0..MAX_TOKENS * EMBED)
            .map(|i| {
                let (t, k) = ((i / EMBED) as f32, (i % EMBED) as f32);
                if smooth {
                    let (gy, gx) = ((t / grid_w as f32).floor(), t % grid_w as f32);
                    (k * 0.618 + 0.1 * gx).sin() + (k * 0.377 + 0.13 * gy).cos()
                } else {
                    ((i as f32) * 0.618).sin() + (t * 0.1).cos()
                }
            })
            .collect();
        normalize_rows(&mut embeddings, EMBED);
        InstantEngine {
            model: random_model("tiny", 0).unwrap(),
            embeddings,
            wait,
            logits: None,
        }
    }

    /// The engine hands over the patch logits with `classes` instead of embeddings.
    fn forming_logits(mut self, classes: &ClassEmbeddings) -> Self {
        let patches = &self.embeddings[EMBED..MAX_TOKENS * EMBED];
        self.logits = Some(dot_logits(patches, &classes.embeddings, EMBED));
        self
    }
}

impl EvalEngine for InstantEngine {
    fn model(&self) -> &Model {
        &self.model
    }

    fn dense_embeddings(
        &self,
        image: &Planar,
        _head: DenseHead,
    ) -> Result<TokenEmbeddings, EvalError> {
        std::thread::sleep(self.wait);
        let (gh, gw) = (image.height / PATCH, image.width / PATCH);
        let tokens = 1 + gh * gw;
        Ok(TokenEmbeddings {
            grid_h: gh,
            grid_w: gw,
            dim: EMBED,
            rows: self.embeddings[..tokens * EMBED].to_vec(),
        })
    }

    fn forms_logits(&self) -> bool {
        self.logits.is_some()
    }

    fn dense_logits_batch(
        &self,
        images: &[Planar],
        _next: &[Planar],
        _head: DenseHead,
        classes: &[f32],
    ) -> Result<Vec<PatchLogits>, EvalError> {
        let all = self.logits.as_ref().expect("an engine forming logits");
        let c = classes.len() / EMBED;
        Ok(images
            .iter()
            .map(|image| {
                std::thread::sleep(self.wait);
                let (gh, gw) = (image.height / PATCH, image.width / PATCH);
                PatchLogits {
                    grid_h: gh,
                    grid_w: gw,
                    classes: c,
                    logits: all[..gh * gw * c].to_vec(),
                }
            })
            .collect())
    }

    fn image_embedding(&self, image: &Planar) -> Result<Vec<f32>, EvalError> {
        std::thread::sleep(self.wait);
        // A row that depends on the image, so the predictions vary.
        let row = (image.data[0] * 255.0) as usize % MAX_TOKENS;
        Ok(self.embeddings[row * EMBED..(row + 1) * EMBED].to_vec())
    }

    fn features(&self, _image: &Planar) -> Result<Vec<Vec<f32>>, EvalError> {
        unreachable!("the bench runs no features target")
    }
}

fn write_pairs(dir: &Path) {
    for i in 0..PAIRS {
        let clean = image::RgbImage::from_fn(WIDTH, HEIGHT, |x, y| {
            let v = |c: u32| {
                (128.0
                    + 100.0
                        * ((x as f32 / (20.0 + i as f32)) + c as f32).sin()
                        * (y as f32 / (30.0 + 7.0 * c as f32)).cos()
                    + ((x * 7 + y * 13 + c * 17) % 23) as f32) as u8
            };
            image::Rgb([v(0), v(1), v(2)])
        });
        let adv = image::RgbImage::from_fn(WIDTH, HEIGHT, |x, y| {
            let p = clean.get_pixel(x, y);
            let d = |c: usize| p[c].saturating_add(((x + y + c as u32) % 9) as u8);
            image::Rgb([d(0), d(1), d(2)])
        });
        clean
            .save(dir.join("clean").join(format!("{i:03}.jpg")))
            .unwrap();
        adv.save(dir.join("adv").join(format!("{i:03}.png")))
            .unwrap();
    }
}

fn classes(count: usize) -> ClassEmbeddings {
    let mut embeddings: Vec<f32> = (0..count * EMBED)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    normalize_rows(&mut embeddings, EMBED);
    ClassEmbeddings {
        names: (0..count).map(|c| format!("class {c}")).collect(),
        embeddings,
        dim: EMBED,
        source: "bench".into(),
        text_weights: None,
        text_weights_match: None,
    }
}

fn settings(target: TargetKind) -> EvalSettings {
    EvalSettings {
        target,
        resolution: None,
        ignore_index: 255,
        labels: None,
        save_predictions: None,
        pictures: None,
        probe: None,
        exclude: Vec::new(),
        max_pixels: prm::io::DEFAULT_MAX_PIXELS,
        // The stand-in engine holds the thread per image, as a device at batch 1 would.
        batch_size: 1,
        product_algorithms: None,
        weights: None,
        model_spec: "bench".into(),
        weights_random: true,
        device: "none".into(),
        precision: "fp32".into(),
    }
}

fn eval_host(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("clean")).unwrap();
    std::fs::create_dir_all(dir.path().join("adv")).unwrap();
    write_pairs(dir.path());
    let (clean, adv) = (dir.path().join("clean"), dir.path().join("adv"));
    let mut g = c.benchmark_group(format!("eval {PAIRS} pairs of {WIDTH}x{HEIGHT}"));
    g.sample_size(10);
    for (name, target, count, wait_ms, smooth) in [
        ("maskclip, 150 classes", TargetKind::MaskClip, 150, 0, true),
        (
            "maskclip, 150 classes, 4 ms a forward",
            TargetKind::MaskClip,
            150,
            4,
            true,
        ),
        (
            "maskclip, 150 classes, unrelated patches",
            TargetKind::MaskClip,
            150,
            0,
            false,
        ),
        (
            "zeroshot, 1000 classes",
            TargetKind::ZeroShot,
            1000,
            0,
            true,
        ),
        (
            "zeroshot, 1000 classes, 2 ms a forward",
            TargetKind::ZeroShot,
            1000,
            2,
            true,
        ),
    ] {
        let engine = InstantEngine::new(Duration::from_millis(wait_ms), smooth);
        let classes = classes(count);
        let settings = settings(target);
        g.bench_function(name, |b| {
            b.iter(|| {
                let outcome =
                    evaluate(&engine, &clean, &adv, Some(&classes), &settings, |_, _| {}).unwrap();
                assert_eq!(outcome.failed, 0);
                outcome
            })
        });
    }
    // The engine hands over the logits (as the GPU engine does, formed on its device): the host
    // is left reading, label maps, metrics and records.
    let classes = classes(150);
    let engine = InstantEngine::new(Duration::ZERO, true).forming_logits(&classes);
    let settings = settings(TargetKind::MaskClip);
    g.bench_function("maskclip, 150 classes, logits from the engine", |b| {
        b.iter(|| {
            let outcome =
                evaluate(&engine, &clean, &adv, Some(&classes), &settings, |_, _| {}).unwrap();
            assert_eq!(outcome.failed, 0);
            outcome
        })
    });
    g.finish();
}

/// The two parts of a segmentation pair's host work, one image each, on every core: the cosine
/// logits of the patch rows (40×30 rows of 512 with 150 classes) and the label map (bilinear
/// upsampling of those logits to 640×480 and the per-pixel argmax). Which of them a device
/// could take over is decided by these, not by a guess.
fn eval_host_parts(c: &mut Criterion) {
    let engine = InstantEngine::new(Duration::ZERO, true);
    let classes = classes(150);
    let (gh, gw) = (HEIGHT as usize / PATCH, WIDTH as usize / PATCH);
    let patches = &engine.embeddings[EMBED..MAX_TOKENS * EMBED];
    let mut g = c.benchmark_group(format!(
        "one {WIDTH}x{HEIGHT} image, {gw}x{gh} patches, 150 classes"
    ));
    g.sample_size(20);
    g.bench_function("cosine logits", |b| {
        b.iter(|| dot_logits(patches, &classes.embeddings, EMBED))
    });
    let logits = dot_logits(patches, &classes.embeddings, EMBED);
    g.bench_function("label map", |b| {
        b.iter(|| upsample_argmax(&logits, gh, gw, 150, HEIGHT as usize, WIDTH as usize))
    });
    g.finish();
}

criterion_group!(benches, eval_host, eval_host_parts);
criterion_main!(benches);
