//! The attack loop over a batch of images: per-image geometry (native, fixed size, dynamic
//! scale), starts, steps, and the measurements the manifest records. One engine call per step
//! serves the whole batch; everything per image (random draws, optimiser state) stays per image,
//! so results do not depend on how images are batched.

use std::borrow::Cow;
use std::cell::{OnceCell, RefCell};
use std::time::Instant;

use rayon::prelude::*;

use super::engine::{
    DerivedStart, Engine, EngineError, LossAndGradient, SavePhases, SaveRequest, SavedByEngine,
    StageKey, StepLoopResult, StepPlan,
};
use super::loss::Objective;
use super::optim::{project, project_pixel, Optimizer};
use super::settings::{AttackSettings, Init, LossKind, Resolution};
use crate::io::{quantize_for_saving, SavedImage};
use crate::reference::resize::{bicubic_resize, bicubic_resize_backward, scaled_size};
use crate::rng::{ImageRng, STREAM_ESCAPE, STREAM_INIT, STREAM_SCALE};

/// A planar `[3, height, width]` image in [0, 1].
#[derive(Clone, Copy, Debug)]
pub struct Planar<'a> {
    pub data: &'a [f32],
    pub height: usize,
    pub width: usize,
}

/// What one image's attack produced.
#[derive(Clone, Debug)]
pub struct AttackOutcome {
    /// The final adversarial image (float, native size).
    pub adversarial: Vec<f32>,
    /// The loss at the start, at the evaluation geometry (no dynamic scale).
    pub loss_initial: f64,
    pub steps: usize,
    /// With [`Attack::record_losses`]: the loss before each step, one value per step, at the
    /// step's working geometry (a dynamic-scale draw changes it). An escape step out of a
    /// stationary start computes no loss: its value is `loss_initial`. Empty otherwise.
    pub losses: Vec<f64>,
}

/// What one image's attack produced, as `prm attack` saves it ([`Attack::run_and_save`]).
#[derive(Clone, Debug)]
pub struct SavedOutcome {
    /// The saved 8-bit levels ([`crate::io::quantize_for_saving`]), planar, native size.
    pub levels: Vec<u8>,
    /// Their L∞ distance to the clean image, in 1/255 units.
    pub linf_255: f64,
    /// The saved image's loss and layer cosines at the evaluation geometry.
    pub evaluation: Evaluation,
    /// The unquantised final image, when it was asked for.
    pub adversarial: Option<Vec<f32>>,
    /// As [`AttackOutcome::loss_initial`].
    pub loss_initial: f64,
    pub steps: usize,
    /// As [`AttackOutcome::losses`].
    pub losses: Vec<f64>,
}

/// What the step loop (the engine's or the host's) left for [`Attack::finish`] to complete.
struct Ran {
    images: Vec<StepLoopResult>,
    /// Recorded loss curves (empty unless [`Attack::record_losses`]).
    curves: Vec<Vec<f64>>,
    save_phases: Option<SavePhases>,
}

/// One image's steps, completed.
struct Finished {
    adversarial: Option<Vec<f32>>,
    saved: Option<SavedByEngine>,
    loss_initial: f64,
    losses: Vec<f64>,
}

impl Finished {
    /// The outcome of an attack of `steps` steps whose final image was saved as `saved`.
    fn into_saved(self, saved: SavedByEngine, steps: usize) -> SavedOutcome {
        SavedOutcome {
            levels: saved.levels,
            linf_255: saved.linf_255,
            evaluation: saved.evaluation,
            adversarial: self.adversarial,
            loss_initial: self.loss_initial,
            steps,
            losses: self.losses,
        }
    }
}

/// A loss value with per-layer cosines, at the evaluation geometry.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub loss: f64,
    pub layer_cosine: Vec<f64>,
}

/// One image under attack: its clean pixels, its random source and its geometry.
struct Target<'a> {
    clean: Planar<'a>,
    rng: ImageRng,
}

