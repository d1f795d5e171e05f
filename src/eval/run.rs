//! One evaluation run: every clean image of a directory against its adversarial counterpart,
//! through one target, with the report (JSON + Markdown) and optional prediction PNGs.
//!
//! Pairing: for a clean image at relative path `rel`, the adversarial image is
//! `ADV/<rel with its extension replaced by .png>` (what `prm attack` writes), or `ADV/<rel>` when
//! that does not exist (a tar member's is found in either output layout). Labels (dense targets)
//! are `LABELS/<rel with .png>`, or with `--labels member:EXT` the member `<key>.EXT` of the
//! image's sample in its clean shard ([`super::ground_truth`]). A missing or bad adversarial
//! image or label is a per-image error: recorded, never fatal to the run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};

use super::ground_truth::{LabelSource, MemberLabels};
use super::labels::{read_class_labels, read_label_png, write_label_png, ClassLabels};
use super::metrics::{top1, Confusion};
use super::ops::{argmax, dot_logits, drift_of, upsample_argmax};
use super::outputs::{check_outputs_spare_inputs, Inputs, Outputs};
use super::pipeline::overlapped;
use super::targets::{
    check_image, probe_logits, DenseHead, EvalEngine, PairSums, PatchLogits, Probe, TargetKind,
    TokenEmbeddings,
};
use super::text::ClassEmbeddings;
use super::EvalError;
use crate::attack::image::Planar;
use crate::io::image::dynamic_to_rgb;
use crate::io::webdataset::OutputLookup;
use crate::io::{
    list_inputs_with, output_rel_path, read_image_limited, read_item, InputItem, ListOptions,
    OutputLayout, RgbImage,
};
use crate::reference::resize::bicubic_resize;
use crate::viz::pictures::{
    labels_rgb8, legend_of, perturbation_rgb8, perturbation_title, planar_rgb8, write_picture,
    Panel, PanelKind, Picture,
};

/// What to evaluate and how.
pub struct EvalSettings {
    pub target: TargetKind,
    /// `None`: native resolution; `Some(n)`: the image is resized (bicubic) to n×n first.
    pub resolution: Option<usize>,
    pub ignore_index: u32,
    /// Ground truth: for dense targets a directory of label PNGs, for zeroshot / probe(cls) a
    /// label list file; or for either, members of the clean tar shards.
    pub labels: Option<LabelSource>,
    pub save_predictions: Option<PathBuf>,
    /// Write a picture grid per image: `DIR/<rel with .png>` (see [`crate::viz::pictures`]).
    pub pictures: Option<PathBuf>,
    pub probe: Option<Probe>,
    /// `--exclude` globs: inputs left out, as given to `prm attack --exclude`.
    pub exclude: Vec<String>,
    /// Pixel budget for decoding each image, as given to `prm attack --max-pixels`.
    pub max_pixels: u64,
    /// Image pairs given to the engine at once (the GPU engine runs their images as one batch).
    pub batch_size: usize,
    /// The device's choice of matrix-product algorithms (`by-size` or `batch-invariant`), for
    /// the report; `None` on the CPU.
    pub product_algorithms: Option<&'static str>,
    /// The evaluated model's weights fingerprint ([`crate::model::Model::fingerprint`]), for
    /// the report; compared there with the attack's when its `run.json` has one.
    pub weights: Option<String>,
    /// Described in the report.
    pub model_spec: String,
    pub weights_random: bool,
    pub device: String,
    pub precision: String,
}

/// One image's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct ImageRecord {
    pub image: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub values: serde_json::Map<String, Value>,
}

/// A finished evaluation.
pub struct EvalOutcome {
    pub report: Value,
    /// Image pairs evaluated, failed ones included.
    pub total: usize,
    /// Batches that failed as a whole and were run again one pair at a time: their records are
    /// right, their speed was batch 1's.
    pub batches_rerun_alone: usize,
    /// Where the run's time went: the engines, the reading, the finisher (not in the report,
    /// which does not depend on timing).
    pub engine_time: super::EngineTime,
    pub failed: usize,
}

/// A clean / adversarial pair read from disk: the loader's work for one image.
struct Pair {
    clean: RgbImage,
    adv: RgbImage,
    /// What the model sees when `--resolution N` resizes: (clean, adv), N×N.
    resized: Option<(Vec<f32>, Vec<f32>)>,
    /// Dense targets with `--labels`: the label file and its map, checked against the size.
    labels: Option<(PathBuf, Vec<u32>)>,
    /// Classification with `--labels`: the class of the image (its line of a label file, or
    /// its sample's member).
    class_label: Option<usize>,
}

impl Pair {
    fn bytes(&self) -> usize {
        let floats = self.clean.data.len()
            + self.adv.data.len()
            + self.resized.as_ref().map_or(0, |(c, a)| c.len() + a.len());
        4 * floats + 4 * self.labels.as_ref().map_or(0, |(_, l)| l.len())
    }

    fn clean(&self) -> Planar<'_> {
        planar(&self.clean)
    }

    fn adv(&self) -> Planar<'_> {
        planar(&self.adv)
    }

    /// The clean and adversarial images as the model sees them.
    fn model_inputs(&self, resolution: Option<usize>) -> (Planar<'_>, Planar<'_>) {
        match (&self.resized, resolution) {
            (Some((c, a)), Some(n)) => {
                let at = |data| Planar {
                    data,
                    height: n,
                    width: n,
                };
                (at(c), at(a))
            }
            _ => (self.clean(), self.adv()),
        }
    }
}

fn planar(im: &RgbImage) -> Planar<'_> {
    Planar {
        data: &im.data,
        height: im.height,
        width: im.width,
    }
}

