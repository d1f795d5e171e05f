//! Launcher of `kernels/drift.cu`: per-token sums of the drift between clean and adversarial
//! token rows of one layer, in f64, equal bit for bit to [`crate::eval::ops::token_sums`].
//!
//! ```
//! # fn main() -> Result<(), prm::gpu::GpuError> {
//! use prm::gpu::{kernels::drift::token_sums_f32, Device};
//! let dev = Device::sim();
//! // Two rows of width 2: clean (1, 0), adversarial (1, 1).
//! let feats = dev.upload(&[1.0f32, 0.0, 1.0, 1.0])?;
//! let pairs = dev.upload(&[0i32, 1])?;
//! let mut out = dev.alloc::<f64>(4)?;
//! token_sums_f32(&dev, &feats, &pairs, 1, 2, &mut out, 0)?;
//! assert_eq!(dev.download(&out)?, [1.0, 2.0, 1.0, 1.0]); // a·c, a·a, c·c, (a − c)²
//! # Ok(())
//! # }
//! ```

use crate::gpu::{Buffer, Device, GpuError, KernelArgs, LaunchConfig};

const THREADS: u32 = 128;

/// For each `r < n`: the sums of the clean row `pairs[2r]` and the adversarial row `pairs[2r+1]`
/// of `feats [rows, dim]` into `out[(out_row0 + r) · 4 ..][..4]`: a·c, a·a, c·c, (a − c)², each
/// over the row in index order in f64. The rest of `out` is left as it is.
pub fn token_sums_f32(
    dev: &Device,
    feats: &Buffer<f32>,
    pairs: &Buffer<i32>,
    n: usize,
    dim: usize,
    out: &mut Buffer<f64>,
    out_row0: usize,
) -> Result<(), GpuError> {
    assert!(
        pairs.len() >= 2 * n,
        "token_sums: {} pair entries for {n} rows",
        pairs.len()
    );
    assert!(
        out.len() >= 4 * (out_row0 + n),
        "token_sums: out has {} elements, needs {}",
        out.len(),
        4 * (out_row0 + n)
    );
    assert!(
        dim > 0 && feats.len().is_multiple_of(dim),
        "token_sums: {} features are not rows of {dim}",
        feats.len()
    );
    assert!(
        n <= i32::MAX as usize && dim <= i32::MAX as usize,
        "token_sums: {n} rows of {dim} exceed the kernel's 32-bit sizes"
    );
    if n == 0 {
        return Ok(());
    }
    let mut args = KernelArgs::new();
    args.input(feats)
        .input(pairs)
        .output(out)
        .i32(n as i32)
        .i32(dim as i32)
        .u64(out_row0 as u64);
    dev.launch(
        "prm_drift_token_sums_f32",
        LaunchConfig::linear(n.div_ceil(THREADS as usize) as u32, THREADS, 0),
        &mut args,
    )
}
