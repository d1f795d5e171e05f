//! Graphs (`Device::capture`, `Graph::launch`) and the GPU engine's captured attack steps, in
//! the simulator (and on a GPU when one is present): a captured step replays exactly what a
//! direct step does, so attacks with graphs on are bit-identical to graphs off, and what a
//! graph cannot contain (allocations, uploads, downloads, synchronisations) is an error at
//! capture, and a buffer freed under a graph an error at replay.

use crate::common;

use common::{devices, Draw};
use prm::attack::*;
use prm::gpu::engine::{GpuVit, GraphStats, Precision};
use prm::gpu::kernels::update::{
    adamw_advance, adamw_step_f32, adamw_step_scheduled_f32, AdamwScalars, AdamwSchedule,
    ImageBatch,
};
use prm::gpu::pool::BufferPool;
use prm::gpu::{Device, GpuError};
use prm::model::Model;
use prm::rng::ImageRng;

fn is_capture_error<T>(r: Result<T, GpuError>) -> bool {
    matches!(r, Err(GpuError::Capture { .. }))
}

#[test]
fn a_capture_records_without_running_and_replays_on_launch() {
    for dev in devices() {
        let src = dev.upload(&[1.0f32, 2.0, 3.0]).unwrap();
        let mut dst = dev.alloc::<f32>(3).unwrap();
        let mut counter = AdamwSchedule::new(&dev, 0.5, 0.01, 4).unwrap();
        let graph = dev
            .capture(|| {
                dev.copy(&src, &mut dst)?;
                adamw_advance(&dev, &mut counter)
            })
            .unwrap();
        assert!(!dev.is_capturing());
        assert_eq!(
            dev.download(&dst).unwrap(),
            vec![0.0; 3],
            "ran while capturing"
        );
        assert_eq!(dev.download(&counter.counter).unwrap(), vec![0]);
        for n in 1..=3 {
            graph.launch().unwrap();
            assert_eq!(dev.download(&counter.counter).unwrap(), vec![n]);
        }
        assert_eq!(dev.download(&dst).unwrap(), vec![1.0, 2.0, 3.0]);
        let ops = graph.ops();
        assert_eq!((ops.launches, ops.copies, ops.total()), (1, 1, 2));
    }
}

#[test]
fn allocations_uploads_downloads_and_syncs_are_errors_inside_a_capture() {
    for dev in devices() {
        let mut buf = dev.upload(&[1.0f32; 4]).unwrap();
        assert!(is_capture_error(
            dev.capture(|| dev.upload(&[1.0f32]).map(|_| ()))
        ));
        assert!(is_capture_error(
            dev.capture(|| dev.write(&mut buf, &[2.0; 4]))
        ));
        assert!(is_capture_error(
            dev.capture(|| dev.download(&buf).map(|_| ()))
        ));
        assert!(is_capture_error(
            dev.capture(|| dev.alloc::<f32>(8).map(|_| ()))
        ));
        assert!(is_capture_error(dev.capture(|| dev.synchronize())));
        assert!(is_capture_error(
            dev.capture(|| dev.capture(|| Ok(())).map(|_| ()))
        ));
        let inner = dev.capture(|| Ok(())).unwrap();
        assert!(is_capture_error(dev.capture(|| inner.launch())));
        // Each failed capture was ended: the device works, and captures again.
        assert!(!dev.is_capturing());
        assert_eq!(dev.download(&buf).unwrap(), vec![1.0; 4]);
        dev.capture(|| dev.zero(&mut buf))
            .unwrap()
            .launch()
            .unwrap();
        assert_eq!(dev.download(&buf).unwrap(), vec![0.0; 4]);
    }
}

/// A capture is the capturing thread's: another thread's calls meanwhile are neither refused
/// nor recorded.
#[test]
fn other_threads_are_not_captured() {
    let dev = Device::sim();
    let mut buf = dev.upload(&[1.0f32; 4]).unwrap();
    let graph = dev
        .capture(|| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    assert!(!dev.is_capturing());
                    let mut other = dev.upload(&[3.0f32; 4]).unwrap();
                    dev.zero(&mut other).unwrap();
                    assert_eq!(dev.download(&other).unwrap(), vec![0.0; 4]);
                });
            });
            assert!(dev.is_capturing());
            dev.zero(&mut buf)
        })
        .unwrap();
    assert_eq!(graph.ops().total(), 1);
    assert_eq!(dev.download(&buf).unwrap(), vec![1.0; 4]);
    graph.launch().unwrap();
    assert_eq!(dev.download(&buf).unwrap(), vec![0.0; 4]);
}

