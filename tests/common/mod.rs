//! Shared test helpers: small models with custom shapes and reproducible random data.
#![allow(dead_code)]

use prm::gpu::Device;
use prm::model::*;
use prm::rng::ImageRng;

pub mod kernel;
pub mod png;
pub use kernel::{sim_devices, sim_schedule_runs};

/// The simulator ([`sim_devices`]: both schedules unless told otherwise), and CUDA device 0
/// when a driver and a device are present (the line printed otherwise is what
/// `scripts/gpu-check.sh` counts as a skip).
pub fn devices() -> Vec<Device> {
    let mut d = sim_devices();
    if Device::cuda_available() {
        d.push(Device::cuda(0).expect("CUDA device 0"));
    } else {
        println!("skipped: no CUDA device");
    }
    d
}

/// Reproducible uniform numbers in [lo, hi).
pub struct Draw {
    rng: ImageRng,
    next: u64,
}

impl Draw {
    pub fn new(seed: u64) -> Self {
        Draw {
            rng: ImageRng::new(seed, "tests"),
            next: 0,
        }
    }
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        self.next += 1;
        lo + (hi - lo) * self.rng.uniform(0, self.next)
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

fn linear(d: &mut Draw, out_f: usize, in_f: usize, bias: bool) -> Linear {
    let a = (3.0 / in_f as f32).sqrt();
    Linear {
        weight: d.vec(out_f * in_f, -a, a),
        bias: bias.then(|| d.vec(out_f, -0.1, 0.1)),
        out_features: out_f,
        in_features: in_f,
    }
}

fn ln(d: &mut Draw, n: usize) -> LayerNormWeights {
    LayerNormWeights {
        weight: d.vec(n, 0.8, 1.2),
        bias: d.vec(n, -0.1, 0.1),
    }
}

/// A small random vision tower with the given shape; all parameters non-trivial.
pub fn small_model(
    width: usize,
    heads: usize,
    layers: usize,
    patch: usize,
    grid: usize,
    activation: Activation,
    seed: u64,
) -> Model {
    let mut d = Draw::new(seed);
    let mlp = 4 * width;
    let config = VisionConfig {
        width,
        layers,
        heads,
        patch,
        grid,
        class_token: true,
        mlp,
        embed_dim: Some(32),
        activation,
        ln_eps: 1e-5,
        mean: OPENAI_MEAN,
        std: OPENAI_STD,
        pooling: Pooling::ClassToken,
    };
    let blocks = (0..layers)
        .map(|_| BlockWeights {
            ln1: ln(&mut d, width),
            qkv: linear(&mut d, 3 * width, width, true),
            out_proj: linear(&mut d, width, width, true),
            ln2: ln(&mut d, width),
            fc1: linear(&mut d, mlp, width, true),
            fc2: linear(&mut d, width, mlp, true),
        })
        .collect();
    let weights = VisionWeights {
        patch_embed: linear(&mut d, width, 3 * patch * patch, false),
        class_embedding: Some(d.vec(width, -0.5, 0.5)),
        position_embedding: d.vec((grid * grid + 1) * width, -0.5, 0.5),
        ln_pre: Some(ln(&mut d, width)),
        blocks,
        ln_post: ln(&mut d, width),
        projection: Some(linear(&mut d, 32, width, false)),
        attention_head: None,
    };
    Model {
        config,
        weights,
        source: ModelSource::Random {
            arch: "test".into(),
            seed,
        },
    }
}

/// [`small_model`] as a SigLIP-style tower: no class token (the tokens are the patches), a
/// patch convolution with a bias, no LayerNorm before the blocks, and an attention-pooling head
/// (no projection) that forms the image embedding.
#[allow(dead_code)]
pub fn small_model_without_class_token(
    width: usize,
    heads: usize,
    layers: usize,
    patch: usize,
    grid: usize,
    activation: Activation,
    seed: u64,
) -> Model {
    let mut m = small_model(width, heads, layers, patch, grid, activation, seed);
    let mut d = Draw::new(seed ^ 0x5eed);
    m.config.class_token = false;
    m.config.pooling = Pooling::AttentionHead;
    m.weights.class_embedding = None;
    m.weights.position_embedding = m.weights.position_embedding[width..].to_vec();
    m.weights.patch_embed.bias = Some(d.vec(width, -0.5, 0.5));
    m.weights.ln_pre = None;
    m.weights.projection = None;
    let mlp = m.config.mlp;
    m.weights.attention_head = Some(AttentionPoolHead {
        probe: d.vec(width, -0.5, 0.5),
        in_proj: linear(&mut d, 3 * width, width, true),
        out_proj: linear(&mut d, width, width, true),
        layer_norm: ln(&mut d, width),
        fc1: linear(&mut d, mlp, width, true),
        fc2: linear(&mut d, width, mlp, true),
    });
    m.config.embed_dim = Some(width);
    m
}

/// A batch of planar clean images `(pixels, height, width)` as an attack takes them, image i
/// drawing from `ImageRng::new(seed, "img{i}")`.
#[allow(dead_code)]
pub fn attack_images(
    clean: &[(Vec<f32>, usize, usize)],
    seed: u64,
) -> Vec<(prm::attack::Planar<'_>, ImageRng)> {
    clean
        .iter()
        .enumerate()
        .map(|(i, (x, h, w))| {
            (
                prm::attack::Planar {
                    data: x,
                    height: *h,
                    width: *w,
                },
                ImageRng::new(seed, &format!("img{i}")),
            )
        })
        .collect()
}

/// `clean` moved by up to ±0.03 per pixel, within [0, 1].
pub fn perturbed(
    clean: &[(Vec<f32>, usize, usize)],
    d: &mut Draw,
) -> Vec<(Vec<f32>, usize, usize)> {
    clean
        .iter()
        .map(|(c, h, w)| {
            let a = c
                .iter()
                .map(|&v| (v + d.uniform(-0.03, 0.03)).clamp(0.0, 1.0))
                .collect();
            (a, *h, *w)
        })
        .collect()
}

/// Planar views of `(pixels, height, width)` images.
pub fn views(imgs: &[(Vec<f32>, usize, usize)]) -> Vec<prm::attack::Planar<'_>> {
    imgs.iter()
        .map(|(x, h, w)| prm::attack::Planar {
            data: x,
            height: *h,
            width: *w,
        })
        .collect()
}

/// `model`'s objective for `loss` over `layers` and `tokens`.
pub fn objective(
    model: &Model,
    loss: prm::attack::LossKind,
    tokens: prm::attack::TokenSelection,
    layers: prm::attack::LayerSelection,
) -> prm::attack::Objective {
    prm::attack::Objective::new(
        loss,
        layers.resolve(model.config.feature_layers()).unwrap(),
        tokens,
        model,
    )
    .unwrap()
}

/// A noisy RGB image file (noise makes PNG encoding do real work).
pub fn write_image(path: &std::path::Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let img = ::image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        ::image::Rgb([(x * 7 + y) as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    img.save(path).unwrap();
}
