//! Device memory accounting for the simulator: the bytes a simulator device's buffers hold, the
//! most they have held at once, and optionally a total the device pretends to have.
//!
//! A GPU runs out of memory; the simulator, whose buffers are host mappings, practically never
//! does. So every path that exists only for a full GPU (`--batch-size auto` choosing a batch
//! from the free memory, a batch that runs out of memory halfway through a step and is retried
//! in halves) would run only on GPUs. A simulator made with a memory total
//! ([`Device::sim_with_memory`](super::Device::sim_with_memory), or `PRM_SIM_MEMORY` for the
//! CLI's `--device sim`) reports what is left of it as its free memory and refuses an allocation
//! beyond it with [`GpuError::OutOfMemory`](super::GpuError::OutOfMemory), as a GPU would, at
//! whatever point of the engine the allocation happens. The peak (`SimMemory::peak`) measures
//! exactly what the engine allocates, which `--batch-size auto`'s per-token estimate must cover.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The accounting of one simulator device, shared by its buffers (each releases its bytes when
/// dropped).
#[derive(Debug, Default)]
pub(crate) struct SimMemory {
    /// The memory the device pretends to have; `None`: unbounded (the host's).
    limit: Option<usize>,
    used: AtomicUsize,
    peak: AtomicUsize,
}

impl SimMemory {
    pub fn new(limit: Option<usize>) -> Self {
        SimMemory {
            limit,
            ..SimMemory::default()
        }
    }

    /// Counts `bytes` as allocated, unless that would pass the limit (then nothing changes and
    /// the answer is `false`).
    pub fn reserve(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(after) = used.checked_add(bytes) else {
                return false;
            };
            if self.limit.is_some_and(|limit| after > limit) {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(used, after, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(after, Ordering::Relaxed);
                    return true;
                }
                Err(now) => used = now,
            }
        }
    }

    /// Counts `bytes` (reserved earlier) as freed.
    pub fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes held by live buffers.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most bytes held at once since the device was made or [`SimMemory::reset_peak`].
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak from what is held now.
    pub fn reset_peak(&self) {
        self.peak.store(self.used(), Ordering::Relaxed);
    }

    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// What is left of the limit; `None` without one.
    pub fn free(&self) -> Option<usize> {
        self.limit.map(|limit| limit.saturating_sub(self.used()))
    }
}

/// Reads a byte count as `PRM_SIM_MEMORY` spells it: a number of bytes, or a number (a decimal
/// fraction allowed) followed by `K`, `M`, `G` (powers of 1,024; `KiB`, `MiB`, `GiB`, `KB`,
/// `MB`, `GB` mean the same), e.g. `512M`, `1.5GiB`.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "`{text}` is not a byte count: use a number of bytes or e.g. 512M, 2G"
            ))
        }
    };
    let value: f64 = number.parse().map_err(|_| {
        format!("`{text}` is not a byte count: use a number of bytes or e.g. 512M, 2G")
    })?;
    let bytes = value * scale as f64;
    if !(bytes >= 1.0 && bytes < usize::MAX as f64) {
        return Err(format!("`{text}`: the byte count must be at least 1"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_counts_up_to_the_limit_and_tracks_the_peak() {
        let m = SimMemory::new(Some(100));
        assert!(m.reserve(60));
        assert!(!m.reserve(41), "60 + 41 passes 100");
        assert_eq!((m.used(), m.free()), (60, Some(40)));
        assert!(m.reserve(40));
        m.release(70);
        assert_eq!((m.used(), m.peak(), m.free()), (30, 100, Some(70)));
        m.reset_peak();
        assert_eq!(m.peak(), 30);
        let unbounded = SimMemory::new(None);
        assert!(unbounded.reserve(usize::MAX));
        assert!(!unbounded.reserve(1), "overflow is refused, not wrapped");
        assert_eq!(unbounded.free(), None);
    }

    #[test]
    fn byte_counts_parse_with_binary_units() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5k"), Ok(1536));
        for bad in ["", "M", "12X", "-3", "0", "0.1", "1e9", "nan"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
