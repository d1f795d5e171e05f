//! A caching allocator for the engine's activations: buffers are returned to the pool when
//! dropped and handed out again for the next request of the same length, so a run at a fixed
//! batch geometry stops allocating device memory after its first step.
//!
//! Buffers come back with undefined contents. Under the simulator they are filled with NaN on
//! every hand-out, so any kernel or engine code that reads memory it has not written fails the
//! engine tests instead of silently reading a previous step's values; [`BufferPool::take_zeroed`]
//! is for the few buffers that are accumulated into.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use super::{Buffer, Device, GpuError};

/// Free buffers by length, with the bound that keeps dynamic-scale runs (a new geometry every
/// step) from hoarding memory.
struct Free {
    by_len: HashMap<usize, Vec<Buffer<f32>>>,
    bytes: usize,
}

/// At most this many bytes are kept in the free lists; beyond it, returned buffers are freed.
const MAX_CACHED_BYTES: usize = 4 << 30;

pub struct BufferPool {
    dev: Device,
    free: Arc<Mutex<Free>>,
}

/// A buffer on loan from a [`BufferPool`]; it derefs to [`Buffer`] and goes back on drop.
pub struct Pooled {
    buf: Option<Buffer<f32>>,
    free: Arc<Mutex<Free>>,
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
        if free.bytes + buf.bytes() <= MAX_CACHED_BYTES {
            free.bytes += buf.bytes();
            free.by_len.entry(buf.len()).or_default().push(buf);
        }
    }
}

impl BufferPool {
    pub fn new(dev: &Device) -> Self {
        BufferPool {
            dev: dev.clone(),
            free: Arc::new(Mutex::new(Free {
                by_len: HashMap::new(),
                bytes: 0,
            })),
        }
    }

    /// A buffer of `len` elements with undefined contents (NaN under the simulator).
    pub fn take(&self, len: usize) -> Result<Pooled, GpuError> {
        let cached = {
            let mut free = self.free.lock().expect("pool lock");
            let buf = free.by_len.get_mut(&len).and_then(Vec::pop);
            if let Some(b) = &buf {
                free.bytes -= b.bytes();
            }
            buf
        };
        let mut buf = match cached {
            Some(b) => b,
            None => self.dev.alloc(len)?,
        };
        if self.dev.is_sim() {
            self.dev.poison(&mut buf)?;
        }
        Ok(Pooled {
            buf: Some(buf),
            free: self.free.clone(),
        })
    }

    /// A zero-filled buffer of `len` elements.
    pub fn take_zeroed(&self, len: usize) -> Result<Pooled, GpuError> {
        let mut b = self.take(len)?;
        self.dev.zero(&mut b)?;
        Ok(b)
    }

    /// Adopts a buffer allocated elsewhere, so that it returns to this pool when dropped.
    pub fn adopt(&self, buf: Buffer<f32>) -> Pooled {
        Pooled {
            buf: Some(buf),
            free: self.free.clone(),
        }
    }
}
