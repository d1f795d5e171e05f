//! Built-in architectures with seeded random weights (`random:ARCH[@SEED]`).
//!
//! The shapes are those of the real CLIP vision towers, so benchmarks and demos exercise the
//! real sizes without a download; the weights are random and every output says so.
//!
//! Weights are a pure function of `(arch, seed, tensor name, element index)`: each tensor gets a
//! Philox key from [`ImageRng`] keyed by `random-model/ARCH/TENSOR`, and element `i` uses word
//! `i % 4` of counter `i / 4`. Generation is parallel over fixed-size chunks, so the result does
//! not depend on the thread count.
//!
//! Scales follow OpenAI's CLIP initialisation closely enough that activations stay sane through
//! every layer: draws are uniform with the variance of the named distribution.
//! - linear weights: variance 1/in (LeCun), so each pre-LN sub-layer maps a unit-variance input to
//!   an O(1) output and the residual stream grows like sqrt(1 + c·l), neither exploding nor
//!   collapsing;
//! - linear biases: uniform ±0.02; LayerNorm weights 1 ± 0.1, biases ±0.02;
//! - class and position embeddings: variance 1/D (OpenAI's `width ** -0.5 * randn`);
//! - projection: variance 1/D.
//!
//! The `siglip-*` architectures are SigLIP's vision towers (Hugging Face `SiglipVisionModel`):
//! no class token, a patch convolution with a bias (±0.02), no LayerNorm before the blocks,
//! tanh GELU, LayerNorm eps 1e-6, mean and std 0.5. Their attention-pooling head is not
//! generated: prm does not build their image embedding, so they have no text tower either.

use rayon::prelude::*;

use super::{
    Activation, AttentionPoolHead, BlockWeights, LayerNormWeights, Linear, Model, ModelError,
    ModelSource, Pooling, TextConfig, TextTower, TextWeights, VisionConfig, VisionWeights,
    BUNDLED_TOKENIZER_VOCAB, OPENAI_MEAN, OPENAI_STD,
};
use crate::rng::ImageRng;

/// Philox stream used for model weights (ASCII "MODL").
const STREAM_WEIGHTS: u32 = 0x4D4F_444C;
/// Elements per parallel work item; a multiple of 4 so chunks start on a counter boundary.
const CHUNK: usize = 1 << 14;

struct Arch {
    name: &'static str,
    width: usize,
    heads: usize,
    layers: usize,
    mlp: usize,
    patch: usize,
    grid: usize,
    embed_dim: usize,
    /// QuickGELU for OpenAI's towers; open_clip's LAION ViT-H/14 uses the exact GELU, SigLIP
    /// the tanh GELU.
    activation: Activation,
    /// A SigLIP tower (module docs) rather than a CLIP one.
    siglip: bool,
}

const ARCHS: &[Arch] = &[
    Arch {
        name: "tiny",
        width: 128,
        heads: 2,
        layers: 2,
        mlp: 512,
        patch: 16,
        grid: 4,
        embed_dim: 64,
        activation: Activation::QuickGelu,
        siglip: false,
    },
    Arch {
        name: "vit-b-32",
        width: 768,
        heads: 12,
        layers: 12,
        mlp: 3072,
        patch: 32,
        grid: 7,
        embed_dim: 512,
        activation: Activation::QuickGelu,
        siglip: false,
    },
    Arch {
        name: "vit-b-16",
        width: 768,
        heads: 12,
        layers: 12,
        mlp: 3072,
        patch: 16,
        grid: 14,
        embed_dim: 512,
        activation: Activation::QuickGelu,
        siglip: false,
    },
    Arch {
        name: "vit-l-14",
        width: 1024,
        heads: 16,
        layers: 24,
        mlp: 4096,
        patch: 14,
        grid: 16,
        embed_dim: 768,
        activation: Activation::QuickGelu,
        siglip: false,
    },
    Arch {
        name: "vit-l-14-336",
        width: 1024,
        heads: 16,
        layers: 24,
        mlp: 4096,
        patch: 14,
        grid: 24,
        embed_dim: 768,
        activation: Activation::QuickGelu,
        siglip: false,
    },
    // open_clip's ViT-H-14 (LAION-2B): 16 heads of 80, the GPU engine's SIMT attention.
    Arch {
        name: "vit-h-14",
        width: 1280,
        heads: 16,
        layers: 32,
        mlp: 5120,
        patch: 14,
        grid: 16,
        embed_dim: 1024,
        activation: Activation::Gelu,
        siglip: false,
    },
    // google/siglip-base-patch16-224.
    Arch {
        name: "siglip-b-16",
        width: 768,
        heads: 12,
        layers: 12,
        mlp: 3072,
        patch: 16,
        grid: 14,
        embed_dim: 0,
        activation: Activation::GeluTanh,
        siglip: true,
    },
    // google/siglip-so400m-patch14-384, the vision tower of many VLMs: 16 heads of 72, an MLP
    // of 4304 (not 4·D).
    Arch {
        name: "siglip-so400m-14-384",
        width: 1152,
        heads: 16,
        layers: 27,
        mlp: 4304,
        patch: 14,
        grid: 27,
        embed_dim: 0,
        activation: Activation::GeluTanh,
        siglip: true,
    },
];

