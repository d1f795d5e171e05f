//! Launchers for `kernels/update.cu`: the optimisers' per-pixel updates (PGD, MI-FGSM, AdamW on
//! δ in 0–255 units with the clamp re-parameterisation, the escape step) and the seeded Philox
//! draws (random start, raw uniforms), over a packed batch of planar images.
//!
//! Every update matches its twin in [`crate::attack::optim::Optimizer`] operation for operation
//! (explicitly rounded f32 arithmetic, no FMA), and the draws are bit-identical to
//! [`crate::rng::ImageRng::uniform`].
//!
//! # Tables
//! An [`ImageBatch`] holds, on the device:
//! - `offsets [images + 1]` (`i32`): image `b` is elements `offsets[b] .. offsets[b + 1]` of the
//!   packed buffers (planar `[3, H_b, W_b]`, back to back; see [`pack_offsets`]);
//! - `eps [images]` (`f32`): the L∞ radius of each image, in [0, 1] units;
//! - `keys [2 · images]` (`u32`): each image's Philox key, [`ImageRng::key`].
//!
//! Draws use counter `(i lo, i hi, stream, 0)` with `i` the element's index *inside its image*,
//! so they do not depend on batch composition.
//!
//! ```no_run
//! use prm::gpu::Device;
//! use prm::gpu::kernels::update::{pgd_step_f32, ImageBatch};
//! use prm::rng::ImageRng;
//! # fn main() -> Result<(), prm::gpu::GpuError> {
//! let dev = Device::sim();
//! let len = 3 * 32 * 32;
//! let batch = ImageBatch::new(&dev, &[len], &[8.0 / 255.0], &[ImageRng::new(0, "a.png").key()])?;
//! let clean = dev.upload(&vec![0.5f32; len])?;
//! let grad = dev.upload(&vec![1.0f32; len])?;
//! let mut x = dev.upload(&vec![0.5f32; len])?;
//! pgd_step_f32(&dev, &batch, &mut x, &clean, &grad, 2.0 / 255.0)?;
//! # Ok(()) }
//! ```

use crate::gpu::{Buffer, Device, GpuError, KernelArgs, LaunchConfig};
use crate::rng::ImageRng;

/// Threads per block of the elementwise kernels and of the per-image reductions.
const BLOCK: u32 = 256;

/// `torch.optim.AdamW` defaults, as in `attack::optim`.
/// (f32 constants widened to f64, exactly as the twin does.)
const ADAM_BETA1: f32 = 0.9;
const ADAM_BETA2: f32 = 0.999;

/// Prefix offsets of images of `lens` elements packed back to back: `[0, l0, l0 + l1, ...]`.
pub fn pack_offsets(lens: &[usize]) -> Vec<i32> {
    let mut out = Vec::with_capacity(lens.len() + 1);
    let mut acc = 0usize;
    out.push(0);
    for &l in lens {
        acc += l;
        out.push(i32::try_from(acc).expect("packed image batch exceeds i32 elements"));
    }
    out
}

/// The per-image tables of a packed image batch, on the device (see the module docs).
pub struct ImageBatch {
    pub offsets: Buffer<i32>,
    pub eps: Buffer<f32>,
    pub keys: Buffer<u32>,
    images: usize,
    total: usize,
    max_len: usize,
}

impl ImageBatch {
    /// `lens[b]` elements per image (3·H·W), its radius `eps[b]` and Philox key `keys[b]`.
    pub fn new(
        dev: &Device,
        lens: &[usize],
        eps: &[f32],
        keys: &[[u32; 2]],
    ) -> Result<Self, GpuError> {
        assert!(!lens.is_empty(), "ImageBatch: no images");
        assert_eq!(lens.len(), eps.len(), "ImageBatch: one eps per image");
        assert_eq!(lens.len(), keys.len(), "ImageBatch: one key per image");
        let offsets = pack_offsets(lens);
        let flat_keys: Vec<u32> = keys.iter().flat_map(|k| k.iter().copied()).collect();
        Ok(ImageBatch {
            offsets: dev.upload(&offsets)?,
            eps: dev.upload(eps)?,
            keys: dev.upload(&flat_keys)?,
            images: lens.len(),
            total: lens.iter().sum(),
            max_len: lens.iter().copied().max().unwrap_or(0),
        })
    }

    /// Like [`ImageBatch::new`], taking the keys from each image's [`ImageRng`].
    pub fn with_rngs(
        dev: &Device,
        lens: &[usize],
        eps: &[f32],
        rngs: &[ImageRng],
    ) -> Result<Self, GpuError> {
        let keys: Vec<[u32; 2]> = rngs.iter().map(|r| r.key()).collect();
        Self::new(dev, lens, eps, &keys)
    }