/// A batch of images under attack with one engine.
pub struct Attack<'a, E: Engine> {
    engine: &'a E,
    objective: &'a Objective,
    settings: &'a AttackSettings,
    targets: Vec<Target<'a>>,
    /// Clean features at the evaluation geometry (native or the fixed size), computed on first
    /// use, or handed over by an engine that runs the whole step loop itself and computed them
    /// there: a batch's clean forward runs once, whichever loop runs it.
    clean_eval: OnceCell<E::Clean>,
    /// Keep every step's loss (see [`AttackOutcome::losses`]).
    record_losses: bool,
    /// The batch's clean images were staged under this key ([`Engine::stage`]).
    stage_key: Option<StageKey>,
}

/// The starting images of a batch, one per image, made by [`Attack::starts`] (which knows
/// whether they are a pure function of the clean images) or given by the caller.
///
/// Starts that follow from the clean images are not made on the host until something there
/// needs them ([`Attack::start_images`]): a device-resident loop makes them next to the clean
/// images, and making them here (a random draw per pixel of the batch) would only delay it.
pub struct Starts {
    /// `None` when `derived` is `Some` and nobody has asked for the images.
    images: Option<Vec<Vec<f32>>>,
    derived: Option<DerivedStart>,
}

impl Starts {
    /// Starts chosen by the caller: an engine copies them as they are.
    pub fn given(images: Vec<Vec<f32>>) -> Self {
        Starts {
            images: Some(images),
            derived: None,
        }
    }

    /// How the starts follow from the clean images, if they do.
    pub fn derived(&self) -> Option<DerivedStart> {
        self.derived
    }
}

/// The random start (`--init random`): `project(clean + ε·(2u − 1))` with
/// u = `rng.uniform(STREAM_INIT, j)` for pixel j. The GPU twin is
/// [`crate::gpu::kernels::update::random_start_f32`], bit for bit.
pub fn random_start(clean: &[f32], rng: &ImageRng, eps: f32) -> Vec<f32> {
    // Counter-based draws: parallel chunks give the same values as a serial loop.
    clean
        .par_iter()
        .enumerate()
        .map(|(j, &c)| random_start_pixel(c, rng, eps, j))
        .collect()
}

/// Pixel `j` of [`random_start`].
fn random_start_pixel(c: f32, rng: &ImageRng, eps: f32, j: usize) -> f32 {
    project_pixel(
        c + eps * (2.0 * rng.uniform(STREAM_INIT, j as u64) - 1.0),
        c,
        eps,
    )
}

/// Whether [`random_start`] gives back the clean image itself (ε = 0, or an ε below the
/// rounding of every pixel), without making the start: it stops at the first pixel that moved,
/// which for any usable ε is the first.
fn random_start_is_clean(clean: &[f32], rng: &ImageRng, eps: f32) -> bool {
    clean
        .iter()
        .enumerate()
        .all(|(j, &c)| random_start_pixel(c, rng, eps, j) == c)
}

/// Checks that an image can be fed to a model with patch side `patch`.
pub fn check_image_size(height: usize, width: usize, patch: usize) -> Result<(), String> {
    if height < patch || width < patch {
        return Err(format!(
            "image is {width}x{height}, smaller than one {patch}x{patch} patch of this model"
        ));
    }
    Ok(())
}

impl<'a> Target<'a> {
    fn native(&self) -> (usize, usize) {
        (self.clean.height, self.clean.width)
    }

    /// `x` (native size) at `size`: borrowed when nothing changes.
    fn resize_to<'x>(&self, x: &'x [f32], size: (usize, usize)) -> Cow<'x, [f32]> {
        if size == self.native() {
            Cow::Borrowed(x)
        } else {
            Cow::Owned(bicubic_resize(
                x,
                3,
                self.clean.height,
                self.clean.width,
                size.0,
                size.1,
            ))
        }
    }

    fn resize_back(&self, grad: Vec<f32>, size: (usize, usize)) -> Vec<f32> {
        if size == self.native() {
            grad
        } else {
            bicubic_resize_backward(
                &grad,
                3,
                self.clean.height,
                self.clean.width,
                size.0,
                size.1,
            )
        }
    }
}

/// The geometry the model sees when no dynamic scale is drawn.
fn eval_size(settings: &AttackSettings, t: &Target) -> (usize, usize) {
    match settings.resolution {
        Resolution::Native => t.native(),
        Resolution::Fixed(n) => (n, n),
    }
}

