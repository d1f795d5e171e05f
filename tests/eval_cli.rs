//! End-to-end tests of `prm eval` on `random:tiny` (bundled tokenizer, random text tower) with
//! generated images, classes, labels and probes: every target, the report fields, prediction
//! PNGs, cpu vs sim, and the exit codes for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn prm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prm"))
        .args(args)
        .output()
        .expect("prm runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_image(path: &Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = |k: u32| {
            (((x * (3 + k + seed) + y * (5 + 2 * k) + seed * 17) % 251) as u8)
                .wrapping_add((k * 40) as u8)
        };
        image::Rgb([v(0), v(1), v(2)])
    });
    img.save(path).unwrap();
}

/// Clean images (two sizes, one in a sub-directory), attacked with a short PGD run.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let clean = t.path().join("clean");
    let adv = t.path().join("adv");
    write_image(&clean.join("a.png"), 70, 50, 1);
    write_image(&clean.join("sub/b.jpg"), 48, 81, 2);
    attack_tiny(&clean, &adv, 2);
    (t, clean, adv)
}

/// A short PGD attack of `clean` into `adv` with the tiny random model on the CPU.
fn attack_tiny(clean: &Path, adv: &Path, steps: usize) {
    attack_tiny_with(clean, adv, steps, &[]);
}

