//! Races. The simulator runs a block's threads one at a time between meeting points, in the
//! order of its schedule (`prm::gpu::sim::Schedule`): forward, or blocks and threads reversed.
//! A kernel in which one thread reads what another writes with no barrier between them (shared
//! memory inside a warp, across warps, or global memory across blocks) sees the write under one
//! schedule and not under the other. On a GPU such a race shows only sometimes; here it shows
//! as different bits. No kernel uses float atomics, so every result must be the same bits under
//! both schedules.
//!
//! - the engine's forward and backward under every attention variant and loss path;
//! - whole `prm attack` and `prm eval` runs (resize, embedding, updates, saving, the targets),
//!   with `PRM_SIM_SCHEDULE` set for the child process.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{objective, perturbed, small_model, views, Draw};
use prm::attack::*;
use prm::gpu::engine::attention_plan::AttentionSetting;
use prm::gpu::engine::{GpuVit, Precision};
use prm::gpu::kernels::attention::{TcOptions, TensorCoreVersion};
use prm::gpu::sim::Schedule;
use prm::gpu::Device;
use prm::model::Activation;

/// Sides that are not multiples of the 8-pixel patch; the last image has 177 tokens, so the
/// attention runs several row tiles and a ragged last one.
fn images(d: &mut Draw) -> Vec<(Vec<f32>, usize, usize)> {
    [(27usize, 45usize), (32, 32), (90, 131)]
        .iter()
        .map(|&(h, w)| (d.vec(3 * h * w, 0.02, 0.98), h, w))
        .collect()
}

