//! CLIP vision towers: their configuration, their weights in f32, and where they came from.
//!
//! Weights are held in PyTorch's layout (linear weights `[out, in]`, row-major) so that loading
//! is a rename and a dtype conversion, never a reshuffle that could go subtly wrong.

mod builtin;
mod checkpoint;
mod config;
mod fingerprint;
mod formats;
mod hub;
mod load;
mod text;

pub use builtin::{builtin_architectures, builtin_config, random_model, random_text_tower};
pub use checkpoint::{locate, resolve_checkpoint};
pub use load::{load_model, load_safetensors, load_safetensors_bytes, tensor_to_f32, ModelError};
pub use text::{load_text_tower, TextConfig, TextTower, TextWeights, BUNDLED_TOKENIZER_VOCAB};

/// The MLP non-linearity of a CLIP tower.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · σ(1.702 x)`, used by OpenAI's original weights.
    QuickGelu,
    /// Exact (erf) GELU, used by many LAION / DataComp models.
    Gelu,
    /// GELU's tanh approximation `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`: PyTorch's
    /// `gelu(approximate="tanh")`, HF's `gelu_pytorch_tanh` / `gelu_new`, SigLIP's towers.
    GeluTanh,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
        }
    }
}

/// How a tower pools its last features into the image embedding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// `ln_post(h_cls) · Wᵀ`: CLIP's image embedding, which the embed loss and the eval targets
    /// built on image embeddings read.
    #[default]
    ClassToken,
    /// `ln_post(mean of the patch tokens) · Wᵀ` (open_clip `pool_type: "avg"` with
    /// `final_ln_after_pool: true`, CLIPA).
    PatchAverage,
    /// `mean of ln_post(patch tokens) · Wᵀ` (open_clip `pool_type: "avg"`, or the older
    /// `global_average_pool`, without `final_ln_after_pool`).
    NormedPatchAverage,
    /// A learned attention probe over the post-LayerNorm tokens (SigLIP's multi-head attention
    /// pooling head, `head.*`, held in [`VisionWeights::attention_head`]): the image embedding
    /// is the head's output, without a projection.
    AttentionHead,
    /// No pooled image embedding at all (SigLIP saved with `vision_use_head: false`).
    Unpooled,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::ClassToken => "class_token",
            Pooling::PatchAverage => "patch_average",
            Pooling::NormedPatchAverage => "normed_patch_average",
            Pooling::AttentionHead => "attention_head",
            Pooling::Unpooled => "none",
        }
    }
}

/// OpenAI's CLIP normalisation, the default for every model. Written with the digits OpenAI
/// publishes so the constants can be checked against the source; f32 rounds them.
#[allow(clippy::excessive_precision)]
pub const OPENAI_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const OPENAI_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Shape and numerics of a ViT vision tower. Every dimension is inferred from tensor shapes.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VisionConfig {
    /// Residual width D.
    pub width: usize,
    /// Number of transformer blocks L.
    pub layers: usize,
    /// Attention heads; head dim = width / heads.
    pub heads: usize,
    /// Patch side p.
    pub patch: usize,
    /// Side g of the pretrained position grid (the table has g·g + 1 rows, or g·g without a
    /// class token).
    pub grid: usize,
    /// Whether a class token leads every image's tokens (CLIP); SigLIP's towers have none, so
    /// their tokens are the patches alone.
    pub class_token: bool,
    /// Hidden width of the MLP (4·D for CLIP).
    pub mlp: usize,
    /// Output embedding dimension E, when the checkpoint has a projection (E = D for an
    /// attention-pooling head, whose output is the embedding).
    pub embed_dim: Option<usize>,
    pub activation: Activation,
    pub ln_eps: f32,
    /// Per-channel normalisation applied inside the model to pixels in [0, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// How the image embedding pools the tokens.
    pub pooling: Pooling,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }
    /// The pretrained input side (g · p), e.g. 224 for ViT-B/16.
    pub fn image_size(&self) -> usize {
        self.grid * self.patch
    }
    /// Number of residual-stream feature tensors F_0..F_L.
    pub fn feature_layers(&self) -> usize {
        self.layers + 1
    }
    /// Tokens before the patches: 1 (the class token) or 0.
    pub fn class_tokens(&self) -> usize {
        usize::from(self.class_token)
    }
    /// Tokens of an image whose patch grid is `grid_h × grid_w`.
    pub fn tokens(&self, grid_h: usize, grid_w: usize) -> usize {
        self.class_tokens() + grid_h * grid_w
    }
}

