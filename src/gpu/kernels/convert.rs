//! Launcher of `kernels/convert.cu`: fp32 → bf16 storage conversion (round to nearest even),
//! used by the engine's bf16 path before each matrix product with bf16 inputs.
//!
//! ```
//! # fn main() -> Result<(), prm::gpu::GpuError> {
//! use prm::gpu::{kernels::convert::to_bf16, Device};
//! let dev = Device::sim();
//! let x = dev.upload(&[1.0f32, 1.0 + 1.0 / 256.0, -3.5])?;
//! let mut y = dev.alloc::<half::bf16>(3)?;
//! to_bf16(&dev, &x, &mut y, 3)?;
//! assert_eq!(dev.download(&y)?[2], half::bf16::from_f32(-3.5));
//! # Ok(())
//! # }
//! ```

use half::bf16;

use crate::gpu::{Buffer, Device, GpuError, KernelArgs, LaunchConfig};

const THREADS: u32 = 256;
/// Grid cap: the kernel strides over the rest.
const MAX_BLOCKS: usize = 2048;

/// `out[i] = bf16(x[i])` for `i < n`, round to nearest even (elements of `out` past `n` are
/// left as they are).
pub fn to_bf16(
    dev: &Device,
    x: &Buffer<f32>,
    out: &mut Buffer<bf16>,
    n: usize,
) -> Result<(), GpuError> {
    assert!(
        x.len() >= n,
        "to_bf16: x has {} elements, needs {n}",
        x.len()
    );
    assert!(
        out.len() >= n,
        "to_bf16: out has {} elements, needs {n}",
        out.len()
    );
    if n == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    let mut args = KernelArgs::new();
    args.input(x).output(out).u64(n as u64);
    dev.launch(
        "prm_convert_to_bf16_f32",
        LaunchConfig::linear(blocks as u32, THREADS, 0),
        &mut args,
    )
}
