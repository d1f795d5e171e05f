//! Timestamps of a campaign's pipeline (`prm attack --profile`): when each batch's images were
//! asked for, when they were there, how long the engine worked on them, how long handing them to
//! the writer took, and when the writer had them on disk.
//!
//! The point is one question: **did the engine ever wait for I/O in steady state?** An engine
//! worker waits for input when the decoders are behind (`input_wait`), and for output when the
//! writer's queue is full (`output_wait`). Both should be zero after each worker's first batch
//! (the first batch waits for the first decodes by construction); [`Timeline::report`] says so in
//! numbers, and [`Timeline::to_json`] gives every batch's timestamps for a closer look.
//!
//! On a GPU, the engine's own input is the other half of the question: each batch records
//! whether its clean images were staged ahead on a copy stream while the previous batch ran
//! (`input_staged`) and whether its compute then had to wait for that copy (`copy_pending`).
//!
//! All times are seconds since the timeline was created (the start of the run). Recording costs a
//! few clock reads and one short lock per batch.

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// Where one batch's engine time went (host clock; the device work of each phase is waited for
/// inside it, since each ends in a read-back).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct BatchPhases {
    /// Building the attack and its starts (host work before the first step).
    pub setup_seconds: f64,
    /// Every step, with the upload of the clean images (and, where the float images come
    /// back, their read-back).
    pub steps_seconds: f64,
    /// Rounding the results to 8-bit levels within ε (on the GPU, where it ends with the
    /// levels' read-back; on the host otherwise).
    pub quantize_seconds: f64,
    /// Loss and layer cosines of the saved images (their forward, and the clean features if the
    /// steps did not leave them).
    pub evaluate_seconds: f64,
}

impl BatchPhases {
    fn add(&mut self, o: &BatchPhases) {
        self.setup_seconds += o.setup_seconds;
        self.steps_seconds += o.steps_seconds;
        self.quantize_seconds += o.quantize_seconds;
        self.evaluate_seconds += o.evaluate_seconds;
    }
}

/// One engine batch, as an engine worker saw it.
#[derive(Clone, Debug, Serialize)]
pub struct BatchTiming {
    /// The engine worker (one per device).
    pub worker: usize,
    /// Position (among the run's inputs, skipped ones excluded) of the batch's first image.
    pub first: usize,
    pub images: usize,
    /// The worker asked for the batch's images.
    pub requested_at: f64,
    /// Every image of the batch was decoded and handed over (equal to `requested_at` for a
    /// batch retried in halves after an out-of-memory error: its images were already there).
    pub loaded_at: f64,
    /// The attack, the quantisation and the evaluation of the saved images were done.
    pub engine_done_at: f64,
    /// The batch was in the writer's queue.
    pub queued_at: f64,
    /// Seconds of `queued_at - engine_done_at` spent blocked because the writer's queue was
    /// full (the rest is bookkeeping, and the thread being descheduled on a busy machine).
    pub writer_wait: f64,
    /// Batches waiting in the writer's queue, this one included, when it was queued.
    pub writer_backlog: usize,
    /// The batch ran out of device memory and was retried in smaller batches.
    pub out_of_memory: bool,
    /// While running this batch, the worker staged the next one: its clean images went to
    /// the device on a copy stream while this batch computed (GPU engines only).
    pub staged_next: bool,
    /// Host seconds the worker spent staging the next batch (packing into pinned memory and
    /// queueing the copy), included in `engine_busy`.
    pub stage_seconds: f64,
    /// This batch's clean images had been staged ahead: it uploaded nothing but its small tables.
    pub input_staged: bool,
    /// The staged copy had not finished when this batch took it, so the compute stream waited
    /// for it on the device (never on the simulator, whose copies are synchronous).
    pub copy_pending: bool,
    /// Where the engine time went (absent for a batch that failed or ran out of memory).
    pub phases: Option<BatchPhases>,
}

impl BatchTiming {
    pub fn input_wait(&self) -> f64 {
        self.loaded_at - self.requested_at
    }
    pub fn engine_busy(&self) -> f64 {
        self.engine_done_at - self.loaded_at
    }
    /// Time blocked on a full writer queue.
    pub fn output_wait(&self) -> f64 {
        self.writer_wait
    }
}

