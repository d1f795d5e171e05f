//! The campaign pipeline (decoder threads, engine workers, writer thread) and several engine
//! workers in one process: the same outputs and manifest records (but for timings) whatever the
//! number of workers, manifest lines in input order even when a later batch finishes first,
//! interrupts with several workers and a writer behind, then a resume; `--device sim:N` and
//! `--profile` through the command line. Fast: the tiny model, small images, few steps.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prm::attack::campaign::{
    Campaign, CampaignError, CampaignSummary, OutputOptions, Progress, Silent, Worker,
};
use prm::attack::engine::{Engine, EngineError, LossAndGradient};
use prm::attack::image::{Evaluation, Planar};
use prm::attack::profile::Timeline;
use prm::attack::*;
use prm::gpu::GpuError;
use prm::io::{list_inputs, InputItem, ManifestRecord, Status};
use prm::model::Model;
use prm::reference::ReferenceVit;
use serde_json::Value;

/// A noisy RGB image (noise makes PNG encoding do real work).
fn write_image(path: &Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let img = ::image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let smooth = ((x * 5 + y * 3 + seed * 11) % 200) as u8;
        ::image::Rgb([
            smooth.wrapping_add((state & 31) as u8),
            (state >> 8) as u8,
            smooth / 2 + ((state >> 16) & 63) as u8,
        ])
    });
    img.save(path).unwrap();
}

/// Images of awkward sizes (sides not multiples of the patch, 16), two in a subdirectory, plus
/// a corrupt file and an image smaller than a patch: both must fail without stopping the run.
fn mixed_inputs(dir: &Path) -> Vec<InputItem> {
    let sizes = [
        (40, 36),
        (33, 50),
        (64, 48),
        (47, 47),
        (36, 40),
        (50, 33),
        (48, 35),
    ];
    for (i, &(w, h)) in sizes.iter().enumerate() {
        let rel = if i % 3 == 1 {
            format!("sub/img{i}.png")
        } else {
            format!("img{i}.png")
        };
        write_image(&dir.join(rel), w, h, i as u32);
    }
    std::fs::write(dir.join("img3b.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    write_image(&dir.join("tiny.png"), 12, 40, 9);
    list_inputs(dir, None).unwrap().items
}

struct Setup {
    model: Model,
    settings: AttackSettings,
    objective: Objective,
}

fn setup(steps: usize) -> Setup {
    let model = Model::load("random:tiny").unwrap();
    let mut settings = Preset::Pgd.settings();
    settings.steps = steps;
    let layers = settings
        .layers
        .resolve(model.config.feature_layers())
        .unwrap();
    let objective = Objective::new(settings.loss, layers, settings.tokens, &model).unwrap();
    Setup {
        model,
        settings,
        objective,
    }
}

fn campaign<'a>(
    s: &'a Setup,
    items: &'a [InputItem],
    output: &'a OutputOptions,
    timeline: Option<&'a Timeline>,
) -> Campaign<'a> {
    Campaign {
        objective: &s.objective,
        settings: &s.settings,
        items,
        output,
        timeline,
    }
}

fn manifest(dir: &Path) -> Vec<ManifestRecord> {
    prm::io::read_manifest(&dir.join("manifest.jsonl")).unwrap()
}

/// Records without their timings, for comparisons.
fn untimed(dir: &Path) -> Vec<String> {
    manifest(dir)
        .into_iter()
        .map(|mut r| {
            r.seconds = 0.0;
            serde_json::to_string(&r).unwrap()
        })
        .collect()
}

/// Every file under `dir` but the manifest, with a hash of its bytes.
fn outputs(dir: &Path) -> Vec<(PathBuf, u64)> {
    use std::hash::{Hash, Hasher};
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != "manifest.jsonl" {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                let bytes = std::fs::read(&p).unwrap();
                if p.extension().is_some_and(|e| e == "safetensors") {
                    // The header's metadata comes from a HashMap, so its order (and the file's
                    // bytes) differ between writes of the same image: compare the contents.
                    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
                    let mut info: Vec<_> = meta.metadata().clone().unwrap().into_iter().collect();
                    info.sort();
                    info.hash(&mut h);
                    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                    let image = tensors.tensor("image").unwrap();
                    (image.shape(), image.data()).hash(&mut h);
                } else {
                    bytes.hash(&mut h);
                }
                files.push((p.strip_prefix(dir).unwrap().to_path_buf(), h.finish()));
            }
        }
    }
    files.sort();
    files
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    outputs(dir)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect()
}

