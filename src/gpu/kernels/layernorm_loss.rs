//! Launcher for `kernels/layernorm_loss.cu`: the LayerNorm backward of a block's first
//! LayerNorm and the loss at that block's input layer (prm or nrd: the losses whose gradient is
//! elementwise once a row's statistics are known), in one pass over the rows.
//!
//! In the attack's backward both read the layer's features `F_l` and both add into the running
//! residual gradient; run one after the other they read `F_l` twice and read and write the
//! gradient (and its bf16 copy) twice. The fused pass gives the same bits as
//! [`layernorm_backward_f32`](super::layernorm::layernorm_backward_f32) with `accumulate`
//! followed by [`layer_loss_f32_gradient`](super::loss::layer_loss_f32_gradient) of the same
//! loss (tests/kernel_loss.rs), for rows of at most [`MAX_DIM`] elements; wider rows (ViT-L)
//! and the dispersion losses (two passes over the image first) take those two.

use crate::attack::settings::TokenSelection;
use crate::gpu::kernels::loss::{
    images_pass, skip_of, Gradient, LayerLoss, LossScratch, PackedTokens,
};
use crate::gpu::{Buffer, Device, GpuError, KernelArgs, LaunchConfig};

/// The widest rows the fused kernel holds in registers (ViT-B's width).
pub const MAX_DIM: usize = 768;

/// Rows (warps) per block; must match `PRM_LNCOS_ROWS_PER_BLOCK` in the kernel.
const ROWS_PER_BLOCK: usize = 4;

/// The inputs of a LayerNorm's input-gradient backward over `[rows, dim]` fp32 rows: its input
/// `x`, its output's gradient `dy`, γ, and the forward's saved `mean` and `rstd`.
#[derive(Clone, Copy)]
pub struct LayerNormBackward<'a> {
    pub x: &'a Buffer<f32>,
    pub dy: &'a Buffer<f32>,
    pub gamma: &'a Buffer<f32>,
    pub mean: &'a Buffer<f32>,
    pub rstd: &'a Buffer<f32>,
}

/// Whether [`layernorm_backward_then_loss_f32`] takes `kind` at rows of `dim` elements.
pub fn fuses(kind: LayerLoss, dim: usize) -> bool {
    matches!(kind, LayerLoss::Prm | LayerLoss::Nrd) && dim > 0 && dim <= MAX_DIM
}

/// `grad += LN_backward(ln)`, then the loss `kind` (prm or nrd) of the layer whose features are
/// `ln.x` against `clean`: `loss[b]` receives each image's value, as
/// [`layer_loss_f32`](super::loss::layer_loss_f32) gives it (added when `accumulate`), and
/// `grad += dL/dx` on the selected tokens; with `grad.copy`, `bf16(grad)` of every row as
/// written. Panics unless [`fuses`]`(kind, shape.dim)`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_then_loss_f32(
    dev: &Device,
    ln: LayerNormBackward,
    kind: LayerLoss,
    tokens: TokenSelection,
    shape: PackedTokens,
    clean: &Buffer<f32>,
    loss: &mut Buffer<f32>,
    accumulate: bool,
    grad: Gradient,
    scratch: &mut LossScratch,
) -> Result<(), GpuError> {
    let (rows, dim) = (shape.rows, shape.dim);
    let n = rows * dim;
    assert!(
        fuses(kind, dim),
        "layernorm_loss: no fused pass for {kind:?} at rows of {dim} elements"
    );
    let mode = if kind == LayerLoss::Prm { 0 } else { 1 };
    assert!(rows <= i32::MAX as usize, "layernorm_loss: {rows} rows");
    for (what, len) in [
        ("x", ln.x.len()),
        ("dy", ln.dy.len()),
        ("clean", clean.len()),
        ("grad", grad.grad.len()),
    ] {
        assert_eq!(len, n, "layernorm_loss: {what} is not [{rows}, {dim}]");
    }
    for (what, len, want) in [
        ("gamma", ln.gamma.len(), dim),
        ("mean", ln.mean.len(), rows),
        ("rstd", ln.rstd.len(), rows),
    ] {
        assert_eq!(
            len, want,
            "layernorm_loss: {what} has {len} elements, expected {want}"
        );
    }
    assert_eq!(
        shape.cu_seqlens.len(),
        shape.images + 1,
        "layernorm_loss: cu_seqlens length"
    );
    assert_eq!(
        loss.len(),
        shape.images,
        "layernorm_loss: one loss per image"
    );
    assert!(
        scratch.row_val.len() >= rows,
        "layernorm_loss: scratch too small"
    );
    if let Some(c) = grad.copy.as_deref() {
        assert!(
            c.len() >= n,
            "layernorm_loss: the gradient's bf16 copy is not [{rows}, {dim}]"
        );
    }
    let skip = skip_of(tokens);
    if rows > 0 {
        let mut args = KernelArgs::new();
        args.input(ln.x)
            .input(ln.dy)
            .input(ln.gamma)
            .input(ln.mean)
            .input(ln.rstd)
            .input(clean)
            .input(shape.cu_seqlens)
            .i32(shape.images as i32)
            .i32(dim as i32)
            .i32(skip)
            .i32(mode)
            .f32(1.0)
            .output(grad.grad);
        match grad.copy {
            Some(c) => args.output(c),
            None => args.u64(0),
        };
        args.output(&mut scratch.row_val);
        let blocks = rows.div_ceil(ROWS_PER_BLOCK) as u32;
        dev.launch(
            "prm_layernorm_loss_backward_f32_d768",
            LaunchConfig::linear(blocks, (ROWS_PER_BLOCK * 32) as u32, 0),
            &mut args,
        )?;
    }
    images_pass(dev, shape, skip, mode, 1.0, loss, accumulate, scratch)
}
