//! The GPU engine: the ViT forward, the losses and the input-gradient backward for a packed
//! batch of images of mixed sizes, on any [`Device`] (CUDA, or the simulator in CI).
//!
//! A batch is a packed token matrix `[ΣT_i, D]` with a `cu_seqlens` table (DESIGN §6): linear
//! layers and LayerNorm see one tall matrix, attention and the embedding read the offsets.
//! Clean features stay on the device between steps ([`GpuClean`]); the loss kernels add each
//! selected layer's gradient straight into the backward's running gradient.
//!
//! Per-geometry device tables (the packing table, `cu_seqlens`, position embeddings, loss
//! scratch: `BatchGeometry`) and resize plans are made once per geometry and cached (the
//! position table by device copies from per-grid embeddings, `positions.rs`, since under
//! dynamic scale it is a new fp32 table the size of a layer every step): the
//! step loop captures fixed-shape steps into graphs (`step_loop.rs`), and nothing inside a
//! captured step may upload. A new per-batch table belongs in `BatchGeometry`; an upload in
//! the forward or backward makes every capture fail (the steps then run directly).
//!
//! The engine's methods by concern: `products.rs` (the matrix products and linear layers),
//! `forward.rs`, `backward.rs`, `losses.rs` (the loss passes, the embedding loss, evaluation),
//! `step_loop.rs` (whole attacks, captured into graphs), `staged.rs` (uploads staged ahead of
//! a batch) and `weights.rs` (the model on the device).

pub mod attention_plan;
mod backward;
mod forward;
mod losses;
pub(crate) mod positions;
mod products;
mod staged;
mod step_loop;
pub mod weights;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::kernels::attention::{check_head_layout, tensor_cores_run_heads};
use super::kernels::embed::PackedImages;
use super::kernels::loss::LossScratch;
use super::kernels::resize::{ResizePlan, ResizeSizes};
use super::pool::{BufferPool, Pooled, PooledBf16};
use super::{Buffer, Device, GpuError};
use crate::attack::engine::{
    Engine, EngineError, LossAndGradient, StageKey, StagingCounters, StepLoopOutput, StepPlan,
};
use crate::attack::image::{Evaluation, Planar};
use crate::attack::loss::Objective;
use crate::model::Model;
use attention_plan::{
    AttentionKernels, AttentionPass, AttentionSetting, AttentionTuning, ShapeBucket,
};
use weights::{
    upload_block, upload_linear, upload_ln, DeviceBlock, DeviceLayerNorm, DeviceLinear, Weight,
};

/// Storage precision of the engine's matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Everything fp32.
    #[default]
    Fp32,
    /// The matrix products (every linear layer's forward and input-gradient product, and the
    /// products inside attention, on tensor cores) take bf16 inputs, rounded to nearest even
    /// from the fp32 activations, gradients and weights, and accumulate in fp32. Tensors whose
    /// only consumers read bf16 are stored in bf16, as PyTorch autocast stores them: q|k|v
    /// (v3 attention) and the MLP pre-activation (written by their products with a bf16 bias
    /// in the epilogue), the MLP hidden layer, and the MLP's gradient before the activation.
    /// LayerNorm and its statistics, softmax statistics, losses, the residual stream, the
    /// optimiser and every output stay fp32.
    Bf16,
}

/// The device tables of one batch geometry (the images' sizes), uploaded once and shared by
/// every batch of that geometry: a captured step graph reads them at fixed addresses, and
/// holds them (an `Arc`) for its lifetime.
struct BatchGeometry {
    packing: PackedImages,
    table: Buffer<i32>,
    cu_seqlens: Buffer<i32>,
    seqlens: Vec<usize>,
    /// Each image's position embedding at its grid, packed like the tokens `[ΣT_i, D]`.
    pos: Buffer<f32>,
    /// The loss kernels' scratch for this geometry (one loss pass at a time).
    loss_scratch: Mutex<LossScratch>,
}