/// LayerNorm affine parameters.
#[derive(Clone, Debug)]
pub struct LayerNormWeights {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// A linear layer `y = x · Wᵀ + b` with `W` stored `[out, in]` row-major.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub out_features: usize,
    pub in_features: usize,
}

/// One pre-LN transformer block.
#[derive(Clone, Debug)]
pub struct BlockWeights {
    pub ln1: LayerNormWeights,
    /// q, k, v stacked in that order: `[3D, D]` weight and `[3D]` bias.
    pub qkv: Linear,
    pub out_proj: Linear,
    pub ln2: LayerNormWeights,
    pub fc1: Linear,
    pub fc2: Linear,
}

/// All weights of a vision tower, in f32.
#[derive(Clone, Debug)]
pub struct VisionWeights {
    /// Patch convolution as a linear map `[D, 3·p·p]`, patch vectors flattened (channel, row, col).
    pub patch_embed: Linear,
    /// The class token `[D]`; `None` for towers without one (`VisionConfig::class_token`).
    pub class_embedding: Option<Vec<f32>>,
    /// `[g·g + 1, D]`, CLS row first (`[g·g, D]` without a class token).
    pub position_embedding: Vec<f32>,
    /// The LayerNorm before the blocks; `None` for towers without one (open_clip `no_ln_pre`,
    /// e.g. CLIPA), whose F_0 is the embedded tokens themselves.
    pub ln_pre: Option<LayerNormWeights>,
    pub blocks: Vec<BlockWeights>,
    pub ln_post: LayerNormWeights,
    /// `image_embed = ln_post(h_cls) · Wᵀ`, W `[E, D]`, when the checkpoint has one.
    pub projection: Option<Linear>,
    /// SigLIP's attention-pooling head ([`Pooling::AttentionHead`]), when the checkpoint has one.
    pub attention_head: Option<AttentionPoolHead>,
}

/// SigLIP's multi-head attention pooling head (`SiglipMultiheadAttentionPoolingHead`, `head.*`):
/// a learned query attends over the post-LayerNorm tokens with the tower's head count, then
/// `a + MLP(LayerNorm(a))` with the tower's activation and LayerNorm ε. Its output `[D]` is the
/// image embedding (`pooler_output`, `get_image_features`).
#[derive(Clone, Debug)]
pub struct AttentionPoolHead {
    /// The query token `[D]` (`head.probe`, `[1, 1, D]` in the file).
    pub probe: Vec<f32>,
    /// q, k, v stacked, `[3D, D]` and `[3D]` (`torch.nn.MultiheadAttention`'s `in_proj_*`).
    pub in_proj: Linear,
    pub out_proj: Linear,
    pub layer_norm: LayerNormWeights,
    pub fc1: Linear,
    pub fc2: Linear,
}

/// What forms the image embedding from F_L.
#[derive(Clone, Copy, Debug)]
pub enum ImageHead<'a> {
    /// CLIP: `ln_post(F_L[CLS]) · Wᵀ`.
    Projection(&'a Linear),
    /// SigLIP: the attention-pooling head over `ln_post(F_L)`, every token.
    AttentionPool(&'a AttentionPoolHead),
    /// open_clip's average pooling of the patch tokens (CLIPA), then the projection:
    /// `ln_post(mean_t x_t) · Wᵀ`, or with `norm_first` `mean_t ln_post(x_t) · Wᵀ`.
    PatchAverage {
        projection: &'a Linear,
        norm_first: bool,
    },
}

impl ImageHead<'_> {
    /// The embedding dimension E.
    pub fn dim(&self) -> usize {
        match self {
            ImageHead::Projection(p) => p.out_features,
            ImageHead::AttentionPool(h) => h.out_proj.out_features,
            ImageHead::PatchAverage { projection, .. } => projection.out_features,
        }
    }

    /// Whether the embedding reads every token of F_L (else the CLS row alone).
    pub fn reads_every_token(&self) -> bool {
        !matches!(self, ImageHead::Projection(_))
    }
}

/// Where a model came from; printed by `prm info` and recorded in outputs.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A Hugging Face `CLIPModel` / `CLIPVisionModel*` checkpoint.
    HuggingFace { path: std::path::PathBuf },
    /// An OpenAI / open_clip state dict (`visual.*` names).
    OpenAi { path: std::path::PathBuf },
    /// A built-in architecture with seeded random weights.
    Random { arch: String, seed: u64 },
}

