//! Launcher for `kernels/save.cu`: a packed batch of adversarial images quantised the way
//! `prm attack` saves them, on the device that attacked them, so that only the 8-bit levels
//! come back (a quarter of the float read-back) and the evaluation of the saved images reads
//! their float values where they already are.
//!
//! The twin is [`crate::io::quantize_for_saving`], bit for bit: the same levels, the same float
//! values (`level / 255`), and the same L∞ in 1/255 units.

use super::update::ImageBatch;
use crate::gpu::{Buffer, Device, GpuError, KernelArgs, LaunchConfig};

/// Threads per block: `SAVE_BLOCK` in save.cu, the size of its shared reduction array.
const SAVE_BLOCK: u32 = 256;
/// Elements per thread: `SAVE_PER_THREAD` in save.cu.
const SAVE_PER_THREAD: u32 = 8;

/// The device buffers [`quantize_for_saving_f32`] writes.
pub struct SavedOnDevice {
    /// The 8-bit levels, packed like the images.
    pub levels: Buffer<u8>,
    /// `level / 255` as f32, packed like the images.
    pub values: Buffer<f32>,
    /// Per image: the bits of the f64 L∞ distance to the clean image, in 1/255 units.
    pub linf_bits: Buffer<u64>,
}

impl SavedOnDevice {
    /// Buffers for `batch` (their contents are written by [`quantize_for_saving_f32`]).
    pub fn alloc(dev: &Device, batch: &ImageBatch) -> Result<Self, GpuError> {
        Ok(SavedOnDevice {
            levels: dev.alloc(batch.total())?,
            values: dev.alloc(batch.total())?,
            linf_bits: dev.alloc(batch.images())?,
        })
    }

    /// Each image's L∞ (1/255 units), read back.
    pub fn linf_255(&self, dev: &Device) -> Result<Vec<f64>, GpuError> {
        Ok(dev
            .download(&self.linf_bits)?
            .into_iter()
            .map(f64::from_bits)
            .collect())
    }
}

/// Quantises the packed `adv` within each image's ε of `clean` ([`ImageBatch::eps`]) into
/// `out`: levels, their float values and each image's L∞, exactly as
/// [`crate::io::quantize_for_saving`] does image by image.
pub fn quantize_for_saving_f32(
    dev: &Device,
    batch: &ImageBatch,
    adv: &Buffer<f32>,
    clean: &Buffer<f32>,
    out: &mut SavedOnDevice,
) -> Result<(), GpuError> {
    batch.check("quantize adv", adv.len());
    batch.check("quantize clean", clean.len());
    batch.check("quantize levels", out.levels.len());
    batch.check("quantize values", out.values.len());
    assert_eq!(
        out.linf_bits.len(),
        batch.images(),
        "quantize: one L∞ per image"
    );
    // The kernel folds each block's maximum into its image's with atomicMax: start from 0.
    dev.zero(&mut out.linf_bits)?;
    let per_block = (SAVE_BLOCK * SAVE_PER_THREAD) as usize;
    let cfg = LaunchConfig {
        grid: (
            batch.max_len().div_ceil(per_block).max(1) as u32,
            batch.images() as u32,
            1,
        ),
        block: (SAVE_BLOCK, 1, 1),
        shared_bytes: 0,
    };
    let mut args = KernelArgs::new();
    args.output(&mut out.levels)
        .output(&mut out.values)
        .output(&mut out.linf_bits)
        .input(adv)
        .input(clean)
        .input(&batch.offsets)
        .input(&batch.eps);
    dev.launch("prm_save_quantize_f32", cfg, &mut args)
}
