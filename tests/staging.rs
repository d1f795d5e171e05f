//! What the GPU engine no longer copies per batch: starts derived on the device from the clean
//! images (`--init random|zero`) and clean images staged ahead on a copy stream. Both must give
//! byte-identical adversarial images to the plain uploads they replace. Runs in the simulator,
//! and on a GPU when one is present.

use crate::common;

use common::{attack_images, devices, small_model, write_image, Draw};
use prm::attack::image::Starts;
use prm::attack::*;
use prm::gpu::engine::GpuVit;
use prm::gpu::Device;
use prm::model::Activation;
use prm::rng::ImageRng;

/// Mixed sizes, sides no multiple of the patch.
fn batch(d: &mut Draw) -> Vec<(Vec<f32>, usize, usize)> {
    [(27usize, 45usize), (32, 32), (41, 23)]
        .iter()
        .map(|&(h, w)| (d.vec(3 * h * w, 0.0, 1.0), h, w))
        .collect()
}

fn images(clean: &[(Vec<f32>, usize, usize)]) -> Vec<(Planar<'_>, ImageRng)> {
    attack_images(clean, 9)
}

#[test]
fn device_derived_starts_give_the_same_images_as_uploaded_starts() {
    let model = small_model(64, 1, 2, 8, 4, Activation::Gelu, 5);
    let mut d = Draw::new(8);
    let clean = batch(&mut d);
    for dev in devices() {
        let gpu = GpuVit::new(&dev, &model).unwrap();
        for (optimizer, init, loss) in [
            (OptimizerKind::Pgd, Init::Random, LossKind::Prm),
            (OptimizerKind::Mifgsm, Init::Random, LossKind::Nrd),
            (OptimizerKind::Adamw, Init::Random, LossKind::Prm),
            (OptimizerKind::Adamw, Init::Zero, LossKind::Prm),
            // A zero start that is no stationary point: no escape step.
            (OptimizerKind::Pgd, Init::Zero, LossKind::Dr),
        ] {
            let settings = AttackSettings {
                optimizer,
                init: init.clone(),
                loss,
                steps: 3,
                dynamic_scale: None,
                resolution: Resolution::Native,
                step_size: 1.0 / 255.0,
                lr: 2.0 / 255.0,
                ..Preset::Pgd.settings()
            };
            let layers = LayerSelection::All
                .resolve(model.config.feature_layers())
                .unwrap();
            let obj = Objective::new(loss, layers, TokenSelection::All, &model).unwrap();
            let attack = Attack::new(&gpu, &obj, &settings, images(&clean)).unwrap();
            let derived = attack.starts(&[None, None, None]);
            assert!(
                derived.derived().is_some(),
                "{init:?}: starts should follow from the clean images"
            );
            let uploaded = Starts::given(attack.start_images(&derived).into_owned());
            let a = attack.run_from(uploaded, |_| {}).unwrap();
            let b = attack.run_from(derived, |_| {}).unwrap();
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&a.adversarial),
                    bits(&b.adversarial),
                    "{} {optimizer:?} {init:?} {loss:?} image {i}: derived start differs",
                    dev.name()
                );
                assert_eq!(a.loss_initial.to_bits(), b.loss_initial.to_bits());
            }
        }
    }
}

