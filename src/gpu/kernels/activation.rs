//! Launchers for `kernels/activation.cu`: the MLP activation (QuickGELU, exact GELU or GELU's
//! tanh approximation) with the fc1 bias fused into the forward, and its input gradient.
//!
//! The forward writes both the pre-activation `pre = x + bias` (which the backward needs) and
//! the output; `pre` may be skipped (`None`) when no backward follows. Elementwise, grid-stride.
//!
//! Each launcher comes in fp32 (`_f32`) and bf16 storage (`_bf16`: activation tensors in bf16,
//! bias in fp32, arithmetic in fp32). Out-of-place outputs may be longer than `[rows, cols]`
//! (the engine writes the next product's operand into a scratch that fits its largest use).
//! The engine's bf16 MLP runs the `_bf16` forward with no bias and no `pre` (fc1's bf16-output
//! product added the bias, and its output is the saved pre-activation) and the `_bf16`
//! backward on that `pre` and the bf16 gradient of fc2's input-gradient product.
//!
//! ```no_run
//! use prm::gpu::{Device, kernels::activation};
//! use prm::model::Activation;
//! # fn main() -> Result<(), prm::gpu::GpuError> {
//! let dev = Device::sim();
//! let (rows, cols) = (197, 3072);
//! let mut h = dev.upload(&vec![0.5f32; rows * cols])?; // fc1 output, without its bias
//! let bias = dev.upload(&vec![0.1f32; cols])?;
//! let mut pre = dev.alloc::<f32>(rows * cols)?;
//! activation::bias_activation_inplace_f32(&dev, Activation::QuickGelu, &mut h, Some(&bias), Some(&mut pre), rows, cols)?;
//! let mut dh = dev.upload(&vec![1.0f32; rows * cols])?; // gradient w.r.t. the activation output
//! activation::activation_backward_inplace_f32(&dev, Activation::QuickGelu, &pre, &mut dh, rows, cols)?;
//! # Ok(()) }
//! ```

use half::bf16;

use crate::gpu::{Buffer, Device, Element, GpuError, KernelArgs, LaunchConfig};
use crate::model::Activation;

const THREADS: u32 = 256;
/// Grid-stride loops: at most this many blocks (enough to fill an H100 several times over).
const MAX_BLOCKS: usize = 2048;

/// Storage types of the activation tensors, with their kernel name suffix.
trait Storage: Element {
    const SUFFIX: &'static str;
}
impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Storage for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// `act` of the kernels: activation.cu's `PRM_ACT_*`.
fn act_code(act: Activation) -> i32 {
    match act {
        Activation::QuickGelu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
    }
}

fn config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig::linear(blocks as u32, THREADS, 0)
}

fn check_sizes(rows: usize, cols: usize) {
    assert!(
        rows <= i32::MAX as usize && cols <= i32::MAX as usize && cols > 0,
        "activation over [{rows}, {cols}] is out of range"
    );
}

/// `x` and `out` are addresses (they may be the same buffer).
#[allow(clippy::too_many_arguments)]
fn forward<T: Storage>(
    dev: &Device,
    act: Activation,
    x: u64,
    bias: Option<&Buffer<f32>>,
    pre: Option<&mut Buffer<T>>,
    out: u64,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    let kernel = format!("prm_activation_forward_{}", T::SUFFIX);
    forward_kernel(&kernel, dev, act, x, bias, pre, out, rows, cols)
}

/// [`forward`] through the kernel named `kernel` (same parameter list).
#[allow(clippy::too_many_arguments)]
fn forward_kernel<T: Storage>(
    kernel: &str,
    dev: &Device,
    act: Activation,
    x: u64,
    bias: Option<&Buffer<f32>>,
    pre: Option<&mut Buffer<T>>,
    out: u64,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    check_sizes(rows, cols);
    if let Some(b) = bias {
        assert_eq!(b.len(), cols, "activation bias is not [{cols}]");
    }
    if let Some(p) = &pre {
        assert_eq!(
            p.len(),
            rows * cols,
            "activation pre is not [{rows}, {cols}]"
        );
    }
    if rows == 0 {
        return Ok(());
    }
    let mut args = KernelArgs::new();
    args.u64(x);
    match bias {
        Some(b) => args.input(b),
        None => args.u64(0),
    };
    match pre {
        Some(p) => args.output(p),
        None => args.u64(0),
    };
    args.u64(out)
        .i32(rows as i32)
        .i32(cols as i32)
        .i32(act_code(act));
    // One block per row (grid-stride over rows beyond MAX_BLOCKS).
    let cfg = LaunchConfig::linear(rows.min(MAX_BLOCKS) as u32, THREADS, 0);
    dev.launch(kernel, cfg, &mut args)
}

