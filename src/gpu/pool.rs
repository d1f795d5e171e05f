//! A caching allocator for the engine's activations: buffers are returned to the pool when
//! dropped and handed out again for the next request of the same size class, so a run stops
//! allocating device memory after its first steps. Size classes (four per power of two, at
//! most 25% slack) matter under dynamic scale, where every step has a new geometry and exact
//! lengths would never repeat: each miss costs an allocation (stream-ordered, from the CUDA
//! memory pool, and with no fill pass: the contents are undefined anyway).
//!
//! Buffers come back with undefined contents. Under the simulator they are filled with NaN on
//! every hand-out, so any kernel or engine code that reads memory it has not written fails the
//! engine tests instead of silently reading a previous step's values; [`BufferPool::take_zeroed`]
//! is for the few buffers that are accumulated into.
//!
//! **Graphs.** Between [`BufferPool::begin_capture`] and [`BufferPool::end_capture`] (around a
//! [`Device::capture`](super::Device::capture)) every buffer returned to the pool goes to the
//! capture's arena instead of the free lists, and later takes in the same capture reuse the
//! arena first: the captured work reuses memory exactly as a direct run does, in stream order.
//! The arena then belongs to the graph ([`GraphMemory`]): the pool never hands those buffers
//! to anyone else, and [`BufferPool::release`] cannot free them; they come back to the free
//! lists when the graph is dropped. A capture never allocates
//! (an allocation would be part of the graph): a take that finds nothing cached fails with
//! [`GpuError::Capture`]. Running the same work once directly first, with
//! [`BufferPool::keep_returns`] on, leaves every buffer it needs in the free lists.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use super::{Buffer, Device, GpuError};

/// Free buffers by size class (elements), with a bound on the bytes kept.
struct Free {
    by_len: HashMap<usize, Vec<Buffer<f32>>>,
    bytes: usize,
    /// The bound on `bytes` ([`MAX_CACHED_BYTES`] unless set).
    limit: usize,
    /// Keep every returned buffer, beyond the bound (the direct run before a capture).
    keep_returns: bool,
    /// The arena of a capture in progress.
    capture: Option<Arena>,
}

/// Buffers returned during a capture (free for reuse later in the same capture, and owned by
/// the graph afterwards), and the number of buffers taken during the capture still on loan.
#[derive(Default)]
struct Arena {
    by_len: HashMap<usize, Vec<Buffer<f32>>>,
    loans: usize,
}

/// The buffers a captured graph uses, held for the graph's lifetime (see the module docs).
/// Dropped after the graph, they go back to the pool's free lists (within its bound), so the
/// next batch reuses them in stream order instead of allocating again.
pub struct GraphMemory {
    buffers: Vec<Buffer<f32>>,
    free: Arc<Mutex<Free>>,
}

impl Drop for GraphMemory {
    fn drop(&mut self) {
        let Ok(mut free) = self.free.lock() else {
            return;
        };
        for b in self.buffers.drain(..) {
            free.give_back(b);
        }
    }
}

impl Free {
    /// Returns a buffer to the free lists outside a capture: kept when its memory is a size
    /// class and the bound allows (or returns are being kept), freed otherwise.
    fn give_back(&mut self, buf: Buffer<f32>) {
        let class = buf.capacity_bytes() / std::mem::size_of::<f32>();
        let keep = self.keep_returns || self.bytes + buf.capacity_bytes() <= self.limit;
        // Adopted buffers of other lengths would never be handed out again: let them go.
        if size_class(class) == class && keep {
            self.bytes += buf.capacity_bytes();
            self.by_len.entry(class).or_default().push(buf);
        }
    }
}

impl GraphMemory {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.buffers.iter().map(|b| b.capacity_bytes()).sum()
    }
}

/// By default at most this many bytes are kept in the free lists; beyond it, returned buffers
/// are freed ([`BufferPool::set_cache_limit`]).
const MAX_CACHED_BYTES: usize = 4 << 30;

pub struct BufferPool {
    dev: Device,
    free: Arc<Mutex<Free>>,
}

/// A buffer on loan from a [`BufferPool`]; it derefs to [`Buffer`] and goes back on drop.
pub struct Pooled {
    buf: Option<Buffer<f32>>,
    free: Arc<Mutex<Free>>,
    /// Taken during a capture (counted in its arena's loans).
    in_capture: bool,
}

