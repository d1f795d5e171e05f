//! The threads of a campaign, so that the engine never waits for I/O in steady state.
//!
//! ```text
//!  decoder threads ──► Prefetch (bounded look-ahead, handed out in input order)
//!                           │ claim(batch size)
//!                           ▼
//!  engine worker(s): attack, quantise within ε, evaluate the saved images (need the engine)
//!                           │ WriteJob per batch, bounded queue (64 images or 2 batches)
//!                           ▼
//!  writer thread: encode + write PNG / safetensors atomically (images of a batch in parallel),
//!                 reorder buffer → manifest lines in input order, fsync per batch
//!                           │ Completion per image (unbounded: records are small)
//!                           ▼
//!  the calling thread: Progress::loss_curve / image_done
//! ```
//!
//! - **Decoders** read, decode and size-check inputs and read `--init from:` starts. They run at
//!   most `lookahead` images past the last image an engine worker claimed (the workers' batch
//!   sizes plus one image per decoder), so memory stays bounded whatever the dataset size.
//! - **Engine workers** claim consecutive runs of images (a batch) under one lock, so a batch is
//!   always the same images in the same order whichever worker runs it. A batch holds at most
//!   the worker's batch size in images and, with a token budget (`--batch-tokens`, or
//!   `--batch-size auto` on a GPU), at most that many tokens at the images' working sizes
//!   (always at least one image): such a claim waits for each image to be decoded before it
//!   takes the next, and no other worker claims meanwhile. One worker runs on the
//!   calling thread ([`run_here`], any [`Engine`]); several run on their own threads
//!   ([`run_on_threads`]), each with its own engine built on that thread (its own device, weights
//!   and batch size). Out-of-memory halving is per worker: the worker keeps the images it
//!   claimed and retries them in halves, so none is lost or redone.
//! - **Staging.** With an engine that stages uploads (the GPU engine: [`Engine::stage`]), a
//!   worker hands the engine the next batch while the current one runs (once its second step
//!   is queued; after it, for a batch of fewer steps), if the next batch's images are all
//!   decoded already (it claims them ahead; it never waits for a decoder), so their packing
//!   into pinned memory overlaps this batch's device work and they travel to the device on a
//!   copy stream while this batch computes. The upload
//!   is keyed by run and image indices: a batch that comes out different (halved after an
//!   out-of-memory error, abandoned at an interrupt) simply uploads its own images.
//! - **The writer** is the only thread that touches the output directory and the manifest. It
//!   appends an image's line after its outputs are renamed into place, in input order (a later
//!   batch finished by a faster worker waits in the reorder buffer), and syncs the manifest after
//!   every batch. At the end of a run, records still waiting for an earlier image that was never
//!   finished (the batch in flight at an interrupt) are appended in input order.
//! - **Progress** calls all happen on the thread that owns the [`Progress`]: the calling thread
//!   with [`run_here`] (between steps, so a `Progress` need not be `Sync`), the workers and the
//!   calling thread with [`run_on_threads`] (which requires `Sync`).
//! - **Interrupts** are polled by the workers before every batch and after every step; the
//!   worker that sees one stops the others and the decoders. Batches already queued for the
//!   writer are written out completely; the batches in flight are abandoned.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Barrier, Condvar, Mutex};
use std::time::Instant;

use rayon::prelude::*;

use super::campaign::{
    attack_batch, error_record, load, panic_message, staged_input, write_outputs, Attacked,
    BatchResult, CampaignError, Finished, ImageFailure, Loaded, MemoryBudget, OutputOptions,
    Progress, Worker,
};
use super::engine::{Engine, StageKey};
use super::loss::Objective;
use super::profile::{BatchTiming, Timeline, WorkerTiming, WriteTiming};
use super::settings::{AttackSettings, Resolution};
use crate::io::{InputItem, IoError, ManifestRecord, ManifestWriter, Status};

/// What one run needs, shared by every thread.
pub(super) struct Run<'a> {
    /// The inputs still to do, in input order; indices into it identify images everywhere.
    pub todo: &'a [InputItem],
    pub objective: &'a Objective,
    pub settings: &'a AttackSettings,
    pub output: &'a OutputOptions,
    pub patch: usize,
    /// Tokens before the patches (1 for a class token, 0 without).
    pub class_tokens: usize,
    pub timeline: Option<&'a Timeline>,
}