/// One packed batch: its geometry's tables and its pixels on the device. Derefs to the
/// geometry, so `batch.cu_seqlens` and friends read as fields.
struct Batch {
    geometry: Arc<BatchGeometry>,
    images: Pooled,
}

impl std::ops::Deref for Batch {
    type Target = BatchGeometry;
    fn deref(&self) -> &BatchGeometry {
        &self.geometry
    }
}

/// What attention's backward needs from its forward: q/k/v and the context in the precision
/// the attention kernels read them (fp32 for v1 and v2, bf16 for v3), and the log-sum-exp.
enum AttentionSaved {
    F32 {
        qkv: Pooled,
        context: Pooled,
    },
    Bf16 {
        qkv: PooledBf16,
        context: PooledBf16,
    },
}

/// Saved activations of one block.
struct BlockSaved {
    ln1_mean: Pooled,
    ln1_rstd: Pooled,
    attention: AttentionSaved,
    lse: Pooled,
    mid: Pooled,
    ln2_mean: Pooled,
    ln2_rstd: Pooled,
    mlp_pre: MlpPre,
}

/// The MLP pre-activation `fc1(LN2(mid)) + b₁` the activation's backward reads: fp32, or bf16
/// as fc1's bf16-output product wrote it (bf16 precision).
enum MlpPre {
    F32(Pooled),
    Bf16(PooledBf16),
}

struct Forward {
    features: Vec<Pooled>,
    /// What LN_pre's backward reads; `None` for a tower without LN_pre, whose F_0 is the
    /// embedded tokens.
    ln_pre: Option<PreNormSaved>,
    blocks: Vec<BlockSaved>,
}

/// LN_pre's input (the embedded tokens) and its statistics.
struct PreNormSaved {
    embedded: Pooled,
    mean: Pooled,
    rstd: Pooled,
}

/// What adding a layer's loss gradient did to the backward's running gradient `dh`.
enum GradientUpdate {
    /// The layer is not in the objective: `dh` (and its bf16 copy) as they were.
    Unchanged,
    /// `dh` changed; its bf16 copy is stale.
    Changed,
    /// `dh` changed and its bf16 copy was written with it.
    ChangedWithCopy,
}

impl GradientUpdate {
    /// Whether dh's bf16 copy matches dh after this update, given whether it did before.
    fn copy_valid(self, before: bool) -> bool {
        match self {
            GradientUpdate::Unchanged => before,
            GradientUpdate::Changed => false,
            GradientUpdate::ChangedWithCopy => true,
        }
    }
}

/// Clean features of a batch, kept on the device.
pub struct GpuClean {
    sizes: Vec<(usize, usize)>,
    features: Vec<Pooled>,
    /// Each image's image embedding `[images, E]` (host), for the `embed` loss only: formed
    /// from `features` the first time that loss asks for it, so no other objective waits for a
    /// download after a clean forward (dynamic scale runs one every step).
    embeddings: OnceLock<Vec<f32>>,
}

/// Batch geometries by image sizes, and resize plans by (from, to) sizes: uploaded once per
/// shape. Bounded: dynamic scale makes a new shape nearly every step.
type GeometryCache = Mutex<HashMap<Vec<(usize, usize)>, Arc<BatchGeometry>>>;
type ResizeCache = Mutex<HashMap<Vec<ResizeSizes>, Arc<ResizePlan>>>;
const MAX_CACHED_SHAPES: usize = 64;
/// A geometry holds its batch's position table (`[ΣT_i, D]` fp32): under dynamic scale,
/// where geometries seldom repeat, 64 of them at 32 paper images would hold 4.4 GB.
const MAX_CACHED_GEOMETRY_BYTES: usize = 512 << 20;

/// The bf16 left operand of the products (bf16 precision), shared with the graphs that were
/// captured using it.
type Bf16Scratch = Arc<Mutex<Buffer<half::bf16>>>;

