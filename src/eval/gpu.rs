//! The evaluation targets and the CLIP text tower on the GPU engine's public kernel API
//! (`prm::gpu::kernels::*` launchers and `prm::gpu::gemm`), so they run on CUDA and, unchanged,
//! in the CPU simulator of the CUDA execution model.
//!
//! Nothing here needs a kernel of its own: the MaskCLIP family is the ViT block with the
//! attention kernel in another mode.
//! - maskclip: [`AttentionMode::Identity`] (`out = v`), then out_proj, residual, FFN;
//! - sclip: [`AttentionMode::QQ`] and [`AttentionMode::KK`]; `out_proj(a + b)` is formed as two
//!   accumulating products `x + a·Wᵀ + bias + b·Wᵀ`, so no element-wise add is needed;
//! - clearclip: [`AttentionMode::QQ`], out_proj, no residual, no FFN;
//! - text tower: [`AttentionMode::QK`] with the causal flag, every prompt of a class packed into
//!   one variable-length batch (`cu_seqlens`).
//!
//! Post-LayerNorm and the projection run on the device for every token; the per-token L2
//! normalisation runs on the host, and `prm eval` forms the cosine with the C class embeddings
//! (`[T, E]·[E, C]`) and the bilinear upsampling on its finisher thread while the device runs the
//! next image: the same host code as the reference path ([`super::ops`]), so the same bits.
//!
//! The attention kernels are written for head dim 64 (every CLIP tower): a model with another
//! head dim is refused with a clear error.

use super::ops::normalize_rows;
use super::targets::{require_projection, DenseHead, EvalEngine, TokenEmbeddings};
use super::text::{check_ids, eot_position, TextEncoder};
use super::EvalError;
use crate::attack::image::Planar;
use crate::gpu::engine::weights::{
    upload_block, upload_linear, upload_ln, DeviceBlock, DeviceLayerNorm, DeviceLinear, Weight,
};
use crate::gpu::engine::Precision;
use crate::gpu::gemm::{matmul_bf16, matmul_bf16_residual, matmul_f32, matmul_f32_residual};
use crate::gpu::kernels::activation::bias_activation_forward_f32;
use crate::gpu::kernels::attention::{attention_forward_f32, AttentionMode, HEAD_DIM};
use crate::gpu::kernels::convert::to_bf16;
use crate::gpu::kernels::embed::{assemble_tokens_f32, patchify_f32, PackedImages};
use crate::gpu::kernels::layernorm::layernorm_forward_f32;
use crate::gpu::{Buffer, Device, GpuError};
use crate::model::{Activation, BlockWeights, Model, TextTower};
use crate::reference::resize::PositionEmbeddingCache;

/// The weights of a stack of pre-LN blocks on a device, and the operators over them.
struct Stack {
    dev: Device,
    blocks: Vec<DeviceBlock>,
    width: usize,
    mlp: usize,
    act: Activation,
    eps: f32,
}

fn check_heads(what: &str, width: usize, heads: usize) -> Result<(), EvalError> {
    if !width.is_multiple_of(HEAD_DIM) || width / heads != HEAD_DIM {
        return Err(EvalError::Usage(format!(
            "the GPU attention kernels need head dim {HEAD_DIM}; the {what} has width {width} and \
             {heads} heads; use --device cpu"
        )));
    }
    Ok(())
}

