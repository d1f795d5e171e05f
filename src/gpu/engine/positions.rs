//! Position embeddings on the device: one buffer per patch grid, interpolated on the host and
//! uploaded the first time a batch has that grid, from which each batch geometry's packed
//! table `[ΣT_i, D]` is assembled by device-to-device copies.
//!
//! Why not pack on the host: under dynamic scale every step is a new geometry, and its table is
//! as large as an fp32 layer of the batch (69 MB for 32 paper images at their mean 700 tokens).
//! Built on the host and uploaded from pageable memory, that was a host copy of the whole
//! table every step, and a copy that large cannot be staged ahead: the driver waits for the
//! stream to reach it, so the device drained before every step's first forward. A paper run
//! sees a few dozen grids, each uploaded once (at most 3.7 MB, 1,201 tokens of ViT-B).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::gpu::{Buffer, Device, GpuError};
use crate::reference::resize::{interpolate_position_embedding, leading_rows};

/// By default at most this many bytes of grids are kept; a grid that would pass it starts the
/// cache afresh (geometries built earlier hold their own copies).
const MAX_CACHED_BYTES: usize = 256 << 20;

pub(crate) struct DevicePositions {
    /// The model's embedding `[1 + grid·grid, dim]` (host; `[grid·grid, dim]` without a class
    /// token).
    base: Arc<Vec<f32>>,
    dim: usize,
    grid: usize,
    cache: Mutex<Cached>,
    /// Bytes of grids kept ([`MAX_CACHED_BYTES`] outside tests).
    limit: usize,
}

#[derive(Default)]
struct Cached {
    by_grid: HashMap<(usize, usize), Arc<Buffer<f32>>>,
    bytes: usize,
}

impl DevicePositions {
    /// `base` is the model's position embedding `[1 + grid·grid, dim]` (`[grid·grid, dim]`
    /// without a class token).
    pub(crate) fn new(base: Vec<f32>, dim: usize, grid: usize) -> Self {
        leading_rows(base.len(), dim, grid);
        DevicePositions {
            base: Arc::new(base),
            dim,
            grid,
            cache: Mutex::new(Cached::default()),
            limit: MAX_CACHED_BYTES,
        }
    }

    /// The embedding of a `gh × gw` grid on the device, `[1 + gh·gw, dim]` (`[gh·gw, dim]`
    /// without a class token; the reference engine's interpolation: bicubic, align_corners =
    /// false, CLS row kept).
    pub(crate) fn grid(
        &self,
        dev: &Device,
        gh: usize,
        gw: usize,
    ) -> Result<Arc<Buffer<f32>>, GpuError> {
        if let Some(b) = self.lock().by_grid.get(&(gh, gw)) {
            return Ok(b.clone());
        }
        let host = interpolate_position_embedding(&self.base, self.dim, self.grid, gh, gw);
        let buf = Arc::new(dev.upload(&host)?);
        let mut cache = self.lock();
        if cache.bytes + buf.bytes() > self.limit {
            *cache = Cached::default();
        }
        cache.bytes += buf.bytes();
        cache.by_grid.insert((gh, gw), buf.clone());
        Ok(buf)
    }

    /// Bytes of grids held on the device.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::resize::PositionEmbeddingCache;

    #[test]
    fn device_grids_are_the_reference_interpolation_uploaded_once() {
        let (dim, grid) = (5, 4);
        let base: Vec<f32> = (0..(1 + grid * grid) * dim)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let dev = Device::sim();
        let positions = DevicePositions::new(base.clone(), dim, grid);
        let reference = PositionEmbeddingCache::new(base, dim, grid);
        for (gh, gw) in [(4, 4), (3, 7), (1, 1), (6, 2), (3, 7)] {
            let got = dev
                .download(&*positions.grid(&dev, gh, gw).unwrap())
                .unwrap();
            let want = reference.get(gh, gw);
            let same = got
                .iter()
                .zip(want.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same && got.len() == want.len(), "grid {gh}×{gw}");
        }
        // Four distinct grids, the repeated one uploaded once.
        let rows = 17 + 22 + 2 + 13;
        assert_eq!(positions.bytes(), rows * dim * 4);
        let a = positions.grid(&dev, 3, 7).unwrap();
        let b = positions.grid(&dev, 3, 7).unwrap();
        assert!(Arc::ptr_eq(&a, &b));

        // Bounded: a grid that would pass the bound starts the cache afresh, and buffers handed
        // out before stay valid.
        let bounded = DevicePositions {
            limit: 30 * dim * 4,
            ..DevicePositions::new(reference.base().to_vec(), dim, grid)
        };
        let first = bounded.grid(&dev, 3, 7).unwrap(); // 22 rows
        bounded.grid(&dev, 6, 2).unwrap(); // 13 more: past 30
        assert_eq!(bounded.bytes(), 13 * dim * 4);
        let again = bounded.grid(&dev, 3, 7).unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(
            dev.download(&*first).unwrap(),
            dev.download(&*again).unwrap()
        );
    }
}