/// The positions of the manifest's inputs among `items`: strictly increasing when the manifest
/// is in input order.
fn positions(items: &[InputItem], records: &[ManifestRecord]) -> Vec<usize> {
    records
        .iter()
        .map(|r| items.iter().position(|i| i.rel == r.input).unwrap())
        .collect()
}

fn assert_input_order(items: &[InputItem], records: &[ManifestRecord]) {
    let pos = positions(items, records);
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "not in input order: {pos:?}"
    );
}

fn reference_workers<'m>(
    model: &'m Model,
    sizes: &'m [usize],
) -> impl Fn(usize) -> Result<Worker<ReferenceVit<'m>>, CampaignError> + Sync + 'm {
    move |w| {
        Ok(Worker {
            engine: ReferenceVit::new(model),
            batch_size: sizes[w],
            batch_tokens: None,
            batch_memory: None,
            name: format!("cpu #{w}"),
        })
    }
}

#[test]
fn several_workers_give_the_outputs_and_records_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let items = mixed_inputs(&tmp.path().join("in"));
    let s = setup(2);
    let run = |dir: &str, workers: Option<&[usize]>| -> CampaignSummary {
        let mut output = OutputOptions::new(tmp.path().join(dir));
        output.save_float = true;
        output.batch_size = 2;
        output.decoders = 3;
        let c = campaign(&s, &items, &output, None);
        match workers {
            None => c
                .run(&ReferenceVit::new(&s.model), &Silent, &|| false)
                .unwrap(),
            Some(sizes) => c
                .run_on_workers(
                    sizes.len(),
                    &s.model,
                    reference_workers(&s.model, sizes),
                    &Silent,
                    &|| false,
                )
                .unwrap(),
        }
    };
    let one = run("one", None);
    assert_eq!((one.ok, one.failed, one.skipped), (7, 2, 0));
    let records = manifest(&tmp.path().join("one"));
    assert_input_order(&items, &records);
    let bad = records.iter().filter(|r| r.status == Status::Error).count();
    assert_eq!(
        bad, 2,
        "the corrupt file and the image smaller than a patch"
    );
    // Three workers with different batch sizes: the same bytes and records.
    let three = run("three", Some(&[1, 2, 3]));
    assert_eq!(three, one);
    assert_eq!(
        untimed(&tmp.path().join("three")),
        untimed(&tmp.path().join("one"))
    );
    assert_eq!(
        outputs(&tmp.path().join("three")),
        outputs(&tmp.path().join("one"))
    );
    // A re-run with several workers skips everything.
    let again = run("three", Some(&[2, 2]));
    assert_eq!(
        (again.ok, again.failed, again.skipped),
        (0, 2, 7),
        "failures are retried"
    );
}

/// The reference engine, slow on one image size and panicking on another.
struct Moody<'m> {
    inner: ReferenceVit<'m>,
    slow_width: usize,
    panic_width: usize,
}

impl Engine for Moody<'_> {
    type Clean = <ReferenceVit<'static> as Engine>::Clean;
    fn model(&self) -> &Model {
        self.inner.model()
    }
    fn clean_features(&self, images: &[Planar]) -> Result<Self::Clean, EngineError> {
        if images.iter().any(|im| im.width == self.slow_width) {
            std::thread::sleep(Duration::from_millis(400));
        }
        if images.iter().any(|im| im.width == self.panic_width) {
            panic!("planted failure");
        }
        self.inner.clean_features(images)
    }
    fn loss_and_gradient(
        &self,
        adv: &[Planar],
        clean: &Self::Clean,
        objective: &Objective,
    ) -> Result<Vec<LossAndGradient>, EngineError> {
        self.inner.loss_and_gradient(adv, clean, objective)
    }
    fn evaluate(
        &self,
        adv: &[Planar],
        clean: &Self::Clean,
        objective: &Objective,
    ) -> Result<Vec<Evaluation>, EngineError> {
        self.inner.evaluate(adv, clean, objective)
    }
}

