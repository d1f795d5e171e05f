//! Uploads staged ahead of the work that needs them: host data packed into pinned memory and
//! copied to the device on a **copy stream**, while the compute stream runs earlier work.
//!
//! A [`Stager`] has two slots, used in turn, each with:
//! - a pinned (page-locked) host buffer, reused and grown when a larger upload comes;
//! - a persistent device buffer, allocated with plain `cuMemAlloc`, *not* from the compute
//!   stream's stream-ordered pool;
//! - the event of the copy that last filled it (recorded on the copy stream) and the event of
//!   the compute stream's last read of it.
//!
//! # Rules
//! - **The copy never waits for compute work.** A stream-ordered allocation made for the copy
//!   after compute work was queued could reuse memory the compute stream frees later, and the
//!   pool would make the copy wait for that work. The slots' device buffers are therefore
//!   persistent allocations outside the pool; the copy stream waits only for the compute
//!   stream's last read of *the same slot*, which two slots in turn put one batch back (done by
//!   the time the next batch is staged).
//! - **Staged data is reachable only through [`Stager::take`]**, which makes the compute stream
//!   wait for the slot's copy event (on the device, never a host sync) and then copies the data,
//!   in compute-stream order, into a buffer of the caller's. The slot's device buffer is never
//!   handed out, so no kernel can read it before its copy is done, and the slot is free again
//!   as soon as the compute stream has passed that copy (a second event).
//! - **Before a pinned host slot is rewritten**, the host waits for the event of the copy that
//!   last read it (normally long complete).
//! - **Keys, not addresses.** A staged upload carries the caller's key and the length of every
//!   part; [`Stager::take`] hands it over only for an equal key and equal lengths, else `None`
//!   (the caller uploads normally). Staging into a slot first forgets what it held, so a failed
//!   or overwritten staging can never be taken.
//!
//! The stager also keeps a pinned readback buffer for downloads ([`Stager::download_split`]),
//! so the final images of a batch come back in one DMA.
//!
//! Under the simulator there is no concurrency: a staged upload is packed into host memory and
//! written by [`Stager::take`] (copies are synchronous, events trivially complete), so the
//! whole path, keys and slots included, runs in tests.

mod cuda;

use super::device::{size_bucket, Backend, Memory};
use super::timeline::OpKind;
use super::{Buffer, Device, Element, GpuError};

/// What [`Stager::take`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The staged copy had not finished when it was taken: the compute stream waits for it
    /// (never on the simulator).
    pub copy_pending: bool,
}

/// Where the slots live.
enum Lane {
    /// Packed host copies, written to the device when taken.
    Sim([Vec<f32>; 2]),
    Cuda(cuda::CudaLane),
}

/// What one slot holds: the key and part lengths of its upload.
struct Staged<K> {
    key: K,
    lens: Vec<usize>,
}

/// Two-slot staging of packed `f32` uploads on a copy stream (see the module docs).
pub struct Stager<K> {
    dev: Device,
    lane: Lane,
    staged: [Option<Staged<K>>; 2],
    /// The slot the next [`Stager::stage`] fills.
    next: usize,
}

impl<K: PartialEq> Stager<K> {
    /// A stager for `dev`: on CUDA, a copy stream and four events (memory comes with the first
    /// upload).
    pub fn new(dev: &Device) -> Result<Self, GpuError> {
        let lane = match &*dev.backend {
            Backend::Sim(_) => Lane::Sim([Vec::new(), Vec::new()]),
            Backend::Cuda(c) => Lane::Cuda(cuda::CudaLane::new(c.compute_stream())?),
        };
        Ok(Stager {
            dev: dev.clone(),
            lane,
            staged: [None, None],
            next: 0,
        })
    }

    /// Packs `parts` (back to back) into the next slot and starts its copy to the device on the
    /// copy stream; the host returns as soon as the copy is queued. The slot's previous upload
    /// is forgotten first.
    pub fn stage(&mut self, key: K, parts: &[&[f32]]) -> Result<(), GpuError> {
        self.dev.refuse_in_capture("staging an upload")?;
        let slot = self.next;
        self.next ^= 1;
        self.staged[slot] = None;
        let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        match &mut self.lane {
            Lane::Sim(slots) => {
                let packed = &mut slots[slot];
                packed.clear();
                for p in parts {
                    packed.extend_from_slice(p);
                }
            }
            Lane::Cuda(lane) => lane.stage(slot, parts)?,
        }
        self.staged[slot] = Some(Staged { key, lens });
        Ok(())
    }