/// Whether the engine's step loop may capture CUDA graphs, and what it did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps captured into a graph (each also ran, by launching its graph once).
    pub captures: usize,
    /// Steps run by replaying a captured graph.
    pub replays: usize,
    /// Steps run directly (warm-up steps, escape steps, dynamic scale, graphs off).
    pub direct_steps: usize,
    /// Captures that failed (the engine then turned graphs off and ran directly).
    pub failures: usize,
    /// Operations one replay runs (kernel launches, products, copies, fills), last capture.
    pub ops_per_replay: crate::gpu::GraphOps,
}

/// A LayerNorm output with the statistics its backward needs.
struct Normed {
    y: Pooled,
    mean: Pooled,
    rstd: Pooled,
}

/// Per-image loss values: on the device (summed there over layers, so a step never waits for
/// them) or already on the host (the `embed` loss is computed there).
enum Losses {
    Device(Pooled),
    Host(Vec<f64>),
}

impl Losses {
    fn values(self, dev: &Device) -> Result<Vec<f64>, GpuError> {
        match self {
            Losses::Device(b) => Ok(dev.download(&b)?.into_iter().map(f64::from).collect()),
            Losses::Host(v) => Ok(v),
        }
    }
}

/// One loss evaluation of a batch: per-image values, the input gradient when asked for, and
/// the forward it came from.
struct LossPass {
    losses: Losses,
    gradient: Option<Pooled>,
    forward: Forward,
}

/// How much of the tower a loss pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Depth {
    /// The blocks the objective reads ([`GpuVit::set_skip_unused_blocks`]).
    Loss,
    /// Every block: evaluations report every layer's cosine.
    All,
}

/// The GPU engine for one model on one device.
pub struct GpuVit<'m> {
    dev: Device,
    model: &'m Model,
    patch_embed: DeviceLinear,
    /// `None` for a tower without a class token.
    class_embedding: Option<Buffer<f32>>,
    /// `None` for a tower without LN_pre.
    ln_pre: Option<DeviceLayerNorm>,
    blocks: Vec<DeviceBlock>,
    /// Position embeddings by patch grid, on the device (the geometries' tables are copied
    /// from them).
    positions: positions::DevicePositions,
    /// Batch tables by geometry, reused across steps and batches.
    geometries: GeometryCache,
    /// Resize plans by geometry (the step loop's resizes).
    resize_plans: ResizeCache,
    /// Activations, gradients and scratch of every step.
    pool: BufferPool,
    precision: Precision,
    /// The tensor-core attention kernels at bf16 precision (`PRM_ATTENTION`; default `auto`
    /// on CUDA, v3 on the simulator; `attention_plan.rs`).
    attention: AttentionSetting,
    /// Under `auto`: the kernels chosen per pass and shape bucket.
    attention_plans: Mutex<HashMap<(AttentionPass, ShapeBucket), AttentionKernels>>,
    /// Under `auto`: what was timed, in order (reports).
    attention_tuning: Mutex<Vec<AttentionTuning>>,
    /// bf16 copy of a product's left operand (bf16 precision only), grown on demand. One is
    /// enough: products run one at a time, in stream order.
    bf16_scratch: Mutex<Option<Bf16Scratch>>,
    /// The step loop captures fixed-shape steps into graphs (see `step_loop.rs`).
    graphs: AtomicBool,
    graph_stats: Mutex<GraphStats>,
    /// The next batch's clean images, staged on a copy stream (`staged.rs`).
    staging: Mutex<staged::Staging>,
    /// The prm or nrd loss at a block's input layer runs inside that block's LN1 backward (one
    /// pass over the rows instead of two; same bits). Off: `PRM_FUSED_LOSS=0`.
    fused_loss: AtomicBool,
    /// A loss pass runs only the blocks its objective reads (default); off, every block (the
    /// same bits: a knob for the tests).
    skip_unused_blocks: AtomicBool,
}

impl<'m> GpuVit<'m> {
    /// Uploads the model's weights to `dev` (fp32 throughout).
    pub fn new(dev: &Device, model: &'m Model) -> Result<Self, GpuError> {
        Self::new_with_precision(dev, model, Precision::Fp32)
    }