/// What the engine gives for one pair.
enum Inferred {
    /// Token embeddings (dense targets), clean then adversarial: the finisher forms the cosine
    /// logits, off the engine's thread.
    Embeddings(TokenEmbeddings, TokenEmbeddings),
    /// Patch logits (dense targets) that the engine formed itself ([`EvalEngine::forms_logits`]),
    /// clean then adversarial.
    Logits(PatchLogits, PatchLogits),
    /// The probe's feature layer, clean then adversarial, and the patch grid the model saw:
    /// the finisher applies the probe.
    Probe(Vec<f32>, Vec<f32>, (usize, usize)),
    /// Every layer's drift sums, `[layer][token]` (F_0..F_L).
    Features(PairSums),
    /// The predicted class, clean then adversarial.
    Class(usize, usize),
}

/// What every stage needs to know about the run.
struct Plan<'a> {
    settings: &'a EvalSettings,
    /// The adversarial images: the attack's output directory, in either layout (images in the
    /// tree, or tar shards for tar inputs); each output tar's index is read once.
    adv: OutputLookup,
    classes: Option<&'a ClassEmbeddings>,
    /// The class names, for class-label members.
    names: &'a [String],
    /// `--labels member:EXT`: the clean shards' label members.
    member_labels: Option<MemberLabels>,
    /// `--labels FILE` for zeroshot / CLS probes: the class of each image.
    class_labels: Option<ClassLabels>,
    dense: bool,
}

/// The loader's stage: reads the pair (and its labels), checks their sizes, resizes.
fn load_pair(item: &InputItem, plan: &Plan) -> Result<Pair, EvalError> {
    let rel = &item.rel;
    let max_pixels = plan.settings.max_pixels;
    let clean = read_item(item, max_pixels)?;
    let adv_dir = plan.adv.dir();
    let (adv_path, adv) = match plan.adv.find(item, None)? {
        Some(found) => (
            adv_dir.join(found.name(item, adv_dir)),
            dynamic_to_rgb(&found.decode(max_pixels)?),
        ),
        // An image of the clean one's own name (adversarial images made elsewhere).
        None if item.member.is_none() && adv_dir.join(rel).is_file() => {
            let p = adv_dir.join(rel);
            (p.clone(), read_image_limited(&p, max_pixels)?)
        }
        None => {
            let expected = match &item.member {
                Some(m) => format!(
                    "member {} of {}, nor {}",
                    output_rel_path(m.name()),
                    adv_dir.join(&m.shard.rel).display(),
                    adv_dir.join(OutputLayout::Tree.output_rel(item)).display()
                ),
                None => format!(
                    "{} (nor {})",
                    adv_dir.join(output_rel_path(rel)).display(),
                    adv_dir.join(rel).display()
                ),
            };
            return Err(EvalError::Usage(format!(
                "no adversarial image for {rel}: {expected}"
            )));
        }
    };
    if (adv.width, adv.height) != (clean.width, clean.height) {
        return Err(EvalError::Usage(format!(
            "{}: adversarial image is {}x{}, the clean one {}x{}",
            adv_path.display(),
            adv.width,
            adv.height,
            clean.width,
            clean.height
        )));
    }
    let (w, h) = (clean.width, clean.height);
    // Labels before any work on the model, so a bad label file fails the image early.
    let (mut labels, mut class_label) = (None, None);
    if let Some(members) = &plan.member_labels {
        if plan.dense {
            labels = Some(members.read_map(item)?);
        } else {
            class_label = Some(members.read_class(item, plan.names)?);
        }
    } else if let Some(file) = &plan.class_labels {
        class_label = Some(file.of(rel)?);
    } else if let (Some(LabelSource::Path(dir)), true) = (&plan.settings.labels, plan.dense) {
        let p = dir.join(OutputLayout::Tree.output_rel(item));
        let (lw, lh, l) = read_label_png(&p)?;
        labels = Some((p, lw, lh, l));
    }
    let labels = match labels {
        Some((p, lw, lh, l)) => {
            if (lw, lh) != (w, h) {
                return Err(EvalError::Labels {
                    path: p,
                    reason: format!("label map is {lw}x{lh}, the image {w}x{h}"),
                });
            }
            Some((p, l))
        }
        None => None,
    };
    let resized = plan.settings.resolution.map(|n| {
        let resize = |im: &RgbImage| bicubic_resize(&im.data, 3, h, w, n, n);
        (resize(&clean), resize(&adv))
    });
    Ok(Pair {
        clean,
        adv,
        resized,
        labels,
        class_label,
    })
}

