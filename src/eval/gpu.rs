//! The evaluation targets and the CLIP text tower on the GPU engine's public kernel API
//! (`prm::gpu::kernels::*` launchers and `prm::gpu::gemm`), so they run on CUDA and, unchanged,
//! in the CPU simulator of the CUDA execution model.
//!
//! The models need no kernel of their own: the MaskCLIP family is the ViT block with the
//! attention kernel in another mode. (Two kernels reduce what comes back: `drift.cu` for the
//! features target, `class_logits.cu` for the cosine logits.)
//! - maskclip: [`AttentionMode::Identity`] (`out = v`), then out_proj, residual, FFN;
//! - sclip: [`AttentionMode::QQ`] and [`AttentionMode::KK`]; `out_proj(a + b)` is formed as two
//!   accumulating products `x + a·Wᵀ + bias + b·Wᵀ`, so no element-wise add is needed;
//! - clearclip: [`AttentionMode::QQ`], out_proj, no residual, no FFN;
//! - text tower: [`AttentionMode::QK`] with the causal flag, every prompt of a class packed into
//!   one variable-length batch (`cu_seqlens`).
//!
//! Post-LayerNorm and the projection run on the device for every token, and so do the per-token
//! L2 normalisation and the cosine with the C class embeddings (`kernels/class_logits.cu`, the
//! host's f64 arithmetic in its order: [`super::ops::normalize_rows`] and
//! [`super::ops::dot_logits`]' bits), so a pass brings back `[T, C]` logits; `prm eval` makes the
//! label maps (bilinear upsampling, argmax) on its finisher thread while the device runs the next
//! pass. `PRM_HOST_LOGITS=1` brings the embeddings back instead and forms the logits on the host,
//! as the reference path does (the same bits).
//!
//! Attention runs the fp32 SIMT kernels (v1) at fp32, and at bf16 the tensor-core kernels on
//! fp32 buffers (v2: bf16 operands, fp32 accumulation), which hand the identity mode and heads
//! narrower than 64 to v1. Heads a multiple of 8 from 32 to 128 wide are supported (64 in every
//! OpenAI tower; open_clip's ViT-H/14 has 80); a model with others is refused with a clear
//! error (`check_head_layout`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use rayon::prelude::*;

use super::ops::{normalize_rows, TokenSums};
use super::targets::{
    check_image, check_pairs, require_image_head, require_projection, DenseHead, EvalEngine,
    PairSums, PatchLogits, TokenEmbeddings,
};
use super::text::{check_ids, eot_position, TextEncoder};
use super::EvalError;
use crate::attack::image::Planar;
use crate::gpu::engine::positions::DevicePositions;
use crate::gpu::engine::weights::{
    upload_block, upload_linear, upload_ln, DeviceBlock, DeviceLayerNorm, DeviceLinear, Weight,
};
use crate::gpu::engine::Precision;
use crate::gpu::gemm::{matmul_bf16, matmul_bf16_residual, matmul_f32, matmul_f32_residual};
use crate::gpu::kernels::activation::bias_activation_forward_f32;
use crate::gpu::kernels::attention::{
    attention_forward_f32, attention_forward_tc, attention_stats_len, check_head_layout,
    AttentionMode,
};
use crate::gpu::kernels::class_logits::{class_logits_f32, normalize_rows_f32};
use crate::gpu::kernels::convert::to_bf16;
use crate::gpu::kernels::drift::token_sums_f32;
use crate::gpu::kernels::embed::{assemble_tokens_f32, patchify_f32, PackedImages};
use crate::gpu::kernels::layernorm::layernorm_forward_f32;
use crate::gpu::staging::Stager;
use crate::gpu::{Buffer, Device, Element, GpuError};
use crate::model::{Activation, BlockWeights, Model, TextTower};
use crate::reference::pooling::pooled_embeddings;

/// The weights of a stack of pre-LN blocks on a device, and the operators over them.
struct Stack {
    dev: Device,
    blocks: Vec<DeviceBlock>,
    width: usize,
    heads: usize,
    mlp: usize,
    act: Activation,
    eps: f32,
    precision: Precision,
}

fn check_heads(what: &str, width: usize, heads: usize) -> Result<(), EvalError> {
    check_head_layout(what, width, heads).map_err(EvalError::Usage)
}

impl Stack {
    fn new(
        dev: &Device,
        blocks: &[BlockWeights],
        (width, heads): (usize, usize),
        mlp: usize,
        act: Activation,
        eps: f32,
        p: Precision,
    ) -> Result<Self, GpuError> {
        let blocks = blocks
            .iter()
            .map(|b| upload_block(dev, b, p))
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(Stack {
            dev: dev.clone(),
            blocks,
            width,
            heads,
            mlp,
            act,
            eps,
            precision: p,
        })
    }

    /// `out (+)= x·Wᵀ (+ bias when `with_bias`)`.
    fn linear(
        &self,
        x: &Buffer<f32>,
        rows: usize,
        l: &DeviceLinear,
        with_bias: bool,
        out: &mut Buffer<f32>,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let shape = l.forward_shape(rows);
        let bias = if with_bias { l.bias.as_ref() } else { None };
        match &l.weight {
            Weight::F32(w) => matmul_f32(&self.dev, shape, x, w, bias, out, accumulate),
            Weight::Bf16(w) => {
                let xb = self.bf16_operand(x, rows * l.in_features)?;
                matmul_bf16(&self.dev, shape, &xb, w, bias, out, accumulate)
            }
        }
    }