    /// Uploads the model's weights to `dev`, the linear layers' weights in `precision`
    /// (see [`Precision`]).
    pub fn new_with_precision(
        dev: &Device,
        model: &'m Model,
        precision: Precision,
    ) -> Result<Self, GpuError> {
        let w = &model.weights;
        let c = &model.config;
        // Before any upload: heads no kernel runs are refused with the way out (the CPU).
        check_head_layout("vision tower", c.width, c.heads).map_err(GpuError::Config)?;
        let blocks = w
            .blocks
            .iter()
            .map(|b| upload_block(dev, b, precision))
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(GpuVit {
            dev: dev.clone(),
            model,
            patch_embed: upload_linear(dev, &w.patch_embed, precision)?,
            class_embedding: w
                .class_embedding
                .as_ref()
                .map(|cls| dev.upload(cls))
                .transpose()?,
            ln_pre: w.ln_pre.as_ref().map(|ln| upload_ln(dev, ln)).transpose()?,
            blocks,
            positions: positions::DevicePositions::new(
                w.position_embedding.clone(),
                c.width,
                c.grid,
            ),
            geometries: Mutex::new(HashMap::new()),
            resize_plans: Mutex::new(HashMap::new()),
            pool: BufferPool::new(dev),
            precision,
            attention: AttentionSetting::from_env(dev.is_sim()).map_err(GpuError::Config)?,
            attention_plans: Mutex::new(HashMap::new()),
            attention_tuning: Mutex::new(Vec::new()),
            bf16_scratch: Mutex::new(None),
            graphs: AtomicBool::new(graphs_by_default()),
            graph_stats: Mutex::new(GraphStats::default()),
            staging: staged::new_staging(),
            fused_loss: AtomicBool::new(fused_loss_by_default()),
            skip_unused_blocks: AtomicBool::new(true),
        })
    }

