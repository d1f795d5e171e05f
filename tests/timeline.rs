//! Device timelines (`Device::start_timeline`, `prm bench --timeline`): every operation that
//! runs directly on the stream is stamped, in order, with its kind, label and FLOPs; graph
//! replays are one operation and captured work is not stamped; in the simulator and on a GPU
//! when one is present.

use crate::common;

use common::devices;

use std::process::Command;

use prm::gpu::gemm::{matmul_f32, MatmulShape};
use prm::gpu::kernels::convert::to_bf16;
use prm::gpu::{Device, GpuError, OpKind};

#[test]
fn every_direct_operation_is_stamped_in_stream_order() {
    for dev in devices() {
        let (m, n, k) = (5, 7, 3);
        let a = dev.upload(&vec![0.5f32; m * k]).unwrap();
        let b = dev.upload(&vec![0.25f32; n * k]).unwrap();
        let mut c = dev.alloc::<f32>(m * n).unwrap();
        let mut half = dev.alloc::<half::bf16>(m * k).unwrap();
        let mut copy = dev.alloc::<f32>(m * k).unwrap();

        dev.start_timeline().unwrap();
        let shape = MatmulShape {
            m,
            n,
            k,
            b_transposed: true,
        };
        matmul_f32(&dev, shape, &a, &b, None, &mut c, false).unwrap();
        to_bf16(&dev, &a, &mut half, m * k).unwrap();
        dev.copy(&a, &mut copy).unwrap();
        dev.zero(&mut copy).unwrap();
        dev.write(&mut copy, &vec![1.0; m * k]).unwrap();
        let out = dev.download(&c).unwrap();
        let t = dev.finish_timeline().unwrap();

        assert!(out.iter().all(|&v| (v - 0.375).abs() < 1e-6), "{out:?}");
        let kinds: Vec<OpKind> = t.ops.iter().map(|o| o.kind).collect();
        assert_eq!(
            kinds,
            [
                OpKind::Product,
                OpKind::Kernel,
                OpKind::Copy,
                OpKind::Fill,
                OpKind::Upload,
                OpKind::Download
            ],
            "{:?}",
            t.ops
        );
        assert_eq!(t.ops[0].label, "product f32 5×7×3 (Wᵀ)");
        assert_eq!(t.ops[0].flops, 2.0 * (m * n * k) as f64);
        assert_eq!(t.ops[1].label, "prm_convert_to_bf16_f32");
        assert_eq!(t.ops[2].label, "device copy (≤64 B)");
        assert_eq!(t.ops[0].gap_before_us, 0.0);
        for o in &t.ops {
            assert!(o.duration_us >= 0.0 && o.gap_before_us >= 0.0, "{o:?}");
        }
        assert!((t.span_us() - t.busy_us() - t.idle_us()).abs() < 1e-9);
        assert_eq!(t.dropped, 0);
        let totals = t.totals();
        assert_eq!(totals.iter().map(|r| r.calls).sum::<usize>(), 6);
    }
}

#[test]
fn a_graph_replay_is_one_operation_and_its_capture_is_not_stamped() {
    for dev in devices() {
        let src = dev.upload(&[1.0f32, 2.0]).unwrap();
        let mut dst = dev.alloc::<f32>(2).unwrap();
        let mut half = dev.alloc::<half::bf16>(2).unwrap();
        dev.start_timeline().unwrap();
        let graph = dev
            .capture(|| {
                dev.copy(&src, &mut dst)?;
                to_bf16(&dev, &src, &mut half, 2)
            })
            .unwrap();
        graph.launch().unwrap();
        graph.launch().unwrap();
        let t = dev.finish_timeline().unwrap();
        let labels: Vec<&str> = t.ops.iter().map(|o| o.label.as_str()).collect();
        assert_eq!(
            labels, ["graph replay (1 launches, 0 products, 1 copies, 0 fills)"; 2],
            "{:?}",
            t.ops
        );
        assert!(t.ops.iter().all(|o| o.kind == OpKind::Graph));
        assert_eq!(dev.download(&dst).unwrap(), vec![1.0, 2.0]);
    }
}

