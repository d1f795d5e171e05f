//! The CUDA half of [`super::Stager`]: the copy stream, the two slots' pinned host and
//! persistent device buffers, and the events that order them against the compute stream.
//! Semantics of the cudarc calls used (0.19): `CudaEvent::record` / `CudaStream::wait` are
//! `cuEventRecord` / `cuStreamWaitEvent` (a device-side wait); an event never recorded counts
//! as complete for both `synchronize` and a wait; `alloc_pinned` is `cuMemHostAlloc` with
//! `CU_MEMHOSTALLOC_WRITECOMBINED` (fast for the host to write and the device to read, which is
//! all a staging buffer does).

use std::sync::Arc;

use cudarc::driver::{result as dr, CudaEvent, CudaStream, DriverError, PinnedHostSlice};
use rayon::prelude::*;

use crate::gpu::cuda::{cuda_err as err, CudaMemory};
use crate::gpu::GpuError;

/// Out of device memory, or another driver error.
fn alloc_err(context: &str, bytes: usize, e: DriverError) -> GpuError {
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        GpuError::OutOfMemory { bytes }
    } else {
        err(context, e)
    }
}

/// Out of page-locked host memory (the driver says "out of memory" for it too, but it is the
/// host's: a batch made smaller would not help), or another driver error.
fn pinned_err(bytes: usize, e: DriverError) -> GpuError {
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        GpuError::PinnedHostMemory { bytes }
    } else {
        err("allocating pinned host memory", e)
    }
}

/// A device allocation outside the stream-ordered pool (`cuMemAlloc`), so the copy stream can
/// fill it without any dependency on the compute stream's allocations.
struct DeviceSlot {
    ptr: u64,
    bytes: usize,
}

struct Slot {
    host: Option<PinnedHostSlice<u8>>,
    device: Option<DeviceSlot>,
    /// Recorded on the copy stream after the copy that read `host` and wrote `device`.
    copied: CudaEvent,
    /// Recorded on the compute stream after its copy out of `device` (the take).
    consumed: CudaEvent,
}

impl Slot {
    /// Waits (host) until neither stream uses the slot any more.
    fn idle(&self) -> Result<(), GpuError> {
        self.copied
            .synchronize()
            .map_err(|e| err("waiting for a staged copy", e))?;
        self.consumed
            .synchronize()
            .map_err(|e| err("waiting for a staged copy to be taken", e))
    }

    fn free_device(&mut self) {
        if let Some(d) = self.device.take() {
            // SAFETY: allocated by `malloc_sync` below; `idle` ran first, so no queued copy
            // reads or writes it. Errors are ignored: there is nothing to report them to.
            let _ = unsafe { dr::free_sync(d.ptr) };
        }
    }
}

/// Room for `bytes` with a quarter of headroom, so batches of slightly different sizes do not
/// reallocate every time.
fn grown(bytes: usize) -> usize {
    bytes + bytes / 4
}

pub(super) struct CudaLane {
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    slots: [Slot; 2],
    /// Pinned memory for downloads (cacheable, not write-combined: the host reads it), grown
    /// when needed. Only touched between a stream synchronisation and the next download.
    readback: Option<PinnedHostSlice<u8>>,
    /// Pinned allocations larger than this fail as the driver's do when host memory runs out
    /// (tests of the fallbacks; `usize::MAX` otherwise).
    pinned_limit: usize,
}

impl CudaLane {
    pub(super) fn new(compute: &Arc<CudaStream>) -> Result<Self, GpuError> {
        let ctx = compute.context();
        let copy = ctx
            .new_stream()
            .map_err(|e| err("creating the copy stream", e))?;
        let slot = || -> Result<Slot, GpuError> {
            Ok(Slot {
                host: None,
                device: None,
                copied: ctx
                    .new_event(None)
                    .map_err(|e| err("creating an event", e))?,
                consumed: ctx
                    .new_event(None)
                    .map_err(|e| err("creating an event", e))?,
            })
        };
        Ok(CudaLane {
            compute: compute.clone(),
            copy,
            slots: [slot()?, slot()?],
            readback: None,
            pinned_limit: usize::MAX,
        })
    }

    pub(super) fn limit_pinned_memory(&mut self, bytes: usize) {
        self.pinned_limit = bytes;
    }