#[test]
fn a_slow_first_batch_and_failing_images_keep_the_manifest_in_input_order() {
    let tmp = tempfile::tempdir().unwrap();
    let items = mixed_inputs(&tmp.path().join("in"));
    let s = setup(1);
    // The first image (40 wide) is slow: the other workers finish later images first, which wait
    // in the reorder buffer. The 47-wide image panics in the engine; `sub/` cannot be written.
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("sub"), b"a file where a directory should be").unwrap();
    let mut output = OutputOptions::new(&out);
    output.batch_size = 1;
    let timeline = Timeline::new();
    let summary = campaign(&s, &items, &output, Some(&timeline))
        .run_on_workers(
            3,
            &s.model,
            |w| {
                Ok(Worker {
                    engine: Moody {
                        inner: ReferenceVit::new(&s.model),
                        slow_width: 40,
                        panic_width: 47,
                    },
                    batch_size: 1,
                    batch_tokens: None,
                    batch_memory: None,
                    name: format!("moody #{w}"),
                })
            },
            &Silent,
            &|| false,
        )
        .unwrap();
    let records = manifest(&out);
    assert_eq!(records.len(), items.len(), "every image recorded once");
    assert_input_order(&items, &records);
    let by_input = |rel: &str| records.iter().find(|r| r.input == rel).unwrap();
    assert!(by_input("img3.png")
        .error
        .as_deref()
        .unwrap()
        .contains("planted failure"));
    assert!(by_input("sub/img1.png")
        .error
        .as_deref()
        .unwrap()
        .contains("cannot write"));
    assert!(by_input("sub/img4.png")
        .error
        .as_deref()
        .unwrap()
        .contains("cannot write"));
    assert_eq!(by_input("img0.png").status, Status::Ok);
    assert_eq!((summary.ok, summary.failed), (4, 5));
    assert_eq!(temporaries(&out), Vec::<PathBuf>::new());
    let profile = timeline.summary();
    assert_eq!(profile.workers.len(), 3);
    let images: usize = profile.workers.iter().map(|w| w.images).sum();
    assert_eq!(
        images,
        items.len(),
        "each image attacked by exactly one worker"
    );
}

/// An engine that takes no time (zero gradients): the writer, encoding noisy PNGs and syncing
/// them, is the bottleneck, so finished batches queue up in front of it.
struct Instant0<'m>(&'m Model);

impl Engine for Instant0<'_> {
    type Clean = ();
    fn model(&self) -> &Model {
        self.0
    }
    fn clean_features(&self, _: &[Planar]) -> Result<(), EngineError> {
        Ok(())
    }
    fn loss_and_gradient(
        &self,
        adv: &[Planar],
        _: &(),
        _: &Objective,
    ) -> Result<Vec<LossAndGradient>, EngineError> {
        Ok(adv
            .iter()
            .map(|im| LossAndGradient {
                loss: 1.0,
                gradient: vec![0.0; im.data.len()],
            })
            .collect())
    }
    fn evaluate(
        &self,
        adv: &[Planar],
        _: &(),
        objective: &Objective,
    ) -> Result<Vec<Evaluation>, EngineError> {
        Ok(adv
            .iter()
            .map(|_| Evaluation {
                loss: 1.0,
                layer_cosine: vec![1.0; objective.layers.len()],
            })
            .collect())
    }
}

/// Counts image-steps; the run is interrupted once `.1` are done.
struct StepsDone(AtomicUsize, usize);
impl Progress for StepsDone {
    fn steps_done(&self, image_steps: usize) {
        self.0.fetch_add(image_steps, Ordering::SeqCst);
    }
}
impl StepsDone {
    fn enough(&self) -> bool {
        self.0.load(Ordering::SeqCst) >= self.1
    }
}