const NAMES: &[&str] = &[
    "tiny",
    "vit-b-32",
    "vit-b-16",
    "vit-l-14",
    "vit-l-14-336",
    "vit-h-14",
    "siglip-b-16",
    "siglip-so400m-14-384",
];

/// Names accepted by `random:ARCH`.
pub fn builtin_architectures() -> &'static [&'static str] {
    NAMES
}

fn find(arch: &str) -> Result<&'static Arch, ModelError> {
    ARCHS
        .iter()
        .find(|a| a.name == arch)
        .ok_or_else(|| ModelError::UnknownArchitecture {
            arch: arch.to_string(),
            known: NAMES.iter().map(|s| s.to_string()).collect(),
        })
}

/// The configuration of a built-in architecture, without generating any weights.
pub fn builtin_config(arch: &str) -> Result<VisionConfig, ModelError> {
    let a = find(arch)?;
    Ok(VisionConfig {
        width: a.width,
        layers: a.layers,
        heads: a.heads,
        patch: a.patch,
        grid: a.grid,
        class_token: !a.siglip,
        mlp: a.mlp,
        // SigLIP's attention-pooling head outputs the embedding at the tower's width.
        embed_dim: Some(if a.siglip { a.width } else { a.embed_dim }),
        activation: a.activation,
        ln_eps: if a.siglip { 1e-6 } else { 1e-5 },
        mean: if a.siglip { [0.5; 3] } else { OPENAI_MEAN },
        std: if a.siglip { [0.5; 3] } else { OPENAI_STD },
        pooling: if a.siglip {
            Pooling::AttentionHead
        } else {
            Pooling::ClassToken
        },
    })
}

/// 23 random bits k → (2k + 1) / 2^23 − 1 ∈ (−1, 1): exact in f32 and symmetric about 0.
fn unit(word: u32) -> f32 {
    ((word >> 9) * 2 + 1) as f32 * (1.0 / 8_388_608.0) - 1.0
}

/// Generates tensors for one (arch, seed).
struct Gen<'a> {
    arch: &'a str,
    seed: u64,
}

impl Gen<'_> {
    /// `len` values `center + half_width · u`, u uniform in (-1, 1) and symmetric about 0.
    fn uniform(&self, tensor: &str, len: usize, center: f32, half_width: f32) -> Vec<f32> {
        let rng = ImageRng::new(self.seed, &format!("random-model/{}/{tensor}", self.arch));
        let mut out = vec![0.0f32; len];
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let base = c * CHUNK;
                for (j, quad) in chunk.chunks_mut(4).enumerate() {
                    let w = rng.words(STREAM_WEIGHTS, ((base / 4) + j) as u64);
                    for (o, &word) in quad.iter_mut().zip(&w) {
                        *o = center + half_width * unit(word);
                    }
                }
            });
        out
    }

    /// Uniform with standard deviation `std` (half-width √3·std), mean 0.
    fn with_std(&self, tensor: &str, len: usize, std: f32) -> Vec<f32> {
        self.uniform(tensor, len, 0.0, 3.0f32.sqrt() * std)
    }

    fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Linear {
        Linear {
            weight: self.with_std(
                &format!("{name}.weight"),
                out * inp,
                (inp as f32).powf(-0.5),
            ),
            bias: bias.then(|| self.uniform(&format!("{name}.bias"), out, 0.0, 0.02)),
            out_features: out,
            in_features: inp,
        }
    }

    fn ln(&self, name: &str, d: usize) -> LayerNormWeights {
        LayerNormWeights {
            weight: self.uniform(&format!("{name}.weight"), d, 1.0, 0.1),
            bias: self.uniform(&format!("{name}.bias"), d, 0.0, 0.02),
        }
    }
}

