//! The GPU engine's side of [`Engine::stage`](crate::attack::engine::Engine::stage): the next
//! batch's clean images go to the device on the copy stream of a [`Stager`] while the current
//! batch computes, and the step loop takes them (the compute stream waits for the copy on the
//! device) instead of uploading them. See `gpu::staging` for the ordering rules.
//!
//! The final images of the step loop come back through the stager's pinned readback buffer.
//!
//! Staging is best effort: a staging that fails (out of memory for the slots, say) drops the
//! stager with its memory, and the batch uploads normally. `PRM_NO_STAGING=1` turns it off (to
//! compare: the outputs are the same bytes either way).

use std::sync::Mutex;
use std::time::Instant;

use super::GpuVit;
use crate::attack::engine::{StageKey, StagingCounters};
use crate::attack::image::Planar;
use crate::gpu::pool::Pooled;
use crate::gpu::staging::Stager;
use crate::gpu::{Buffer, Element, GpuError};

/// The engine's stager (made on first use) and what it did.
pub(super) struct Staging {
    on: bool,
    stager: Option<Stager<StageKey>>,
    counters: StagingCounters,
}

impl Default for Staging {
    fn default() -> Self {
        Staging {
            on: std::env::var("PRM_NO_STAGING").map_or(true, |v| v != "1"),
            stager: None,
            counters: StagingCounters::default(),
        }
    }
}

impl GpuVit<'_> {
    fn staging(&self) -> std::sync::MutexGuard<'_, Staging> {
        self.staging.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the engine stages uploads (on by default; `PRM_NO_STAGING=1` or
    /// [`GpuVit::set_staging`] turn it off).
    pub fn staging_enabled(&self) -> bool {
        self.staging().on
    }

    /// Turns staging on or off (off also frees the staging buffers).
    pub fn set_staging(&self, on: bool) {
        let mut s = self.staging();
        s.on = on;
        if !on {
            s.stager = None;
        }
    }

    /// Frees the staging buffers (anything staged is forgotten).
    pub(super) fn release_staging(&self) {
        self.staging().stager = None;
    }

    /// Stages `clean` (packed in order) under `key`.
    pub(super) fn stage_clean(&self, key: &StageKey, clean: &[Planar]) {
        let started = Instant::now();
        let mut s = self.staging();
        if !s.on || clean.is_empty() {
            return;
        }
        let parts: Vec<&[f32]> = clean.iter().map(|c| c.data).collect();
        if s.stager.is_none() {
            match Stager::new(&self.dev) {
                Ok(stager) => s.stager = Some(stager),
                Err(_) => return,
            }
        }
        let staged = s
            .stager
            .as_mut()
            .expect("made above")
            .stage(key.clone(), &parts);
        match staged {
            Ok(()) => s.counters.staged += 1,
            // Memory short now: the batch uploads normally, and the stager (its readback and
            // whatever memory it already holds) stays for the next batch instead of being
            // rebuilt (an out-of-memory error of the batch itself releases it).
            Err(e) if e.is_memory_shortage() => {}
            // Anything else: forget it (and its memory); the batch uploads normally.
            Err(_) => s.stager = None,
        }
        s.counters.host_seconds += started.elapsed().as_secs_f64();
    }

    /// The clean images of the batch `key` names (parts of `lens` elements), on the device, if
    /// they were staged: the compute stream waits for their copy, then copies them into a pool
    /// buffer. `None`: not staged (or staged for another batch); upload them.
    pub(super) fn take_staged(
        &self,
        key: &StageKey,
        lens: &[usize],
    ) -> Result<Option<Pooled>, GpuError> {
        let mut s = self.staging();
        let Some(stager) = s.stager.as_mut() else {
            return Ok(None);
        };
        if !stager.holds(key) {
            return Ok(None);
        }
        let mut dst = self.alloc(lens.iter().sum())?;
        let Some(taken) = stager.take(key, lens, &mut dst)? else {
            return Ok(None);
        };
        s.counters.used += 1;
        if taken.copy_pending {
            s.counters.copy_pending += 1;
        }
        Ok(Some(dst))
    }

    /// `buf` on the host cut into pieces of `lens` elements (one per image): through the
    /// stager's pinned readback buffer when staging is on, plain downloads otherwise.
    pub(super) fn download_split_staged<T: Element>(
        &self,
        buf: &Buffer<T>,
        lens: &[usize],
    ) -> Result<Vec<Vec<T>>, GpuError> {
        let mut s = self.staging();
        if !s.on {
            return self.dev.download_split(buf, lens);
        }
        if s.stager.is_none() {
            // Best effort, as staging: without a stager the download is a plain one.
            s.stager = Stager::new(&self.dev).ok();
        }
        match s.stager.as_mut() {
            Some(stager) => stager.download_split(buf, lens),
            None => self.dev.download_split(buf, lens),
        }
    }

    pub(super) fn staging_totals(&self) -> StagingCounters {
        self.staging().counters
    }
}

/// A fresh staging state for a new engine.
pub(super) fn new_staging() -> Mutex<Staging> {
    Mutex::new(Staging::default())
}