    /// `out = residual + x·Wᵀ + bias`: the residual stream is the product's C input, so it
    /// needs no copy into `out` first.
    fn linear_onto(
        &self,
        x: &Buffer<f32>,
        rows: usize,
        l: &DeviceLinear,
        residual: &Buffer<f32>,
        out: &mut Buffer<f32>,
    ) -> Result<(), GpuError> {
        let shape = l.forward_shape(rows);
        let bias = l.bias.as_ref();
        match &l.weight {
            Weight::F32(w) => {
                matmul_f32_residual(&self.dev, shape, x, w, bias, Some(residual), out)
            }
            Weight::Bf16(w) => {
                let xb = self.bf16_operand(x, rows * l.in_features)?;
                matmul_bf16_residual(&self.dev, shape, &xb, w, bias, Some(residual), out)
            }
        }
    }

    /// `x` rounded to bf16, the left operand of a bf16 product.
    fn bf16_operand(&self, x: &Buffer<f32>, len: usize) -> Result<Buffer<half::bf16>, GpuError> {
        let mut xb = self.dev.alloc::<half::bf16>(len)?;
        to_bf16(&self.dev, x, &mut xb, len)?;
        Ok(xb)
    }

    fn ln(
        &self,
        x: &Buffer<f32>,
        l: &DeviceLayerNorm,
        rows: usize,
        dim: usize,
    ) -> Result<Buffer<f32>, GpuError> {
        let mut y = self.dev.alloc(rows * dim)?;
        let mut mean = self.dev.alloc(rows)?;
        let mut rstd = self.dev.alloc(rows)?;
        layernorm_forward_f32(
            &self.dev, x, &l.weight, &l.bias, &mut y, &mut mean, &mut rstd, rows, dim, self.eps,
        )?;
        Ok(y)
    }

    fn attention(
        &self,
        qkv: &Buffer<f32>,
        cu: &Buffer<i32>,
        lens: &[usize],
        rows: usize,
        mode: AttentionMode,
        causal: bool,
    ) -> Result<Buffer<f32>, GpuError> {
        let d = self.width;
        let mut ctx = self.dev.alloc(rows * d)?;
        let heads = self.heads;
        let mut lse = self.dev.alloc(attention_stats_len(rows, heads))?;
        // bf16 runs attention on tensor cores (v2: bf16 operands, fp32 accumulation and
        // buffers), as the attack's bf16 engine does; v2 hands the identity mode and heads
        // narrower than 64 to the fp32 SIMT kernels, which fp32 runs throughout.
        let forward = match self.precision {
            Precision::Fp32 => attention_forward_f32,
            Precision::Bf16 => attention_forward_tc,
        };
        forward(
            &self.dev, qkv, cu, lens, &mut ctx, &mut lse, d, heads, mode, causal,
        )?;
        Ok(ctx)
    }

    /// `z + fc2(act(fc1(LN2(z))))`, in place on `z`.
    fn mlp(&self, b: &DeviceBlock, z: &mut Buffer<f32>, rows: usize) -> Result<(), GpuError> {
        let n2 = self.ln(z, &b.ln2, rows, self.width)?;
        let mut pre = self.dev.alloc(rows * self.mlp)?;
        self.linear(&n2, rows, &b.fc1, false, &mut pre, false)?;
        let mut hidden = self.dev.alloc(rows * self.mlp)?;
        bias_activation_forward_f32(
            &self.dev,
            self.act,
            &pre,
            b.fc1.bias.as_ref(),
            None,
            &mut hidden,
            rows,
            self.mlp,
        )?;
        self.linear(&hidden, rows, &b.fc2, true, z, true)
    }

    /// One standard block (q·kᵀ attention, causal or not), returning the new stream.
    fn block(
        &self,
        b: &DeviceBlock,
        x: &Buffer<f32>,
        cu: &Buffer<i32>,
        lens: &[usize],
        rows: usize,
        causal: bool,
    ) -> Result<Buffer<f32>, GpuError> {
        let d = self.width;
        let n1 = self.ln(x, &b.ln1, rows, d)?;
        let mut qkv = self.dev.alloc(rows * 3 * d)?;
        self.linear(&n1, rows, &b.qkv, true, &mut qkv, false)?;
        let ctx = self.attention(&qkv, cu, lens, rows, AttentionMode::QK, causal)?;
        let mut z = self.dev.alloc(rows * d)?;
        self.linear_onto(&ctx, rows, &b.out_proj, x, &mut z)?;
        self.mlp(b, &mut z, rows)?;
        Ok(z)
    }

    /// The last block replaced by a dense head (one sequence).
    fn dense_head(
        &self,
        b: &DeviceBlock,
        x: &Buffer<f32>,
        cu: &Buffer<i32>,
        lens: &[usize],
        rows: usize,
        head: DenseHead,
    ) -> Result<Buffer<f32>, GpuError> {
        let d = self.width;
        let n1 = self.ln(x, &b.ln1, rows, d)?;
        let mut qkv = self.dev.alloc(rows * 3 * d)?;
        self.linear(&n1, rows, &b.qkv, true, &mut qkv, false)?;
        let mut z = self.dev.alloc(rows * d)?;
        match head {
            DenseHead::MaskClip => {
                let ctx = self.attention(&qkv, cu, lens, rows, AttentionMode::Identity, false)?;
                self.linear_onto(&ctx, rows, &b.out_proj, x, &mut z)?;
                self.mlp(b, &mut z, rows)?;
            }
            DenseHead::Sclip => {
                let qq = self.attention(&qkv, cu, lens, rows, AttentionMode::QQ, false)?;
                let kk = self.attention(&qkv, cu, lens, rows, AttentionMode::KK, false)?;
                self.linear_onto(&qq, rows, &b.out_proj, x, &mut z)?;
                self.linear(&kk, rows, &b.out_proj, false, &mut z, true)?;
                self.mlp(b, &mut z, rows)?;
            }
            DenseHead::ClearClip => {
                let qq = self.attention(&qkv, cu, lens, rows, AttentionMode::QQ, false)?;
                self.linear(&qq, rows, &b.out_proj, true, &mut z, false)?;
            }
        }
        Ok(z)
    }
}

