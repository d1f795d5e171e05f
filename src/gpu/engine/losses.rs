//! The objectives on the device: a loss pass over a batch (per-image values, and with them the
//! input gradient, each selected layer's loss adding into the backward's running gradient;
//! the prm loss fused with LN1's backward where it fits), the `embed` loss through the host,
//! and the per-layer evaluation of a batch.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::{Batch, Depth, Forward, GpuClean, GpuVit, GradientUpdate, LossPass, Losses};
use crate::attack::image::Evaluation;
use crate::attack::loss::{embed_losses, embeddings, Objective};
use crate::gpu::kernels::layernorm::{layernorm_backward_f32, layernorm_backward_f32_bf16copy};
use crate::gpu::kernels::layernorm_loss::{
    self, layernorm_backward_then_loss_f32, LayerNormBackward,
};
use crate::gpu::kernels::loss::{
    layer_cosine_f32, layer_loss_f32_gradient, Gradient, LayerLoss, LossScratch, PackedTokens,
};
use crate::gpu::{Buffer, GpuError};

impl GpuVit<'_> {
    /// `dh += LN_backward(ln)` over the batch's rows (a block's LN1, accumulated into the
    /// running residual gradient); given `copy`, also writes `bf16(dh)` there.
    pub(super) fn layernorm_backward_into(
        &self,
        ln: LayerNormBackward,
        dh: &mut Buffer<f32>,
        copy: Option<&mut Buffer<half::bf16>>,
    ) -> Result<GradientUpdate, GpuError> {
        let (t, d) = (ln.mean.len(), self.model.config.width);
        let LayerNormBackward {
            x,
            dy,
            gamma,
            mean,
            rstd,
        } = ln;
        match copy {
            Some(copy) => {
                layernorm_backward_f32_bf16copy(
                    &self.dev, x, dy, gamma, mean, rstd, dh, copy, t, d, true,
                )?;
                Ok(GradientUpdate::ChangedWithCopy)
            }
            None => {
                layernorm_backward_f32(&self.dev, x, dy, gamma, mean, rstd, dh, t, d, true)?;
                Ok(GradientUpdate::Changed)
            }
        }
    }

    pub(super) fn tokens<'b>(&self, batch: &'b Batch) -> PackedTokens<'b> {
        PackedTokens {
            cu_seqlens: &batch.cu_seqlens,
            images: batch.packing.len(),
            rows: batch.packing.total_tokens,
            dim: self.model.config.width,
        }
    }

    /// The rows of every image of a packed feature buffer that its image embedding reads, on
    /// the host, as one buffer and each image's range in it: its CLS row (CLIP), gathered on
    /// the device and read back in one download of a row per image, or all its tokens (SigLIP's
    /// attention-pooling head, CLIPA's average), one download of the batch sliced in place.
    pub(super) fn embedding_rows(
        &self,
        batch: &Batch,
        features: &Buffer<f32>,
        every_token: bool,
    ) -> Result<(Vec<f32>, Vec<Range<usize>>), GpuError> {
        let d = self.model.config.width;
        let images = &batch.packing.images;
        if every_token {
            let all = self
                .dev
                .download_range(features, 0, batch.packing.total_tokens * d)?;
            let ranges = images
                .iter()
                .map(|p| p.token_offset * d..(p.token_offset + p.tokens()) * d)
                .collect();
            return Ok((all, ranges));
        }
        let mut rows = self.alloc(images.len() * d)?;
        for (i, p) in images.iter().enumerate() {
            self.dev
                .copy_range(features, p.token_offset * d, &mut rows, i * d, d)?;
        }
        let ranges = (0..images.len()).map(|i| i * d..(i + 1) * d).collect();
        Ok((self.dev.download(&rows)?, ranges))
    }

    /// Loss per image (summed over the objective's layers in f64 on the host) and, with
    /// `with_grad`, the input-pixel gradient of the batch.
    pub(super) fn loss(
        &self,
        batch: &Batch,
        clean: &GpuClean,
        objective: &Objective,
        with_grad: bool,
        depth: Depth,
    ) -> Result<LossPass, GpuError> {
        let images = batch.packing.len();
        let fwd = self.forward(batch, with_grad, self.blocks_for(objective, depth))?;
        let Some(kind) = LayerLoss::from_kind(objective.kind) else {
            return self.embed_loss(batch, clean, objective, with_grad, fwd);
        };
        let shape = self.tokens(batch);
        let mut scratch = batch.loss_scratch.lock().unwrap_or_else(|p| p.into_inner());
        // Layers add into one per-image total on the device (the first selected layer visited
        // overwrites it), so nothing waits for the host between layers.
        let mut totals = self.alloc(images)?;
        let mut first = true;
        // The loss's rows pass runs inside LN1's backward where the kernel takes it.
        let fuse = self.fused_loss.load(Ordering::Relaxed)
            && layernorm_loss::fuses(kind, self.model.config.width);
        let mut add = |l: usize,
                       features: &Buffer<f32>,
                       grad: Option<&mut Buffer<f32>>,
                       copy: Option<&mut Buffer<half::bf16>>,
                       ln: Option<LayerNormBackward<'_>>|
         -> Result<GradientUpdate, GpuError> {
            if !objective.layers.contains(&l) {
                return match (ln, grad) {
                    (Some(ln), Some(dh)) => self.layernorm_backward_into(ln, dh, copy),
                    _ => Ok(GradientUpdate::Unchanged),
                };
            }
            let accumulate = !first;
            first = false;
            let update = match (&grad, &copy) {
                (Some(_), Some(_)) => GradientUpdate::ChangedWithCopy,
                _ => GradientUpdate::Changed,
            };
            let clean = &clean.features[l];
            match (grad, ln) {
                (Some(dh), Some(ln)) if fuse => layernorm_backward_then_loss_f32(
                    &self.dev,
                    ln,
                    kind,
                    objective.tokens,
                    shape,
                    clean,
                    &mut totals,
                    accumulate,
                    Gradient { grad: dh, copy },
                    &mut scratch,
                )?,
                (mut grad, ln) => {
                    if let (Some(dh), Some(ln)) = (grad.as_deref_mut(), ln) {
                        // The loss pass writes the copy, after LN1's gradient joins dh.
                        self.layernorm_backward_into(ln, dh, None)?;
                    }
                    layer_loss_f32_gradient(
                        &self.dev,
                        kind,
                        objective.tokens,
                        shape,
                        features,
                        clean,
                        &mut totals,
                        accumulate,
                        grad.map(|grad| Gradient { grad, copy }),
                        &mut scratch,
                    )?
                }
            }
            Ok(update)
        };
        if !with_grad {
            for (l, f) in fwd.features.iter().enumerate() {
                add(l, f, None, None, None)?;
            }
            if first {
                self.dev.zero(&mut totals)?; // no layer selected
            }
            return Ok(LossPass {
                losses: Losses::Device(totals),
                gradient: None,
                forward: fwd,
            });
        }
        let grad = self.backward(batch, &fwd, |l, f, dh, copy, ln| {
            add(l, f, Some(dh), copy, ln)
        })?;
        if first {
            self.dev.zero(&mut totals)?;
        }
        Ok(LossPass {
            losses: Losses::Device(totals),
            gradient: Some(grad),
            forward: fwd,
        })
    }

    /// The `embed` loss: the image embedding is one vector per image, so it is formed on the
    /// host by the reference code (`reference::pooling`) from the rows of F_L it reads, and its
    /// gradient is injected at those rows: each image's CLS row (CLIP), or all its tokens
    /// (SigLIP's attention-pooling head, CLIPA's average; a download and an upload of F_L a
    /// step).
    pub(super) fn embed_loss(
        &self,
        batch: &Batch,
        clean: &GpuClean,
        objective: &Objective,
        with_grad: bool,
        fwd: Forward,
    ) -> Result<LossPass, GpuError> {
        debug_assert_eq!(objective.kind, crate::attack::LossKind::Embed);
        let (d, last) = (self.model.config.width, self.model.config.layers);
        let every_token = self.model.image_head().is_ok_and(|h| h.reads_every_token());
        // The clean batch has the adversarial batch's sizes (check_geometry), so its packing.
        if clean.embeddings.get().is_none() {
            let rows = self.embedding_rows(batch, &clean.features[last], every_token)?;
            // another thread may have set the same embeddings
            let _ = clean
                .embeddings
                .set(embeddings(self.model, &slices(&rows.0, &rows.1)));
        }
        let clean_embeddings = clean.embeddings.get().expect("set above");
        let (host, ranges) = self.embedding_rows(batch, &fwd.features[last], every_token)?;
        let adv = slices(&host, &ranges);
        let (values, grads) = embed_losses(self.model, &adv, clean_embeddings, with_grad);
        let Some(grads) = grads else {
            return Ok(LossPass {
                losses: Losses::Host(values),
                gradient: None,
                forward: fwd,
            });
        };
        let images = &batch.packing.images;
        // Only the rows the embedding read carry gradient: the CLS rows go up alone (one row
        // per image, not a [ΣT, D] table that is zero but for them) and are placed on the
        // device; with every token read, the whole table is written into dh directly.
        let table = if every_token {
            let mut table = vec![0.0f32; batch.packing.total_tokens * d];
            for (p, g) in images.iter().zip(&grads) {
                table[p.token_offset * d..][..g.len()].copy_from_slice(g);
            }
            table
        } else {
            grads.iter().flat_map(|g| g[..d].iter().copied()).collect()
        };
        let cls_rows = if every_token {
            None
        } else {
            Some(self.dev.upload(&table)?)
        };
        let grad = self.backward(batch, &fwd, |l, _, dh, copy, ln| {
            if l == last {
                // The first layer the backward visits (no LayerNorm before it): dh is still the
                // zeroed gradient the backward starts from, so only the read rows are written.
                match &cls_rows {
                    None => self.dev.write_range(dh, 0, &table)?,
                    Some(rows) => {
                        for (i, p) in images.iter().enumerate() {
                            self.dev
                                .copy_range(rows, i * d, dh, p.token_offset * d, d)?;
                        }
                    }
                }
                Ok(GradientUpdate::Changed)
            } else {
                match ln {
                    Some(ln) => self.layernorm_backward_into(ln, dh, copy),
                    None => Ok(GradientUpdate::Unchanged),
                }
            }
        })?;
        Ok(LossPass {
            losses: Losses::Host(values),
            gradient: Some(grad),
            forward: fwd,
        })
    }

    /// Per image of `batch`: the loss against `clean` and the mean token cosine of every
    /// feature layer, without gradient.
    pub(super) fn evaluate_batch(
        &self,
        batch: &Batch,
        clean: &GpuClean,
        objective: &Objective,
    ) -> Result<Vec<Evaluation>, GpuError> {
        let LossPass {
            losses,
            forward: fwd,
            ..
        } = self.loss(batch, clean, objective, false, Depth::All)?;
        let shape = self.tokens(batch);
        let mut scratch = LossScratch::new(&self.dev, shape.rows, shape.images)?;
        // Every layer's cosines are queued before the first is read back, so the device runs
        // them back to back instead of waiting for the host after each layer.
        let per_layer = fwd
            .features
            .iter()
            .zip(&clean.features)
            .map(|(f, c)| {
                let mut cos = self.alloc(shape.images)?;
                layer_cosine_f32(
                    &self.dev,
                    objective.tokens,
                    shape,
                    f,
                    c,
                    &mut cos,
                    &mut scratch,
                )?;
                Ok(cos)
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        let mut layer_cosine = vec![Vec::with_capacity(per_layer.len()); shape.images];
        for cos in &per_layer {
            for (per_image, v) in layer_cosine.iter_mut().zip(self.dev.download(cos)?) {
                per_image.push(v as f64);
            }
        }
        Ok(losses
            .values(&self.dev)?
            .into_iter()
            .zip(layer_cosine)
            .map(|(loss, layer_cosine)| Evaluation { loss, layer_cosine })
            .collect())
    }
}

/// Each range of `host`, borrowed.
fn slices<'a>(host: &'a [f32], ranges: &[Range<usize>]) -> Vec<&'a [f32]> {
    ranges.iter().map(|r| &host[r.clone()]).collect()
}