/// One batch, as the writer saw it.
#[derive(Clone, Debug, Serialize)]
pub struct WriteTiming {
    pub worker: usize,
    pub first: usize,
    pub images: usize,
    /// The writer took the batch from its queue.
    pub started_at: f64,
    /// Every output of the batch was written and renamed into place, and its manifest lines
    /// that could be appended in input order were appended and synced.
    pub done_at: f64,
}

/// An engine worker's life: set-up (weights upload) and its device.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerTiming {
    pub worker: usize,
    pub device: String,
    pub batch_size: usize,
    /// The worker's token budget per batch, if any.
    pub batch_tokens: Option<usize>,
    /// The worker's device-memory budget per batch in bytes, if any (`--batch-size auto`).
    pub batch_memory_bytes: Option<usize>,
    /// The engine was ready (weights on the device).
    pub ready_at: f64,
}

#[derive(Default)]
struct Records {
    batches: Vec<BatchTiming>,
    writes: Vec<WriteTiming>,
    workers: Vec<WorkerTiming>,
    /// Per worker: the kernels its engine chose by timing them ([`Timeline::kernel_choices`]).
    choices: Vec<(usize, Vec<String>)>,
    finished_at: Option<f64>,
}

/// Collects the timestamps of one run; shared by every thread of the pipeline.
pub struct Timeline {
    start: Instant,
    records: Mutex<Records>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-worker totals of [`Timeline::summary`].
#[derive(Clone, Debug, Serialize)]
pub struct WorkerSummary {
    pub worker: usize,
    pub device: String,
    pub batch_size: usize,
    pub batch_tokens: Option<usize>,
    pub batch_memory_bytes: Option<usize>,
    pub batches: usize,
    pub images: usize,
    /// Weights upload and set-up, from the start of the run.
    pub setup_seconds: f64,
    pub engine_busy_seconds: f64,
    /// `engine_busy_seconds` over the run's wall time.
    pub engine_busy_fraction: f64,
    /// `engine_busy_seconds` over the time from this worker's first request for input to its
    /// last batch queued for writing: how busy it was while it had work.
    pub engine_busy_fraction_active: f64,
    pub input_wait_seconds: f64,
    /// Input wait of every batch but the worker's first: the steady-state figure, zero when the
    /// decoders keep up.
    pub input_wait_after_first_seconds: f64,
    /// Time blocked on a full writer queue: zero when the writer keeps up.
    pub output_wait_seconds: f64,
    /// Batches after the worker's first whose clean images were staged ahead on a copy stream
    /// (GPU engines; 0 for the CPU engine, which has nothing to upload).
    pub input_staged_after_first: usize,
    /// Batches whose staged copy was still running when they took it (the GPU waited for an
    /// upload): zero when the copies keep up.
    pub copy_waits: usize,
    /// Host time spent staging uploads, included in `engine_busy_seconds`.
    pub stage_seconds: f64,
    /// `engine_busy_seconds` by phase, summed over the worker's batches.
    pub phases: BatchPhases,
    /// Kernels the worker's engine chose by timing them on its device, a line each (a GPU
    /// engine under `PRM_ATTENTION=auto`).
    pub kernel_choices: Vec<String>,
}

/// Totals of a run.
#[derive(Clone, Debug, Serialize)]
pub struct TimelineSummary {
    pub wall_seconds: f64,
    pub workers: Vec<WorkerSummary>,
    pub writer_busy_seconds: f64,
    /// The most batches ever waiting in the writer's queue.
    pub writer_backlog_max: usize,
    /// From the last batch queued for writing to the end of the run: writing the tail (and
    /// assembling tars).
    pub drain_seconds: f64,
    /// No worker waited for input after its first batch, nor for the writer at all (up to a
    /// millisecond per batch plus 0.5% of its busy time: scheduling noise), and no batch's
    /// compute waited for its staged upload.
    pub engine_never_waited_in_steady_state: bool,
}

impl Timeline {
    pub fn new() -> Self {
        Timeline {
            start: Instant::now(),
            records: Mutex::new(Records::default()),
        }
    }