    /// Turns the step loop's graphs on or off (default: on, unless the environment sets
    /// `PRM_NO_GRAPHS=1`). Results are bit-identical either way; graphs only remove the
    /// host's per-launch cost.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, Ordering::Relaxed);
    }

    /// Runs the prm or nrd loss at a block's input layer inside that block's LN1 backward (default:
    /// on, unless the environment sets `PRM_FUSED_LOSS=0`), or as a pass of its own. Results
    /// are bit-identical either way: a knob for measuring what the fusion saves.
    pub fn set_fused_loss(&self, on: bool) {
        self.fused_loss.store(on, Ordering::Relaxed);
    }

    /// Runs, in a loss pass, only the blocks up to the deepest layer the objective reads
    /// (default: on), or every block. The blocks above carry an exactly zero gradient back, so
    /// results are bit-identical either way (unless a skipped block overflowed, where the full
    /// pass would spread its NaN).
    pub fn set_skip_unused_blocks(&self, on: bool) {
        self.skip_unused_blocks.store(on, Ordering::Relaxed);
    }

    /// The blocks a loss pass of `objective` runs at `depth`.
    fn blocks_for(&self, objective: &Objective, depth: Depth) -> usize {
        let all = self.blocks.len();
        match depth {
            Depth::Loss if self.skip_unused_blocks.load(Ordering::Relaxed) => {
                objective.blocks_needed().min(all)
            }
            _ => all,
        }
    }

    /// Whether the step loop may capture graphs (turned off by [`Self::set_graphs`], or for
    /// good after a capture failed).
    pub fn graphs(&self) -> bool {
        self.graphs.load(Ordering::Relaxed)
    }

    /// Bounds the memory the engine's buffer pool keeps cached between uses (default 4 GiB;
    /// see [`BufferPool::set_cache_limit`]). Graphs do not depend on it: the step before a
    /// capture keeps what the capture needs whatever the bound.
    pub fn set_pool_cache_limit(&self, bytes: usize) {
        self.pool.set_cache_limit(bytes);
    }

    /// What the step loop did with graphs since the engine was created.
    pub fn graph_stats(&self) -> GraphStats {
        *self.graph_stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The precision of the matrix products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Whether attention runs the v3 or v4 kernels (bf16 q/k/v and context).
    fn attention_v3(&self) -> bool {
        self.precision == Precision::Bf16 && self.tensor_core_heads() && self.attention.bf16_qkv()
    }

    /// Whether the tower's heads are v3's (multiples of 8 from 64 to 128; v4 takes those of 64,
    /// and runs v3 for the others). Narrower heads run the SIMT kernels at bf16: the engine then
    /// keeps q|k|v and the context in fp32, as under `PRM_ATTENTION=v2`, and its products stay
    /// bf16.
    fn tensor_core_heads(&self) -> bool {
        let c = &self.model.config;
        tensor_cores_run_heads(c.width, c.heads)
    }

    /// The tower's heads.
    fn heads(&self) -> usize {
        self.model.config.heads
    }

    /// A pooled buffer with undefined contents (NaN under the simulator).
    fn alloc(&self, len: usize) -> Result<Pooled, GpuError> {
        self.pool.take(len)
    }

    /// Packs `images` (planar, any sizes) into one device batch.
    fn batch(&self, images: &[Planar]) -> Result<Batch, GpuError> {
        let sizes: Vec<(usize, usize)> = images.iter().map(|im| (im.height, im.width)).collect();
        let data: Vec<&[f32]> = images.iter().map(|im| im.data).collect();
        self.batch_on_device(&sizes, self.upload_packed(&data)?)
    }

    /// A batch of images already on the device, packed planar at `sizes`.
    fn batch_on_device(&self, sizes: &[(usize, usize)], images: Pooled) -> Result<Batch, GpuError> {
        let geometry = self.geometry(sizes)?;
        assert_eq!(
            images.len(),
            geometry.packing.total_pixels,
            "packed images do not match their sizes"
        );
        Ok(Batch { geometry, images })
    }

    /// The tables of the batch geometry `sizes`, uploaded on first use and cached.
    fn geometry(&self, sizes: &[(usize, usize)]) -> Result<Arc<BatchGeometry>, GpuError> {
        let cached = self
            .geometries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sizes)
            .cloned();
        let geometry = match cached {
            Some(g) => g,
            None => {
                let c = &self.model.config;
                let packing = PackedImages::with_class_tokens(sizes, c.patch, c.class_tokens());
                // Every row is copied from a grid below (the simulator's poison checks it).
                let mut pos = self.dev.alloc_undefined(packing.total_tokens * c.width)?;
                for p in &packing.images {
                    let grid = self.positions.grid(&self.dev, p.grid_h, p.grid_w)?;
                    let at = p.token_offset * c.width;
                    self.dev.copy_range(&grid, 0, &mut pos, at, grid.len())?;
                }
                let g = Arc::new(BatchGeometry {
                    table: packing.upload_table(&self.dev)?,
                    cu_seqlens: self.dev.upload(&packing.cu_seqlens())?,
                    seqlens: packing.images.iter().map(|p| p.tokens()).collect(),
                    pos,
                    loss_scratch: Mutex::new(LossScratch::new(
                        &self.dev,
                        packing.total_tokens,
                        packing.len(),
                    )?),
                    packing,
                });
                let mut cache = self.geometries.lock().unwrap_or_else(|p| p.into_inner());
                let held: usize = cache.values().map(|g| g.pos.bytes()).sum();
                if cache.len() >= MAX_CACHED_SHAPES
                    || held + g.pos.bytes() > MAX_CACHED_GEOMETRY_BYTES
                {
                    cache.clear(); // graphs hold the geometries they use
                }
                cache.insert(sizes.to_vec(), g.clone());
                g
            }
        };
        // A graph captured now reads these tables at their addresses.
        self.dev.pin_to_capture(geometry.clone());
        Ok(geometry)
    }

    /// Splits a packed planar buffer into per-image vectors.
    fn unpack_images(
        &self,
        batch: &Batch,
        packed: &Buffer<f32>,
    ) -> Result<Vec<Vec<f32>>, GpuError> {
        let host = self.dev.download(packed)?;
        Ok(batch
            .packing
            .images
            .iter()
            .map(|p| host[p.pixel_offset..p.pixel_offset + p.pixels()].to_vec())
            .collect())
    }
}

