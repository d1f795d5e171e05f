//! The device-resident step loop of the GPU engine: images, resizes, gradients and optimiser
//! state stay on the device for the whole attack; only per-image loss values come back.
//!
//! Each step ([`GpuVit::attack_step`]): the adversarial batch (AdamW: from δ) → bicubic resize
//! to the step's working sizes when they differ from the native ones (with the clean batch and
//! its features at those sizes) → forward, loss kernels and backward → the transpose resize
//! back to native size → the optimiser kernel. The geometry of every step comes from the
//! attack's [`StepPlan`], so the draws are the same as the host loop's, and the update kernels
//! are bit-identical twins of [`crate::attack::optim::Optimizer`].
//!
//! # Graphs
//! A step at fixed shapes issues the same ~270 launches and ~150 products, on the same
//! buffers, every time; only the host's cost of issuing them differs from step to step. So,
//! with graphs on ([`GpuVit::set_graphs`]):
//! - the first step at a geometry runs directly, with the buffer pool keeping everything it
//!   returns (warm-up: it also creates the cuBLASLt plans, the batch tables and resize plans,
//!   and sizes the bf16 scratch);
//! - the next step at the same geometry is captured into a [`Graph`] ([`Device::capture`]),
//!   with the pool's arena, the tables and the scratch it uses tied to the graph, and launched;
//! - every later step at that geometry replays the graph with one call.
//!
//! Nothing per-step is baked into the graph: the step's inputs and outputs are the loop's
//! persistent buffers (optimiser state, the adversarial image, the per-image loss totals), and
//! AdamW's step counter and bias corrections are read on the device ([`AdamwSchedule`]).
//! Step 0's totals (the initial loss) are copied on the device after the step and read back
//! with the batch's results, so nothing waits for the device between the warm-up step and the
//! capture: the host records and instantiates step 1's graph while step 0 runs. Only a loss
//! sink (a loss curve) downloads every step's totals as it ends.
//!
//! Direct steps: the escape step (step 0 with `--init zero`), dynamic scale (a new geometry
//! nearly every step: a graph would be captured for one use, and a per-shape cache would pin
//! one arena of activations per shape; one 640×480 image at batch 1 is ~0.7 GB of them), and
//! the `embed` loss (computed on the host each step). A capture that fails is reported once on
//! stderr and the step runs directly: an attack never fails because of graphs. A driver error
//! (no graph support, a call that cannot be captured) turns graphs off for the engine; a
//! capture refused by our own checks (the pool's cache was released after the warm-up, say) is
//! retried once after another warm-up step.
//! Graphs never outlive the loop: they are dropped, with their memory, when it returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::{Depth, GpuClean, GpuVit, LossPass, Losses};
use crate::attack::engine::{
    DerivedStart, SavePhases, SavedByEngine, StepLoopOutput, StepLoopResult, StepPlan,
};
use crate::attack::settings::OptimizerKind;
use crate::gpu::graph::Graph;
use crate::gpu::kernels::loss::LayerLoss;
use crate::gpu::kernels::resize::{
    resize_backward_f32, resize_forward_f32, ResizePlan, ResizeSizes,
};
use crate::gpu::kernels::save::{quantize_for_saving_f32, SavedOnDevice};
use crate::gpu::kernels::update::{
    adamw_advance, adamw_image_f32, adamw_init_f32, adamw_step_scheduled_f32, escape_adamw_f32,
    escape_sign_step_f32, mifgsm_step_f32, pgd_step_f32, random_start_f32, AdamwSchedule,
    ImageBatch,
};
use crate::gpu::pool::{BufferPool, Pooled};
use crate::gpu::{Buffer, GpuError};

/// Optimiser state on the device.
enum State {
    /// PGD / MI-FGSM: the image itself, and MI-FGSM's momentum.
    Sign { x: Pooled, momentum: Pooled },
    /// AdamW: δ in 0–255 units and its moments, with the per-step scalars and the step counter.
    Adamw {
        delta: Pooled,
        m: Pooled,
        v: Pooled,
        schedule: AdamwSchedule,
    },
}