impl Deref for Pooled {
    type Target = Buffer<f32>;
    fn deref(&self) -> &Buffer<f32> {
        self.buf.as_ref().expect("present until drop")
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Buffer<f32> {
        self.buf.as_mut().expect("present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let Ok(mut free) = self.free.lock() else {
            return;
        };
        if let Some(arena) = free.capture.as_mut() {
            // Whatever is returned during a capture may be used by the graph: it stays in the
            // arena, whatever its size.
            if self.in_capture {
                arena.loans = arena.loans.saturating_sub(1);
            }
            let class = buf.capacity_bytes() / std::mem::size_of::<f32>();
            arena.by_len.entry(class).or_default().push(buf);
            return;
        }
        free.give_back(buf);
    }
}

/// The pool's allocation length for a request of `len` f32 elements: `len` rounded up to the
/// next of 1, 1.25, 1.5, 1.75 × a power of two (lengths up to 16 are their own class).
pub fn size_class(len: usize) -> usize {
    if len <= 16 {
        return len;
    }
    let top = usize::BITS - 1 - len.leading_zeros(); // 2^top <= len
    let quarter = 1usize << (top - 2);
    len.div_ceil(quarter) * quarter
}

impl BufferPool {
    pub fn new(dev: &Device) -> Self {
        BufferPool {
            dev: dev.clone(),
            free: Arc::new(Mutex::new(Free {
                by_len: HashMap::new(),
                bytes: 0,
                limit: MAX_CACHED_BYTES,
                keep_returns: false,
                capture: None,
            })),
        }
    }

    /// A buffer of `len` elements with undefined contents (NaN under the simulator).
    pub fn take(&self, len: usize) -> Result<Pooled, GpuError> {
        let class = size_class(len);
        let (cached, in_capture) = {
            let mut free = self.free.lock().expect("pool lock");
            let free = &mut *free;
            let from_arena = free
                .capture
                .as_mut()
                .and_then(|a| a.by_len.get_mut(&class).and_then(Vec::pop));
            let buf = from_arena.or_else(|| {
                let b = free.by_len.get_mut(&class).and_then(Vec::pop);
                if let Some(b) = &b {
                    free.bytes -= b.capacity_bytes();
                }
                b
            });
            let in_capture = match free.capture.as_mut() {
                Some(arena) => {
                    if buf.is_none() {
                        return Err(GpuError::Capture {
                            what: format!(
                                "allocating a pool buffer of {class} elements (nothing cached: \
                                 run the captured work once directly first, with keep_returns)"
                            ),
                        });
                    }
                    arena.loans += 1;
                    true
                }
                None => false,
            };
            (buf, in_capture)
        };
        // A miss allocates without a fill pass (alloc_undefined poisons under the simulator);
        // a cached buffer holds its last user's values, so the simulator poisons it here.
        let (mut buf, poison) = match cached {
            Some(b) => (b, self.dev.is_sim()),
            None => (self.allocate(class)?, false),
        };
        buf.set_len(len);
        let mut pooled = Pooled {
            buf: Some(buf),
            free: self.free.clone(),
            in_capture,
        };
        if poison {
            self.dev.poison(&mut pooled)?;
        }
        Ok(pooled)
    }

    /// A new buffer of `class` elements. When the device is out of memory while the free lists
    /// hold buffers (of other size classes: a new geometry's), they are freed and the
    /// allocation is tried once more, as a caching allocator must: otherwise memory the pool
    /// holds for nobody would fail the batch. Not while returns are kept for a capture: the
    /// capture needs them (without them it fails, the step is warmed up and captured again,
    /// and a second failure turns graphs off); the out-of-memory error makes the campaign
    /// retry in smaller batches instead.
    fn allocate(&self, class: usize) -> Result<Buffer<f32>, GpuError> {
        match self.dev.alloc_undefined(class) {
            Err(GpuError::OutOfMemory { .. }) if self.releasable() => {
                self.release();
                self.dev.alloc_undefined(class)
            }
            other => other,
        }
    }

    /// Whether the free lists hold memory that [`Self::allocate`] may free.
    fn releasable(&self) -> bool {
        self.free
            .lock()
            .is_ok_and(|f| f.bytes > 0 && !f.keep_returns)
    }

    /// Bytes held in the free lists.
    pub fn cached_bytes(&self) -> usize {
        self.free.lock().map_or(0, |f| f.bytes)
    }

    /// Bounds the bytes kept in the free lists (default 4 GiB); buffers returned beyond it
    /// are freed. Takes effect for later returns.
    pub fn set_cache_limit(&self, bytes: usize) {
        self.free.lock().expect("pool lock").limit = bytes;
    }

    /// With `on`, every returned buffer is kept in the free lists, beyond the usual bound on
    /// cached bytes (for the direct run of work about to be captured); turning it off trims
    /// the free lists back to the bound.
    pub fn keep_returns(&self, on: bool) {
        let mut free = self.free.lock().expect("pool lock");
        free.keep_returns = on;
        if !on {
            let free = &mut *free;
            let mut classes: Vec<usize> = free.by_len.keys().copied().collect();
            classes.sort_unstable_by(|a, b| b.cmp(a)); // drop the largest first
            for class in classes {
                while free.bytes > free.limit {
                    let Some(b) = free.by_len.get_mut(&class).and_then(Vec::pop) else {
                        break;
                    };
                    free.bytes -= b.capacity_bytes();
                }
            }
        }
    }

