//! The input-gradient backward over a packed batch: block by block from the top selected layer
//! down to the embedding, with the loss of each selected layer added into the running gradient.

use super::attention_plan::{buffer_bytes, AttentionPass, CallStep};
use super::weights::{DeviceBlock, Weight};
use super::{
    bf16_weight, AttentionSaved, Batch, Forward, GpuVit, GradientUpdate, MlpPre, Precision,
};
use crate::gpu::gemm::matmul_bf16_bf16out;
use crate::gpu::kernels::activation::{activation_backward_bf16, activation_backward_inplace_f32};
use crate::gpu::kernels::attention::{
    attention_backward_f32, attention_backward_tc, attention_backward_tc3_bf16_dout,
    attention_backward_tc4_bf16_dout, attention_stats_len, AttentionMode,
};
use crate::gpu::kernels::convert::to_bf16;
use crate::gpu::kernels::embed::{
    col2im_f32, tokens_to_patch_grads_f32, tokens_to_patch_grads_f32_bf16out,
};
use crate::gpu::kernels::layernorm::{layernorm_backward_f32, layernorm_backward_f32_bf16copy};
use crate::gpu::kernels::layernorm_loss::LayerNormBackward;
use crate::gpu::pool::Pooled;
use crate::gpu::{Buffer, GpuError};

impl<'m> GpuVit<'m> {
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
    /// it may write dh's bf16 copy (it says which it did). With `ln`, dh always changes. dh is
    /// zero at the first call (the deepest layer run, without `ln`).
    pub(super) fn backward(
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
        // The forward may have stopped short of the last block (a shallow loss): start there.
        let last = fwd.blocks.len();
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
                    let mut delta = self.alloc(attention_stats_len(t, self.heads()))?;
                    self.product_from_bf16(
                        b.qkv.backward_shape(t),
                        &b.qkv.weight,
                        None,
                        None,
                        &mut d_normed,
                        |db| {
                            let seqlens = &batch.seqlens;
                            self.run_attention(
                                AttentionPass::Backward,
                                seqlens,
                                |step| match step {
                                    CallStep::Run(k) => {
                                        let backward = if k.v4 {
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
                                            seqlens,
                                            db,
                                            &mut delta,
                                            d,
                                            self.heads(),
                                            AttentionMode::QK,
                                            false,
                                            k.options,
                                        )
                                        .map(|()| Vec::new())
                                    }
                                    CallStep::ReadOutputs => {
                                        let mut bytes = buffer_bytes(&self.dev, db, t * 3 * d)?;
                                        let n = attention_stats_len(t, self.heads());
                                        bytes.extend(buffer_bytes(&self.dev, &delta, n)?);
                                        Ok(bytes)
                                    }
                                    CallStep::PoisonOutputs => {
                                        self.dev.poison(db)?;
                                        self.dev.poison(&mut delta)?;
                                        Ok(Vec::new())
                                    }
                                },
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
        let d_embedded = match (&self.ln_pre, &fwd.ln_pre) {
            (Some(ln), Some(saved)) => {
                let mut d_embedded = self.alloc(t * d)?;
                layernorm_backward_f32(
                    &self.dev,
                    &saved.embedded,
                    &dh,
                    &ln.weight,
                    &saved.mean,
                    &saved.rstd,
                    &mut d_embedded,
                    t,
                    d,
                    false,
                )?;
                d_embedded
            }
            // Without LN_pre (the forward saves LN_pre's input exactly when the engine has one),
            // dL/dF_0 is the tokens' gradient.
            _ => dh,
        };
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
        let mut delta = self.alloc(attention_stats_len(t, self.heads()))?;
        let (cu, lens) = (&batch.cu_seqlens, &batch.seqlens);
        let (dev, mode) = (&self.dev, AttentionMode::QK);
        let (d_out, grads) = (d_context, &mut d_qkv);
        // As the forward: v2 for bf16 (or the SIMT kernels where it has none), SIMT for fp32.
        let backward = match self.precision {
            Precision::Fp32 => attention_backward_f32,
            Precision::Bf16 => attention_backward_tc,
        };
        let (scratch, heads) = (&mut delta, self.heads());
        backward(
            dev, qkv, context, d_out, lse, cu, lens, grads, scratch, d, heads, mode, false,
        )?;
        Ok(d_qkv)
    }
}
