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

use super::image::{dynamic_to_rgb, read_item, DEFAULT_MAX_PIXELS};
use super::inputs::{list_inputs_with, output_rel_path, InputItem, ListOptions};
use super::manifest::{read_manifest_detailed, Status, MANIFEST_FILE};
use super::output::{clean_255, interleaved_to_planar, linf_255};
use super::webdataset::OutputLookup;
use super::IoError;

/// Options of [`verify_with`].
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// `--exclude` globs, as given to `prm attack`.
    pub exclude: Vec<String>,
    /// Pixel budget for decoding clean and adversarial images.
    pub max_pixels: u64,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            exclude: Vec::new(),
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// Tolerance, in 1/255 units, on the L∞ comparison with ε.
pub const LINF_TOLERANCE_255: f64 = 1e-4;

/// What `verify` found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// Clean inputs examined.
    pub checked: usize,
    /// Pairs whose L∞ distance could be measured (both images read, same size).
    pub measured: usize,
    /// Largest L∞ distance found over the pairs that could be compared, in 1/255 units (0 when
    /// `measured` is 0: then nothing was measured).
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
    /// An `ok` record disagrees with the file it describes (its size, or an L∞ above ε for a
    /// file measured within ε).
    ManifestDisagrees { message: String },
    /// An `ok` record's L∞ exceeds ε while its file could not be measured (an output that is
    /// over ε *and* measured is reported once, as [`ViolationKind::LinfExceeded`]).
    ManifestLinfExceeded { linf_255: f64, eps_255: f64 },
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
            ViolationKind::ManifestDisagrees { message } => {
                write!(f, "{MANIFEST_FILE} disagrees with the output: {message}")
            }
            ViolationKind::ManifestLinfExceeded { linf_255, eps_255 } => write!(
                f,
                "{MANIFEST_FILE} records linf {linf_255:.4}/255 > eps {eps_255:.4}/255 (the output itself could not be measured)"
            ),
        }
    }
}

/// Checks an adversarial output tree against its clean inputs.
///
/// For every clean input (as listed by [`list_inputs`](crate::io::inputs::list_inputs), with `adv` excluded if it lies inside
/// `clean`) the output `<adv>/<output_rel_path(rel)>` must exist, decode, match the clean size,
/// and satisfy ‖adv − clean‖∞ ≤ ε, compared in 1/255 units with a tolerance of
/// [`LINF_TOLERANCE_255`] from the saved 8-bit values and the clean image as decoded (EXIF
/// orientation applied, as the attack sees it). If `<adv>/manifest.jsonl` exists, every input must
/// have a record, every `ok` record's output must exist, its recorded size must be the file's,
/// and its recorded L∞ must be within ε unless the file's measured L∞ already says otherwise.
///
/// Errors only for problems with the arguments themselves (a missing `clean` or `adv`, an empty
/// or unusable input list, `adv` that is `clean` itself or holds the clean files
/// ([`IoError::OutputIsInput`], [`IoError::OutputOverwritesInput`])); everything about
/// individual files is a [`Violation`]. `eps` is used as given; the CLI checks it is in (0, 1].
pub fn verify(clean: &Path, adv: &Path, eps: f32) -> Result<VerifyReport, IoError> {
    verify_with(clean, adv, eps, &VerifyOptions::default())
}

/// [`verify`] with `--exclude` globs and a pixel budget. `clean` may also name tar shards
/// (`shards/train-{000..009}.tar`); their outputs are looked up in the output tars
/// (`<adv>/<shard>.tar`), in staged files, or in the tree layout (`<adv>/<shard>/<member>.png`).
pub fn verify_with(
    clean: &Path,
    adv: &Path,
    eps: f32,
    options: &VerifyOptions,
) -> Result<VerifyReport, IoError> {
    if !adv.is_dir() {
        return Err(IoError::NotFound {
            path: adv.to_path_buf(),
        });
    }
    let list = list_inputs_with(
        clean,
        &ListOptions {
            exclude_dirs: vec![adv.to_path_buf()],
            exclude: options.exclude.clone(),
        },
    )?;
    let eps_255 = eps as f64 * 255.0;
    let lookup = OutputLookup::new(adv);

    let results: Vec<PairResult> = list
        .items
        .par_iter()
        .map(
            |item| match check_pair(item, &lookup, adv, eps_255, options.max_pixels) {
                Ok((linf, size)) => (Some(linf), Some(size), None),
                Err((linf, size, kind)) => (
                    linf,
                    size,
                    Some(Violation {
                        file: item.rel.clone(),
                        kind,
                    }),
                ),
            },
        )
        .collect();

    let mut report = VerifyReport {
        checked: list.items.len(),
        notes: list.warnings.clone(),
        ..Default::default()
    };
    let mut sizes: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut linfs: HashMap<&str, f64> = HashMap::new();
    for (item, (linf, size, violation)) in list.items.iter().zip(results) {
        if let Some(l) = linf {
            report.measured += 1;
            report.max_linf_255 = report.max_linf_255.max(l);
            linfs.insert(item.rel.as_str(), l);
        }
        if let Some(size) = size {
            sizes.insert(item.rel.as_str(), size);
        }
        report.violations.extend(violation);
    }

    if let Some(note) = attack_eps_note(adv, eps) {
        report.notes.push(note);
    }
    let manifest_path = adv.join(MANIFEST_FILE);
    if manifest_path.is_file() {
        report.manifest_checked = true;
        check_manifest(
            &manifest_path,
            &lookup,
            &list.items,
            &sizes,
            &linfs,
            eps_255,
            &mut report,
        );
    }
    Ok(report)
}

