//! The device-resident step loop of the GPU engine: images, resizes, gradients and optimiser
//! state stay on the device for the whole attack; only per-image loss values come back.
//!
//! Each step: the adversarial batch (AdamW: from δ) → bicubic resize to the step's working sizes
//! when they differ from the native ones (with the clean batch and its features at those sizes)
//! → forward, loss kernels and backward → the transpose resize back to native size → the
//! optimiser kernel. The geometry of every step comes from the attack's [`StepPlan`], so the
//! draws are the same as the host loop's, and the update kernels are bit-identical twins of
//! [`crate::attack::optim::Optimizer`].

use super::{GpuClean, GpuVit, LossPass};
use crate::attack::engine::{StepLoopResult, StepPlan};
use crate::attack::settings::OptimizerKind;
use crate::gpu::kernels::resize::{
    resize_backward_f32, resize_forward_f32, ResizePlan, ResizeSizes,
};
use crate::gpu::kernels::update::{
    adamw_image_f32, adamw_init_f32, adamw_step_f32, escape_adamw_f32, escape_sign_step_f32,
    mifgsm_step_f32, pgd_step_f32, AdamwScalars, ImageBatch,
};
use crate::gpu::pool::Pooled;
use crate::gpu::{Buffer, GpuError};

/// Optimiser state on the device.
enum State {
    /// PGD / MI-FGSM: the image itself, and MI-FGSM's momentum.
    Sign { x: Pooled, momentum: Pooled },
    /// AdamW: δ in 0–255 units and its moments, with the step counter.
    Adamw {
        delta: Pooled,
        m: Pooled,
        v: Pooled,
        t: i32,
    },
}