/// The final evaluation after a device-resident loop reuses the clean features the loop
/// computed (one forward fewer per batch), and measures exactly what an attack that computes
/// them afresh measures. Fixed resolution, so both the host's and the device's resize are in
/// play.
#[test]
fn the_final_evaluation_reuses_the_loops_clean_features() {
    let model = small_model(64, 1, 2, 8, 4, Activation::Gelu, 5);
    let mut d = Draw::new(21);
    let clean = batch(&mut d);
    for dev in devices() {
        let gpu = GpuVit::new(&dev, &model).unwrap();
        gpu.set_graphs(false); // every forward its own launches, to count them
        for resolution in [Resolution::Native, Resolution::Fixed(24)] {
            let settings = AttackSettings {
                steps: 3,
                resolution,
                ..Preset::Pgd.settings()
            };
            let layers = LayerSelection::All
                .resolve(model.config.feature_layers())
                .unwrap();
            let obj = Objective::new(LossKind::Prm, layers, TokenSelection::All, &model).unwrap();
            let forwards = |t: &prm::gpu::Timeline| {
                // One token assembly per forward of a batch.
                t.ops
                    .iter()
                    .filter(|o| o.label.starts_with("prm_embed_assemble_tokens"))
                    .count()
            };
            let attack = Attack::new(&gpu, &obj, &settings, images(&clean)).unwrap();
            dev.start_timeline().unwrap();
            let outcomes = attack
                .run_from(attack.starts(&[None, None, None]), |_| {})
                .unwrap();
            let finals: Vec<Vec<f32>> = outcomes.iter().map(|o| o.adversarial.clone()).collect();
            let reused = attack.evaluate(&finals).unwrap();
            let t = dev.finish_timeline().unwrap();
            // The loop's clean forward, one per step, and the evaluation's: no second clean one.
            assert_eq!(forwards(&t), 1 + 3 + 1, "{} {resolution:?}", dev.name());

            let fresh = Attack::new(&gpu, &obj, &settings, images(&clean))
                .unwrap()
                .evaluate(&finals)
                .unwrap();
            for (i, (a, b)) in reused.iter().zip(&fresh).enumerate() {
                assert_eq!(
                    a.loss.to_bits(),
                    b.loss.to_bits(),
                    "image {i} {resolution:?}"
                );
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a.layer_cosine), bits(&b.layer_cosine), "image {i}");
            }
        }
    }
}

/// The stager on its own: a staged upload is taken only under its key and part lengths, only
/// once, and a slot staged over forgets what it held.
fn parts(x: &[Vec<f32>]) -> Vec<&[f32]> {
    x.iter().map(|v| v.as_slice()).collect()
}

#[test]
fn staged_uploads_are_taken_only_under_their_key_and_sizes() {
    use prm::gpu::staging::Stager;
    let dev = Device::sim();
    let mut d = Draw::new(3);
    let a = [d.vec(3 * 45 * 61, 0.0, 1.0), d.vec(3 * 197 * 3, 0.0, 1.0)];
    let b = [d.vec(3 * 7 * 5, 0.0, 1.0)];
    let lens = |x: &[Vec<f32>]| x.iter().map(|v| v.len()).collect::<Vec<_>>();
    let mut stager: Stager<u32> = Stager::new(&dev).unwrap();
    stager.stage(1, &parts(&a)).unwrap();
    stager.stage(2, &parts(&b)).unwrap();
    let mut dst = dev.alloc::<f32>(a[0].len() + a[1].len()).unwrap();
    dev.poison(&mut dst).unwrap();
    // Another key, or the right key with other sizes: nothing, and dst untouched.
    assert!(stager.take(&3, &lens(&a), &mut dst).unwrap().is_none());
    let mut swapped = lens(&a);
    swapped.reverse();
    assert!(stager.take(&1, &swapped, &mut dst).unwrap().is_none());
    assert!(dev.download(&dst).unwrap().iter().all(|v| v.is_nan()));
    let taken = stager.take(&1, &lens(&a), &mut dst).unwrap();
    assert_eq!(taken.map(|t| t.copy_pending), Some(false));
    assert_eq!(dev.download(&dst).unwrap(), a.concat());
    // Taken once only.
    assert!(stager.take(&1, &lens(&a), &mut dst).unwrap().is_none());
    // A third staging reuses the slot of the oldest (key 2 after key 1 was taken: slot 0,
    // then slot 1 holds 2; staging 4 and 5 overwrites both).
    stager.stage(4, &parts(&b)).unwrap();
    assert!(stager.holds(&2) && stager.holds(&4));
    stager.stage(5, &parts(&b)).unwrap();
    assert!(
        !stager.holds(&2),
        "slot staged over still answers for its old key"
    );
    let mut small = dev.alloc::<f32>(b[0].len()).unwrap();
    dev.poison(&mut small).unwrap();
    assert!(stager.take(&2, &lens(&b), &mut small).unwrap().is_none());
    assert!(stager.take(&5, &lens(&b), &mut small).unwrap().is_some());
    assert_eq!(dev.download(&small).unwrap(), b[0]);
    // Downloads through the stager are plain downloads here (pinned on CUDA), one vector per
    // piece; pieces may stop short of the buffer's end.
    assert_eq!(stager.download_split(&dst, &lens(&a)).unwrap(), a);
    assert_eq!(
        stager.download_split(&dst, &[a[0].len()]).unwrap(),
        vec![a[0].clone()]
    );
}