/// What every step of one loop reads and never changes.
struct Fixed<'a> {
    plan: &'a StepPlan<'a>,
    native: Vec<(usize, usize)>,
    images: ImageBatch,
    clean: Pooled,
    clean_eval: GpuClean,
}

/// The buffers every step writes and later steps (or the host) read: fixed addresses for the
/// whole loop, so a captured step can write them.
struct Outputs {
    /// AdamW's adversarial image (x of δ); unused by the sign optimisers.
    adv: Pooled,
    /// Per-image loss of the last step (summed over layers).
    totals: Pooled,
}

/// Keeps the pool's returns for a capture to come; switches it off (and trims) when dropped.
struct KeepReturns<'a>(&'a BufferPool);

impl<'a> KeepReturns<'a> {
    fn on(pool: &'a BufferPool) -> Self {
        pool.keep_returns(true);
        KeepReturns(pool)
    }
}

impl Drop for KeepReturns<'_> {
    fn drop(&mut self) {
        self.0.keep_returns(false);
    }
}

/// Captures tried per loop before graphs are turned off (a capture refused by one of our own
/// checks, e.g. the pool's cache released between the warm-up and the capture, is retried).
const MAX_CAPTURE_TRIES: usize = 2;

/// One line on stderr the first time a capture fails in this process.
fn report_capture_failure(e: &GpuError) {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    if !REPORTED.swap(true, Ordering::Relaxed) {
        eprintln!("prm: CUDA graphs unavailable, running every step directly (same results): {e}");
    }
}