/// [`attack_tiny`] with more flags.
fn attack_tiny_with(clean: &Path, adv: &Path, steps: usize, extra: &[&str]) {
    let steps = steps.to_string();
    let mut args = vec![
        "attack",
        "--model",
        "random:tiny",
        "--input",
        s(clean),
        "--output",
        s(adv),
        "--preset",
        "pgd",
        "--steps",
        &steps,
        "--device",
        "cpu",
        "-q",
    ];
    args.extend_from_slice(extra);
    let o = prm(&args);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn eval(args: &[&str]) -> Output {
    let mut a = vec!["eval", "--model", "random:tiny", "-q"];
    a.extend_from_slice(args);
    prm(&a)
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn maskclip_end_to_end_with_labels_predictions_and_report() {
    let (t, clean, adv) = setup();
    let names = t.path().join("classes.txt");
    std::fs::write(&names, "cat\ndog\n\nrocket\nsky\n").unwrap();
    // Ground truth: class index per pixel with an ignored band; class 3 never appears.
    for (rel, w, h) in [("a.png", 70u32, 50u32), ("sub/b.png", 48, 81)] {
        let p = t.path().join("labels").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let img = image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([if y < 3 {
                255
            } else {
                ((x / 16 + y / 16) % 3) as u8
            }])
        });
        img.save(&p).unwrap();
    }
    let report = t.path().join("out/report.json");
    let pred = t.path().join("pred");
    let o = eval(&[
        "--target",
        "maskclip",
        "--clean",
        s(&clean),
        "--adv",
        s(&adv),
        "--classes",
        s(&names),
        "--labels",
        s(&t.path().join("labels")),
        "--report",
        s(&report),
        "--save-predictions",
        s(&pred),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_json(&report);
    assert_eq!(r["target"], "maskclip");
    assert_eq!(r["images"], 2);
    assert_eq!(r["weights_random"], true);
    for k in [
        "miou_adv_vs_clean",
        "pixel_agreement",
        "miou_clean",
        "miou_adv",
        "pixel_acc_clean",
        "pixel_acc_adv",
    ] {
        let v = r[k].as_f64().unwrap_or_else(|| panic!("{k} missing"));
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert_eq!(r["per_class"].as_array().unwrap().len(), 4);
    let imgs = r["per_image"].as_array().unwrap();
    assert_eq!(imgs.len(), 2);
    assert_eq!(imgs[1]["image"], "sub/b.jpg");
    assert!(imgs[1]["miou_adv_vs_clean"].is_number());
    let md = std::fs::read_to_string(report.with_extension("md")).unwrap();
    assert!(md.contains("mIoU adv vs clean") && md.contains("random weights"));
    // Predictions: 8-bit grayscale at native size, class indices < 4.
    for sub in ["clean", "adv"] {
        let p = image::open(pred.join(sub).join("sub/b.png")).unwrap();
        assert_eq!((p.width(), p.height()), (48, 81));
        let g = p.as_luma8().expect("8-bit grayscale");
        assert!(g.pixels().all(|v| v.0[0] < 4));
    }
    // The simulator runs the same targets on the kernels: same numbers.
    let report_sim = t.path().join("sim.json");
    let o = eval(&[
        "--target",
        "maskclip",
        "--clean",
        s(&clean),
        "--adv",
        s(&adv),
        "--classes",
        s(&names),
        "--report",
        s(&report_sim),
        "--device",
        "sim",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rs = read_json(&report_sim);
    let (a, b) = (
        r["miou_adv_vs_clean"].as_f64().unwrap(),
        rs["miou_adv_vs_clean"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-3, "cpu {a} vs sim {b}");
    assert_eq!(rs["device"], "sim");
}

#[test]
fn other_targets_run_and_report() {
    let (t, clean, adv) = setup();
    let names = t.path().join("classes.txt");
    std::fs::write(&names, "cat\ndog\nrocket\n").unwrap();
    for target in ["sclip", "clearclip"] {
        let rep = t.path().join(format!("{target}.json"));
        let o = eval(&[
            "--target",
            target,
            "--clean",
            s(&clean),
            "--adv",
            s(&adv),
            "--classes",
            s(&names),
            "--report",
            s(&rep),
            "--resolution",
            "64",
            "--single-template",
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "{target}: {}", stderr(&o));
        assert_eq!(read_json(&rep)["resolution"], 64);
    }
    // zeroshot with a label list (by name and by index)
    let labels = t.path().join("labels.txt");
    std::fs::write(&labels, "a.png\tcat\nsub/b.jpg, 2\n").unwrap();
    let rep = t.path().join("zs.json");
    let o = eval(&[
        "--target",
        "zeroshot",
        "--clean",
        s(&clean),
        "--adv",
        s(&adv),
        "--classes",
        s(&names),
        "--labels",
        s(&labels),
        "--report",
        s(&rep),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_json(&rep);
    assert!(r["top1_agreement"].is_number());
    assert!(r["top1_clean"].is_number() && r["top1_adv"].is_number());
    assert_eq!(r["labelled_images"], 2);
    // The report names the text tower that embedded the class names.
    let tower = prm::model::load_text_tower("random:tiny")
        .unwrap()
        .unwrap()
        .fingerprint();
    assert_eq!(r["text_weights"], tower.as_str());
    assert!(
        r["class_source"].as_str().unwrap().contains(&tower),
        "{}",
        r["class_source"]
    );
    assert_ne!(r["text_weights"], r["weights"]);
    // features: one entry per F_0..F_L
    let rep = t.path().join("f.json");
    let o = eval(&[
        "--target",
        "features",
        "--clean",
        s(&clean),
        "--adv",
        s(&adv),
        "--report",
        s(&rep),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let layers = read_json(&rep)["layers"].as_array().unwrap().clone();
    assert_eq!(layers.len(), 3);
    assert!(layers
        .iter()
        .all(|l| l["cosine"].as_f64().unwrap() <= 1.0 + 1e-9));
    // probe: a 1×1 head on F_1 as safetensors [K, D, 1, 1]
    let probe = t.path().join("probe.safetensors");
    let (k, d) = (3usize, 128usize);
    let w: Vec<u8> = (0..k * d)
        .flat_map(|i| (((i * 37) % 101) as f32 / 101.0 - 0.5).to_le_bytes())
        .collect();
    let b: Vec<u8> = [0.1f32, -0.2, 0.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let tensors = vec![
        (
            "weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![k, d, 1, 1], &w)
                .unwrap(),
        ),
        (
            "bias",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![k], &b).unwrap(),
        ),
    ];
    let meta = std::collections::HashMap::from([
        ("layer".to_string(), "1".to_string()),
        ("names".to_string(), "x,y,z".to_string()),
    ]);
    safetensors::serialize_to_file(tensors, Some(meta), &probe).unwrap();
    let rep = t.path().join("p.json");
    let pred = t.path().join("ppred");
    let o = eval(&[
        "--target",
        "probe",
        "--probe",
        s(&probe),
        "--clean",
        s(&clean),
        "--adv",
        s(&adv),
        "--report",
        s(&rep),
        "--save-predictions",
        s(&pred),
        "--device",
        "sim",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_json(&rep);
    assert_eq!(r["classes"], serde_json::json!(["x", "y", "z"]));
    assert!(pred.join("adv/a.png").is_file());
}

#[test]
fn bad_input_exit_codes() {
    let (t, clean, adv) = setup();
    let names = t.path().join("classes.txt");
    std::fs::write(&names, "cat\ndog\n").unwrap();
    let base = |extra: &[&str]| {
        let mut a = vec!["--clean", s(&clean), "--adv", s(&adv)];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| eval(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // no --classes for a target that needs them
    let o = run(base(&["--target", "maskclip"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--classes"));
    // unknown target
    let o = run(base(&["--target", "segformer"]));
    assert_eq!(o.status.code(), Some(2));
    // a report whose summary (FILE.md) would replace a file that is not a prm summary
    let licence = t.path().join("LICENSE.md");
    std::fs::write(&licence, "MIT\n").unwrap();
    let report = t.path().join("LICENSE.json");
    let o = run(base(&["--target", "features", "--report", s(&report)]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("holds another file"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&licence).unwrap(), "MIT\n");
    // a working size below a patch, or beyond the pixel budget (was an aborted process)
    for (n, needle) in [("8", "patch"), ("20000", "--max-pixels")] {
        let o = run(base(&["--target", "features", "--resolution", n]));
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    }
    // class-embedding file whose names do not match its rows
    let bad = t.path().join("bad.safetensors");
    let e: Vec<u8> = vec![0u8; 3 * 64 * 4];
    safetensors::serialize_to_file(
        vec![(
            "class_embeddings",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3, 64], &e).unwrap(),
        )],
        Some(std::collections::HashMap::from([(
            "names".to_string(),
            "a,b".to_string(),
        )])),
        &bad,
    )
    .unwrap();
    let o = run(base(&["--target", "maskclip", "--classes", s(&bad)]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("names"), "{}", stderr(&o));
    // wrong embedding dimension
    let e: Vec<u8> = [1.0f32; 2 * 16]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let wrong = t.path().join("wrong.safetensors");
    safetensors::serialize_to_file(
        vec![(
            "class_embeddings",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 16], &e).unwrap(),
        )],
        Some(std::collections::HashMap::from([(
            "names".to_string(),
            "a,b".to_string(),
        )])),
        &wrong,
    )
    .unwrap();
    let o = run(base(&["--target", "maskclip", "--classes", s(&wrong)]));
    assert_eq!(o.status.code(), Some(2));
    // --precision bf16 on the CPU engine
    let o = run(base(&[
        "--target",
        "maskclip",
        "--classes",
        s(&names),
        "--device",
        "cpu",
        "--precision",
        "bf16",
    ]));
    assert_eq!(o.status.code(), Some(2));
    // A vision-only checkpoint with class names as text: a clear error, exit 2.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_tiny/model.safetensors");
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let keep: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n.starts_with("vision_model.") || n == "visual_projection.weight")
        .collect();
    let vdir = t.path().join("vision_only");
    std::fs::create_dir_all(&vdir).unwrap();
    safetensors::serialize_to_file(keep, None, &vdir.join("model.safetensors")).unwrap();
    let o = prm(&[
        "eval",
        "--model",
        s(&vdir),
        "--target",
        "maskclip",
        "--clean",
        s(&clean),
        "--adv",
        s(&adv),
        "--classes",
        s(&names),
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no text tower"), "{}", stderr(&o));
    // An adversarial image missing: recorded per image, exit 1, the other image evaluated.
    std::fs::remove_file(adv.join("a.png")).unwrap();
    let rep = t.path().join("r.json");
    let o = run(base(&[
        "--target",
        "maskclip",
        "--classes",
        s(&names),
        "--report",
        s(&rep),
        "--device",
        "cpu",
    ]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let r = read_json(&rep);
    assert_eq!(r["images"], 1);
    assert_eq!(r["failed"], 1);
    assert_eq!(r["per_image"][0]["status"], "error");
}

/// `prm eval --target maskclip` on the CPU with class names, ground-truth labels and a report.
fn eval_maskclip(
    names: &Path,
    clean: &Path,
    adv: &Path,
    labels: &Path,
    report: &Path,
    extra: &[&str],
) -> Output {
    let mut args = vec![
        "--target",
        "maskclip",
        "--classes",
        s(names),
        "--clean",
        s(clean),
        "--adv",
        s(adv),
        "--labels",
        s(labels),
        "--report",
        s(report),
    ];
    args.extend_from_slice(if extra.is_empty() {
        &["--device", "cpu"]
    } else {
        extra
    });
    eval(&args)
}

/// 22 clean images of six sizes in three directories with their adversarial images and label
/// maps; three fail: a missing adversarial image and a label map of the wrong size when read,
/// an image smaller than a patch in the engine. Returns (clean, adv, labels, class names, the
/// images' relative paths in input order).
fn mixed_images(t: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf, Vec<String>) {
    let (clean, adv, labels) = (t.join("clean"), t.join("adv"), t.join("labels"));
    let sizes = [(70, 50), (48, 81), (33, 17), (100, 64), (16, 16), (91, 40)];
    let rels: Vec<String> = (0..21)
        .map(|i| {
            format!(
                "d{}/img{i:02}.{}",
                i % 3,
                if i % 2 == 0 { "png" } else { "jpg" }
            )
        })
        .collect();
    for (i, rel) in rels.iter().enumerate() {
        let (w, h) = sizes[i % sizes.len()];
        write_image(&clean.join(rel), w, h, i as u32);
    }
    attack_tiny(&clean, &adv, 1);
    // An image smaller than a patch, paired with itself: the engine refuses it.
    let small = "d1/small.png";
    write_image(&clean.join(small), 10, 12, 99);
    std::fs::create_dir_all(adv.join("d1")).unwrap();
    std::fs::copy(clean.join(small), adv.join(small)).unwrap();
    std::fs::remove_file(adv.join("d2/img05.png")).unwrap();
    for (i, rel) in rels.iter().chain([&small.to_string()]).enumerate() {
        let im = image::open(clean.join(rel)).unwrap();
        let (mut w, h) = (im.width() as usize, im.height() as usize);
        if i == 7 {
            w += 1; // the wrong size
        }
        let map: Vec<u16> = (0..w * h).map(|k| ((k * 7 + i) % 4) as u16).collect();
        let p = labels.join(rel).with_extension("png");
        prm::eval::labels::write_label_png(&p, w, h, &map).unwrap();
    }
    let names = t.join("classes.txt");
    std::fs::write(&names, "sky\ntree\nroad\nwall\n").unwrap();
    let mut order = rels;
    order.push(small.to_string());
    order.sort();
    (clean, adv, labels, names, order)
}

const MIXED_FAILURES: [&str; 3] = ["d1/img07.jpg", "d1/small.png", "d2/img05.jpg"];

fn failed_images(report: &Value) -> Vec<&str> {
    report["per_image"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "error")
        .map(|r| r["image"].as_str().unwrap())
        .collect()
}

/// `prm eval` reads, runs the model and finishes images on three threads at once; each image's
/// record must be the one a run over that image alone gives, in input order, failures included
/// (a missing adversarial image and a label map of the wrong size fail when read, an image
/// smaller than a patch in the engine).
#[test]
fn every_record_is_the_record_of_a_run_over_that_image_alone() {
    let t = tempfile::tempdir().unwrap();
    let (clean, adv, labels, names, want_order) = mixed_images(t.path());
    let run =
        |clean: &Path, report: &Path| eval_maskclip(&names, clean, &adv, &labels, report, &[]);
    let all = t.path().join("all.json");
    let o = run(&clean, &all);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let all = read_json(&all);
    let records = all["per_image"].as_array().unwrap();
    let order: Vec<&str> = records
        .iter()
        .map(|r| r["image"].as_str().unwrap())
        .collect();
    assert_eq!(order, want_order);
    assert_eq!(all["failed"], 3);
    for (k, rel) in want_order.iter().enumerate() {
        let alone = t.path().join(format!("alone{k}"));
        std::fs::create_dir_all(alone.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(clean.join(rel), alone.join(rel)).unwrap();
        let report = t.path().join(format!("alone{k}.json"));
        run(&alone, &report);
        let one = read_json(&report);
        assert_eq!(records[k], one["per_image"][0], "{rel}");
    }
    assert_eq!(failed_images(&all), MIXED_FAILURES);
}

/// On the simulator the device runs the images of `--batch-size` pairs as one batch (mixed sizes
/// packed into one forward); every record and metric must be the one batch 1 gives, with the
/// failing images failing alone (the one smaller than a patch never reaches the batch). So
/// must they on three simulated devices, each engine taking batches from one queue.
#[test]
fn records_do_not_depend_on_the_batch_size_nor_the_devices() {
    let t = tempfile::tempdir().unwrap();
    let (clean, adv, labels, names, want_order) = mixed_images(t.path());
    let report = |target: &str, batch: &str, device: &str| {
        let path = t.path().join(format!("{target}-{batch}-{device}.json"));
        let o = if target == "maskclip" {
            let extra = ["--device", device, "--batch-size", batch];
            eval_maskclip(&names, &clean, &adv, &labels, &path, &extra)
        } else {
            eval(&[
                "--target",
                target,
                "--clean",
                s(&clean),
                "--adv",
                s(&adv),
                "--report",
                s(&path),
                "--device",
                device,
                "--batch-size",
                batch,
            ])
        };
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let mut r = read_json(&path);
        assert_eq!(r["batch_size"], batch.parse::<u64>().unwrap());
        assert_eq!(r["product_algorithms"], "batch-invariant");
        assert_eq!(r["device"], device);
        r.as_object_mut().unwrap().remove("batch_size");
        r.as_object_mut().unwrap().remove("device");
        r
    };
    for target in ["maskclip", "features"] {
        let one = report(target, "1", "sim");
        let order: Vec<&str> = one["per_image"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["image"].as_str().unwrap())
            .collect();
        assert_eq!(order, want_order);
        // The features target reads no labels, so the wrong-size label map fails nothing.
        let want_failed: Vec<&str> = MIXED_FAILURES
            .into_iter()
            .filter(|&f| target == "maskclip" || f != "d1/img07.jpg")
            .collect();
        assert_eq!(failed_images(&one), want_failed, "{target}");
        for (batch, device) in [("4", "sim"), ("64", "sim"), ("2", "sim:3")] {
            assert_eq!(
                report(target, batch, device),
                one,
                "{target}, batch {batch}, {device}"
            );
        }
    }
}

/// The GPU engine forms the cosine logits on its device; with `PRM_HOST_LOGITS=1` it brings the
/// embeddings back and the host forms them. The reports (every record, every metric) and the
/// prediction maps are the same bytes.
#[test]
fn logits_on_the_device_or_the_host_give_the_same_reports() {
    let t = tempfile::tempdir().unwrap();
    let (clean, adv, labels, names, _) = mixed_images(t.path());
    let run = |target: &str, host: bool| {
        let tag = format!("{target}-{}", if host { "host" } else { "device" });
        let report = t.path().join(format!("{tag}.json"));
        let predictions = t.path().join(format!("{tag}-pred"));
        let mut c = Command::new(env!("CARGO_BIN_EXE_prm"));
        c.args(["eval", "--model", "random:tiny", "--target", target])
            .args([
                "--classes",
                s(&names),
                "--clean",
                s(&clean),
                "--adv",
                s(&adv),
            ])
            .args([
                "--report",
                s(&report),
                "--device",
                "sim",
                "--batch-size",
                "4",
            ]);
        if target == "maskclip" {
            c.args([
                "--labels",
                s(&labels),
                "--save-predictions",
                s(&predictions),
            ]);
        }
        if host {
            c.env("PRM_HOST_LOGITS", "1");
        }
        let o = c.output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let said = if host { "on the host" } else { "on the device" };
        assert!(
            stderr(&o).contains(&format!("cosine logits formed {said}")),
            "{}",
            stderr(&o)
        );
        let maps: Vec<Vec<u8>> = ["clean/d0/img00.png", "adv/d2/img20.png"]
            .iter()
            .filter(|_| target == "maskclip")
            .map(|p| std::fs::read(predictions.join(p)).unwrap())
            .collect();
        (std::fs::read(&report).unwrap(), maps)
    };
    for target in ["maskclip", "zeroshot"] {
        assert!(
            run(target, false) == run(target, true),
            "{target}: the reports or prediction maps differ"
        );
    }
}

/// A batch the device cannot hold (the simulator given 24 MB, the bundled samples up to 512×512
/// at native size) is cut into smaller passes: every record is batch 1's, and stderr says what
/// happened and what to do.
#[test]
fn a_batch_the_device_cannot_hold_is_cut_into_smaller_passes() {
    let t = tempfile::tempdir().unwrap();
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples");
    let adv = t.path().join("adv");
    attack_tiny_with(&samples, &adv, 1, &["--resolution", "64"]);
    let run = |name: &str, memory: Option<&str>, batch: &str| {
        let report = t.path().join(name);
        let mut c = Command::new(env!("CARGO_BIN_EXE_prm"));
        c.args(["eval", "--model", "random:tiny", "--target", "features"])
            .args([
                "--clean",
                s(&samples),
                "--adv",
                s(&adv),
                "--report",
                s(&report),
            ])
            .args(["--device", "sim", "--batch-size", batch]);
        if let Some(m) = memory {
            c.env("PRM_SIM_MEMORY", m);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        (read_json(&report), stderr(&o))
    };
    let (small, note) = run("small.json", Some("24M"), "32");
    let (alone, alone_note) = run("alone.json", None, "1");
    let stderr_note = |e: &str| e.contains("cut down") || e.contains("run again");
    assert!(note.contains("passes were cut down to"), "{note}");
    assert!(note.contains("smaller --batch-size"), "{note}");
    assert_eq!(small["batches_rerun_alone"], 0, "{note}");
    assert!(!stderr_note(&alone_note), "{alone_note}");
    assert_eq!(small["images"], 5);
    assert_eq!(small["per_image"], alone["per_image"]);
    assert_eq!(small["layers"], alone["layers"]);
}

/// Tar-shard inputs: `prm eval --clean SHARD.tar` pairs each member with its output in either of
/// `prm attack`'s layouts (an output tar per shard, or a directory per shard), label maps come
/// from `LABELS/<shard>/<member stem>.png`, and the records are those of the same images
/// evaluated as plain files.
#[test]
fn tar_shard_inputs_pair_with_either_output_layout() {
    let t = tempfile::tempdir().unwrap();
    let files = t.path().join("files");
    let members = ["0001.png", "0002.jpg", "sub/0003.png"];
    for (i, m) in members.iter().enumerate() {
        write_image(
            &files.join(m),
            40 + 9 * i as u32,
            33 + 5 * i as u32,
            i as u32,
        );
    }
    let shard = t.path().join("shard.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&shard).unwrap());
    for m in members {
        b.append_path_with_name(files.join(m), m).unwrap();
    }
    b.into_inner().unwrap();
    let labels = t.path().join("labels");
    for (i, m) in members.iter().enumerate() {
        let im = image::open(files.join(m)).unwrap();
        let (w, h) = (im.width() as usize, im.height() as usize);
        let map: Vec<u16> = (0..w * h).map(|k| ((k / 7 + i) % 3) as u16).collect();
        let rel = std::path::Path::new(m).with_extension("png");
        for dir in [labels.join("shard"), labels.join("plain")] {
            prm::eval::labels::write_label_png(&dir.join(&rel), w, h, &map).unwrap();
        }
    }
    let names = t.path().join("classes.txt");
    std::fs::write(&names, "sky\ntree\nroad\n").unwrap();
    let eval_report = |clean: &Path, adv: &Path, labels: &Path, name: &str| {
        let report = t.path().join(name);
        let o = eval_maskclip(&names, clean, adv, labels, &report, &[]);
        (o.status.code(), read_json(&report))
    };
    let mut by_layout = Vec::new();
    for layout in ["tar", "tree"] {
        let adv = t.path().join(format!("adv-{layout}"));
        attack_tiny_with(&shard, &adv, 1, &["--output-layout", layout]);
        let (code, r) = eval_report(&shard, &adv, &labels, &format!("{layout}.json"));
        assert_eq!(code, Some(0), "{layout}: {r}");
        by_layout.push(r);
    }
    assert_eq!(by_layout[0]["per_image"], by_layout[1]["per_image"]);
    let images: Vec<&str> = by_layout[0]["per_image"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image"].as_str().unwrap())
        .collect();
    assert_eq!(images, members.map(|m| format!("shard.tar/{m}")));
    // The same images as files, against the tree layout's outputs.
    let (_, plain) = eval_report(
        &files,
        &t.path().join("adv-tree/shard"),
        &labels.join("plain"),
        "plain.json",
    );
    let values = |r: &Value| -> Vec<Value> {
        let mut v: Vec<Value> = r["per_image"].as_array().unwrap().clone();
        v.iter_mut().for_each(|x| {
            x.as_object_mut().unwrap().remove("image");
        });
        v
    };
    assert_eq!(values(&by_layout[0]), values(&plain));
    // A member without an output: a per-image error naming where it was looked for.
    std::fs::remove_file(t.path().join("adv-tree/shard/0002.png")).unwrap();
    let (code, r) = eval_report(&shard, &t.path().join("adv-tree"), &labels, "missing.json");
    assert_eq!(code, Some(1));
    let error = r["per_image"][1]["error"].as_str().unwrap();
    assert!(error.contains("member 0002.png"), "{error}");
}

/// Appends a member named `name` holding `data` to a tar.
fn add_member(b: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
}

/// `--labels member:EXT`: each image's label is the member `<key>.EXT` of its own sample in the
/// clean shard (WebDataset's `seg.png` maps and `cls` classes), wherever it lies in the tar, and
/// gives the records that the same labels as files give. Bad label members are per-image
/// errors; a source that cannot work is a usage error before any image.
#[test]
fn label_members_of_the_clean_shards_label_their_samples() {
    let t = tempfile::tempdir().unwrap();
    let files = t.path().join("files");
    let labels_dir = t.path().join("labels");
    let keys = ["0001", "0002", "sub/0003"];
    let classes = ["tree", "2", " sky\n"];
    let shard = t.path().join("shard.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&shard).unwrap());
    for (i, key) in keys.iter().enumerate() {
        let image = files.join(format!("{key}.png"));
        let (w, h) = (40 + 9 * i, 33 + 5 * i);
        write_image(&image, w as u32, h as u32, i as u32);
        let map: Vec<u16> = (0..w * h).map(|k| ((k / 5 + i) % 3) as u16).collect();
        let label = labels_dir.join("shard").join(format!("{key}.png"));
        prm::eval::labels::write_label_png(&label, w, h, &map).unwrap();
        let (image, label) = (std::fs::read(image).unwrap(), std::fs::read(label).unwrap());
        // The first sample's label members come before its image, the others' after it (their
        // label maps' extension in upper case).
        let (seg, cls) = (format!("{key}.seg.png"), format!("{key}.cls"));
        if i == 0 {
            add_member(&mut b, &seg, &label);
            add_member(&mut b, &cls, classes[i].as_bytes());
            add_member(&mut b, &format!("{key}.png"), &image);
        } else {
            add_member(&mut b, &format!("{key}.png"), &image);
            add_member(&mut b, &format!("{key}.json"), b"{}");
            add_member(&mut b, &format!("{key}.SEG.PNG"), &label);
            add_member(&mut b, &cls, classes[i].as_bytes());
        }
    }
    b.into_inner().unwrap();
    let adv = t.path().join("adv");
    attack_tiny(&shard, &adv, 1);
    let names = t.path().join("classes.txt");
    std::fs::write(&names, "sky\ntree\nroad\n").unwrap();
    // `prm eval` of `clean` with `--labels labels`, and its report if it wrote one.
    let run = |target: &str, clean: &Path, labels: &str| {
        let report = t
            .path()
            .join(format!("{}.json", t.path().read_dir().unwrap().count()));
        let mut args = vec!["--target", target, "--clean", s(clean), "--adv", s(&adv)];
        if target != "features" {
            args.extend(["--classes", s(&names)]);
        }
        args.extend([
            "--labels",
            labels,
            "--report",
            s(&report),
            "--device",
            "cpu",
        ]);
        let o = eval(&args);
        let r = report.is_file().then(|| read_json(&report));
        (o, r)
    };
    let ok = |(o, r): (Output, Option<Value>)| {
        let mut r = r.unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", r["per_image"]);
        r.as_object_mut().unwrap().remove("label_source");
        r
    };
    // Label maps.
    let (o, members) = run("maskclip", &shard, "member:seg.png");
    assert_eq!(members.as_ref().unwrap()["label_source"], "member:seg.png");
    let members = ok((o, members));
    assert!(members["miou_clean"].is_number());
    assert_eq!(members, ok(run("maskclip", &shard, s(&labels_dir))));
    // Classes, by name and by index, against the same classes in a list file.
    let list = t.path().join("labels.txt");
    let lines: Vec<String> = keys
        .iter()
        .zip(classes)
        .map(|(k, c)| format!("shard.tar/{k}.png {}", c.trim()))
        .collect();
    std::fs::write(&list, lines.join("\n")).unwrap();
    let members = ok(run("zeroshot", &shard, "member:cls"));
    assert_eq!(members["labelled_images"], 3);
    let labels: Vec<&str> = members["per_image"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["tree", "road", "sky"]);
    // A label file also counts its lines that name no image: here, none.
    let mut from_list = ok(run("zeroshot", &shard, s(&list)));
    let from_list_map = from_list.as_object_mut().unwrap();
    assert_eq!(
        from_list_map.remove("unmatched_label_lines"),
        Some(0.into())
    );
    assert_eq!(
        from_list_map.remove("unmatched_label_examples"),
        Some(serde_json::json!([]))
    );
    assert_eq!(members, from_list);

    // Per-image errors: a sample without its label map, a class that is not one.
    let broken = t.path().join("broken.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&broken).unwrap());
    let mut input = tar::Archive::new(std::fs::File::open(&shard).unwrap());
    for entry in input.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        match name.as_str() {
            "0002.SEG.PNG" => {}
            "sub/0003.cls" => add_member(&mut b, &name, b"zebra"),
            _ => add_member(&mut b, &name, &data),
        }
    }
    b.into_inner().unwrap();
    std::fs::copy(adv.join("shard.tar"), adv.join("broken.tar")).unwrap();
    let errors = |target: &str, labels: &str| -> Vec<String> {
        let (o, r) = run(target, &broken, labels);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let r = r.unwrap();
        let records = r["per_image"].as_array().unwrap();
        records
            .iter()
            .map(|x| x["error"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let e = errors("maskclip", "member:seg.png");
    assert!(e[0].is_empty() && e[2].is_empty(), "{e:?}");
    assert!(
        e[1].contains("broken.tar/0002.seg.png") && e[1].contains("no such member"),
        "{}",
        e[1]
    );
    let e = errors("zeroshot", "member:cls");
    assert!(e[0].is_empty() && e[1].is_empty(), "{e:?}");
    assert!(
        e[2].contains("broken.tar/sub/0003.cls") && e[2].contains("zebra"),
        "{}",
        e[2]
    );

    // Usage errors (exit 2), before any image: no member has the extension; plain-file inputs;
    // an image extension; the features target.
    for (target, clean, labels, says) in [
        (
            "maskclip",
            &shard,
            "member:seg.npy",
            "(extensions there: cls, json, png, seg.png)",
        ),
        ("maskclip", &files, "member:seg.png", "tar shards"),
        ("maskclip", &shard, "member:png", "are the shards' images"),
        ("features", &shard, "member:cls", "takes no labels"),
    ] {
        let (o, _) = run(target, clean, labels);
        assert_eq!(o.status.code(), Some(2), "{labels}");
        assert!(stderr(&o).contains(says), "{labels}: {}", stderr(&o));
    }
}

/// `prm eval` lists the clean images as `prm attack` and `prm verify` do: `--exclude` leaves out
/// what the attack left out, the run's own output directories inside the clean one (the
/// adversarial images, predictions, pictures) are never inputs, so a second run sees the same
/// images, and `--max-pixels` is the attack's pixel budget.
#[test]
fn eval_lists_the_inputs_the_attack_listed() {
    let t = tempfile::tempdir().unwrap();
    let clean = t.path().join("data");
    write_image(&clean.join("a.png"), 70, 50, 1);
    write_image(&clean.join("sub/b.png"), 48, 81, 2);
    write_image(&clean.join("raw/c.png"), 40, 40, 3);
    let adv = clean.join("adv");
    attack_tiny_with(&clean, &adv, 1, &["--exclude", "raw/**"]);
    let names = t.path().join("classes.txt");
    std::fs::write(&names, "sky\ntree\nroad\n").unwrap();
    let run = |extra: &[&str], report: &str| {
        let report = t.path().join(report);
        let mut args = vec![
            "--target",
            "maskclip",
            "--classes",
            s(&names),
            "--clean",
            s(&clean),
            "--adv",
            s(&adv),
            "--report",
            s(&report),
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let o = eval(&args);
        (o.status.code(), read_json(&report))
    };
    let (preds, pics) = (clean.join("preds"), clean.join("pics"));
    let outputs = [
        "--exclude",
        "raw/**",
        "--save-predictions",
        s(&preds),
        "--pictures",
        s(&pics),
    ];
    let images = |r: &Value| -> Vec<String> {
        let records = r["per_image"].as_array().unwrap();
        records
            .iter()
            .map(|x| x["image"].as_str().unwrap().to_string())
            .collect()
    };
    let (code, first) = run(&outputs, "first.json");
    assert_eq!(code, Some(0), "{first}");
    // The report says what made the adversarial images (the attack's run.json).
    assert_eq!(first["attack"]["settings"]["steps"], 1);
    assert_eq!(first["attack"]["model"], "random:tiny");
    let summary = std::fs::read_to_string(t.path().join("first.md")).unwrap();
    assert!(
        summary.contains("- attack: prm loss, pgd × 1 steps, ε 8.00/255, on `random:tiny`"),
        "{summary}"
    );
    assert_eq!(images(&first), ["a.png", "sub/b.png"]);
    assert!(preds.join("adv/a.png").is_file() && pics.join("sub/b.png").is_file());
    let (code, second) = run(&outputs, "second.json");
    assert_eq!(code, Some(0), "{second}");
    assert_eq!(first, second);
    // Without `--exclude raw/**` the image the attack left out has no adversarial counterpart.
    // (Outputs of other runs are inputs like any image unless excluded.)
    let (code, r) = run(&["--exclude", "preds", "--exclude", "pics"], "all.json");
    assert_eq!(code, Some(1));
    assert_eq!(images(&r), ["a.png", "raw/c.png", "sub/b.png"]);
    assert_eq!(r["per_image"][1]["status"], "error");
    // A pixel budget below sub/b.png's 3,888 pixels (a.png has 3,500) fails that image alone.
    let budget = [
        "--exclude",
        "raw",
        "--exclude",
        "p*s",
        "--max-pixels",
        "3887",
    ];
    let (code, r) = run(&budget, "budget.json");
    assert_eq!(code, Some(1));
    assert_eq!(images(&r), ["a.png", "sub/b.png"]);
    assert_eq!(r["per_image"][0]["status"], "ok");
    let error = r["per_image"][1]["error"].as_str().unwrap();
    assert!(error.contains("3887"), "{error}");
}

/// The report names the evaluated weights (their fingerprint) and says whether the adversarial
/// images were made against them: the same encoder, or another one (a transfer between two
/// encoders, or a wrong checkpoint), which stderr and the summary point out.
#[test]
fn the_report_says_whether_the_attack_used_the_weights_evaluated() {
    let (t, clean, adv) = setup();
    let run = |model: &str, name: &str| {
        let report = t.path().join(name);
        let o = prm(&[
            "eval",
            "--model",
            model,
            "--target",
            "features",
            "--resolution",
            "64",
            "--clean",
            s(&clean),
            "--adv",
            s(&adv),
            "--report",
            s(&report),
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let md = std::fs::read_to_string(report.with_extension("md")).unwrap();
        (read_json(&report), md, stderr(&o))
    };
    let (same, md, err) = run("random:tiny", "same.json");
    assert_eq!(same["attack_weights_match"], true);
    assert_eq!(same["weights"], same["attack"]["weights"]);
    assert!(same["weights"].as_str().unwrap().starts_with("xxh3-128:"));
    assert!(md.contains("(the weights evaluated here)"), "{md}");
    assert!(!err.contains("other weights"), "{err}");

    let (other, md, err) = run("random:vit-b-32", "other.json");
    assert_eq!(other["attack_weights_match"], false);
    assert_ne!(other["weights"], same["weights"]);
    assert!(
        md.contains("other weights than those evaluated here"),
        "{md}"
    );
    assert!(
        err.contains("made against other weights") && err.contains("random:vit-b-32"),
        "{err}"
    );
}

/// `prm classes` writes the class embeddings `prm eval` would make from the names; reading them
/// back gives the same evaluation, with the text tower named in the report, and a name holding a
/// comma survives.
#[test]
fn class_embeddings_written_once_give_the_same_evaluation() {
    let (t, clean, adv) = setup();
    let names = t.path().join("classes.txt");
    std::fs::write(&names, "tench, Tinca tinca\ndog\n\nrocket\n").unwrap();
    let written = t.path().join("emb/classes.safetensors");
    for device in ["cpu", "sim"] {
        let out = t.path().join(format!("emb/{device}.safetensors"));
        let o = prm(&[
            "classes",
            "--model",
            "random:tiny",
            "--names",
            s(&names),
            "--output",
            s(&out),
            "--device",
            device,
            "-q",
        ]);
        assert!(o.status.success(), "{device}: {}", stderr(&o));
    }
    std::fs::rename(t.path().join("emb/cpu.safetensors"), &written).unwrap();
    let cpu = prm::eval::text::read_class_safetensors(&written).unwrap();
    let sim =
        prm::eval::text::read_class_safetensors(&t.path().join("emb/sim.safetensors")).unwrap();
    assert_eq!(cpu.names, ["tench, Tinca tinca", "dog", "rocket"]);
    assert_eq!(sim.names, cpu.names);
    let worst = cpu
        .embeddings
        .iter()
        .zip(&sim.embeddings)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-5,
        "cpu and sim class embeddings differ by {worst}"
    );
    let tower = prm::model::load_text_tower("random:tiny")
        .unwrap()
        .unwrap()
        .fingerprint();
    assert_eq!(cpu.text_weights.as_deref(), Some(tower.as_str()));

    let report = |classes: &Path, name: &str| {
        let rep = t.path().join(name);
        let o = eval(&[
            "--target",
            "zeroshot",
            "--clean",
            s(&clean),
            "--adv",
            s(&adv),
            "--classes",
            s(classes),
            "--report",
            s(&rep),
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let mut r = read_json(&rep);
        let source = r["class_source"].take();
        let matching = r.as_object_mut().unwrap().remove("text_weights_match");
        (
            r,
            source.as_str().unwrap().to_string(),
            matching,
            stderr(&o),
        )
    };
    let (from_names, _, none, _) = report(&names, "names.json");
    assert_eq!(none, None, "embedded here: nothing to compare");
    let (from_file, source, matching, _) = report(&written, "file.json");
    assert_eq!(matching, Some(serde_json::json!(true)));
    assert_eq!(from_file, from_names);
    // Embeddings of another text tower (another seed): said on stderr and in the report.
    let other = t.path().join("emb/other.safetensors");
    let o = prm(&[
        "classes",
        "--model",
        "random:tiny@7",
        "--names",
        s(&names),
        "--output",
        s(&other),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, _, matching, err) = report(&other, "other.json");
    assert_eq!(matching, Some(serde_json::json!(false)));
    assert!(err.contains("another text tower"), "{err}");
    assert!(
        source.contains("precomputed") && source.contains(&tower),
        "{source}"
    );

    // prm classes's own words: its flag is --names, not eval's --classes.
    let dup = t.path().join("dup.txt");
    std::fs::write(&dup, "cat\ndog\ncat\n").unwrap();
    let o = prm(&[
        "classes",
        "--model",
        "random:tiny",
        "--names",
        s(&dup),
        "--output",
        "x.safetensors",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--names") && !stderr(&o).contains("--classes"),
        "{}",
        stderr(&o)
    );
    // Refused before any work: an output that is not .safetensors, names that do not exist.
    for (flag, value) in [("--output", "classes.txt"), ("--names", "missing.txt")] {
        let mut args = vec![
            "classes",
            "--model",
            "random:tiny",
            "--names",
            s(&names),
            "--output",
            "out.safetensors",
        ];
        let i = args.iter().position(|a| *a == flag).unwrap();
        let bad = t.path().join(value);
        args[i + 1] = s(&bad);
        let o = prm(&args);
        assert_eq!(o.status.code(), Some(2), "{flag}: {}", stderr(&o));
        assert!(stderr(&o).contains(flag), "{}", stderr(&o));
    }
}

/// A `--classes` safetensors file of `rows` [C, 64] F32 embeddings and metadata `names`.
fn write_class_embeddings(path: &Path, rows: &[f32], names: &str) {
    let e: Vec<u8> = rows
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, 64))
        .flat_map(f32::to_le_bytes)
        .collect();
    safetensors::serialize_to_file(
        vec![(
            "class_embeddings",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows.len(), 64], &e)
                .unwrap(),
        )],
        Some(std::collections::HashMap::from([(
            "names".to_string(),
            names.to_string(),
        )])),
        path,
    )
    .unwrap();
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = walk(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// An eval output that would land on an input (`--pictures` on `--adv`, `--save-predictions`
/// on its parent, a report on the attack's `run.json` or on an adversarial image, pictures over
/// the label maps) is refused with exit 2 before the model loads (a model that does not exist
/// is never reached), and the attack's files are left as they were; so is an output directory
/// that is a file. Pictures in a directory of their own inside `--adv` are fine.
#[test]
fn outputs_over_inputs_are_refused_before_any_work() {
    let (t, clean, adv) = setup();
    let names = t.path().join("classes.txt");
    std::fs::write(&names, "cat\ndog\n").unwrap();
    let labels = t.path().join("labels");
    std::fs::create_dir_all(&labels).unwrap();
    let afile = t.path().join("afile");
    std::fs::write(&afile, "x").unwrap();
    let before = snapshot(&adv);
    let missing_model = t.path().join("no-such-model");
    let refused = |extra: &[&str], says: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            s(&missing_model),
            "--target",
            "maskclip",
            "--classes",
            s(&names),
            "--clean",
            s(&clean),
            "--adv",
            s(&adv),
            "-q",
        ];
        args.extend_from_slice(extra);
        let o = prm(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(!err.contains("cannot load model"), "{extra:?}: {err}");
        for text in says {
            assert!(err.contains(text), "{extra:?}: {err}");
        }
    };
    let dotted = format!("{}/../adv/.", s(&clean));
    refused(
        &["--pictures", &dotted],
        &["--pictures", "a.png over the adversarial image of `a.png`"],
    );
    refused(
        &["--save-predictions", s(t.path())],
        // DIR/adv/<rel> is the adversarial image, DIR/clean/<rel> the clean one.
        &["--save-predictions", "would write", "(--clean)"],
    );
    let run_json = adv.join("run.json");
    refused(&["--report", s(&run_json)], &["run record"]);
    let image = adv.join("sub/b.png");
    refused(
        &["--report", s(&image)],
        &["the adversarial image of `sub/b.jpg`"],
    );
    refused(
        &["--labels", s(&labels), "--pictures", s(&labels)],
        &["the label map of `a.png` (--labels)"],
    );
    refused(&["--report", s(&names)], &["the --classes file"]);
    refused(
        &["--pictures", s(&afile)],
        &["--pictures", "not a directory"],
    );
    let under_file = afile.join("pred");
    refused(
        &["--save-predictions", s(&under_file)],
        &["--save-predictions", "not a directory"],
    );
    assert!(snapshot(&adv) == before, "the attack's files changed");
    assert!(!t.path().join("clean/a.png").with_extension("md").exists());

    // A directory of its own inside --adv writes over nothing.
    let pictures = adv.join("pictures");
    let o = eval(&[
        "--target",
        "features",
        "--resolution",
        "32",
        "--clean",
        s(&clean),
        "--adv",
        s(&adv),
        "--pictures",
        s(&pictures),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(pictures.join("sub/b.png").is_file());
    assert!(snapshot(&adv)
        .into_iter()
        .filter(|(p, _)| !p.starts_with(&pictures))
        .eq(before));
}

/// zeroshot with `--labels FILE`: a file whose lines name no image (paths written from the
/// working directory) is a usage error naming a line and the expected form; an image without
/// a line is that image's error (exit 1) and a line naming no image is counted in the report;
/// a byte-order mark, CRLF, `./` and `\\` are read as meant; a path holding a space needs a
/// TAB, and the error of a line split at its space says so.
#[test]
fn class_label_files_are_matched_to_the_images() {
    let (t, clean, adv) = setup();
    let names = t.path().join("classes.txt");
    std::fs::write(&names, "cat\ndog\nrocket\n").unwrap();
    let zeroshot = |clean: &Path, adv: &Path, labels: &str, report: &Path| {
        let file = t.path().join("labels.txt");
        std::fs::write(&file, labels).unwrap();
        let o = eval(&[
            "--target",
            "zeroshot",
            "--resolution",
            "32",
            "--clean",
            s(clean),
            "--adv",
            s(adv),
            "--classes",
            s(&names),
            "--labels",
            s(&file),
            "--report",
            s(report),
            "--device",
            "cpu",
        ]);
        (o.status.code(), stderr(&o))
    };
    let report = t.path().join("r.json");
    let from_cwd = format!("{}/a.png\tcat\n{}/sub/b.jpg\tdog\n", s(&clean), s(&clean));
    let (code, err) = zeroshot(&clean, &adv, &from_cwd, &report);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("none of its 2 label line(s) names an image")
            && err.contains(&format!("line 1 names `{}/a.png`", s(&clean)))
            && err.contains("relative to --clean, such as `a.png`"),
        "{err}"
    );
    assert!(!report.exists());

    // sub/b.jpg has no line; `gone.png` is no image of the run.
    let (code, err) = zeroshot(&clean, &adv, "a.png\tcat\ngone.png\tdog\n", &report);
    assert_eq!(code, Some(1), "{err}");
    let r = read_json(&report);
    assert_eq!(
        (r["images"].clone(), r["failed"].clone()),
        (1.into(), 1.into())
    );
    assert_eq!(r["labelled_images"], 1);
    assert_eq!(r["unmatched_label_lines"], 1);
    assert_eq!(r["unmatched_label_examples"][0], "line 2: gone.png");
    let error = r["per_image"][1]["error"].as_str().unwrap();
    assert!(error.contains("no line labels `sub/b.jpg`"), "{error}");
    let md = std::fs::read_to_string(report.with_extension("md")).unwrap();
    assert!(md.contains("1 label line(s) name no image"), "{md}");

    // A byte-order mark, CRLF line ends, `./` and a Windows separator.
    let (code, err) = zeroshot(
        &clean,
        &adv,
        "\u{feff}./a.png,cat\r\nsub\\b.jpg 2\r\n",
        &report,
    );
    assert_eq!(code, Some(0), "{err}");
    let r = read_json(&report);
    assert_eq!(
        (
            r["labelled_images"].clone(),
            r["unmatched_label_lines"].clone()
        ),
        (2.into(), 0.into())
    );

    // A path holding a space: split at its first space, the class is wrong, and the error
    // says why; after a TAB it is read whole.
    let (spaced, spaced_adv) = (t.path().join("spaced"), t.path().join("spaced_adv"));
    std::fs::create_dir_all(&spaced).unwrap();
    std::fs::create_dir_all(&spaced_adv).unwrap();
    std::fs::copy(clean.join("a.png"), spaced.join("my a.png")).unwrap();
    std::fs::copy(adv.join("a.png"), spaced_adv.join("my a.png")).unwrap();
    let (code, err) = zeroshot(
        &spaced,
        &spaced_adv,
        "my a.png\tcat\nmy a.png rocket\n",
        &report,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("line 2: `a.png rocket` is neither a class name")
            && err.contains("split at its first space into the path `my`")
            && err.contains("TAB"),
        "{err}"
    );
    let (code, err) = zeroshot(&spaced, &spaced_adv, "my a.png rocket\n", &report);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("line 1 names `my` (split at its first space: put a TAB"),
        "{err}"
    );
    let (code, err) = zeroshot(&spaced, &spaced_adv, "my a.png\trocket\n", &report);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(read_json(&report)["per_image"][0]["label"], "rocket");
}

/// Class names that cannot be told apart are refused, naming the culprit: a name listed twice
/// (in a text file, for `prm eval` and `prm classes` alike, or in an embedding file's
/// `names`), and an all-zero embedding row. A byte-order mark before the first name is not
/// part of it.
#[test]
fn ambiguous_classes_are_refused_and_a_bom_is_not_a_name() {
    let (t, clean, adv) = setup();
    let run = |classes: &Path, extra: &[&str]| {
        let mut args = vec![
            "--target",
            "zeroshot",
            "--resolution",
            "32",
            "--clean",
            s(&clean),
            "--adv",
            s(&adv),
            "--classes",
            s(classes),
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let o = eval(&args);
        (o.status.code(), stderr(&o))
    };
    let twice = t.path().join("twice.txt");
    std::fs::write(&twice, "cat\n\ndog\ncat\n").unwrap();
    let (code, err) = run(&twice, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("class `cat` is listed twice (lines 1 and 4)"),
        "{err}"
    );
    let out = t.path().join("twice.safetensors");
    let o = prm(&[
        "classes",
        "--model",
        "random:tiny",
        "--names",
        s(&twice),
        "--output",
        s(&out),
        "--single-template",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("listed twice") && !out.exists());

    let dup = t.path().join("dup.safetensors");
    write_class_embeddings(&dup, &[1.0, 2.0, 0.5], r#"["a", "b", "a"]"#);
    let (code, err) = run(&dup, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`a` twice"), "{err}");
    let zero = t.path().join("zero.safetensors");
    write_class_embeddings(&zero, &[1.0, 0.0, 0.5], "a,b,c");
    let (code, err) = run(&zero, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("row 1") && err.contains("class `b`") && err.contains("all zeros"),
        "{err}"
    );

    let bom = t.path().join("bom.txt");
    std::fs::write(&bom, "\u{feff}cat\r\ndog\r\n").unwrap();
    let labels = t.path().join("labels.txt");
    std::fs::write(&labels, "a.png cat\nsub/b.jpg dog\n").unwrap();
    let report = t.path().join("bom.json");
    let (code, err) = run(
        &bom,
        &[
            "--labels",
            s(&labels),
            "--report",
            s(&report),
            "--single-template",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        read_json(&report)["classes"],
        serde_json::json!(["cat", "dog"])
    );
}

/// Flags that say how class names are embedded are refused (exit 2) where no names are
/// embedded: with precomputed embeddings, or no --classes; a --tokenizer that does not exist is
/// refused before any work. --probe-layer errors name the flag, not the probe file.
#[test]
fn conflicting_class_and_probe_flags_name_the_flag() {
    let (t, clean, adv) = setup();
    let names = t.path().join("classes.txt");
    std::fs::write(&names, "cat\ndog\n").unwrap();
    let embedded = t.path().join("classes.safetensors");
    write_class_embeddings(&embedded, &[1.0, -1.0], "cat,dog");
    let tokenizer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer/tiny-clip-tokenizer.json");
    assert!(tokenizer.is_file());
    let missing = t.path().join("missing.json");
    let missing_model = t.path().join("no-such-model");
    for (classes, extra, says) in [
        (
            Some(&embedded),
            vec!["--single-template"],
            "holds embeddings made already",
        ),
        (
            Some(&embedded),
            vec!["--tokenizer", s(&tokenizer)],
            "holds embeddings made already",
        ),
        (
            Some(&names),
            vec!["--tokenizer", s(&missing)],
            "no such file",
        ),
        (None, vec!["--single-template"], "there is no --classes"),
    ] {
        let mut args = vec![
            "eval",
            "--model",
            s(&missing_model),
            "--clean",
            s(&clean),
            "--adv",
            s(&adv),
            "-q",
        ];
        match classes {
            Some(c) => args.extend(["--target", "zeroshot", "--classes", s(c)]),
            None => args.extend(["--target", "features"]),
        }
        args.extend(&extra);
        let o = prm(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains(extra[0]) && err.contains(says),
            "{extra:?}: {err}"
        );
    }

    let probe = t.path().join("probe.safetensors");
    let write_probe = |layer: &str| {
        let w: Vec<u8> = (0..4 * 128)
            .flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes())
            .collect();
        safetensors::serialize_to_file(
            vec![(
                "weight",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 128], &w)
                    .unwrap(),
            )],
            Some(std::collections::HashMap::from([(
                "layer".to_string(),
                layer.to_string(),
            )])),
            &probe,
        )
        .unwrap();
    };
    let probe_eval = |extra: &[&str]| {
        let mut args = vec![
            "--target",
            "probe",
            "--probe",
            s(&probe),
            "--clean",
            s(&clean),
            "--adv",
            s(&adv),
        ];
        args.extend_from_slice(extra);
        let o = eval(&args);
        (o.status.code(), stderr(&o))
    };
    write_probe("1");
    let (code, err) = probe_eval(&["--probe-layer", "5"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--probe-layer 5: layer 5 does not exist") && !err.contains("bad probe file"),
        "{err}"
    );
    write_probe("9");
    let (code, err) = probe_eval(&[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("bad probe file: metadata `layer`: layer 9"),
        "{err}"
    );
}

/// A `run.json` in --adv that is not a run record does not stop the evaluation (the images are
/// evaluated all the same) but is named on stderr, even with -q, and in the report and its
/// summary, which have no `attack`.
#[test]
fn a_corrupt_run_record_is_named_on_stderr_and_in_the_report() {
    let (t, clean, adv) = setup();
    std::fs::write(adv.join("run.json"), "{broken").unwrap();
    let report = t.path().join("r.json");
    let o = eval(&[
        "--target",
        "features",
        "--resolution",
        "32",
        "--clean",
        s(&clean),
        "--adv",
        s(&adv),
        "--report",
        s(&report),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("warning:") && err.contains("run.json: not a run record"),
        "{err}"
    );
    let r = read_json(&report);
    assert!(r.get("attack").is_none());
    assert!(r["attack_record_error"]
        .as_str()
        .unwrap()
        .contains("not a run record"));
    let md = std::fs::read_to_string(report.with_extension("md")).unwrap();
    assert!(md.contains("attack: **unknown**"), "{md}");
}

/// `--adv` that does not exist, or is a file, is named as such before any work (exit 2).
#[test]
fn an_adv_that_is_missing_or_a_file_is_named() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("adv.png");
    std::fs::write(&file, b"not a directory").unwrap();
    let missing = t.path().join("missing");
    for (adv, says) in [
        (&missing, "no such directory"),
        (&file, "a file, not a directory"),
    ] {
        let o = eval(&[
            "--target",
            "features",
            "--clean",
            s(t.path()),
            "--adv",
            s(adv),
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("--adv") && err.contains(says), "{err}");
        assert!(err.contains("output directory of prm attack"), "{err}");
    }
}