/// A whole attack whose clean images were staged under its key gives the same bytes as one
/// that uploads them, and uses the staged copy; staged under another key, it is not used.
#[test]
fn an_attack_on_staged_clean_images_matches_a_plain_upload() {
    use prm::attack::engine::StageKey;
    let model = small_model(64, 1, 2, 8, 4, Activation::Gelu, 6);
    let mut d = Draw::new(12);
    let clean = batch(&mut d);
    let settings = AttackSettings {
        steps: 2,
        dynamic_scale: None,
        ..Preset::Pgd.settings()
    };
    let layers = LayerSelection::All
        .resolve(model.config.feature_layers())
        .unwrap();
    let obj = Objective::new(settings.loss, layers, TokenSelection::All, &model).unwrap();
    for dev in devices() {
        let gpu = GpuVit::new(&dev, &model).unwrap();
        let run = |key: Option<StageKey>| {
            let mut attack = Attack::new(&gpu, &obj, &settings, images(&clean)).unwrap();
            if let Some(k) = key {
                attack.staged_as(k);
            }
            let starts = attack.starts(&[None, None, None]);
            attack.run_from(starts, |_| {}).unwrap()
        };
        let key = |run| StageKey {
            run,
            images: vec![0, 1, 2],
        };
        let planars: Vec<Planar> = images(&clean).into_iter().map(|(p, _)| p).collect();
        let plain = run(None);
        gpu.stage(&key(1), &planars);
        let before = gpu.staging_counters();
        assert_eq!(before.staged, 1);
        // Another run's key: not used.
        let other = run(Some(key(2)));
        assert_eq!(gpu.staging_counters().used, before.used);
        let staged = run(Some(key(1)));
        assert_eq!(
            gpu.staging_counters().used,
            before.used + 1,
            "{}",
            dev.name()
        );
        for ((p, o), s) in plain.iter().zip(&other).zip(&staged) {
            assert_eq!(p.adversarial, o.adversarial);
            assert_eq!(p.adversarial, s.adversarial, "{}", dev.name());
            assert_eq!(p.loss_initial.to_bits(), s.loss_initial.to_bits());
        }
    }
}

/// Six inputs of awkward sizes, one corrupt (a per-image failure inside a staged batch).
fn inputs(dir: &std::path::Path) {
    for (i, (w, h)) in [(33, 40), (40, 17), (20, 36), (47, 47), (16, 16), (35, 21)]
        .into_iter()
        .enumerate()
    {
        write_image(&dir.join(format!("img{i}.png")), w, h, i as u32);
    }
    std::fs::write(dir.join("img2b.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
}

/// Every output file's bytes and the manifest without timings, for comparisons.
fn results(dir: &std::path::Path) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    let records = prm::io::read_manifest(&dir.join("manifest.jsonl"))
        .unwrap()
        .into_iter()
        .map(|mut r| {
            r.seconds = 0.0;
            serde_json::to_string(&r).unwrap()
        })
        .collect();
    (files, records)
}

/// `prm attack` on simulated devices, with staging (the default) and without
/// (`PRM_NO_STAGING=1`): the same bytes and records; with it, every batch from each worker's
/// third on ran on staged input (the next batch is staged once it is decoded, which the tiny
/// inputs are long before), and the profile says so.
#[test]
fn the_pipeline_stages_the_next_batch_and_the_outputs_do_not_change() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    inputs(&input);
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let run = |device: &str, out: &str, staging: bool| -> serde_json::Value {
        let profile = tmp.path().join(format!("{out}.json"));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_prm"));
        cmd.args([
            "attack",
            "--model",
            "random:tiny",
            "--input",
            &s(&input),
            "--output",
            &s(&tmp.path().join(out)),
            "--device",
            device,
            "--preset",
            "pgd",
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--quiet",
            "--profile",
            &s(&profile),
        ]);
        if !staging {
            cmd.env("PRM_NO_STAGING", "1");
        }
        let o = cmd.output().unwrap();
        // Exit code 1: the corrupt input failed (and nothing else).
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap()
    };
    for device in ["sim", "sim:2"] {
        let plain = run(device, &format!("plain-{device}"), false);
        let staged = run(device, &format!("staged-{device}"), true);
        assert_eq!(
            results(&tmp.path().join(format!("plain-{device}"))),
            results(&tmp.path().join(format!("staged-{device}"))),
            "{device}: staging changed the outputs"
        );
        // Per batch (worker, flag), but for the corrupt input's batch (input 3, img2b.png):
        // nothing of it reaches the engine, so nothing is staged for it.
        let flags = |json: &serde_json::Value, key: &str| -> Vec<(u64, bool)> {
            json["batches"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| b["first"].as_u64() != Some(3))
                .map(|b| (b["worker"].as_u64().unwrap(), b[key].as_bool().unwrap()))
                .collect()
        };
        assert!(
            flags(&plain, "input_staged").iter().all(|&(_, s)| !s),
            "{device}: PRM_NO_STAGING=1 still staged"
        );
        let staged_batches = flags(&staged, "input_staged");
        for w in 0..2 {
            let mine: Vec<bool> = staged_batches
                .iter()
                .filter(|&&(worker, _)| worker == w)
                .map(|&(_, s)| s)
                .collect();
            assert!(
                mine.iter().skip(2).all(|&s| s),
                "{device} worker {w}: a batch after the second ran on unstaged input: {mine:?}"
            );
        }
        assert!(
            staged_batches.iter().any(|&(_, s)| s),
            "{device}: nothing staged"
        );
        assert!(flags(&staged, "copy_pending").iter().all(|&(_, p)| !p));
        let workers = staged["summary"]["workers"].as_array().unwrap();
        let staged_after_first: u64 = workers
            .iter()
            .map(|w| w["input_staged_after_first"].as_u64().unwrap())
            .sum();
        assert!(staged_after_first > 0, "{device}: {workers:?}");
    }
}

