//! The GPU engine: the ViT forward, the losses and the input-gradient backward for a packed
//! batch of images of mixed sizes, on any [`Device`] (CUDA, or the simulator in CI).
//!
//! A batch is a packed token matrix `[ΣT_i, D]` with a `cu_seqlens` table (DESIGN §6): linear
//! layers and LayerNorm see one tall matrix, attention and the embedding read the offsets.
//! Clean features stay on the device between steps ([`GpuClean`]); the loss kernels add each
//! selected layer's gradient straight into the backward's running gradient.
//!
//! Per-geometry device tables (the packing table, `cu_seqlens`, position embeddings, loss
//! scratch: `BatchGeometry`) and resize plans are uploaded once per geometry and cached: the
//! step loop captures fixed-shape steps into graphs (`step_loop.rs`), and nothing inside a
//! captured step may upload. A new per-batch table belongs in `BatchGeometry`; an upload in
//! the forward or backward makes every capture fail (the steps then run directly).

mod losses;
mod staged;
mod step_loop;
pub mod weights;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::gemm::{matmul_bf16_bf16out, matmul_bf16_residual, matmul_f32_residual, MatmulShape};
use super::kernels::activation::{
    activation_backward_bf16, activation_backward_inplace_f32, bias_activation_forward_bf16,
    bias_activation_forward_f32,
};
use super::kernels::attention::{
    attention_backward_f32, attention_backward_tc, attention_backward_tc3_bf16_dout,
    attention_backward_tc4_bf16_dout, attention_forward_f32, attention_forward_tc,
    attention_forward_tc3, attention_forward_tc4, attention_scratch_len, AttentionMode,
    TensorCoreVersion,
};
use super::kernels::convert::to_bf16;
use super::kernels::embed::{
    assemble_tokens_f32, col2im_f32, patchify_bf16, patchify_f32, tokens_to_patch_grads_f32,
    tokens_to_patch_grads_f32_bf16out, PackedImages,
};
use super::kernels::layernorm::{
    layernorm_backward_f32, layernorm_backward_f32_bf16copy, layernorm_forward_f32,
    layernorm_forward_f32_bf16out,
};
use super::kernels::layernorm_loss::LayerNormBackward;
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
use crate::reference::resize::PositionEmbeddingCache;
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
    embedded: Pooled,
    ln_pre_mean: Pooled,
    ln_pre_rstd: Pooled,
    blocks: Vec<BlockSaved>,
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
    /// Each image's CLS row of the last layer (host), for the `embed` loss only: read from
    /// `features` the first time that loss asks for it, so no other objective waits for a
    /// download after a clean forward (dynamic scale runs one every step).
    cls_rows: OnceLock<Vec<Vec<f32>>>,
}

/// Batch geometries by image sizes, and resize plans by (from, to) sizes: uploaded once per
/// shape. Bounded: dynamic scale makes a new shape nearly every step.
type GeometryCache = Mutex<HashMap<Vec<(usize, usize)>, Arc<BatchGeometry>>>;
type ResizeCache = Mutex<HashMap<Vec<ResizeSizes>, Arc<ResizePlan>>>;
const MAX_CACHED_SHAPES: usize = 64;

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