impl ModelSource {
    pub fn format_name(&self) -> &'static str {
        match self {
            ModelSource::HuggingFace { .. } => "huggingface",
            ModelSource::OpenAi { .. } => "openai",
            ModelSource::Random { .. } => "random",
        }
    }
    pub fn weights_are_random(&self) -> bool {
        matches!(self, ModelSource::Random { .. })
    }
}

/// A loaded vision tower.
#[derive(Clone, Debug)]
pub struct Model {
    pub config: VisionConfig,
    pub weights: VisionWeights,
    pub source: ModelSource,
}

impl Model {
    /// Loads `random:ARCH`, a checkpoint file, or a directory holding one.
    pub fn load(spec: &str) -> Result<Model, ModelError> {
        load_model(spec)
    }

    /// Why this tower's image embedding cannot be computed, if it cannot: the checkpoint has no
    /// projection or pooling head, or the tower pools in a way prm does not build.
    pub fn image_embedding_unavailable(&self) -> Option<String> {
        self.image_head().err()
    }

    /// What forms the image embedding from F_L, or why it cannot be formed.
    pub fn image_head(&self) -> Result<ImageHead<'_>, String> {
        match self.config.pooling {
            Pooling::ClassToken => self.image_projection().map(ImageHead::Projection),
            Pooling::AttentionHead => self
                .weights
                .attention_head
                .as_ref()
                .map(ImageHead::AttentionPool)
                .ok_or_else(|| "the checkpoint has no attention-pooling head (`head.*`)".into()),
            Pooling::PatchAverage | Pooling::NormedPatchAverage => {
                let projection = self.weights.projection.as_ref().ok_or_else(|| {
                    "the checkpoint has no visual projection (`visual.proj`)".to_string()
                })?;
                Ok(ImageHead::PatchAverage {
                    projection,
                    norm_first: self.config.pooling == Pooling::NormedPatchAverage,
                })
            }
            Pooling::Unpooled => Err(
                "the tower has no pooled image embedding (SigLIP without its attention head); \
                 prm computes its features F_0..F_L (every loss but embed, eval's features and \
                 probe targets)"
                    .into(),
            ),
        }
    }

    /// The visual projection of the CLIP image embedding, which the dense targets also apply
    /// to every patch token, or why the tower has none.
    pub fn image_projection(&self) -> Result<&Linear, String> {
        match self.config.pooling {
            Pooling::ClassToken => self.weights.projection.as_ref().ok_or_else(|| {
                "the checkpoint has no visual projection (`visual_projection.weight` / \
                 `visual.proj`)"
                    .into()
            }),
            Pooling::AttentionHead => Err(
                "the tower pools its image embedding with an attention head (SigLIP), so it has \
                 no projection to apply to each patch token; its image embedding (the embed \
                 loss, eval's zeroshot target) is built"
                    .into(),
            ),
            Pooling::PatchAverage | Pooling::NormedPatchAverage => Err(
                "the tower pools its image embedding as the average of the patch tokens \
                 (open_clip pool_type \"avg\", e.g. CLIPA); the dense targets, which project \
                 every patch token as CLIP's class token is projected, are not built for it; \
                 its image embedding (the embed loss, eval's zeroshot target) is"
                    .into(),
            ),
            Pooling::Unpooled => Err(self
                .image_head()
                .expect_err("this pooling has no image head")),
        }
    }

    /// Total parameter count of the vision tower (including the projection).
    pub fn parameter_count(&self) -> usize {
        let lin = |l: &Linear| l.weight.len() + l.bias.as_ref().map_or(0, Vec::len);
        let ln = |l: &LayerNormWeights| l.weight.len() + l.bias.len();
        let w = &self.weights;
        let blocks: usize = w
            .blocks
            .iter()
            .map(|b| {
                ln(&b.ln1) + lin(&b.qkv) + lin(&b.out_proj) + ln(&b.ln2) + lin(&b.fc1) + lin(&b.fc2)
            })
            .sum();
        lin(&w.patch_embed)
            + w.class_embedding.as_ref().map_or(0, Vec::len)
            + w.position_embedding.len()
            + w.ln_pre.as_ref().map_or(0, ln)
            + blocks
            + ln(&w.ln_post)
            + w.projection.as_ref().map_or(0, lin)
            + w.attention_head.as_ref().map_or(0, |h| {
                h.probe.len()
                    + lin(&h.in_proj)
                    + lin(&h.out_proj)
                    + ln(&h.layer_norm)
                    + lin(&h.fc1)
                    + lin(&h.fc2)
            })
    }
}