/// The engine's stage for a group of pairs: their clean and adversarial images go to the engine
/// as one batch. A pair whose images hold no whole patch fails alone, before the batch; when the
/// batch fails (the GPU engine itself cuts passes that run out of memory; this is for any other
/// error), its pairs are run one at a time, so that each gets the result, or the error, a run
/// over it alone gives.
///
/// `next` is the group that will follow, when the pipeline has it already: its images are a
/// hint to the engine (see [`EvalEngine`]'s batch methods). `rerun` counts the batches run
/// again pair by pair.
fn infer_group(
    engine: &dyn EvalEngine,
    pairs: &[&Pair],
    next: &[&Pair],
    plan: &Plan,
    rerun: &AtomicUsize,
) -> Vec<Result<Inferred, EvalError>> {
    let resolution = plan.settings.resolution;
    let fits = |p: &Pair| check_image(engine.model(), &p.model_inputs(resolution).0).map(drop);
    let checks: Vec<Result<(), EvalError>> = pairs.iter().map(|p| fits(p)).collect();
    let ready: Vec<&Pair> = pairs
        .iter()
        .zip(&checks)
        .filter(|(_, c)| c.is_ok())
        .map(|(p, _)| *p)
        .collect();
    // The next group as its own call will give it: the pairs that pass the same check.
    let next_ready: Vec<&Pair> = next.iter().copied().filter(|p| fits(p).is_ok()).collect();
    let together: Vec<Result<Inferred, EvalError>> =
        match infer_batch(engine, &ready, &next_ready, plan) {
            Ok(inferred) => inferred.into_iter().map(Ok).collect(),
            Err(e) if e.ends_the_device() => stop_for_a_lost_device(e),
            Err(_) if ready.len() > 1 => {
                rerun.fetch_add(1, Ordering::Relaxed);
                ready
                    .iter()
                    .map(|&p| match infer_batch(engine, &[p], &[], plan) {
                        Err(e) if e.ends_the_device() => stop_for_a_lost_device(e),
                        alone => Ok(alone?.swap_remove(0)),
                    })
                    .collect()
            }
            Err(e) => vec![Err(e)],
        };
    let mut together = together.into_iter();
    checks
        .into_iter()
        .map(|c| c.and_then(|()| together.next().expect("one result per pair")))
        .collect()
}

/// Why an evaluation's stages stopped early: a device failed for good. Carried as an unwinding
/// payload (no panic hook runs) from the engine thread that saw it through
/// [`overlapped`](super::pipeline::overlapped), which stops the other stages and resumes it on
/// the calling thread; [`evaluate_on`] turns it into [`EvalError::DeviceLost`].
struct DeviceLost(String);

/// Stops the evaluation: every later pass on a device whose CUDA context is gone would fail,
/// and failing each remaining pair one by one would only hide the cause in a report.
fn stop_for_a_lost_device(e: EvalError) -> ! {
    std::panic::resume_unwind(Box::new(DeviceLost(e.to_string())))
}

/// Consecutive pairs `(v[0], v[1]), (v[2], v[3]), …`: the clean and adversarial results of a
/// batch laid out pair by pair.
fn two_by_two<T>(v: Vec<T>) -> impl Iterator<Item = (T, T)> {
    let mut it = v.into_iter();
    std::iter::from_fn(move || Some((it.next()?, it.next()?)))
}

/// Every pair's clean image, then its adversarial image: a batch's images as the model sees
/// them.
fn batch_images<'p>(pairs: &[&'p Pair], resolution: Option<usize>) -> Vec<Planar<'p>> {
    pairs
        .iter()
        .flat_map(|p| {
            let (clean, adv) = p.model_inputs(resolution);
            [clean, adv]
        })
        .collect()
}

/// One engine batch: every pair's clean image, then its adversarial image. `next`: the pairs of
/// the batch after it, as a hint.
fn infer_batch(
    engine: &dyn EvalEngine,
    pairs: &[&Pair],
    next: &[&Pair],
    plan: &Plan,
) -> Result<Vec<Inferred>, EvalError> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let settings = plan.settings;
    let images = batch_images(pairs, settings.resolution);
    let next = batch_images(next, settings.resolution);
    let patch = engine.model().config.patch;
    Ok(if let Some(probe) = &settings.probe {
        let f = engine.layer_features_batch(&images, &next, probe.layer)?;
        two_by_two(f)
            .zip(images.chunks_exact(2))
            .map(|((c, a), im)| Inferred::Probe(c, a, (im[0].height / patch, im[0].width / patch)))
            .collect()
    } else if plan.dense {
        let head = DenseHead::of(settings.target).expect("dense target");
        if engine.forms_logits() {
            let c = plan.classes.expect("dense targets have classes");
            let logits = engine.dense_logits_batch(&images, &next, head, &c.embeddings)?;
            two_by_two(logits)
                .map(|(c, a)| Inferred::Logits(c, a))
                .collect()
        } else {
            let e = engine.dense_embeddings_batch(&images, &next, head)?;
            two_by_two(e)
                .map(|(c, a)| Inferred::Embeddings(c, a))
                .collect()
        }
    } else if settings.target == TargetKind::Features {
        let sums = engine.feature_sums_batch(&images, &next)?;
        sums.into_iter().map(Inferred::Features).collect()
    } else {
        // zeroshot
        let c = plan.classes.expect("zeroshot has classes");
        // On the engine's device when it forms logits; else the batch's cosine logits on every
        // core: with 1,000 classes they take the host longer than a batched forward's share of
        // the device (`cargo bench --bench eval_host`: 91 ms for 24 pairs, reading and metrics
        // included), and the device waits meanwhile.
        let predicted: Vec<usize> = if engine.forms_logits() {
            engine
                .image_logits_batch(&images, &next, &c.embeddings)?
                .iter()
                .map(|l| argmax(l))
                .collect()
        } else {
            engine
                .image_embedding_batch(&images, &next)?
                .par_iter()
                .map(|e| argmax(&dot_logits(e, &c.embeddings, c.dim)))
                .collect()
        };
        two_by_two(predicted)
            .map(|(c, a)| Inferred::Class(c, a))
            .collect()
    })
}

/// Everything summed or listed over the images: the finisher's state.
struct Tally {
    vs_clean: Confusion,
    gt_clean: Confusion,
    gt_adv: Confusion,
    records: Vec<ImageRecord>,
    /// (clean, adversarial, label) classes of zeroshot / CLS probes.
    cls_pred: Vec<(usize, usize, Option<usize>)>,
    drift_sum: Vec<(f64, f64)>,
    drift_n: usize,
    failed: usize,
}

/// The finisher's stage: the per-image metrics, the files written for it, and the totals.
struct Finishing<'a> {
    plan: &'a Plan<'a>,
    names: &'a [String],
    n_classes: usize,
    width: usize,
}

