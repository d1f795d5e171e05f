//! The objectives on the device: a loss pass over a batch (per-image values, and with them the
//! input gradient, each selected layer's loss adding into the backward's running gradient;
//! the prm loss fused with LN1's backward where it fits), the `embed` loss through the host,
//! and the per-layer evaluation of a batch.

use std::sync::atomic::Ordering;

use super::{Batch, Depth, Forward, GpuClean, GpuVit, GradientUpdate, LossPass, Losses};
use crate::attack::image::Evaluation;
use crate::attack::loss::Objective;
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

    /// The CLS row of every image of a packed feature buffer (host): gathered on the device
    /// and read back in one download of a row per image, not the whole buffer (nor one wait
    /// for the device per image).
    pub(super) fn cls_rows(
        &self,
        batch: &Batch,
        features: &Buffer<f32>,
    ) -> Result<Vec<Vec<f32>>, GpuError> {
        let d = self.model.config.width;
        let images = &batch.packing.images;
        let mut rows = self.alloc(images.len() * d)?;
        for (i, p) in images.iter().enumerate() {
            self.dev
                .copy_range(features, p.token_offset * d, &mut rows, i * d, d)?;
        }
        let host = self.dev.download(&rows)?;
        Ok(host.chunks_exact(d).map(<[f32]>::to_vec).collect())
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

    /// The `embed` loss: the image embedding is one row per image, so it is computed on the host
    /// with the reference code and its gradient injected at F_L's CLS rows.
    pub(super) fn embed_loss(
        &self,
        batch: &Batch,
        clean: &GpuClean,
        objective: &Objective,
        with_grad: bool,
        fwd: Forward,
    ) -> Result<LossPass, GpuError> {
        let (d, last) = (self.model.config.width, self.model.config.layers);
        let adv_cls = self.cls_rows(batch, &fwd.features[last])?;
        // The clean batch has the adversarial batch's sizes (check_geometry), so its packing.
        if clean.cls_rows.get().is_none() {
            let rows = self.cls_rows(batch, &clean.features[last])?;
            let _ = clean.cls_rows.set(rows); // another thread may have set the same rows
        }
        let clean_cls = clean.cls_rows.get().expect("set above");
        let mut values = Vec::with_capacity(adv_cls.len());
        // Only the CLS rows carry gradient: they go up alone (one row per image, not a
        // [ΣT, D] table that is zero but for them) and are placed on the device.
        let mut d_cls = vec![0.0f32; adv_cls.len() * d];
        for ((a, c), row) in adv_cls.iter().zip(clean_cls).zip(d_cls.chunks_exact_mut(d)) {
            let mut adv_f: Vec<Vec<f32>> = vec![Vec::new(); last + 1];
            let mut clean_f: Vec<Vec<f32>> = vec![Vec::new(); last + 1];
            adv_f[last] = a.clone();
            clean_f[last] = c.clone();
            let v = objective.evaluate(self.model, &adv_f, &clean_f, with_grad);
            values.push(v.value);
            if let Some(Some(g)) = v.feature_grads.get(last) {
                row.copy_from_slice(&g[..d]); // the CLS row's (the evaluation saw only it)
            }
        }
        if !with_grad {
            return Ok(LossPass {
                losses: Losses::Host(values),
                gradient: None,
                forward: fwd,
            });
        }
        let injected = self.dev.upload(&d_cls)?;
        let grad = self.backward(batch, &fwd, |l, _, dh, copy, ln| {
            if l == last {
                // The first layer the backward visits (no LayerNorm before it): dh is still the
                // zeroed gradient the backward starts from, so only the CLS rows are written.
                for (i, p) in batch.packing.images.iter().enumerate() {
                    self.dev
                        .copy_range(&injected, i * d, dh, p.token_offset * d, d)?;
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