#[test]
fn an_interrupt_with_several_workers_and_a_writer_behind_then_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..24 {
        write_image(&input.join(format!("img{i:02}.png")), 160 + i, 144, i);
    }
    let items = list_inputs(&input, None).unwrap().items;
    let s = setup(1);
    let out = tmp.path().join("out");
    let mut output = OutputOptions::new(&out);
    output.save_float = true;
    let workers = |w| {
        Ok(Worker {
            engine: Instant0(&s.model),
            batch_size: 2,
            batch_tokens: None,
            batch_memory: None,
            name: format!("instant #{w}"),
        })
    };
    // Interrupted after 8 images' steps: the engine is instant, so batches are still waiting for
    // the writer then; they must be written out completely, and nothing after them.
    let steps = StepsDone(AtomicUsize::new(0), 8);
    let timeline = Timeline::new();
    let summary = campaign(&s, &items, &output, Some(&timeline))
        .run_on_workers(3, &s.model, workers, &steps, &|| steps.enough())
        .unwrap();
    assert!(summary.interrupted);
    let records = manifest(&out);
    assert!(
        !records.is_empty() && records.len() < items.len(),
        "{}",
        records.len()
    );
    assert_input_order(&items, &records);
    // Everything recorded is complete, nothing unrecorded was left behind, nothing half-written.
    let files = outputs(&out);
    let pngs = files
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "png"))
        .count();
    let floats = files
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "safetensors"))
        .count();
    assert_eq!((pngs, floats), (records.len(), records.len()));
    assert_eq!(temporaries(&out), Vec::<PathBuf>::new());
    for r in &records {
        assert_eq!(r.status, Status::Ok);
        ::image::open(out.join(r.output.as_ref().unwrap())).unwrap();
    }
    // The resume, again with several workers, does the rest; every image is there once.
    let resumed = campaign(&s, &items, &output, None)
        .run_on_workers(2, &s.model, workers, &Silent, &|| false)
        .unwrap();
    assert_eq!(resumed.skipped, records.len());
    assert_eq!(resumed.ok + resumed.skipped, items.len());
    let all = manifest(&out);
    assert_eq!(all.len(), items.len(), "no image recorded twice");
    assert_input_order(&items, &all[records.len()..]);
    // The same bytes as one uninterrupted run on one worker.
    let mut direct = OutputOptions::new(tmp.path().join("direct"));
    direct.save_float = true;
    direct.batch_size = 2;
    campaign(&s, &items, &direct, None)
        .run(&Instant0(&s.model), &Silent, &|| false)
        .unwrap();
    assert_eq!(outputs(&out), outputs(&tmp.path().join("direct")));
}

/// Polled before every batch and after every step: true from the `n`-th poll on.
struct InterruptAfter(AtomicUsize, usize);
impl InterruptAfter {
    fn poll(&self) -> bool {
        self.0.fetch_add(1, Ordering::SeqCst) >= self.1
    }
}

#[test]
fn an_interrupt_mid_attack_abandons_the_batches_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let items = mixed_inputs(&tmp.path().join("in"));
    let s = setup(3);
    let out = tmp.path().join("out");
    let mut output = OutputOptions::new(&out);
    output.batch_size = 2;
    let after = InterruptAfter(AtomicUsize::new(0), 5);
    let sizes = [2, 2];
    let summary = campaign(&s, &items, &output, None)
        .run_on_workers(
            2,
            &s.model,
            reference_workers(&s.model, &sizes),
            &Silent,
            &|| after.poll(),
        )
        .unwrap();
    assert!(summary.interrupted);
    let records = manifest(&out);
    assert!(records.len() < items.len());
    assert_input_order(&items, &records);
    let pngs = outputs(&out)
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "png"))
        .count();
    assert_eq!(
        pngs,
        records.iter().filter(|r| r.status == Status::Ok).count()
    );
    assert_eq!(temporaries(&out), Vec::<PathBuf>::new());
    let resumed = campaign(&s, &items, &output, None)
        .run_on_workers(
            2,
            &s.model,
            reference_workers(&s.model, &sizes),
            &Silent,
            &|| false,
        )
        .unwrap();
    assert!(!resumed.interrupted);
    let done: Vec<String> = manifest(&out)
        .into_iter()
        .filter(|r| r.status == Status::Ok)
        .map(|r| r.input)
        .collect();
    let mut unique = done.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        (done.len(), unique.len()),
        (7, 7),
        "each image done exactly once"
    );
}