    /// Starts routing returned buffers into a capture's arena (see the module docs).
    pub fn begin_capture(&self) -> Result<(), GpuError> {
        let mut free = self.free.lock().expect("pool lock");
        if free.capture.is_some() {
            return Err(GpuError::Capture {
                what: "starting a second capture on one buffer pool".into(),
            });
        }
        free.capture = Some(Arena::default());
        Ok(())
    }

    /// Ends the capture's arena. `keep`: the capture succeeded, and its buffers are returned
    /// as the graph's [`GraphMemory`]; otherwise they go back to the free lists (nothing will
    /// replay them). A buffer taken during the capture and still on loan (it escaped the
    /// captured work) makes a successful capture unsafe: that is an error.
    pub fn end_capture(&self, keep: bool) -> Result<GraphMemory, GpuError> {
        let mut free = self.free.lock().expect("pool lock");
        let Some(arena) = free.capture.take() else {
            return Err(GpuError::Capture {
                what: "ending a capture that was not started".into(),
            });
        };
        let buffers: Vec<Buffer<f32>> = arena.by_len.into_values().flatten().collect();
        if keep && arena.loans == 0 {
            return Ok(GraphMemory {
                buffers,
                free: self.free.clone(),
            });
        }
        for b in buffers {
            free.give_back(b);
        }
        if keep {
            return Err(GpuError::Capture {
                what: format!(
                    "keeping {} pool buffer(s) taken during the capture beyond it",
                    arena.loans
                ),
            });
        }
        Ok(GraphMemory {
            buffers: Vec::new(),
            free: self.free.clone(),
        })
    }

    /// Frees every cached buffer (buffers on loan are unaffected).
    pub fn release(&self) {
        if let Ok(mut free) = self.free.lock() {
            free.by_len.clear();
            free.bytes = 0;
        }
    }

    /// A zero-filled buffer of `len` elements.
    pub fn take_zeroed(&self, len: usize) -> Result<Pooled, GpuError> {
        let mut b = self.take(len)?;
        self.dev.zero(&mut b)?;
        Ok(b)
    }

    /// Adopts a buffer allocated elsewhere, so that it returns to this pool when dropped (kept
    /// only when its memory is exactly a size class).
    pub fn adopt(&self, buf: Buffer<f32>) -> Pooled {
        Pooled {
            buf: Some(buf),
            free: self.free.clone(),
            in_capture: false,
        }
    }
}

/// A bf16 buffer on loan from a [`BufferPool`]: the memory of a pooled f32 buffer of half the
/// length (so bf16 activations share the f32 size classes); it derefs to `Buffer<bf16>` and
/// goes back on drop. Under the simulator it is handed out filled with NaN, like [`Pooled`].
pub struct PooledBf16 {
    buf: Option<Buffer<half::bf16>>,
    free: Arc<Mutex<Free>>,
    /// Taken during a capture, as [`Pooled`]'s field: handed back with the f32 buffer.
    in_capture: bool,
}

impl Deref for PooledBf16 {
    type Target = Buffer<half::bf16>;
    fn deref(&self) -> &Buffer<half::bf16> {
        self.buf.as_ref().expect("present until drop")
    }
}

impl DerefMut for PooledBf16 {
    fn deref_mut(&mut self) -> &mut Buffer<half::bf16> {
        self.buf.as_mut().expect("present until drop")
    }
}

impl Drop for PooledBf16 {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let mut f32_buf = buf.reinterpret::<f32>();
        f32_buf.set_len(f32_buf.capacity_bytes() / std::mem::size_of::<f32>());
        // Pooled's drop puts it back in its size class.
        drop(Pooled {
            buf: Some(f32_buf),
            free: self.free.clone(),
            in_capture: self.in_capture,
        });
    }
}

impl BufferPool {
    /// A bf16 buffer of `len` elements with undefined contents (NaN under the simulator).
    pub fn take_bf16(&self, len: usize) -> Result<PooledBf16, GpuError> {
        let mut pooled = self.take(len.div_ceil(2))?;
        let mut buf = pooled
            .buf
            .take()
            .expect("present until drop")
            .reinterpret::<half::bf16>();
        buf.set_len(len);
        Ok(PooledBf16 {
            buf: Some(buf),
            free: self.free.clone(),
            in_capture: pooled.in_capture,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_with_at_most_a_quarter_to_spare() {
        for len in (0..5000).chain([197 * 768, 1201 * 3072, 12_608 * 3072]) {
            let c = size_class(len);
            assert!(
                c >= len && (c as f64) <= len as f64 * 1.25 + 1.0,
                "{len} -> {c}"
            );
            assert_eq!(size_class(c), c, "a class is its own class ({len} -> {c})");
        }
        assert_eq!(size_class(1000), 1024);
        assert_eq!(size_class(1025), 1280);
    }
}
