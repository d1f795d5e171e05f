//! Device memory, on a simulator that counts it: what `--batch-size auto` budgets for a batch
//! must cover what the engine allocates, and a campaign on a GPU too small for its batches must
//! lose no image and change no bit (the out-of-memory error then comes from wherever in the
//! engine an allocation fails, not from a test double at the engine's door).

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use prm::attack::campaign::{Campaign, OutputOptions, Progress};
use prm::attack::*;
use prm::gpu::engine::{auto_batch_memory, GpuVit, Precision};
use prm::gpu::pool::BufferPool;
use prm::gpu::{Device, GpuError};
use prm::io::{list_inputs, InputItem};
use prm::model::Model;

use common::write_image;

#[test]
fn a_simulator_with_memory_counts_its_buffers_and_refuses_past_its_total() {
    let total = 1 << 20;
    let dev = Device::sim_with_memory(total);
    assert!(
        dev.name().contains("1048576 bytes of device memory"),
        "{}",
        dev.name()
    );
    assert_eq!(dev.free_memory().unwrap(), Some(total));
    let a = dev.alloc::<f32>(100_000).unwrap();
    assert_eq!(dev.memory_in_use().unwrap(), Some(400_000));
    assert_eq!(dev.free_memory().unwrap(), Some(total - 400_000));
    match dev.alloc::<f32>(200_000) {
        Err(GpuError::OutOfMemory { bytes }) => assert_eq!(bytes, 800_000),
        other => panic!("expected out of memory, got {:?}", other.map(|b| b.len())),
    }
    assert_eq!(
        dev.memory_in_use().unwrap(),
        Some(400_000),
        "a refusal holds nothing"
    );
    drop(a);
    assert_eq!(dev.memory_in_use().unwrap(), Some(0));
    assert_eq!(dev.memory_peak(), Some(400_000));
    let b = dev.alloc_undefined::<u8>(total).unwrap();
    assert_eq!(
        (dev.free_memory().unwrap(), dev.memory_peak()),
        (Some(0), Some(total))
    );
    drop(b);
    dev.reset_memory_peak();
    assert_eq!(dev.memory_peak(), Some(0));

    // The plain simulator has no total (free memory unknown, as before) but counts.
    let plain = Device::sim();
    let _c = plain.alloc::<f32>(10).unwrap();
    assert_eq!(plain.free_memory().unwrap(), None);
    assert_eq!(plain.memory_in_use().unwrap(), Some(40));
}

#[test]
fn the_pool_frees_its_cache_when_the_device_is_full() {
    let dev = Device::sim_with_memory(1 << 20);
    let pool = BufferPool::new(&dev);
    // 150,000 floats take a class of 163,840 (640 KiB), kept in the cache when returned.
    drop(pool.take(150_000).unwrap());
    assert_eq!(pool.cached_bytes(), 655_360);
    // Another class (114,688 floats, 448 KiB) fits only without the cached buffer.
    let b = pool.take(100_000).unwrap();
    assert_eq!(b.len(), 100_000);
    assert_eq!(pool.cached_bytes(), 0);
    assert_eq!(dev.memory_in_use().unwrap(), Some(458_752));
}

/// Inputs of the given sizes (sides no multiple of the patch among them).
fn inputs(dir: &Path, sizes: &[(u32, u32)]) -> Vec<InputItem> {
    for (i, &(w, h)) in sizes.iter().enumerate() {
        write_image(&dir.join(format!("img{i}.png")), w, h, i as u32);
    }
    list_inputs(dir, None).unwrap().items
}

/// Counts the batches that ran out of memory and were split.
#[derive(Default)]
struct Shrinks(AtomicUsize);
impl Progress for Shrinks {
    fn batch_shrunk(&self, _size: usize, _redone: usize) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Case {
    name: &'static str,
    model: Model,
    precision: Precision,
    settings: AttackSettings,
    sizes: Vec<(u32, u32)>,
}

impl Case {
    fn objective(&self) -> Objective {
        let layers = self
            .settings
            .layers
            .resolve(self.model.config.feature_layers())
            .unwrap();
        Objective::new(
            self.settings.loss,
            layers,
            self.settings.tokens,
            &self.model,
        )
        .unwrap()
    }