    /// The upload staged under `key` with parts of `lens` elements, copied into `dst` (their
    /// total length) after the compute stream waited for the staged copy. `None` (and `dst`
    /// untouched) when no such upload is staged.
    pub fn take(
        &mut self,
        key: &K,
        lens: &[usize],
        dst: &mut Buffer<f32>,
    ) -> Result<Option<Taken>, GpuError> {
        self.dev.refuse_in_capture("taking a staged upload")?;
        let Some(slot) = (0..2).find(|&s| {
            self.staged[s]
                .as_ref()
                .is_some_and(|st| &st.key == key && st.lens == lens)
        }) else {
            return Ok(None);
        };
        let total: usize = lens.iter().sum();
        assert_eq!(
            dst.len(),
            total,
            "staged upload of {total} elements taken into a buffer of {}",
            dst.len()
        );
        // Taken once: a second take of the same key uploads normally.
        self.staged[slot] = None;
        let copy_pending = match (&mut self.lane, &mut dst.mem) {
            (Lane::Sim(slots), _) => {
                self.dev.write(dst, &slots[slot])?;
                false
            }
            // Stamped like any copy, so a device timeline does not show it as idle time.
            (Lane::Cuda(lane), Memory::Cuda(m)) => self.dev.timed_op(
                OpKind::Copy,
                || {
                    (
                        format!("staged copy taken ({})", size_bucket(total * 4)),
                        0.0,
                    )
                },
                || lane.take(slot, m, total * 4),
            )?,
            (Lane::Cuda(_), Memory::Host { .. }) => {
                unreachable!("simulator buffer taken from a CUDA stager")
            }
        };
        Ok(Some(Taken { copy_pending }))
    }

    /// Copies `src` to the host after all work queued on the compute stream, cut into pieces of
    /// `lens` elements (which must add up to at most `src.len()`): one host vector per image of
    /// a packed batch, with no whole-batch vector in between. On CUDA it goes through a pinned
    /// readback buffer kept by the stager (grown when needed), so the copy is one DMA at full
    /// link speed; under the simulator it is a plain download.
    pub fn download_split<T: Element>(
        &mut self,
        src: &Buffer<T>,
        lens: &[usize],
    ) -> Result<Vec<Vec<T>>, GpuError> {
        self.dev
            .refuse_in_capture("copying device data to the host")?;
        let total: usize = lens.iter().sum();
        assert!(
            total <= src.len(),
            "download of {total} elements from a buffer of {}",
            src.len()
        );
        match (&mut self.lane, &src.mem) {
            (Lane::Cuda(lane), Memory::Cuda(m)) => {
                let mut outs: Vec<Vec<T>> = lens.iter().map(|&n| vec![T::zeroed(); n]).collect();
                let mut pieces: Vec<&mut [u8]> = outs
                    .iter_mut()
                    .map(|o| bytemuck::cast_slice_mut(o.as_mut_slice()))
                    .collect();
                let bytes = pieces.iter().map(|p| p.len()).sum::<usize>();
                let pinned = self.dev.timed_op(
                    OpKind::Download,
                    || (format!("pinned download ({})", size_bucket(bytes)), 0.0),
                    || lane.download(m, &mut pieces),
                )?;
                if pinned {
                    return Ok(outs);
                }
                // No pinned readback buffer (host memory is short): the ordinary download.
                drop(outs);
                self.dev.download_split(src, lens)
            }
            _ => self.dev.download_split(src, lens),
        }
    }

    /// Makes every pinned host allocation of more than `bytes` fail as the driver's does when
    /// page-locked memory runs out ([`GpuError::PinnedHostMemory`]), so tests can reach the
    /// fallbacks: staging then fails (callers upload normally) and
    /// [`Stager::download_split`] downloads the ordinary way. No effect under the simulator,
    /// which has no pinned memory.
    #[doc(hidden)]
    pub fn limit_pinned_memory(&mut self, bytes: usize) {
        if let Lane::Cuda(lane) = &mut self.lane {
            lane.limit_pinned_memory(bytes);
        }
    }

    /// Whether an upload is staged under `key` (tests and diagnostics).
    pub fn holds(&self, key: &K) -> bool {
        self.staged.iter().flatten().any(|s| &s.key == key)
    }
}