fn planar(data: &[f32], size: (usize, usize)) -> Planar<'_> {
    Planar {
        data,
        height: size.0,
        width: size.1,
    }
}

impl<'a, E: Engine> Attack<'a, E> {
    /// Every image must be at least one patch in each side (see [`check_image_size`]).
    pub fn new(
        engine: &'a E,
        objective: &'a Objective,
        settings: &'a AttackSettings,
        images: Vec<(Planar<'a>, ImageRng)>,
    ) -> Result<Self, EngineError> {
        let patch = engine.model().config.patch;
        for (im, _) in &images {
            assert!(
                check_image_size(im.height, im.width, patch).is_ok(),
                "image smaller than a patch"
            );
        }
        let targets: Vec<Target> = images
            .into_iter()
            .map(|(clean, rng)| Target { clean, rng })
            .collect();
        Ok(Attack {
            engine,
            objective,
            settings,
            targets,
            clean_eval: OnceCell::new(),
            record_losses: false,
            stage_key: None,
        })
    }

    /// The clean features at the evaluation geometry, computed (and kept) on first use.
    fn clean_eval(&self) -> Result<&E::Clean, EngineError> {
        if let Some(c) = self.clean_eval.get() {
            return Ok(c);
        }
        let sizes = self.eval_sizes();
        let resized: Vec<Cow<[f32]>> = self
            .targets
            .par_iter()
            .zip(&sizes)
            .map(|(t, &size)| t.resize_to(t.clean.data, size))
            .collect();
        let views: Vec<Planar> = resized
            .iter()
            .zip(&sizes)
            .map(|(d, &s)| planar(d, s))
            .collect();
        let features = self.engine.clean_features(&views)?;
        Ok(self.clean_eval.get_or_init(|| features))
    }

    /// Computes the clean features at the evaluation geometry now rather than in the first
    /// step that reads them (a benchmark times them as a phase of their own). On a GPU the
    /// work is issued, not necessarily finished, when this returns.
    pub fn compute_clean_features(&self) -> Result<(), EngineError> {
        self.clean_eval().map(drop)
    }

    /// Keeps every step's per-image loss in [`AttackOutcome::losses`] (for a loss curve). The
    /// GPU engine then downloads the loss values at every step, which costs a host sync each;
    /// off by default.
    pub fn record_losses(&mut self, on: bool) {
        self.record_losses = on;
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn eval_size(&self, t: &Target) -> (usize, usize) {
        eval_size(self.settings, t)
    }

    /// Image `t`'s working size at `step`: the evaluation size, or a dynamic-scale draw from it.
    fn working_size(&self, t: &Target, step: usize) -> (usize, usize) {
        let (h, w) = self.eval_size(t);
        match self.settings.dynamic_scale {
            None => (h, w),
            Some((lo, hi)) => {
                let r = lo + (hi - lo) * t.rng.uniform(STREAM_SCALE, step as u64);
                let p = self.engine.model().config.patch;
                let (sh, sw) = scaled_size(h, w, r);
                (sh.max(p), sw.max(p))
            }
        }
    }

    /// Every image's working size at `step` (what the engine sees; FLOP counts use it).
    pub fn step_sizes(&self, step: usize) -> Vec<(usize, usize)> {
        self.targets
            .iter()
            .map(|t| self.working_size(t, step))
            .collect()
    }

    /// Every image's evaluation size (its clean features are computed there once).
    pub fn eval_sizes(&self) -> Vec<(usize, usize)> {
        self.targets.iter().map(|t| self.eval_size(t)).collect()
    }

    /// Per image: the loss at `xs[i]` (native size) and its gradient with respect to `xs[i]`,
    /// with image i seen at `sizes[i]`.
    pub fn loss_and_gradient(
        &self,
        xs: &[Vec<f32>],
        sizes: &[(usize, usize)],
    ) -> Result<Vec<LossAndGradient>, EngineError> {
        assert_eq!(xs.len(), self.targets.len());
        let adv: Vec<Cow<[f32]>> = self
            .targets
            .par_iter()
            .zip(xs)
            .zip(sizes)
            .map(|((t, x), &s)| t.resize_to(x, s))
            .collect();
        let adv_views: Vec<Planar> = adv.iter().zip(sizes).map(|(d, &s)| planar(d, s)).collect();
        let at_eval = self
            .targets
            .iter()
            .zip(sizes)
            .all(|(t, &s)| s == self.eval_size(t));
        let mut results = if at_eval {
            self.engine
                .loss_and_gradient(&adv_views, self.clean_eval()?, self.objective)?
        } else {
            let clean: Vec<Cow<[f32]>> = self
                .targets
                .par_iter()
                .zip(sizes)
                .map(|(t, &s)| t.resize_to(t.clean.data, s))
                .collect();
            let clean_views: Vec<Planar> = clean
                .iter()
                .zip(sizes)
                .map(|(d, &s)| planar(d, s))
                .collect();
            // Read by this step's loss alone: only the layers it reads.
            let clean_features = self
                .engine
                .clean_features_for_loss(&clean_views, self.objective)?;
            self.engine
                .loss_and_gradient(&adv_views, &clean_features, self.objective)?
        };
        results
            .par_iter_mut()
            .zip(&self.targets)
            .zip(sizes)
            .for_each(|((r, t), &s)| {
                r.gradient = t.resize_back(std::mem::take(&mut r.gradient), s);
            });
        Ok(results)
    }

    /// Loss and per-layer cosine of each `xs[i]` at the evaluation geometry.
    pub fn evaluate(&self, xs: &[Vec<f32>]) -> Result<Vec<Evaluation>, EngineError> {
        let sizes: Vec<(usize, usize)> = self.targets.iter().map(|t| self.eval_size(t)).collect();
        let adv: Vec<Cow<[f32]>> = self
            .targets
            .par_iter()
            .zip(xs)
            .zip(&sizes)
            .map(|((t, x), &s)| t.resize_to(x, s))
            .collect();
        let views: Vec<Planar> = adv.iter().zip(&sizes).map(|(d, &s)| planar(d, s)).collect();
        self.engine
            .evaluate(&views, self.clean_eval()?, self.objective)
    }

    /// The starting image of image `i`: its clean image (zero start), a seeded uniform point in
    /// the ε-ball, or `start` (from an earlier run) projected into the ε-ball.
    pub fn start(&self, i: usize, start: Option<&[f32]>) -> Vec<f32> {
        let t = &self.targets[i];
        let eps = self.settings.eps;
        if matches!(self.settings.init, Init::Random) {
            return random_start(t.clean.data, &t.rng, eps);
        }
        let mut x: Vec<f32> = match (&self.settings.init, start) {
            (Init::From(_), Some(s)) => s.to_vec(),
            _ => t.clean.data.to_vec(),
        };
        project(&mut x, t.clean.data, eps);
        x
    }

    /// Every image's start ([`Attack::start`]; `from[i]`: image i's start from an earlier run,
    /// used with `--init from:`), recording when they follow from the clean images alone, so
    /// that a device-resident loop can compute them instead of copying them. Such starts are
    /// made on the host only when something there needs them ([`Attack::start_images`]).
    pub fn starts(&self, from: &[Option<&[f32]>]) -> Starts {
        assert_eq!(from.len(), self.targets.len(), "one start source per image");
        let derived = match self.settings.init {
            Init::Random => Some(DerivedStart::Random),
            Init::Zero => Some(DerivedStart::Clean),
            Init::From(_) => None,
        };
        let images = derived.is_none().then(|| {
            from.iter()
                .enumerate()
                .map(|(i, s)| self.start(i, *s))
                .collect()
        });
        Starts { images, derived }
    }

    /// `starts` as host images, one per image: made now ([`Attack::start`]) when they were left
    /// to be derived from the clean images.
    pub fn start_images<'s>(&self, starts: &'s Starts) -> Cow<'s, [Vec<f32>]> {
        match &starts.images {
            Some(images) => Cow::Borrowed(images),
            None => Cow::Owned((0..self.len()).map(|i| self.start(i, None)).collect()),
        }
    }