/// A built-in architecture with deterministic random weights for `seed`.
pub fn random_model(arch: &str, seed: u64) -> Result<Model, ModelError> {
    let config = builtin_config(arch)?;
    let a = find(arch)?;
    let g = Gen { arch: a.name, seed };
    let d = config.width;
    let tokens = config.tokens(config.grid, config.grid);
    let emb_std = (d as f32).powf(-0.5);
    let blocks = (0..config.layers)
        .map(|i| {
            let b = format!("blocks.{i}");
            BlockWeights {
                ln1: g.ln(&format!("{b}.ln1"), d),
                qkv: g.linear(&format!("{b}.qkv"), 3 * d, d, true),
                out_proj: g.linear(&format!("{b}.out_proj"), d, d, true),
                ln2: g.ln(&format!("{b}.ln2"), d),
                fc1: g.linear(&format!("{b}.fc1"), config.mlp, d, true),
                fc2: g.linear(&format!("{b}.fc2"), d, config.mlp, true),
            }
        })
        .collect();
    let clip = !a.siglip;
    let weights = VisionWeights {
        patch_embed: g.linear("patch_embed", d, 3 * config.patch * config.patch, a.siglip),
        class_embedding: clip.then(|| g.with_std("class_embedding", d, emb_std)),
        position_embedding: g.with_std("position_embedding", tokens * d, emb_std),
        ln_pre: clip.then(|| g.ln("ln_pre", d)),
        blocks,
        ln_post: g.ln("ln_post", d),
        projection: clip.then(|| g.linear("projection", a.embed_dim, d, false)),
        attention_head: a.siglip.then(|| AttentionPoolHead {
            probe: g.with_std("head.probe", d, emb_std),
            in_proj: g.linear("head.in_proj", 3 * d, d, true),
            out_proj: g.linear("head.out_proj", d, d, true),
            layer_norm: g.ln("head.layernorm", d),
            fc1: g.linear("head.fc1", config.mlp, d, true),
            fc2: g.linear("head.fc2", d, config.mlp, true),
        }),
    };
    Ok(Model {
        config,
        weights,
        source: ModelSource::Random {
            arch: a.name.to_string(),
            seed,
        },
    })
}

/// Text-tower shape of a built-in architecture: (width, heads, layers, embed_dim). The real
/// CLIP text shapes, except `tiny`.
fn text_shape(arch: &str) -> (usize, usize, usize) {
    match arch {
        "tiny" => (128, 2, 2),
        "vit-b-32" | "vit-b-16" => (512, 8, 12),
        "vit-h-14" => (1024, 16, 24),
        _ => (768, 12, 12),
    }
}

/// The seeded random text tower of a built-in architecture. Its vocabulary is that of the
/// tokenizer bundled with prm ([`BUNDLED_TOKENIZER_VOCAB`] ids, `<|endoftext|>` the largest),
/// since random weights come without tokenizer files; its embedding dimension is the vision
/// tower's, so class embeddings from it fit the image embeddings.
pub fn random_text_tower(arch: &str, seed: u64) -> Result<TextTower, ModelError> {
    let a = find(arch)?;
    if a.siglip {
        return Err(ModelError::BadSpec {
            spec: format!("random:{arch}"),
            reason: "a SigLIP tower has no CLIP text tower (prm builds neither SigLIP's text \
                     tower nor its pooled image embedding)"
                .into(),
        });
    }
    let g = Gen {
        arch: a.name,
        seed: seed ^ 0x5445_5854, // "TEXT": text weights differ from the vision ones
    };
    let (w, heads, layers) = text_shape(a.name);
    let mlp = 4 * w;
    let context = 77;
    let blocks = (0..layers)
        .map(|i| {
            let b = format!("text.blocks.{i}");
            BlockWeights {
                ln1: g.ln(&format!("{b}.ln1"), w),
                qkv: g.linear(&format!("{b}.qkv"), 3 * w, w, true),
                out_proj: g.linear(&format!("{b}.out_proj"), w, w, true),
                ln2: g.ln(&format!("{b}.ln2"), w),
                fc1: g.linear(&format!("{b}.fc1"), mlp, w, true),
                fc2: g.linear(&format!("{b}.fc2"), w, mlp, true),
            }
        })
        .collect();
    let vocab = BUNDLED_TOKENIZER_VOCAB;
    Ok(TextTower {
        config: TextConfig {
            width: w,
            layers,
            heads,
            mlp,
            vocab,
            context,
            embed_dim: a.embed_dim,
            activation: a.activation,
            ln_eps: 1e-5,
        },
        weights: TextWeights {
            token_embedding: g.with_std("text.token_embedding", vocab * w, 0.5),
            position_embedding: g.with_std("text.position_embedding", context * w, 0.1),
            blocks,
            ln_final: g.ln("text.ln_final", w),
            projection: g.linear("text.projection", a.embed_dim, w, false),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_symmetric_and_scaled() {
        let g = Gen {
            arch: "tiny",
            seed: 3,
        };
        let v = g.with_std("x", 100_000, 0.5);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "std {}", var.sqrt());
        let bound = 3.0f32.sqrt() * 0.5;
        assert!(v.iter().all(|&x| x.abs() < bound));
    }

    #[test]
    fn chunking_does_not_change_values() {
        // Values at chunk boundaries equal a direct per-element computation.
        let g = Gen {
            arch: "tiny",
            seed: 9,
        };
        let v = g.uniform("t", CHUNK * 2 + 7, 0.0, 1.0);
        let rng = ImageRng::new(9, "random-model/tiny/t");
        for i in [0, 1, 3, 4, CHUNK - 1, CHUNK, CHUNK + 5, 2 * CHUNK + 6] {
            let w = rng.words(STREAM_WEIGHTS, (i / 4) as u64)[i % 4];
            assert_eq!(v[i], unit(w), "element {i}");
        }
    }
}