/// The GPU engine (simulator), out of memory with more than `max` images in a step loop, and
/// keeping what it staged across the error (so a halved batch meets a staging made for the
/// whole one: keys must tell them apart); it logs the pipeline's calls: when each batch's step
/// loop starts, each step it reports, and each staging of a next batch.
struct SmallGpu<'m> {
    inner: GpuVit<'m>,
    max: usize,
    log: std::sync::Mutex<Vec<&'static str>>,
}

impl<'m> SmallGpu<'m> {
    fn new(inner: GpuVit<'m>, max: usize) -> Self {
        SmallGpu {
            inner,
            max,
            log: Default::default(),
        }
    }

    fn note(&self, event: &'static str) {
        self.log.lock().unwrap().push(event);
    }
}

impl Engine for SmallGpu<'_> {
    type Clean = <GpuVit<'static> as Engine>::Clean;
    fn model(&self) -> &prm::model::Model {
        self.inner.model()
    }
    fn clean_features(&self, images: &[Planar]) -> Result<Self::Clean, EngineError> {
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
    fn run_steps(
        &self,
        plan: &prm::attack::engine::StepPlan,
        on_step: &mut dyn FnMut(usize),
    ) -> Option<Result<prm::attack::engine::StepLoopOutput<Self::Clean>, EngineError>> {
        self.note("run");
        if plan.clean.len() > self.max {
            return Some(Err(
                prm::gpu::GpuError::OutOfMemory { bytes: 1 << 20 }.into()
            ));
        }
        self.inner.run_steps(plan, &mut |step| {
            self.note("step");
            on_step(step)
        })
    }
    fn stages_uploads(&self) -> bool {
        self.inner.stages_uploads()
    }
    fn stage(&self, key: &prm::attack::engine::StageKey, clean: &[Planar]) {
        self.note("stage");
        self.inner.stage(key, clean)
    }
    fn staging_counters(&self) -> prm::attack::engine::StagingCounters {
        self.inner.staging_counters()
    }
}