/// The reference engine, whose clean features (the first thing a batch asks of an engine) fail
/// with the error `fault` gives for the call's images: a device out of memory, or one that has
/// failed for good.
struct Faulty<'m, F> {
    inner: ReferenceVit<'m>,
    fault: F,
}

impl<F: Fn(&[Planar]) -> Option<GpuError>> Engine for Faulty<'_, F> {
    type Clean = <ReferenceVit<'static> as Engine>::Clean;
    fn model(&self) -> &Model {
        self.inner.model()
    }
    fn clean_features(&self, images: &[Planar]) -> Result<Self::Clean, EngineError> {
        if let Some(e) = (self.fault)(images) {
            return Err(e.into());
        }
        self.inner.clean_features(images)
    }
    fn loss_and_gradient(
        &self,
        adv: &[Planar],
        clean: &Self::Clean,
        objective: &Objective,
    ) -> Result<Vec<LossAndGradient>, EngineError> {
        self.inner.loss_and_gradient(adv, clean, objective)
    }
    fn evaluate(
        &self,
        adv: &[Planar],
        clean: &Self::Clean,
        objective: &Objective,
    ) -> Result<Vec<Evaluation>, EngineError> {
        self.inner.evaluate(adv, clean, objective)
    }
}

/// The reference engine, out of memory with more than `max` images in a call.
fn small_memory(model: &Model, max: usize) -> Faulty<'_, impl Fn(&[Planar]) -> Option<GpuError>> {
    Faulty {
        inner: ReferenceVit::new(model),
        fault: move |images: &[Planar]| {
            (images.len() > max).then_some(GpuError::OutOfMemory { bytes: 1 << 20 })
        },
    }
}

#[derive(Default)]
struct Shrinks(Mutex<Vec<usize>>);
impl Progress for Shrinks {
    fn batch_shrunk(&self, size: usize, _redone: usize) {
        self.0.lock().unwrap().push(size);
    }
}

#[test]
fn out_of_memory_halving_is_per_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let items = mixed_inputs(&tmp.path().join("in"));
    let s = setup(1);
    let out = tmp.path().join("out");
    let output = OutputOptions::new(&out);
    // Worker 0 fits 4 images per call, worker 1 only 1: only worker 1 shrinks (4 → 2 → 1).
    let shrinks = Shrinks::default();
    let summary = campaign(&s, &items, &output, None)
        .run_on_workers(
            2,
            &s.model,
            |w| {
                Ok(Worker {
                    engine: small_memory(&s.model, [4, 1][w]),
                    batch_size: 4,
                    batch_tokens: None,
                    batch_memory: None,
                    name: format!("small #{w}"),
                })
            },
            &shrinks,
            &|| false,
        )
        .unwrap();
    assert_eq!((summary.ok, summary.failed), (7, 2));
    let records = manifest(&out);
    assert_eq!(records.len(), 9, "none lost, none twice");
    assert_input_order(&items, &records);
    let shrinks = shrinks.0.into_inner().unwrap();
    assert!(shrinks.iter().all(|&n| n < 4), "{shrinks:?}");
}

#[test]
fn a_worker_that_cannot_start_stops_the_run_before_any_image() {
    let tmp = tempfile::tempdir().unwrap();
    let items = mixed_inputs(&tmp.path().join("in"));
    let s = setup(1);
    let out = tmp.path().join("out");
    let output = OutputOptions::new(&out);
    let err = campaign(&s, &items, &output, None)
        .run_on_workers(
            3,
            &s.model,
            |w| {
                if w == 1 {
                    return Err(CampaignError::WorkerSetup {
                        worker: w,
                        device: "test device".into(),
                        source: GpuError::OutOfMemory { bytes: 7 }.into(),
                    });
                }
                Ok(Worker {
                    engine: ReferenceVit::new(&s.model),
                    batch_size: 1,
                    batch_tokens: None,
                    batch_memory: None,
                    name: "cpu".into(),
                })
            },
            &Silent,
            &|| false,
        )
        .unwrap_err();
    assert!(err.to_string().contains("test device"), "{err}");
    assert!(manifest(&out).is_empty(), "nothing attacked");
}