impl GpuVit<'_> {
    /// Packs host images into one device buffer, each copied straight to its place (no
    /// packed copy of the batch on the host).
    pub(super) fn upload_packed(&self, images: &[&[f32]]) -> Result<Pooled, GpuError> {
        let mut packed = self.alloc(images.iter().map(|i| i.len()).sum())?;
        let mut offset = 0;
        for im in images {
            self.dev.write_range(&mut packed, offset, im)?;
            offset += im.len();
        }
        Ok(packed)
    }

    /// The plan's clean images, packed on the device: the upload staged for them ahead of
    /// time when there is one ([`crate::attack::engine::Engine::stage`]; the compute stream
    /// waits for its copy on the device), a plain upload otherwise.
    fn clean_input(&self, plan: &StepPlan) -> Result<Pooled, GpuError> {
        if let Some(key) = plan.stage_key {
            let lens: Vec<usize> = plan.clean.iter().map(|c| c.data.len()).collect();
            if let Some(staged) = self.take_staged(key, &lens)? {
                return Ok(staged);
            }
        }
        self.upload_packed(&plan.clean.iter().map(|c| c.data).collect::<Vec<_>>())
    }

    /// The resize plan of `sizes`, uploaded on first use and cached.
    fn resize_plan(&self, sizes: Vec<ResizeSizes>) -> Result<Arc<ResizePlan>, GpuError> {
        let cached = self
            .resize_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sizes)
            .cloned();
        let plan = match cached {
            Some(p) => p,
            None => {
                let p = Arc::new(ResizePlan::packed(&self.dev, 3, &sizes)?);
                let mut cache = self.resize_plans.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= super::MAX_CACHED_SHAPES {
                    cache.clear(); // graphs hold the plans they use
                }
                cache.insert(sizes, p.clone());
                p
            }
        };
        // A graph captured now reads the plan's tables at their addresses.
        self.dev.pin_to_capture(plan.clone());
        Ok(plan)
    }

    /// `images` (packed planar at `from`) resized to `to`, or a copy when nothing changes.
    fn resized(
        &self,
        images: &Buffer<f32>,
        from: &[(usize, usize)],
        to: &[(usize, usize)],
    ) -> Result<(Pooled, Option<Arc<ResizePlan>>), GpuError> {
        if from == to {
            let mut copy = self.alloc(images.len())?;
            self.dev.copy(images, &mut copy)?;
            return Ok((copy, None));
        }
        let plan = self.resize_plan(from.iter().copied().zip(to.iter().copied()).collect())?;
        let mut out = self.alloc(plan.output_len())?;
        resize_forward_f32(&self.dev, &plan, images, &mut out)?;
        Ok((out, Some(plan)))
    }

    /// Clean features F_0..F_blocks of packed device images at `sizes`.
    fn clean_on_device(
        &self,
        sizes: &[(usize, usize)],
        images: Pooled,
        blocks: usize,
    ) -> Result<GpuClean, GpuError> {
        let batch = self.batch_on_device(sizes, images)?;
        let fwd = self.forward(&batch, false, blocks)?;
        Ok(GpuClean {
            sizes: sizes.to_vec(),
            features: fwd.features,
            embeddings: std::sync::OnceLock::new(),
        })
    }

    /// One attack step at working sizes `sizes`: the same device work whether it runs directly
    /// or is being captured. Per-image losses go to `out.totals`, except for a loss computed on
    /// the host (`embed`), which is returned.
    fn attack_step(
        &self,
        fixed: &Fixed,
        sizes: &[(usize, usize)],
        state: &mut State,
        out: &mut Outputs,
    ) -> Result<Option<Vec<f64>>, GpuError> {
        let s = fixed.plan.settings;
        let current = match &*state {
            State::Adamw { delta, .. } => {
                adamw_image_f32(&self.dev, &fixed.images, &mut out.adv, delta, &fixed.clean)?;
                &out.adv
            }
            State::Sign { x, .. } => x,
        };
        let (working, plan_back) = self.resized(current, &fixed.native, sizes)?;
        let clean_step;
        let clean_features = if sizes == fixed.plan.eval_sizes {
            &fixed.clean_eval
        } else {
            let (c, _) = self.resized(&fixed.clean, &fixed.native, sizes)?;
            // Only the layers the loss reads (the evaluation geometry's are all kept).
            let blocks = self.blocks_for(fixed.plan.objective, Depth::Loss);
            clean_step = self.clean_on_device(sizes, c, blocks)?;
            &clean_step
        };
        let batch = self.batch_on_device(sizes, working)?;
        let LossPass {
            losses, gradient, ..
        } = self.loss(
            &batch,
            clean_features,
            fixed.plan.objective,
            true,
            Depth::Loss,
        )?;
        let host_losses = match losses {
            Losses::Device(totals) => {
                self.dev.copy(&totals, &mut out.totals)?;
                None
            }
            Losses::Host(values) => Some(values),
        };
        let gradient = gradient.expect("gradient requested");
        let gradient = match plan_back {
            None => gradient,
            Some(rp) => {
                let mut native_grad = self.alloc(fixed.clean.len())?;
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
        let (images, clean) = (&fixed.images, &fixed.clean);
        match state {
            State::Adamw {
                delta,
                m,
                v,
                schedule,
            } => {
                adamw_advance(&self.dev, schedule)?;
                adamw_step_scheduled_f32(
                    &self.dev, images, delta, m, v, clean, &gradient, schedule,
                )?;
            }
            State::Sign { x, momentum } => match s.optimizer {
                OptimizerKind::Mifgsm => {
                    let mut inv_l1 = self.alloc(images.images())?;
                    mifgsm_step_f32(
                        &self.dev,
                        images,
                        x,
                        momentum,
                        clean,
                        &gradient,
                        &mut inv_l1,
                        s.step_size,
                        s.momentum,
                    )?
                }
                _ => pgd_step_f32(&self.dev, images, x, clean, &gradient, s.step_size)?,
            },
        }
        Ok(host_losses)
    }

    /// Captures [`Self::attack_step`] into a graph owning the pool buffers it used.
    fn capture_step(
        &self,
        fixed: &Fixed,
        sizes: &[(usize, usize)],
        state: &mut State,
        out: &mut Outputs,
    ) -> Result<Graph, GpuError> {
        self.pool.begin_capture()?;
        let captured = self.dev.capture(|| {
            let host = self.attack_step(fixed, sizes, state, out)?;
            debug_assert!(host.is_none(), "host losses in a captured step");
            Ok(())
        });
        let memory = self.pool.end_capture(captured.is_ok());
        let mut graph = captured?;
        graph.keep_alive(memory?);
        Ok(graph)
    }

    fn count(&self, update: impl FnOnce(&mut super::GraphStats)) {
        update(&mut self.graph_stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Each image's loss at `start` (native size, packed) at the evaluation geometry.
    fn initial_losses(
        &self,
        start: &Buffer<f32>,
        native: &[(usize, usize)],
        plan: &StepPlan,
        clean_eval: &GpuClean,
    ) -> Result<Losses, GpuError> {
        let (at_eval, _) = self.resized(start, native, &plan.eval_sizes)?;
        let batch = self.batch_on_device(&plan.eval_sizes, at_eval)?;
        let depth = Depth::Loss;
        let LossPass { losses, .. } =
            self.loss(&batch, clean_eval, plan.objective, false, depth)?;
        Ok(losses)
    }

    /// The final images (`finals`, native size) quantised within ε as they are saved, their
    /// levels read back, and the saved images evaluated against the loop's clean features,
    /// all on the device ([`crate::attack::engine::SaveRequest`]).
    fn save_on_device(
        &self,
        fixed: &Fixed,
        finals: &Buffer<f32>,
        lens: &[usize],
    ) -> Result<(Vec<SavedByEngine>, SavePhases), GpuError> {
        // The phases are host clocks: wait for the steps, so that their time is not counted
        // as the quantisation's.
        self.dev.synchronize()?;
        let clock = Instant::now();
        let mut saved = SavedOnDevice::alloc(&self.dev, &fixed.images)?;
        quantize_for_saving_f32(&self.dev, &fixed.images, finals, &fixed.clean, &mut saved)?;
        let levels = self.download_split_staged(&saved.levels, lens)?;
        let linf = saved.linf_255(&self.dev)?;
        let quantize_seconds = clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        let eval_sizes = &fixed.plan.eval_sizes;
        let at_eval = if &fixed.native == eval_sizes {
            self.pool.adopt(saved.values)
        } else {
            self.resized(&saved.values, &fixed.native, eval_sizes)?.0
        };
        let batch = self.batch_on_device(eval_sizes, at_eval)?;
        let evaluations = self.evaluate_batch(&batch, &fixed.clean_eval, fixed.plan.objective)?;
        let phases = SavePhases {
            steps_seconds: 0.0,
            quantize_seconds,
            evaluate_seconds: clock.elapsed().as_secs_f64(),
        };
        let saved = levels
            .into_iter()
            .zip(linf)
            .zip(evaluations)
            .map(|((levels, linf_255), evaluation)| SavedByEngine {
                levels,
                linf_255,
                evaluation,
            })
            .collect();
        Ok((saved, phases))
    }

    pub(super) fn step_loop(
        &self,
        plan: &StepPlan,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<StepLoopOutput<GpuClean>, GpuError> {
        let s = plan.settings;
        let native: Vec<(usize, usize)> = plan.clean.iter().map(|c| (c.height, c.width)).collect();
        let lens: Vec<usize> = plan.clean.iter().map(|c| c.data.len()).collect();
        let images = ImageBatch::with_rngs(&self.dev, &lens, &vec![s.eps; lens.len()], &plan.rngs)?;
        let clean = self.clean_input(plan)?;
        let start = match plan.derived_start {
            // Derived from the clean batch already on the device: no second upload.
            Some(DerivedStart::Random) => {
                let mut x = self.alloc(clean.len())?;
                random_start_f32(&self.dev, &images, &mut x, &clean)?;
                x
            }
            Some(DerivedStart::Clean) => {
                let mut x = self.alloc(clean.len())?;
                self.dev.copy(&clean, &mut x)?;
                x
            }
            None => {
                self.upload_packed(&plan.starts.iter().map(|x| x.as_slice()).collect::<Vec<_>>())?
            }
        };
        let total = clean.len();
        let lr255 = s.lr * 255.0;
        let clean_eval = {
            let (at_eval, _) = self.resized(&clean, &native, &plan.eval_sizes)?;
            self.clean_on_device(&plan.eval_sizes, at_eval, self.blocks.len())?
        };
        // Step 0 measures the loss at the start only when it runs at the evaluation geometry
        // and follows a gradient; otherwise the start is measured here, where it already is.
        // Either way the values stay on the device until the batch's results are read back:
        // a read-back here or after step 0 would make the host wait for the queue to drain,
        // and the device would then idle while the host captures step 1 (or, under dynamic
        // scale, prepares step 0).
        let mut loss_initial: Option<Losses> =
            if plan.escape || s.dynamic_scale.is_some() || plan.sizes.is_empty() {
                Some(self.initial_losses(&start, &native, plan, &clean_eval)?)
            } else {
                None
            };
        // Step 0's per-image totals are copied here (taken before the step loop's warm-up, so
        // the capture finds the pool as the warm-up left it).
        let mut step0_totals = match loss_initial {
            None => Some(self.alloc(lens.len())?),
            Some(_) => None,
        };

        let mut state = match s.optimizer {
            OptimizerKind::Adamw => {
                let mut delta = self.alloc(total)?;
                adamw_init_f32(&self.dev, &images, &mut delta, &start, &clean)?;
                State::Adamw {
                    delta,
                    m: self.pool.take_zeroed(total)?,
                    v: self.pool.take_zeroed(total)?,
                    schedule: AdamwSchedule::new(&self.dev, lr255, s.weight_decay, s.steps)?,
                }
            }
            OptimizerKind::Pgd | OptimizerKind::Mifgsm => State::Sign {
                x: start,
                momentum: self.pool.take_zeroed(total)?,
            },
        };
        let fixed = Fixed {
            plan,
            native,
            images,
            clean,
            clean_eval,
        };
        let mut out = Outputs {
            adv: self.alloc(total)?,
            totals: self.alloc(lens.len())?,
        };
        // Declared after every buffer it uses, so it is dropped before them.
        let mut graph: Option<(Vec<(usize, usize)>, Graph)> = None;
        let graphable = self.graphs()
            && s.dynamic_scale.is_none()
            && LayerLoss::from_kind(plan.objective.kind).is_some();
        let mut warmed: Option<(Vec<(usize, usize)>, KeepReturns)> = None;
        let mut failed_captures = 0;
        for (step, sizes) in plan.sizes.iter().enumerate() {
            if step == 0 && plan.escape {
                match &mut state {
                    State::Adamw {
                        delta, schedule, ..
                    } => {
                        adamw_advance(&self.dev, schedule)?;
                        escape_adamw_f32(
                            &self.dev,
                            &fixed.images,
                            delta,
                            1.0 - lr255 * s.weight_decay,
                            lr255,
                        )?;
                    }
                    State::Sign { x, .. } => escape_sign_step_f32(
                        &self.dev,
                        &fixed.images,
                        x,
                        &fixed.clean,
                        s.step_size,
                    )?,
                }
                self.count(|c| c.direct_steps += 1);
                on_step(step);
                continue;
            }
            let host_losses = match &graph {
                Some((at, g)) if at == sizes => {
                    g.launch()?;
                    self.count(|c| c.replays += 1);
                    None
                }
                _ if graphable
                    && self.graphs()
                    && warmed.as_ref().is_some_and(|w| &w.0 == sizes) =>
                {
                    let captured = self.capture_step(&fixed, sizes, &mut state, &mut out);
                    // Only now may the pool stop keeping every return (and trim its cache):
                    // the capture takes what the warm-up step left there.
                    warmed = None;
                    match captured {
                        Ok(g) => {
                            g.launch()?;
                            let ops = g.ops();
                            self.count(|c| {
                                c.captures += 1;
                                c.ops_per_replay = ops;
                            });
                            graph = Some((sizes.clone(), g));
                            None
                        }
                        Err(e) => {
                            report_capture_failure(&e);
                            failed_captures += 1;
                            if !matches!(e, GpuError::Capture { .. })
                                || failed_captures >= MAX_CAPTURE_TRIES
                            {
                                // The driver cannot capture (or the step never can): off for
                                // good on this engine.
                                self.set_graphs(false);
                            } else if graph.is_none() {
                                // Something the capture needed was gone (the pool's cache was
                                // released after the warm-up): this step warms up again.
                                warmed = Some((sizes.clone(), KeepReturns::on(&self.pool)));
                            }
                            self.count(|c| {
                                c.failures += 1;
                                c.direct_steps += 1;
                            });
                            self.attack_step(&fixed, sizes, &mut state, &mut out)?
                        }
                    }
                }
                _ => {
                    warmed = None; // (before a new one switches the pool's keeping on)
                    if graphable && graph.is_none() {
                        warmed = Some((sizes.clone(), KeepReturns::on(&self.pool)));
                    }
                    self.count(|c| c.direct_steps += 1);
                    self.attack_step(&fixed, sizes, &mut state, &mut out)?
                }
            };
            let initial = step == 0 && s.dynamic_scale.is_none();
            if let Some(sink) = plan.loss_sink {
                // A loss curve was asked for: every step waits for its values.
                let values = match host_losses {
                    Some(v) => v,
                    None => self
                        .dev
                        .download(&out.totals)?
                        .into_iter()
                        .map(f64::from)
                        .collect(),
                };
                sink(step, &values);
                if initial {
                    loss_initial = Some(Losses::Host(values));
                }
            } else if initial {
                loss_initial = Some(match (host_losses, step0_totals.take()) {
                    (Some(v), _) => Losses::Host(v),
                    (None, Some(mut copy)) => {
                        self.dev.copy(&out.totals, &mut copy)?;
                        Losses::Device(copy)
                    }
                    (None, None) => unreachable!("step 0's copy is taken once"),
                });
            }
            on_step(step);
        }
        drop(warmed);
        drop(graph);
        let finals: &Buffer<f32> = match &state {
            State::Adamw { delta, .. } => {
                adamw_image_f32(&self.dev, &fixed.images, &mut out.adv, delta, &fixed.clean)?;
                &out.adv
            }
            State::Sign { x, .. } => x,
        };
        // Saved first: the saving runs straight after the steps, and the float read-back (when
        // asked for) after it, not between them.
        let (saved, save_phases) = match plan.save {
            Some(_) => {
                let (saved, phases) = self.save_on_device(&fixed, finals, &lens)?;
                (saved.into_iter().map(Some).collect(), Some(phases))
            }
            None => (vec![None; lens.len()], None),
        };
        let floats = if plan.save.is_none_or(|r| r.keep_float) {
            Some(self.download_split_staged(finals, &lens)?)
        } else {
            None
        };
        let floats = floats.map_or_else(
            || vec![None; lens.len()],
            |f| f.into_iter().map(Some).collect(),
        );
        let loss_initial = match loss_initial {
            Some(losses) => losses.values(&self.dev)?.into_iter().map(Some).collect(),
            None => vec![None; lens.len()],
        };
        let images = floats
            .into_iter()
            .zip(loss_initial)
            .zip(saved)
            .map(|((adversarial, loss_initial), saved)| StepLoopResult {
                adversarial,
                loss_initial,
                saved,
            })
            .collect();
        Ok(StepLoopOutput {
            images,
            clean_eval: Some(fixed.clean_eval),
            save_phases,
        })
    }
}