#[test]
fn a_timeline_starts_once_and_finishes_once() {
    let dev = Device::sim();
    assert!(matches!(dev.finish_timeline(), Err(GpuError::Timeline(_))));
    dev.start_timeline().unwrap();
    assert!(matches!(dev.start_timeline(), Err(GpuError::Timeline(_))));
    // Clones share the recording: work issued through one is on the other's timeline.
    let clone = dev.clone();
    let mut x = clone.alloc::<f32>(4).unwrap();
    clone.zero(&mut x).unwrap();
    assert_eq!(dev.finish_timeline().unwrap().ops.len(), 1);
    assert!(matches!(
        clone.finish_timeline(),
        Err(GpuError::Timeline(_))
    ));
    // Nothing is stamped once it finished.
    dev.zero(&mut x).unwrap();
    dev.start_timeline().unwrap();
    assert!(dev.finish_timeline().unwrap().ops.is_empty());
}

fn bench(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "--device",
        "sim",
        "--model",
        "random:tiny",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--no-ceiling",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_prm"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_timeline_sums_kernels_and_products_of_one_attack() {
    let direct = bench(&[
        "--image-size",
        "32",
        "--steps",
        "3",
        "--graphs",
        "off",
        "--timeline",
    ]);
    let t = &direct["timeline"];
    let ops = t["operations"].as_array().unwrap();
    let labels: Vec<&str> = ops.iter().map(|o| o["label"].as_str().unwrap()).collect();
    assert!(
        labels.iter().any(|l| l.starts_with("prm_attention")),
        "{labels:?}"
    );
    assert!(
        labels.iter().any(|l| l.starts_with("product f32")),
        "{labels:?}"
    );
    assert!(
        !labels.iter().any(|l| l.starts_with("graph replay")),
        "{labels:?}"
    );
    let busy = t["busy_ms"].as_f64().unwrap();
    let span = t["span_ms"].as_f64().unwrap();
    assert!(busy > 0.0 && span >= busy, "{t}");
    // The stamped attack's host clock covers its device span; the rest is host-only time.
    let wall = t["attack_wall_ms"].as_f64().unwrap();
    let outside = t["host_outside_span_ms"].as_f64().unwrap();
    assert!(wall >= span && outside >= 0.0, "{t}");
    assert!((wall - span - outside).abs() < 1e-6, "{t}");
    let shares: f64 = ops
        .iter()
        .map(|o| o["share_of_busy"].as_f64().unwrap())
        .sum();
    assert!(shares <= 1.0 + 1e-9, "{t}");
    for o in ops {
        assert_eq!(
            o["tflops"].is_null(),
            o["kind"] != "product",
            "only products have a FLOP rate: {o}"
        );
    }

    // With graphs on, the steps after the warm-up and the capture are replays.
    let graphs = bench(&[
        "--image-size",
        "32",
        "--steps",
        "3",
        "--graphs",
        "on",
        "--timeline",
        "--batch-invariant",
    ]);
    // (The simulator's products are batch-invariant with or without the flag.)
    assert_eq!(graphs["product_algorithms"], "batch-invariant");
    assert_eq!(direct["product_algorithms"], "batch-invariant");
    let ops = graphs["timeline"]["operations"].as_array().unwrap();
    let replays: u64 = ops
        .iter()
        .filter(|o| o["kind"] == "graph")
        .map(|o| o["calls"].as_u64().unwrap())
        .sum();
    assert_eq!(replays, 2, "{}", graphs["timeline"]);
}

#[test]
fn bench_timeline_writes_a_trace_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.json");
    let report = bench(&[
        "--image-size",
        "32",
        "--steps",
        "3",
        "--graphs",
        "off",
        "--timeline",
        path.to_str().unwrap(),
    ]);
    assert_eq!(report["timeline"]["trace_file"], path.to_str().unwrap());
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let ops = &events[1..];
    assert_eq!(
        ops.len() as u64,
        report["timeline"]["operations_recorded"].as_u64().unwrap()
    );
    // In stream order, none overlapping the next.
    for w in ops.windows(2) {
        let end = w[0]["ts"].as_f64().unwrap() + w[0]["dur"].as_f64().unwrap();
        assert!(w[1]["ts"].as_f64().unwrap() >= end - 1e-6, "{w:?}");
    }
    assert!(ops.iter().all(|e| e["ph"] == "X"));
    assert!(ops
        .iter()
        .any(|e| e["cat"] == "product" && e["args"]["flops"].as_f64().unwrap() > 0.0));
    // Nothing but the trace is left in the directory (written through a renamed temporary).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn bench_timeline_needs_a_gpu_engine() {
    let out = Command::new(env!("CARGO_BIN_EXE_prm"))
        .args([
            "bench",
            "--device",
            "cpu",
            "--model",
            "random:tiny",
            "--image-size",
            "32",
            "--timeline",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cuda or --device sim"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_prm"))
        .args(["bench", "--device", "sim", "--timeline", "trace.txt"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("give a FILE.json"), "{err}");
}

/// `prm attack --device-timeline`: the whole run's device operations, with the batch saved on
/// the device (quantisation kernel, bytes read back) and no float image downloaded unasked.
#[test]
fn attack_device_timeline_records_the_run_and_its_saving_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    for (i, (w, h)) in [(40u32, 36u32), (33, 47)].into_iter().enumerate() {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, i as u8])
        })
        .save(input.join(format!("{i}.png")))
        .unwrap();
    }
    // The largest download of a run, in bytes (the labels give sizes as power-of-two bounds).
    let largest_download = |extra: &[&str]| -> u64 {
        let trace_path = dir.path().join("run.json");
        let out = Command::new(env!("CARGO_BIN_EXE_prm"))
            .args([
                "attack",
                "--device",
                "sim",
                "--model",
                "random:tiny",
                "--preset",
                "pgd",
            ])
            .args(["--steps", "2", "--batch-size", "2", "--quiet", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(dir.path().join(format!("out{}", extra.len())))
            .arg("--device-timeline")
            .arg(&trace_path)
            .args(extra)
            .env("PRM_NO_GRAPHS", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(
            err.contains("the whole run, stamped on the device"),
            "{err}"
        );
        let trace: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&trace_path).unwrap()).unwrap();
        let ops = &trace["traceEvents"].as_array().unwrap()[1..];
        let quantized = ops
            .iter()
            .filter(|e| e["name"] == "prm_save_quantize_f32")
            .count();
        assert_eq!(quantized, 1, "one batch, saved on the device");
        ops.iter()
            .filter(|e| e["cat"] == "download")
            .map(|e| {
                let name = e["name"].as_str().unwrap();
                let bound = name.split('≤').nth(1).unwrap().trim_end_matches(')');
                let (n, unit) = bound.split_once(' ').unwrap();
                let scale = match unit {
                    "B" => 1,
                    "KiB" => 1 << 10,
                    "MiB" => 1 << 20,
                    _ => 1 << 30,
                };
                n.parse::<u64>().unwrap() * scale
            })
            .max()
            .unwrap()
    };
    // Read back image by image: levels of 4,320 and 4,653 bytes, float images of 17,280 and
    // 18,612.
    let without = largest_download(&[]);
    assert!(
        without <= 8 << 10,
        "float images read back unasked: {without}"
    );
    let with = largest_download(&["--save-float"]);
    assert!(with > 16 << 10, "--save-float reads them back: {with}");

    let out = Command::new(env!("CARGO_BIN_EXE_prm"))
        .args([
            "attack",
            "--device",
            "cpu",
            "--model",
            "random:tiny",
            "--input",
        ])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("cpu"))
        .arg("--device-timeline")
        .arg(dir.path().join("cpu.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cuda:N or --device sim"), "{err}");
}