/// `copy_range` moves exactly its elements, directly and from a graph (the engine assembles
/// each geometry's position table from per-grid buffers with it); a replay after the source
/// is freed is refused, as for whole copies.
#[test]
fn ranged_copies_move_their_elements_directly_and_in_graphs() {
    for dev in devices() {
        let src = dev
            .upload(&(0..10).map(|i| i as f32).collect::<Vec<_>>())
            .unwrap();
        let mut dst = dev.upload(&[-1.0f32; 12]).unwrap();
        dev.copy_range(&src, 3, &mut dst, 5, 4).unwrap();
        let mut want = vec![-1.0f32; 12];
        want[5..9].copy_from_slice(&[3.0, 4.0, 5.0, 6.0]);
        assert_eq!(dev.download(&dst).unwrap(), want);

        let mut captured = dev.upload(&[-1.0f32; 12]).unwrap();
        let graph = dev
            .capture(|| {
                dev.copy_range(&src, 0, &mut captured, 0, 2)?;
                dev.copy_range(&src, 8, &mut captured, 10, 2)
            })
            .unwrap();
        assert_eq!(dev.download(&captured).unwrap(), vec![-1.0; 12]);
        graph.launch().unwrap();
        let mut want = vec![-1.0f32; 12];
        want[..2].copy_from_slice(&[0.0, 1.0]);
        want[10..].copy_from_slice(&[8.0, 9.0]);
        assert_eq!(dev.download(&captured).unwrap(), want);
        assert_eq!(graph.ops().copies, 2);
        if dev.is_sim() {
            drop(src);
            let _other = dev.upload(&[2.0f32; 10]).unwrap();
            assert!(matches!(graph.launch(), Err(GpuError::Graph(_))));
        }
    }
}

#[test]
#[should_panic(expected = "copy of elements")]
fn a_ranged_copy_past_its_buffer_panics() {
    let dev = Device::sim();
    let src = dev.upload(&[0.0f32; 4]).unwrap();
    let mut dst = dev.alloc::<f32>(4).unwrap();
    let _ = dev.copy_range(&src, 2, &mut dst, 0, 3);
}

/// A buffer the captured work does not use may be dropped during a capture (a cache making
/// room, a scratch replaced): on a GPU its free is deferred to the end of the capture, since
/// freeing memory that is not the graph's own inside a capture would break it. The capture
/// succeeds, the graph replays, and the memory is freed afterwards (a second capture and the
/// device's free memory both still work).
#[test]
fn a_buffer_dropped_during_a_capture_does_not_break_it() {
    for dev in devices() {
        let src = dev.upload(&[1.0f32, 2.0, 3.0]).unwrap();
        let mut dst = dev.alloc::<f32>(3).unwrap();
        let unused = dev.upload(&[9.0f32; 1 << 16]).unwrap();
        let graph = dev
            .capture(|| {
                drop(unused);
                dev.copy(&src, &mut dst)
            })
            .unwrap();
        graph.launch().unwrap();
        assert_eq!(dev.download(&dst).unwrap(), vec![1.0, 2.0, 3.0]);
        let again = dev.upload(&[4.0f32; 1 << 16]).unwrap();
        let graph2 = dev.capture(|| dev.copy(&src, &mut dst)).unwrap();
        graph2.launch().unwrap();
        assert_eq!(dev.download(&again).unwrap(), vec![4.0; 1 << 16]);
    }
}

#[test]
fn the_simulator_rejects_a_replay_that_reads_a_freed_buffer() {
    let dev = Device::sim();
    let src = dev.upload(&[1.0f32; 16]).unwrap();
    let mut dst = dev.alloc::<f32>(16).unwrap();
    let graph = dev.capture(|| dev.copy(&src, &mut dst)).unwrap();
    graph.launch().unwrap();
    drop(src);
    // A new allocation may take the freed address: the replay must still see the difference.
    let _other = dev.upload(&[2.0f32; 16]).unwrap();
    let err = graph.launch().unwrap_err();
    assert!(
        matches!(&err, GpuError::Graph(m) if m.contains("freed")),
        "{err}"
    );
}