#[allow(clippy::too_many_arguments)]
fn forward_out_of_place<T: Storage>(
    dev: &Device,
    act: Activation,
    x: &Buffer<T>,
    bias: Option<&Buffer<f32>>,
    pre: Option<&mut Buffer<T>>,
    out: &mut Buffer<T>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    assert_eq!(x.len(), rows * cols, "activation x is not [{rows}, {cols}]");
    assert!(
        out.len() >= rows * cols,
        "activation out is smaller than [{rows}, {cols}]"
    );
    forward(dev, act, x.address(), bias, pre, out.address(), rows, cols)
}

fn forward_in_place<T: Storage>(
    dev: &Device,
    act: Activation,
    x: &mut Buffer<T>,
    bias: Option<&Buffer<f32>>,
    pre: Option<&mut Buffer<T>>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    assert_eq!(x.len(), rows * cols, "activation x is not [{rows}, {cols}]");
    let a = x.address();
    forward(dev, act, a, bias, pre, a, rows, cols)
}

/// `dy` and `dx` are addresses (they may be the same buffer).
fn backward<T: Storage>(
    dev: &Device,
    act: Activation,
    pre: &Buffer<T>,
    dy: u64,
    dx: u64,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    let kernel = format!("prm_activation_backward_{}", T::SUFFIX);
    backward_kernel(&kernel, dev, act, pre, dy, dx, rows, cols)
}

/// [`backward`] through the kernel named `kernel` (same parameter list).
#[allow(clippy::too_many_arguments)]
fn backward_kernel<T: Storage>(
    kernel: &str,
    dev: &Device,
    act: Activation,
    pre: &Buffer<T>,
    dy: u64,
    dx: u64,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    check_sizes(rows, cols);
    assert_eq!(
        pre.len(),
        rows * cols,
        "activation pre is not [{rows}, {cols}]"
    );
    if rows == 0 {
        return Ok(());
    }
    let mut args = KernelArgs::new();
    args.input(pre)
        .u64(dy)
        .u64(dx)
        .i32(rows as i32)
        .i32(cols as i32)
        .i32(act_code(act));
    dev.launch(kernel, config(rows * cols), &mut args)
}

fn backward_out_of_place<T: Storage>(
    dev: &Device,
    act: Activation,
    pre: &Buffer<T>,
    dy: &Buffer<T>,
    dx: &mut Buffer<T>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    assert_eq!(
        dy.len(),
        rows * cols,
        "activation dy is not [{rows}, {cols}]"
    );
    assert!(
        dx.len() >= rows * cols,
        "activation dx is smaller than [{rows}, {cols}]"
    );
    backward(dev, act, pre, dy.address(), dx.address(), rows, cols)
}

fn backward_in_place<T: Storage>(
    dev: &Device,
    act: Activation,
    pre: &Buffer<T>,
    d: &mut Buffer<T>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    assert_eq!(d.len(), rows * cols, "activation d is not [{rows}, {cols}]");
    let a = d.address();
    backward(dev, act, pre, a, a, rows, cols)
}

/// `pre = x + bias`, `out = act(pre)` over `[rows, cols]` with `bias [cols]`. `bias: None`
/// skips the addition (bias already added by the GEMM epilogue); `pre: None` skips writing the
/// pre-activation.
#[allow(clippy::too_many_arguments)]
pub fn bias_activation_forward_f32(
    dev: &Device,
    act: Activation,
    x: &Buffer<f32>,
    bias: Option<&Buffer<f32>>,
    pre: Option<&mut Buffer<f32>>,
    out: &mut Buffer<f32>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    forward_out_of_place(dev, act, x, bias, pre, out, rows, cols)
}