    pub fn images(&self) -> usize {
        self.images
    }
    /// Elements in the whole packed batch.
    pub fn total(&self) -> usize {
        self.total
    }
    /// Elements in the longest image.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// One thread per element of the longest image, one grid row per image.
    pub(crate) fn grid(&self) -> LaunchConfig {
        let bx = self.max_len.div_ceil(BLOCK as usize).max(1) as u32;
        LaunchConfig {
            grid: (bx, self.images as u32, 1),
            block: (BLOCK, 1, 1),
            shared_bytes: 0,
        }
    }

    /// Panics unless `len` is the packed batch's length.
    pub(crate) fn check(&self, what: &str, len: usize) {
        assert_eq!(
            len, self.total,
            "{what}: buffer of {len} elements for a batch of {}",
            self.total
        );
    }
}

/// AdamW's per-step scalars, computed on the host exactly as `Optimizer::adamw_step` does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwScalars {
    /// `1 − lr₂₅₅ · weight_decay` (f32).
    pub decay: f32,
    /// `lr₂₅₅ / (1 − β₁ᵗ)`, in f64 then rounded to f32.
    pub step: f32,
    /// `sqrt(1 − β₂ᵗ)`, in f64 then rounded to f32.
    pub bias2_sqrt: f32,
}

impl AdamwScalars {
    /// The scalars of step `t` (1-based, after the increment), with `lr255 = lr · 255` in f32.
    pub fn new(lr255: f32, weight_decay: f32, t: i32) -> Self {
        let bias1 = 1.0 - (ADAM_BETA1 as f64).powi(t);
        AdamwScalars {
            decay: 1.0 - lr255 * weight_decay,
            step: (lr255 as f64 / bias1) as f32,
            bias2_sqrt: (1.0 - (ADAM_BETA2 as f64).powi(t)).sqrt() as f32,
        }
    }
}

/// AdamW's per-step scalars for a whole attack on the device, with the step counter `t`: the
/// scalars of step `t` are [`AdamwScalars::new`]`(lr255, weight_decay, t)` (computed on the
/// host, so bit-identical to the host path), read by [`adamw_step_scheduled_f32`] at the
/// counter's current value, which [`adamw_advance`] increments. Nothing per-step is a kernel
/// argument, so one captured launch serves every step.
pub struct AdamwSchedule {
    /// `[3 · (steps + 1)]`: (decay, step, bias2_sqrt) of t = 0..=steps (row 0 unused).
    pub table: Buffer<f32>,
    /// `[1]`: the current t (0 before the first step).
    pub counter: Buffer<i32>,
    rows: usize,
}

impl AdamwSchedule {
    /// The schedule of `steps` steps (counter at 0).
    pub fn new(
        dev: &Device,
        lr255: f32,
        weight_decay: f32,
        steps: usize,
    ) -> Result<Self, GpuError> {
        let rows = steps + 1;
        let mut table = Vec::with_capacity(3 * rows);
        for t in 0..rows {
            let s = AdamwScalars::new(lr255, weight_decay, t.max(1) as i32);
            table.extend_from_slice(&[s.decay, s.step, s.bias2_sqrt]);
        }
        Ok(AdamwSchedule {
            table: dev.upload(&table)?,
            counter: dev.upload(&[0i32])?,
            rows,
        })
    }
}

/// `t ← t + 1` on the device (one thread): call before each AdamW step, escape step included.
pub fn adamw_advance(dev: &Device, schedule: &mut AdamwSchedule) -> Result<(), GpuError> {
    let mut args = KernelArgs::new();
    args.output(&mut schedule.counter);
    dev.launch(
        "prm_update_adamw_advance",
        LaunchConfig::linear(1, 32, 0),
        &mut args,
    )
}

/// The arguments both AdamW kernels start with (after checking their lengths against the
/// batch): δ, m, v, the clean images, the gradient, and the batch's offsets and ε.
fn adamw_args(
    batch: &ImageBatch,
    delta: &mut Buffer<f32>,
    m: &mut Buffer<f32>,
    v: &mut Buffer<f32>,
    clean: &Buffer<f32>,
    grad: &Buffer<f32>,
) -> KernelArgs {
    batch.check("adamw delta", delta.len());
    batch.check("adamw m", m.len());
    batch.check("adamw v", v.len());
    batch.check("adamw clean", clean.len());
    batch.check("adamw grad", grad.len());
    let mut args = KernelArgs::new();
    args.output(delta)
        .output(m)
        .output(v)
        .input(clean)
        .input(grad)
        .input(&batch.offsets)
        .input(&batch.eps);
    args
}