impl Stack {
    fn new(
        dev: &Device,
        blocks: &[BlockWeights],
        width: usize,
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
            mlp,
            act,
            eps,
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
        let mut lse = self.dev.alloc((d / HEAD_DIM) * rows)?;
        attention_forward_f32(
            &self.dev, qkv, cu, lens, &mut ctx, &mut lse, d, mode, causal,
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

/// Features F_0..F_upto on the device, `cu_seqlens`, sequence lengths and the patch grid.
type DeviceForward = (Vec<Buffer<f32>>, Buffer<i32>, Vec<usize>, (usize, usize));

/// The vision targets on a device.
pub struct GpuTargets<'m> {
    model: &'m Model,
    stack: Stack,
    patch_embed: DeviceLinear,
    cls: Buffer<f32>,
    ln_pre: DeviceLayerNorm,
    ln_post: DeviceLayerNorm,
    projection: Option<DeviceLinear>,
    positions: PositionEmbeddingCache,
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
                c.width,
                c.mlp,
                c.activation,
                c.ln_eps,
                precision,
            )?,
            patch_embed: upload_linear(dev, &w.patch_embed, precision)?,
            cls: dev.upload(&w.class_embedding)?,
            ln_pre: upload_ln(dev, &w.ln_pre)?,
            ln_post: upload_ln(dev, &w.ln_post)?,
            projection: w
                .projection
                .as_ref()
                .map(|p| upload_linear(dev, p, precision))
                .transpose()?,
            positions: PositionEmbeddingCache::new(w.position_embedding.clone(), c.width, c.grid),
        })
    }

    fn dev(&self) -> &Device {
        &self.stack.dev
    }

    /// F_0..F_upto (device buffers), plus the sequence table.
    fn forward(&self, image: &Planar, upto: usize) -> Result<DeviceForward, EvalError> {
        let c = &self.model.config;
        let dev = self.dev();
        let (gh, gw) = (image.height / c.patch, image.width / c.patch);
        if gh == 0 || gw == 0 {
            return Err(EvalError::ImageTooSmall {
                width: image.width,
                height: image.height,
                patch: c.patch,
            });
        }
        let packing = PackedImages::new(&[(image.height, image.width)], c.patch);
        let table = packing.upload_table(dev)?;
        let cu = dev.upload(&packing.cu_seqlens())?;
        let t = packing.total_tokens;
        let lens = vec![t];
        let d = c.width;
        let images = dev.upload(image.data)?;
        let n = packing.total_patches;
        let cols = packing.patch_cols();
        let mut patches = dev.alloc(n * cols)?;
        patchify_f32(dev, &packing, &table, &images, &mut patches, c.mean, c.std)?;
        let mut pt = dev.alloc(n * d)?;
        self.stack
            .linear(&patches, n, &self.patch_embed, true, &mut pt, false)?;
        let pos = dev.upload(&self.positions.get(gh, gw))?;
        let mut emb = dev.alloc(t * d)?;
        assemble_tokens_f32(dev, &packing, &table, &pt, &self.cls, &pos, &mut emb, d)?;
        let mut feats = vec![self.stack.ln(&emb, &self.ln_pre, t, d)?];
        for b in &self.stack.blocks[..upto] {
            let next = self
                .stack
                .block(b, feats.last().expect("F_0"), &cu, &lens, t, false)?;
            feats.push(next);
        }
        Ok((feats, cu, lens, (gh, gw)))
    }

    /// post-LN → projection on the device; L2 normalisation on the host. `[rows, E]`.
    fn embed_rows(&self, z: &Buffer<f32>, rows: usize) -> Result<Vec<f32>, EvalError> {
        let proj = self.projection.as_ref().ok_or(EvalError::NoProjection)?;
        let d = self.model.config.width;
        let normed = self.stack.ln(z, &self.ln_post, rows, d)?;
        let mut e = self.dev().alloc(rows * proj.out_features)?;
        self.stack
            .linear(&normed, rows, proj, false, &mut e, false)?;
        let mut e = self.dev().download(&e)?;
        normalize_rows(&mut e, proj.out_features);
        Ok(e)
    }
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
        require_projection(self.model)?;
        let l = self.model.config.layers;
        let (feats, cu, lens, (gh, gw)) = self.forward(image, l - 1)?;
        let t = lens[0];
        let z = self.stack.dense_head(
            &self.stack.blocks[l - 1],
            feats.last().expect("F_{L-1}"),
            &cu,
            &lens,
            t,
            head,
        )?;
        let rows = self.embed_rows(&z, t)?;
        Ok(TokenEmbeddings {
            grid_h: gh,
            grid_w: gw,
            dim: rows.len() / t,
            rows,
        })
    }

    fn image_embedding(&self, image: &Planar) -> Result<Vec<f32>, EvalError> {
        require_projection(self.model)?;
        let (feats, ..) = self.forward(image, self.model.config.layers)?;
        // Only the CLS row: the first D elements of F_L.
        let d = self.model.config.width;
        let mut cls = self.dev().alloc(d)?;
        let row = self
            .dev()
            .download_range(feats.last().expect("F_L"), 0, d)?;
        self.dev().write(&mut cls, &row)?;
        self.embed_rows(&cls, 1)
    }

    fn features(&self, image: &Planar) -> Result<Vec<Vec<f32>>, EvalError> {
        let (feats, ..) = self.forward(image, self.model.config.layers)?;
        Ok(feats
            .iter()
            .map(|f| self.dev().download(f))
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Runs blocks 1..=layer only, and downloads that one layer.
    fn layer_features(&self, image: &Planar, layer: usize) -> Result<Vec<f32>, EvalError> {
        let (feats, ..) = self.forward(image, layer.min(self.model.config.layers))?;
        Ok(self.dev().download(feats.get(layer).ok_or_else(|| {
            EvalError::Usage(format!(
                "feature layer {layer}: the model has F_0..F_{}",
                self.model.config.layers
            ))
        })?)?)
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
                c.width,
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