/// One image as the finisher writes about it: its name in records and headers, the path of
/// its files under an output directory, and the pair with its labels.
struct Named<'a> {
    rel: &'a str,
    out: String,
    clean: Planar<'a>,
    adv: Planar<'a>,
    /// Dense targets with `--labels`: the label file and its map.
    labels: Option<&'a (PathBuf, Vec<u32>)>,
    /// Classification with `--labels`: the image's class.
    class_label: Option<usize>,
}

impl Finishing<'_> {
    /// One image's record values; adds to the totals only when nothing failed.
    fn finish(
        &self,
        tally: &mut Tally,
        item: &InputItem,
        pair: &Pair,
        inferred: Inferred,
    ) -> Result<serde_json::Map<String, Value>, EvalError> {
        let image = Named {
            rel: &item.rel,
            out: OutputLayout::Tree.output_rel(item),
            clean: pair.clean(),
            adv: pair.adv(),
            labels: pair.labels.as_ref(),
            class_label: pair.class_label,
        };
        let (rel, out, cp, ap) = (image.rel, &image.out, &image.clean, &image.adv);
        let settings = self.plan.settings;
        let (w, h) = (cp.width, cp.height);
        let mut values = serde_json::Map::new();
        values.insert("width".into(), json!(w));
        values.insert("height".into(), json!(h));
        match inferred {
            Inferred::Embeddings(clean, adv) => {
                let c = self.plan.classes.expect("dense targets have classes");
                let (clean, adv) = (
                    clean.patch_logits(&c.embeddings),
                    adv.patch_logits(&c.embeddings),
                );
                self.finish_dense(tally, &image, clean, adv, &mut values)?;
            }
            Inferred::Logits(clean, adv) => {
                self.finish_dense(tally, &image, clean, adv, &mut values)?;
            }
            Inferred::Probe(clean, adv, grid) => {
                let probe = settings.probe.as_ref().expect("a probe target");
                let logits = |f: &[f32]| probe_logits(probe, f, self.width, grid);
                let (clean, adv) = (logits(&clean), logits(&adv));
                if probe.dense {
                    self.finish_dense(tally, &image, clean, adv, &mut values)?;
                } else {
                    let (c, a) = (argmax(&clean.logits), argmax(&adv.logits));
                    self.finish_class(tally, &image, c, a, &mut values)?;
                }
            }
            Inferred::Features(sums) => {
                let d: Vec<(f64, f64)> = sums.iter().map(|layer| drift_of(layer)).collect();
                values.insert(
                    "layer_cosine".into(),
                    json!(d.iter().map(|x| x.0).collect::<Vec<_>>()),
                );
                values.insert(
                    "layer_relative_l2".into(),
                    json!(d.iter().map(|x| x.1).collect::<Vec<_>>()),
                );
                if let Some(dir) = &settings.pictures {
                    let header = format!(
                        "{rel} · features · last-layer token cosine {:.4}",
                        d.last().map_or(f64::NAN, |x| x.0)
                    );
                    let picture = image_panels(header, cp, ap);
                    write_picture(&dir.join(out), &picture)?;
                }
                if tally.drift_sum.is_empty() {
                    tally.drift_sum = vec![(0.0, 0.0); d.len()];
                }
                tally
                    .drift_sum
                    .iter_mut()
                    .zip(&d)
                    .for_each(|(s, x)| *s = (s.0 + x.0, s.1 + x.1));
                tally.drift_n += 1;
            }
            Inferred::Class(c, a) => {
                self.finish_class(tally, &image, c, a, &mut values)?;
            }
        }
        Ok(values)
    }

    /// The classification part of [`Self::finish`] (zeroshot, CLS probes): the predicted
    /// classes, clean `c` and adversarial `a`.
    fn finish_class(
        &self,
        tally: &mut Tally,
        image: &Named,
        c: usize,
        a: usize,
        values: &mut serde_json::Map<String, Value>,
    ) -> Result<(), EvalError> {
        let (rel, out, cp, ap) = (image.rel, &image.out, &image.clean, &image.adv);
        let settings = self.plan.settings;
        let target = settings.target;
        let names = self.names;
        let label = image.class_label;
        values.insert("clean_class".into(), json!(names.get(c)));
        values.insert("adv_class".into(), json!(names.get(a)));
        values.insert("agree".into(), json!(c == a));
        if let Some(l) = label {
            values.insert("label".into(), json!(names.get(l)));
        }
        if let Some(dir) = &settings.pictures {
            let name = |k: usize| names.get(k).cloned().unwrap_or_else(|| format!("#{k}"));
            let header = format!(
                "{rel} · {} · {}",
                target.name(),
                if c == a {
                    "prediction kept"
                } else {
                    "prediction changed"
                }
            );
            let mut picture = image_panels(header, cp, ap);
            picture.panels[0].title = format!("clean: {}", name(c));
            picture.panels[1].title = format!("adversarial: {}", name(a));
            write_picture(&dir.join(out), &picture)?;
        }
        tally.cls_pred.push((c, a, label));
        Ok(())
    }

    /// The dense part of [`Self::finish`]: label maps at the image's native size, whatever size
    /// the model saw, then the metrics and files.
    fn finish_dense(
        &self,
        tally: &mut Tally,
        image: &Named,
        clean: PatchLogits,
        adv: PatchLogits,
        values: &mut serde_json::Map<String, Value>,
    ) -> Result<(), EvalError> {
        let (rel, out, cp, ap) = (image.rel, &image.out, &image.clean, &image.adv);
        let settings = self.plan.settings;
        let target = settings.target;
        let (w, h) = (cp.width, cp.height);
        // Label maps at the image's native size, whatever size the model saw.
        let map = |l: PatchLogits| upsample_argmax(&l.logits, l.grid_h, l.grid_w, l.classes, h, w);
        let (pc, pa) = (map(clean), map(adv));
        let pc32: Vec<u32> = pc.iter().map(|&v| v as u32).collect();
        let pa32: Vec<u32> = pa.iter().map(|&v| v as u32).collect();
        let mut m = Confusion::new(self.n_classes);
        m.add(&pc32, &pa32, None).expect("predictions are in range");
        let s = m.scores();
        values.insert("miou_adv_vs_clean".into(), opt(s.miou));
        values.insert("pixel_agreement".into(), opt(s.pixel_accuracy));
        let mut img_gt = None;
        if let Some((p, l)) = image.labels {
            let mut mc = Confusion::new(self.n_classes);
            let mut ma = Confusion::new(self.n_classes);
            let lab = |e: super::metrics::LabelError| EvalError::Labels {
                path: p.clone(),
                reason: e.to_string(),
            };
            mc.add(l, &pc32, Some(settings.ignore_index)).map_err(lab)?;
            ma.add(l, &pa32, Some(settings.ignore_index)).map_err(lab)?;
            let (sc, sa) = (mc.scores(), ma.scores());
            values.insert("miou_clean".into(), opt(sc.miou));
            values.insert("miou_adv".into(), opt(sa.miou));
            values.insert("pixel_acc_clean".into(), opt(sc.pixel_accuracy));
            values.insert("pixel_acc_adv".into(), opt(sa.pixel_accuracy));
            img_gt = Some((mc, ma));
        }
        if let Some(dir) = &settings.save_predictions {
            write_label_png(&dir.join("clean").join(out), w, h, &pc)?;
            write_label_png(&dir.join("adv").join(out), w, h, &pa)?;
        }
        if let Some(dir) = &settings.pictures {
            let header = format!(
                "{rel} · {} · mIoU adv vs clean {} · pixel agreement {}",
                target.name(),
                percent(s.miou),
                percent(s.pixel_accuracy)
            );
            let mut picture = image_panels(header, cp, ap);
            for (title, map) in [("clean", &pc), ("adversarial", &pa)] {
                picture.panels.push(Panel {
                    title: format!("{title} {}", target.name()),
                    width: w,
                    height: h,
                    rgb: labels_rgb8(map),
                    kind: PanelKind::Labels,
                });
            }
            picture.legend = legend_of(&[&pc, &pa], self.names);
            write_picture(&dir.join(out), &picture)?;
        }
        tally.vs_clean.merge(&m);
        if let Some((mc, ma)) = img_gt {
            tally.gt_clean.merge(&mc);
            tally.gt_adv.merge(&ma);
        }
        Ok(())
    }
}