/// A captured AdamW step reads its step counter and bias corrections on the device: replayed
/// four times, it is bit-identical to four direct steps with host scalars.
#[test]
fn scheduled_adamw_replays_match_host_scalar_steps_bit_for_bit() {
    for dev in devices() {
        let mut d = Draw::new(31);
        let lens = [3 * 5 * 7, 3 * 4 * 4];
        let total: usize = lens.iter().sum();
        let batch =
            ImageBatch::new(&dev, &lens, &[8.0 / 255.0, 4.0 / 255.0], &[[1, 2], [3, 4]]).unwrap();
        let clean = dev.upload(&d.vec(total, 0.0, 1.0)).unwrap();
        let grad = dev.upload(&d.vec(total, -1.0, 1.0)).unwrap();
        let delta0 = d.vec(total, -3.0, 3.0);
        let (lr255, wd) = (0.5f32, 0.01f32);
        let run = |graphed: bool| -> Vec<f32> {
            let mut delta = dev.upload(&delta0).unwrap();
            let mut m = dev.alloc::<f32>(total).unwrap();
            let mut v = dev.alloc::<f32>(total).unwrap();
            if graphed {
                let mut schedule = AdamwSchedule::new(&dev, lr255, wd, 4).unwrap();
                let graph = dev
                    .capture(|| {
                        adamw_advance(&dev, &mut schedule)?;
                        adamw_step_scheduled_f32(
                            &dev, &batch, &mut delta, &mut m, &mut v, &clean, &grad, &schedule,
                        )
                    })
                    .unwrap();
                for _ in 0..4 {
                    graph.launch().unwrap();
                }
            } else {
                for t in 1..=4 {
                    let s = AdamwScalars::new(lr255, wd, t);
                    adamw_step_f32(&dev, &batch, &mut delta, &mut m, &mut v, &clean, &grad, s)
                        .unwrap();
                }
            }
            dev.download(&delta).unwrap()
        };
        let (direct, graphed) = (run(false), run(true));
        assert_ne!(direct, delta0);
        assert_eq!(
            graphed.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            direct.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{}",
            dev.name()
        );
    }
}

/// The pool's buffers used in a capture belong to the graph: releasing the pool's cache does
/// not free them, and nothing else is handed them while the graph lives.
#[test]
fn pool_buffers_of_a_graph_survive_a_release_and_are_not_handed_out() {
    let dev = Device::sim();
    let pool = BufferPool::new(&dev);
    let src = dev.upload(&[5.0f32; 100]).unwrap();
    let mut out = dev.alloc::<f32>(100).unwrap();
    // Nothing cached: a capture cannot allocate.
    pool.begin_capture().unwrap();
    let r = dev.capture(|| pool.take(100).map(|_| ()));
    assert!(is_capture_error(r.map(|_| ())));
    pool.end_capture(false).unwrap();
    // The direct run leaves what the capture needs in the pool.
    pool.keep_returns(true);
    drop(pool.take(100).unwrap());
    pool.keep_returns(false);
    pool.begin_capture().unwrap();
    let captured = dev.capture(|| {
        let mut tmp = pool.take(100)?;
        dev.copy(&src, &mut tmp)?;
        dev.copy(&tmp, &mut out)
    });
    let memory = pool.end_capture(captured.is_ok()).unwrap();
    assert_eq!(memory.bytes(), 4 * prm::gpu::pool::size_class(100));
    let mut graph = captured.unwrap();
    graph.keep_alive(memory);
    pool.release();
    let mut other = pool.take(100).unwrap(); // a fresh buffer, not the graph's
    dev.zero(&mut other).unwrap();
    graph.launch().unwrap();
    assert_eq!(dev.download(&out).unwrap(), vec![5.0; 100]);
    assert_eq!(dev.download(&other).unwrap(), vec![0.0; 100]);
}

/// A mixed-size batch: sides not multiples of the patch.
fn images(d: &mut Draw) -> Vec<(Vec<f32>, usize, usize)> {
    [(37usize, 50usize), (32, 32), (45, 29)]
        .iter()
        .map(|&(h, w)| (d.vec(3 * h * w, 0.02, 0.98), h, w))
        .collect()
}

fn delta(after: GraphStats, before: GraphStats) -> (usize, usize, usize) {
    (
        after.captures - before.captures,
        after.replays - before.replays,
        after.failures - before.failures,
    )
}

