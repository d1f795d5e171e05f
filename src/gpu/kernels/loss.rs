//! Launchers for `kernels/loss.cu`: the attack objectives at one feature layer of a packed
//! batch, per image, with their feature gradients added straight into the backward's running
//! gradient.
//!
//! Twins: [`crate::attack::loss::mean_token_cosine`] (prm), `neg_mean_squared_distance` (nrd)
//! and `dispersion` (dr, dr-official) in `src/attack/loss.rs`.
//!
//! # Tables
//! - features `adv`, `clean`, `grad`: `[ΣT_b, D]` row-major f32, images packed back to back;
//! - `cu_seqlens [images + 1]` (`i32`): image `b` is rows `cu_seqlens[b] .. cu_seqlens[b+1]`;
//! - `loss [images]` (`f32`): per-image loss, overwritten or accumulated (over layers);
//! - [`LossScratch`]: `row_val [ΣT]` per-row partials and `stats [2·images]` (mean, gradient
//!   scale of dr).
//!
//! Reductions are two-phase and deterministic (per-row warp sums, then one block per image in
//! a fixed order); no float atomics.

use half::bf16;

use crate::attack::settings::{LossKind, TokenSelection};
use crate::gpu::{Buffer, Device, GpuError, KernelArgs, LaunchConfig};

const ROWS_PER_BLOCK: u32 = 8;
const IMAGE_THREADS: u32 = 256;

/// The feature-layer losses the kernel computes (everything but `embed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerLoss {
    /// mean over selected tokens of cos(adv_t, clean_t).
    Prm,
    /// −mean over selected elements of (adv − clean)².
    Nrd,
    /// std over the selected elements (unbiased).
    Dr,
    /// −std.
    DrOfficial,
}

impl LayerLoss {
    /// The kernel form of a [`LossKind`]; `None` for `embed` (not a per-layer loss).
    pub fn from_kind(kind: LossKind) -> Option<Self> {
        match kind {
            LossKind::Prm => Some(LayerLoss::Prm),
            LossKind::Nrd => Some(LayerLoss::Nrd),
            LossKind::Dr => Some(LayerLoss::Dr),
            LossKind::DrOfficial => Some(LayerLoss::DrOfficial),
            LossKind::Embed => None,
        }
    }
}

/// Per-row and per-image scratch of the loss kernels, sized for a batch.
pub struct LossScratch {
    pub(crate) row_val: Buffer<f32>,
    stats: Buffer<f32>,
}

impl LossScratch {
    /// Scratch for up to `rows` token rows (ΣT) and `images` images.
    pub fn new(dev: &Device, rows: usize, images: usize) -> Result<Self, GpuError> {
        Ok(LossScratch {
            row_val: dev.alloc(rows.max(1))?,
            stats: dev.alloc((2 * images).max(1))?,
        })
    }
}

/// The shape of one packed layer.
#[derive(Clone, Copy)]
pub struct PackedTokens<'a> {
    /// `[images + 1]` row offsets on the device.
    pub cu_seqlens: &'a Buffer<i32>,
    pub images: usize,
    /// ΣT (must equal the last entry of `cu_seqlens`).
    pub rows: usize,
    pub dim: usize,
}

pub(crate) fn skip_of(sel: TokenSelection) -> i32 {
    match sel {
        TokenSelection::All => 0,
        TokenSelection::Patch => 1,
    }
}

