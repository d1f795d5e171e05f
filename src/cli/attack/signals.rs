//! SIGINT and SIGTERM during a run: finish cleanly at the next boundary, or at once on a second.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::super::{EXIT_SIGINT, EXIT_SIGTERM};

/// SIGINT / SIGTERM handling for a run: the first signal is recorded (and the run stops at the
/// next batch or step boundary); a second SIGINT or SIGTERM ends the process at once.
pub(super) struct Interrupt {
    /// The signal number received, 0 while none.
    received: Arc<AtomicUsize>,
}

impl Interrupt {
    pub(super) fn install() -> anyhow::Result<Self> {
        let received = Arc::new(AtomicUsize::new(0));
        let pending = Arc::new(AtomicBool::new(false));
        for (sig, code) in [(SIGINT, EXIT_SIGINT), (SIGTERM, EXIT_SIGTERM)] {
            // Registered first, so it sees the flag as it was before this delivery.
            signal_hook::flag::register_conditional_shutdown(sig, code.into(), pending.clone())
                .context("cannot install the signal handlers")?;
            signal_hook::flag::register(sig, pending.clone())
                .context("cannot install the signal handlers")?;
            signal_hook::flag::register_usize(sig, received.clone(), sig as usize)
                .context("cannot install the signal handlers")?;
        }
        Ok(Interrupt { received })
    }

    pub(super) fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}
