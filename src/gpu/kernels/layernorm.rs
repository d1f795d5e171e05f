//! Launchers for `kernels/layernorm.cu`: LayerNorm over the rows of a packed token matrix
//! `[rows, dim]`, forward with saved per-row statistics and input-gradient backward.
//!
//! One warp per row (4 rows per 128-thread block), fp32 statistics, deterministic warp
//! reductions. Rows of up to 1024 elements are held in registers; wider rows are streamed.
//! fp32 (`_f32`) and bf16 storage (`_bf16`) variants; γ, β, mean, rstd are fp32 in both.
//!
//! ```no_run
//! use prm::gpu::{Device, kernels::layernorm};
//! # fn main() -> Result<(), prm::gpu::GpuError> {
//! let dev = Device::sim();
//! let (rows, dim) = (197, 768);
//! let x = dev.upload(&vec![0.5f32; rows * dim])?;
//! let (gamma, beta) = (dev.upload(&vec![1.0f32; dim])?, dev.upload(&vec![0.0f32; dim])?);
//! let mut y = dev.alloc::<f32>(rows * dim)?;
//! let (mut mean, mut rstd) = (dev.alloc::<f32>(rows)?, dev.alloc::<f32>(rows)?);
//! layernorm::layernorm_forward_f32(&dev, &x, &gamma, &beta, &mut y, &mut mean, &mut rstd, rows, dim, 1e-5)?;
//! # Ok(()) }
//! ```

use half::bf16;

use crate::gpu::{Buffer, Device, Element, GpuError, KernelArgs, LaunchConfig};

/// Storage types of the `[rows, dim]` tensors, with their kernel name suffix.
trait Storage: Element {
    const SUFFIX: &'static str;
}
impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Storage for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Rows (warps) per block; must match `PRM_LN_ROWS_PER_BLOCK` in the kernel.
const ROWS_PER_BLOCK: usize = 4;

fn config(rows: usize) -> LaunchConfig {
    LaunchConfig::linear(
        rows.div_ceil(ROWS_PER_BLOCK) as u32,
        (ROWS_PER_BLOCK * 32) as u32,
        0,
    )
}

fn check_sizes(rows: usize, dim: usize) {
    assert!(dim > 0, "layernorm over rows of width 0");
    assert!(
        rows <= i32::MAX as usize && dim <= i32::MAX as usize,
        "layernorm of {rows}x{dim} is too large"
    );
}