impl Run<'_> {
    /// Tokens an image takes in a batch: its working size at `--resolution` (the native size,
    /// cropped to whole patches, bounds every dynamic-scale draw), plus the class token when
    /// the tower has one. An image that failed to load takes none.
    pub(super) fn tokens_of(&self, loaded: &Result<Loaded, ImageFailure>) -> usize {
        let Ok(image) = loaded else { return 0 };
        let p = self.patch.max(1);
        match self.settings.resolution {
            Resolution::Native => {
                (image.clean.height / p) * (image.clean.width / p) + self.class_tokens
            }
            Resolution::Fixed(n) => (n / p) * (n / p) + self.class_tokens,
        }
    }

    /// Pixels of an image at its native size (none for an image that failed to load).
    fn native_pixels_of(loaded: &Result<Loaded, ImageFailure>) -> usize {
        loaded
            .as_ref()
            .map_or(0, |image| image.clean.height * image.clean.width)
    }

    /// What an image counts against a [`BatchLimit`].
    fn cost_of(&self, loaded: &Result<Loaded, ImageFailure>) -> ImageCost {
        ImageCost {
            tokens: self.tokens_of(loaded),
            native_pixels: Self::native_pixels_of(loaded),
        }
    }
}

/// What one image counts against a batch's limits.
#[derive(Clone, Copy, Debug)]
struct ImageCost {
    tokens: usize,
    native_pixels: usize,
}

/// The most a worker's batch may hold.
#[derive(Clone, Copy, Debug)]
struct BatchLimit {
    images: usize,
    /// Tokens at the images' working sizes ([`Run::tokens_of`]); `None`: no bound.
    tokens: Option<usize>,
    /// Device memory ([`MemoryBudget`]); `None`: no bound.
    memory: Option<MemoryBudget>,
}

impl BatchLimit {
    /// Whether images are admitted one by one against a budget (not by count alone).
    fn budgeted(&self) -> bool {
        self.tokens.is_some() || self.memory.is_some()
    }
}

/// A batch being filled in input order under a [`BatchLimit`]: the first image always joins.
struct Fill {
    limit: BatchLimit,
    images: usize,
    tokens: usize,
    bytes: usize,
}

impl Fill {
    fn new(limit: BatchLimit) -> Self {
        Fill {
            limit,
            images: 0,
            tokens: 0,
            bytes: 0,
        }
    }

    fn full(&self) -> bool {
        self.images >= self.limit.images.max(1)
    }

    /// Whether the next image joins the batch (counted if it does).
    fn admit(&mut self, image: ImageCost) -> bool {
        let bytes = self
            .limit
            .memory
            .map_or(0, |m| m.cost(image.tokens, image.native_pixels));
        let first = self.images == 0;
        let over_tokens = self
            .limit
            .tokens
            .is_some_and(|budget| self.tokens + image.tokens > budget);
        let over_memory = self
            .limit
            .memory
            .is_some_and(|m| self.bytes.saturating_add(bytes) > m.bytes);
        if self.full() || (!first && (over_tokens || over_memory)) {
            return false;
        }
        self.images += 1;
        self.tokens += image.tokens;
        self.bytes = self.bytes.saturating_add(bytes);
        true
    }
}

/// How a run ended.
pub(super) struct Outcome {
    pub ok: usize,
    pub failed: usize,
    pub interrupted: bool,
    pub device_lost: bool,
}

/// An image claimed by an engine worker: its index in `todo` and what the decoders made of it.
pub(super) struct Claimed {
    pub index: usize,
    pub loaded: Result<Loaded, ImageFailure>,
}

/// One image's manifest record, on its way back to the [`Progress`].
struct Completion {
    record: ManifestRecord,
    curve: Option<Vec<f64>>,
}

/// A finished batch for the writer.
struct WriteJob {
    worker: usize,
    images: Vec<Finished>,
    /// Engine seconds per image of the batch (the manifest's `seconds`).
    seconds: f64,
}

struct PrefetchState {
    ready: HashMap<usize, Result<Loaded, ImageFailure>>,
    /// The next image a decoder will take.
    next_load: usize,
    /// The next image a worker will claim.
    next_claim: usize,
    /// Decoders stay below `next_claim + lookahead`.
    lookahead: usize,
    stopped: bool,
    /// A worker is taking a token-bounded batch image by image: others wait to claim.
    claiming: bool,
}

/// Decoded inputs with a bounded look-ahead, claimed by the workers in input order.
struct Prefetch {
    state: Mutex<PrefetchState>,
    /// An image was decoded, or the prefetch stopped.
    decoded: Condvar,
    /// Images were claimed (room to decode more), or the prefetch stopped.
    claimed: Condvar,
}

