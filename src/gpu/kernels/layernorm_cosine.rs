//! Launcher for `kernels/layernorm_cosine.cu`: the LayerNorm backward of a block's first
//! LayerNorm and the prm (cosine) loss at that block's input layer, in one pass over the rows.
//!
//! In the attack's backward both read the layer's features `F_l` and both add into the running
//! residual gradient; run one after the other they read `F_l` twice and read and write the
//! gradient (and its bf16 copy) twice. The fused pass gives the same bits as
//! [`layernorm_backward_f32`](super::layernorm::layernorm_backward_f32) with `accumulate`
//! followed by [`layer_loss_f32_gradient`](super::loss::layer_loss_f32_gradient) with
//! [`LayerLoss::Prm`](super::loss::LayerLoss::Prm) (tests/kernel_loss.rs), for rows of at most
//! [`MAX_DIM`] elements; wider rows (ViT-L) take those two.

use crate::attack::settings::TokenSelection;
use crate::gpu::kernels::loss::{images_pass, skip_of, Gradient, LossScratch, PackedTokens};
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

/// `grad += LN_backward(ln)`, then the prm loss of the layer whose features are `ln.x` against
/// `clean`: `loss[b]` receives each image's mean token cosine (added when `accumulate`) and
/// `grad += dL/dx` on the selected tokens; with `grad.copy`, `bf16(grad)` of every row as
/// written. `shape.dim` must be at most [`MAX_DIM`].
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_then_cosine_f32(
    dev: &Device,
    ln: LayerNormBackward,
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
        dim > 0 && dim <= MAX_DIM,
        "layernorm_cosine: rows of {dim} elements (at most {MAX_DIM})"
    );
    assert!(rows <= i32::MAX as usize, "layernorm_cosine: {rows} rows");
    for (what, len) in [
        ("x", ln.x.len()),
        ("dy", ln.dy.len()),
        ("clean", clean.len()),
        ("grad", grad.grad.len()),
    ] {
        assert_eq!(len, n, "layernorm_cosine: {what} is not [{rows}, {dim}]");
    }
    for (what, len, want) in [
        ("gamma", ln.gamma.len(), dim),
        ("mean", ln.mean.len(), rows),
        ("rstd", ln.rstd.len(), rows),
    ] {
        assert_eq!(
            len, want,
            "layernorm_cosine: {what} has {len} elements, expected {want}"
        );
    }
    assert_eq!(
        shape.cu_seqlens.len(),
        shape.images + 1,
        "layernorm_cosine: cu_seqlens length"
    );
    assert_eq!(
        loss.len(),
        shape.images,
        "layernorm_cosine: one loss per image"
    );
    assert!(
        scratch.row_val.len() >= rows,
        "layernorm_cosine: scratch too small"
    );
    if let Some(c) = grad.copy.as_deref() {
        assert!(
            c.len() >= n,
            "layernorm_cosine: the gradient's bf16 copy is not [{rows}, {dim}]"
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
            .f32(1.0)
            .output(grad.grad);
        match grad.copy {
            Some(c) => args.output(c),
            None => args.u64(0),
        };
        args.output(&mut scratch.row_val);
        let blocks = rows.div_ceil(ROWS_PER_BLOCK) as u32;
        dev.launch(
            "prm_layernorm_cosine_backward_f32_d768",
            LaunchConfig::linear(blocks, (ROWS_PER_BLOCK * 32) as u32, 0),
            &mut args,
        )?;
    }
    images_pass(dev, shape, skip, 0, 1.0, loss, accumulate, scratch)
}