/// A picture's first three panels: clean, adversarial and the amplified perturbation.
fn image_panels(header: String, clean: &Planar, adv: &Planar) -> Picture {
    let (w, h) = (clean.width, clean.height);
    let (perturbation, amp) = perturbation_rgb8(clean.data, adv.data, w, h);
    let photo = |title: String, rgb: Vec<u8>| Panel {
        title,
        width: w,
        height: h,
        rgb,
        kind: PanelKind::Photo,
    };
    Picture {
        header,
        panels: vec![
            photo("clean".into(), planar_rgb8(clean.data, w, h)),
            photo("adversarial".into(), planar_rgb8(adv.data, w, h)),
            photo(perturbation_title(amp), perturbation),
        ],
        legend: Vec::new(),
    }
}

fn percent(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{:.1}%", 100.0 * x))
}

fn opt(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| json!(x))
}

/// Runs the evaluation of `clean_dir` against `adv_dir` on one engine.
pub fn evaluate(
    engine: &(dyn EvalEngine + Sync),
    clean_dir: &Path,
    adv_dir: &Path,
    classes: Option<&ClassEmbeddings>,
    settings: &EvalSettings,
    progress: impl FnMut(usize, usize) + Send,
) -> Result<EvalOutcome, EvalError> {
    evaluate_on(&[engine], clean_dir, adv_dir, classes, settings, progress)
}

