//! Launchers of `kernels/class_logits.cu`: rows L2-normalised in place, and the cosine logits of
//! normalised rows with class embeddings, in f64 rounded once to f32. Equal bit for bit to
//! [`crate::eval::ops::normalize_rows`] and [`crate::eval::ops::dot_logits`], so an evaluation
//! whose logits are formed on the device reports what one formed on the host does.
//!
//! ```
//! # fn main() -> Result<(), prm::gpu::GpuError> {
//! use prm::gpu::{kernels::class_logits::{class_logits_f32, normalize_rows_f32}, Device};
//! let dev = Device::sim();
//! // Two rows of width 2, and two classes.
//! let mut rows = dev.upload(&[3.0f32, 4.0, 0.0, 2.0])?;
//! normalize_rows_f32(&dev, &mut rows, 2, 2)?;
//! assert_eq!(dev.download(&rows)?, [0.6, 0.8, 0.0, 1.0]);
//! let classes = dev.upload(&[1.0f32, 0.0, 0.0, 1.0])?;
//! let mut logits = dev.alloc::<f32>(4)?;
//! class_logits_f32(&dev, &rows, &classes, 2, 2, 2, &mut logits)?;
//! assert_eq!(dev.download(&logits)?, [0.6, 0.8, 0.0, 1.0]);
//! # Ok(())
//! # }
//! ```

use crate::gpu::{Buffer, Device, GpuError, KernelArgs, LaunchConfig};

const NORMALIZE_THREADS: u32 = 128;
/// The kernel's tile: 64 rows × 64 classes, 4 × 4 of them a thread.
const TILE: usize = 64;
/// The kernel's block: 16 × 16 threads.
const THREADS: u32 = 16;
/// Row tiles a launch's grid holds (its y extent's limit); the kernel loops over the rest.
const MAX_ROW_TILES: usize = 65_535;

fn check_sizes(what: &str, n: usize, dim: usize) {
    assert!(
        n <= i32::MAX as usize && dim <= i32::MAX as usize,
        "{what}: {n} rows of {dim} exceed the kernel's 32-bit sizes"
    );
}

/// L2-normalises rows `0..n` of `x [.., dim]` in place (rows of norm 0 stay as they are), as
/// [`crate::eval::ops::normalize_rows`] does on the host.
pub fn normalize_rows_f32(
    dev: &Device,
    x: &mut Buffer<f32>,
    n: usize,
    dim: usize,
) -> Result<(), GpuError> {
    assert!(
        x.len() >= n * dim,
        "normalize_rows: {} elements for {n} rows of {dim}",
        x.len()
    );
    check_sizes("normalize_rows", n, dim);
    if n == 0 || dim == 0 {
        return Ok(());
    }
    let mut args = KernelArgs::new();
    args.output(x).i32(n as i32).i32(dim as i32);
    dev.launch(
        "prm_normalize_rows_f32",
        LaunchConfig::linear(
            n.div_ceil(NORMALIZE_THREADS as usize) as u32,
            NORMALIZE_THREADS,
            0,
        ),
        &mut args,
    )
}

/// `logits[r, k] = ⟨x_r, classes_k⟩` for rows `0..n` of `x [.., dim]` and the `c` rows of
/// `classes [c, dim]`, into `logits [n, c]`: each one f64 sum over `dim` in index order, rounded
/// to f32 once ([`crate::eval::ops::dot_logits`]'s bits).
pub fn class_logits_f32(
    dev: &Device,
    x: &Buffer<f32>,
    classes: &Buffer<f32>,
    n: usize,
    c: usize,
    dim: usize,
    logits: &mut Buffer<f32>,
) -> Result<(), GpuError> {
    class_logits_f32_in_row_tiles(dev, x, classes, n, c, dim, logits, MAX_ROW_TILES)
}

/// [`class_logits_f32`] with a grid of at most `max_row_tiles` row tiles, so that tests reach the
/// kernel's loop over the row tiles past the grid with a few rows.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn class_logits_f32_in_row_tiles(
    dev: &Device,
    x: &Buffer<f32>,
    classes: &Buffer<f32>,
    n: usize,
    c: usize,
    dim: usize,
    logits: &mut Buffer<f32>,
    max_row_tiles: usize,
) -> Result<(), GpuError> {
    assert!(
        x.len() >= n * dim,
        "class_logits: {} row elements for {n} rows of {dim}",
        x.len()
    );
    assert!(
        classes.len() >= c * dim,
        "class_logits: {} class elements for {c} classes of {dim}",
        classes.len()
    );
    assert!(
        logits.len() >= n * c,
        "class_logits: {} logits for {n} rows and {c} classes",
        logits.len()
    );
    check_sizes("class_logits", n.max(c), dim);
    if n == 0 || c == 0 {
        return Ok(());
    }
    let mut args = KernelArgs::new();
    args.input(x)
        .input(classes)
        .output(logits)
        .i32(n as i32)
        .i32(c as i32)
        .i32(dim as i32);
    dev.launch(
        "prm_class_logits_f32",
        LaunchConfig {
            // The kernel loops over the row tiles past the grid's y extent.
            grid: (
                c.div_ceil(TILE) as u32,
                n.div_ceil(TILE)
                    .clamp(1, max_row_tiles.clamp(1, MAX_ROW_TILES)) as u32,
                1,
            ),
            block: (THREADS, THREADS, 1),
            shared_bytes: 0,
        },
        &mut args,
    )
}
