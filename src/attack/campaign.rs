//! An attack over a set of images: read each one, attack it, save it within ε, record it.
//!
//! One image's failure (unreadable file, image smaller than a patch, a missing `--init from:`
//! start, even an internal panic) is recorded in the manifest and the run goes on.
//!
//! Runs are resumable and crash-safe: an image's manifest line is appended only after its
//! outputs have been renamed into place, the manifest is synced at every batch boundary, and a
//! re-run into the same output directory skips every input whose latest manifest record is `ok`
//! and whose output files exist. An interrupt (see [`run_campaign_interruptible`]) is honoured
//! between batches and between steps: the batch in flight is abandoned, nothing half-done is
//! written, and the manifest is synced.
//!
//! The run is a pipeline (`attack/pipeline.rs`): decoder threads read ahead, a writer thread
//! writes outputs and the manifest, and one engine worker per device attacks in between
//! ([`Campaign::run`] for one engine on the calling thread, [`Campaign::run_on_workers`] for one
//! per device). Outputs and records do not depend on the number of workers.
//!
//! With tar-shard inputs and [`OutputLayout::Tar`], each image is staged as a file in
//! `<output>/.<shard>.tar.parts/` (written and recorded exactly like a tree-layout output), and
//! once every input of a shard has a record the output shard `<output>/<shard>.tar` is assembled
//! from the staged images, the images an earlier assembly already holds, and the samples' other
//! members, written atomically, and the staging directory removed (see [`assemble_tars`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::engine::{Engine, EngineError, StageKey};
use super::image::{check_image_size, Attack, Planar};
use super::loss::Objective;
use super::pipeline::{self, Claimed};
use super::profile::{BatchPhases, Timeline};
use super::settings::{AttackSettings, Init};
use crate::io::inputs::staging_dir_name;
use crate::io::webdataset::{tar_index, write_tar_atomic, MemberData, OutputLookup};
use crate::io::{
    self, output_rel_path, planar_to_interleaved, read_item, read_manifest_detailed,
    write_float_safetensors_atomic, write_png_atomic, InputItem, IoError, ManifestRecord,
    ManifestWriter, OutputLayout, RgbImage, Status, DEFAULT_MAX_PIXELS, MANIFEST_FILE,
};
use crate::model::Model;
use crate::rng::ImageRng;

/// Where and how to write results.
pub struct OutputOptions {
    pub dir: PathBuf,
    /// Also write the unquantised float image as `<rel>.safetensors`.
    pub save_float: bool,
    /// Images attacked together in one engine call per step (at most).
    pub batch_size: usize,
    /// At most this many tokens per batch, counted at each image's working size (see
    /// `--batch-tokens`); a batch always takes at least one image. `None`: only `batch_size`.
    pub batch_tokens: Option<usize>,
    /// A device-memory budget per batch (`--batch-size auto` on a GPU); `None`: none.
    pub batch_memory: Option<MemoryBudget>,
    /// Where outputs go (tree, or tar shards for tar inputs).
    pub layout: OutputLayout,
    /// `--max-pixels`: inputs whose header announces more pixels fail without being decoded.
    pub max_pixels: u64,
    /// Threads that read and decode the next images while the engine works (0: one per CPU,
    /// at most 8).
    pub decoders: usize,
}

impl OutputOptions {
    /// Tree layout, the default pixel budget, one image per batch, no float outputs.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        OutputOptions {
            dir: dir.into(),
            save_float: false,
            batch_size: 1,
            batch_tokens: None,
            batch_memory: None,
            layout: OutputLayout::Tree,
            max_pixels: DEFAULT_MAX_PIXELS,
            decoders: 0,
        }
    }
}

/// Device memory a batch may take, and what one image costs of it: `per_token` bytes for each
/// token at its working size (activations, features, gradients), plus `per_native_pixel` for
/// each pixel at its native size (the engine holds a few fp32 images per image at that size:
/// the clean and adversarial images, the gradient, the optimiser's state). A batch takes
/// images, in input order, while their costs fit in `bytes`; the first image always joins
/// (an image that does not fit alone fails cleanly when it runs out of memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    pub bytes: usize,
    pub per_token: usize,
    pub per_native_pixel: usize,
}