    /// Runs the campaign on `dev` in batches of `batch_size` into `out`: the engine's peak
    /// memory beyond its weights, and the batches split for lack of memory.
    fn run(
        &self,
        dev: &Device,
        items: &[InputItem],
        out: &Path,
        batch_size: usize,
    ) -> (usize, usize) {
        let objective = self.objective();
        let engine = GpuVit::new_with_precision(dev, &self.model, self.precision).unwrap();
        let weights = dev.memory_in_use().unwrap().unwrap();
        dev.reset_memory_peak();
        let mut output = OutputOptions::new(out);
        output.batch_size = batch_size;
        let shrinks = Shrinks::default();
        let summary = Campaign {
            objective: &objective,
            settings: &self.settings,
            items,
            output: &output,
            timeline: None,
        }
        .run(&engine, &shrinks, &|| false)
        .unwrap();
        assert_eq!(
            (summary.ok, summary.failed),
            (items.len(), 0),
            "{}: every image attacked on {}",
            self.name,
            dev.name()
        );
        // Running out of memory must not cost a capture (one that fails for want of the
        // buffers its warm-up step kept is redone, and a second failure turns graphs off).
        assert_eq!(
            engine.graph_stats().failures,
            0,
            "{}: a capture failed on {}",
            self.name,
            dev.name()
        );
        (
            dev.memory_peak().unwrap() - weights,
            shrinks.0.load(Ordering::SeqCst),
        )
    }