/// [`adamw_step_f32`] with the scalars of the schedule's current step, read on the device.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_scheduled_f32(
    dev: &Device,
    batch: &ImageBatch,
    delta: &mut Buffer<f32>,
    m: &mut Buffer<f32>,
    v: &mut Buffer<f32>,
    clean: &Buffer<f32>,
    grad: &Buffer<f32>,
    schedule: &AdamwSchedule,
) -> Result<(), GpuError> {
    let mut args = adamw_args(batch, delta, m, v, clean, grad);
    args.input(&schedule.table)
        .input(&schedule.counter)
        .i32(schedule.rows as i32);
    dev.launch("prm_update_adamw_scheduled_f32", batch.grid(), &mut args)
}

/// PGD: `x ← Π(x − step · sign(grad))` onto the ε-ball ∩ [0, 1].
pub fn pgd_step_f32(
    dev: &Device,
    batch: &ImageBatch,
    x: &mut Buffer<f32>,
    clean: &Buffer<f32>,
    grad: &Buffer<f32>,
    step: f32,
) -> Result<(), GpuError> {
    batch.check("pgd x", x.len());
    batch.check("pgd clean", clean.len());
    batch.check("pgd grad", grad.len());
    let mut args = KernelArgs::new();
    args.output(x)
        .input(clean)
        .input(grad)
        .input(&batch.offsets)
        .input(&batch.eps)
        .f32(step);
    dev.launch("prm_update_pgd_f32", batch.grid(), &mut args)
}

/// `inv[b] = 1 / ‖grad_b‖₁` (0 for a zero gradient), summed in f64 in a fixed order.
pub fn inv_l1_f32(
    dev: &Device,
    batch: &ImageBatch,
    grad: &Buffer<f32>,
    inv: &mut Buffer<f32>,
) -> Result<(), GpuError> {
    batch.check("inv_l1 grad", grad.len());
    assert_eq!(inv.len(), batch.images, "inv_l1: one value per image");
    let mut args = KernelArgs::new();
    args.input(grad).input(&batch.offsets).output(inv);
    dev.launch(
        "prm_update_inv_l1_f32",
        LaunchConfig::linear(batch.images as u32, BLOCK, 0),
        &mut args,
    )
}

/// MI-FGSM: `m ← μ·m + grad/‖grad‖₁`, `x ← Π(x − step · sign(m))`. `inv_l1` is scratch of one
/// value per image (it is filled here).
#[allow(clippy::too_many_arguments)]
pub fn mifgsm_step_f32(
    dev: &Device,
    batch: &ImageBatch,
    x: &mut Buffer<f32>,
    m: &mut Buffer<f32>,
    clean: &Buffer<f32>,
    grad: &Buffer<f32>,
    inv_l1: &mut Buffer<f32>,
    step: f32,
    momentum: f32,
) -> Result<(), GpuError> {
    batch.check("mifgsm x", x.len());
    batch.check("mifgsm m", m.len());
    batch.check("mifgsm clean", clean.len());
    inv_l1_f32(dev, batch, grad, inv_l1)?;
    let mut args = KernelArgs::new();
    args.output(x)
        .output(m)
        .input(clean)
        .input(grad)
        .input(&batch.offsets)
        .input(&batch.eps)
        .input(inv_l1)
        .f32(step)
        .f32(momentum);
    dev.launch("prm_update_mifgsm_f32", batch.grid(), &mut args)
}

/// One AdamW step on `delta` (δ in 0–255 units) with moments `m`, `v`, from `grad` = dL/dx in
/// [0, 1] units, passing the gradient only where both clamps of
/// x = clamp(clean·255 + clamp(δ, −ε₂₅₅, ε₂₅₅), 0, 255) are inactive.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_f32(
    dev: &Device,
    batch: &ImageBatch,
    delta: &mut Buffer<f32>,
    m: &mut Buffer<f32>,
    v: &mut Buffer<f32>,
    clean: &Buffer<f32>,
    grad: &Buffer<f32>,
    scalars: AdamwScalars,
) -> Result<(), GpuError> {
    let mut args = adamw_args(batch, delta, m, v, clean, grad);
    args.f32(scalars.decay)
        .f32(scalars.step)
        .f32(scalars.bias2_sqrt);
    dev.launch("prm_update_adamw_f32", batch.grid(), &mut args)
}