impl MemoryBudget {
    /// The bytes an image of `tokens` tokens (at its working size) and `native_pixels` pixels
    /// costs.
    pub fn cost(&self, tokens: usize, native_pixels: usize) -> usize {
        tokens
            .saturating_mul(self.per_token)
            .saturating_add(native_pixels.saturating_mul(self.per_native_pixel))
    }
}

/// Counts at the end of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CampaignSummary {
    /// Images attacked and saved by this run.
    pub ok: usize,
    /// Images that failed in this run (each has an `error` manifest record).
    pub failed: usize,
    /// Images skipped because an earlier run already finished them (`ok` record, files there).
    pub skipped: usize,
    /// The run stopped early on an interrupt; the images not reached are left for a re-run.
    pub interrupted: bool,
    /// The run stopped early because a device failed for good (an illegal address, a device
    /// error: the CUDA context is gone), after saying so on stderr. As for an interrupt, the
    /// batches in flight are abandoned, everything finished before is saved and recorded, and
    /// a re-run resumes.
    pub device_lost: bool,
}

/// Observer of a run's progress (a progress bar, or nothing).
///
/// With [`Campaign::run`] every call comes from the calling thread. With
/// [`Campaign::run_on_workers`] (which asks for `Progress + Sync`) the engine workers call
/// `image_started`, `steps_done` and `batch_shrunk` from their threads, and the calling thread
/// calls `skipped`, `loss_curve` and `image_done` (in input order).
pub trait Progress {
    /// `images` inputs were already done by an earlier run and are skipped.
    fn skipped(&self, _images: usize) {}
    /// Inputs recorded as done are attacked again, for the reasons counted.
    fn redone_on_resume(&self, _redone: RedoneOnResume) {}
    fn image_started(&self, _rel: &str) {}
    /// `image_steps` more image-steps are done (one batch step).
    fn steps_done(&self, _image_steps: usize) {}
    fn image_done(&self, _record: &ManifestRecord) {}
    /// Whether [`Progress::loss_curve`] is wanted. Recording costs the GPU engine a host sync
    /// per step, so the default is no.
    fn wants_loss_curves(&self) -> bool {
        false
    }
    /// With [`Progress::wants_loss_curves`]: image `rel`'s loss curve, called before its
    /// `image_done`. `losses[k]` for k < steps is the loss before step k (see
    /// [`AttackOutcome::losses`](crate::attack::image::AttackOutcome::losses)); the last value, `losses[steps]`, is the saved image's loss
    /// (the manifest's `loss_final`).
    fn loss_curve(&self, _rel: &str, _losses: &[f64]) {}
    /// The device ran out of memory: batches are now `size` images, and the `redone`
    /// image-steps already reported for the abandoned batch will be reported again.
    fn batch_shrunk(&self, _size: usize, _redone: usize) {}
}

/// A [`Progress`] that shows nothing.
pub struct Silent;
impl Progress for Silent {}

/// Attacks every item in batches, writing outputs and one manifest line each (in input order).
///
/// Inputs already finished by an earlier run into the same directory are skipped (see
/// [`already_done`]).
pub fn run_campaign<E: Engine>(
    engine: &E,
    objective: &Objective,
    settings: &AttackSettings,
    items: &[InputItem],
    output: &OutputOptions,
    progress: &dyn Progress,
) -> Result<CampaignSummary, IoError> {
    run_campaign_interruptible(
        engine,
        objective,
        settings,
        items,
        output,
        progress,
        &|| false,
    )
}

/// [`run_campaign`] that stops early once `interrupted()` returns true. It is polled before
/// every batch and after every step; a batch interrupted mid-attack is abandoned (nothing of it
/// is written or recorded), a batch whose attack finished is written out completely. The
/// manifest is synced before returning and [`CampaignSummary::interrupted`] is set.
pub fn run_campaign_interruptible<E: Engine>(
    engine: &E,
    objective: &Objective,
    settings: &AttackSettings,
    items: &[InputItem],
    output: &OutputOptions,
    progress: &dyn Progress,
    interrupted: &dyn Fn() -> bool,
) -> Result<CampaignSummary, IoError> {
    Campaign {
        objective,
        settings,
        items,
        output,
        timeline: None,
    }
    .run(engine, progress, interrupted)
}