#[test]
fn out_of_memory_halving_with_a_staged_next_batch_gives_the_same_outputs() {
    use prm::attack::campaign::{Campaign, OutputOptions, Silent};
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    inputs(&input);
    let items = prm::io::list_inputs(&input, None).unwrap().items;
    let model = prm::model::Model::load("random:tiny").unwrap();
    let mut settings = Preset::Pgd.settings();
    settings.steps = 1;
    let layers = settings
        .layers
        .resolve(model.config.feature_layers())
        .unwrap();
    let objective = Objective::new(settings.loss, layers, settings.tokens, &model).unwrap();
    let dev = Device::sim();
    let run = |out: &str, max: usize, staging: bool| {
        let mut output = OutputOptions::new(tmp.path().join(out));
        output.batch_size = 3;
        let engine = SmallGpu::new(GpuVit::new(&dev, &model).unwrap(), max);
        engine.inner.set_staging(staging);
        let summary = Campaign {
            objective: &objective,
            settings: &settings,
            items: &items,
            output: &output,
            timeline: None,
        }
        .run(&engine, &Silent, &|| false)
        .unwrap();
        assert_eq!((summary.ok, summary.failed), (6, 1));
        engine.staging_counters()
    };
    // Batches of 3 (the corrupt input in one of them) halve to 1, the next batch staged each
    // time for the batch size before the halving.
    let plain = run("plain", 1, false);
    assert_eq!(plain.used, 0);
    let halved = run("halved", 1, true);
    assert!(halved.staged > 0 && halved.used > 0, "{halved:?}");
    let (plain, halved) = (
        results(&tmp.path().join("plain")),
        results(&tmp.path().join("halved")),
    );
    assert_eq!(plain.1, halved.1, "manifest records differ");
    assert!(plain.0 == halved.0, "output images differ");
}

/// A worker stages the next batch while the current one runs, once its second step is queued
/// (the first may end with a read-back of the initial loss), not before it starts: the host's
/// packing then overlaps the device's work on the current batch.
#[test]
fn the_next_batch_is_staged_after_the_second_step_of_the_current_one() {
    use prm::attack::campaign::{Campaign, OutputOptions, Silent};
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    inputs(&input);
    // Only images that decode: a batch that never reaches the engine stages the next one
    // when it is done, having no steps to stage it during.
    std::fs::remove_file(input.join("img2b.png")).unwrap();
    let items = prm::io::list_inputs(&input, None).unwrap().items;
    let model = prm::model::Model::load("random:tiny").unwrap();
    let mut settings = Preset::Pgd.settings();
    settings.steps = 3;
    let layers = settings
        .layers
        .resolve(model.config.feature_layers())
        .unwrap();
    let objective = Objective::new(settings.loss, layers, settings.tokens, &model).unwrap();
    let dev = Device::sim();
    let mut output = OutputOptions::new(tmp.path().join("out"));
    output.batch_size = 1;
    let engine = SmallGpu::new(GpuVit::new(&dev, &model).unwrap(), usize::MAX);
    Campaign {
        objective: &objective,
        settings: &settings,
        items: &items,
        output: &output,
        timeline: None,
    }
    .run(&engine, &Silent, &|| false)
    .unwrap();
    let log = engine.log.into_inner().unwrap();
    assert!(log.contains(&"stage"), "nothing staged: {log:?}");
    // Each staging comes between a batch's second step and its third, never between batches.
    let mut steps_in_batch = 0;
    for (i, &event) in log.iter().enumerate() {
        match event {
            "run" => steps_in_batch = 0,
            "step" => steps_in_batch += 1,
            _ => assert!(
                steps_in_batch == 2 && log.get(i + 1) == Some(&"step"),
                "staged outside the current batch's steps (event {i}): {log:?}"
            ),
        }
    }
}

/// `prm bench` times the steady state of `prm attack`: every attack's batch staged while the
/// previous one ran (the first before the first). That staged attacks give the same images as
/// plain uploads is `an_attack_on_staged_clean_images_matches_a_plain_upload`.
#[test]
fn the_bench_stages_every_attacks_batch_ahead() {
    use prm::bench::{synthetic_images, time_attacks};
    let model = small_model(64, 1, 2, 8, 4, Activation::Gelu, 5);
    let settings = AttackSettings {
        steps: 2,
        ..Preset::Pgd.settings()
    };
    let layers = LayerSelection::All
        .resolve(model.config.feature_layers())
        .unwrap();
    let obj = Objective::new(LossKind::Prm, layers, TokenSelection::All, &model).unwrap();
    let images = synthetic_images(3, 24, 40, 7);
    for dev in devices() {
        let gpu = GpuVit::new(&dev, &model).unwrap();
        assert!(prm::attack::engine::Engine::stages_uploads(&gpu));
        let before = prm::attack::engine::Engine::staging_counters(&gpu);
        let timings = time_attacks(&gpu, &obj, &settings, &images, 24, 40, 1, 2, || {}).unwrap();
        assert_eq!(timings.len(), 2);
        let after = prm::attack::engine::Engine::staging_counters(&gpu);
        assert_eq!(after.staged - before.staged, 3, "{}", dev.name());
        assert_eq!(after.used - before.used, 3, "{}", dev.name());
    }
}
