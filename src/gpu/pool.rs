//! A caching allocator for the engine's activations: buffers are returned to the pool when
//! dropped and handed out again for the next request of the same size class, so a run stops
//! allocating device memory after its first steps. Size classes (four per power of two, at
//! most 25% slack) matter under dynamic scale, where every step has a new geometry and exact
//! lengths would never repeat: each miss costs an allocation and a zero fill.
//!
//! Buffers come back with undefined contents. Under the simulator they are filled with NaN on
//! every hand-out, so any kernel or engine code that reads memory it has not written fails the
//! engine tests instead of silently reading a previous step's values; [`BufferPool::take_zeroed`]
//! is for the few buffers that are accumulated into.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use super::{Buffer, Device, GpuError};

/// Free buffers by size class (elements), with a bound on the bytes kept.
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
        let class = buf.capacity_bytes() / std::mem::size_of::<f32>();
        // Adopted buffers of other lengths would never be handed out again: let them go.
        if size_class(class) == class && free.bytes + buf.capacity_bytes() <= MAX_CACHED_BYTES {
            free.bytes += buf.capacity_bytes();
            free.by_len.entry(class).or_default().push(buf);
        }
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
            })),
        }
    }

    /// A buffer of `len` elements with undefined contents (NaN under the simulator).
    pub fn take(&self, len: usize) -> Result<Pooled, GpuError> {
        let class = size_class(len);
        let cached = {
            let mut free = self.free.lock().expect("pool lock");
            let buf = free.by_len.get_mut(&class).and_then(Vec::pop);
            if let Some(b) = &buf {
                free.bytes -= b.capacity_bytes();
            }
            buf
        };
        let mut buf = match cached {
            Some(b) => b,
            None => self.dev.alloc(class)?,
        };
        buf.set_len(len);
        if self.dev.is_sim() {
            self.dev.poison(&mut buf)?;
        }
        Ok(Pooled {
            buf: Some(buf),
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
        }
    }
}

/// A bf16 buffer on loan from a [`BufferPool`]: the memory of a pooled f32 buffer of half the
/// length (so bf16 activations share the f32 size classes); it derefs to `Buffer<bf16>` and
/// goes back on drop. Under the simulator it is handed out filled with NaN, like [`Pooled`].
pub struct PooledBf16 {
    buf: Option<Buffer<half::bf16>>,
    free: Arc<Mutex<Free>>,
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
