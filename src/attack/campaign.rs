//! An attack over a set of images: read each one, attack it, save it within ε, record it.
//!
//! One image's failure (unreadable file, image smaller than a patch, a missing `--init from:`
//! start, even an internal panic) is recorded in the manifest and the run goes on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::engine::Engine;
use super::image::{check_image_size, Attack, AttackOutcome, Planar};
use super::loss::Objective;
use super::settings::{AttackSettings, Init};
use crate::io::{
    self, output_rel_path, planar_to_interleaved, quantize_within_eps, read_image,
    write_float_safetensors_atomic, write_png_atomic, InputItem, IoError, ManifestRecord,
    ManifestWriter, RgbImage, Status,
};
use crate::rng::ImageRng;

/// Where and how to write results.
pub struct OutputOptions {
    pub dir: PathBuf,
    /// Also write the unquantised float image as `<rel>.safetensors`.
    pub save_float: bool,
    /// Images attacked together in one engine call per step.
    pub batch_size: usize,
}

/// Counts at the end of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CampaignSummary {
    pub ok: usize,
    pub failed: usize,
}

/// Observer of a run's progress (a progress bar, or nothing).
pub trait Progress {
    fn image_started(&self, _rel: &str) {}
    /// `image_steps` more image-steps are done (one batch step).
    fn steps_done(&self, _image_steps: usize) {}
    fn image_done(&self, _record: &ManifestRecord) {}
}

/// A [`Progress`] that shows nothing.
pub struct Silent;
impl Progress for Silent {}

/// Attacks every item in batches, writing outputs and one manifest line each (in input order).
pub fn run_campaign<E: Engine>(
    engine: &E,
    objective: &Objective,
    settings: &AttackSettings,
    items: &[InputItem],
    output: &OutputOptions,
    progress: &dyn Progress,
) -> Result<CampaignSummary, IoError> {
    let mut manifest = ManifestWriter::open(&output.dir)?;
    let mut summary = CampaignSummary::default();
    for batch in items.chunks(output.batch_size.max(1)) {
        for item in batch {
            progress.image_started(&item.rel);
        }
        let started = Instant::now();
        let records = catch_unwind(AssertUnwindSafe(|| {
            attack_batch(engine, objective, settings, batch, output, progress)
        }))
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let failure = ImageFailure {
                message: format!("internal error (please report): {msg}"),
                size: None,
            };
            batch.iter().map(|_| Err(failure.clone())).collect()
        });
        let seconds = started.elapsed().as_secs_f64() / batch.len() as f64;
        for (item, result) in batch.iter().zip(records) {
            let record = match result {
                Ok(mut record) => {
                    record.seconds = seconds;
                    summary.ok += 1;
                    record
                }
                Err(failure) => {
                    summary.failed += 1;
                    error_record(item, failure, seconds)
                }
            };
            manifest.append(&record)?;
            progress.image_done(&record);
        }
    }
    manifest.sync()?;
    Ok(summary)
}

fn error_record(item: &InputItem, failure: ImageFailure, seconds: f64) -> ManifestRecord {
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
    }
}

#[derive(Clone)]
struct ImageFailure {
    message: String,
    size: Option<(usize, usize)>,
}

impl ImageFailure {
    fn sized(message: impl ToString, img: &RgbImage) -> Self {
        ImageFailure {
            message: message.to_string(),
            size: Some((img.width, img.height)),
        }
    }
}