    /// Tells the engine that this batch's clean images were staged under `key`
    /// ([`Engine::stage`]); the engine checks the key (and the sizes) before using them.
    pub fn staged_as(&mut self, key: StageKey) {
        self.stage_key = Some(key);
    }

    /// Whether image `i`'s start is a point where the loss gradient vanishes: the clean image
    /// itself, for a loss that compares with the clean image (cosine at its maximum, distance at
    /// zero). Decided by the loss actually optimised (the objective's), not by the settings it
    /// was built from, so an attack with any other objective cannot take a wrong escape step.
    /// A derived start is judged without being made.
    fn starts_at_stationary_point(&self, i: usize, starts: &Starts) -> bool {
        let t = &self.targets[i];
        matches!(
            self.objective.kind,
            LossKind::Prm | LossKind::Nrd | LossKind::Embed
        ) && match (&starts.images, starts.derived) {
            (Some(images), _) => images[i] == t.clean.data,
            // `project(clean)` is the clean image: it lies in [0, 1].
            (None, Some(DerivedStart::Clean)) => true,
            (None, Some(DerivedStart::Random)) => {
                random_start_is_clean(t.clean.data, &t.rng, self.settings.eps)
            }
            (None, None) => unreachable!("starts are either given or derived"),
        }
    }