/// Runs the evaluation of `clean_dir` against `adv_dir` on several engines at once (one per
/// device, each on its own thread, taking batches from one queue). The records are those of one
/// engine whenever the engines give an image the same result: engines of one model on devices
/// of one kind.
pub fn evaluate_on(
    engines: &[&(dyn EvalEngine + Sync)],
    clean_dir: &Path,
    adv_dir: &Path,
    classes: Option<&ClassEmbeddings>,
    settings: &EvalSettings,
    progress: impl FnMut(usize, usize) + Send,
) -> Result<EvalOutcome, EvalError> {
    let own_outputs: Vec<&Path> = [
        settings.save_predictions.as_deref(),
        settings.pictures.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let items = list_clean_images(clean_dir, adv_dir, &settings.exclude, &own_outputs)?;
    evaluate_listed(engines, &items, adv_dir, classes, settings, progress)
}

/// The clean images of an evaluation: `clean_dir` listed as `prm attack --input` lists it,
/// leaving out `exclude` (its `--exclude` globs) and the run's own directories (`adv_dir` and
/// `own_outputs`) when they lie inside it, so that a second run sees the same images.
pub fn list_clean_images(
    clean_dir: &Path,
    adv_dir: &Path,
    exclude: &[String],
    own_outputs: &[&Path],
) -> Result<Vec<InputItem>, EvalError> {
    let exclude_dirs = std::iter::once(adv_dir)
        .chain(own_outputs.iter().copied())
        .map(Path::to_path_buf)
        .collect();
    let options = ListOptions {
        exclude_dirs,
        exclude: exclude.to_vec(),
    };
    Ok(list_inputs_with(clean_dir, &options)?.items)
}

/// [`evaluate_on`] of images already listed ([`list_clean_images`]).
pub fn evaluate_listed(
    engines: &[&(dyn EvalEngine + Sync)],
    items: &[InputItem],
    adv_dir: &Path,
    classes: Option<&ClassEmbeddings>,
    settings: &EvalSettings,
    mut progress: impl FnMut(usize, usize) + Send,
) -> Result<EvalOutcome, EvalError> {
    let Some(&engine) = engines.first() else {
        return Err(EvalError::Usage("an evaluation needs an engine".into()));
    };
    let target = settings.target;
    let dense = target.is_dense() || settings.probe.as_ref().is_some_and(|p| p.dense);
    let names: Vec<String> = match (&settings.probe, classes) {
        (Some(p), _) => p.names.clone(),
        (None, Some(c)) => c.names.clone(),
        (None, None) => Vec::new(),
    };
    let n_classes = names.len();
    if n_classes > u16::MAX as usize {
        return Err(EvalError::Usage(format!(
            "{n_classes} classes: at most {} are supported",
            u16::MAX
        )));
    }
    if let Some(dir) = &settings.save_predictions {
        if !dense {
            return Err(EvalError::Usage(format!(
                "--save-predictions {}: only dense targets (maskclip, sclip, clearclip, dense \
                 probes) produce label maps",
                dir.display()
            )));
        }
        if n_classes > 256 {
            return Err(EvalError::Usage(format!(
                "--save-predictions writes 8-bit label maps, but there are {n_classes} classes \
                 (at most 256)"
            )));
        }
    }
    let label_path = match &settings.labels {
        Some(LabelSource::Path(p)) => Some(p.as_path()),
        _ => None,
    };
    check_outputs_spare_inputs(
        items,
        &Inputs {
            adv: Some(adv_dir),
            label_dir: label_path.filter(|_| dense),
            files: label_path
                .filter(|_| !dense)
                .map(|p| ("--labels", p))
                .into_iter()
                .collect(),
        },
        &Outputs {
            pictures: settings.pictures.as_deref(),
            save_predictions: settings.save_predictions.as_deref(),
            files: Vec::new(),
        },
    )?;
    // Classification labels for zeroshot / CLS probes.
    let class_labels: Option<ClassLabels> = match (&settings.labels, dense) {
        (Some(l), false) if target == TargetKind::Features => {
            return Err(EvalError::Usage(format!(
                "--labels {}: the features target takes no labels",
                l.describe()
            )))
        }
        (Some(LabelSource::Path(p)), false) => Some(read_class_labels(p, &names, items)?),
        (Some(LabelSource::Path(p)), true) if !p.is_dir() => {
            return Err(EvalError::Usage(format!(
                "--labels {}: dense targets need a directory of label PNGs",
                p.display()
            )))
        }
        _ => None,
    };

    let member_labels = match &settings.labels {
        Some(LabelSource::Member(ext)) => Some(MemberLabels::index(ext, items)?),
        _ => None,
    };
    let plan = Plan {
        settings,
        adv: OutputLookup::new(adv_dir),
        classes,
        names: &names,
        member_labels,
        class_labels,
        dense,
    };
    let mut tally = Tally {
        vs_clean: Confusion::new(n_classes.max(1)),
        gt_clean: Confusion::new(n_classes.max(1)),
        gt_adv: Confusion::new(n_classes.max(1)),
        records: Vec::with_capacity(items.len()),
        cls_pred: Vec::new(),
        drift_sum: Vec::new(),
        drift_n: 0,
        failed: 0,
    };
    let total = items.len();
    progress(0, total);
    let finishing = Finishing {
        plan: &plan,
        names: &names,
        n_classes,
        width: engine.model().config.width,
    };
    let rerun = AtomicUsize::new(0);
    let engine_time = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        overlapped(
            items,
            2 * rayon::current_num_threads(),
            settings.batch_size,
            Pair::bytes,
            |item| load_pair(item, &plan),
            engines,
            |&engine, pairs, next| infer_group(engine, pairs, next, &plan, &rerun),
            |index, result| {
                let rel = items[index].rel.clone();
                let result = result.and_then(|(pair, inferred)| {
                    finishing.finish(&mut tally, &items[index], &pair, inferred)
                });
                match result {
                    Ok(values) => tally.records.push(ImageRecord {
                        image: rel,
                        status: "ok",
                        error: None,
                        values,
                    }),
                    Err(e) => {
                        tally.failed += 1;
                        tally.records.push(ImageRecord {
                            image: rel,
                            status: "error",
                            error: Some(e.to_string()),
                            values: Default::default(),
                        });
                    }
                }
                progress(index + 1, total);
            },
        )
    }));
    let engine_time = match engine_time {
        Ok(time) => time,
        Err(payload) => match payload.downcast::<DeviceLost>() {
            Ok(lost) => return Err(EvalError::DeviceLost(lost.0)),
            Err(other) => std::panic::resume_unwind(other),
        },
    };
    let rerun = rerun.into_inner();
    let Tally {
        vs_clean,
        gt_clean,
        gt_adv,
        records,
        cls_pred,
        drift_sum,
        drift_n,
        failed,
    } = tally;

    let ok = total - failed;
    let mut report = serde_json::Map::new();
    report.insert("target".into(), json!(target.name()));
    report.insert("images".into(), json!(ok));
    report.insert("failed".into(), json!(failed));
    report.insert("model".into(), json!(settings.model_spec));
    report.insert("weights_random".into(), json!(settings.weights_random));
    report.insert("device".into(), json!(settings.device));
    report.insert("precision".into(), json!(settings.precision));
    report.insert("batch_size".into(), json!(settings.batch_size));
    report.insert("batches_rerun_alone".into(), json!(rerun));
    if let Some(algorithms) = settings.product_algorithms {
        report.insert("product_algorithms".into(), json!(algorithms));
    }
    report.insert(
        "resolution".into(),
        settings.resolution.map_or(json!("native"), |n| json!(n)),
    );
    report.insert("classes".into(), json!(names));
    if let Some(c) = classes {
        report.insert("class_source".into(), json!(c.source));
        if let Some(t) = &c.text_weights {
            report.insert("text_weights".into(), json!(t));
        }
        if let Some(m) = c.text_weights_match {
            report.insert("text_weights_match".into(), json!(m));
        }
    }
    if let Some(l) = &settings.labels {
        report.insert("label_source".into(), json!(l.describe()));
    }
    // What made the adversarial images, when `prm attack` wrote them (its run.json).
    if let Some(w) = &settings.weights {
        report.insert("weights".into(), json!(w));
    }
    match attack_record(adv_dir) {
        Ok(Some(attack)) => {
            // Whether the images were made against the very weights evaluated here (a transfer
            // to another encoder, or a wrong checkpoint, when not).
            if let (Some(w), Some(theirs)) = (&settings.weights, attack["weights"].as_str()) {
                report.insert("attack_weights_match".into(), json!(w == theirs));
            }
            report.insert("attack".into(), attack);
        }
        Ok(None) => {}
        Err(problem) => {
            report.insert("attack_record_error".into(), json!(problem));
        }
    }
    if dense {
        let s = vs_clean.scores();
        report.insert("miou_adv_vs_clean".into(), opt(s.miou));
        report.insert("pixel_agreement".into(), opt(s.pixel_accuracy));
        report.insert("fwiou_adv_vs_clean".into(), opt(s.fwiou));
        let mut per_class: Vec<Value> = names
            .iter()
            .zip(&s.iou)
            .map(|(n, v)| json!({"class": n, "iou_adv_vs_clean": v}))
            .collect();
        if settings.labels.is_some() {
            let (sc, sa) = (gt_clean.scores(), gt_adv.scores());
            report.insert("miou_clean".into(), opt(sc.miou));
            report.insert("miou_adv".into(), opt(sa.miou));
            report.insert("pixel_acc_clean".into(), opt(sc.pixel_accuracy));
            report.insert("pixel_acc_adv".into(), opt(sa.pixel_accuracy));
            report.insert("fwiou_clean".into(), opt(sc.fwiou));
            report.insert("fwiou_adv".into(), opt(sa.fwiou));
            report.insert("ignore_index".into(), json!(settings.ignore_index));
            for (k, pc) in per_class.iter_mut().enumerate() {
                pc["iou_clean"] = json!(sc.iou[k]);
                pc["iou_adv"] = json!(sa.iou[k]);
            }
        }
        report.insert("per_class".into(), Value::Array(per_class));
    } else if target == TargetKind::Features {
        let layers: Vec<Value> = drift_sum
            .iter()
            .enumerate()
            .map(|(l, (c, r))| {
                json!({"layer": l, "cosine": c / drift_n as f64, "relative_l2": r / drift_n as f64})
            })
            .collect();
        report.insert("layers".into(), Value::Array(layers));
    } else {
        let n = cls_pred.len();
        let agree = cls_pred.iter().filter(|(c, a, _)| c == a).count();
        report.insert(
            "top1_agreement".into(),
            opt((n > 0).then(|| agree as f64 / n as f64)),
        );
        if settings.labels.is_some() {
            let labels: Vec<Option<usize>> = cls_pred.iter().map(|x| x.2).collect();
            let clean: Vec<usize> = cls_pred.iter().map(|x| x.0).collect();
            let adv: Vec<usize> = cls_pred.iter().map(|x| x.1).collect();
            report.insert("top1_clean".into(), opt(top1(&clean, &labels)));
            report.insert("top1_adv".into(), opt(top1(&adv, &labels)));
            report.insert(
                "labelled_images".into(),
                json!(labels.iter().filter(|l| l.is_some()).count()),
            );
        }
        if let Some(file) = &plan.class_labels {
            // Lines of images this run does not hold (left out by --exclude, or typos): the
            // count, and a few to look at.
            report.insert("unmatched_label_lines".into(), json!(file.unmatched.len()));
            let examples: Vec<String> = file
                .unmatched
                .iter()
                .take(5)
                .map(|(line, rel)| format!("line {line}: {rel}"))
                .collect();
            report.insert("unmatched_label_examples".into(), json!(examples));
        }
    }
    report.insert(
        "per_image".into(),
        serde_json::to_value(&records).expect("records serialise"),
    );
    Ok(EvalOutcome {
        report: Value::Object(report),
        total,
        batches_rerun_alone: rerun,
        engine_time,
        failed,
    })
}

