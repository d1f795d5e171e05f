//! Host-side time spent in device calls, process-wide, by kind: what `prm bench --profile`
//! prints to show whether a run is bound by the GPU or by the host feeding it.
//!
//! Every [`Device`](super::Device) call that reaches the driver (launch, product, allocation,
//! copies, synchronisation) adds its count and wall time here. A launch that returns in a few
//! microseconds is the host keeping up; a download's time is mostly waiting for the queue to
//! drain, i.e. GPU time the host spends idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What a timed device call was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Launch,
    Matmul,
    Alloc,
    Upload,
    Download,
    Copy,
    Synchronize,
    /// Replays of a captured graph (each stands for all the operations it holds).
    GraphLaunch,
    /// Graph captures (recording and instantiation).
    Capture,
}

const CALLS: [Call; 9] = [
    Call::Launch,
    Call::Matmul,
    Call::Alloc,
    Call::Upload,
    Call::Download,
    Call::Copy,
    Call::Synchronize,
    Call::GraphLaunch,
    Call::Capture,
];

impl Call {
    pub fn name(self) -> &'static str {
        match self {
            Call::Launch => "kernel launches",
            Call::Matmul => "cuBLASLt products",
            Call::Alloc => "allocations",
            Call::Upload => "host-to-device copies",
            Call::Download => "device-to-host copies (wait included)",
            Call::Copy => "device-to-device copies",
            Call::Synchronize => "synchronisations",
            Call::GraphLaunch => "graph replays",
            Call::Capture => "graph captures (with instantiation)",
        }
    }
}

static COUNTS: [AtomicU64; CALLS.len()] = [const { AtomicU64::new(0) }; CALLS.len()];
static NANOS: [AtomicU64; CALLS.len()] = [const { AtomicU64::new(0) }; CALLS.len()];

/// Records the call's time when dropped.
pub(crate) struct Timed {
    call: Call,
    start: Instant,
}

impl Drop for Timed {
    fn drop(&mut self) {
        let i = self.call as usize;
        COUNTS[i].fetch_add(1, Ordering::Relaxed);
        NANOS[i].fetch_add(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

pub(crate) fn timed(call: Call) -> Timed {
    Timed {
        call,
        start: Instant::now(),
    }
}

/// Counts and host seconds per kind of call since the process started.
#[derive(Clone, Debug, Default)]
pub struct HostStats {
    pub entries: Vec<(Call, u64, f64)>,
}

impl HostStats {
    pub fn now() -> HostStats {
        HostStats {
            entries: CALLS
                .iter()
                .map(|&c| {
                    let i = c as usize;
                    (
                        c,
                        COUNTS[i].load(Ordering::Relaxed),
                        NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9,
                    )
                })
                .collect(),
        }
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &HostStats) -> HostStats {
        HostStats {
            entries: self
                .entries
                .iter()
                .zip(&earlier.entries)
                .map(|(&(c, n, s), &(_, n0, s0))| (c, n - n0, s - s0))
                .collect(),
        }
    }
}