/// Once an attack runs, its steps never wait for the host: no download from the start of the
/// attack to the last optimiser update (the loss at the start, measured before the loop or by
/// step 0, is read back with the results; dynamic scale's clean forward at each step's scale
/// reads nothing back unless the `embed` loss needs its CLS rows). With graphs on, nothing is
/// read back before the last replay either, so the host records and instantiates step 1's graph
/// while the device runs step 0.
#[test]
fn attack_steps_read_nothing_back() {
    for (preset, graphs) in [("pgd", "off"), ("paper", "off"), ("pgd", "on")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        bench(&[
            "--preset",
            preset,
            "--steps",
            "5",
            "--batch-size",
            "2",
            "--image-size",
            "40x32",
            "--graphs",
            graphs,
            "--timeline",
            path.to_str().unwrap(),
        ]);
        let trace: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let events = &trace["traceEvents"].as_array().unwrap()[1..];
        let names: Vec<&str> = events.iter().map(|e| e["name"].as_str().unwrap()).collect();
        // The kernel that writes the step's new images (pgd; AdamW), or a replayed step.
        let step_ends: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                let name = e["name"].as_str().unwrap();
                name == "prm_update_pgd_f32"
                    || name == "prm_update_adamw_image_f32"
                    || e["cat"] == "graph"
            })
            .map(|(i, _)| i)
            .collect();
        if graphs == "off" {
            assert_eq!(step_ends.len(), 5, "{preset}: one update per step");
        } else {
            // Step 0 runs directly, step 1 is captured and launched, steps 2 to 4 replay.
            let replays = events.iter().filter(|e| e["cat"] == "graph").count();
            assert_eq!(replays, 4, "{preset}: {names:?}");
        }
        let last = *step_ends.last().unwrap();
        let downloads: Vec<&str> = events[..last]
            .iter()
            .filter(|e| e["cat"] == "download")
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert!(
            downloads.is_empty(),
            "{preset}, graphs {graphs}: read back before the last step: {downloads:?}"
        );
        assert!(
            events[last..].iter().any(|e| e["cat"] == "download"),
            "{preset}, graphs {graphs}: the results are read back after the steps"
        );
    }
}