    /// The seeded ±1 signs of the first step out of a stationary start.
    fn escape_signs(t: &Target) -> Vec<f32> {
        (0..t.clean.data.len())
            .map(|j| {
                if t.rng.uniform(STREAM_ESCAPE, j as u64) < 0.5 {
                    -1.0
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// Runs every step from `starts` (one per image). `on_step` is called after each batch step.
    ///
    /// From a stationary start (see [`Optimizer::escape_step`]) an image's first step moves
    /// every pixel by one step with seeded random signs instead of following a gradient of
    /// rounding noise.
    pub fn run(
        &self,
        starts: Vec<Vec<f32>>,
        on_step: impl FnMut(usize),
    ) -> Result<Vec<AttackOutcome>, EngineError> {
        self.run_from(Starts::given(starts), on_step)
    }

    /// [`Attack::run`] from starts made by [`Attack::starts`] (or [`Starts::given`]).
    pub fn run_from(
        &self,
        starts: Starts,
        on_step: impl FnMut(usize),
    ) -> Result<Vec<AttackOutcome>, EngineError> {
        let ran = self.run_steps(&starts, None, on_step)?;
        Ok(self
            .finish(&starts, ran)?
            .into_iter()
            .map(|f| AttackOutcome {
                adversarial: f.adversarial.expect("kept without a save request"),
                loss_initial: f.loss_initial,
                steps: self.settings.steps,
                losses: f.losses,
            })
            .collect())
    }

    /// Runs every step from `starts`, then quantises each final image within ε as it will be
    /// saved ([`crate::io::quantize_for_saving`]) and evaluates the saved image (its loss and
    /// layer cosines at the evaluation geometry). An engine with a device-resident loop does
    /// both on its device ([`SaveRequest`]); otherwise they run here, one image per task. The
    /// results are the same bits either way. `keep_float`: also return the unquantised final
    /// images ([`SavedOutcome::adversarial`]).
    pub fn run_and_save(
        &self,
        starts: Starts,
        keep_float: bool,
        on_step: impl FnMut(usize),
    ) -> Result<(Vec<SavedOutcome>, SavePhases), EngineError> {
        let clock = Instant::now();
        let ran = self.run_steps(&starts, Some(SaveRequest { keep_float }), on_step)?;
        let on_engine = ran.save_phases;
        let finished = self.finish(&starts, ran)?;
        let steps = self.settings.steps;
        if let Some(mut phases) = on_engine {
            phases.steps_seconds =
                (clock.elapsed().as_secs_f64() - phases.quantize_seconds - phases.evaluate_seconds)
                    .max(0.0);
            let outcomes = finished
                .into_iter()
                .map(|mut f| {
                    let saved = f.saved.take().expect("the engine saved every image");
                    f.into_saved(saved, steps)
                })
                .collect();
            return Ok((outcomes, phases));
        }
        let mut phases = SavePhases {
            steps_seconds: clock.elapsed().as_secs_f64(),
            ..SavePhases::default()
        };
        let lap = Instant::now();
        // One image per task: a batch is tens of millions of values, and this runs while the
        // device waits. The levels, their float values (what the evaluation reads) and the
        // L∞ in one pass.
        let mut saved: Vec<SavedImage> = finished
            .par_iter()
            .zip(&self.targets)
            .map(|(f, t)| {
                let adv = f
                    .adversarial
                    .as_deref()
                    .expect("the host loop keeps its images");
                quantize_for_saving(adv, t.clean.data, self.settings.eps)
            })
            .collect();
        // Moved out, not copied: the float values are what the evaluation reads.
        let values: Vec<Vec<f32>> = saved
            .iter_mut()
            .map(|s| std::mem::take(&mut s.values))
            .collect();
        phases.quantize_seconds = lap.elapsed().as_secs_f64();
        let lap = Instant::now();
        let evaluations = self.evaluate(&values)?;
        phases.evaluate_seconds = lap.elapsed().as_secs_f64();
        let outcomes = finished
            .into_iter()
            .zip(saved)
            .zip(evaluations)
            .map(|((mut f, saved), evaluation)| {
                if !keep_float {
                    f.adversarial = None;
                }
                let saved = SavedByEngine {
                    levels: saved.levels,
                    linf_255: saved.linf_255,
                    evaluation,
                };
                f.into_saved(saved, steps)
            })
            .collect();
        Ok((outcomes, phases))
    }

    /// The step loop shared by [`Attack::run_from`] and [`Attack::run_and_save`]: the engine's
    /// device-resident loop when it has one (and the batch escapes all together or not at all),
    /// the host loop otherwise.
    fn run_steps(
        &self,
        starts: &Starts,
        save: Option<SaveRequest>,
        mut on_step: impl FnMut(usize),
    ) -> Result<Ran, EngineError> {
        if let Some(images) = &starts.images {
            assert_eq!(images.len(), self.targets.len(), "one start per image");
        }
        let escaping: Vec<bool> = (0..self.targets.len())
            .map(|i| self.starts_at_stationary_point(i, starts))
            .collect();
        let mut loss_initial: Vec<Option<f64>> = vec![None; self.targets.len()];
        // losses[i][step], NaN where a step computed none (an escape step).
        let steps = self.settings.steps;
        let recorded = RefCell::new(if self.record_losses {
            vec![vec![f64::NAN; steps]; self.targets.len()]
        } else {
            Vec::new()
        });
        let sink = |step: usize, values: &[f64]| {
            for (curve, &v) in recorded.borrow_mut().iter_mut().zip(values) {
                curve[step] = v;
            }
        };
        // An engine with its own device-resident loop runs the steps; the geometry of every
        // step is drawn here, so both loops see the same draws.
        if escaping.iter().all(|&e| e) || escaping.iter().all(|&e| !e) {
            let plan = StepPlan {
                objective: self.objective,
                settings: self.settings,
                clean: self.targets.iter().map(|t| t.clean).collect(),
                rngs: self.targets.iter().map(|t| t.rng).collect(),
                starts: starts.images.as_deref().unwrap_or(&[]),
                derived_start: starts.derived,
                stage_key: self.stage_key.as_ref(),
                escape: escaping.first().copied().unwrap_or(false),
                eval_sizes: self.targets.iter().map(|t| self.eval_size(t)).collect(),
                sizes: (0..self.settings.steps)
                    .map(|step| {
                        self.targets
                            .iter()
                            .map(|t| self.working_size(t, step))
                            .collect()
                    })
                    .collect(),
                loss_sink: if self.record_losses {
                    Some(&sink)
                } else {
                    None
                },
                save,
            };
            if let Some(results) = self.engine.run_steps(&plan, &mut on_step) {
                // Moved, not copied: a batch of 64 images at 224 px is 38.5 MB.
                let output = results?;
                if let Some(clean) = output.clean_eval {
                    // The loop's own clean features: the final evaluation reuses them.
                    let _ = self.clean_eval.set(clean);
                }
                return Ok(Ran {
                    images: output.images,
                    curves: recorded.into_inner(),
                    save_phases: output.save_phases,
                });
            }
        }
        // The host loop: every start on the host, one optimiser per image.
        let mut opts: Vec<Optimizer> = self
            .targets
            .iter()
            .zip(self.start_images(starts).iter())
            .map(|(t, s)| Optimizer::new(self.settings, t.clean.data, s))
            .collect();
        for step in 0..self.settings.steps {
            // Images that escape at step 0 take no gradient; the rest share one engine call.
            let active: Vec<usize> = (0..self.targets.len())
                .filter(|&i| !(step == 0 && escaping[i]))
                .collect();
            for i in (0..self.targets.len()).filter(|i| !active.contains(i)) {
                opts[i].escape_step(&Self::escape_signs(&self.targets[i]));
            }
            if !active.is_empty() {
                let sub = self.subset(&active)?;
                let xs: Vec<Vec<f32>> = active.iter().map(|&i| opts[i].image()).collect();
                let sizes: Vec<(usize, usize)> = active
                    .iter()
                    .map(|&i| self.working_size(&self.targets[i], step))
                    .collect();
                let results = match &sub {
                    Some(sub) => sub.loss_and_gradient(&xs, &sizes)?,
                    None => self.loss_and_gradient(&xs, &sizes)?,
                };
                if self.record_losses {
                    let mut curves = recorded.borrow_mut();
                    for (&i, r) in active.iter().zip(&results) {
                        curves[i][step] = r.loss;
                    }
                }
                for (&i, r) in active.iter().zip(results) {
                    if step == 0 && self.settings.dynamic_scale.is_none() {
                        loss_initial[i] = Some(r.loss);
                    }
                    opts[i].step(&r.gradient);
                }
            }
            on_step(step);
        }
        Ok(Ran {
            images: opts
                .iter()
                .zip(loss_initial)
                .map(|(o, loss_initial)| StepLoopResult {
                    adversarial: Some(o.image()),
                    loss_initial,
                    saved: None,
                })
                .collect(),
            curves: recorded.into_inner(),
            save_phases: None,
        })
    }

    /// Completes what the steps left open: where step 0 gave no loss at the evaluation
    /// geometry (dynamic scale, or an escape step), the start is measured there. A recorded loss
    /// curve gets that value at an escape step 0, which computed none.
    fn finish(&self, starts: &Starts, ran: Ran) -> Result<Vec<Finished>, EngineError> {
        let Ran {
            images, mut curves, ..
        } = ran;
        let mut loss_initial: Vec<Option<f64>> = images.iter().map(|r| r.loss_initial).collect();
        if loss_initial.iter().any(Option::is_none) {
            // Every image's start (an image's evaluation does not depend on the others in
            // its batch), so no final image is needed here.
            let evals = self.evaluate(&self.start_images(starts))?;
            for (l, e) in loss_initial.iter_mut().zip(evals) {
                l.get_or_insert(e.loss);
            }
        }
        curves.resize(images.len(), Vec::new());
        Ok(images
            .into_iter()
            .zip(loss_initial)
            .zip(curves)
            .map(|((r, l), mut losses)| {
                let loss_initial = l.expect("measured above");
                // Only step 0 can be an escape step; a NaN elsewhere is a real value.
                if let Some(v) = losses.first_mut().filter(|v| v.is_nan()) {
                    *v = loss_initial;
                }
                Finished {
                    adversarial: r.adversarial,
                    saved: r.saved,
                    loss_initial,
                    losses,
                }
            })
            .collect())
    }

    /// The same attack restricted to `indices`, or `None` when that is every image. Clean
    /// features are recomputed for the subset (only at step 0 of an escaping batch).
    fn subset(&self, indices: &[usize]) -> Result<Option<Attack<'a, E>>, EngineError> {
        if indices.len() == self.targets.len() {
            return Ok(None);
        }
        let images = indices
            .iter()
            .map(|&i| (self.targets[i].clean, self.targets[i].rng))
            .collect();
        Attack::new(self.engine, self.objective, self.settings, images).map(Some)
    }
}