/// Runs one attack of `settings` with graphs on or off; returns the outcomes and what the
/// engine did with graphs. `release_from` empties the engine's caches after every step from
/// that one on.
fn attack(
    gpu: &GpuVit,
    settings: &AttackSettings,
    loss: LossKind,
    clean: &[(Vec<f32>, usize, usize)],
    graphs: bool,
    release_from: Option<usize>,
) -> (Vec<AttackOutcome>, (usize, usize, usize)) {
    let model = gpu.model();
    let layers = LayerSelection::All
        .resolve(model.config.feature_layers())
        .unwrap();
    let obj = Objective::new(loss, layers, TokenSelection::All, model).unwrap();
    let targets = clean
        .iter()
        .enumerate()
        .map(|(i, (x, h, w))| {
            let planar = Planar {
                data: x,
                height: *h,
                width: *w,
            };
            (planar, ImageRng::new(9, &format!("img{i}")))
        })
        .collect();
    gpu.set_graphs(graphs);
    let before = gpu.graph_stats();
    let mut a = Attack::new(gpu, &obj, settings, targets).unwrap();
    a.record_losses(true);
    let starts = (0..a.len()).map(|i| a.start(i, None)).collect();
    let out = a
        .run(starts, |step| {
            if release_from.is_some_and(|from| step >= from) {
                gpu.release_cached_memory();
            }
        })
        .unwrap();
    (out, delta(gpu.graph_stats(), before))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_identical(on: &[AttackOutcome], off: &[AttackOutcome], what: &str) {
    for (i, (a, b)) in on.iter().zip(off).enumerate() {
        assert_eq!(
            bits(&a.adversarial),
            bits(&b.adversarial),
            "{what}: image {i} differs with graphs on"
        );
        assert_eq!(
            a.loss_initial.to_bits(),
            b.loss_initial.to_bits(),
            "{what}: image {i} initial loss"
        );
        assert_eq!(
            a.losses.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.losses.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{what}: image {i} loss curve"
        );
    }
}

#[test]
fn attacks_with_graphs_are_bit_identical_to_direct_steps() {
    use Init::{Random, Zero};
    use OptimizerKind::{Adamw, Mifgsm, Pgd};
    use Resolution::Native;
    let model = Model::load("random:tiny").unwrap();
    let clean = images(&mut Draw::new(41));
    for dev in devices() {
        let gpu = GpuVit::new(&dev, &model).unwrap();
        // (optimizer, init, resolution, dynamic scale, loss, expected captures, replays)
        // Three steps: warm-up, capture, one replay (four with the escape step first).
        let cases = [
            (Pgd, Random, Native, None, LossKind::Prm, 3, (1, 1)),
            (Mifgsm, Random, Native, None, LossKind::Dr, 3, (1, 1)),
            (Adamw, Zero, Native, None, LossKind::Prm, 4, (1, 1)),
            (
                Pgd,
                Zero,
                Resolution::Fixed(40),
                None,
                LossKind::Nrd,
                4,
                (1, 1),
            ),
            // Dynamic scale and the host-side embed loss run directly.
            (
                Adamw,
                Random,
                Native,
                Some((0.6, 0.9)),
                LossKind::Prm,
                3,
                (0, 0),
            ),
            (Pgd, Random, Native, None, LossKind::Embed, 3, (0, 0)),
        ];
        for (optimizer, init, resolution, dynamic_scale, loss, steps, graphs) in cases {
            let settings = AttackSettings {
                optimizer,
                loss,
                steps,
                dynamic_scale,
                init: init.clone(),
                resolution,
                step_size: 1.0 / 255.0,
                lr: 2.0 / 255.0,
                ..Preset::Pgd.settings()
            };
            let what = format!(
                "{} {optimizer:?} {init:?} {resolution:?} {dynamic_scale:?} {loss:?}",
                dev.name()
            );
            let (off, off_stats) = attack(&gpu, &settings, loss, &clean, false, None);
            let (on, on_stats) = attack(&gpu, &settings, loss, &clean, true, None);
            assert_eq!(off_stats, (0, 0, 0), "{what}: graphs off");
            assert_eq!(on_stats, (graphs.0, graphs.1, 0), "{what}: graphs on");
            assert_identical(&on, &off, &what);
        }
    }
}

/// Emptying the engine's caches between steps (as the campaign does after an out-of-memory
/// error) frees nothing a live graph uses: replays go on, bit-identical. Emptied between the
/// warm-up and the capture, the capture finds nothing cached and the steps run directly.
#[test]
fn replays_survive_releasing_the_engines_cached_memory() {
    let model = Model::load("random:tiny").unwrap();
    let clean = images(&mut Draw::new(42))[..2].to_vec();
    let dev = Device::sim();
    let gpu = GpuVit::new(&dev, &model).unwrap();
    let settings = AttackSettings {
        optimizer: OptimizerKind::Adamw,
        steps: 3,
        dynamic_scale: None,
        init: Init::Random,
        resolution: Resolution::Fixed(40),
        lr: 2.0 / 255.0,
        ..Preset::Pgd.settings()
    };
    let (off, _) = attack(&gpu, &settings, LossKind::Prm, &clean, false, Some(0));
    // Released after the capture (step 1): step 2 replays.
    let (on, stats) = attack(&gpu, &settings, LossKind::Prm, &clean, true, Some(1));
    assert_eq!(stats, (1, 1, 0));
    assert_identical(&on, &off, "release after the capture");
    // Released after every step: both capture tries find the cache empty.
    let (on, stats) = attack(&gpu, &settings, LossKind::Prm, &clean, true, Some(0));
    assert_eq!(stats, (0, 0, 2));
    assert_identical(&on, &off, "release before the capture");
}

/// The step before a capture keeps every buffer the capture needs even when the pool caches
/// nothing between uses (a batch whose activations exceed the pool's bound).
#[test]
fn captures_do_not_depend_on_the_pools_cache_bound() {
    let model = Model::load("random:tiny").unwrap();
    let clean = images(&mut Draw::new(44))[..2].to_vec();
    let dev = Device::sim();
    let gpu = GpuVit::new(&dev, &model).unwrap();
    gpu.set_pool_cache_limit(0);
    let settings = AttackSettings {
        optimizer: OptimizerKind::Mifgsm,
        steps: 3,
        dynamic_scale: None,
        init: Init::Random,
        resolution: Resolution::Native,
        ..Preset::Pgd.settings()
    };
    let (off, _) = attack(&gpu, &settings, LossKind::Prm, &clean, false, None);
    let (on, stats) = attack(&gpu, &settings, LossKind::Prm, &clean, true, None);
    assert_eq!(stats, (1, 1, 0));
    assert_identical(&on, &off, "no pool cache");
}

/// bf16 products: the bf16 operand scratch is tied to the graph that uses it.
#[test]
fn bf16_attacks_with_graphs_are_bit_identical_to_direct_steps() {
    let model = Model::load("random:tiny").unwrap();
    let clean = images(&mut Draw::new(43))[..2].to_vec();
    let dev = Device::sim();
    let gpu = GpuVit::new_with_precision(&dev, &model, Precision::Bf16).unwrap();
    let settings = AttackSettings {
        optimizer: OptimizerKind::Pgd,
        steps: 3,
        dynamic_scale: None,
        init: Init::Random,
        resolution: Resolution::Native,
        ..Preset::Pgd.settings()
    };
    let (off, _) = attack(&gpu, &settings, LossKind::Prm, &clean, false, None);
    // Released after the capture: the graph holds the bf16 scratch it was captured with.
    let (on, stats) = attack(&gpu, &settings, LossKind::Prm, &clean, true, Some(1));
    assert_eq!(stats, (1, 1, 0));
    assert_identical(&on, &off, "bf16");
}

/// `prm bench --graphs on|off` reports what the engine did (the next GPU session measures the
/// two side by side with it).
#[test]
fn bench_reports_graphs_on_and_off() {
    for (flag, captures, replays) in [("on", 1, 1), ("off", 0, 0)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_prm"))
            .args([
                "bench",
                "--device",
                "sim",
                "--model",
                "random:tiny",
                "--image-size",
                "32",
                "--batch-size",
                "1",
                "--steps",
                "3",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--no-ceiling",
                "--json",
                "--graphs",
                flag,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let g = &report["graphs"];
        assert_eq!(g["requested"], flag == "on", "{report}");
        assert_eq!(g["captures"], captures, "{report}");
        assert_eq!(g["replays"], replays, "{report}");
        assert_eq!(g["failures"], 0, "{report}");
    }
}