impl Engine for GpuVit<'_> {
    type Clean = GpuClean;

    fn model(&self) -> &Model {
        self.model
    }

    fn clean_features(&self, images: &[Planar]) -> Result<GpuClean, EngineError> {
        let sizes = images.iter().map(|im| (im.height, im.width)).collect();
        if images.is_empty() {
            return Ok(GpuClean {
                sizes,
                features: Vec::new(),
                embeddings: OnceLock::new(),
            });
        }
        let batch = self.batch(images)?;
        let fwd = self.forward(&batch, false, self.blocks.len())?;
        Ok(GpuClean {
            sizes,
            features: fwd.features,
            embeddings: OnceLock::new(),
        })
    }

    fn loss_and_gradient(
        &self,
        adv: &[Planar],
        clean: &GpuClean,
        objective: &Objective,
    ) -> Result<Vec<LossAndGradient>, EngineError> {
        check_geometry(adv, clean);
        let batch = self.batch(adv)?;
        let LossPass {
            losses,
            gradient: grad,
            ..
        } = self.loss(&batch, clean, objective, true, Depth::Loss)?;
        let grads = self.unpack_images(&batch, &grad.expect("gradient requested"))?;
        Ok(losses
            .values(&self.dev)?
            .into_iter()
            .zip(grads)
            .map(|(loss, gradient)| LossAndGradient { loss, gradient })
            .collect())
    }

    fn evaluate(
        &self,
        adv: &[Planar],
        clean: &GpuClean,
        objective: &Objective,
    ) -> Result<Vec<Evaluation>, EngineError> {
        check_geometry(adv, clean);
        let batch = self.batch(adv)?;
        Ok(self.evaluate_batch(&batch, clean, objective)?)
    }

    fn release_cached_memory(&self) {
        self.pool.release();
        self.release_staging();
        // Graphs never outlive a step loop (they are dropped when it returns, before a caller
        // can react to its out-of-memory error), and a graph owns the pool arena and holds the
        // tables it uses: clearing the caches here never frees memory under a graph.
        *self.bf16_scratch.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.geometries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.resize_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn run_steps(
        &self,
        plan: &StepPlan,
        on_step: &mut dyn FnMut(usize),
    ) -> Option<Result<StepLoopOutput<GpuClean>, EngineError>> {
        Some(self.step_loop(plan, on_step).map_err(EngineError::from))
    }

    fn stages_uploads(&self) -> bool {
        self.staging_enabled()
    }

    fn stage(&self, key: &StageKey, clean: &[Planar]) {
        self.stage_clean(key, clean)
    }

    fn kernel_choices(&self) -> Vec<String> {
        let attention = self.attention_tuning();
        let attention = attention.iter().map(AttentionTuning::summary_line);
        // The device's (PRM_PRODUCTS=timed; engines sharing a device share its products).
        let products = self.dev.product_tunings();
        let products = products
            .iter()
            .map(|t| format!("product {}", crate::gpu::product_timing::describe(t)));
        attention.chain(products).collect()
    }

    fn staging_counters(&self) -> StagingCounters {
        self.staging_totals()
    }
}

/// The bf16 weight of a linear layer (bf16 precision, where every weight is bf16).
fn bf16_weight(w: &Weight) -> &Buffer<half::bf16> {
    match w {
        Weight::Bf16(w) => w,
        Weight::F32(_) => unreachable!("bf16 operands go with bf16 weights"),
    }
}

/// Adversarial images must come in the clean batch's order and sizes.
fn check_geometry(adv: &[Planar], clean: &GpuClean) {
    let sizes: Vec<(usize, usize)> = adv.iter().map(|im| (im.height, im.width)).collect();
    assert_eq!(
        sizes, clean.sizes,
        "adversarial batch does not match the clean batch"
    );
}