/// The `embed` loss is computed on the host, so each of its steps reads the batch's CLS rows
/// back and sends their gradient up: one download of a row per image (gathered on the device),
/// and an upload of a row per image, not a table of every token that is zero but for them.
#[test]
fn embed_steps_move_one_row_per_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.json");
    bench(&[
        "--loss",
        "embed",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--image-size",
        "64x48",
        "--graphs",
        "off",
        "--timeline",
        path.to_str().unwrap(),
    ]);
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let events = &trace["traceEvents"].as_array().unwrap()[1..];
    let updates: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["name"] == "prm_update_pgd_f32")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(updates.len(), 4);
    // Two images of 13 tokens, width 128: a row each is 1 KiB, every token 13 KiB.
    let bytes = |label: &str| -> usize {
        let size = label.split('≤').nth(1).unwrap().trim_end_matches(')');
        let (n, unit) = size.split_once(' ').unwrap();
        let n: usize = n.parse().unwrap();
        n * match unit {
            "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            other => panic!("{other}"),
        }
    };
    for step in updates.windows(2) {
        let between = &events[step[0]..step[1]];
        let of = |cat: &str| -> Vec<&str> {
            between
                .iter()
                .filter(|e| e["cat"] == cat)
                .map(|e| e["name"].as_str().unwrap())
                .collect()
        };
        let (downloads, uploads) = (of("download"), of("upload"));
        assert_eq!(downloads.len(), 1, "one read-back a step: {downloads:?}");
        assert!(bytes(downloads[0]) <= 1024, "{downloads:?}");
        assert!(!uploads.is_empty());
        assert!(
            uploads.iter().all(|u| bytes(u) <= 1024),
            "the gradient goes up as rows: {uploads:?}"
        );
    }
}
