//! The ViT forward over a packed batch: LayerNorm, the attention (SIMT fp32 or tensor-core
//! v2/v3/v4), the MLP, and what the backward needs saved.

use super::attention_plan::{buffer_bytes, AttentionPass, CallStep};
use super::weights::{DeviceBlock, DeviceLayerNorm, DeviceLinear, Weight};
use super::{
    bf16_weight, AttentionSaved, Batch, BlockSaved, Forward, GpuVit, MlpPre, Normed, PreNormSaved,
    Precision,
};
use crate::gpu::gemm::{matmul_bf16_bf16out, matmul_bf16_residual};
use crate::gpu::kernels::activation::{bias_activation_forward_bf16, bias_activation_forward_f32};
use crate::gpu::kernels::attention::{
    attention_forward_f32, attention_forward_tc, attention_forward_tc3, attention_forward_tc4,
    attention_stats_len, AttentionMode,
};
use crate::gpu::kernels::embed::{assemble_tokens_f32, patchify_bf16, patchify_f32};
use crate::gpu::kernels::layernorm::{layernorm_forward_f32, layernorm_forward_f32_bf16out};
use crate::gpu::pool::{Pooled, PooledBf16};
use crate::gpu::{Buffer, GpuError};

impl<'m> GpuVit<'m> {
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

    /// The tower through its first `blocks` blocks: features F_0..F_blocks, and with `save`
    /// what the backward needs.
    pub(super) fn forward(
        &self,
        batch: &Batch,
        save: bool,
        blocks: usize,
    ) -> Result<Forward, GpuError> {
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
            self.class_embedding.as_ref(),
            &batch.pos,
            &mut embedded,
            d,
        )?;
        // F_0 = LN_pre(tokens), or the tokens themselves in a tower without LN_pre.
        let (f0, ln_pre) = match &self.ln_pre {
            Some(ln) => {
                let Normed { y, mean, rstd } = self.layer_norm(&embedded, ln, t)?;
                let saved = PreNormSaved {
                    embedded,
                    mean,
                    rstd,
                };
                (y, Some(saved))
            }
            None => (embedded, None),
        };

        let run = blocks;
        let mut features = vec![f0];
        let mut blocks = Vec::new();
        for b in self.blocks.iter().take(run) {
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
            ln_pre,
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

    fn attention_forward(
        &self,
        qkv: &Buffer<f32>,
        batch: &Batch,
    ) -> Result<(Pooled, Pooled), GpuError> {
        let (t, d) = (batch.packing.total_tokens, self.model.config.width);
        let mut context = self.alloc(t * d)?;
        let mut lse = self.alloc(attention_stats_len(t, self.heads()))?;
        let (cu, lens) = (&batch.cu_seqlens, &batch.seqlens);
        let mode = AttentionMode::QK;
        // bf16 precision runs v2 on tensor cores here (PRM_ATTENTION=v2, or the SIMT kernels for
        // head dims v2 has none for: below 64); fp32 the fp32 SIMT kernels.
        let forward = match self.precision {
            Precision::Fp32 => attention_forward_f32,
            Precision::Bf16 => attention_forward_tc,
        };
        let (out, lse_out, heads) = (&mut context, &mut lse, self.heads());
        forward(
            &self.dev, qkv, cu, lens, out, lse_out, d, heads, mode, false,
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
        let mut lse = self.alloc(attention_stats_len(t, self.heads()))?;
        let seqlens = &batch.seqlens;
        self.run_attention(AttentionPass::Forward, seqlens, |step| match step {
            CallStep::Run(k) => {
                let forward = if k.v4 {
                    attention_forward_tc4
                } else {
                    attention_forward_tc3
                };
                forward(
                    &self.dev,
                    qkv,
                    &batch.cu_seqlens,
                    seqlens,
                    &mut context,
                    &mut lse,
                    d,
                    self.heads(),
                    AttentionMode::QK,
                    false,
                    k.options,
                )
                .map(|()| Vec::new())
            }
            CallStep::ReadOutputs => {
                let mut bytes = buffer_bytes(&self.dev, &context, t * d)?;
                bytes.extend(buffer_bytes(
                    &self.dev,
                    &lse,
                    attention_stats_len(t, self.heads()),
                )?);
                Ok(bytes)
            }
            CallStep::PoisonOutputs => {
                self.dev.poison(&mut context)?;
                self.dev.poison(&mut lse)?;
                Ok(Vec::new())
            }
        })?;
        Ok((context, lse))
    }
}