/// Graphs are on unless the environment sets `PRM_NO_GRAPHS=1` (`prm attack` has no flag for
/// it; `prm bench --graphs on|off` overrides it).
fn graphs_by_default() -> bool {
    std::env::var("PRM_NO_GRAPHS").map_or(true, |v| v != "1")
}

/// The LN1-and-loss fusion is on unless the environment sets `PRM_FUSED_LOSS=0`.
fn fused_loss_by_default() -> bool {
    std::env::var("PRM_FUSED_LOSS").map_or(true, |v| v.trim() != "0")
}

/// Device memory one token of a batch needs during an attack whose loss runs `blocks` blocks
/// ([`Objective::blocks_needed`](crate::attack::Objective::blocks_needed); more than the
/// model has counts as all): each run block's saved activations (q|k|v, context, log-sum-exp,
/// residual, MLP pre-activation, LayerNorm statistics, features), or the evaluation's features
/// of every layer where that is more, the clean features, the largest transients of the
/// backward, and [`WORKING_IMAGES`] images at the working size (a token's patch of pixels
/// each), in fp32 but for what the bf16 engine keeps in bf16 (q|k|v and the MLP
/// pre-activation), plus 30% for the buffer pool's size classes. ViT-B/16 at 224 px, every
/// block: 130 MB per image in fp32, 97 MB in bf16 (measured peak on an H100 at batch 64,
/// 2026-11: 100 MB per image). The simulator measures what the engine allocates and
/// `tests/device_memory.rs` checks that this covers it.
pub fn step_bytes_per_token(
    config: &crate::model::VisionConfig,
    blocks: usize,
    precision: Precision,
) -> usize {
    let (d, m, l) = (config.width, config.mlp, config.layers);
    let heads = config.heads.max(1);
    // In fp32 elements: a bf16 tensor counts half. q|k|v is bf16 only where attention runs v3
    // or v4 (heads 64 to 128 wide); narrower heads' bf16 engine keeps it in fp32 for v1.
    let bf16_qkv = tensor_cores_run_heads(d, config.heads);
    let (qkv, hidden) = match precision {
        Precision::Fp32 => (3 * d, m),
        Precision::Bf16 if bf16_qkv => ((3 * d).div_ceil(2), m.div_ceil(2)),
        Precision::Bf16 => (3 * d, m.div_ceil(2)),
    };
    let saved = blocks.min(l) * (qkv + d + heads + d + hidden + 4 + d);
    // The final evaluation runs every block without saving, holding F_0..F_L.
    let evaluated = (l + 1) * d;
    let clean = (l + 1) * d;
    let transient = 4 * m + 8 * d;
    let images = WORKING_IMAGES * 3 * config.patch * config.patch;
    (saved.max(evaluated) + clean + transient + images) * 4 * 13 / 10
}

/// Images at the working size (resized, patchified, and their gradients) that
/// [`step_bytes_per_token`] counts for a batch: with a small width (`random:tiny`) they are
/// most of a token's memory.
pub const WORKING_IMAGES: usize = 8;

/// Device memory one pixel of an image at its native size costs during an attack: the engine
/// keeps the clean and adversarial images, the gradient, the resize's scratch and the
/// optimiser's state (AdamW's δ, m and v) at the native size, in fp32 (12 bytes a pixel each).
/// Measured on the simulator (`prm bench --device sim`, the growth of the peak between two
/// native sizes): 61 bytes a pixel under pgd and mifgsm, 85 under adamw; a buffer pool's size
/// class adds up to 25% to a buffer, so at unlucky sizes adamw's seven images take up to 105.
/// This is eight images and their classes' worst case.
pub const NATIVE_PIXEL_BYTES: usize = 8 * 12 * 5 / 4;