/// In-place [`bias_activation_forward_f32`]: `x ← act(x + bias)`, saving `x + bias` to `pre`.
pub fn bias_activation_inplace_f32(
    dev: &Device,
    act: Activation,
    x: &mut Buffer<f32>,
    bias: Option<&Buffer<f32>>,
    pre: Option<&mut Buffer<f32>>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    forward_in_place(dev, act, x, bias, pre, rows, cols)
}

/// `dx = dy · act'(pre)` over `[rows, cols]`, `pre` saved by the forward.
pub fn activation_backward_f32(
    dev: &Device,
    act: Activation,
    pre: &Buffer<f32>,
    dy: &Buffer<f32>,
    dx: &mut Buffer<f32>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    backward_out_of_place(dev, act, pre, dy, dx, rows, cols)
}

/// In-place [`activation_backward_f32`]: `d ← d · act'(pre)`.
pub fn activation_backward_inplace_f32(
    dev: &Device,
    act: Activation,
    pre: &Buffer<f32>,
    d: &mut Buffer<f32>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    backward_in_place(dev, act, pre, d, rows, cols)
}

/// bf16 storage [`bias_activation_forward_f32`] (fp32 bias and arithmetic). The activation is
/// evaluated on the stored, rounded `pre` when `pre` is written.
#[allow(clippy::too_many_arguments)]
pub fn bias_activation_forward_bf16(
    dev: &Device,
    act: Activation,
    x: &Buffer<bf16>,
    bias: Option<&Buffer<f32>>,
    pre: Option<&mut Buffer<bf16>>,
    out: &mut Buffer<bf16>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    forward_out_of_place(dev, act, x, bias, pre, out, rows, cols)
}

/// bf16 storage [`bias_activation_inplace_f32`].
pub fn bias_activation_inplace_bf16(
    dev: &Device,
    act: Activation,
    x: &mut Buffer<bf16>,
    bias: Option<&Buffer<f32>>,
    pre: Option<&mut Buffer<bf16>>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    forward_in_place(dev, act, x, bias, pre, rows, cols)
}

/// bf16 storage [`activation_backward_f32`].
pub fn activation_backward_bf16(
    dev: &Device,
    act: Activation,
    pre: &Buffer<bf16>,
    dy: &Buffer<bf16>,
    dx: &mut Buffer<bf16>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    backward_out_of_place(dev, act, pre, dy, dx, rows, cols)
}

/// bf16 storage [`activation_backward_inplace_f32`].
pub fn activation_backward_inplace_bf16(
    dev: &Device,
    act: Activation,
    pre: &Buffer<bf16>,
    d: &mut Buffer<bf16>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    backward_in_place(dev, act, pre, d, rows, cols)
}

/// [`bias_activation_forward_f32`] with a bf16 `out` (fp32 `x` and `pre`): the activation
/// written straight as the operand of the next bf16 product, with no conversion pass.
#[allow(clippy::too_many_arguments)]
pub fn bias_activation_forward_f32_bf16out(
    dev: &Device,
    act: Activation,
    x: &Buffer<f32>,
    bias: Option<&Buffer<f32>>,
    pre: Option<&mut Buffer<f32>>,
    out: &mut Buffer<half::bf16>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    assert_eq!(x.len(), rows * cols, "activation x is not [{rows}, {cols}]");
    assert!(
        out.len() >= rows * cols,
        "activation out is smaller than [{rows}, {cols}]"
    );
    forward_kernel(
        "prm_activation_forward_f32_bf16out",
        dev,
        act,
        x.address(),
        bias,
        pre,
        out.address(),
        rows,
        cols,
    )
}

/// [`activation_backward_f32`] with a bf16 `dx` (fp32 `pre` and `dy`): the gradient written
/// straight as the operand of the next bf16 product. `dx` may be longer than `rows · cols`.
pub fn activation_backward_f32_bf16out(
    dev: &Device,
    act: Activation,
    pre: &Buffer<f32>,
    dy: &Buffer<f32>,
    dx: &mut Buffer<half::bf16>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    assert_eq!(
        dy.len(),
        rows * cols,
        "activation dy is not [{rows}, {cols}]"
    );
    assert!(
        dx.len() >= rows * cols,
        "activation dx is smaller than [{rows}, {cols}]"
    );
    backward_kernel(
        "prm_activation_backward_f32_bf16out",
        dev,
        act,
        pre,
        dy.address(),
        dx.address(),
        rows,
        cols,
    )
}