fn prm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_prm"))
        .args(args)
        .output()
        .expect("prm runs")
}

#[test]
fn sim_devices_and_the_profile_through_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for (i, (w, h)) in [(33, 40), (40, 17), (20, 36)].into_iter().enumerate() {
        write_image(&input.join(format!("img{i}.png")), w, h, i as u32);
    }
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |device: &str, out: &str, extra: &[&str]| {
        let out = s(&tmp.path().join(out));
        let mut args = vec![
            "attack",
            "--model",
            "random:tiny",
            "--input",
            &s(&input),
            "--output",
            &out,
            "--device",
            device,
            "--preset",
            "pgd",
            "--steps",
            "1",
            "--quiet",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        prm(&args)
    };
    let profile = tmp.path().join("profile.json");
    let o = run(
        "sim:2",
        "two",
        &["--profile", &s(&profile), "--decode-threads", "2"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("engine busy") && err.contains("worker 1"),
        "{err}"
    );
    let json: Value = serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap();
    assert_eq!(json["summary"]["workers"].as_array().unwrap().len(), 2);
    let batches = json["batches"].as_array().unwrap();
    let images: u64 = batches.iter().map(|b| b["images"].as_u64().unwrap()).sum();
    assert_eq!(images, 3);
    assert!(err.contains("engine time by phase: set-up"), "{err}");
    for b in batches {
        let t = |k: &str| b[k].as_f64().unwrap();
        assert!(t("requested_at") <= t("loaded_at") && t("loaded_at") <= t("engine_done_at"));
        assert!(t("engine_done_at") <= t("queued_at"));
        // The engine's phases lie inside its busy time, and the steps take some of it.
        let p = &b["phases"];
        let phase = |k: &str| p[k].as_f64().unwrap();
        let sum: f64 = [
            "setup_seconds",
            "steps_seconds",
            "quantize_seconds",
            "evaluate_seconds",
        ]
        .iter()
        .map(|k| phase(k))
        .sum();
        assert!(phase("steps_seconds") > 0.0, "{p}");
        assert!(sum <= t("engine_done_at") - t("loaded_at") + 1e-9, "{b}");
    }
    assert!(json["summary"]["engine_never_waited_in_steady_state"].is_boolean());
    // One simulated device: the same bytes and records.
    let o = run("sim", "one", &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        outputs(&tmp.path().join("two")),
        outputs(&tmp.path().join("one"))
    );
    assert_eq!(
        untimed(&tmp.path().join("two")),
        untimed(&tmp.path().join("one"))
    );

    // Device lists that cannot work are usage errors that say what to do.
    for (device, says) in [
        ("sim:0", "sim:N"),
        ("cuda:0,0", "listed twice"),
        ("cuda:x", "cuda:all"),
    ] {
        let o = run(device, "bad", &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{device}: {err}");
        assert!(err.contains(says), "{device}: {err}");
    }
    let o = run("sim", "bad", &["--profile", "p.txt"]);
    assert_eq!(o.status.code(), Some(2));
    // Several devices are for prm attack only.
    let o = prm(&["bench", "--model", "random:tiny", "--device", "sim:2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("runs on one"));
}

/// Tokens of an input at its native size under `random:tiny` (patch `p`), 0 for inputs that
/// fail to load (not an image, or smaller than a patch).
fn native_tokens(item: &InputItem, p: usize) -> usize {
    match ::image::image_dimensions(&item.path) {
        Ok((w, h)) if w as usize >= p && h as usize >= p => (h as usize / p) * (w as usize / p) + 1,
        _ => 0,
    }
}

/// The batches a token budget makes of `tokens` (consecutive images while they fit, at least
/// one, at most `max` images): (first index, images) each.
fn greedy_batches(tokens: &[usize], budget: usize, max: usize) -> Vec<(usize, usize)> {
    let mut batches = Vec::new();
    let mut first = 0;
    while first < tokens.len() {
        let (mut n, mut used) = (0, 0);
        while first + n < tokens.len() && n < max {
            let t = tokens[first + n];
            if n > 0 && used + t > budget {
                break;
            }
            used += t;
            n += 1;
        }
        batches.push((first, n));
        first += n;
    }
    batches
}

/// `--batch-tokens`: batches of mixed-size images hold consecutive images up to the token
/// budget (at least one each, failures counting none), on one worker and on three, and the
/// outputs and records are those of one image per batch.
#[test]
fn token_budget_bounds_batches_of_mixed_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let items = mixed_inputs(&tmp.path().join("in"));
    let s = setup(2);
    let p = s.model.config.patch;
    let tokens: Vec<usize> = items.iter().map(|i| native_tokens(i, p)).collect();
    let budget = 12;
    assert!(
        tokens.iter().any(|&t| t > budget)
            && tokens.iter().filter(|&&t| t > 0 && t <= budget / 2).count() >= 2,
        "the inputs must have images over the budget and pairs that fit: {tokens:?}"
    );

    let mut one = OutputOptions::new(tmp.path().join("one"));
    one.save_float = true;
    campaign(&s, &items, &one, None)
        .run(&ReferenceVit::new(&s.model), &Silent, &|| false)
        .unwrap();

    let mut output = OutputOptions::new(tmp.path().join("tokens"));
    output.save_float = true;
    output.batch_size = 8;
    output.batch_tokens = Some(budget);
    let timeline = Timeline::new();
    let summary = campaign(&s, &items, &output, Some(&timeline))
        .run(&ReferenceVit::new(&s.model), &Silent, &|| false)
        .unwrap();
    assert_eq!((summary.ok, summary.failed), (7, 2));
    let batches = batch_spans(&timeline);
    assert_eq!(
        batches,
        greedy_batches(&tokens, budget, 8),
        "tokens {tokens:?}"
    );
    assert!(batches.iter().any(|&(_, n)| n > 1), "{batches:?}");
    assert_same_results(&tmp.path().join("tokens"), &tmp.path().join("one"));

    // Three workers, the same budget: every batch is still one of the greedy batches.
    let dir = tmp.path().join("three");
    let mut output = OutputOptions::new(&dir);
    output.save_float = true;
    output.decoders = 2;
    let timeline = Timeline::new();
    let workers = |w: usize| {
        Ok(Worker {
            engine: ReferenceVit::new(&s.model),
            batch_size: 8,
            batch_tokens: Some(budget),
            batch_memory: None,
            name: format!("cpu #{w}"),
        })
    };
    campaign(&s, &items, &output, Some(&timeline))
        .run_on_workers(3, &s.model, workers, &Silent, &|| false)
        .unwrap();
    assert_eq!(batch_spans(&timeline), greedy_batches(&tokens, budget, 8));
    assert_same_results(&dir, &tmp.path().join("one"));
}

/// The batches a run recorded, as (first index, images), sorted.
fn batch_spans(timeline: &Timeline) -> Vec<(usize, usize)> {
    let mut spans: Vec<(usize, usize)> = timeline
        .batches()
        .iter()
        .map(|b| (b.first, b.images))
        .collect();
    spans.sort();
    spans
}

/// Two output directories hold the same files (by content) and records (but for timings).
fn assert_same_results(a: &Path, b: &Path) {
    assert_eq!(outputs(a), outputs(b));
    assert_eq!(untimed(a), untimed(b));
}

/// `prm attack --batch-tokens` through the GPU engine in the simulator: the batches in the
/// profile are the greedy token batches; a budget of 0 is a usage error.
#[test]
fn batch_tokens_through_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let items = mixed_inputs(&input);
    let tokens: Vec<usize> = items.iter().map(|i| native_tokens(i, 16)).collect();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let profile = tmp.path().join("profile.json");
    let out = tmp.path().join("out");
    let common = [
        "attack",
        "--model",
        "random:tiny",
        "--input",
        &s(&input),
        "--output",
        &s(&out),
        "--device",
        "sim",
        "--preset",
        "pgd",
        "--steps",
        "1",
        "--quiet",
        "--batch-size",
        "4",
    ];
    let profile_arg = s(&profile);
    let mut args = common.to_vec();
    args.extend(["--batch-tokens", "12", "--profile", &profile_arg]);
    let o = prm(&args);
    // Two inputs cannot be read: exit code 1, every other image saved.
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let records = manifest(&out);
    assert_eq!(records.iter().filter(|r| r.status == Status::Ok).count(), 7);
    let json: Value = serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap();
    let mut batches: Vec<(usize, usize)> = json["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["first"].as_u64().unwrap() as usize,
                b["images"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    batches.sort();
    assert_eq!(batches, greedy_batches(&tokens, 12, 4), "tokens {tokens:?}");

    let mut args = common.to_vec();
    args.extend(["--batch-tokens", "0"]);
    let o = prm(&args);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--batch-tokens"));
}

/// The reference engine, whose device fails for good (a fault that ends the CUDA context) when
/// it meets an image `fatal_width` wide, and on every call after that.
fn dying_device(
    model: &Model,
    fatal_width: usize,
) -> Faulty<'_, impl Fn(&[Planar]) -> Option<GpuError>> {
    let dead = std::sync::atomic::AtomicBool::new(false);
    Faulty {
        inner: ReferenceVit::new(model),
        fault: move |images: &[Planar]| {
            if images.iter().any(|im| im.width == fatal_width) {
                dead.store(true, Ordering::SeqCst);
            }
            dead.load(Ordering::SeqCst).then(|| GpuError::Cuda {
                context: "copy to host".into(),
                message: "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered"
                    .into(),
            })
        },
    }
}

/// A device that fails for good stops the run, as an interrupt does: no image is recorded as
/// failed for it (the images after it are not attempted on a dead device), everything finished
/// before is saved and recorded in input order, and a re-run on a working device does the rest.
#[test]
fn a_device_that_fails_for_good_stops_the_run_and_a_rerun_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let items = mixed_inputs(&tmp.path().join("in"));
    let s = setup(1);
    let fatal = |r: &ManifestRecord| r.width == 64;
    let no_engine_failures = |records: &[ManifestRecord]| {
        for r in records {
            assert!(
                !fatal(r),
                "the image that killed the device was recorded: {r:?}"
            );
            if r.status != Status::Ok {
                let e = r.error.as_deref().unwrap_or("");
                assert!(!e.contains("engine error"), "{e}");
            }
        }
    };
    for workers in [1, 2] {
        let out = tmp.path().join(format!("out{workers}"));
        let mut output = OutputOptions::new(&out);
        output.batch_size = 1;
        // Every engine dies on the 64-wide input, whichever claims it.
        let summary = if workers == 1 {
            campaign(&s, &items, &output, None)
                .run(&dying_device(&s.model, 64), &Silent, &|| false)
                .unwrap()
        } else {
            campaign(&s, &items, &output, None)
                .run_on_workers(
                    workers,
                    &s.model,
                    |w| {
                        Ok(Worker {
                            engine: dying_device(&s.model, 64),
                            batch_size: 1,
                            batch_tokens: None,
                            batch_memory: None,
                            name: format!("worker {w}"),
                        })
                    },
                    &Silent,
                    &|| false,
                )
                .unwrap()
        };
        assert!(summary.device_lost && !summary.interrupted, "{summary:?}");
        let records = manifest(&out);
        assert!(records.len() < items.len(), "{}", records.len());
        assert_input_order(&items, &records);
        no_engine_failures(&records);
        assert_eq!(
            summary.ok,
            records.iter().filter(|r| r.status == Status::Ok).count()
        );
        assert_eq!(temporaries(&out), Vec::<PathBuf>::new());
        // The re-run on a working device does the rest: every decodable image ok exactly once.
        let resumed = campaign(&s, &items, &output, None)
            .run(&ReferenceVit::new(&s.model), &Silent, &|| false)
            .unwrap();
        assert!(!resumed.device_lost && !resumed.interrupted);
        let mut done: Vec<String> = manifest(&out)
            .into_iter()
            .filter(|r| r.status == Status::Ok)
            .map(|r| r.input)
            .collect();
        let n = done.len();
        done.sort();
        done.dedup();
        assert_eq!(
            (n, done.len()),
            (7, 7),
            "{workers} worker(s): each image once"
        );
    }
}
