//! The checks behind `prm verify --clean DIR --adv DIR --eps 8/255`.
//!
//! A campaign's outputs are only useful if every adversarial file exists, decodes, has its clean
//! image's size, and stays inside the ε-ball *as saved* (8-bit, after rounding). This module
//! re-derives all of that from the files alone, independently of the run that wrote them, and
//! cross-checks `manifest.jsonl` when there is one. It reports every problem instead of stopping at
//! the first.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use image::DynamicImage;
use rayon::prelude::*;

use super::image::{decode_dynamic, dynamic_to_rgb, DEFAULT_MAX_PIXELS};
use super::inputs::{list_inputs, output_rel_path};
use super::manifest::{read_manifest_detailed, Status, MANIFEST_FILE};
use super::output::{clean_255, interleaved_to_planar, linf_255};
use super::{read_image, IoError};

/// Tolerance, in 1/255 units, on the L∞ comparison with ε.
pub const LINF_TOLERANCE_255: f64 = 1e-4;

/// What `verify` found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// Clean inputs examined.
    pub checked: usize,
    /// Largest L∞ distance found over the pairs that could be compared, in 1/255 units.
    pub max_linf_255: f64,
    /// Every problem found; empty means the output set is valid.
    pub violations: Vec<Violation>,
    /// Whether `<adv>/manifest.jsonl` existed and was cross-checked.
    pub manifest_checked: bool,
    /// Non-fatal remarks (e.g. a truncated last manifest line that was ignored).
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// True when there is no violation.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// One problem, naming the file concerned (an input's relative path, or `manifest.jsonl`).
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    pub file: String,
    pub kind: ViolationKind,
}

/// The kinds of problem `verify` reports.
#[derive(Clone, Debug, PartialEq)]
pub enum ViolationKind {
    /// The adversarial output for this input does not exist.
    Missing { output: String },
    /// The clean image itself could not be read, so nothing could be compared.
    CleanUnreadable { message: String },
    /// The adversarial output exists but does not decode.
    Undecodable { output: String, message: String },
    /// Output and clean image differ in size.
    SizeMismatch {
        output: String,
        adv: (usize, usize),
        clean: (usize, usize),
    },
    /// ‖adv − clean‖∞ exceeds ε (both in 1/255 units).
    LinfExceeded {
        output: String,
        linf_255: f64,
        eps_255: f64,
    },
    /// The manifest has no record for this input.
    ManifestNoRecord,
    /// An `ok` manifest record names an output that does not exist (or names none).
    ManifestOutputMissing { output: Option<String> },
    /// The manifest could not be read.
    ManifestUnreadable { message: String },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file)?;
        match &self.kind {
            ViolationKind::Missing { output } => write!(f, "output {output} is missing"),
            ViolationKind::CleanUnreadable { message } => {
                write!(f, "clean image unreadable: {message}")
            }
            ViolationKind::Undecodable { output, message } => {
                write!(f, "output {output} does not decode: {message}")
            }
            ViolationKind::SizeMismatch { output, adv, clean } => write!(
                f,
                "size mismatch: output {output} is {}x{}, clean is {}x{}",
                adv.0, adv.1, clean.0, clean.1
            ),
            ViolationKind::LinfExceeded {
                output,
                linf_255,
                eps_255,
            } => write!(
                f,
                "output {output}: linf {linf_255:.4}/255 > eps {eps_255:.4}/255"
            ),
            ViolationKind::ManifestNoRecord => write!(f, "no record in {MANIFEST_FILE}"),
            ViolationKind::ManifestOutputMissing { output: Some(o) } => {
                write!(f, "{MANIFEST_FILE} says ok but output {o} does not exist")
            }
            ViolationKind::ManifestOutputMissing { output: None } => {
                write!(f, "{MANIFEST_FILE} says ok but names no output")
            }
            ViolationKind::ManifestUnreadable { message } => {
                write!(f, "{MANIFEST_FILE} unreadable: {message}")
            }
        }
    }
}

/// Checks an adversarial output tree against its clean inputs.
///
/// For every clean input (as listed by [`list_inputs`], with `adv` excluded if it lies inside
/// `clean`) the output `<adv>/<output_rel_path(rel)>` must exist, decode, match the clean size,
/// and satisfy ‖adv − clean‖∞ ≤ ε, compared in 1/255 units with a tolerance of
/// [`LINF_TOLERANCE_255`] from the saved 8-bit values and the clean image as decoded (EXIF
/// orientation applied, as the attack sees it). If `<adv>/manifest.jsonl` exists, every input must
/// have a record and every `ok` record's output must exist.
///
/// Errors only for problems with the arguments themselves (a missing `clean` or `adv`, an empty
/// or unusable input list); everything about individual files is a [`Violation`].
pub fn verify(clean: &Path, adv: &Path, eps: f32) -> Result<VerifyReport, IoError> {
    if !adv.is_dir() {
        return Err(IoError::NotFound {
            path: adv.to_path_buf(),
        });
    }
    let list = list_inputs(clean, Some(adv))?;
    let eps_255 = eps as f64 * 255.0;

    let results: Vec<(Option<f64>, Option<Violation>)> = list
        .items
        .par_iter()
        .map(|item| {
            let out_rel = output_rel_path(&item.rel);
            match check_pair(&item.path, &adv.join(&out_rel), &out_rel, eps_255) {
                Ok(linf) => (Some(linf), None),
                Err((linf, kind)) => (
                    linf,
                    Some(Violation {
                        file: item.rel.clone(),
                        kind,
                    }),
                ),
            }
        })
        .collect();

    let mut report = VerifyReport {
        checked: list.items.len(),
        ..Default::default()
    };
    for (linf, violation) in results {
        if let Some(l) = linf {
            report.max_linf_255 = report.max_linf_255.max(l);
        }
        report.violations.extend(violation);
    }

    let manifest_path = adv.join(MANIFEST_FILE);
    if manifest_path.is_file() {
        report.manifest_checked = true;
        check_manifest(&manifest_path, adv, &list.items, &mut report);
    }
    Ok(report)
}