/// A campaign's errors: the output directory or the manifest cannot be written, or an engine
/// worker cannot start (then nothing was attacked).
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("engine worker {worker} ({device}) cannot start: {source}")]
    WorkerSetup {
        worker: usize,
        device: String,
        #[source]
        source: EngineError,
    },
    #[error("engine worker {worker} failed while starting (please report): {message}")]
    WorkerPanic { worker: usize, message: String },
}

/// One engine worker of [`Campaign::run_on_workers`]: its engine, its batch limits (sized for
/// its device), and a name for the profile.
pub struct Worker<E> {
    pub engine: E,
    pub batch_size: usize,
    /// The worker's token budget per batch (see [`OutputOptions::batch_tokens`]).
    pub batch_tokens: Option<usize>,
    /// The worker's device-memory budget per batch (see [`OutputOptions::batch_memory`]).
    pub batch_memory: Option<MemoryBudget>,
    pub name: String,
}

/// A campaign: what to attack, how, and where the results go. [`run_campaign`] and
/// [`run_campaign_interruptible`] are shorthands for [`Campaign::run`].
///
/// The run is a pipeline (see `attack/pipeline.rs`): decoder threads read the next images while
/// the engine attacks, and a writer thread writes the outputs and the manifest while the engine
/// attacks the next batch.
pub struct Campaign<'a> {
    pub objective: &'a Objective,
    pub settings: &'a AttackSettings,
    pub items: &'a [InputItem],
    pub output: &'a OutputOptions,
    /// Record every batch's timestamps here (`prm attack --profile`).
    pub timeline: Option<&'a Timeline>,
}

impl Campaign<'_> {
    /// Runs the campaign on one engine, on the calling thread (so neither the engine nor the
    /// progress needs to be shared between threads), with `output.batch_size` images per batch.
    pub fn run<E: Engine>(
        &self,
        engine: &E,
        progress: &dyn Progress,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<CampaignSummary, IoError> {
        let (manifest, todo, mut summary) = self.prepare(progress)?;
        let run = self.pipeline_run(&todo, &engine.model().config);
        let outcome = pipeline::run_here(&run, manifest, engine, progress, interrupted)?;
        self.finish(&mut summary, outcome)?;
        Ok(summary)
    }

    /// Runs the campaign on `workers` engines at once (one per device), each on its own thread
    /// and built there by `make_worker(w)` for w in 0..workers, pulling batches from one queue.
    /// Each image is attacked exactly once, by whichever worker claims it; outputs do not depend
    /// on which one (every random draw is per image). `model` is the model every engine runs
    /// (the decoders check image sizes against its patch). Every engine is built before the first
    /// image is attacked; if one cannot be, nothing is attacked and its error is returned.
    pub fn run_on_workers<E, F>(
        &self,
        workers: usize,
        model: &Model,
        make_worker: F,
        progress: &(dyn Progress + Sync),
        interrupted: &(dyn Fn() -> bool + Sync),
    ) -> Result<CampaignSummary, CampaignError>
    where
        E: Engine,
        F: Fn(usize) -> Result<Worker<E>, CampaignError> + Sync,
    {
        let (manifest, todo, mut summary) = self.prepare(progress)?;
        let run = self.pipeline_run(&todo, &model.config);
        let outcome =
            pipeline::run_on_threads(&run, manifest, workers, &make_worker, progress, interrupted)?;
        self.finish(&mut summary, outcome)?;
        Ok(summary)
    }

    fn pipeline_run<'r>(
        &'r self,
        todo: &'r [InputItem],
        config: &crate::model::VisionConfig,
    ) -> pipeline::Run<'r> {
        pipeline::Run {
            todo,
            objective: self.objective,
            settings: self.settings,
            output: self.output,
            patch: config.patch,
            class_tokens: config.class_tokens(),
            timeline: self.timeline,
        }
    }

    /// Opens the manifest and finds what is left to do.
    fn prepare(
        &self,
        progress: &dyn Progress,
    ) -> Result<(ManifestWriter, Vec<InputItem>, CampaignSummary), IoError> {
        // Opening the writer first cuts off a partial last line left by a crash.
        let manifest = ManifestWriter::open(&self.output.dir)?;
        let (done, redone) = done_and_changed(self.output, self.items)?;
        if redone != RedoneOnResume::default() {
            progress.redone_on_resume(redone);
        }
        let todo: Vec<InputItem> = self
            .items
            .iter()
            .filter(|item| !done.contains(&item.rel))
            .cloned()
            .collect();
        let summary = CampaignSummary {
            skipped: self.items.len() - todo.len(),
            ..CampaignSummary::default()
        };
        if summary.skipped > 0 {
            progress.skipped(summary.skipped);
        }
        Ok((manifest, todo, summary))
    }

    /// Tars and clean-up after the pipeline ended.
    fn finish(
        &self,
        summary: &mut CampaignSummary,
        outcome: pipeline::Outcome,
    ) -> Result<(), IoError> {
        summary.ok = outcome.ok;
        summary.failed = outcome.failed;
        summary.interrupted = outcome.interrupted;
        summary.device_lost = outcome.device_lost;
        if !summary.interrupted && !summary.device_lost {
            if self.output.layout == OutputLayout::Tar {
                assemble_tars(self.output, self.items)?;
            }
            remove_stale_temporaries(self.output, self.items);
        }
        if let Some(t) = self.timeline {
            t.finish();
        }
        Ok(())
    }
}

