//! An attack over a set of images: read each one, attack it, save it within ε, record it.
//!
//! One image's failure (unreadable file, image smaller than a patch, a missing `--init from:`
//! start, even an internal panic) is recorded in the manifest and the run goes on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::image::{ImageAttack, Planar};
use super::loss::Objective;
use super::settings::{AttackSettings, Init};
use crate::io::{
    self, output_rel_path, planar_to_interleaved, quantize_within_eps, read_image,
    write_float_safetensors_atomic, write_png_atomic, InputItem, IoError, ManifestRecord,
    ManifestWriter, RgbImage, Status,
};
use crate::reference::ReferenceVit;
use crate::rng::ImageRng;

/// Where and how to write results.
pub struct OutputOptions {
    pub dir: PathBuf,
    /// Also write the unquantised float image as `<rel>.safetensors`.
    pub save_float: bool,
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
    fn step_done(&self) {}
    fn image_done(&self, _record: &ManifestRecord) {}
}

/// A [`Progress`] that shows nothing.
pub struct Silent;
impl Progress for Silent {}

/// Attacks every item, writing outputs and one manifest line each.
pub fn run_campaign(
    engine: &ReferenceVit,
    objective: &Objective,
    settings: &AttackSettings,
    items: &[InputItem],
    output: &OutputOptions,
    progress: &dyn Progress,
) -> Result<CampaignSummary, IoError> {
    let mut manifest = ManifestWriter::open(&output.dir)?;
    let mut summary = CampaignSummary::default();
    for item in items {
        progress.image_started(&item.rel);
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| {
            attack_one(engine, objective, settings, item, output, progress)
        }))
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(ImageFailure {
                message: format!("internal error (please report): {msg}"),
                size: None,
            })
        });
        let seconds = started.elapsed().as_secs_f64();
        let record = match result {
            Ok(mut record) => {
                record.seconds = seconds;
                summary.ok += 1;
                record
            }
            Err(failure) => {
                summary.failed += 1;
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
        };
        manifest.append(&record)?;
        progress.image_done(&record);
    }
    manifest.sync()?;
    Ok(summary)
}

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

fn attack_one(
    engine: &ReferenceVit,
    objective: &Objective,
    settings: &AttackSettings,
    item: &InputItem,
    output: &OutputOptions,
    progress: &dyn Progress,
) -> Result<ManifestRecord, ImageFailure> {
    let clean = read_image(&item.path).map_err(|e| ImageFailure {
        message: e.to_string(),
        size: None,
    })?;
    let start_image = match &settings.init {
        Init::From(dir) => Some(read_start(dir, &item.rel, &clean)?),
        _ => None,
    };
    let planar = Planar {
        data: &clean.data,
        height: clean.height,
        width: clean.width,
    };
    let rng = ImageRng::new(settings.seed, &item.rel);
    let attack = ImageAttack::new(engine, objective, settings, planar, rng)
        .map_err(|e| ImageFailure::sized(e, &clean))?;
    let start = attack.start(start_image.as_ref().map(|s| s.data.as_slice()));
    let outcome = attack.run(start, |_| progress.step_done());

    // Save within ε after rounding, then measure what was actually saved.
    let saved = quantize_within_eps(&outcome.adversarial, &clean.data, settings.eps);
    let rel_out = output_rel_path(&item.rel);
    let png_path = output.dir.join(&rel_out);
    write_png_atomic(
        &png_path,
        clean.width,
        clean.height,
        &planar_to_interleaved(&saved, clean.width, clean.height),
    )
    .map_err(|e| ImageFailure::sized(e, &clean))?;
    if output.save_float {
        let float = RgbImage {
            width: clean.width,
            height: clean.height,
            data: outcome.adversarial.clone(),
        };
        let float_path = png_path.with_extension("safetensors");
        write_float_safetensors_atomic(&float_path, &float)
            .map_err(|e| ImageFailure::sized(e, &clean))?;
    }
    let saved_f32: Vec<f32> = saved.iter().map(|&q| q as f32 / 255.0).collect();
    let eval = attack.evaluate(&saved_f32);
    Ok(ManifestRecord {
        input: item.rel.clone(),
        output: Some(rel_out),
        status: Status::Ok,
        error: None,
        width: clean.width,
        height: clean.height,
        loss_initial: Some(outcome.loss_initial),
        loss_final: Some(eval.loss),
        layer_cosine: Some(eval.layer_cosine),
        linf: Some(io::linf_255(&saved, &clean.data)),
        steps: outcome.steps,
        seconds: 0.0,
    })
}