impl GpuVit<'_> {
    /// Packs host images into one device buffer.
    fn upload_packed(&self, images: &[&[f32]]) -> Result<Pooled, GpuError> {
        let mut packed = Vec::with_capacity(images.iter().map(|i| i.len()).sum());
        for im in images {
            packed.extend_from_slice(im);
        }
        Ok(self.pool.adopt(self.dev.upload(&packed)?))
    }

    /// `images` (packed planar at `from`) resized to `to`, or a copy when nothing changes.
    fn resized(
        &self,
        images: &Buffer<f32>,
        from: &[(usize, usize)],
        to: &[(usize, usize)],
    ) -> Result<(Pooled, Option<ResizePlan>), GpuError> {
        if from == to {
            let mut copy = self.alloc(images.len())?;
            self.dev.copy(images, &mut copy)?;
            return Ok((copy, None));
        }
        let sizes: Vec<ResizeSizes> = from.iter().copied().zip(to.iter().copied()).collect();
        let plan = ResizePlan::packed(&self.dev, 3, &sizes)?;
        let mut out = self.alloc(plan.output_len())?;
        resize_forward_f32(&self.dev, &plan, images, &mut out)?;
        Ok((out, Some(plan)))
    }

    /// Clean features of packed device images at `sizes`.
    fn clean_on_device(
        &self,
        sizes: &[(usize, usize)],
        images: Pooled,
    ) -> Result<GpuClean, GpuError> {
        let batch = self.batch_on_device(sizes, images)?;
        let fwd = self.forward(&batch, false)?;
        let cls_rows = if self.model.weights.projection.is_some() {
            self.cls_rows(&batch, &fwd.features[self.model.config.layers])?
        } else {
            Vec::new()
        };
        Ok(GpuClean {
            sizes: sizes.to_vec(),
            features: fwd.features,
            cls_rows,
        })
    }

    pub(super) fn step_loop(
        &self,
        plan: &StepPlan,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Vec<StepLoopResult>, GpuError> {
        let s = plan.settings;
        let native: Vec<(usize, usize)> = plan.clean.iter().map(|c| (c.height, c.width)).collect();
        let lens: Vec<usize> = plan.clean.iter().map(|c| c.data.len()).collect();
        let images = ImageBatch::with_rngs(&self.dev, &lens, &vec![s.eps; lens.len()], &plan.rngs)?;
        let clean = self.upload_packed(&plan.clean.iter().map(|c| c.data).collect::<Vec<_>>())?;
        let start =
            self.upload_packed(&plan.starts.iter().map(|x| x.as_slice()).collect::<Vec<_>>())?;
        let total = clean.len();
        let lr255 = s.lr * 255.0;

        let mut state = match s.optimizer {
            OptimizerKind::Adamw => {
                let mut delta = self.alloc(total)?;
                adamw_init_f32(&self.dev, &images, &mut delta, &start, &clean)?;
                State::Adamw {
                    delta,
                    m: self.pool.take_zeroed(total)?,
                    v: self.pool.take_zeroed(total)?,
                    t: 0,
                }
            }
            OptimizerKind::Pgd | OptimizerKind::Mifgsm => State::Sign {
                x: start,
                momentum: self.pool.take_zeroed(total)?,
            },
        };
        let clean_eval = {
            let (at_eval, _) = self.resized(&clean, &native, &plan.eval_sizes)?;
            self.clean_on_device(&plan.eval_sizes, at_eval)?
        };
        let mut loss_initial = vec![None; lens.len()];
        let mut adv = self.alloc(total)?;
        for (step, sizes) in plan.sizes.iter().enumerate() {
            if step == 0 && plan.escape {
                match &mut state {
                    State::Adamw { delta, t, .. } => {
                        *t += 1;
                        escape_adamw_f32(
                            &self.dev,
                            &images,
                            delta,
                            1.0 - lr255 * s.weight_decay,
                            lr255,
                        )?;
                    }
                    State::Sign { x, .. } => {
                        escape_sign_step_f32(&self.dev, &images, x, &clean, s.step_size)?
                    }
                }
                on_step(step);
                continue;
            }
            let current = match &state {
                State::Adamw { delta, .. } => {
                    adamw_image_f32(&self.dev, &images, &mut adv, delta, &clean)?;
                    &adv
                }
                State::Sign { x, .. } => x,
            };
            let (working, plan_back) = self.resized(current, &native, sizes)?;
            let clean_step;
            let clean_features = if sizes == &plan.eval_sizes {
                &clean_eval
            } else {
                let (c, _) = self.resized(&clean, &native, sizes)?;
                clean_step = self.clean_on_device(sizes, c)?;
                &clean_step
            };
            let batch = self.batch_on_device(sizes, working)?;
            let LossPass {
                losses, gradient, ..
            } = self.loss(&batch, clean_features, plan.objective, true)?;
            if step == 0 && s.dynamic_scale.is_none() {
                // The only loss value the loop needs on the host: the other steps never wait.
                loss_initial = losses.values(&self.dev)?.into_iter().map(Some).collect();
            }
            let gradient = gradient.expect("gradient requested");
            let gradient = match plan_back {
                None => gradient,
                Some(rp) => {
                    let mut native_grad = self.alloc(total)?;
                    let mut scratch = self.alloc(rp.scratch_len().max(1))?;
                    resize_backward_f32(
                        &self.dev,
                        &rp,
                        &gradient,
                        &mut native_grad,
                        &mut scratch,
                        false,
                    )?;
                    native_grad
                }
            };
            match &mut state {
                State::Adamw { delta, m, v, t } => {
                    *t += 1;
                    adamw_step_f32(
                        &self.dev,
                        &images,
                        delta,
                        m,
                        v,
                        &clean,
                        &gradient,
                        AdamwScalars::new(lr255, s.weight_decay, *t),
                    )?;
                }
                State::Sign { x, momentum } => match s.optimizer {
                    OptimizerKind::Mifgsm => {
                        let mut inv_l1 = self.alloc(lens.len())?;
                        mifgsm_step_f32(
                            &self.dev,
                            &images,
                            x,
                            momentum,
                            &clean,
                            &gradient,
                            &mut inv_l1,
                            s.step_size,
                            s.momentum,
                        )?
                    }
                    _ => pgd_step_f32(&self.dev, &images, x, &clean, &gradient, s.step_size)?,
                },
            }
            on_step(step);
        }
        let finals = match &state {
            State::Adamw { delta, .. } => {
                adamw_image_f32(&self.dev, &images, &mut adv, delta, &clean)?;
                self.dev.download(&adv)?
            }
            State::Sign { x, .. } => self.dev.download(x)?,
        };
        let mut offset = 0;
        Ok(lens
            .iter()
            .zip(loss_initial)
            .map(|(&len, loss_initial)| {
                let adversarial = finals[offset..offset + len].to_vec();
                offset += len;
                StepLoopResult {
                    adversarial,
                    loss_initial,
                }
            })
            .collect())
    }
}