    /// `bytes` of pinned host memory (`flags` as `cuMemHostAlloc`'s), uninitialised.
    fn alloc_pinned(&self, bytes: usize, flags: u32) -> Result<PinnedHostSlice<u8>, GpuError> {
        if bytes > self.pinned_limit {
            return Err(GpuError::PinnedHostMemory { bytes });
        }
        // SAFETY: callers write the contents before anything reads them.
        unsafe {
            self.compute
                .context()
                .alloc_pinned_with_flags::<u8>(bytes, flags)
        }
        .map_err(|e| pinned_err(bytes, e))
    }

    fn bind(&self) -> Result<(), GpuError> {
        self.compute
            .context()
            .bind_to_thread()
            .map_err(|e| err("binding the CUDA context", e))
    }

    /// Packs `parts` into slot `i`'s pinned buffer and queues its copy on the copy stream.
    pub(super) fn stage(&mut self, i: usize, parts: &[&[f32]]) -> Result<(), GpuError> {
        self.bind()?;
        let bytes: usize = parts.iter().map(|p| std::mem::size_of_val(*p)).sum();
        // The pinned buffer is rewritten below: the copy that last read it must be done.
        self.slots[i]
            .copied
            .synchronize()
            .map_err(|e| err("waiting for a staged copy", e))?;
        if self.slots[i].host.as_ref().is_none_or(|h| h.len() < bytes) {
            self.slots[i].host = None;
            // Written below before any copy reads it.
            let host = self.alloc_pinned(
                grown(bytes),
                cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED,
            )?;
            self.slots[i].host = Some(host);
        }
        let slot = &mut self.slots[i];
        if slot.device.as_ref().is_none_or(|d| d.bytes < bytes) {
            slot.idle()?;
            slot.free_device();
            let size = grown(bytes).max(1);
            // SAFETY: a plain allocation in the bound context.
            let ptr = unsafe { dr::malloc_sync(size) }
                .map_err(|e| alloc_err("allocating a staging buffer", size, e))?;
            slot.device = Some(DeviceSlot { ptr, bytes: size });
        }
        let host = slot
            .host
            .as_mut()
            .expect("allocated above")
            .as_mut_slice()
            .map_err(|e| err("waiting for pinned host memory", e))?;
        let sources: Vec<&[u8]> = parts.iter().map(|p| bytemuck::cast_slice(p)).collect();
        pack(&mut host[..bytes], &sources);
        let device = slot.device.as_ref().expect("allocated above").ptr;
        // The device slot is free once the compute stream has taken what it held before (a
        // device-side wait; one batch back, so normally long passed).
        self.copy
            .wait(&slot.consumed)
            .map_err(|e| err("ordering a staged copy", e))?;
        // SAFETY: `device` holds at least `bytes` bytes; the pinned source stays alive and
        // unwritten until `copied` completes (checked before every rewrite and before drop).
        unsafe { dr::memcpy_htod_async(device, &host[..bytes], self.copy.cu_stream()) }
            .map_err(|e| err("staging a copy to the device", e))?;
        slot.copied
            .record(&self.copy)
            .map_err(|e| err("recording a staged copy", e))
    }

    /// Makes the compute stream wait for slot `i`'s copy, then copies its first `bytes` bytes
    /// into `dst` on the compute stream. Returns whether the copy was still running.
    pub(super) fn take(
        &mut self,
        i: usize,
        dst: &mut CudaMemory,
        bytes: usize,
    ) -> Result<bool, GpuError> {
        self.bind()?;
        let slot = &self.slots[i];
        let device = slot.device.as_ref().expect("a staged slot has memory");
        assert!(bytes <= device.bytes && bytes <= dst.len());
        let pending = !slot
            .copied
            .try_is_complete()
            .map_err(|e| err("querying a staged copy", e))?;
        self.compute
            .wait(&slot.copied)
            .map_err(|e| err("waiting for a staged copy", e))?;
        // SAFETY: both allocations hold at least `bytes` bytes (checked); `dst` is exclusively
        // borrowed and lives on the compute stream, where this copy is ordered.
        unsafe {
            dr::memcpy_dtod_async(dst.address(), device.ptr, bytes, self.compute.cu_stream())
        }
        .map_err(|e| err("taking a staged copy", e))?;
        slot.consumed
            .record(&self.compute)
            .map_err(|e| err("recording a taken copy", e))?;
        Ok(pending)
    }
}