/// `<adv>/run.json`, the record of the attack that wrote the images: `None` when there is
/// none (images made elsewhere), `Err` with what is wrong when there is one that cannot be
/// read. `prm attack` refuses such a file, since resuming would take outputs it cannot vouch
/// for as its own; evaluation only reads the images, which are what they are whatever the
/// record says, so it goes on and says so (stderr and the report's `attack_record_error`)
/// rather than leaving the report silently without its `attack`.
fn attack_record(adv_dir: &Path) -> Result<Option<Value>, String> {
    let path = adv_dir.join(crate::io::run_record::RUN_RECORD_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) if v.is_object() => Ok(Some(v)),
        Ok(_) => Err(format!(
            "{}: not a run record (not a JSON object)",
            path.display()
        )),
        Err(e) => Err(format!("{}: not a run record ({e})", path.display())),
    }
}

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{:.2}", 100.0 * x),
        None => "–".into(),
    }
}

/// The attack of a report's `attack` record in one line: loss, optimiser, steps, ε, model.
fn attack_line(attack: &Value) -> String {
    let s = &attack["settings"];
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    format!(
        "{} loss, {} × {} steps, ε {}/255, on `{}`",
        text(&s["loss"]),
        text(&s["optimizer"]),
        text(&s["steps"]),
        s["eps"]
            .as_f64()
            .map_or("?".into(), |e| format!("{:.2}", e * 255.0)),
        text(&attack["model"]),
    )
}