/// Tokens one device pass holds at most: a batch with more is run as several passes (an image is
/// never split). Counted from the buffers a block holds at once (the fp32 stream in and out, LN
/// outputs, QKV, context, the MLP's two 4·D buffers, the bf16 copy of the hidden layer: about
/// 18·D floats), a pass takes about 55 KB a token for ViT-B/16, plus 3 KB a token for each
/// feature layer kept (all 13 for the features target): 1.8 to 3.1 GB at this size, whatever the
/// images. Not measured on a GPU; a pass that does not fit halves the budget (`by_pass`).
pub const PASS_TOKENS: usize = 32_768;

/// One pass's images on the device: the features kept, `cu_seqlens`, and the packing (each
/// image's token offset, tokens and patch grid).
struct DevicePass {
    /// F_upto alone, or F_0..F_upto when every layer was asked for.
    feats: Vec<Buffer<f32>>,
    cu: Buffer<i32>,
    lens: Vec<usize>,
    packing: PackedImages,
}

impl DevicePass {
    fn tokens(&self) -> usize {
        self.packing.total_tokens
    }
}

/// The vision targets on a device. A batch of images is packed into one pass (mixed sizes, one
/// attention sequence each, every product over all their tokens at once), so the launches of a
/// forward are shared by the batch.
pub struct GpuTargets<'m> {
    model: &'m Model,
    stack: Stack,
    patch_embed: DeviceLinear,
    /// `None` for a tower without a class token.
    cls: Option<Buffer<f32>>,
    /// `None` for a tower without LN_pre (F_0 is the embedded tokens).
    ln_pre: Option<DeviceLayerNorm>,
    ln_post: DeviceLayerNorm,
    projection: Option<DeviceLinear>,
    positions: DevicePositions,
    /// Tokens a pass may hold: [`PASS_TOKENS`] or what `with_pass_tokens` gave, halved from a
    /// pass that ran out of device memory.
    pass_tokens: AtomicUsize,
    /// The next pass's pixels, staged on a copy stream while this pass computes.
    staging: Mutex<PassStaging>,
    /// Whether the cosine logits are formed on the device ([`EvalEngine::forms_logits`]): on
    /// unless `PRM_HOST_LOGITS=1`.
    device_logits: AtomicBool,
    /// The class embeddings on the device, uploaded by the first pass that needs them.
    classes: Mutex<Option<DeviceClasses>>,
}

/// Class embeddings on the device, and what they are: their count and an xxh3-128 of their
/// values, so that other classes are uploaded instead of reused (an evaluation passes the same
/// ones every time; hashing them costs microseconds).
struct DeviceClasses {
    key: (usize, u128),
    buf: Buffer<f32>,
}

impl DeviceClasses {
    fn key_of(classes: &[f32]) -> (usize, u128) {
        (
            classes.len(),
            xxhash_rust::xxh3::xxh3_128(bytemuck::cast_slice(classes)),
        )
    }
}

/// What a pass's pixel upload did, counted over the engine's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassUploads {
    /// Passes run (each uploads its images' pixels once).
    pub passes: u64,
    /// Passes whose pixels were staged ahead, during the pass before (the next pass of the same
    /// call, or the first pass of the call's `next` images).
    pub staged: u64,
    /// Passes that found their pixels staged and took them: the compute stream copies them on
    /// the device instead of waiting for the host.
    pub taken: u64,
    /// Of those, passes whose staged copy had not finished when taken (the compute stream
    /// waited for it on the device; never on the simulator).
    pub copy_pending: u64,
}

/// A pass's pixels, identified by what they are: each image's size and an xxh3-128 of its
/// pixels. A staged upload is taken only by a pass of the very same pixels, so a `next` hint
/// that turns out wrong, or host memory reused for other images, can never feed a pass the
/// wrong images; it costs the staged copy only.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PixelsKey(Vec<(usize, usize, u128)>);

impl PixelsKey {
    fn of(images: &[Planar]) -> Self {
        PixelsKey(
            images
                .par_iter()
                .map(|im| {
                    let bytes: &[u8] = bytemuck::cast_slice(im.data);
                    (im.height, im.width, xxhash_rust::xxh3::xxh3_128(bytes))
                })
                .collect(),
        )
    }
}

/// The engine's stager (made on first use; dropped, with its memory, when staging fails) and
/// its counters. `PRM_NO_STAGING=1` turns staging off, as for the attack: every pass then
/// uploads its pixels and downloads its results with plain copies (the same bits).
struct PassStaging {
    on: bool,
    stager: Option<Stager<PixelsKey>>,
    counts: PassUploads,
}

impl PassStaging {
    /// The stager when staging is on, made on first use (`None` when off, or when it cannot be
    /// made: the caller then copies plainly).
    fn stager(&mut self, dev: &Device) -> Option<&mut Stager<PixelsKey>> {
        if !self.on {
            return None;
        }
        if self.stager.is_none() {
            self.stager = Stager::new(dev).ok();
        }
        self.stager.as_mut()
    }
}