/// A note when the attack's own ε (its `run.json`) is not the one checked: a larger `--eps`
/// would pass images that broke the attack's budget. A `run.json` that cannot be read as JSON
/// gets a note too: staying silent would hide that this comparison was not made.
fn attack_eps_note(adv: &Path, eps: f32) -> Option<String> {
    let path = adv.join(super::run_record::RUN_RECORD_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            return Some(format!(
                "{}: cannot read ({e}), so the attack's ε was not compared with --eps",
                path.display()
            ))
        }
    };
    let record: serde_json::Value = match serde_json::from_slice(&text) {
        Ok(v) => v,
        Err(e) => {
            return Some(format!(
                "{}: not a run record ({e}), so the attack's ε was not compared with --eps \
                 (the file was damaged or replaced)",
                path.display()
            ))
        }
    };
    let attack_eps = record["settings"]["eps"].as_f64()? as f32;
    (attack_eps != eps).then(|| {
        format!(
            "{}: the attack's ε was {:.2}/255; checked against --eps {:.2}/255{}",
            path.display(),
            attack_eps as f64 * 255.0,
            eps as f64 * 255.0,
            if eps > attack_eps {
                " (a looser budget than the attack's)"
            } else {
                ""
            }
        )
    })
}

/// (L∞ when measured, the output's size when decoded, the violation if any).
type PairResult = (Option<f64>, Option<(usize, usize)>, Option<Violation>);

/// Compares one pair; `Ok((linf, size))` when it passes, otherwise the violation (with the L∞
/// and the output's size if they could be measured).
#[allow(clippy::type_complexity)]
fn check_pair(
    item: &InputItem,
    lookup: &OutputLookup,
    adv_dir: &Path,
    eps_255: f64,
    max_pixels: u64,
) -> Result<(f64, (usize, usize)), (Option<f64>, Option<(usize, usize)>, ViolationKind)> {
    let clean = read_item(item, max_pixels).map_err(|e| {
        (
            None,
            None,
            ViolationKind::CleanUnreadable {
                message: e.to_string(),
            },
        )
    })?;
    let expected = super::OutputLayout::Tree.output_rel(item);
    let found = match lookup.find(item, None) {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Err((
                None,
                None,
                ViolationKind::Missing {
                    output: match &item.member {
                        Some(m) => format!(
                            "{} (or {}/{})",
                            expected,
                            m.shard.rel,
                            output_rel_path(m.name())
                        ),
                        None => expected,
                    },
                },
            ))
        }
        Err(e) => {
            return Err((
                None,
                None,
                ViolationKind::Undecodable {
                    output: expected,
                    message: e.to_string(),
                },
            ))
        }
    };
    let out_rel = found.name(item, adv_dir);
    let out_rel = out_rel.as_str();
    let adv = found.decode(max_pixels).map_err(|e| {
        (
            None,
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
            Some((aw, ah)),
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
            Some((aw, ah)),
            ViolationKind::LinfExceeded {
                output: out_rel.to_string(),
                linf_255: linf,
                eps_255,
            },
        ));
    }
    Ok((linf, (aw, ah)))
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
    lookup: &OutputLookup,
    items: &[InputItem],
    sizes: &HashMap<&str, (usize, usize)>,
    linfs: &HashMap<&str, f64>,
    eps_255: f64,
    report: &mut VerifyReport,
) {
    let by_rel: HashMap<&str, &InputItem> = items.iter().map(|i| (i.rel.as_str(), i)).collect();
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
        let out = super::OutputLayout::Tree.output_rel(item);
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
        let exists = match (by_rel.get(r.input.as_str()), &r.output) {
            (_, None) => false,
            (Some(item), Some(_)) => matches!(lookup.find(item, None), Ok(Some(_))),
            (None, Some(o)) => lookup_dir(lookup).join(o).is_file(),
        };
        if !exists {
            report.violations.push(Violation {
                file: r.input.clone(),
                kind: ViolationKind::ManifestOutputMissing {
                    output: r.output.clone(),
                },
            });
            continue;
        }
        if let Some(&(w, h)) = sizes.get(r.input.as_str()) {
            if (r.width, r.height) != (w, h) {
                report.violations.push(Violation {
                    file: r.input.clone(),
                    kind: ViolationKind::ManifestDisagrees {
                        message: format!(
                            "record says {}x{}, the output is {w}x{h}",
                            r.width, r.height
                        ),
                    },
                });
            }
        }
        // A record over ε is one fact with its file: where the file was measured over ε too, it
        // is reported once, from the file (as `LinfExceeded`), and a "disagreement" would be
        // false; where the file is within ε, the two truly disagree. Only where nothing was
        // measured does the record's value stand alone.
        let over = |l: f64| l > eps_255 + LINF_TOLERANCE_255 || l.is_nan();
        match (r.linf, linfs.get(r.input.as_str())) {
            (Some(l), Some(&measured)) if over(l) && !over(measured) => {
                report.violations.push(Violation {
                    file: r.input.clone(),
                    kind: ViolationKind::ManifestDisagrees {
                        message: format!(
                            "record says linf {l:.4}/255 > eps {eps_255:.4}/255, the output \
                             measures {measured:.4}/255"
                        ),
                    },
                });
            }
            (Some(l), None) if over(l) => {
                report.violations.push(Violation {
                    file: r.input.clone(),
                    kind: ViolationKind::ManifestLinfExceeded {
                        linf_255: l,
                        eps_255,
                    },
                });
            }
            _ => {}
        }
    }
}

fn lookup_dir(lookup: &OutputLookup) -> &Path {
    lookup.dir()
}
