//! One evaluation run: every clean image of a directory against its adversarial counterpart,
//! through one target, with the report (JSON + Markdown) and optional prediction PNGs.
//!
//! Pairing: for a clean image at relative path `rel`, the adversarial image is
//! `ADV/<rel with its extension replaced by .png>` (what `prm attack` writes), or `ADV/<rel>` when
//! that does not exist. Labels (dense targets) are `LABELS/<rel with .png>`. A missing or bad
//! adversarial image or label is a per-image error: recorded, never fatal to the run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::labels::{read_label_png, write_label_png};
use super::metrics::{top1, Confusion};
use super::ops::{argmax, dot_logits, upsample_argmax};
use super::targets::{probe_logits, DenseHead, EvalEngine, PatchLogits, Probe, TargetKind};
use super::text::ClassEmbeddings;
use super::EvalError;
use crate::attack::image::Planar;
use crate::io::{list_inputs, output_rel_path, read_image};
use crate::reference::resize::bicubic_resize;

/// What to evaluate and how.
pub struct EvalSettings {
    pub target: TargetKind,
    /// `None`: native resolution; `Some(n)`: the image is resized (bicubic) to n×n first.
    pub resolution: Option<usize>,
    pub ignore_index: u32,
    /// Dense targets: a directory of label PNGs; zeroshot / probe(cls): a label list file.
    pub labels: Option<PathBuf>,
    pub save_predictions: Option<PathBuf>,
    pub probe: Option<Probe>,
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
    pub failed: usize,
}

/// The label map of one image: `(clean, adv)` predictions at native size.
fn dense_maps(
    engine: &dyn EvalEngine,
    settings: &EvalSettings,
    classes: Option<&ClassEmbeddings>,
    clean: &Planar,
    adv: &Planar,
) -> Result<(Vec<u16>, Vec<u16>), EvalError> {
    let run = |im: &Planar| -> Result<Vec<u16>, EvalError> {
        let resized;
        let input = match settings.resolution {
            None => Planar {
                data: im.data,
                height: im.height,
                width: im.width,
            },
            Some(n) => {
                resized = bicubic_resize(im.data, 3, im.height, im.width, n, n);
                Planar {
                    data: &resized,
                    height: n,
                    width: n,
                }
            }
        };
        let logits = if let Some(probe) = &settings.probe {
            let feats = engine.features(&input)?;
            let p = engine.model().config.patch;
            probe_logits(
                probe,
                &feats,
                engine.model().config.width,
                (input.height / p, input.width / p),
            )
        } else {
            let head = DenseHead::of(settings.target).expect("dense target");
            let c = classes.expect("dense targets have classes");
            engine.dense_logits(&input, head, &c.embeddings)?
        };
        let PatchLogits {
            grid_h,
            grid_w,
            classes,
            logits,
        } = logits;
        Ok(upsample_argmax(
            &logits, grid_h, grid_w, classes, im.height, im.width,
        ))
    };
    Ok((run(clean)?, run(adv)?))
}

fn resize_input(im: &Planar, resolution: Option<usize>) -> Option<Vec<f32>> {
    resolution.map(|n| bicubic_resize(im.data, 3, im.height, im.width, n, n))
}

fn with_input<T>(
    im: &Planar,
    resolution: Option<usize>,
    f: impl FnOnce(&Planar) -> Result<T, EvalError>,
) -> Result<T, EvalError> {
    match resize_input(im, resolution) {
        None => f(im),
        Some(data) => {
            let n = resolution.expect("resized");
            f(&Planar {
                data: &data,
                height: n,
                width: n,
            })
        }
    }
}