    /// What `--batch-size auto` budgets for all the inputs in one batch.
    fn budget(&self) -> usize {
        let blocks = self.objective().blocks_needed();
        // What an image costs does not depend on the free memory.
        let budget = auto_batch_memory(0, &self.model.config, blocks, self.precision);
        let p = self.model.config.patch;
        self.sizes
            .iter()
            .map(|&(w, h)| {
                let tokens = match self.settings.resolution {
                    Resolution::Native => (h as usize / p) * (w as usize / p) + 1,
                    Resolution::Fixed(n) => (n / p) * (n / p) + 1,
                };
                budget.cost(tokens, (w * h) as usize)
            })
            .sum()
    }
}

fn pgd(steps: usize) -> AttackSettings {
    AttackSettings {
        steps,
        ..Preset::Pgd.settings()
    }
}

fn paper(steps: usize) -> AttackSettings {
    AttackSettings {
        steps,
        ..Preset::Paper.settings()
    }
}

/// Every output PNG's bytes, by name.
fn pngs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The whole campaign path (uploads, steps, graphs, the final evaluation, saving on the device)
/// in one batch: the engine's peak beyond its weights stays within the budget (the tiny model:
/// native sizes, the paper's settings, large images at a fixed resolution).
#[test]
fn the_auto_batch_budget_covers_what_the_engine_allocates() {
    let tiny = || Model::load("random:tiny").unwrap();
    let mixed = vec![(64, 48), (47, 47), (33, 80), (96, 64), (50, 33)];
    let cases = vec![
        Case {
            name: "tiny, pgd, bf16, native sizes",
            model: tiny(),
            precision: Precision::Bf16,
            settings: pgd(2),
            sizes: mixed.clone(),
        },
        Case {
            name: "tiny, paper (AdamW, dynamic scale), fp32",
            model: tiny(),
            precision: Precision::Fp32,
            settings: paper(2),
            sizes: mixed.clone(),
        },
        Case {
            name: "tiny, MI-FGSM, bf16, large images at --resolution 32",
            model: tiny(),
            precision: Precision::Bf16,
            settings: AttackSettings {
                optimizer: OptimizerKind::Mifgsm,
                resolution: Resolution::Fixed(32),
                ..pgd(2)
            },
            sizes: vec![(300, 200), (257, 255), (120, 310)],
        },
        Case {
            name: "tiny, paper at --resolution 48, large images",
            model: tiny(),
            precision: Precision::Bf16,
            settings: AttackSettings {
                resolution: Resolution::Fixed(48),
                ..paper(2)
            },
            sizes: vec![(300, 200), (200, 301)],
        },
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, case) in cases.into_iter().enumerate() {
        let items = inputs(&tmp.path().join(format!("in{i}")), &case.sizes);
        let (peak, _) = case.run(
            &Device::sim(),
            &items,
            &tmp.path().join(format!("out{i}")),
            16,
        );
        let budget = case.budget();
        println!(
            "{}: peak {peak} bytes, budget {budget} ({:.2}×)",
            case.name,
            budget as f64 / peak as f64
        );
        assert!(
            peak <= budget,
            "{}: the engine took {peak} bytes, the budget is {budget}",
            case.name
        );
    }
}

/// The test above at a realistic width, a test of its own so that the test threads share the
/// simulator's time evenly; here the budget must also be at most 3× the peak.
#[test]
fn the_auto_batch_budget_covers_a_vit_b_campaign_without_waste() {
    // A realistic width (ViT-B) at its real sizes; the simulator's products are CPU GEMMs.
    let b32 = Model::load("random:vit-b-32").unwrap();
    let realistic = [
        ("ViT-B/32, pgd, bf16, 224 px", Precision::Bf16, pgd(1)),
        ("ViT-B/32, pgd, fp32, 224 px", Precision::Fp32, pgd(1)),
        (
            "ViT-B/32, pgd, bf16, layers 0..3",
            Precision::Bf16,
            AttackSettings {
                layers: LayerSelection::parse("0,1,2,3").unwrap(),
                ..pgd(1)
            },
        ),
    ];
    // The same width in 8 heads of 96: attention on v3 at heads 96 wide, q|k|v in bf16 as
    // with heads of 64 (as open_clip's ViT-H/14, 16 heads of 80, runs).
    let mut b32_heads_96 = b32.clone();
    b32_heads_96.config.heads = 8;
    let realistic = realistic.into_iter().map(|r| (r, &b32)).chain([(
        (
            "ViT-B/32 in 8 heads of 96, pgd, bf16, 224 px",
            Precision::Bf16,
            pgd(1),
        ),
        &b32_heads_96,
    )]);
    let tmp = tempfile::tempdir().unwrap();
    let items = inputs(&tmp.path().join("in-b32"), &[(224, 224), (230, 200)]);
    for (j, ((name, precision, settings), model)) in realistic.enumerate() {
        let case = Case {
            name,
            model: model.clone(),
            precision,
            settings,
            sizes: vec![(224, 224), (230, 200)],
        };
        let (peak, _) = case.run(
            &Device::sim(),
            &items,
            &tmp.path().join(format!("out-b32-{j}")),
            2,
        );
        let budget = case.budget();
        println!(
            "{name}: peak {peak} bytes, budget {budget} ({:.2}×)",
            budget as f64 / peak as f64
        );
        assert!(
            peak <= budget,
            "{name}: the engine took {peak} bytes, the budget is {budget}"
        );
        assert!(
            budget <= 3 * peak,
            "{name}: a budget of {budget} wastes most of a GPU (peak {peak})"
        );
    }
}

/// Campaigns in batches larger than fit: each runs out of memory wherever the engine's
/// allocation fails (a step, a capture's direct run, the evaluation, the saving), halves its
/// batch, frees its caches, and still attacks every image to the same bytes as a run with all
/// the memory it wants.
#[test]
fn campaigns_on_a_small_gpu_lose_no_image_and_change_no_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let sizes = vec![(64, 48), (47, 47), (33, 80), (80, 64), (50, 33), (40, 17)];
    let cases = [
        Case {
            name: "pgd, bf16, graphs",
            model: Model::load("random:tiny").unwrap(),
            precision: Precision::Bf16,
            settings: pgd(2),
            sizes: sizes.clone(),
        },
        Case {
            name: "paper (AdamW, dynamic scale), fp32",
            model: Model::load("random:tiny").unwrap(),
            precision: Precision::Fp32,
            settings: paper(2),
            sizes: sizes.clone(),
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let items = inputs(&tmp.path().join(format!("in{i}")), &case.sizes);
        let out = |what: &str| tmp.path().join(format!("out{i}-{what}"));
        let (whole, _) = case.run(&Device::sim(), &items, &out("whole"), 6);
        let (alone, _) = case.run(&Device::sim(), &items, &out("alone"), 1);
        let reference = pngs(&out("whole"));
        assert_eq!(reference.len(), items.len());
        assert!(
            pngs(&out("alone")) == reference,
            "{}: batch size changed the outputs",
            case.name
        );
        let weights = {
            let dev = Device::sim();
            let _engine = GpuVit::new_with_precision(&dev, &case.model, case.precision).unwrap();
            dev.memory_in_use().unwrap().unwrap()
        };
        // The most any one image needs on an engine of its own (no caches of earlier images).
        let largest = (0..items.len())
            .map(|j| {
                let dir = out(&format!("single{j}"));
                case.run(&Device::sim(), &items[j..j + 1], &dir, 1).0
            })
            .max()
            .unwrap();
        // From barely enough for the largest image alone (caches of earlier batches must be
        // freed for it to fit; a little room for the per-grid position embeddings, which stay)
        // to nearly enough for the whole batch.
        let mut split = 0;
        let rooms = [
            largest * 17 / 16,
            alone,
            (alone + whole) / 2,
            whole * 9 / 10,
        ];
        for (k, room) in rooms.into_iter().enumerate() {
            let dev = Device::sim_with_memory(weights + room);
            let dir = out(&format!("limit{k}"));
            let (peak, shrinks) = case.run(&dev, &items, &dir, 6);
            assert!(peak <= room, "{}: held {peak} bytes in {room}", case.name);
            assert!(
                pngs(&dir) == reference,
                "{}, {room} bytes: outputs differ",
                case.name
            );
            split += shrinks;
        }
        assert!(
            split > 0,
            "{}: no batch ran out of memory; the limits test nothing",
            case.name
        );
    }
}

/// `prm attack --batch-size auto` on a simulator standing in for a small GPU
/// (`PRM_SIM_MEMORY`): batches sized from its free memory, with each image's native pixels
/// counted (large images at a small `--resolution` are few tokens but much memory), so that no
/// batch runs out of memory, and batches of several images where they fit.
#[test]
fn auto_batches_fit_a_small_gpu_without_running_out_of_memory() {
    let tmp = tempfile::tempdir().unwrap();
    for (k, (name, device, memory, sizes, resolution, most)) in [
        ("small images", "sim", "24M", vec![(64, 48); 6], "native", 6),
        // 5 tokens each at 32 px, but 60,000 native pixels: two a batch fit in 20 MiB.
        (
            "large images at 32 px",
            "sim",
            "20M",
            vec![(300, 200); 6],
            "32",
            2,
        ),
        // Each simulated device has the memory: two workers, each sizing its own batches.
        ("two devices", "sim:2", "20M", vec![(300, 200); 6], "32", 2),
    ]
    .into_iter()
    .enumerate()
    {
        let input = tmp.path().join(format!("in{k}"));
        inputs(&input, &sizes);
        let out = tmp.path().join(format!("out{k}"));
        let profile = tmp.path().join(format!("profile{k}.json"));
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_prm"))
            .args([
                "attack",
                "--model",
                "random:tiny",
                "--preset",
                "pgd",
                "--steps",
                "1",
            ])
            .args([
                "--device",
                device,
                "--precision",
                "bf16",
                "--batch-size",
                "auto",
                "-q",
            ])
            .args(["--resolution", resolution])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&out)
            .arg(format!("--profile={}", profile.display()))
            .env("PRM_SIM_MEMORY", memory)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{name}: {stderr}");
        let (profile, images) = batches_without_running_out(&profile, name);
        assert_eq!(images.iter().sum::<u64>(), 6, "{name}: {images:?}");
        // The profile says what bounded the batches.
        for w in profile["workers"].as_array().unwrap() {
            let budget = w["batch_memory_bytes"].as_u64().unwrap_or(0);
            assert!(budget > 0 && budget < 20 << 20, "{name}: {w}");
        }
        assert_eq!(images.iter().max(), Some(&most), "{name}: {images:?}");
    }
}