/// `delta = (start − clean) · 255`, AdamW's initial δ (as `Optimizer::new`).
pub fn adamw_init_f32(
    dev: &Device,
    batch: &ImageBatch,
    delta: &mut Buffer<f32>,
    start: &Buffer<f32>,
    clean: &Buffer<f32>,
) -> Result<(), GpuError> {
    batch.check("adamw_init delta", delta.len());
    batch.check("adamw_init start", start.len());
    batch.check("adamw_init clean", clean.len());
    let mut args = KernelArgs::new();
    args.output(delta)
        .input(start)
        .input(clean)
        .input(&batch.offsets);
    dev.launch("prm_update_adamw_init_f32", batch.grid(), &mut args)
}

/// The adversarial image of δ: `x = clamp(clean·255 + clamp(δ, −ε₂₅₅, ε₂₅₅), 0, 255) / 255`.
pub fn adamw_image_f32(
    dev: &Device,
    batch: &ImageBatch,
    x: &mut Buffer<f32>,
    delta: &Buffer<f32>,
    clean: &Buffer<f32>,
) -> Result<(), GpuError> {
    batch.check("adamw_image x", x.len());
    batch.check("adamw_image delta", delta.len());
    batch.check("adamw_image clean", clean.len());
    let mut args = KernelArgs::new();
    args.output(x)
        .input(delta)
        .input(clean)
        .input(&batch.offsets)
        .input(&batch.eps);
    dev.launch("prm_update_adamw_image_f32", batch.grid(), &mut args)
}

/// AdamW's escape step (`Optimizer::escape_step`): `δ ← δ·decay − lr₂₅₅·s` with the seeded
/// signs `s = uniform(STREAM_ESCAPE, i) < 0.5 ? −1 : +1`. The caller advances its step counter.
pub fn escape_adamw_f32(
    dev: &Device,
    batch: &ImageBatch,
    delta: &mut Buffer<f32>,
    decay: f32,
    lr255: f32,
) -> Result<(), GpuError> {
    batch.check("escape delta", delta.len());
    let mut args = KernelArgs::new();
    args.output(delta)
        .u64(0)
        .input(&batch.offsets)
        .u64(0)
        .input(&batch.keys)
        .u32(crate::rng::STREAM_ESCAPE)
        .i32(1)
        .f32(decay)
        .f32(lr255);
    dev.launch("prm_update_escape_f32", batch.grid(), &mut args)
}

/// The sign-step escape (PGD / MI-FGSM): `x ← Π(x − step·s)` with the seeded signs.
pub fn escape_sign_step_f32(
    dev: &Device,
    batch: &ImageBatch,
    x: &mut Buffer<f32>,
    clean: &Buffer<f32>,
    step: f32,
) -> Result<(), GpuError> {
    batch.check("escape x", x.len());
    batch.check("escape clean", clean.len());
    let mut args = KernelArgs::new();
    args.output(x)
        .input(clean)
        .input(&batch.offsets)
        .input(&batch.eps)
        .input(&batch.keys)
        .u32(crate::rng::STREAM_ESCAPE)
        .i32(0)
        .f32(1.0)
        .f32(step);
    dev.launch("prm_update_escape_f32", batch.grid(), &mut args)
}

/// The random start: `x = Π(clean + ε·(2·uniform(STREAM_INIT, i) − 1))`.
pub fn random_start_f32(
    dev: &Device,
    batch: &ImageBatch,
    x: &mut Buffer<f32>,
    clean: &Buffer<f32>,
) -> Result<(), GpuError> {
    batch.check("random_start x", x.len());
    batch.check("random_start clean", clean.len());
    let mut args = KernelArgs::new();
    args.output(x)
        .input(clean)
        .input(&batch.offsets)
        .input(&batch.eps)
        .input(&batch.keys)
        .u32(crate::rng::STREAM_INIT);
    dev.launch("prm_update_random_start_f32", batch.grid(), &mut args)
}

/// `out[offsets[b] + i] = ImageRng(b).uniform(stream, i)`, bit for bit.
pub fn uniform_f32(
    dev: &Device,
    batch: &ImageBatch,
    stream: u32,
    out: &mut Buffer<f32>,
) -> Result<(), GpuError> {
    batch.check("uniform out", out.len());
    let mut args = KernelArgs::new();
    args.output(out)
        .input(&batch.offsets)
        .input(&batch.keys)
        .u32(stream);
    dev.launch("prm_update_uniform_f32", batch.grid(), &mut args)
}