    /// Seconds since the start of the run.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Records) -> R) -> R {
        f(&mut self.records.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn worker_ready(&self, timing: WorkerTiming) {
        self.with(|r| r.workers.push(timing));
    }

    /// Records the kernels worker `worker`'s engine chose by timing (when it ends).
    pub fn kernel_choices(&self, worker: usize, lines: Vec<String>) {
        self.with(|r| r.choices.push((worker, lines)));
    }

    pub fn batch(&self, timing: BatchTiming) {
        self.with(|r| r.batches.push(timing));
    }

    pub fn write(&self, timing: WriteTiming) {
        self.with(|r| r.writes.push(timing));
    }

    /// Marks the end of the run (after the last output and the manifest sync).
    pub fn finish(&self) {
        let t = self.now();
        self.with(|r| r.finished_at = Some(t));
    }

    pub fn batches(&self) -> Vec<BatchTiming> {
        self.with(|r| r.batches.clone())
    }

    pub fn summary(&self) -> TimelineSummary {
        let now = self.now();
        self.with(|r| {
            let wall = r.finished_at.unwrap_or(now).max(1e-9);
            let mut workers: Vec<WorkerSummary> = r
                .workers
                .iter()
                .map(|w| {
                    let mine: Vec<&BatchTiming> =
                        r.batches.iter().filter(|b| b.worker == w.worker).collect();
                    let busy: f64 = mine.iter().map(|b| b.engine_busy()).sum();
                    let first_request =
                        mine.iter().map(|b| b.requested_at).fold(f64::MAX, f64::min);
                    let last_queued = mine.iter().map(|b| b.queued_at).fold(0.0, f64::max);
                    let active = (last_queued - first_request).max(1e-9);
                    let waits: Vec<f64> = mine.iter().map(|b| b.input_wait()).collect();
                    WorkerSummary {
                        worker: w.worker,
                        device: w.device.clone(),
                        batch_size: w.batch_size,
                        batch_tokens: w.batch_tokens,
                        batch_memory_bytes: w.batch_memory_bytes,
                        batches: mine.iter().filter(|b| !b.out_of_memory).count(),
                        images: mine
                            .iter()
                            .filter(|b| !b.out_of_memory)
                            .map(|b| b.images)
                            .sum(),
                        setup_seconds: w.ready_at,
                        engine_busy_seconds: busy,
                        engine_busy_fraction: busy / wall,
                        engine_busy_fraction_active: if mine.is_empty() {
                            0.0
                        } else {
                            busy / active
                        },
                        // Folded from +0.0: an empty f64 sum is -0.0, printed as "-0.000".
                        input_wait_seconds: waits.iter().fold(0.0, |a, w| a + w),
                        input_wait_after_first_seconds: waits
                            .iter()
                            .skip(1)
                            .fold(0.0, |a, w| a + w),
                        output_wait_seconds: mine.iter().fold(0.0, |a, b| a + b.output_wait()),
                        input_staged_after_first: mine
                            .iter()
                            .skip(1)
                            .filter(|b| b.input_staged)
                            .count(),
                        copy_waits: mine.iter().filter(|b| b.copy_pending).count(),
                        stage_seconds: mine.iter().fold(0.0, |a, b| a + b.stage_seconds),
                        phases: mine.iter().filter_map(|b| b.phases.as_ref()).fold(
                            BatchPhases::default(),
                            |mut sum, p| {
                                sum.add(p);
                                sum
                            },
                        ),
                        kernel_choices: r
                            .choices
                            .iter()
                            .filter(|(worker, _)| *worker == w.worker)
                            .flat_map(|(_, lines)| lines.iter().cloned())
                            .collect(),
                    }
                })
                .collect();
            workers.sort_by_key(|w| w.worker);
            let last_queued = r.batches.iter().map(|b| b.queued_at).fold(0.0, f64::max);
            // A millisecond per batch, plus 0.5% of the busy time, is thread wake-ups and
            // scheduling on a busy machine, not waiting for I/O.
            let steady = workers.iter().all(|w| {
                let noise = 1e-3 * w.batches.max(1) as f64 + 0.005 * w.engine_busy_seconds;
                w.input_wait_after_first_seconds <= noise
                    && w.output_wait_seconds <= noise
                    && w.copy_waits == 0
            });
            TimelineSummary {
                wall_seconds: wall,
                workers,
                writer_busy_seconds: r.writes.iter().map(|w| w.done_at - w.started_at).sum(),
                writer_backlog_max: r
                    .batches
                    .iter()
                    .map(|b| b.writer_backlog)
                    .max()
                    .unwrap_or(0),
                drain_seconds: (wall - last_queued).max(0.0),
                engine_never_waited_in_steady_state: steady,
            }
        })
    }

    /// The summary in words, a few lines for stderr.
    pub fn report(&self) -> String {
        let s = self.summary();
        let mut out = format!(
            "profile: wall {:.3} s, {} engine worker(s); writer busy {:.3} s ({:.0}% of wall), \
             writer backlog max {} batch(es), {:.3} s from the last batch queued to the end\n",
            s.wall_seconds,
            s.workers.len(),
            s.writer_busy_seconds,
            100.0 * s.writer_busy_seconds / s.wall_seconds,
            s.writer_backlog_max,
            s.drain_seconds,
        );
        for w in &s.workers {
            out += &format!(
                "  worker {} ({}, batches of {}): set-up {:.3} s; {} batch(es), {} image(s); \
                 engine busy {:.1}% of wall time ({:.1}% while it had work, {:.3} s); waited \
                 for decoded input {:.3} s in total, {:.3} s after its first batch; waited for \
                 the writer {:.3} s\n",
                w.worker,
                w.device,
                batch_limits(w),
                w.setup_seconds,
                w.batches,
                w.images,
                100.0 * w.engine_busy_fraction,
                100.0 * w.engine_busy_fraction_active,
                w.engine_busy_seconds,
                w.input_wait_seconds,
                w.input_wait_after_first_seconds,
                w.output_wait_seconds,
            );
            let p = &w.phases;
            out += &format!(
                "    engine time by phase: set-up {:.3} s, steps {:.3} s, quantisation {:.3} s, \
                 evaluation {:.3} s\n",
                p.setup_seconds, p.steps_seconds, p.quantize_seconds, p.evaluate_seconds,
            );
            let after_first = w.batches.saturating_sub(1);
            if w.input_staged_after_first > 0 || w.copy_waits > 0 {
                out += &format!(
                    "    uploads: {} of {} batch(es) after the first staged ahead on the copy \
                     stream ({:.3} s of host time); the GPU waited for a copy {} time(s)\n",
                    w.input_staged_after_first, after_first, w.stage_seconds, w.copy_waits,
                );
            }
            for line in &w.kernel_choices {
                out += &format!("    tuned: {line}\n");
            }
        }
        out += if s.engine_never_waited_in_steady_state {
            "  steady state: the engine never waited for input or output after its first batch\n"
        } else {
            "  steady state: the engine WAITED for I/O after its first batch (see the waits above)\n"
        };
        out
    }

    /// The summary and every batch's timestamps, as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let summary = self.summary();
        self.with(|r| {
            serde_json::json!({
                "summary": summary,
                "workers": r.workers,
                "batches": r.batches,
                "writes": r.writes,
            })
        })
    }
}

/// A worker's limits per batch, as the summary prints them: "at most 166 image(s), 16384
/// tokens, 61.2 GiB of device memory".
fn batch_limits(w: &WorkerSummary) -> String {
    let mut limits = format!("at most {} image(s)", w.batch_size);
    if let Some(tokens) = w.batch_tokens {
        limits += &format!(", {tokens} tokens");
    }
    if let Some(bytes) = w.batch_memory_bytes {
        let (value, unit) = if bytes >= 1 << 30 {
            (bytes as f64 / (1u64 << 30) as f64, "GiB")
        } else {
            (bytes as f64 / (1u64 << 20) as f64, "MiB")
        };
        limits += &format!(", {value:.1} {unit} of device memory");
    }
    limits
}