impl CudaLane {
    /// Copies the first bytes of `src` into `outs`, one after another, after all work queued on
    /// the compute stream, through the pinned readback buffer (one DMA straight into
    /// page-locked memory, then one host copy per piece, instead of the driver's staging of
    /// pageable memory). `false`, with nothing copied, when the readback buffer could not be
    /// allocated for lack of host memory: the caller downloads the ordinary way.
    pub(super) fn download(
        &mut self,
        src: &CudaMemory,
        outs: &mut [&mut [u8]],
    ) -> Result<bool, GpuError> {
        self.bind()?;
        let bytes: usize = outs.iter().map(|o| o.len()).sum();
        assert!(bytes <= src.len());
        if bytes == 0 {
            return Ok(true);
        }
        if self.readback.as_ref().is_none_or(|r| r.len() < bytes) {
            self.readback = None;
            // Written by the copy below before the host reads it. Cacheable (flags 0).
            match self.alloc_pinned(grown(bytes), 0) {
                Ok(pinned) => self.readback = Some(pinned),
                Err(GpuError::PinnedHostMemory { .. }) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        let pinned = self
            .readback
            .as_mut()
            .expect("allocated above")
            .as_mut_slice()
            .map_err(|e| err("waiting for pinned host memory", e))?;
        // SAFETY: `src` holds at least `bytes` bytes (checked); the stream is synchronised
        // before the host reads `pinned` or the buffer can be reused.
        unsafe {
            dr::memcpy_dtoh_async(
                &mut pinned[..bytes],
                src.address(),
                self.compute.cu_stream(),
            )
        }
        .map_err(|e| err("copy to host", e))?;
        self.compute
            .synchronize()
            .map_err(|e| err("copy to host", e))?;
        // Fresh host vectors fault their pages in as the copy touches them, which one thread
        // does at a fraction of memory bandwidth.
        unpack(&pinned[..bytes], outs);
        Ok(true)
    }
}

impl Drop for CudaLane {
    fn drop(&mut self) {
        let _ = self.bind();
        for slot in &mut self.slots {
            // Pinned buffers are freed by their own drop, after it waits for their event; the
            // copies that read them are ordered by `copied`, waited for here.
            let _ = slot.idle();
            slot.free_device();
        }
    }
}

/// Copies `parts` one after another into `dst` (their total length), one part per task: the
/// staging of a batch is one host copy of tens of megabytes on the engine worker's path.
fn pack(dst: &mut [u8], parts: &[&[u8]]) {
    let mut pieces = Vec::with_capacity(parts.len());
    let mut rest = dst;
    for p in parts {
        let (piece, tail) = rest.split_at_mut(p.len());
        pieces.push(piece);
        rest = tail;
    }
    pieces
        .into_par_iter()
        .zip(parts)
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Copies consecutive pieces of `src` into `outs` (their total length), one piece per task.
fn unpack(src: &[u8], outs: &mut [&mut [u8]]) {
    let mut pieces = Vec::with_capacity(outs.len());
    let mut rest = src;
    for out in outs.iter() {
        let (piece, tail) = rest.split_at(out.len());
        pieces.push(piece);
        rest = tail;
    }
    outs.par_iter_mut()
        .zip(pieces)
        .for_each(|(d, s)| d.copy_from_slice(s));
}

#[cfg(test)]
mod tests {
    use super::{pack, unpack};

    #[test]
    fn pack_and_unpack_place_pieces_in_order() {
        let parts: [&[u8]; 4] = [&[1, 2, 3], &[], &[4], &[5, 6]];
        let mut packed = [0u8; 6];
        pack(&mut packed, &parts);
        assert_eq!(packed, [1, 2, 3, 4, 5, 6]);
        let (mut a, mut b, mut c) = ([0u8; 2], [0u8; 0], [0u8; 4]);
        unpack(&packed, &mut [&mut a, &mut b, &mut c]);
        assert_eq!((a, c), ([1, 2], [3, 4, 5, 6]));
    }
}