#[allow(clippy::too_many_arguments)]
fn forward<T: Storage, U: Storage>(
    dev: &Device,
    x: &Buffer<T>,
    gamma: &Buffer<f32>,
    beta: &Buffer<f32>,
    y: &mut Buffer<U>,
    mean: &mut Buffer<f32>,
    rstd: &mut Buffer<f32>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<(), GpuError> {
    check_sizes(rows, dim);
    assert_eq!(x.len(), rows * dim, "layernorm x is not [{rows}, {dim}]");
    assert!(
        y.len() >= rows * dim,
        "layernorm y is smaller than [{rows}, {dim}]"
    );
    assert_eq!(gamma.len(), dim, "layernorm gamma is not [{dim}]");
    assert_eq!(beta.len(), dim, "layernorm beta is not [{dim}]");
    assert_eq!(mean.len(), rows, "layernorm mean is not [{rows}]");
    assert_eq!(rstd.len(), rows, "layernorm rstd is not [{rows}]");
    if rows == 0 {
        return Ok(());
    }
    let mut args = KernelArgs::new();
    args.input(x)
        .input(gamma)
        .input(beta)
        .output(y)
        .output(mean)
        .output(rstd)
        .i32(rows as i32)
        .i32(dim as i32)
        .f32(eps);
    let types = if T::SUFFIX == U::SUFFIX {
        T::SUFFIX
    } else {
        assert!(
            T::SUFFIX == "f32" && U::SUFFIX == "bf16",
            "no such layernorm variant"
        );
        "f32_bf16out"
    };
    let name = format!("prm_layernorm_forward_{types}{}", width_suffix(dim));
    dev.launch(&name, config(rows), &mut args)
}

/// `y = (x − mean)·rstd·γ + β` per row of `x [rows, dim]`; writes `mean [rows]` and
/// `rstd [rows]` (`1/sqrt(var + eps)`, biased variance) for [`layernorm_backward_f32`].
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward_f32(
    dev: &Device,
    x: &Buffer<f32>,
    gamma: &Buffer<f32>,
    beta: &Buffer<f32>,
    y: &mut Buffer<f32>,
    mean: &mut Buffer<f32>,
    rstd: &mut Buffer<f32>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<(), GpuError> {
    forward(dev, x, gamma, beta, y, mean, rstd, rows, dim, eps)
}

/// bf16 storage [`layernorm_forward_f32`]: `x` and `y` in bf16; γ, β, the statistics and all
/// arithmetic in fp32.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward_bf16(
    dev: &Device,
    x: &Buffer<bf16>,
    gamma: &Buffer<f32>,
    beta: &Buffer<f32>,
    y: &mut Buffer<bf16>,
    mean: &mut Buffer<f32>,
    rstd: &mut Buffer<f32>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<(), GpuError> {
    forward(dev, x, gamma, beta, y, mean, rstd, rows, dim, eps)
}

/// [`layernorm_forward_f32`] with a bf16 `y` (the operand of a bf16 product; fp32 statistics
/// and arithmetic, one rounding at the store). `y` may be longer than `rows · dim`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward_f32_bf16out(
    dev: &Device,
    x: &Buffer<f32>,
    gamma: &Buffer<f32>,
    beta: &Buffer<f32>,
    y: &mut Buffer<bf16>,
    mean: &mut Buffer<f32>,
    rstd: &mut Buffer<f32>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<(), GpuError> {
    forward(dev, x, gamma, beta, y, mean, rstd, rows, dim, eps)
}

/// Launches the backward kernel of `T` (with `copy`: the fp32 kernel that also writes
/// `bf16(dx)` there), in the width that fits `dim`.
#[allow(clippy::too_many_arguments)]
fn backward<T: Storage>(
    dev: &Device,
    x: &Buffer<T>,
    dy: &Buffer<T>,
    gamma: &Buffer<f32>,
    mean: &Buffer<f32>,
    rstd: &Buffer<f32>,
    dx: &mut Buffer<T>,
    copy: Option<&mut Buffer<bf16>>,
    rows: usize,
    dim: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    check_sizes(rows, dim);
    assert_eq!(x.len(), rows * dim, "layernorm x is not [{rows}, {dim}]");
    assert_eq!(dy.len(), rows * dim, "layernorm dy is not [{rows}, {dim}]");
    assert_eq!(dx.len(), rows * dim, "layernorm dx is not [{rows}, {dim}]");
    assert_eq!(gamma.len(), dim, "layernorm gamma is not [{dim}]");
    assert_eq!(mean.len(), rows, "layernorm mean is not [{rows}]");
    assert_eq!(rstd.len(), rows, "layernorm rstd is not [{rows}]");
    if let Some(c) = copy.as_deref() {
        assert!(
            c.len() >= rows * dim,
            "layernorm dx_bf16 has {} elements, needs {rows}x{dim}",
            c.len()
        );
    }
    if rows == 0 {
        return Ok(());
    }
    let mut args = KernelArgs::new();
    args.input(x)
        .input(dy)
        .input(gamma)
        .input(mean)
        .input(rstd)
        .output(dx);
    let variant = match copy {
        Some(c) => {
            args.output(c);
            "_bf16copy"
        }
        None => "",
    };
    args.i32(rows as i32).i32(dim as i32).i32(accumulate as i32);
    let name = format!(
        "prm_layernorm_backward_{}{variant}{}",
        T::SUFFIX,
        width_suffix(dim)
    );
    dev.launch(&name, config(rows), &mut args)
}

/// Input gradient of [`layernorm_forward_f32`]:
/// `dx (+)= rstd·(g − mean(g) − x̂·mean(g·x̂))`, `g = dy·γ`, `x̂ = (x − mean)·rstd`, using the
/// forward's saved `mean` and `rstd`. With `accumulate` the result is added to `dx` (the
/// running residual gradient); otherwise `dx` is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_f32(
    dev: &Device,
    x: &Buffer<f32>,
    dy: &Buffer<f32>,
    gamma: &Buffer<f32>,
    mean: &Buffer<f32>,
    rstd: &Buffer<f32>,
    dx: &mut Buffer<f32>,
    rows: usize,
    dim: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    backward(
        dev, x, dy, gamma, mean, rstd, dx, None, rows, dim, accumulate,
    )
}

/// [`layernorm_backward_f32`] that also writes `bf16(dx)` (round to nearest even) into
/// `dx_bf16`: the bf16 engine's residual gradient and the operand of the product that reads it
/// next, in one pass. `dx` is bit-identical to [`layernorm_backward_f32`]'s.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_f32_bf16copy(
    dev: &Device,
    x: &Buffer<f32>,
    dy: &Buffer<f32>,
    gamma: &Buffer<f32>,
    mean: &Buffer<f32>,
    rstd: &Buffer<f32>,
    dx: &mut Buffer<f32>,
    dx_bf16: &mut Buffer<bf16>,
    rows: usize,
    dim: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    let copy = Some(dx_bf16);
    backward(
        dev, x, dy, gamma, mean, rstd, dx, copy, rows, dim, accumulate,
    )
}

/// The kernels come in two widths (same arithmetic, same bits): rows of up to 768 elements
/// cached in 24 registers per lane (`_d768`, ViT-B), and up to 1024 in 32 (wider rows are
/// streamed by both). The backward's `_d768` kernels need 128 instead of 168 registers per
/// thread (4 blocks per SM instead of 3); the forward's issue a quarter fewer instructions
/// (no empty slots to mask at width 768).
fn width_suffix(dim: usize) -> &'static str {
    if dim <= 768 {
        "_d768"
    } else {
        ""
    }
}

/// bf16 storage [`layernorm_backward_f32`]: `x`, `dy`, `dx` in bf16; with `accumulate` the sum
/// is formed in fp32 and rounded once.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_bf16(
    dev: &Device,
    x: &Buffer<bf16>,
    dy: &Buffer<bf16>,
    gamma: &Buffer<f32>,
    mean: &Buffer<f32>,
    rstd: &Buffer<f32>,
    dx: &mut Buffer<bf16>,
    rows: usize,
    dim: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    backward(
        dev, x, dy, gamma, mean, rstd, dx, None, rows, dim, accumulate,
    )
}