/// Per-layer (mean token cosine, relative L2 drift ‖a − c‖ / ‖c‖) of F_0..F_L.
pub fn feature_drift(adv: &[Vec<f32>], clean: &[Vec<f32>], dim: usize) -> Vec<(f64, f64)> {
    adv.iter()
        .zip(clean)
        .map(|(a, c)| {
            let (mut cos_sum, mut n) = (0.0f64, 0usize);
            for (ra, rc) in a.chunks(dim).zip(c.chunks(dim)) {
                let (mut ab, mut aa, mut cc) = (0.0f64, 0.0f64, 0.0f64);
                for (&x, &y) in ra.iter().zip(rc) {
                    ab += x as f64 * y as f64;
                    aa += x as f64 * x as f64;
                    cc += y as f64 * y as f64;
                }
                cos_sum += ab / (aa.sqrt() * cc.sqrt()).max(1e-12);
                n += 1;
            }
            let diff: f64 = a
                .iter()
                .zip(c)
                .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
                .sum();
            let norm: f64 = c.iter().map(|&y| (y as f64).powi(2)).sum();
            (cos_sum / n as f64, diff.sqrt() / norm.sqrt().max(1e-12))
        })
        .collect()
}

fn opt(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| json!(x))
}

/// Runs the evaluation of `clean_dir` against `adv_dir`.
pub fn evaluate(
    engine: &dyn EvalEngine,
    clean_dir: &Path,
    adv_dir: &Path,
    classes: Option<&ClassEmbeddings>,
    settings: &EvalSettings,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalOutcome, EvalError> {
    let items = list_inputs(clean_dir, None)?.items;
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
    // Classification labels for zeroshot / CLS probes.
    let class_labels: Option<HashMap<String, usize>> = match (&settings.labels, dense) {
        (Some(p), false) if target != TargetKind::Features => {
            Some(super::labels::read_class_labels(p, &names)?)
        }
        (Some(p), false) => {
            return Err(EvalError::Usage(format!(
                "--labels {}: the features target takes no labels",
                p.display()
            )))
        }
        (Some(p), true) if !p.is_dir() => {
            return Err(EvalError::Usage(format!(
                "--labels {}: dense targets need a directory of label PNGs",
                p.display()
            )))
        }
        _ => None,
    };

    let mut vs_clean = Confusion::new(n_classes.max(1));
    let mut gt_clean = Confusion::new(n_classes.max(1));
    let mut gt_adv = Confusion::new(n_classes.max(1));
    let mut records = Vec::new();
    let mut cls_pred: Vec<(usize, usize, Option<usize>)> = Vec::new();
    let mut drift_sum: Vec<(f64, f64)> = Vec::new();
    let mut drift_n = 0usize;
    let mut failed = 0usize;
    let total = items.len();
    for (i, item) in items.iter().enumerate() {
        let rel = item.rel.clone();
        let result = (|| -> Result<serde_json::Map<String, Value>, EvalError> {
            let clean = read_image(&item.path)?;
            let adv_png = adv_dir.join(output_rel_path(&rel));
            let adv_path = if adv_png.is_file() {
                adv_png
            } else {
                adv_dir.join(&rel)
            };
            if !adv_path.is_file() {
                return Err(EvalError::Usage(format!(
                    "no adversarial image {} (nor {})",
                    adv_dir.join(output_rel_path(&rel)).display(),
                    adv_dir.join(&rel).display()
                )));
            }
            let adv = read_image(&adv_path)?;
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
            let (h, w) = (clean.height, clean.width);
            let cp = Planar {
                data: &clean.data,
                height: h,
                width: w,
            };
            let ap = Planar {
                data: &adv.data,
                height: h,
                width: w,
            };
            let mut values = serde_json::Map::new();
            values.insert("width".into(), json!(w));
            values.insert("height".into(), json!(h));
            if dense {
                // Labels first, so a bad label file fails the image before any work.
                let labels = match &settings.labels {
                    Some(dir) => {
                        let p = dir.join(output_rel_path(&rel));
                        let (lw, lh, l) = read_label_png(&p)?;
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
                let (pc, pa) = dense_maps(engine, settings, classes, &cp, &ap)?;
                let pc32: Vec<u32> = pc.iter().map(|&v| v as u32).collect();
                let pa32: Vec<u32> = pa.iter().map(|&v| v as u32).collect();
                let mut m = Confusion::new(n_classes);
                m.add(&pc32, &pa32, None).expect("predictions are in range");
                let s = m.scores();
                values.insert("miou_adv_vs_clean".into(), opt(s.miou));
                values.insert("pixel_agreement".into(), opt(s.pixel_accuracy));
                let mut img_gt = None;
                if let Some((p, l)) = &labels {
                    let mut mc = Confusion::new(n_classes);
                    let mut ma = Confusion::new(n_classes);
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
                    let out = output_rel_path(&rel);
                    write_label_png(&dir.join("clean").join(&out), w, h, &pc)?;
                    write_label_png(&dir.join("adv").join(&out), w, h, &pa)?;
                }
                vs_clean.merge(&m);
                if let Some((mc, ma)) = img_gt {
                    gt_clean.merge(&mc);
                    gt_adv.merge(&ma);
                }
            } else if target == TargetKind::Features {
                let fc = with_input(&cp, settings.resolution, |im| engine.features(im))?;
                let fa = with_input(&ap, settings.resolution, |im| engine.features(im))?;
                let d = feature_drift(&fa, &fc, engine.model().config.width);
                values.insert(
                    "layer_cosine".into(),
                    json!(d.iter().map(|x| x.0).collect::<Vec<_>>()),
                );
                values.insert(
                    "layer_relative_l2".into(),
                    json!(d.iter().map(|x| x.1).collect::<Vec<_>>()),
                );
                if drift_sum.is_empty() {
                    drift_sum = vec![(0.0, 0.0); d.len()];
                }
                drift_sum
                    .iter_mut()
                    .zip(&d)
                    .for_each(|(s, x)| *s = (s.0 + x.0, s.1 + x.1));
                drift_n += 1;
            } else {
                // zeroshot, or a CLS probe
                let predict = |im: &Planar| -> Result<(usize, Vec<f32>), EvalError> {
                    with_input(im, settings.resolution, |im| {
                        let logits = match &settings.probe {
                            Some(p) => {
                                let f = engine.features(im)?;
                                let pc = engine.model().config.patch;
                                probe_logits(
                                    p,
                                    &f,
                                    engine.model().config.width,
                                    (im.height / pc, im.width / pc),
                                )
                                .logits
                            }
                            None => {
                                let c = classes.expect("zeroshot has classes");
                                let e = engine.image_embedding(im)?;
                                dot_logits(&e, &c.embeddings, c.dim)
                            }
                        };
                        Ok((argmax(&logits), logits))
                    })
                };
                let (c, _) = predict(&cp)?;
                let (a, _) = predict(&ap)?;
                let label = class_labels.as_ref().and_then(|m| m.get(&rel).copied());
                values.insert("clean_class".into(), json!(names.get(c)));
                values.insert("adv_class".into(), json!(names.get(a)));
                values.insert("agree".into(), json!(c == a));
                if let Some(l) = label {
                    values.insert("label".into(), json!(names.get(l)));
                }
                cls_pred.push((c, a, label));
            }
            Ok(values)
        })();
        match result {
            Ok(values) => records.push(ImageRecord {
                image: rel,
                status: "ok",
                error: None,
                values,
            }),
            Err(e) => {
                failed += 1;
                records.push(ImageRecord {
                    image: rel,
                    status: "error",
                    error: Some(e.to_string()),
                    values: Default::default(),
                });
            }
        }
        progress(i + 1, total);
    }

    let ok = total - failed;
    let mut report = serde_json::Map::new();
    report.insert("target".into(), json!(target.name()));
    report.insert("images".into(), json!(ok));
    report.insert("failed".into(), json!(failed));
    report.insert("model".into(), json!(settings.model_spec));
    report.insert("weights_random".into(), json!(settings.weights_random));
    report.insert("device".into(), json!(settings.device));
    report.insert("precision".into(), json!(settings.precision));
    report.insert(
        "resolution".into(),
        settings.resolution.map_or(json!("native"), |n| json!(n)),
    );
    report.insert("classes".into(), json!(names));
    if let Some(c) = classes {
        report.insert("class_source".into(), json!(c.source));
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
        if class_labels.is_some() {
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
    }
    report.insert(
        "per_image".into(),
        serde_json::to_value(&records).expect("records serialise"),
    );
    Ok(EvalOutcome {
        report: Value::Object(report),
        failed,
    })
}

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{:.2}", 100.0 * x),
        None => "–".into(),
    }
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
        s.push_str(&format!("- classes: {c}\n"));
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