/// Compares one pair; `Ok(linf)` when it passes, otherwise the violation (with the L∞ if it
/// could be measured).
fn check_pair(
    clean_path: &Path,
    adv_path: &Path,
    out_rel: &str,
    eps_255: f64,
) -> Result<f64, (Option<f64>, ViolationKind)> {
    let clean = read_image(clean_path).map_err(|e| {
        (
            None,
            ViolationKind::CleanUnreadable {
                message: e.to_string(),
            },
        )
    })?;
    if !adv_path.is_file() {
        return Err((
            None,
            ViolationKind::Missing {
                output: out_rel.to_string(),
            },
        ));
    }
    let adv = decode_dynamic(adv_path, DEFAULT_MAX_PIXELS).map_err(|e| {
        (
            None,
            ViolationKind::Undecodable {
                output: out_rel.to_string(),
                message: e.to_string(),
            },
        )
    })?;
    let (aw, ah) = (adv.width() as usize, adv.height() as usize);
    if (aw, ah) != (clean.width, clean.height) {
        return Err((
            None,
            ViolationKind::SizeMismatch {
                output: out_rel.to_string(),
                adv: (aw, ah),
                clean: (clean.width, clean.height),
            },
        ));
    }
    let linf = if is_8bit(&adv) {
        let rgb = adv.to_rgb8();
        let planar = interleaved_to_planar(rgb.as_raw(), aw, ah);
        linf_255(&planar, &clean.data)
    } else {
        let a = dynamic_to_rgb(&adv);
        a.data
            .iter()
            .zip(&clean.data)
            .map(|(&x, &c)| (x as f64 * 255.0 - clean_255(c)).abs())
            .fold(0.0, f64::max)
    };
    if linf > eps_255 + LINF_TOLERANCE_255 || linf.is_nan() {
        return Err((
            Some(linf),
            ViolationKind::LinfExceeded {
                output: out_rel.to_string(),
                linf_255: linf,
                eps_255,
            },
        ));
    }
    Ok(linf)
}

fn is_8bit(img: &DynamicImage) -> bool {
    matches!(
        img,
        DynamicImage::ImageLuma8(_)
            | DynamicImage::ImageLumaA8(_)
            | DynamicImage::ImageRgb8(_)
            | DynamicImage::ImageRgba8(_)
    )
}

fn check_manifest(
    manifest_path: &Path,
    adv: &Path,
    items: &[super::InputItem],
    report: &mut VerifyReport,
) {
    let contents = match read_manifest_detailed(manifest_path) {
        Ok(c) => c,
        Err(e) => {
            report.violations.push(Violation {
                file: MANIFEST_FILE.to_string(),
                kind: ViolationKind::ManifestUnreadable {
                    message: e.to_string(),
                },
            });
            return;
        }
    };
    if let Some(line) = contents.ignored_partial_line {
        report.notes.push(format!(
            "{MANIFEST_FILE}: ignored an incomplete last line ({line}), probably cut short by a crash"
        ));
    }
    let mut recorded_inputs = HashSet::new();
    let mut recorded_outputs = HashSet::new();
    // Only the last record of an input counts for the "ok ⇒ output exists" check, so that a
    // resumed run's superseded records are not held against it; all records count as "has one".
    let mut last: HashMap<&str, &super::ManifestRecord> = HashMap::new();
    for r in &contents.records {
        recorded_inputs.insert(r.input.as_str());
        if let Some(o) = &r.output {
            recorded_outputs.insert(o.as_str());
        }
        last.insert(r.input.as_str(), r);
    }
    for item in items {
        let out = output_rel_path(&item.rel);
        if !recorded_inputs.contains(item.rel.as_str()) && !recorded_outputs.contains(out.as_str())
        {
            report.violations.push(Violation {
                file: item.rel.clone(),
                kind: ViolationKind::ManifestNoRecord,
            });
        }
    }
    let mut ok_records: Vec<&super::ManifestRecord> = last
        .values()
        .copied()
        .filter(|r| r.status == Status::Ok)
        .collect();
    ok_records.sort_by(|a, b| a.input.cmp(&b.input));
    for r in ok_records {
        let exists = r.output.as_ref().is_some_and(|o| adv.join(o).is_file());
        if !exists {
            report.violations.push(Violation {
                file: r.input.clone(),
                kind: ViolationKind::ManifestOutputMissing {
                    output: r.output.clone(),
                },
            });
        }
    }
}