/// `--batch-size auto`'s device-memory budget per batch on a GPU with `free_bytes` free, for a
/// loss that runs `blocks` blocks: 80% of the free memory (the rest for the products'
/// workspace, the position and geometry caches and the driver), each image costing its tokens
/// at [`step_bytes_per_token`] and its native pixels at [`NATIVE_PIXEL_BYTES`].
pub fn auto_batch_memory(
    free_bytes: usize,
    config: &crate::model::VisionConfig,
    blocks: usize,
    precision: Precision,
) -> crate::attack::campaign::MemoryBudget {
    crate::attack::campaign::MemoryBudget {
        bytes: free_bytes / 5 * 4,
        per_token: step_bytes_per_token(config, blocks, precision),
        per_native_pixel: NATIVE_PIXEL_BYTES,
    }
}

/// Tokens per batch beyond which a larger batch stopped paying on an H100 (ViT-B/16: batch 64 =
/// 12,608 tokens ran 93 images/s, batch 128 ran 83; docs/PERFORMANCE.md).
pub const AUTO_BATCH_TOKENS: usize = 16_384;

/// `--batch-size auto`'s token budget per batch on a GPU, for a loss that runs `blocks`
/// blocks: the tokens that fit in [`auto_batch_memory`]'s budget (at [`step_bytes_per_token`],
/// native pixels aside), capped at
/// [`AUTO_BATCH_TOKENS`], at least 1 (a batch always takes one image, however large; the
/// campaign's out-of-memory handling fails it cleanly when even that does not fit).
pub fn auto_batch_tokens(
    free_bytes: usize,
    config: &crate::model::VisionConfig,
    blocks: usize,
    precision: Precision,
) -> usize {
    let memory = auto_batch_memory(free_bytes, config, blocks, precision);
    let by_memory = memory.bytes / memory.per_token.max(1);
    by_memory.clamp(1, AUTO_BATCH_TOKENS)
}

#[cfg(test)]
mod auto_batch_tests {
    use super::*;
    use crate::model::builtin_config;

    #[test]
    fn vit_b_16_needs_about_130_mb_per_224_px_image_in_fp32_and_less_in_bf16() {
        let c = builtin_config("vit-b-16").unwrap();
        let bf16 = 197 * step_bytes_per_token(&c, c.layers, Precision::Bf16);
        assert!((85 << 20..100 << 20).contains(&bf16), "{bf16}");
        let per_image = 197 * step_bytes_per_token(&c, c.layers, Precision::Fp32);
        assert!((115 << 20..145 << 20).contains(&per_image), "{per_image}");
        assert_eq!(
            step_bytes_per_token(&c, c.layers + 5, Precision::Fp32),
            per_image / 197
        );
    }

    #[test]
    fn a_shallow_loss_needs_less_but_never_less_than_the_evaluation() {
        let c = builtin_config("vit-b-16").unwrap();
        let all = step_bytes_per_token(&c, c.layers, Precision::Fp32);
        let three = step_bytes_per_token(&c, 3, Precision::Fp32);
        assert!(three * 2 < all, "{three} against {all}");
        // Below a block or so, the final evaluation's F_0..F_L (no saved activations) bind.
        assert_eq!(
            step_bytes_per_token(&c, 0, Precision::Fp32),
            step_bytes_per_token(&c, 1, Precision::Fp32)
        );
        assert!(
            step_bytes_per_token(&c, 2, Precision::Fp32)
                > step_bytes_per_token(&c, 1, Precision::Fp32)
        );
    }

    #[test]
    fn auto_batch_tokens_is_bounded_by_memory_and_by_the_cap() {
        let c = builtin_config("vit-b-16").unwrap();
        let l = c.layers;
        assert_eq!(
            auto_batch_tokens(80 << 30, &c, l, Precision::Fp32),
            AUTO_BATCH_TOKENS
        );
        let per_token = step_bytes_per_token(&c, l, Precision::Fp32);
        assert_eq!(
            auto_batch_tokens(1 << 30, &c, l, Precision::Fp32),
            (1usize << 30) / 5 * 4 / per_token
        );
        assert!(
            auto_batch_tokens(1 << 30, &c, 3, Precision::Fp32)
                > 2 * auto_batch_tokens(1 << 30, &c, l, Precision::Fp32)
        );
        assert_eq!(auto_batch_tokens(0, &c, l, Precision::Fp32), 1);
    }
}