impl Prefetch {
    fn new(lookahead: usize) -> Self {
        Prefetch {
            state: Mutex::new(PrefetchState {
                ready: HashMap::new(),
                next_load: 0,
                next_claim: 0,
                lookahead: lookahead.max(1),
                stopped: false,
                claiming: false,
            }),
            decoded: Condvar::new(),
            claimed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PrefetchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every decoder and wakes every waiting worker (which then gets nothing).
    fn stop(&self) {
        self.lock().stopped = true;
        self.decoded.notify_all();
        self.claimed.notify_all();
    }

    fn grow_lookahead(&self, images: usize) {
        self.lock().lookahead += images;
        self.claimed.notify_all();
    }

    /// A decoder thread: decodes images in input order until all are decoded or it is stopped.
    fn decode_loop(&self, run: &Run) {
        loop {
            let index = {
                let mut s = self.lock();
                loop {
                    if s.stopped || s.next_load >= run.todo.len() {
                        return;
                    }
                    if s.next_load < s.next_claim + s.lookahead {
                        break;
                    }
                    s = self.claimed.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                s.next_load += 1;
                s.next_load - 1
            };
            let item = &run.todo[index];
            let loaded = catch_unwind(AssertUnwindSafe(|| {
                load(item, run.settings, run.patch, run.output.max_pixels)
            }))
            .unwrap_or_else(|p| {
                Err(ImageFailure {
                    message: format!(
                        "internal error while reading (please report): {}",
                        panic_message(&*p)
                    ),
                    size: None,
                })
            });
            self.lock().ready.insert(index, loaded);
            self.decoded.notify_all();
        }
    }

    /// Claims the batch [`Self::claim`] would claim only if every image it needs is decoded
    /// already (with a token budget, also the image that would not fit); claims nothing
    /// otherwise. Never waits (a worker uses it to look one batch ahead without holding up the
    /// batch it is about to run).
    fn try_claim(&self, limit: BatchLimit, run: &Run) -> Vec<Claimed> {
        let total = run.todo.len();
        let mut s = self.lock();
        if s.stopped || s.claiming {
            return Vec::new();
        }
        let first = s.next_claim;
        let mut fill = Fill::new(limit);
        let mut end = first;
        while end < total && !fill.full() {
            let Some(loaded) = s.ready.get(&end) else {
                return Vec::new();
            };
            if !fill.admit(run.cost_of(loaded)) {
                break;
            }
            end += 1;
        }
        if end == first {
            return Vec::new();
        }
        let range = first..end;
        s.next_claim = end;
        self.claimed.notify_all();
        range
            .map(|index| Claimed {
                index,
                loaded: s.ready.remove(&index).expect("checked above"),
            })
            .collect()
    }

    /// Claims the next `max` images (fewer at the end) and waits until they are decoded. Empty
    /// when every image was claimed or the prefetch was stopped.
    fn claim(&self, limit: BatchLimit, run: &Run) -> Vec<Claimed> {
        let total = run.todo.len();
        if limit.budgeted() {
            return self.claim_within(limit, run);
        }
        let mut s = self.turn_to_claim();
        if s.stopped {
            return Vec::new();
        }
        let range = s.next_claim..(s.next_claim + limit.images).min(total);
        s.next_claim = range.end;
        self.claimed.notify_all();
        let mut out = Vec::with_capacity(range.len());
        for index in range {
            loop {
                if s.stopped {
                    return Vec::new();
                }
                if let Some(loaded) = s.ready.remove(&index) {
                    out.push(Claimed { index, loaded });
                    break;
                }
                s = self.decoded.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        }
        out
    }

    /// The state once no token claim is under way (or the prefetch stopped).
    fn turn_to_claim(&self) -> std::sync::MutexGuard<'_, PrefetchState> {
        let mut s = self.lock();
        while s.claiming && !s.stopped {
            s = self.claimed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s
    }

    /// [`Self::claim`] with a token or memory budget: takes the next images one by one as
    /// they are decoded, while they fit in the budgets (the first one always) and number at
    /// most `limit.images`. Other workers wait meanwhile, so the batch is consecutive images.
    fn claim_within(&self, limit: BatchLimit, run: &Run) -> Vec<Claimed> {
        let total = run.todo.len();
        let mut s = self.turn_to_claim();
        s.claiming = true;
        let mut out = Vec::new();
        let mut fill = Fill::new(limit);
        while !fill.full() && s.next_claim < total {
            if s.stopped {
                out.clear();
                break;
            }
            let index = s.next_claim;
            let Some(loaded) = s.ready.get(&index) else {
                s = self.decoded.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            if !fill.admit(run.cost_of(loaded)) {
                break;
            }
            let loaded = s.ready.remove(&index).expect("present");
            s.next_claim += 1;
            // Room for the decoders to read further ahead while this claim goes on.
            self.claimed.notify_all();
            out.push(Claimed { index, loaded });
        }
        s.claiming = false;
        self.claimed.notify_all();
        out
    }
}

/// Bounds the images handed to the writer and not yet written (their pixels wait in memory):
/// a worker waits before handing over a batch that would pass the limit, unless the writer has
/// nothing at all (so a batch larger than the limit still goes through).
struct WriterGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

struct GateState {
    queued_images: usize,
    limit: usize,
    /// The writer ended (on a manifest error): nobody waits any more.
    closed: bool,
}

impl WriterGate {
    /// Enough to absorb the writer's jitter (fsync latency) with small batches.
    const MIN_IMAGES: usize = 64;

    fn new() -> Self {
        WriterGate {
            state: Mutex::new(GateState {
                queued_images: 0,
                limit: Self::MIN_IMAGES,
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for two batches of `batch_size`.
    fn allow_batches_of(&self, batch_size: usize) {
        let mut s = self.lock();
        s.limit = s.limit.max(2 * batch_size);
    }

    /// Waits for room for `images`; returns the seconds spent waiting.
    fn enter(&self, images: usize) -> f64 {
        let mut s = self.lock();
        let mut waited = None;
        while !s.closed && s.queued_images > 0 && s.queued_images + images > s.limit {
            let since = *waited.get_or_insert_with(Instant::now);
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            waited = Some(since);
        }
        s.queued_images += images;
        waited.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    fn leave(&self, images: usize) {
        let mut s = self.lock();
        s.queued_images = s.queued_images.saturating_sub(images);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// Closes the gate when the writer ends, however it ends.
struct CloseOnDrop<'a>(&'a WriterGate);
impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// State shared by the threads of one run.
struct Shared<'a> {
    run: &'a Run<'a>,
    /// Distinguishes this run's batches from any other run's in uploads an engine staged
    /// ([`StageKey::run`]), for an engine reused across runs.
    run_id: u64,
    prefetch: Prefetch,
    /// Every worker stops at its next batch or step boundary.
    stop: AtomicBool,
    /// A worker saw the interrupt.
    interrupted: AtomicBool,
    /// A worker's device failed for good (the run stops).
    device_lost: AtomicBool,
    /// Batches queued for the writer and not yet taken by it.
    backlog: AtomicUsize,
    writer_gate: WriterGate,
}

impl<'a> Shared<'a> {
    fn new(run: &'a Run<'a>, lookahead: usize) -> Self {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        Shared {
            run,
            run_id: RUNS.fetch_add(1, Ordering::Relaxed),
            prefetch: Prefetch::new(lookahead),
            stop: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
            device_lost: AtomicBool::new(false),
            backlog: AtomicUsize::new(0),
            writer_gate: WriterGate::new(),
        }
    }

    fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.prefetch.stop();
    }

    /// Whether the worker should stop now (polling the interrupt).
    fn should_stop(&self, interrupted: &dyn Fn() -> bool) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            return true;
        }
        if interrupted() {
            self.interrupted.store(true, Ordering::SeqCst);
            self.halt();
            return true;
        }
        false
    }

    fn now(&self) -> f64 {
        self.run.timeline.map_or(0.0, |t| t.now())
    }
}

/// Unwinding payload that abandons the batch in flight when an interrupt is seen mid-attack.
struct Interrupted;

/// Decoding threads: `--decode-threads`, else one per CPU, at most 8 per engine worker (one
/// GPU attacks a few hundred images a second, and a decoder keeps up with a hundred or more;
/// a node of eight GPUs needs more than eight decoders).
fn decoder_count(output: &OutputOptions, workers: usize) -> usize {
    if output.decoders > 0 {
        return output.decoders;
    }
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8 * workers.max(1))
}

/// One engine worker: claims batches, attacks them, hands them to the writer, until the inputs
/// run out or the run stops. `between_steps` runs after every step and batch (the single-worker
/// run delivers completions there).
#[allow(clippy::too_many_arguments)]
fn engine_worker<E: Engine>(
    worker: usize,
    engine: &E,
    limits: BatchLimit,
    shared: &Shared,
    progress: &dyn Progress,
    interrupted: &dyn Fn() -> bool,
    jobs: Sender<WriteJob>,
    between_steps: &dyn Fn(),
) {
    let run = shared.run;
    let mut size = limits.images.max(1);
    // Whether the batch in `held`'s front, of one image, already ran out of memory once (then
    // with the engine's caches released it is tried once more before the image fails).
    let mut retried_alone = false;
    // Claimed images not attacked yet: a whole claim, or what is left of one after an
    // out-of-memory error halved the batch.
    let mut held: VecDeque<Claimed> = VecDeque::new();
    let curves = progress.wants_loss_curves();
    let stages = engine.stages_uploads();
    loop {
        between_steps();
        if shared.should_stop(interrupted) {
            return;
        }
        let requested_at = shared.now();
        let limit = BatchLimit {
            images: size,
            ..limits
        };
        if held.is_empty() {
            held.extend(shared.prefetch.claim(limit, run));
            if held.is_empty() {
                return; // every input is claimed (or the run stopped)
            }
        }
        let loaded_at = shared.now();
        let chunk: Vec<Claimed> = held.drain(..size.min(held.len())).collect();
        let before = engine.staging_counters();
        for c in &chunk {
            progress.image_started(&run.todo[c.index].rel);
        }
        let started = Instant::now();
        let reported = std::cell::Cell::new(0usize);
        // The next batch is staged while this one runs, once its second step is queued (the
        // first may end with a read-back, the initial loss, which leaves the device idle): the
        // host's packing then overlaps the device's work instead of delaying this batch's
        // start. A batch of fewer steps stages it when done.
        let held_cell = std::cell::RefCell::new(std::mem::take(&mut held));
        let stage_pending = std::cell::Cell::new(stages);
        let staged_next = std::cell::Cell::new(false);
        let stage_now = || {
            if stage_pending.replace(false) {
                let next = stage_next(engine, shared, &mut held_cell.borrow_mut(), limit);
                staged_next.set(next);
            }
        };
        let steps_seen = std::cell::Cell::new(0usize);
        let on_step = |n: usize| {
            reported.set(reported.get() + n);
            progress.steps_done(n);
            if steps_seen.replace(steps_seen.get() + 1) == 1 {
                stage_now();
            }
            between_steps();
            if shared.should_stop(interrupted) {
                // Not a panic: no hook runs, and `catch_unwind` below tells it apart.
                resume_unwind(Box::new(Interrupted));
            }
        };
        let attacked = catch_unwind(AssertUnwindSafe(|| {
            attack_batch(
                engine,
                shared.run_id,
                run.objective,
                run.settings,
                &chunk,
                &on_step,
                curves,
                run.output.save_float,
            )
        }));
        if matches!(attacked, Ok(BatchResult::Done(..))) {
            stage_now();
        }
        let staged_next = staged_next.get();
        held = held_cell.into_inner();
        let after = engine.staging_counters();
        let mut timing = BatchTiming {
            worker,
            first: chunk[0].index,
            images: chunk.len(),
            requested_at,
            loaded_at,
            engine_done_at: shared.now(),
            queued_at: 0.0,
            writer_backlog: 0,
            writer_wait: 0.0,
            out_of_memory: false,
            staged_next,
            stage_seconds: after.host_seconds - before.host_seconds,
            input_staged: after.used > before.used,
            copy_pending: after.copy_pending > before.copy_pending,
            phases: None,
        };
        let finished = match attacked {
            Ok(BatchResult::OutOfMemory) if chunk.len() > 1 || !retried_alone => {
                engine.release_cached_memory();
                if chunk.len() > 1 {
                    size = (chunk.len() / 2).max(1);
                    progress.batch_shrunk(size, reported.get());
                } else {
                    // Memory the engine's caches held (buffers of earlier geometries, staged
                    // inputs) may be what was missing: with them freed, the image runs once
                    // more.
                    retried_alone = true;
                }
                timing.out_of_memory = true;
                timing.queued_at = timing.engine_done_at;
                if let Some(t) = run.timeline {
                    t.batch(timing);
                }
                for c in chunk.into_iter().rev() {
                    held.push_front(c);
                }
                continue;
            }
            Ok(BatchResult::OutOfMemory) => {
                engine.release_cached_memory();
                retried_alone = false;
                fail_all(
                    &chunk,
                    "engine error: out of device memory with one image per batch (use a smaller \
                     --resolution or --max-pixels, or a larger GPU)"
                        .into(),
                )
            }
            Ok(BatchResult::DeviceLost(message)) => {
                // Every later batch on this device would fail the same way: recording each
                // remaining image as failed would only have to be undone. Stop the run as an
                // interrupt does (this batch abandoned, the others' in flight too), and say why.
                if !shared.device_lost.swap(true, Ordering::SeqCst) {
                    eprintln!(
                        "prm: engine worker {worker}'s device failed: {message}\n\
                         prm: the run stops; finished images are saved and recorded, and \
                         re-running the same command resumes (leave this device out with \
                         --device if it keeps failing)"
                    );
                }
                shared.halt();
                return;
            }
            Ok(BatchResult::Done(finished, phases)) => {
                retried_alone = false;
                timing.phases = phases;
                finished
            }
            Err(payload) if payload.is::<Interrupted>() => return,
            Err(panic) => fail_all(
                &chunk,
                format!("internal error (please report): {}", panic_message(&*panic)),
            ),
        };
        let seconds = started.elapsed().as_secs_f64() / chunk.len() as f64;
        timing.writer_wait = shared.writer_gate.enter(finished.len());
        timing.writer_backlog = shared.backlog.fetch_add(1, Ordering::SeqCst) + 1;
        let sent = jobs.send(WriteJob {
            worker,
            images: finished,
            seconds,
        });
        timing.queued_at = shared.now();
        if let Some(t) = run.timeline {
            t.batch(timing);
        }
        if sent.is_err() {
            // The writer stopped on a manifest error: the run ends with that error.
            shared.halt();
            return;
        }
    }
}

/// Stages the batch this worker runs after the current one, so its upload overlaps the current
/// batch's compute: the images it already holds (what an out-of-memory retry left), else the
/// next images of the input if every one is decoded already (never waiting for a decoder).
/// Returns whether something was staged. The engine keys the upload by run and image indices,
/// so a batch that turns out different (halved after an out-of-memory error, say) never uses it.
fn stage_next<E: Engine>(
    engine: &E,
    shared: &Shared,
    held: &mut VecDeque<Claimed>,
    limit: BatchLimit,
) -> bool {
    if held.is_empty() {
        held.extend(shared.prefetch.try_claim(limit, shared.run));
    }
    let n = limit.images.min(held.len());
    let next = &held.make_contiguous()[..n];
    let (key, clean): (StageKey, _) = staged_input(shared.run_id, next);
    if clean.is_empty() {
        return false;
    }
    // A staging failure must not cost the batches: it is best effort by contract.
    catch_unwind(AssertUnwindSafe(|| engine.stage(&key, &clean))).is_ok()
}

/// Every image of `chunk` failed with `message` (or with its own earlier failure).
fn fail_all(chunk: &[Claimed], message: String) -> Vec<Finished> {
    chunk
        .iter()
        .map(|c| Finished {
            index: c.index,
            result: Err(match &c.loaded {
                Ok(l) => ImageFailure::sized(message.clone(), &l.clean),
                Err(e) => e.clone(),
            }),
        })
        .collect()
}

/// Writes one image's outputs; its record (an error record when writing failed).
fn write_image(
    item: &InputItem,
    result: Result<Attacked, ImageFailure>,
    seconds: f64,
    output: &OutputOptions,
) -> Completion {
    let attacked = match result {
        Ok(a) => a,
        Err(failure) => {
            return Completion {
                record: error_record(item, failure, seconds),
                curve: None,
            }
        }
    };
    let written = catch_unwind(AssertUnwindSafe(|| write_outputs(item, &attacked, output)))
        .unwrap_or_else(|p| {
            Err(ImageFailure {
                message: format!(
                    "internal error while writing (please report): {}",
                    panic_message(&*p)
                ),
                size: Some((attacked.width, attacked.height)),
            })
        });
    match written {
        Ok(rel_out) => {
            let mut record = attacked.record;
            record.output = Some(rel_out);
            record.seconds = seconds;
            Completion {
                record,
                curve: attacked.curve,
            }
        }
        Err(failure) => Completion {
            record: error_record(item, failure, seconds),
            curve: None,
        },
    }
}

/// Counts of the records the writer appended.
#[derive(Default)]
struct Counts {
    ok: usize,
    failed: usize,
}

/// Appends one record and hands it on to the progress.
fn append(
    manifest: &mut ManifestWriter,
    done: &Sender<Completion>,
    counts: &mut Counts,
    c: Completion,
) -> Result<(), IoError> {
    manifest.append(&c.record)?;
    match c.record.status {
        Status::Ok => counts.ok += 1,
        _ => counts.failed += 1,
    }
    let _ = done.send(c);
    Ok(())
}

/// The writer thread: writes every batch it is given, appends the records in input order.
fn writer_loop(
    shared: &Shared,
    mut manifest: ManifestWriter,
    jobs: Receiver<WriteJob>,
    done: Sender<Completion>,
) -> Result<Counts, IoError> {
    let run = shared.run;
    let _close = CloseOnDrop(&shared.writer_gate);
    let mut counts = Counts::default();
    let mut waiting: BTreeMap<usize, Completion> = BTreeMap::new();
    let mut next = 0usize;
    // Encoding runs on the writer's own threads: on the global pool a batch of encodes would
    // queue ahead of the engine workers' parallel host work (quantisation, resizes, staging
    // copies), which sits between device phases. Without a pool of its own (thread creation
    // refused), the writer shares the global one.
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("prm-writer-{i}"))
        .build()
        .ok();
    for job in jobs.iter() {
        shared.backlog.fetch_sub(1, Ordering::SeqCst);
        let started_at = shared.now();
        let first = job.images.first().map_or(0, |f| f.index);
        let images = job.images.len();
        let seconds = job.seconds;
        // The images of a batch are encoded and written in parallel; records wait for order.
        let encode = || -> Vec<(usize, Completion)> {
            job.images
                .into_par_iter()
                .map(|f| {
                    let item = &run.todo[f.index];
                    (f.index, write_image(item, f.result, seconds, run.output))
                })
                .collect()
        };
        let written = match &pool {
            Some(p) => p.install(encode),
            None => encode(),
        };
        waiting.extend(written);
        while let Some(c) = waiting.remove(&next) {
            append(&mut manifest, &done, &mut counts, c)?;
            next += 1;
        }
        manifest.sync()?;
        shared.writer_gate.leave(images);
        if let Some(t) = run.timeline {
            t.write(WriteTiming {
                worker: job.worker,
                first,
                images,
                started_at,
                done_at: t.now(),
            });
        }
    }
    // The run is over. Records still waiting follow an image that was never finished (its batch
    // was abandoned at an interrupt): their outputs are in place, so they are recorded, in order.
    for (_, c) in std::mem::take(&mut waiting) {
        append(&mut manifest, &done, &mut counts, c)?;
    }
    manifest.sync()?;
    Ok(counts)
}

fn deliver(progress: &dyn Progress, c: Completion) {
    if let (Some(curve), Status::Ok) = (&c.curve, c.record.status) {
        progress.loss_curve(&c.record.input, curve);
    }
    progress.image_done(&c.record);
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle.join().unwrap_or_else(|p| resume_unwind(p))
}

/// Runs the campaign with one engine worker on the calling thread.
pub(super) fn run_here<E: Engine>(
    run: &Run,
    manifest: ManifestWriter,
    engine: &E,
    progress: &dyn Progress,
    interrupted: &dyn Fn() -> bool,
) -> Result<Outcome, IoError> {
    let decoders = decoder_count(run.output, 1);
    let batch_size = run.output.batch_size.max(1);
    let shared = Shared::new(run, decoders + batch_size);
    shared.writer_gate.allow_batches_of(batch_size);
    let (jobs_tx, jobs_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<Completion>();
    let counts = std::thread::scope(|s| {
        for _ in 0..decoders {
            s.spawn(|| shared.prefetch.decode_loop(run));
        }
        let writer = s.spawn(|| writer_loop(&shared, manifest, jobs_rx, done_tx));
        if let Some(t) = run.timeline {
            t.worker_ready(WorkerTiming {
                worker: 0,
                device: "engine".into(),
                batch_size,
                batch_tokens: run.output.batch_tokens,
                batch_memory_bytes: run.output.batch_memory.map(|m| m.bytes),
                ready_at: t.now(),
            });
        }
        let drain = || {
            while let Ok(c) = done_rx.try_recv() {
                deliver(progress, c);
            }
        };
        engine_worker(
            0,
            engine,
            BatchLimit {
                images: batch_size,
                tokens: run.output.batch_tokens,
                memory: run.output.batch_memory,
            },
            &shared,
            progress,
            interrupted,
            jobs_tx,
            &drain,
        );
        if let Some(t) = run.timeline {
            t.kernel_choices(0, engine.kernel_choices());
        }
        shared.prefetch.stop();
        // The writer finishes the queued batches; their completions arrive until it ends.
        for c in done_rx.iter() {
            deliver(progress, c);
        }
        join(writer)
    })?;
    Ok(Outcome {
        ok: counts.ok,
        failed: counts.failed,
        interrupted: shared.interrupted.load(Ordering::SeqCst),
        device_lost: shared.device_lost.load(Ordering::SeqCst),
    })
}

/// Runs the campaign with `workers` engine workers on their own threads; worker `w`'s engine is
/// built by `make_worker(w)` on that thread. Every engine is built before any image is attacked:
/// if one cannot be, nothing is attacked and the error is returned.
pub(super) fn run_on_threads<E, F>(
    run: &Run,
    manifest: ManifestWriter,
    workers: usize,
    make_worker: &F,
    progress: &(dyn Progress + Sync),
    interrupted: &(dyn Fn() -> bool + Sync),
) -> Result<Outcome, CampaignError>
where
    E: Engine,
    F: Fn(usize) -> Result<Worker<E>, CampaignError> + Sync,
{
    let workers = workers.max(1);
    let decoders = decoder_count(run.output, workers);
    // The workers' batch sizes are added as their engines come up.
    let shared = Shared::new(run, decoders);
    let (jobs_tx, jobs_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<Completion>();
    let ready = Barrier::new(workers);
    let setup_error: Mutex<Option<CampaignError>> = Mutex::new(None);
    let counts = std::thread::scope(|s| {
        for _ in 0..decoders {
            s.spawn(|| shared.prefetch.decode_loop(run));
        }
        let writer = s.spawn(|| writer_loop(&shared, manifest, jobs_rx, done_tx));
        let mut handles = Vec::new();
        for w in 0..workers {
            let jobs = jobs_tx.clone();
            let (shared, ready, setup_error) = (&shared, &ready, &setup_error);
            handles.push(s.spawn(move || {
                let built = catch_unwind(AssertUnwindSafe(|| make_worker(w))).unwrap_or_else(|p| {
                    Err(CampaignError::WorkerPanic {
                        worker: w,
                        message: panic_message(&*p),
                    })
                });
                let worker = match built {
                    Ok(worker) => {
                        shared.prefetch.grow_lookahead(worker.batch_size.max(1));
                        shared
                            .writer_gate
                            .allow_batches_of(worker.batch_size.max(1));
                        if let Some(t) = run.timeline {
                            t.worker_ready(WorkerTiming {
                                worker: w,
                                device: worker.name.clone(),
                                batch_size: worker.batch_size,
                                batch_tokens: worker.batch_tokens,
                                batch_memory_bytes: worker.batch_memory.map(|m| m.bytes),
                                ready_at: t.now(),
                            });
                        }
                        Some(worker)
                    }
                    Err(e) => {
                        setup_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        None
                    }
                };
                ready.wait();
                let failed = setup_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some();
                if failed {
                    shared.halt();
                    return;
                }
                let worker = worker.expect("no set-up error");
                engine_worker(
                    w,
                    &worker.engine,
                    BatchLimit {
                        images: worker.batch_size,
                        tokens: worker.batch_tokens,
                        memory: worker.batch_memory,
                    },
                    shared,
                    progress,
                    interrupted,
                    jobs,
                    &|| {},
                );
                if let Some(t) = run.timeline {
                    t.kernel_choices(w, worker.engine.kernel_choices());
                }
            }));
        }
        drop(jobs_tx);
        // Completions arrive until the writer ends, which is when every worker has ended.
        for c in done_rx.iter() {
            deliver(progress, c);
        }
        for h in handles {
            join(h);
        }
        shared.prefetch.stop();
        join(writer)
    })?;
    if let Some(e) = setup_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(Outcome {
        ok: counts.ok,
        failed: counts.failed,
        interrupted: shared.interrupted.load(Ordering::SeqCst),
        device_lost: shared.device_lost.load(Ordering::SeqCst),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoders_are_one_per_cpu_at_most_eight_per_worker_unless_given() {
        let mut output = OutputOptions::new(std::path::PathBuf::from("out"));
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        for workers in [0, 1, 2, 8] {
            let n = decoder_count(&output, workers);
            assert_eq!(n, cpus.clamp(1, 8 * workers.max(1)), "{workers} workers");
        }
        output.decoders = 3;
        assert_eq!(decoder_count(&output, 8), 3);
    }
}