/// The relative paths among `items` that an earlier run into `dir` finished: the latest
/// manifest record for the input is `ok` and its output file (and, with `save_float`, the
/// float file) exists. A missing manifest means nothing is done; a partial last line (a crash
/// mid-write) is ignored.
pub fn already_done(
    dir: &Path,
    items: &[InputItem],
    save_float: bool,
) -> Result<HashSet<String>, IoError> {
    let mut output = OutputOptions::new(dir);
    output.save_float = save_float;
    already_done_in(&output, items)
}

/// [`already_done`] for any layout: for the tar layout the image must be in the assembled
/// output tar or staged beside it.
pub fn already_done_in(
    output: &OutputOptions,
    items: &[InputItem],
) -> Result<HashSet<String>, IoError> {
    done_and_changed(output, items).map(|(done, _)| done)
}

/// Inputs recorded as done that a resume attacks again, by reason (each said in a note, so that
/// a re-run that redoes a campaign says why).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedoneOnResume {
    /// The input's size changed since its record (another image under the same name, or this
    /// one edited).
    pub changed: usize,
    /// The record names another output layout's file (`--output-layout` differs from the run
    /// that made it).
    pub other_layout: usize,
    /// The image is there, but `--save-float` asks for its float file, which is not.
    pub no_float: usize,
}

/// [`already_done_in`], and the inputs recorded as done that are to be attacked again, by
/// reason.
fn done_and_changed(
    output: &OutputOptions,
    items: &[InputItem],
) -> Result<(HashSet<String>, RedoneOnResume), IoError> {
    let dir = output.dir.as_path();
    let save_float = output.save_float;
    let path = dir.join(MANIFEST_FILE);
    let contents = match read_manifest_detailed(&path) {
        Ok(c) => c,
        Err(IoError::NotFound { .. }) => return Ok((HashSet::new(), RedoneOnResume::default())),
        Err(e) => return Err(e),
    };
    let mut latest: HashMap<&str, &ManifestRecord> = HashMap::new();
    for r in &contents.records {
        latest.insert(r.input.as_str(), r);
    }
    let lookup = OutputLookup::new(dir);
    let mut done = HashSet::new();
    let mut redone = RedoneOnResume::default();
    for item in items {
        let Some(r) = latest.get(item.rel.as_str()) else {
            continue;
        };
        if r.status != Status::Ok {
            continue;
        }
        // Another image under the same name (or this one edited) since it was attacked: its
        // output is not this input's.
        if r.input_bytes.is_some() && r.input_bytes != input_bytes(item) {
            redone.changed += 1;
            continue;
        }
        let finished = if item.member.is_some() {
            // The record must name this layout's output, and it must be there.
            let float_ok = |found: &io::webdataset::Found| -> Result<bool, IoError> {
                if !save_float {
                    return Ok(true);
                }
                Ok(match found {
                    io::webdataset::Found::File(p) => p.with_extension("safetensors").is_file(),
                    io::webdataset::Found::Member { tar, .. } => {
                        let name = output_rel_path(item.member.as_ref().unwrap().name());
                        let float = format!("{}.safetensors", name.trim_end_matches(".png"));
                        lookup.tar_index(tar)?.contains_key(&float)
                    }
                })
            };
            if r.output.as_deref() != Some(output.layout.output_rel(item).as_str()) {
                redone.other_layout += 1;
                false
            } else {
                match lookup.find(item, Some(output.layout))? {
                    Some(found) => {
                        let float = float_ok(&found)?;
                        redone.no_float += usize::from(!float);
                        float
                    }
                    None => false,
                }
            }
        } else {
            let png = dir.join(
                r.output
                    .clone()
                    .unwrap_or_else(|| output_rel_path(&item.rel)),
            );
            // One look at the file system per record: a resume of a large campaign on a network
            // file system pays for each.
            let image = png.is_file();
            let float = !save_float || png.with_extension("safetensors").is_file();
            redone.no_float += usize::from(image && !float);
            image && float
        };
        if finished {
            done.insert(item.rel.clone());
        }
    }
    Ok((done, redone))
}