/// Bit patterns of every image's loss and input gradient, clean features included (they are
/// computed under the same schedule).
fn loss_and_gradient_bits(
    gpu: &GpuVit,
    clean: &[Planar<'_>],
    adv: &[Planar<'_>],
    obj: &Objective,
) -> Vec<(u64, Vec<u32>)> {
    let clean_features = gpu.clean_features(clean).unwrap();
    gpu.loss_and_gradient(adv, &clean_features, obj)
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.loss.to_bits(),
                r.gradient.iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

/// One engine configuration.
struct Variant {
    name: &'static str,
    precision: Precision,
    attention: AttentionSetting,
    fused_loss: bool,
    /// Every loss, or the prm loss only (enough for an attention variant).
    every_loss: bool,
}

const DEFAULT: Variant = Variant {
    name: "bf16 v3 (the default)",
    precision: Precision::Bf16,
    attention: AttentionSetting::Fixed(TensorCoreVersion::V3, TcOptions::DEFAULT),
    fused_loss: true,
    every_loss: true,
};

/// The engine's loss and input gradient, clean features included, under both schedules: fp32
/// and the default (bf16, v3), every loss.
#[test]
fn the_engine_gives_the_same_bits_in_both_schedules() {
    same_bits_in_both_schedules(&[
        Variant {
            name: "fp32 (SIMT attention)",
            precision: Precision::Fp32,
            ..DEFAULT
        },
        DEFAULT,
    ]);
}

/// The test above for the other attention kernels and options (the prm loss only), a test of
/// its own so that the test threads share the simulator's time evenly.
#[test]
fn every_attention_kernel_gives_the_same_bits_in_both_schedules() {
    same_bits_in_both_schedules(&[
        Variant {
            name: "bf16 v3, delta kernel, masked tiles, unfused loss",
            attention: AttentionSetting::Fixed(
                TensorCoreVersion::V3,
                TcOptions {
                    straight_tiles: false,
                    delta_in_dq: false,
                    split: 1,
                    paired_rows: false,
                },
            ),
            fused_loss: false,
            every_loss: false,
            ..DEFAULT
        },
        Variant {
            name: "bf16 v2",
            attention: AttentionSetting::Fixed(TensorCoreVersion::V2, TcOptions::DEFAULT),
            every_loss: false,
            ..DEFAULT
        },
        Variant {
            name: "bf16 v4",
            attention: AttentionSetting::Fixed(TensorCoreVersion::V4, TcOptions::DEFAULT),
            every_loss: false,
            ..DEFAULT
        },
        Variant {
            name: "bf16 v4, three CTAs per head",
            attention: AttentionSetting::Fixed(
                TensorCoreVersion::V4,
                TcOptions {
                    split: 3,
                    ..TcOptions::DEFAULT
                },
            ),
            every_loss: false,
            ..DEFAULT
        },
        Variant {
            name: "bf16 v4, paired blocks, two CTAs per head",
            attention: AttentionSetting::Fixed(
                TensorCoreVersion::V4,
                TcOptions {
                    split: 2,
                    paired_rows: true,
                    ..TcOptions::DEFAULT
                },
            ),
            every_loss: false,
            ..DEFAULT
        },
        // Tuned on the spot: each schedule's engine may choose other kernels (the simulator's
        // timings mean nothing), and every candidate must give the same bits.
        Variant {
            name: "bf16 auto",
            attention: AttentionSetting::Auto,
            every_loss: false,
            ..DEFAULT
        },
    ]);
}

fn same_bits_in_both_schedules(variants: &[Variant]) {
    let model = small_model(128, 2, 3, 8, 4, Activation::QuickGelu, 41);
    let mut d = Draw::new(17);
    let clean = images(&mut d);
    let adv = perturbed(&clean, &mut d);
    let (clean_v, adv_v) = (views(&clean), views(&adv));
    let objective = |loss, tokens, layers| objective(&model, loss, tokens, layers);
    let losses = [
        (
            "prm, every layer",
            objective(LossKind::Prm, TokenSelection::All, LayerSelection::All),
        ),
        (
            "nrd, patches of layers 0 and 2",
            objective(
                LossKind::Nrd,
                TokenSelection::Patch,
                LayerSelection::List(vec![0, 2]),
            ),
        ),
        (
            "dr",
            objective(LossKind::Dr, TokenSelection::All, LayerSelection::All),
        ),
        (
            "embed",
            objective(LossKind::Embed, TokenSelection::All, LayerSelection::All),
        ),
    ];
    let engine = |schedule, variant: &Variant| {
        let dev = Device::sim_with_schedule(schedule);
        let mut gpu = GpuVit::new_with_precision(&dev, &model, variant.precision).unwrap();
        gpu.set_attention(variant.attention);
        gpu.set_fused_loss(variant.fused_loss);
        gpu
    };
    for variant in variants {
        let engines = [
            engine(Schedule::Forward, variant),
            engine(Schedule::Reverse, variant),
        ];
        let cases = if variant.every_loss {
            &losses[..]
        } else {
            &losses[..1]
        };
        for (loss_name, obj) in cases {
            let [forward, reverse] = engines
                .each_ref()
                .map(|gpu| loss_and_gradient_bits(gpu, &clean_v, &adv_v, obj));
            for (i, (f, r)) in forward.iter().zip(&reverse).enumerate() {
                let what = format!("{}, {loss_name}, image {i}", variant.name);
                assert_eq!(f.0, r.0, "{what}: the loss differs between schedules");
                let first = f.1.iter().zip(&r.1).position(|(a, b)| a != b);
                assert!(
                    first.is_none(),
                    "{what}: the gradient differs between schedules, first at element {first:?}"
                );
            }
        }
    }
}

/// Writes a smooth, textured RGB image.
fn write_image(path: &Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = ::image::RgbImage::from_fn(w, h, |x, y| {
        let v = |k: u32| {
            (((x * (3 + k + seed) + y * (5 + 2 * k) + seed * 17) % 251) as u8)
                .wrapping_add((k * 40) as u8)
        };
        ::image::Rgb([v(0), v(1), v(2)])
    });
    img.save(path).unwrap();
}

/// Runs `prm` with `PRM_SIM_SCHEDULE` set; panics with its stderr unless it succeeds.
fn prm(schedule: &str, args: &[&str]) {
    prm_with(schedule, &[], args)
}

/// [`prm`] with more environment variables.
fn prm_with(schedule: &str, vars: &[(&str, &str)], args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_prm"))
        .args(args)
        .env("PRM_SIM_SCHEDULE", schedule)
        .envs(vars.iter().copied())
        .output()
        .expect("prm runs");
    assert!(
        out.status.success(),
        "prm {args:?} under the {schedule} schedule failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir`, relative path and bytes, sorted by path.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// A JSON document with every field that measures time (its name holds "second" or ends in
/// "_s" or "per_s") removed, so two runs compare on their results only.
fn without_timings(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(k, _)| !(k.contains("second") || k.ends_with("_s")))
                .map(|(k, v)| (k, without_timings(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_timings).collect()),
        other => other,
    }
}

/// The files of two output directories are the same, JSON and JSON-lines files compared without
/// their timings.
fn assert_same_outputs(forward: &Path, reverse: &Path) {
    let (f, r) = (files(forward), files(reverse));
    let names = |v: &[(PathBuf, Vec<u8>)]| v.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&f), names(&r), "the runs wrote different files");
    assert!(!f.is_empty(), "the runs wrote nothing");
    for ((path, a), (_, b)) in f.iter().zip(&r) {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext == "json" || ext == "jsonl" {
            let parse = |bytes: &[u8]| -> Vec<serde_json::Value> {
                String::from_utf8_lossy(bytes)
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| without_timings(serde_json::from_str(l).expect("a JSON line")))
                    .collect()
            };
            let (a, b) = if ext == "json" {
                let whole = |bytes: &[u8]| {
                    vec![without_timings(
                        serde_json::from_slice(bytes).expect("a JSON file"),
                    )]
                };
                (whole(a), whole(b))
            } else {
                (parse(a), parse(b))
            };
            assert_eq!(a, b, "{}: results differ between schedules", path.display());
        } else {
            assert!(
                a == b,
                "{}: the bytes differ between schedules",
                path.display()
            );
        }
    }
}

#[test]
fn whole_attacks_and_evaluations_give_the_same_files_in_both_schedules() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let input = root.join("in");
    write_image(&input.join("a.png"), 70, 53, 1);
    write_image(&input.join("b.png"), 64, 64, 2);
    write_image(&input.join("c.png"), 45, 81, 3);
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let presets: [(&str, &[&str]); 2] = [
        ("pgd", &["--preset", "pgd", "--precision", "bf16"]),
        ("paper", &["--preset", "paper", "--steps", "3"]),
    ];
    for (preset, settings) in presets {
        for schedule in ["forward", "reverse"] {
            let (input, out) = (s(&input), s(&root.join(format!("{preset}-{schedule}"))));
            let mut args = vec!["attack", "--device", "sim", "--model", "random:tiny"];
            args.extend(["--input", &input, "--save-float", "--output", &out]);
            args.extend(settings);
            // The reverse run also picks its attention kernels by timing them (the CUDA
            // default): the files must still be the forward run's, which ran v3.
            let attention: &[(&str, &str)] = match schedule {
                "reverse" => &[("PRM_ATTENTION", "auto")],
                _ => &[],
            };
            prm_with(schedule, attention, &args);
        }
        let dir = |schedule: &str| root.join(format!("{preset}-{schedule}"));
        assert_same_outputs(&dir("forward"), &dir("reverse"));
    }

    // Every evaluation target, on the images the forward pgd run wrote: the q·qᵀ and k·kᵀ
    // attention variants (sclip, clearclip), the causal text tower (zeroshot's class prompts),
    // dense predictions (maskclip) and the per-layer features.
    let classes = root.join("classes.txt");
    std::fs::write(&classes, "cat\ndog\nrocket\n").unwrap();
    let adv = root.join("pgd-forward");
    for schedule in ["forward", "reverse"] {
        let dir = root.join(format!("eval-{schedule}"));
        for target in ["maskclip", "sclip", "clearclip", "zeroshot", "features"] {
            let report = dir.join(format!("{target}.json"));
            let predictions = dir.join(format!("{target}-predictions"));
            let mut args = vec![
                "eval".to_owned(),
                "--model".to_owned(),
                "random:tiny".to_owned(),
                "-q".to_owned(),
                "--device".to_owned(),
                "sim".to_owned(),
                "--target".to_owned(),
                target.to_owned(),
                "--clean".to_owned(),
                s(&input),
                "--adv".to_owned(),
                s(&adv),
                "--report".to_owned(),
                s(&report),
            ];
            if target != "features" {
                args.extend(["--classes".to_owned(), s(&classes)]);
            }
            if target == "maskclip" {
                args.extend(["--save-predictions".to_owned(), s(&predictions)]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            prm(schedule, &args);
        }
    }
    assert_same_outputs(&root.join("eval-forward"), &root.join("eval-reverse"));
}