impl<'m> GpuTargets<'m> {
    pub fn new(dev: &Device, model: &'m Model, precision: Precision) -> Result<Self, EvalError> {
        let c = &model.config;
        check_heads("vision tower", c.width, c.heads)?;
        let w = &model.weights;
        Ok(GpuTargets {
            model,
            stack: Stack::new(
                dev,
                &w.blocks,
                (c.width, c.heads),
                c.mlp,
                c.activation,
                c.ln_eps,
                precision,
            )?,
            patch_embed: upload_linear(dev, &w.patch_embed, precision)?,
            cls: w
                .class_embedding
                .as_ref()
                .map(|cls| dev.upload(cls))
                .transpose()?,
            ln_pre: w.ln_pre.as_ref().map(|ln| upload_ln(dev, ln)).transpose()?,
            ln_post: upload_ln(dev, &w.ln_post)?,
            projection: w
                .projection
                .as_ref()
                .map(|p| upload_linear(dev, p, precision))
                .transpose()?,
            positions: DevicePositions::new(w.position_embedding.clone(), c.width, c.grid),
            pass_tokens: AtomicUsize::new(PASS_TOKENS),
            staging: Mutex::new(PassStaging {
                on: std::env::var("PRM_NO_STAGING").map_or(true, |v| v != "1"),
                stager: None,
                counts: PassUploads::default(),
            }),
            device_logits: AtomicBool::new(
                std::env::var("PRM_HOST_LOGITS").map_or(true, |v| v != "1"),
            ),
            classes: Mutex::new(None),
        })
    }

    /// Forms the cosine logits on the device (the default), or brings the embeddings back for
    /// the evaluation to form them on the host (`PRM_HOST_LOGITS=1`). The bits are the same.
    pub fn set_device_logits(&self, on: bool) {
        self.device_logits.store(on, Ordering::Relaxed);
    }

    /// Turns the staging of uploads ahead (and the pinned downloads) on or off; on by default,
    /// off with `PRM_NO_STAGING=1`. The results are the same bits either way.
    pub fn set_staging(&self, on: bool) {
        let mut s = self.staging();
        s.on = on;
        if !on {
            s.stager = None;
        }
    }

    /// What the passes' pixel uploads did so far.
    pub fn pass_uploads(&self) -> PassUploads {
        self.staging().counts
    }