#[allow(clippy::too_many_arguments)]
fn rows_pass(
    dev: &Device,
    shape: PackedTokens,
    adv: &Buffer<f32>,
    clean: &Buffer<f32>,
    skip: i32,
    mode: i32,
    weight: f32,
    grad: Option<Gradient>,
    scratch: &mut LossScratch,
) -> Result<(), GpuError> {
    let blocks = shape.rows.div_ceil(ROWS_PER_BLOCK as usize).max(1) as u32;
    let mut args = KernelArgs::new();
    args.input(adv)
        .input(clean)
        .input(shape.cu_seqlens)
        .i32(shape.images as i32)
        .i32(shape.dim as i32)
        .i32(skip)
        .i32(mode)
        .input(&scratch.stats);
    let (grad, copy) = match grad {
        Some(Gradient { grad, copy }) => (Some(grad), copy),
        None => (None, None),
    };
    match grad {
        Some(g) => args.output(g),
        None => args.u64(0),
    };
    match copy {
        Some(c) => args.output(c),
        None => args.u64(0),
    };
    args.f32(weight).output(&mut scratch.row_val);
    // Rows of at most 768 elements: mode 0 (cosine) from registers, one read of a and c.
    let kernel = if shape.dim <= 768 {
        "prm_loss_rows_f32_d768"
    } else {
        "prm_loss_rows_f32"
    };
    dev.launch(
        kernel,
        LaunchConfig::linear(blocks, ROWS_PER_BLOCK * 32, 0),
        &mut args,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn images_pass(
    dev: &Device,
    shape: PackedTokens,
    skip: i32,
    mode: i32,
    weight: f32,
    loss: &mut Buffer<f32>,
    accumulate: bool,
    scratch: &mut LossScratch,
) -> Result<(), GpuError> {
    let mut args = KernelArgs::new();
    args.input(&scratch.row_val)
        .input(shape.cu_seqlens)
        .i32(shape.dim as i32)
        .i32(skip)
        .i32(mode)
        .f32(weight)
        .output(loss)
        .i32(accumulate as i32)
        .output(&mut scratch.stats);
    dev.launch(
        "prm_loss_images_f32",
        LaunchConfig::linear(shape.images as u32, IMAGE_THREADS, 0),
        &mut args,
    )
}

/// The running gradient a loss pass adds into, and optionally a bf16 buffer that receives
/// `bf16(grad)` of every row after the addition (round to nearest even).
pub struct Gradient<'a> {
    pub grad: &'a mut Buffer<f32>,
    pub copy: Option<&'a mut Buffer<bf16>>,
}

/// One layer of `kind` for every image of the batch: `loss[b]` receives the image's value
/// (added to it when `accumulate`, as when summing over layers), and, with `grad`,
/// `grad += dL/d(adv)` (the backward's running gradient for this layer; unselected tokens are
/// left untouched). The per-image value is that of the twin: prm = mean token cosine,
/// nrd = −mean (adv − clean)², dr = std, dr-official = −std.
#[allow(clippy::too_many_arguments)]
pub fn layer_loss_f32(
    dev: &Device,
    kind: LayerLoss,
    tokens: TokenSelection,
    shape: PackedTokens,
    adv: &Buffer<f32>,
    clean: &Buffer<f32>,
    loss: &mut Buffer<f32>,
    accumulate: bool,
    grad: Option<&mut Buffer<f32>>,
    scratch: &mut LossScratch,
) -> Result<(), GpuError> {
    let grad = grad.map(|grad| Gradient { grad, copy: None });
    layer_loss_f32_gradient(
        dev, kind, tokens, shape, adv, clean, loss, accumulate, grad, scratch,
    )
}

/// [`layer_loss_f32`] with the gradient as a [`Gradient`]: given its `copy`, the pass that adds
/// the gradient also writes `bf16(grad)` of every row there (the operand of the bf16 engine's
/// next product, with no conversion pass). `grad` is bit-identical either way.
#[allow(clippy::too_many_arguments)]
pub fn layer_loss_f32_gradient(
    dev: &Device,
    kind: LayerLoss,
    tokens: TokenSelection,
    shape: PackedTokens,
    adv: &Buffer<f32>,
    clean: &Buffer<f32>,
    loss: &mut Buffer<f32>,
    accumulate: bool,
    grad: Option<Gradient>,
    scratch: &mut LossScratch,
) -> Result<(), GpuError> {
    let n = shape.rows * shape.dim;
    assert_eq!(adv.len(), n, "layer_loss: adv is not [rows, dim]");
    assert_eq!(clean.len(), n, "layer_loss: clean is not [rows, dim]");
    assert_eq!(
        shape.cu_seqlens.len(),
        shape.images + 1,
        "layer_loss: cu_seqlens length"
    );
    assert_eq!(loss.len(), shape.images, "layer_loss: one loss per image");
    assert!(
        scratch.row_val.len() >= shape.rows,
        "layer_loss: scratch too small"
    );
    assert!(
        scratch.stats.len() >= 2 * shape.images,
        "layer_loss: scratch too small"
    );
    if let Some(g) = &grad {
        assert_eq!(g.grad.len(), n, "layer_loss: grad is not [rows, dim]");
        if let Some(c) = g.copy.as_deref() {
            assert!(
                c.len() >= n,
                "layer_loss: the gradient's bf16 copy is not [rows, dim]"
            );
        }
    }
    let skip = skip_of(tokens);
    match kind {
        LayerLoss::Prm | LayerLoss::Nrd => {
            let mode = if kind == LayerLoss::Prm { 0 } else { 1 };
            rows_pass(dev, shape, adv, clean, skip, mode, 1.0, grad, scratch)?;
            images_pass(dev, shape, skip, mode, 1.0, loss, accumulate, scratch)
        }
        LayerLoss::Dr | LayerLoss::DrOfficial => {
            let sign = if kind == LayerLoss::Dr { 1.0 } else { -1.0 };
            // mean, then the sum of squared deviations, then std and the gradient scale.
            rows_pass(dev, shape, adv, clean, skip, 2, sign, None, scratch)?;
            images_pass(dev, shape, skip, 2, sign, loss, accumulate, scratch)?;
            rows_pass(dev, shape, adv, clean, skip, 3, sign, None, scratch)?;
            images_pass(dev, shape, skip, 3, sign, loss, accumulate, scratch)?;
            if grad.is_some() {
                rows_pass(dev, shape, adv, clean, skip, 4, sign, grad, scratch)?;
            }
            Ok(())
        }
    }
}

/// Per-image mean token cosine of one layer (no gradient), for the manifest's per-layer
/// cosine: `out[b] = mean_t cos(adv_t, clean_t)` over the selected tokens.
pub fn layer_cosine_f32(
    dev: &Device,
    tokens: TokenSelection,
    shape: PackedTokens,
    adv: &Buffer<f32>,
    clean: &Buffer<f32>,
    out: &mut Buffer<f32>,
    scratch: &mut LossScratch,
) -> Result<(), GpuError> {
    layer_loss_f32(
        dev,
        LayerLoss::Prm,
        tokens,
        shape,
        adv,
        clean,
        out,
        false,
        None,
        scratch,
    )
}