/// Reads the `--init from:` start for `rel`, which must have the clean image's size.
fn read_start(dir: &Path, rel: &str, clean: &RgbImage) -> Result<RgbImage, ImageFailure> {
    let path = dir.join(output_rel_path(rel));
    let start =
        read_image(&path).map_err(|e| ImageFailure::sized(format!("--init from: {e}"), clean))?;
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
struct Loaded {
    clean: RgbImage,
    start: Option<RgbImage>,
}

fn load(item: &InputItem, settings: &AttackSettings, patch: usize) -> Result<Loaded, ImageFailure> {
    let clean = read_image(&item.path).map_err(|e| ImageFailure {
        message: e.to_string(),
        size: None,
    })?;
    check_image_size(clean.height, clean.width, patch)
        .map_err(|e| ImageFailure::sized(e, &clean))?;
    let start = match &settings.init {
        Init::From(dir) => Some(read_start(dir, &item.rel, &clean)?),
        _ => None,
    };
    Ok(Loaded { clean, start })
}

/// Attacks one batch; one result per item, in order.
fn attack_batch<E: Engine>(
    engine: &E,
    objective: &Objective,
    settings: &AttackSettings,
    batch: &[InputItem],
    output: &OutputOptions,
    progress: &dyn Progress,
) -> Vec<Result<ManifestRecord, ImageFailure>> {
    let patch = engine.model().config.patch;
    let loaded: Vec<Result<Loaded, ImageFailure>> = batch
        .iter()
        .map(|item| load(item, settings, patch))
        .collect();
    let ok: Vec<(usize, &Loaded)> = loaded
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.as_ref().ok().map(|l| (i, l)))
        .collect();
    let mut results: Vec<Result<ManifestRecord, ImageFailure>> = loaded
        .iter()
        .map(|l| match l {
            Ok(_) => Err(ImageFailure {
                message: "not attacked".into(),
                size: None,
            }),
            Err(e) => Err(e.clone()),
        })
        .collect();
    if ok.is_empty() {
        return results;
    }
    let images = ok
        .iter()
        .map(|&(i, l)| {
            let planar = Planar {
                data: &l.clean.data,
                height: l.clean.height,
                width: l.clean.width,
            };
            (planar, ImageRng::new(settings.seed, &batch[i].rel))
        })
        .collect();
    let engine_failure = |e: &dyn std::fmt::Display, l: &Loaded| {
        ImageFailure::sized(format!("engine error: {e}"), &l.clean)
    };
    let attack = match Attack::new(engine, objective, settings, images) {
        Ok(a) => a,
        Err(e) => {
            for &(i, l) in &ok {
                results[i] = Err(engine_failure(&e, l));
            }
            return results;
        }
    };
    let starts = ok
        .iter()
        .enumerate()
        .map(|(j, (_, l))| attack.start(j, l.start.as_ref().map(|s| s.data.as_slice())))
        .collect();
    let outcomes = match attack.run(starts, |_| progress.steps_done(ok.len())) {
        Ok(o) => o,
        Err(e) => {
            for &(i, l) in &ok {
                results[i] = Err(engine_failure(&e, l));
            }
            return results;
        }
    };
    // Save within ε after rounding, then measure what was actually saved.
    let saved: Vec<Vec<u8>> = ok
        .iter()
        .zip(&outcomes)
        .map(|(&(_, l), o)| quantize_within_eps(&o.adversarial, &l.clean.data, settings.eps))
        .collect();
    let saved_f32: Vec<Vec<f32>> = saved
        .iter()
        .map(|s| s.iter().map(|&q| q as f32 / 255.0).collect())
        .collect();
    let evals = match attack.evaluate(&saved_f32) {
        Ok(e) => e,
        Err(e) => {
            for &(i, l) in &ok {
                results[i] = Err(engine_failure(&e, l));
            }
            return results;
        }
    };
    for (((&(i, l), outcome), saved), eval) in ok.iter().zip(&outcomes).zip(&saved).zip(evals) {
        results[i] =
            write_outputs(&batch[i], l, outcome, saved, output).map(|rel_out| ManifestRecord {
                input: batch[i].rel.clone(),
                output: Some(rel_out),
                status: Status::Ok,
                error: None,
                width: l.clean.width,
                height: l.clean.height,
                loss_initial: Some(outcome.loss_initial),
                loss_final: Some(eval.loss),
                layer_cosine: Some(eval.layer_cosine),
                linf: Some(io::linf_255(saved, &l.clean.data)),
                steps: outcome.steps,
                seconds: 0.0,
            });
    }
    results
}

/// Writes the PNG (and the float image with `--save-float`); returns the PNG's relative path.
fn write_outputs(
    item: &InputItem,
    l: &Loaded,
    outcome: &AttackOutcome,
    saved: &[u8],
    output: &OutputOptions,
) -> Result<String, ImageFailure> {
    let (w, h) = (l.clean.width, l.clean.height);
    let rel_out = output_rel_path(&item.rel);
    let png_path = output.dir.join(&rel_out);
    write_png_atomic(&png_path, w, h, &planar_to_interleaved(saved, w, h))
        .map_err(|e| ImageFailure::sized(e, &l.clean))?;
    if output.save_float {
        let float = RgbImage {
            width: w,
            height: h,
            data: outcome.adversarial.clone(),
        };
        write_float_safetensors_atomic(&png_path.with_extension("safetensors"), &float)
            .map_err(|e| ImageFailure::sized(e, &l.clean))?;
    }
    Ok(rel_out)
}