    fn staging(&self) -> MutexGuard<'_, PassStaging> {
        self.staging.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts copying `images` (the next pass's) to the device on the stager's copy stream.
    /// Called once this pass's work is queued, so that the host packs them, and the copy runs,
    /// while the device computes. Best effort: when a staging fails that pass uploads normally;
    /// the stager is dropped (with its memory) only for an error other than a memory shortage.
    fn stage_ahead(&self, images: &[Planar]) {
        if images.is_empty() {
            return;
        }
        let mut s = self.staging();
        let Some(stager) = s.stager(self.dev()) else {
            return;
        };
        let key = PixelsKey::of(images);
        let parts: Vec<&[f32]> = images.iter().map(|im| im.data).collect();
        match stager.stage(key, &parts) {
            Ok(()) => s.counts.staged += 1,
            // Memory short now: this pass uploads normally, and the stager (its readback and
            // whatever memory it already holds) stays for the next instead of being rebuilt.
            Err(e) if e.is_memory_shortage() => {}
            Err(_) => s.stager = None,
        }
    }

    /// A pass's pixels on the device, packed image after image (`total` floats): the staged
    /// copy when one of these very pixels was staged, else a plain upload of each image.
    fn upload_pixels(&self, images: &[Planar], total: usize) -> Result<Buffer<f32>, EvalError> {
        let dev = self.dev();
        // Every element is written below (the simulator's poison checks it).
        let mut pixels = dev.alloc_undefined(total)?;
        let mut s = self.staging();
        s.counts.passes += 1;
        if let Some(stager) = s.stager.as_mut() {
            let key = PixelsKey::of(images);
            let lens: Vec<usize> = images.iter().map(|im| im.data.len()).collect();
            if let Some(taken) = stager.take(&key, &lens, &mut pixels)? {
                s.counts.taken += 1;
                s.counts.copy_pending += u64::from(taken.copy_pending);
                return Ok(pixels);
            }
        }
        drop(s);
        let mut offset = 0;
        for im in images {
            dev.write_range(&mut pixels, offset, im.data)?;
            offset += im.data.len();
        }
        Ok(pixels)
    }

    /// The first elements of `buf` on the host, cut into pieces of `lens` elements, with one
    /// wait for the device: through the stager's pinned readback buffer (one DMA at full link
    /// speed) when staging is on, plain downloads otherwise.
    fn download_split<T: Element>(
        &self,
        buf: &Buffer<T>,
        lens: &[usize],
    ) -> Result<Vec<Vec<T>>, EvalError> {
        let mut s = self.staging();
        Ok(match s.stager(self.dev()) {
            Some(stager) => stager.download_split(buf, lens)?,
            None => self.dev().download_split(buf, lens)?,
        })
    }

    /// Runs batches as passes of at most `tokens` tokens (at least one image a pass) instead of
    /// [`PASS_TOKENS`].
    pub fn with_pass_tokens(self, tokens: usize) -> Self {
        self.pass_tokens.store(tokens.max(1), Ordering::Relaxed);
        self
    }

    /// The tokens a pass may hold now: less than at the start when a pass ran out of device
    /// memory.
    pub fn pass_tokens(&self) -> usize {
        self.pass_tokens.load(Ordering::Relaxed)
    }

    fn dev(&self) -> &Device {
        &self.stack.dev
    }

    /// An image's tokens as the model sees it (its CLS token, if any, and its whole patches).
    fn tokens_of(&self, image: &Planar) -> usize {
        let c = &self.model.config;
        c.tokens(image.height / c.patch, image.width / c.patch)
    }

    /// How many of `images`, from the first, the next pass holds: as many units of `unit`
    /// images (kept in one pass: 2 for clean and adversarial pairs) as fit `pass_tokens`, and at
    /// least one unit.
    fn next_pass(&self, images: &[Planar], unit: usize) -> usize {
        let budget = self.pass_tokens();
        let mut tokens = 0;
        for (k, group) in images.chunks(unit).enumerate() {
            tokens += group.iter().map(|im| self.tokens_of(im)).sum::<usize>();
            if k > 0 && tokens > budget {
                return k * unit;
            }
        }
        images.len()
    }

    /// The forward of one pass of images up to F_upto: every layer kept when `keep_all`, else
    /// F_upto alone.
    fn forward(
        &self,
        images: &[Planar],
        upto: usize,
        keep_all: bool,
    ) -> Result<DevicePass, EvalError> {
        let c = &self.model.config;
        let dev = self.dev();
        for im in images {
            check_image(self.model, im)?;
        }
        let sizes: Vec<(usize, usize)> = images.iter().map(|im| (im.height, im.width)).collect();
        let packing = PackedImages::with_class_tokens(&sizes, c.patch, c.class_tokens());
        let table = packing.upload_table(dev)?;
        let cu = dev.upload(&packing.cu_seqlens())?;
        let (t, d) = (packing.total_tokens, c.width);
        let lens: Vec<usize> = packing.images.iter().map(|m| m.tokens()).collect();
        let pixels = self.upload_pixels(images, packing.total_pixels)?;
        // Every element is written below (the simulator's poison checks it).
        let mut pos = dev.alloc_undefined(t * d)?;
        for m in &packing.images {
            let grid = self.positions.grid(dev, m.grid_h, m.grid_w)?;
            dev.copy_range(&grid, 0, &mut pos, m.token_offset * d, grid.len())?;
        }
        let n = packing.total_patches;
        let mut patches = dev.alloc(n * packing.patch_cols())?;
        patchify_f32(dev, &packing, &table, &pixels, &mut patches, c.mean, c.std)?;
        let mut pt = dev.alloc(n * d)?;
        self.stack
            .linear(&patches, n, &self.patch_embed, true, &mut pt, false)?;
        let mut emb = dev.alloc(t * d)?;
        assemble_tokens_f32(
            dev,
            &packing,
            &table,
            &pt,
            self.cls.as_ref(),
            &pos,
            &mut emb,
            d,
        )?;
        let f0 = match &self.ln_pre {
            Some(ln) => self.stack.ln(&emb, ln, t, d)?,
            None => emb,
        };
        let mut feats = vec![f0];
        for b in &self.stack.blocks[..upto] {
            let next = self
                .stack
                .block(b, feats.last().expect("F_0"), &cu, &lens, t, false)?;
            if !keep_all {
                feats.clear();
            }
            feats.push(next);
        }
        Ok(DevicePass {
            feats,
            cu,
            lens,
            packing,
        })
    }

    /// Projected rows `e [rows, dim]` on the host, L2-normalised there. `then` (the next pass's
    /// images) is staged once the work is queued, before the download waits.
    fn download_normalized(
        &self,
        e: &Buffer<f32>,
        rows: usize,
        dim: usize,
        then: &[Planar],
    ) -> Result<Vec<f32>, EvalError> {
        self.stage_ahead(then);
        let mut e = self.download_split(e, &[rows * dim])?.remove(0);
        normalize_rows(&mut e, dim);
        Ok(e)
    }

    /// post-LN → projection of `rows` rows of `z`, on the device: `[rows, E]` and E.
    fn project_rows(
        &self,
        z: &Buffer<f32>,
        rows: usize,
    ) -> Result<(Buffer<f32>, usize), EvalError> {
        self.model
            .image_projection()
            .map_err(EvalError::NoImageEmbedding)?;
        // Uploaded whenever the model has one, which `image_projection` has just checked.
        let proj = self.projection.as_ref().ok_or_else(|| {
            EvalError::NoImageEmbedding("the checkpoint has no projection".into())
        })?;
        let d = self.model.config.width;
        let normed = self.stack.ln(z, &self.ln_post, rows, d)?;
        let mut e = self.dev().alloc(rows * proj.out_features)?;
        self.stack
            .linear(&normed, rows, proj, false, &mut e, false)?;
        Ok((e, proj.out_features))
    }

    /// The cosine logits `[rows, C]` of projected rows `e [rows, dim]` with `classes [C, dim]`
    /// (L2-normalised): `e` is normalised in place first. All on the device, with the host's
    /// bits (`kernels/class_logits.cu`).
    fn class_logits(
        &self,
        e: &mut Buffer<f32>,
        rows: usize,
        dim: usize,
        classes: &[f32],
    ) -> Result<(Buffer<f32>, usize), EvalError> {
        if dim == 0 || !classes.len().is_multiple_of(dim) {
            return Err(EvalError::Usage(format!(
                "{} class embedding values are not rows of the model's {dim}-wide embeddings",
                classes.len()
            )));
        }
        let c = classes.len() / dim;
        let dev = self.dev();
        normalize_rows_f32(dev, e, rows, dim)?;
        let mut cached = self.classes.lock().unwrap_or_else(|p| p.into_inner());
        let key = DeviceClasses::key_of(classes);
        if cached.as_ref().is_none_or(|d| d.key != key) {
            *cached = None; // (its memory back before the new upload)
            *cached = Some(DeviceClasses {
                key,
                buf: dev.upload(classes)?,
            });
        }
        let on_device = &cached.as_ref().expect("uploaded above").buf;
        // Every element is written by the kernel (the simulator's poison checks it).
        let mut logits = dev.alloc_undefined(rows * c)?;
        class_logits_f32(dev, e, on_device, rows, c, dim, &mut logits)?;
        Ok((logits, c))
    }

    /// Each image's rows of a pass's `[ΣT_i, width]` buffer, with one wait for the device.
    fn download_images(
        &self,
        pass: &DevicePass,
        buf: &Buffer<f32>,
        width: usize,
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        let lens: Vec<usize> = pass.lens.iter().map(|t| t * width).collect();
        self.download_split(buf, &lens)
    }

    /// `one` over consecutive passes of `images`, the results in order. A pass holds whole
    /// units of `unit` images (see [`Self::next_pass`]). A pass of several units that runs out
    /// of device memory halves the token budget, for it and every later pass, and runs again;
    /// one unit that does not fit is an error.
    ///
    /// `one` is given the pass's images and the images of the pass after it (the rest of
    /// `images`, or the first pass of `next`, the caller's next batch), to stage while it
    /// computes.
    fn by_pass<R>(
        &self,
        images: &[Planar],
        next: &[Planar],
        unit: usize,
        mut one: impl FnMut(&[Planar], &[Planar]) -> Result<Vec<R>, EvalError>,
    ) -> Result<Vec<R>, EvalError> {
        let mut out = Vec::with_capacity(images.len());
        let mut rest = images;
        while !rest.is_empty() {
            let n = self.next_pass(rest, unit);
            let after = match &rest[n..] {
                [] => next,
                later => later,
            };
            let then = &after[..self.next_pass(after, unit)];
            match one(&rest[..n], then) {
                Ok(results) => {
                    out.extend(results);
                    rest = &rest[n..];
                }
                Err(EvalError::Gpu(GpuError::OutOfMemory { .. })) if n > unit => {
                    let tokens: usize = rest[..n].iter().map(|im| self.tokens_of(im)).sum();
                    self.pass_tokens.store(tokens / 2, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// A pass's forward through the dense head and the projection: the pass, its tokens'
    /// projected rows `[T, E]` on the device (not normalised) and E.
    fn dense_rows(
        &self,
        images: &[Planar],
        head: DenseHead,
    ) -> Result<(DevicePass, Buffer<f32>, usize), EvalError> {
        require_projection(self.model)?;
        let l = self.model.config.layers;
        let pass = self.forward(images, l - 1, false)?;
        let z = self.stack.dense_head(
            &self.stack.blocks[l - 1],
            pass.feats.last().expect("F_{L-1}"),
            &pass.cu,
            &pass.lens,
            pass.tokens(),
            head,
        )?;
        let (e, dim) = self.project_rows(&z, pass.tokens())?;
        Ok((pass, e, dim))
    }

    fn dense_pass(
        &self,
        images: &[Planar],
        then: &[Planar],
        head: DenseHead,
    ) -> Result<Vec<TokenEmbeddings>, EvalError> {
        let (pass, e, dim) = self.dense_rows(images, head)?;
        let rows = self.download_normalized(&e, pass.tokens(), dim, then)?;
        let mut rows = rows.as_slice();
        Ok(pass
            .packing
            .images
            .iter()
            .map(|m| {
                let (mine, rest) = rows.split_at(m.tokens() * dim);
                rows = rest;
                TokenEmbeddings {
                    grid_h: m.grid_h,
                    grid_w: m.grid_w,
                    dim,
                    rows: mine.to_vec(),
                }
            })
            .collect())
    }

    /// [`Self::dense_pass`] with the logits formed on the device: only each image's patch rows'
    /// `[grid_h · grid_w, C]` logits come back.
    fn dense_logits_pass(
        &self,
        images: &[Planar],
        then: &[Planar],
        head: DenseHead,
        classes: &[f32],
    ) -> Result<Vec<PatchLogits>, EvalError> {
        let (pass, mut e, dim) = self.dense_rows(images, head)?;
        // Every token's logits, the CLS rows' among them (one row an image), in one launch.
        let (logits, c) = self.class_logits(&mut e, pass.tokens(), dim, classes)?;
        self.stage_ahead(then);
        let lens: Vec<usize> = pass.lens.iter().map(|&tokens| tokens * c).collect();
        Ok(self
            .download_split(&logits, &lens)?
            .into_iter()
            .zip(&pass.packing.images)
            .map(|(mut rows, m)| {
                rows.drain(..c); // the CLS row
                PatchLogits {
                    grid_h: m.grid_h,
                    grid_w: m.grid_w,
                    classes: c,
                    logits: rows,
                }
            })
            .collect())
    }

    /// [`Self::image_embedding_pass`] with the logits formed on the device: `[C]` an image.
    fn image_logits_pass(
        &self,
        images: &[Planar],
        then: &[Planar],
        classes: &[f32],
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        let (mut e, dim) = self.image_rows(images)?;
        let (logits, c) = self.class_logits(&mut e, images.len(), dim, classes)?;
        self.stage_ahead(then);
        self.download_split(&logits, &vec![c; images.len()])
    }

    /// A pass's forward, and each image's embedding: its CLS row of F_L (gathered on the
    /// device) through post-LN and the projection, or a pooling over all its tokens (SigLIP's
    /// attention-pooling head, CLIPA's average). `[images, E]` on the device (not normalised)
    /// and E.
    fn image_rows(&self, images: &[Planar]) -> Result<(Buffer<f32>, usize), EvalError> {
        let head = require_image_head(self.model)?;
        let pass = self.forward(images, self.model.config.layers, false)?;
        let d = self.model.config.width;
        let last = pass.feats.last().expect("F_L");
        if head.reads_every_token() {
            // SigLIP's attention-pooling head and CLIPA's average read every token: they run
            // on the host (`reference::pooling`, O(T·D·H) an image) on F_L read back, and the
            // embeddings go up again for the logits. Their bits are the reference engine's for
            // these F_L.
            let rows = self.download_images(&pass, last, d)?;
            let rows: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            let pooled =
                pooled_embeddings(self.model, &rows).map_err(EvalError::NoImageEmbedding)?;
            return Ok((self.dev().upload(&pooled.embeddings)?, pooled.dim));
        }
        let mut cls = self.dev().alloc_undefined(images.len() * d)?;
        for (i, m) in pass.packing.images.iter().enumerate() {
            self.dev()
                .copy_range(last, m.token_offset * d, &mut cls, i * d, d)?;
        }
        self.project_rows(&cls, images.len())
    }

    fn image_embedding_pass(
        &self,
        images: &[Planar],
        then: &[Planar],
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        let (e, dim) = self.image_rows(images)?;
        let e = self.download_normalized(&e, images.len(), dim, then)?;
        Ok(e.chunks_exact(dim).map(<[f32]>::to_vec).collect())
    }

    fn features_pass(
        &self,
        images: &[Planar],
        then: &[Planar],
    ) -> Result<Vec<Vec<Vec<f32>>>, EvalError> {
        let pass = self.forward(images, self.model.config.layers, true)?;
        self.stage_ahead(then);
        let d = self.model.config.width;
        let mut per_image: Vec<Vec<Vec<f32>>> = vec![Vec::new(); images.len()];
        for f in &pass.feats {
            for (image, rows) in per_image.iter_mut().zip(self.download_images(&pass, f, d)?) {
                image.push(rows);
            }
        }
        Ok(per_image)
    }

    /// Every layer's drift sums of a pass of (clean, adversarial) pairs, computed on the device
    /// (`kernels/drift.cu`): only `[layers, tokens, 4]` f64 come back instead of every layer's
    /// features.
    fn feature_sums_pass(
        &self,
        images: &[Planar],
        then: &[Planar],
    ) -> Result<Vec<PairSums>, EvalError> {
        let (layers, d) = (self.model.config.layers, self.model.config.width);
        let pass = self.forward(images, layers, true)?;
        // Output row r of a pair's token t: its clean token's row, then its adversarial one's.
        let mut rows: Vec<i32> = Vec::new();
        for pair in pass.packing.images.chunks_exact(2) {
            let (c, a) = (&pair[0], &pair[1]);
            for t in 0..c.tokens() {
                rows.extend([(c.token_offset + t) as i32, (a.token_offset + t) as i32]);
            }
        }
        let n = rows.len() / 2;
        let pairs = self.dev().upload(&rows)?;
        // Every element is written below, a layer at a time (the simulator's poison checks it).
        let mut sums = self
            .dev()
            .alloc_undefined::<f64>(4 * n * pass.feats.len())?;
        for (l, f) in pass.feats.iter().enumerate() {
            token_sums_f32(self.dev(), f, &pairs, n, d, &mut sums, l * n)?;
        }
        self.stage_ahead(then);
        let sums = self.download_split(&sums, &[sums.len()])?.remove(0);
        // A pair's tokens: its clean image's (the adversarial one has as many).
        let mut first = 0;
        Ok(pass
            .lens
            .iter()
            .step_by(2)
            .map(|&t| {
                let pair = (0..pass.feats.len())
                    .map(|l| {
                        let rows = &sums[4 * (l * n + first)..4 * (l * n + first + t)];
                        rows.chunks_exact(4).map(TokenSums::from_row).collect()
                    })
                    .collect();
                first += t;
                pair
            })
            .collect())
    }

    /// Runs blocks 1..=layer only, and downloads that one layer.
    fn layer_features_pass(
        &self,
        images: &[Planar],
        then: &[Planar],
        layer: usize,
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        let layers = self.model.config.layers;
        if layer > layers {
            return Err(EvalError::Usage(format!(
                "feature layer {layer}: the model has F_0..F_{layers}"
            )));
        }
        let pass = self.forward(images, layer, false)?;
        let f = pass.feats.last().expect("F_layer");
        self.stage_ahead(then);
        self.download_images(&pass, f, self.model.config.width)
    }
}

/// The first (only) result of a one-image batch.
fn only<R>(mut results: Vec<R>) -> R {
    assert_eq!(results.len(), 1, "one image, one result");
    results.swap_remove(0)
}

impl EvalEngine for GpuTargets<'_> {
    fn model(&self) -> &Model {
        self.model
    }

    fn dense_embeddings(
        &self,
        image: &Planar,
        head: DenseHead,
    ) -> Result<TokenEmbeddings, EvalError> {
        Ok(only(self.dense_embeddings_batch(
            std::slice::from_ref(image),
            &[],
            head,
        )?))
    }

    fn image_embedding(&self, image: &Planar) -> Result<Vec<f32>, EvalError> {
        Ok(only(
            self.image_embedding_batch(std::slice::from_ref(image), &[])?,
        ))
    }

    fn features(&self, image: &Planar) -> Result<Vec<Vec<f32>>, EvalError> {
        Ok(only(self.features_batch(std::slice::from_ref(image), &[])?))
    }

    fn layer_features(&self, image: &Planar, layer: usize) -> Result<Vec<f32>, EvalError> {
        Ok(only(self.layer_features_batch(
            std::slice::from_ref(image),
            &[],
            layer,
        )?))
    }

    fn dense_embeddings_batch(
        &self,
        images: &[Planar],
        next: &[Planar],
        head: DenseHead,
    ) -> Result<Vec<TokenEmbeddings>, EvalError> {
        self.by_pass(images, next, 1, |pass, then| {
            self.dense_pass(pass, then, head)
        })
    }

    fn image_embedding_batch(
        &self,
        images: &[Planar],
        next: &[Planar],
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        self.by_pass(images, next, 1, |pass, then| {
            self.image_embedding_pass(pass, then)
        })
    }

    fn forms_logits(&self) -> bool {
        self.device_logits.load(Ordering::Relaxed)
    }

    fn dense_logits_batch(
        &self,
        images: &[Planar],
        next: &[Planar],
        head: DenseHead,
        classes: &[f32],
    ) -> Result<Vec<PatchLogits>, EvalError> {
        self.by_pass(images, next, 1, |pass, then| {
            self.dense_logits_pass(pass, then, head, classes)
        })
    }

    fn image_logits_batch(
        &self,
        images: &[Planar],
        next: &[Planar],
        classes: &[f32],
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        self.by_pass(images, next, 1, |pass, then| {
            self.image_logits_pass(pass, then, classes)
        })
    }

    fn features_batch(
        &self,
        images: &[Planar],
        next: &[Planar],
    ) -> Result<Vec<Vec<Vec<f32>>>, EvalError> {
        self.by_pass(images, next, 1, |pass, then| self.features_pass(pass, then))
    }

    fn layer_features_batch(
        &self,
        images: &[Planar],
        next: &[Planar],
        layer: usize,
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        self.by_pass(images, next, 1, |pass, then| {
            self.layer_features_pass(pass, then, layer)
        })
    }

    fn feature_sums_batch(
        &self,
        images: &[Planar],
        next: &[Planar],
    ) -> Result<Vec<PairSums>, EvalError> {
        check_pairs(images)?;
        self.by_pass(images, next, 2, |pass, then| {
            self.feature_sums_pass(pass, then)
        })
    }
}

/// The text tower on a device.
pub struct GpuText<'t> {
    tower: &'t TextTower,
    stack: Stack,
    ln_final: DeviceLayerNorm,
    projection: DeviceLinear,
}

impl<'t> GpuText<'t> {
    pub fn new(
        dev: &Device,
        tower: &'t TextTower,
        precision: Precision,
    ) -> Result<Self, EvalError> {
        let c = &tower.config;
        check_heads("text tower", c.width, c.heads)?;
        let w = &tower.weights;
        Ok(GpuText {
            tower,
            stack: Stack::new(
                dev,
                &w.blocks,
                (c.width, c.heads),
                c.mlp,
                c.activation,
                c.ln_eps,
                precision,
            )?,
            ln_final: upload_ln(dev, &w.ln_final)?,
            projection: upload_linear(dev, &w.projection, precision)?,
        })
    }
}

impl TextEncoder for GpuText<'_> {
    fn tower(&self) -> &TextTower {
        self.tower
    }

    /// All sequences packed into one variable-length batch; the token and position lookup is a
    /// host gather (a copy, no arithmetic besides one add per element).
    fn encode_batch(&self, sequences: &[Vec<u32>]) -> Result<Vec<f32>, EvalError> {
        let c = &self.tower.config;
        let w = &self.tower.weights;
        let d = c.width;
        let dev = &self.stack.dev;
        let mut h = Vec::new();
        let mut cu = vec![0i32];
        let mut lens = Vec::new();
        for s in sequences {
            check_ids(self.tower, s)?;
            for (t, &id) in s.iter().enumerate() {
                let tok = &w.token_embedding[id as usize * d..(id as usize + 1) * d];
                let pos = &w.position_embedding[t * d..(t + 1) * d];
                h.extend(tok.iter().zip(pos).map(|(a, b)| a + b));
            }
            lens.push(s.len());
            cu.push(cu.last().copied().unwrap_or(0) + s.len() as i32);
        }
        let rows: usize = lens.iter().sum();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let cu_dev = dev.upload(&cu)?;
        let mut x = dev.upload(&h)?;
        for b in &self.stack.blocks {
            x = self.stack.block(b, &x, &cu_dev, &lens, rows, true)?;
        }
        let normed = self.stack.ln(&x, &self.ln_final, rows, d)?;
        let e = c.embed_dim;
        let mut out = dev.alloc(rows * e)?;
        self.stack
            .linear(&normed, rows, &self.projection, false, &mut out, false)?;
        let all = dev.download(&out)?;
        let mut pooled = Vec::with_capacity(sequences.len() * e);
        for (s, &start) in sequences.iter().zip(&cu) {
            let r = start as usize + eot_position(s);
            pooled.extend_from_slice(&all[r * e..(r + 1) * e]);
        }
        Ok(pooled)
    }
}

/// `prm eval` runs one engine per device, each on its own thread: the engine must stay `Send` and
/// `Sync` (this fails to compile otherwise).
const _: fn() = || {
    fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<GpuTargets<'static>>();
};