/// Writes `<output>/<shard>.tar` for every tar shard among `items` that has new staged images
/// (or no output tar yet), once every one of its inputs has a manifest record. Samples whose
/// image's latest record is `ok` go in, in input order: the adversarial `<key>.png` (from the
/// staging directory, or from the output tar an earlier run assembled), its `<key>.safetensors`
/// with `--save-float`, and the sample's other members copied from the input tar. Samples whose
/// image failed or was excluded are left out. The tar is written atomically; the staging
/// directory is then removed. Returns the number of tars written.
pub fn assemble_tars(output: &OutputOptions, items: &[InputItem]) -> Result<usize, IoError> {
    let contents = match read_manifest_detailed(&output.dir.join(MANIFEST_FILE)) {
        Ok(c) => c,
        Err(IoError::NotFound { .. }) => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut latest: HashMap<&str, &ManifestRecord> = HashMap::new();
    for r in &contents.records {
        latest.insert(r.input.as_str(), r);
    }
    // Items per shard, in input order.
    let mut shards: Vec<(
        std::sync::Arc<io::webdataset::TarShard>,
        HashMap<usize, &InputItem>,
    )> = Vec::new();
    for item in items {
        let Some(m) = &item.member else { continue };
        match shards.iter_mut().find(|(s, _)| s.rel == m.shard.rel) {
            Some((_, map)) => {
                map.insert(m.entry, item);
            }
            None => shards.push((m.shard.clone(), HashMap::from([(m.entry, item)]))),
        }
    }
    let mut written = 0;
    for (shard, by_entry) in shards {
        let staging = output.dir.join(staging_dir_name(&shard.rel));
        let target = output.dir.join(&shard.rel);
        if target.is_file() && !staging.is_dir() {
            continue; // nothing new since the last assembly
        }
        if by_entry
            .values()
            .any(|i| !latest.contains_key(i.rel.as_str()))
        {
            continue; // not finished (a failure to record, or another process's share)
        }
        let old = tar_index(&target)?;
        let source = |name: &str| -> Option<MemberData> {
            let staged = staging.join(name);
            if let Ok(meta) = std::fs::metadata(&staged) {
                if meta.is_file() {
                    return Some(MemberData::Range(staged, 0, meta.len()));
                }
            }
            old.get(name)
                .map(|&(offset, size)| MemberData::Range(target.clone(), offset, size))
        };
        let mut ok_keys: HashSet<&str> = HashSet::new();
        let mut members = Vec::new();
        let mut images: HashMap<usize, Vec<(String, MemberData)>> = HashMap::new();
        for (i, e) in shard.entries.iter().enumerate() {
            let Some(item) = by_entry.get(&i) else {
                continue;
            };
            if latest.get(item.rel.as_str()).map(|r| r.status) != Some(Status::Ok) {
                continue;
            }
            let png = output_rel_path(&e.name);
            let Some(data) = source(&png) else { continue };
            let mut parts = vec![(png.clone(), data)];
            if output.save_float {
                let float = format!("{}.safetensors", png.trim_end_matches(".png"));
                if let Some(d) = source(&float) {
                    parts.push((float, d));
                }
            }
            ok_keys.insert(e.key.as_str());
            images.insert(i, parts);
        }
        for (i, e) in shard.entries.iter().enumerate() {
            if let Some(parts) = images.remove(&i) {
                members.extend(parts);
            } else if !e.image && ok_keys.contains(e.key.as_str()) {
                members.push((
                    e.name.clone(),
                    MemberData::Range(shard.path.clone(), e.offset, e.size),
                ));
            }
        }
        write_tar_atomic(&target, members)?;
        written += 1;
        if staging.is_dir() {
            let _ = std::fs::remove_dir_all(&staging);
        }
    }
    Ok(written)
}

/// Removes temporary files (`.<name>.XXXX.tmp`, see the atomic writers) that a killed run left
/// beside this run's outputs. Only the temporaries of `items`' own outputs are touched, so a
/// shard sharing the directory keeps its in-flight files. Best effort: errors are ignored.
fn remove_stale_temporaries(output: &OutputOptions, items: &[InputItem]) {
    let dir = output.dir.as_path();
    let mut by_dir: HashMap<PathBuf, HashSet<String>> = HashMap::new();
    for item in items {
        if let (Some(m), OutputLayout::Tar) = (&item.member, output.layout) {
            // The output tar's own temporaries.
            let tar = dir.join(&m.shard.rel);
            if let (Some(parent), Some(name)) = (tar.parent(), tar.file_name()) {
                by_dir
                    .entry(parent.to_path_buf())
                    .or_default()
                    .insert(format!(".{}.", name.to_string_lossy()));
            }
        }
        let png = dir.join(output.layout.file_rel(item));
        let (Some(parent), Some(name)) = (png.parent(), png.file_name()) else {
            continue;
        };
        let names = by_dir.entry(parent.to_path_buf()).or_default();
        names.insert(format!(".{}.", name.to_string_lossy()));
        if let Some(f) = png.with_extension("safetensors").file_name() {
            names.insert(format!(".{}.", f.to_string_lossy()));
        }
    }
    for (parent, prefixes) in by_dir {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp")
                && prefixes.iter().any(|p| name.starts_with(p.as_str()))
                && entry.file_type().is_ok_and(|t| t.is_file())
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

pub(super) fn error_record(
    item: &InputItem,
    failure: ImageFailure,
    seconds: f64,
) -> ManifestRecord {
    let (width, height) = failure.size.unwrap_or((0, 0));
    ManifestRecord {
        input: item.rel.clone(),
        output: None,
        status: Status::Error,
        error: Some(failure.message),
        width,
        height,
        loss_initial: None,
        loss_final: None,
        layer_cosine: None,
        linf: None,
        steps: 0,
        seconds,
        input_bytes: None,
    }
}

/// Why one image failed, and its size when it was read.
#[derive(Clone)]
pub(super) struct ImageFailure {
    pub message: String,
    pub size: Option<(usize, usize)>,
}

impl ImageFailure {
    pub(super) fn sized(message: impl ToString, img: &RgbImage) -> Self {
        ImageFailure {
            message: message.to_string(),
            size: Some((img.width, img.height)),
        }
    }
}

pub(super) use crate::panic_message;

/// Reads the `--init from:` start for `item` (a tree-layout file, or for tar inputs a member of
/// an output tar or a staged file), which must have the clean image's size.
fn read_start(
    dir: &Path,
    item: &InputItem,
    clean: &RgbImage,
    max_pixels: u64,
) -> Result<RgbImage, ImageFailure> {
    let fail = |e: &dyn std::fmt::Display| ImageFailure::sized(format!("--init from: {e}"), clean);
    let path = dir.join(OutputLayout::Tree.output_rel(item));
    let found = OutputLookup::new(dir)
        .find(item, None)
        .map_err(|e| fail(&e))?
        .ok_or_else(|| fail(&IoError::NotFound { path: path.clone() }))?;
    let start = found
        .decode(max_pixels)
        .map(|img| io::image::dynamic_to_rgb(&img))
        .map_err(|e| fail(&e))?;
    if (start.width, start.height) != (clean.width, clean.height) {
        return Err(ImageFailure::sized(
            format!(
                "--init from: {} is {}x{} but the clean image is {}x{}",
                path.display(),
                start.width,
                start.height,
                clean.width,
                clean.height
            ),
            clean,
        ));
    }
    Ok(start)
}

/// A clean image ready to attack, with its optional `--init from:` start.
pub(super) struct Loaded {
    /// The input's relative path (keys its random draws).
    pub rel: String,
    /// Its size in bytes, for the manifest ([`input_bytes`]).
    pub input_bytes: Option<u64>,
    pub clean: RgbImage,
    pub start: Option<RgbImage>,
}

/// The size in bytes of `item` as it is now: the file's, or the tar member's as listed. `None`
/// when the file cannot be read (the image's own read then says why).
pub fn input_bytes(item: &InputItem) -> Option<u64> {
    match &item.member {
        Some(m) => m.shard.entries.get(m.entry).map(|e| e.size),
        None => std::fs::metadata(&item.path).ok().map(|m| m.len()),
    }
}

pub(super) fn load(
    item: &InputItem,
    settings: &AttackSettings,
    patch: usize,
    max_pixels: u64,
) -> Result<Loaded, ImageFailure> {
    let clean = read_item(item, max_pixels).map_err(|e| ImageFailure {
        message: e.to_string(),
        size: None,
    })?;
    check_image_size(clean.height, clean.width, patch)
        .map_err(|e| ImageFailure::sized(e, &clean))?;
    let start = match &settings.init {
        Init::From(dir) => Some(read_start(dir, item, &clean, max_pixels)?),
        _ => None,
    };
    Ok(Loaded {
        rel: item.rel.clone(),
        input_bytes: input_bytes(item),
        clean,
        start,
    })
}

/// What became of one batch: a result per image, or an out-of-memory error before anything was
/// handed on (the worker retries smaller).
pub(super) enum BatchResult {
    /// One result per image, and where the batch's engine time went (`None` when the engine
    /// failed before the attack finished).
    Done(Vec<Finished>, Option<BatchPhases>),
    OutOfMemory,
    /// The device failed for good ([`EngineError::ends_the_device`]): nothing of the batch is
    /// recorded, and the run stops.
    DeviceLost(String),
}

/// One image of a batch, done with the engine: attacked and evaluated, or failed.
pub(super) struct Finished {
    /// Index among the run's inputs.
    pub index: usize,
    pub result: Result<Attacked, ImageFailure>,
}

/// An attacked image, ready for the writer.
pub(super) struct Attacked {
    pub width: usize,
    pub height: usize,
    /// Quantised within ε, planar.
    pub saved: Vec<u8>,
    /// The unquantised image, with `--save-float`.
    pub float: Option<RgbImage>,
    /// Its manifest record, but for `output` and `seconds` (the writer fills them in).
    pub record: ManifestRecord,
    /// The loss curve, when the progress asked for it.
    pub curve: Option<Vec<f64>>,
}

/// The key a batch's clean images are staged under ([`Engine::stage`]) and those images: the
/// batch's successfully decoded images, in batch order (exactly the images [`attack_batch`]
/// attacks).
pub(super) fn staged_input(run: u64, batch: &[Claimed]) -> (StageKey, Vec<Planar<'_>>) {
    let ok: Vec<(usize, &Loaded)> = batch
        .iter()
        .filter_map(|c| c.loaded.as_ref().ok().map(|l| (c.index, l)))
        .collect();
    let key = StageKey {
        run,
        images: ok.iter().map(|&(i, _)| i).collect(),
    };
    let clean = ok
        .iter()
        .map(|(_, l)| Planar {
            data: &l.clean.data,
            height: l.clean.height,
            width: l.clean.width,
        })
        .collect();
    (key, clean)
}

/// Attacks one batch of decoded images (an image that failed to decode keeps its failure); one
/// result per image, in order. Quantisation and the evaluation of the saved images happen here,
/// since they need the engine; writing is left to the writer.
/// `run` identifies the run, for an upload the engine staged for this batch.
#[allow(clippy::too_many_arguments)]
pub(super) fn attack_batch<E: Engine>(
    engine: &E,
    run: u64,
    objective: &Objective,
    settings: &AttackSettings,
    batch: &[Claimed],
    on_step: &dyn Fn(usize),
    curves: bool,
    save_float: bool,
) -> BatchResult {
    let ok: Vec<(usize, &Loaded)> = batch
        .iter()
        .enumerate()
        .filter_map(|(j, c)| c.loaded.as_ref().ok().map(|l| (j, l)))
        .collect();
    let mut results: Vec<Result<Attacked, ImageFailure>> = batch
        .iter()
        .map(|c| match &c.loaded {
            Ok(_) => Err(ImageFailure {
                message: "not attacked".into(),
                size: None,
            }),
            Err(e) => Err(e.clone()),
        })
        .collect();
    let done = |results: Vec<Result<Attacked, ImageFailure>>, phases: Option<BatchPhases>| {
        BatchResult::Done(
            batch
                .iter()
                .zip(results)
                .map(|(c, result)| Finished {
                    index: c.index,
                    result,
                })
                .collect(),
            phases,
        )
    };
    if ok.is_empty() {
        return done(results, None);
    }
    let clock = Instant::now();
    let mut phases = BatchPhases::default();
    let mut lap = {
        let mut last = clock;
        move || {
            let now = Instant::now();
            let secs = (now - last).as_secs_f64();
            last = now;
            secs
        }
    };
    let images = ok
        .iter()
        .map(|&(_, l)| {
            let planar = Planar {
                data: &l.clean.data,
                height: l.clean.height,
                width: l.clean.width,
            };
            (planar, ImageRng::new(settings.seed, &l.rel))
        })
        .collect();
    let engine_failure = |e: &dyn std::fmt::Display, l: &Loaded| {
        ImageFailure::sized(format!("engine error: {e}"), &l.clean)
    };
    let mut attack = match Attack::new(engine, objective, settings, images) {
        Ok(a) => a,
        Err(e) if e.is_out_of_memory() => return BatchResult::OutOfMemory,
        Err(e) if e.ends_the_device() => return BatchResult::DeviceLost(e.to_string()),
        Err(e) => {
            for &(j, l) in &ok {
                results[j] = Err(engine_failure(&e, l));
            }
            return done(results, None);
        }
    };
    attack.record_losses(curves);
    attack.staged_as(staged_input(run, batch).0);
    let from: Vec<Option<&[f32]>> = ok
        .iter()
        .map(|(_, l)| l.start.as_ref().map(|s| s.data.as_slice()))
        .collect();
    let starts = attack.starts(&from);
    phases.setup_seconds = lap();
    let outcomes = match attack.run_and_save(starts, save_float, |_| on_step(ok.len())) {
        Ok((outcomes, save)) => {
            phases.steps_seconds = save.steps_seconds;
            phases.quantize_seconds = save.quantize_seconds;
            phases.evaluate_seconds = save.evaluate_seconds;
            outcomes
        }
        Err(e) if e.is_out_of_memory() => return BatchResult::OutOfMemory,
        Err(e) if e.ends_the_device() => return BatchResult::DeviceLost(e.to_string()),
        Err(e) => {
            for &(j, l) in &ok {
                results[j] = Err(engine_failure(&e, l));
            }
            return done(results, None);
        }
    };
    for (&(j, l), outcome) in ok.iter().zip(outcomes) {
        let eval = outcome.evaluation;
        let curve = curves.then(|| {
            let mut curve = outcome.losses.clone();
            curve.push(eval.loss);
            curve
        });
        let record = ManifestRecord {
            input: l.rel.clone(),
            output: None,
            status: Status::Ok,
            error: None,
            width: l.clean.width,
            height: l.clean.height,
            loss_initial: Some(outcome.loss_initial),
            loss_final: Some(eval.loss),
            layer_cosine: Some(eval.layer_cosine),
            linf: Some(outcome.linf_255),
            steps: outcome.steps,
            seconds: 0.0,
            input_bytes: l.input_bytes,
        };
        results[j] = Ok(Attacked {
            width: l.clean.width,
            height: l.clean.height,
            saved: outcome.levels,
            float: outcome.adversarial.map(|data| RgbImage {
                width: l.clean.width,
                height: l.clean.height,
                data,
            }),
            record,
            curve,
        });
    }
    done(results, Some(phases))
}

/// Writes the PNG (and the float image with `--save-float`); returns the PNG's relative path.
pub(super) fn write_outputs(
    item: &InputItem,
    image: &Attacked,
    output: &OutputOptions,
) -> Result<String, ImageFailure> {
    let (w, h) = (image.width, image.height);
    let fail = |e: IoError| ImageFailure {
        message: e.to_string(),
        size: Some((w, h)),
    };
    let rel_out = output.layout.output_rel(item);
    let png_path = output.dir.join(output.layout.file_rel(item));
    write_png_atomic(&png_path, w, h, &planar_to_interleaved(&image.saved, w, h)).map_err(fail)?;
    if let Some(float) = &image.float {
        write_float_safetensors_atomic(&png_path.with_extension("safetensors"), float)
            .map_err(fail)?;
    }
    Ok(rel_out)
}