/// The GPU engine for one model on one device.
pub struct GpuVit<'m> {
    dev: Device,
    model: &'m Model,
    patch_embed: DeviceLinear,
    class_embedding: Buffer<f32>,
    ln_pre: DeviceLayerNorm,
    blocks: Vec<DeviceBlock>,
    positions: PositionEmbeddingCache,
    /// Batch tables by geometry, reused across steps and batches.
    geometries: GeometryCache,
    /// Resize plans by geometry (the step loop's resizes).
    resize_plans: ResizeCache,
    /// Activations, gradients and scratch of every step.
    pool: BufferPool,
    precision: Precision,
    /// The tensor-core attention kernels at bf16 precision (`PRM_ATTENTION`, default v3).
    attention_version: TensorCoreVersion,
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
        let blocks = w
            .blocks
            .iter()
            .map(|b| upload_block(dev, b, precision))
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(GpuVit {
            dev: dev.clone(),
            model,
            patch_embed: upload_linear(dev, &w.patch_embed, precision)?,
            class_embedding: dev.upload(&w.class_embedding)?,
            ln_pre: upload_ln(dev, &w.ln_pre)?,
            blocks,
            positions: PositionEmbeddingCache::new(w.position_embedding.clone(), c.width, c.grid),
            geometries: Mutex::new(HashMap::new()),
            resize_plans: Mutex::new(HashMap::new()),
            pool: BufferPool::new(dev),
            precision,
            attention_version: TensorCoreVersion::from_env().map_err(GpuError::Config)?,
            bf16_scratch: Mutex::new(None),
            graphs: AtomicBool::new(graphs_by_default()),
            graph_stats: Mutex::new(GraphStats::default()),
            staging: staged::new_staging(),
            fused_loss: AtomicBool::new(fused_loss_by_default()),
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

    /// The tensor-core attention kernels used at bf16 precision (read from `PRM_ATTENTION`
    /// when the engine is made; [`Self::set_attention_version`] overrides it).
    pub fn attention_version(&self) -> TensorCoreVersion {
        self.attention_version
    }

    /// Selects the tensor-core attention kernels for bf16 precision (v2, v3 or v4; fp32
    /// precision always uses the SIMT kernels).
    pub fn set_attention_version(&mut self, version: TensorCoreVersion) {
        self.attention_version = version;
    }

    /// Whether attention runs the v3 or v4 kernels (bf16 q/k/v and context).
    fn attention_v3(&self) -> bool {
        self.precision == Precision::Bf16 && self.attention_version.bf16_qkv()
    }

    /// Whether the bf16 q/k/v kernels are v4's (v3's otherwise; same results).
    fn attention_v4(&self) -> bool {
        self.attention_version == TensorCoreVersion::V4
    }

    /// `out = (residual or 0) + x · op(W) + bias` in the engine's precision: in bf16, `x` is
    /// rounded to bf16 first (W already is) and the product accumulates in fp32. The residual
    /// is read by the product itself (cuBLASLt's C), so it needs no copy into `out` first.
    fn product(
        &self,
        shape: MatmulShape,
        x: &Buffer<f32>,
        w: &Weight,
        bias: Option<&Buffer<f32>>,
        residual: Option<&Buffer<f32>>,
        out: &mut Buffer<f32>,
    ) -> Result<(), GpuError> {
        match w {
            Weight::F32(w) => matmul_f32_residual(&self.dev, shape, x, w, bias, residual, out),
            Weight::Bf16(_) => self.product_from_bf16(shape, w, bias, residual, out, |xb| {
                to_bf16(&self.dev, x, xb, shape.m * shape.k)
            }),
        }
    }

    /// [`Self::product`] in bf16 precision, with the bf16 left operand written by `fill` into the
    /// engine's operand scratch (a kernel that produces its output in bf16 directly saves the
    /// conversion pass).
    fn product_from_bf16(
        &self,
        shape: MatmulShape,
        w: &Weight,
        bias: Option<&Buffer<f32>>,
        residual: Option<&Buffer<f32>>,
        out: &mut Buffer<f32>,
        fill: impl FnOnce(&mut Buffer<half::bf16>) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        self.with_bf16_operand(shape.m * shape.k, fill, |xb| {
            self.product_of_bf16(shape, xb, w, bias, residual, out)
        })
    }

    /// Runs `fill` then `product` on the engine's bf16 operand scratch of at least `len`
    /// elements. One scratch is enough: products run one at a time, in stream order, and each
    /// reads its operand before the next kernel overwrites it.
    fn with_bf16_operand(
        &self,
        len: usize,
        fill: impl FnOnce(&mut Buffer<half::bf16>) -> Result<(), GpuError>,
        product: impl FnOnce(&Buffer<half::bf16>) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        let scratch = {
            let mut guard = self.bf16_scratch.lock().unwrap_or_else(|p| p.into_inner());
            let bytes = len * std::mem::size_of::<half::bf16>();
            let small = match guard.as_ref() {
                None => true,
                Some(b) => b.lock().unwrap_or_else(|p| p.into_inner()).capacity_bytes() < bytes,
            };
            if small {
                // Free the smaller one first, unless a graph still holds it.
                *guard = None;
                *guard = Some(Arc::new(Mutex::new(self.dev.alloc::<half::bf16>(len)?)));
            }
            guard.clone().expect("allocated above")
        };
        // A graph captured now reads this scratch at its address: it must outlive the graph.
        self.dev.pin_to_capture(scratch.clone());
        let mut xb = scratch.lock().unwrap_or_else(|p| p.into_inner());
        // Lent at exactly `len` elements, so kernels that check their output's extent see it.
        xb.set_len(len);
        fill(&mut xb)?;
        product(&xb)
    }

    /// `out = (residual or 0) + xb · op(W) + bias` with a bf16 operand `xb` that a kernel
    /// already wrote (bf16 precision only).
    fn product_of_bf16(
        &self,
        shape: MatmulShape,
        xb: &Buffer<half::bf16>,
        w: &Weight,
        bias: Option<&Buffer<f32>>,
        residual: Option<&Buffer<f32>>,
        out: &mut Buffer<f32>,
    ) -> Result<(), GpuError> {
        let w = bf16_weight(w);
        matmul_bf16_residual(&self.dev, shape, xb, w, bias, residual, out)
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
                let packing = PackedImages::new(sizes, c.patch);
                let mut packed = Vec::with_capacity(packing.total_tokens * c.width);
                for p in &packing.images {
                    packed.extend_from_slice(&self.positions.get(p.grid_h, p.grid_w));
                }
                let g = Arc::new(BatchGeometry {
                    table: packing.upload_table(&self.dev)?,
                    cu_seqlens: self.dev.upload(&packing.cu_seqlens())?,
                    seqlens: packing.images.iter().map(|p| p.tokens()).collect(),
                    pos: self.dev.upload(&packed)?,
                    loss_scratch: Mutex::new(LossScratch::new(
                        &self.dev,
                        packing.total_tokens,
                        packing.len(),
                    )?),
                    packing,
                });
                let mut cache = self.geometries.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= MAX_CACHED_SHAPES {
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

    /// `out = (residual or 0) + x · Wᵀ + b`, x `[rows, in]`.
    fn linear(
        &self,
        x: &Buffer<f32>,
        rows: usize,
        l: &DeviceLinear,
        residual: Option<&Buffer<f32>>,
        out: &mut Buffer<f32>,
    ) -> Result<(), GpuError> {
        let bias = l.bias.as_ref();
        self.product(l.forward_shape(rows), x, &l.weight, bias, residual, out)
    }

    /// `dx = dy · W`, dy `[rows, out]`.
    fn linear_backward(
        &self,
        dy: &Buffer<f32>,
        rows: usize,
        l: &DeviceLinear,
        dx: &mut Buffer<f32>,
    ) -> Result<(), GpuError> {
        self.product(l.backward_shape(rows), dy, &l.weight, None, None, dx)
    }

    fn layer_norm(
        &self,
        x: &Buffer<f32>,
        ln: &DeviceLayerNorm,
        rows: usize,
    ) -> Result<Normed, GpuError> {
        let d = self.model.config.width;
        let (mut y, mut mean, mut rstd) =
            (self.alloc(rows * d)?, self.alloc(rows)?, self.alloc(rows)?);
        layernorm_forward_f32(
            &self.dev,
            x,
            &ln.weight,
            &ln.bias,
            &mut y,
            &mut mean,
            &mut rstd,
            rows,
            d,
            self.model.config.ln_eps,
        )?;
        Ok(Normed { y, mean, rstd })
    }

    fn forward(&self, batch: &Batch, save: bool) -> Result<Forward, GpuError> {
        let c = &self.model.config;
        let (n, t, d) = (
            batch.packing.total_patches,
            batch.packing.total_tokens,
            c.width,
        );
        let cols = batch.packing.patch_cols();
        let mut patch_tokens = self.alloc(n * d)?;
        let (packing, table, images) = (&batch.packing, &batch.table, &batch.images);
        match &self.patch_embed.weight {
            Weight::F32(_) => {
                let mut patches = self.alloc(n * cols)?;
                patchify_f32(
                    &self.dev,
                    packing,
                    table,
                    images,
                    &mut patches,
                    c.mean,
                    c.std,
                )?;
                self.linear(&patches, n, &self.patch_embed, None, &mut patch_tokens)?;
            }
            // The patches are written as the patch GEMM's bf16 operand directly.
            Weight::Bf16(_) => self.product_from_bf16(
                self.patch_embed.forward_shape(n),
                &self.patch_embed.weight,
                self.patch_embed.bias.as_ref(),
                None,
                &mut patch_tokens,
                |pb| patchify_bf16(&self.dev, packing, table, images, pb, c.mean, c.std),
            )?,
        }
        let mut embedded = self.alloc(t * d)?;
        assemble_tokens_f32(
            &self.dev,
            &batch.packing,
            &batch.table,
            &patch_tokens,
            &self.class_embedding,
            &batch.pos,
            &mut embedded,
            d,
        )?;
        let Normed {
            y: f0,
            mean: ln_pre_mean,
            rstd: ln_pre_rstd,
        } = self.layer_norm(&embedded, &self.ln_pre, t)?;

        let mut features = vec![f0];
        let mut blocks = Vec::new();
        for b in &self.blocks {
            let x = features.last().expect("F_0 exists");
            // mid = x + out_proj(context): the product reads x as its C, no copy into mid.
            let mut mid = self.alloc(t * d)?;
            let (ln1_mean, ln1_rstd, attention, lse) = if self.attention_v3() {
                // The qkv product writes v3's bf16 q/k/v (bias in its epilogue), and v3 writes
                // the context as out_proj's bf16 operand: q/k/v never exist in fp32.
                let mut qkv = self.pool.take_bf16(t * 3 * d)?;
                let (ln1_mean, ln1_rstd) =
                    self.layer_norm_then_linear_bf16out(x, &b.ln1, t, &b.qkv, &mut qkv)?;
                let (context, lse) = self.attention_forward_v3(&qkv, batch)?;
                let shape = b.out_proj.forward_shape(t);
                let bias = b.out_proj.bias.as_ref();
                let w = &b.out_proj.weight;
                self.product_of_bf16(shape, &context, w, bias, Some(x), &mut mid)?;
                let saved = AttentionSaved::Bf16 { qkv, context };
                (ln1_mean, ln1_rstd, saved, lse)
            } else {
                let mut qkv = self.alloc(t * 3 * d)?;
                let bias = b.qkv.bias.as_ref();
                let (ln1_mean, ln1_rstd) =
                    self.layer_norm_then_linear(x, &b.ln1, t, &b.qkv, bias, &mut qkv)?;
                let (context, lse) = self.attention_forward(&qkv, batch)?;
                self.linear(&context, t, &b.out_proj, Some(x), &mut mid)?;
                (
                    ln1_mean,
                    ln1_rstd,
                    AttentionSaved::F32 { qkv, context },
                    lse,
                )
            };
            let mut out = self.alloc(t * d)?;
            let (ln2_mean, ln2_rstd, mlp_pre) = self.mlp_forward(&mid, b, t, &mut out)?;
            features.push(out);
            if save {
                blocks.push(BlockSaved {
                    ln1_mean,
                    ln1_rstd,
                    attention,
                    lse,
                    mid,
                    ln2_mean,
                    ln2_rstd,
                    mlp_pre,
                });
            }
        }
        Ok(Forward {
            features,
            embedded,
            ln_pre_mean,
            ln_pre_rstd,
            blocks,
        })
    }

    /// `out = LN(x) · Wᵀ (+ bias)`, returning the LayerNorm statistics the backward needs (the
    /// normalised rows themselves are not kept). In bf16 the LayerNorm kernel writes the
    /// product's bf16 operand itself.
    fn layer_norm_then_linear(
        &self,
        x: &Buffer<f32>,
        ln: &DeviceLayerNorm,
        rows: usize,
        l: &DeviceLinear,
        bias: Option<&Buffer<f32>>,
        out: &mut Buffer<f32>,
    ) -> Result<(Pooled, Pooled), GpuError> {
        match self.precision {
            Precision::Fp32 => {
                let Normed { y, mean, rstd } = self.layer_norm(x, ln, rows)?;
                self.product(l.forward_shape(rows), &y, &l.weight, bias, None, out)?;
                Ok((mean, rstd))
            }
            Precision::Bf16 => {
                let w = bf16_weight(&l.weight);
                let shape = l.forward_shape(rows);
                self.layer_norm_bf16_then(x, ln, rows, |yb| {
                    matmul_bf16_residual(&self.dev, shape, yb, w, bias, None, out)
                })
            }
        }
    }

    /// `out = bf16(LN(x) · Wᵀ + b)` (bf16 precision): the LayerNorm kernel writes the product's
    /// bf16 operand, and the product adds the bf16 bias in its epilogue and writes bf16 (for
    /// outputs whose only consumers read bf16). Returns the LayerNorm statistics.
    fn layer_norm_then_linear_bf16out(
        &self,
        x: &Buffer<f32>,
        ln: &DeviceLayerNorm,
        rows: usize,
        l: &DeviceLinear,
        out: &mut Buffer<half::bf16>,
    ) -> Result<(Pooled, Pooled), GpuError> {
        let (w, bias) = (bf16_weight(&l.weight), l.bias_bf16.as_ref());
        let shape = l.forward_shape(rows);
        self.layer_norm_bf16_then(x, ln, rows, |yb| {
            matmul_bf16_bf16out(&self.dev, shape, yb, w, bias, out)
        })
    }

    /// LN(x) written in bf16 into the operand scratch, then `product` of it; returns the
    /// LayerNorm statistics.
    fn layer_norm_bf16_then(
        &self,
        x: &Buffer<f32>,
        ln: &DeviceLayerNorm,
        rows: usize,
        product: impl FnOnce(&Buffer<half::bf16>) -> Result<(), GpuError>,
    ) -> Result<(Pooled, Pooled), GpuError> {
        let (d, eps) = (self.model.config.width, self.model.config.ln_eps);
        let (mut mean, mut rstd) = (self.alloc(rows)?, self.alloc(rows)?);
        self.with_bf16_operand(
            rows * d,
            |yb| {
                layernorm_forward_f32_bf16out(
                    &self.dev, x, &ln.weight, &ln.bias, yb, &mut mean, &mut rstd, rows, d, eps,
                )
            },
            product,
        )?;
        Ok((mean, rstd))
    }

    /// `out = mid + fc2(act(fc1(LN2(mid))))`, returning LN2's statistics and the
    /// pre-activation the backward needs.
    /// - fp32: fc1's product writes the pre-activation without its bias; the activation kernel
    ///   adds the bias, saves `pre` and writes the hidden layer.
    /// - bf16: fc1's product writes the bf16 pre-activation with its bias in the epilogue (the
    ///   saved `pre` is that output, as PyTorch autocast keeps it), and the activation kernel
    ///   reads it and writes fc2's bf16 operand: two bf16 passes over `[rows, mlp]` instead of
    ///   fp32 out, fp32 in, fp32 pre out and bf16 out.
    fn mlp_forward(
        &self,
        mid: &Buffer<f32>,
        b: &DeviceBlock,
        rows: usize,
        out: &mut Buffer<f32>,
    ) -> Result<(Pooled, Pooled, MlpPre), GpuError> {
        let c = &self.model.config;
        let (fc2_shape, fc2_bias) = (b.fc2.forward_shape(rows), b.fc2.bias.as_ref());
        match self.precision {
            Precision::Fp32 => {
                let mut mlp_in = self.alloc(rows * c.mlp)?;
                let (mean, rstd) =
                    self.layer_norm_then_linear(mid, &b.ln2, rows, &b.fc1, None, &mut mlp_in)?;
                let (mut pre, mut hidden) = (self.alloc(rows * c.mlp)?, self.alloc(rows * c.mlp)?);
                bias_activation_forward_f32(
                    &self.dev,
                    c.activation,
                    &mlp_in,
                    b.fc1.bias.as_ref(),
                    Some(&mut pre),
                    &mut hidden,
                    rows,
                    c.mlp,
                )?;
                drop(mlp_in);
                let w = &b.fc2.weight;
                self.product(fc2_shape, &hidden, w, fc2_bias, Some(mid), out)?;
                Ok((mean, rstd, MlpPre::F32(pre)))
            }
            Precision::Bf16 => {
                let mut pre = self.pool.take_bf16(rows * c.mlp)?;
                let (mean, rstd) =
                    self.layer_norm_then_linear_bf16out(mid, &b.ln2, rows, &b.fc1, &mut pre)?;
                let w = &b.fc2.weight;
                self.product_from_bf16(fc2_shape, w, fc2_bias, Some(mid), out, |hb| {
                    // No bias (fc1's epilogue added it) and no pre to save (it is `pre`).
                    let act = c.activation;
                    bias_activation_forward_bf16(&self.dev, act, &pre, None, None, hb, rows, c.mlp)
                })?;
                Ok((mean, rstd, MlpPre::Bf16(pre)))
            }
        }
    }

    /// `d_normed = ((dh · W₂) ⊙ act'(pre)) · W₁`, the MLP's input gradient up to LN2.
    /// - fp32 `pre`: fc2's input-gradient product writes fp32 `d_hidden`, overwritten in place
    ///   with the activation's input gradient.
    /// - bf16 `pre` (bf16 precision): fc2's input-gradient product writes bf16 `d_hidden`, and
    ///   the activation's backward reads it with the bf16 `pre` and writes fc1's bf16 operand
    ///   (PyTorch autocast keeps this gradient in bf16 too; tests/engine_sim.rs measured no
    ///   loss of agreement with the fp32 reference).
    fn mlp_backward(
        &self,
        pre: &MlpPre,
        dh: &Buffer<f32>,
        dh_bf16: Option<&Buffer<half::bf16>>,
        b: &DeviceBlock,
        rows: usize,
        d_normed: &mut Buffer<f32>,
    ) -> Result<(), GpuError> {
        let c = &self.model.config;
        match pre {
            MlpPre::F32(pre) => {
                let mut d_hidden = self.alloc(rows * c.mlp)?;
                self.linear_backward(dh, rows, &b.fc2, &mut d_hidden)?;
                activation_backward_inplace_f32(
                    &self.dev,
                    c.activation,
                    pre,
                    &mut d_hidden,
                    rows,
                    c.mlp,
                )?;
                self.linear_backward(&d_hidden, rows, &b.fc1, d_normed)
            }
            MlpPre::Bf16(pre) => {
                let mut d_hidden = self.pool.take_bf16(rows * c.mlp)?;
                let (w2, fc2_shape) = (bf16_weight(&b.fc2.weight), b.fc2.backward_shape(rows));
                let n = rows * c.width;
                match dh_bf16 {
                    // dh's bf16 copy, written by the kernel that last changed dh.
                    Some(db) => {
                        matmul_bf16_bf16out(&self.dev, fc2_shape, db, w2, None, &mut d_hidden)?
                    }
                    None => self.with_bf16_operand(
                        n,
                        |db| to_bf16(&self.dev, dh, db, n),
                        |db| matmul_bf16_bf16out(&self.dev, fc2_shape, db, w2, None, &mut d_hidden),
                    )?,
                }
                let shape = b.fc1.backward_shape(rows);
                self.product_from_bf16(shape, &b.fc1.weight, None, None, d_normed, |db| {
                    let act = c.activation;
                    activation_backward_bf16(&self.dev, act, pre, &d_hidden, db, rows, c.mlp)
                })
            }
        }
    }

    /// Input-pixel gradient of the batch (packed planar). `add_loss_gradient(l, F_l, dh, copy,
    /// ln)` brings the running gradient `dh` to dL/dF_l at each layer: it first runs `ln`, when
    /// given (the LN1 backward of block l, whose input is F_l: `dh +=` its input gradient; the
    /// loss may fuse it with its own pass over F_l), then adds the loss's dL/dF_l; given `copy`,
    /// it may write dh's bf16 copy (it says which it did). With `ln`, dh always changes.
    fn backward(
        &self,
        batch: &Batch,
        fwd: &Forward,
        mut add_loss_gradient: impl FnMut(
            usize,
            &Buffer<f32>,
            &mut Buffer<f32>,
            Option<&mut Buffer<half::bf16>>,
            Option<LayerNormBackward<'_>>,
        ) -> Result<GradientUpdate, GpuError>,
    ) -> Result<Pooled, GpuError> {
        let c = &self.model.config;
        let (n, t, d) = (
            batch.packing.total_patches,
            batch.packing.total_tokens,
            c.width,
        );
        let mut dh = self.pool.take_zeroed(t * d)?;
        // bf16: dh's bf16 copy, the operand of fc2's input-gradient product, written by the
        // kernel that last changed dh (LN1's backward, the loss at that layer, or both fused)
        // so that no conversion pass runs; `copy_valid` says whether it matches dh.
        let mut dh_bf16 = match self.precision {
            Precision::Bf16 => Some(self.pool.take_bf16(t * d)?),
            Precision::Fp32 => None,
        };
        let last = self.blocks.len();
        let update = add_loss_gradient(
            last,
            &fwd.features[last],
            &mut dh,
            dh_bf16.as_deref_mut(),
            None,
        )?;
        let mut copy_valid = update.copy_valid(false);
        for (l, (b, s)) in self.blocks.iter().zip(&fwd.blocks).enumerate().rev() {
            // out = mid + fc2(act(fc1(LN2(mid))))
            let mut d_normed = self.alloc(t * d)?;
            let dh_copy = dh_bf16.as_deref().filter(|_| copy_valid);
            self.mlp_backward(&s.mlp_pre, &dh, dh_copy, b, t, &mut d_normed)?;
            // mid = x + out_proj(attn(LN1(x))): LN2's input gradient joins the residual
            // gradient, which out_proj's input-gradient product reads next (in bf16, LN2's
            // backward writes that operand too: no conversion pass over dh).
            let ln2_backward = |dh: &mut Buffer<f32>, copy: Option<&mut Buffer<half::bf16>>| {
                let (x, dy, g) = (&s.mid, &d_normed, &b.ln2.weight);
                let (mean, rstd) = (&s.ln2_mean, &s.ln2_rstd);
                match copy {
                    None => layernorm_backward_f32(&self.dev, x, dy, g, mean, rstd, dh, t, d, true),
                    Some(db) => layernorm_backward_f32_bf16copy(
                        &self.dev, x, dy, g, mean, rstd, dh, db, t, d, true,
                    ),
                }
            };
            let out_proj_shape = b.out_proj.backward_shape(t);
            match &s.attention {
                AttentionSaved::F32 { qkv, context } => {
                    let mut d_context = self.alloc(t * d)?;
                    match &b.out_proj.weight {
                        Weight::F32(_) => {
                            ln2_backward(&mut dh, None)?;
                            self.linear_backward(&dh, t, &b.out_proj, &mut d_context)?;
                        }
                        Weight::Bf16(_) => self.product_from_bf16(
                            out_proj_shape,
                            &b.out_proj.weight,
                            None,
                            None,
                            &mut d_context,
                            |db| ln2_backward(&mut dh, Some(db)),
                        )?,
                    }
                    let d_qkv = self.attention_backward(qkv, context, &s.lse, &d_context, batch)?;
                    self.linear_backward(&d_qkv, t, &b.qkv, &mut d_normed)?;
                }
                AttentionSaved::Bf16 { qkv, context } => {
                    // out_proj's input-gradient product writes the context's gradient in bf16
                    // (as PyTorch autocast does): the operand v3's backward reads. v3 writes
                    // d_qkv as the QKV input-gradient product's bf16 operand.
                    let mut d_context = self.pool.take_bf16(t * d)?;
                    let w = bf16_weight(&b.out_proj.weight);
                    self.with_bf16_operand(
                        t * d,
                        |db| ln2_backward(&mut dh, Some(db)),
                        |db| {
                            matmul_bf16_bf16out(
                                &self.dev,
                                out_proj_shape,
                                db,
                                w,
                                None,
                                &mut d_context,
                            )
                        },
                    )?;
                    let mut delta = self.alloc(attention_scratch_len(t, d))?;
                    self.product_from_bf16(
                        b.qkv.backward_shape(t),
                        &b.qkv.weight,
                        None,
                        None,
                        &mut d_normed,
                        |db| {
                            let backward = if self.attention_v4() {
                                attention_backward_tc4_bf16_dout
                            } else {
                                attention_backward_tc3_bf16_dout
                            };
                            backward(
                                &self.dev,
                                qkv,
                                context,
                                &d_context,
                                &s.lse,
                                &batch.cu_seqlens,
                                &batch.seqlens,
                                db,
                                &mut delta,
                                d,
                                AttentionMode::QK,
                                false,
                            )
                        },
                    )?;
                }
            }
            // LN1's backward joins dh with the loss at layer l (x = F_l for both).
            let ln1 = LayerNormBackward {
                x: &fwd.features[l],
                dy: &d_normed,
                gamma: &b.ln1.weight,
                mean: &s.ln1_mean,
                rstd: &s.ln1_rstd,
            };
            // Below block 0 only LN_pre's backward reads dh, in fp32.
            let copy = dh_bf16.as_deref_mut().filter(|_| l > 0);
            let update = add_loss_gradient(l, &fwd.features[l], &mut dh, copy, Some(ln1))?;
            copy_valid = update.copy_valid(copy_valid);
        }
        let mut d_embedded = self.alloc(t * d)?;
        layernorm_backward_f32(
            &self.dev,
            &fwd.embedded,
            &dh,
            &self.ln_pre.weight,
            &fwd.ln_pre_mean,
            &fwd.ln_pre_rstd,
            &mut d_embedded,
            t,
            d,
            false,
        )?;
        let cols = batch.packing.patch_cols();
        let mut d_patches = self.alloc(n * cols)?;
        let (packing, table) = (&batch.packing, &batch.table);
        match &self.patch_embed.weight {
            Weight::F32(_) => {
                let mut d_patch_tokens = self.alloc(n * d)?;
                tokens_to_patch_grads_f32(
                    &self.dev,
                    packing,
                    table,
                    &d_embedded,
                    &mut d_patch_tokens,
                    d,
                )?;
                self.linear_backward(&d_patch_tokens, n, &self.patch_embed, &mut d_patches)?;
            }
            // The patch rows of the gradient are gathered as the product's bf16 operand.
            Weight::Bf16(_) => self.product_from_bf16(
                self.patch_embed.backward_shape(n),
                &self.patch_embed.weight,
                None,
                None,
                &mut d_patches,
                |db| {
                    tokens_to_patch_grads_f32_bf16out(&self.dev, packing, table, &d_embedded, db, d)
                },
            )?,
        }
        let mut d_images = self.alloc(batch.packing.total_pixels)?;
        col2im_f32(
            &self.dev,
            &batch.packing,
            &batch.table,
            &d_patches,
            &mut d_images,
            c.std,
        )?;
        Ok(d_images)
    }

    fn attention_forward(
        &self,
        qkv: &Buffer<f32>,
        batch: &Batch,
    ) -> Result<(Pooled, Pooled), GpuError> {
        let (t, d) = (batch.packing.total_tokens, self.model.config.width);
        let mut context = self.alloc(t * d)?;
        let mut lse = self.alloc(attention_scratch_len(t, d))?;
        // bf16 precision runs attention on tensor cores; fp32 keeps the fp32 SIMT kernels.
        let forward = match self.precision {
            Precision::Fp32 => attention_forward_f32,
            Precision::Bf16 => attention_forward_tc,
        };
        forward(
            &self.dev,
            qkv,
            &batch.cu_seqlens,
            &batch.seqlens,
            &mut context,
            &mut lse,
            d,
            AttentionMode::QK,
            false,
        )?;
        Ok((context, lse))
    }

    /// v3 / v4 forward: bf16 q/k/v in, the bf16 context and fp32 lse out.
    fn attention_forward_v3(
        &self,
        qkv: &Buffer<half::bf16>,
        batch: &Batch,
    ) -> Result<(PooledBf16, Pooled), GpuError> {
        let (t, d) = (batch.packing.total_tokens, self.model.config.width);
        let mut context = self.pool.take_bf16(t * d)?;
        let mut lse = self.alloc(attention_scratch_len(t, d))?;
        let forward = if self.attention_v4() {
            attention_forward_tc4
        } else {
            attention_forward_tc3
        };
        forward(
            &self.dev,
            qkv,
            &batch.cu_seqlens,
            &batch.seqlens,
            &mut context,
            &mut lse,
            d,
            AttentionMode::QK,
            false,
        )?;
        Ok((context, lse))
    }

    fn attention_backward(
        &self,
        qkv: &Buffer<f32>,
        context: &Buffer<f32>,
        lse: &Buffer<f32>,
        d_context: &Buffer<f32>,
        batch: &Batch,
    ) -> Result<Pooled, GpuError> {
        let (t, d) = (batch.packing.total_tokens, self.model.config.width);
        let mut d_qkv = self.alloc(t * 3 * d)?;
        let mut delta = self.alloc(attention_scratch_len(t, d))?;
        let backward = match self.precision {
            Precision::Fp32 => attention_backward_f32,
            Precision::Bf16 => attention_backward_tc,
        };
        backward(
            &self.dev,
            qkv,
            context,
            d_context,
            lse,
            &batch.cu_seqlens,
            &batch.seqlens,
            &mut d_qkv,
            &mut delta,
            d,
            AttentionMode::QK,
            false,
        )?;
        Ok(d_qkv)
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
                cls_rows: OnceLock::new(),
            });
        }
        let batch = self.batch(images)?;
        let fwd = self.forward(&batch, false)?;
        Ok(GpuClean {
            sizes,
            features: fwd.features,
            cls_rows: OnceLock::new(),
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
        } = self.loss(&batch, clean, objective, true)?;
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

/// Device memory one token of a batch needs during an attack step: every block's saved
/// activations (q|k|v, context, log-sum-exp, residual, MLP pre-activation, LayerNorm
/// statistics, features), the clean features, and the largest transients of the backward, in
/// fp32, plus 30% for the buffer pool's size classes. ViT-B/16 at 224 px: 124 MB per image
/// (measured peak on an H100 at batch 64: 100 MB per image).
pub fn step_bytes_per_token(config: &crate::model::VisionConfig) -> usize {
    let (d, m, l) = (config.width, config.mlp, config.layers);
    let heads = d.div_ceil(64);
    let saved = l * (3 * d + d + heads + d + m + 4 + d);
    let clean = (l + 1) * d;
    let transient = 4 * m + 8 * d;
    (saved + clean + transient) * 4 * 13 / 10
}

/// Tokens per batch beyond which a larger batch stopped paying on an H100 (ViT-B/16: batch 64 =
/// 12,608 tokens ran 93 images/s, batch 128 ran 83; docs/PERFORMANCE.md).
pub const AUTO_BATCH_TOKENS: usize = 16_384;

/// `--batch-size auto`'s token budget per batch on a GPU: the tokens that fit in 80% of
/// `free_bytes` at [`step_bytes_per_token`], capped at [`AUTO_BATCH_TOKENS`], at least 1 (a
/// batch always takes one image, however large; the campaign's out-of-memory handling fails it
/// cleanly when even that does not fit).
pub fn auto_batch_tokens(free_bytes: usize, config: &crate::model::VisionConfig) -> usize {
    let by_memory = free_bytes / 5 * 4 / step_bytes_per_token(config).max(1);
    by_memory.clamp(1, AUTO_BATCH_TOKENS)
}

#[cfg(test)]
mod auto_batch_tests {
    use super::*;
    use crate::model::builtin_config;

    #[test]
    fn vit_b_16_needs_about_124_mb_per_224_px_image() {
        let c = builtin_config("vit-b-16").unwrap();
        let per_image = 197 * step_bytes_per_token(&c);
        assert!((110 << 20..140 << 20).contains(&per_image), "{per_image}");
    }

    #[test]
    fn auto_batch_tokens_is_bounded_by_memory_and_by_the_cap() {
        let c = builtin_config("vit-b-16").unwrap();
        assert_eq!(auto_batch_tokens(80 << 30, &c), AUTO_BATCH_TOKENS);
        let per_token = step_bytes_per_token(&c);
        assert_eq!(
            auto_batch_tokens(1 << 30, &c),
            (1usize << 30) / 5 * 4 / per_token
        );
        assert_eq!(auto_batch_tokens(0, &c), 1);
    }
}