/// `--batch-size auto` sizes batches from the memory left once the weights are on the device:
/// ViT-B/32's bf16 weights are nearly all of this simulated GPU (5 MiB more), so a budget
/// taken before they were uploaded would put eight images in a batch, which does not fit.
#[test]
fn auto_batches_are_sized_from_the_memory_the_weights_leave() {
    let model = Model::load("random:vit-b-32").unwrap();
    let weights = {
        let dev = Device::sim();
        let _engine = GpuVit::new_with_precision(&dev, &model, Precision::Bf16).unwrap();
        dev.memory_in_use().unwrap().unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    inputs(&input, &[(64, 64); 12]);
    let profile = tmp.path().join("profile.json");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_prm"))
        .args(["attack", "--model", "random:vit-b-32", "--preset", "pgd"])
        .args([
            "--steps",
            "1",
            "--device",
            "sim",
            "--precision",
            "bf16",
            "-q",
        ])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(tmp.path().join("out"))
        .arg(format!("--profile={}", profile.display()))
        .env("PRM_SIM_MEMORY", (weights + (5 << 20)).to_string())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (_, images) = batches_without_running_out(&profile, "ViT-B/32");
    assert_eq!(images.iter().sum::<u64>(), 12, "{images:?}");
}

/// A `--profile` JSON and the images of each batch in it, after checking that no batch ran out
/// of memory.
fn batches_without_running_out(profile: &Path, what: &str) -> (serde_json::Value, Vec<u64>) {
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(profile).unwrap()).unwrap();
    let batches = profile["batches"].as_array().unwrap();
    let images: Vec<u64> = batches
        .iter()
        .map(|b| b["images"].as_u64().unwrap())
        .collect();
    assert!(
        batches.iter().all(|b| b["out_of_memory"] == false),
        "{what}: a batch ran out of memory: {images:?}"
    );
    (profile, images)
}