/// The Markdown summary of a report.
pub fn markdown_summary(report: &Value) -> String {
    let mut s = String::new();
    let get = |k: &str| report.get(k).cloned().unwrap_or(Value::Null);
    s.push_str(&format!(
        "# prm eval: {}\n\n- model: `{}`{}\n- device: {}, precision: {}, resolution: {}\n- images: {} evaluated, {} failed\n",
        get("target").as_str().unwrap_or(""),
        get("model").as_str().unwrap_or(""),
        if get("weights_random").as_bool() == Some(true) {
            " (**random weights: these numbers say nothing about real transfer**)"
        } else {
            ""
        },
        get("device").as_str().unwrap_or(""),
        get("precision").as_str().unwrap_or(""),
        match get("resolution") {
            Value::String(s) => s,
            v => v.to_string(),
        },
        get("images"),
        get("failed"),
    ));
    if let Some(c) = get("class_source").as_str() {
        let tower = match report.get("text_weights_match").and_then(Value::as_bool) {
            Some(false) => " (**embedded by another text tower than this checkpoint's**)",
            _ => "",
        };
        s.push_str(&format!("- classes: {c}{tower}\n"));
    }
    if let Some(attack) = report.get("attack") {
        let weights = match report.get("attack_weights_match").and_then(Value::as_bool) {
            Some(true) => " (the weights evaluated here)",
            Some(false) => " (**other weights than those evaluated here**)",
            None => "",
        };
        s.push_str(&format!("- attack: {}{weights}\n", attack_line(attack)));
    }
    if let Some(problem) = get("attack_record_error").as_str() {
        s.push_str(&format!(
            "- attack: **unknown**, its record is unreadable: {problem}\n"
        ));
    }
    if let Some(n) = get("labelled_images").as_u64() {
        s.push_str(&format!("- labels: {n} image(s) labelled\n"));
    }
    if let Some(n) = get("unmatched_label_lines").as_u64().filter(|&n| n > 0) {
        let examples: Vec<&str> = report["unmatched_label_examples"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        s.push_str(&format!(
            "- {n} label line(s) name no image of this run (e.g. {})\n",
            examples.join("; ")
        ));
    }
    s.push('\n');
    if report.get("miou_adv_vs_clean").is_some() {
        s.push_str("| metric (%) | value |\n|---|---|\n");
        for (k, label) in [
            ("miou_adv_vs_clean", "mIoU adv vs clean"),
            ("pixel_agreement", "pixel agreement"),
            ("fwiou_adv_vs_clean", "fwIoU adv vs clean"),
            ("miou_clean", "mIoU clean vs labels"),
            ("miou_adv", "mIoU adv vs labels"),
            ("pixel_acc_clean", "pixel acc. clean"),
            ("pixel_acc_adv", "pixel acc. adv"),
            ("fwiou_clean", "fwIoU clean"),
            ("fwiou_adv", "fwIoU adv"),
        ] {
            if let Some(v) = report.get(k) {
                s.push_str(&format!("| {label} | {} |\n", fmt(v)));
            }
        }
        if let Some(Value::Array(pc)) = report.get("per_class") {
            s.push_str("\n| class | IoU adv vs clean | IoU clean | IoU adv |\n|---|---|---|---|\n");
            for c in pc {
                s.push_str(&format!(
                    "| {} | {} | {} | {} |\n",
                    c["class"].as_str().unwrap_or(""),
                    fmt(&c["iou_adv_vs_clean"]),
                    fmt(c.get("iou_clean").unwrap_or(&Value::Null)),
                    fmt(c.get("iou_adv").unwrap_or(&Value::Null)),
                ));
            }
        }
    } else if let Some(Value::Array(layers)) = report.get("layers") {
        s.push_str("| layer | mean token cosine | relative L2 drift |\n|---|---|---|\n");
        for l in layers {
            s.push_str(&format!(
                "| F_{} | {:.4} | {:.4} |\n",
                l["layer"],
                l["cosine"].as_f64().unwrap_or(f64::NAN),
                l["relative_l2"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    } else {
        s.push_str("| metric (%) | value |\n|---|---|\n");
        for (k, label) in [
            ("top1_agreement", "top-1 agreement adv vs clean"),
            ("top1_clean", "top-1 clean"),
            ("top1_adv", "top-1 adv"),
        ] {
            if let Some(v) = report.get(k) {
                s.push_str(&format!("| {label} | {} |\n", fmt(v)));
            }
        }
    }
    if let Some(Value::Array(imgs)) = report.get("per_image") {
        let errors: Vec<&Value> = imgs.iter().filter(|r| r["status"] == "error").collect();
        if !errors.is_empty() {
            s.push_str("\n## Failed images\n\n");
            for e in errors {
                s.push_str(&format!(
                    "- `{}`: {}\n",
                    e["image"].as_str().unwrap_or(""),
                    e["error"].as_str().unwrap_or("")
                ));
            }
        }
    }
    s
}
