//! End-to-end tests, on `random:tiny`, of what people look at and of the uniform-noise baseline:
//! `prm eval --pictures` (size, layout and the pixels of every panel and legend swatch),
//! `prm attack --plot` (a decodable PNG, and numbers that match the manifest; the GPU engine's
//! loop in the simulator records the same curve as the CPU), `prm attack --init random --steps 0`
//! (within ε, seeded, reproducible), and `scripts/compare.py` when Python is there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prm::viz::palette::class_colour;
use prm::viz::pictures::{layout, panel_size, swatch_side, Panel, PanelKind, Picture};
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
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

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn manifest(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Clean images of two sizes (one in a sub-directory), attacked with a short PGD run.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let clean = t.path().join("clean");
    let adv = t.path().join("adv");
    write_image(&clean.join("a.png"), 70, 50, 1);
    write_image(&clean.join("sub/b.jpg"), 48, 81, 2);
    let o = prm(&[
        "attack",
        "--model",
        "random:tiny",
        "--input",
        s(&clean),
        "--output",
        s(&adv),
        "--preset",
        "pgd",
        "--steps",
        "2",
        "--device",
        "cpu",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    (t, clean, adv)
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// A picture with the geometry of an eval picture: a header, `panels` panels of `w`×`h`, and
/// the legend names. Titles and the header do not move anything (they are shortened to fit).
fn geometry(w: usize, h: usize, panels: usize, legend: &[String]) -> Picture {
    Picture {
        header: "header".into(),
        panels: (0..panels)
            .map(|_| Panel {
                title: String::new(),
                width: w,
                height: h,
                rgb: vec![0; 3 * w * h],
                kind: PanelKind::Photo,
            })
            .collect(),
        legend: legend.iter().map(|n| (n.clone(), [0, 0, 0])).collect(),
    }
}

/// Asserts that the panel at `(x0, y0)` of `picture`, `k` times enlarged, shows `expected`.
fn assert_panel(
    picture: &image::RgbImage,
    (x0, y0): (usize, usize),
    k: usize,
    expected: &dyn Fn(u32, u32) -> [u8; 3],
    (w, h): (usize, usize),
    what: &str,
) {
    for y in 0..h * k {
        for x in 0..w * k {
            let got = picture.get_pixel((x0 + x) as u32, (y0 + y) as u32).0;
            let want = expected((x / k) as u32, (y / k) as u32);
            assert_eq!(got, want, "{what}: pixel ({x}, {y}) of the panel");
        }
    }
}

#[test]
fn eval_pictures_show_clean_adversarial_perturbation_and_both_segmentations() {
    let (t, clean, adv) = setup();
    let names_file = t.path().join("classes.txt");
    let names: Vec<String> = ["cat", "dog", "rocket", "sky"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    std::fs::write(&names_file, names.join("\n")).unwrap();
    let pictures = t.path().join("pictures");
    let pred = t.path().join("pred");
    let o = prm(&[
        "eval",
        "--model",
        "random:tiny",
        "--target",
        "maskclip",
        "--clean",
        s(&clean),
        "--adv",
        s(&adv),
        "--classes",
        s(&names_file),
        "--save-predictions",
        s(&pred),
        "--pictures",
        s(&pictures),
        "--device",
        "cpu",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (rel, out, w, h) in [
        ("a.png", "a.png", 70, 50),
        ("sub/b.jpg", "sub/b.png", 48, 81),
    ] {
        let picture = rgb(&pictures.join(out));
        let clean_img = rgb(&clean.join(rel));
        let adv_img = rgb(&adv.join(out));
        let maps: Vec<image::GrayImage> = ["clean", "adv"]
            .iter()
            .map(|d| image::open(pred.join(d).join(out)).unwrap().to_luma8())
            .collect();
        let mut present: Vec<u8> = maps
            .iter()
            .flat_map(|m| m.pixels().map(|p| p.0[0]))
            .collect();
        present.sort_unstable();
        present.dedup();
        let legend: Vec<String> = present.iter().map(|&c| names[c as usize].clone()).collect();
        let l = layout(&geometry(w, h, 5, &legend));
        assert_eq!(
            (picture.width() as usize, picture.height() as usize),
            (l.width, l.height),
            "{rel}"
        );
        // Small images are enlarged by a whole factor: 70×50 and 48×81 by 3.
        let (pw, ph) = panel_size(w, h);
        assert_eq!((pw, ph), (3 * w, 3 * h));
        assert!(l.width >= 5 * pw && l.panels.windows(2).all(|p| p[0].0 + pw < p[1].0));
        let k = 3;
        let px = |img: &image::RgbImage| {
            let img = img.clone();
            move |x: u32, y: u32| img.get_pixel(x, y).0
        };
        assert_panel(&picture, l.panels[0], k, &px(&clean_img), (w, h), "clean");
        assert_panel(
            &picture,
            l.panels[1],
            k,
            &px(&adv_img),
            (w, h),
            "adversarial",
        );
        // The perturbation, stretched so that its largest magnitude spans the range.
        let linf = clean_img
            .as_raw()
            .iter()
            .zip(adv_img.as_raw())
            .map(|(&c, &a)| (a as i32 - c as i32).abs())
            .max()
            .unwrap();
        assert!(linf > 0 && linf <= 8);
        let amp = 0.5 / (linf as f32 / 255.0);
        let (ci, ai) = (clean_img.clone(), adv_img.clone());
        let perturbation = move |x: u32, y: u32| -> [u8; 3] {
            let (c, a) = (ci.get_pixel(x, y).0, ai.get_pixel(x, y).0);
            std::array::from_fn(|i| {
                let d = a[i] as f32 / 255.0 - c[i] as f32 / 255.0;
                ((0.5 + d * amp).clamp(0.0, 1.0) * 255.0).round() as u8
            })
        };
        let (px0, py0) = l.panels[2];
        for y in 0..h * k {
            for x in 0..w * k {
                let got = picture.get_pixel((px0 + x) as u32, (py0 + y) as u32).0;
                let want = perturbation((x / k) as u32, (y / k) as u32);
                for i in 0..3 {
                    assert!(
                        (got[i] as i32 - want[i] as i32).abs() <= 1,
                        "perturbation at ({x}, {y}): {got:?} vs {want:?}"
                    );
                }
            }
        }
        for (i, map) in maps.iter().enumerate() {
            let map = map.clone();
            assert_panel(
                &picture,
                l.panels[3 + i],
                k,
                &move |x, y| class_colour(map.get_pixel(x, y).0[0] as usize),
                (w, h),
                ["clean segmentation", "adversarial segmentation"][i],
            );
        }
        // One legend swatch per class present, in class order, in the class's colour.
        assert_eq!(l.legend.len(), present.len());
        let half = swatch_side() / 2;
        for (&(x, y), &c) in l.legend.iter().zip(&present) {
            let got = picture.get_pixel((x + half) as u32, (y + half) as u32).0;
            assert_eq!(got, class_colour(c as usize), "legend swatch of class {c}");
        }
        // Titles, header and legend text are drawn: dark pixels above the panels and beside
        // the swatches.
        let dark = |x0: usize, y0: usize, x1: usize, y1: usize| {
            (y0..y1).any(|y| {
                (x0..x1).any(|x| {
                    picture
                        .get_pixel(x as u32, y as u32)
                        .0
                        .iter()
                        .all(|&v| v < 90)
                })
            })
        };
        assert!(
            dark(0, 0, l.width, l.panels[0].1),
            "{rel}: header and titles"
        );
        let (sx, sy) = l.legend[0];
        assert!(
            dark(sx + swatch_side() + 2, sy, sx + swatch_side() + 40, sy + 16),
            "legend text"
        );
    }
}

#[test]
fn classification_pictures_have_three_panels_and_no_legend() {
    let (t, clean, adv) = setup();
    let names = t.path().join("classes.txt");
    std::fs::write(
        &names,
        "cat\na very long class name that will not fit in a column\n",
    )
    .unwrap();
    let pictures = t.path().join("pictures");
    for target in ["zeroshot", "features"] {
        let dir = pictures.join(target);
        let mut args = vec![
            "eval",
            "--model",
            "random:tiny",
            "--target",
            target,
            "--clean",
            s(&clean),
            "--adv",
            s(&adv),
            "--pictures",
            s(&dir),
            "--device",
            "cpu",
            "-q",
        ];
        if target == "zeroshot" {
            args.extend(["--classes", s(&names)]);
        }
        let o = prm(&args);
        assert!(o.status.success(), "{target}: {}", stderr(&o));
        let picture = rgb(&dir.join("sub/b.png"));
        let l = layout(&geometry(48, 81, 3, &[]));
        assert_eq!(
            (picture.width() as usize, picture.height() as usize),
            (l.width, l.height),
            "{target}"
        );
        let clean_img = rgb(&clean.join("sub/b.jpg"));
        let img = clean_img.clone();
        assert_panel(
            &picture,
            l.panels[0],
            3,
            &move |x, y| img.get_pixel(x, y).0,
            (48, 81),
            "clean",
        );
    }
}

#[test]
fn a_failed_image_gets_no_picture() {
    // An image without an adversarial counterpart fails (exit 1) and gets no picture.
    let (t, clean, adv) = setup();
    write_image(&clean.join("lonely.png"), 40, 40, 3);
    let pictures = t.path().join("pictures");
    let o = prm(&[
        "eval",
        "--model",
        "random:tiny",
        "--target",
        "features",
        "--clean",
        s(&clean),
        "--adv",
        s(&adv),
        "--pictures",
        s(&pictures),
        "--device",
        "cpu",
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(pictures.join("a.png").is_file());
    assert!(!pictures.join("lonely.png").exists());
    // Only finished files: no temporaries left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&pictures)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

fn attack(input: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut a = vec![
        "attack",
        "--model",
        "random:tiny",
        "--input",
        s(input),
        "--output",
        s(out),
        "-q",
    ];
    a.extend_from_slice(extra);
    prm(&a)
}

fn curve(plot_json: &Value, image: &str) -> Vec<f64> {
    plot_json["shown"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["image"] == image)
        .unwrap_or_else(|| panic!("no curve for {image}"))["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn attack_plot_is_a_png_with_the_run_s_numbers() {
    let t = tempfile::tempdir().unwrap();
    let input = t.path().join("in");
    write_image(&input.join("a.png"), 40, 34, 1);
    write_image(&input.join("b.png"), 33, 47, 2);
    let out = t.path().join("out");
    let plot = t.path().join("plots/loss.png");
    let o = attack(
        &input,
        &out,
        &[
            "--preset",
            "pgd",
            "--steps",
            "4",
            "--device",
            "cpu",
            "--plot",
            s(&plot),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let png = rgb(&plot);
    let (w, h) = prm::viz::plot::PLOT_SIZE;
    assert_eq!((png.width(), png.height()), (w, h));
    assert!(
        png.pixels().any(|p| p.0 == [0, 0, 0]),
        "the mean line is drawn"
    );
    let j = read_json(&plot.with_extension("json"));
    assert_eq!(j["points"], 5);
    assert_eq!(j["images"], 2);
    for r in manifest(&out) {
        let c = curve(&j, r["input"].as_str().unwrap());
        assert_eq!(c.len(), 5);
        // No dynamic scale and a random start: step 0's loss is the initial loss; the last point
        // is the saved image's loss.
        assert!((c[0] - r["loss_initial"].as_f64().unwrap()).abs() < 1e-9);
        assert!((c[4] - r["loss_final"].as_f64().unwrap()).abs() < 1e-9);
        assert!(c[3] < c[0], "the loss goes down: {c:?}");
    }
    let mean: Vec<f64> = j["mean"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let (ca, cb) = (curve(&j, "a.png"), curve(&j, "b.png"));
    for k in 0..5 {
        assert!((mean[k] - (ca[k] + cb[k]) / 2.0).abs() < 1e-9);
    }
    // A resumed run that attacks nothing writes no plot and says so.
    std::fs::remove_file(&plot).unwrap();
    let o = prm(&[
        "attack",
        "--model",
        "random:tiny",
        "--input",
        s(&input),
        "--output",
        s(&out),
        "--preset",
        "pgd",
        "--steps",
        "4",
        "--device",
        "cpu",
        "--plot",
        s(&plot),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!plot.exists());
    assert!(stderr(&o).contains("no plot"), "{}", stderr(&o));
    // The plot is a PNG.
    let o = attack(
        &input,
        &t.path().join("o2"),
        &["--device", "cpu", "--plot", s(&t.path().join("loss.svg"))],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--plot"), "{}", stderr(&o));
}

#[test]
fn the_gpu_step_loop_records_the_same_curve_as_the_cpu() {
    // The paper preset: an escape step from the zero start, then dynamic scale. The simulator
    // runs the GPU engine's device-resident loop with its loss hook.
    let t = tempfile::tempdir().unwrap();
    let input = t.path().join("in");
    write_image(&input.join("a.png"), 36, 30, 4);
    let mut curves = Vec::new();
    for device in ["cpu", "sim"] {
        let plot = t.path().join(format!("{device}.png"));
        let o = attack(
            &input,
            &t.path().join(device),
            &[
                "--preset",
                "paper",
                "--steps",
                "3",
                "--device",
                device,
                "--plot",
                s(&plot),
            ],
        );
        assert!(o.status.success(), "{device}: {}", stderr(&o));
        let c = curve(&read_json(&plot.with_extension("json")), "a.png");
        let r = &manifest(&t.path().join(device))[0];
        assert_eq!(c.len(), 4);
        // The escape step computes no loss: the curve starts at the clean image's loss.
        assert!((c[0] - r["loss_initial"].as_f64().unwrap()).abs() < 1e-9);
        curves.push(c);
    }
    for (a, b) in curves[0].iter().zip(&curves[1]) {
        assert!(
            (a - b).abs() < 1e-4,
            "cpu {:?} vs sim {:?}",
            curves[0],
            curves[1]
        );
    }
}

#[test]
fn uniform_noise_baseline_is_zero_steps_from_a_random_start() {
    let t = tempfile::tempdir().unwrap();
    let input = t.path().join("in");
    write_image(&input.join("a.png"), 40, 34, 1);
    write_image(&input.join("b.png"), 33, 47, 2);
    let run = |out: &str, extra: &[&str]| {
        let out = t.path().join(out);
        let mut a = vec!["--steps", "0", "--device", "cpu"];
        a.extend_from_slice(extra);
        if !extra.contains(&"--init") {
            a.extend(["--init", "random"]);
        }
        let o = attack(&input, &out, &a);
        assert!(o.status.success(), "{}", stderr(&o));
        out
    };
    let u = run("u", &["--eps", "4/255"]);
    let again = run("again", &["--eps", "4/255"]);
    let other = run("other", &["--eps", "4/255", "--seed", "7"]);
    for name in ["a.png", "b.png"] {
        let c = rgb(&input.join(name));
        let a = rgb(&u.join(name));
        let diffs: Vec<i32> = c
            .as_raw()
            .iter()
            .zip(a.as_raw())
            .map(|(&x, &y)| y as i32 - x as i32)
            .collect();
        assert!(diffs.iter().all(|d| d.abs() <= 4), "within eps");
        // Signed uniform noise: both signs, most pixels moved, the budget reached.
        assert!(diffs.iter().any(|&d| d > 0) && diffs.iter().any(|&d| d < 0));
        assert!(diffs.iter().filter(|&&d| d != 0).count() * 2 > diffs.len());
        assert_eq!(diffs.iter().map(|d| d.abs()).max(), Some(4));
        assert_eq!(a, rgb(&again.join(name)), "seeded: the same noise again");
        assert_ne!(a, rgb(&other.join(name)), "another seed, other noise");
    }
    for r in manifest(&u) {
        assert_eq!(r["status"], "ok");
        assert_eq!(r["steps"], 0);
        assert!(r["linf"].as_f64().unwrap() <= 4.0);
    }
    let o = prm(&[
        "verify",
        "--clean",
        s(&input),
        "--adv",
        s(&u),
        "--eps",
        "4/255",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // Zero steps from an earlier run re-project it into a smaller ball.
    let smaller = run(
        "smaller",
        &["--init", &format!("from:{}", s(&u)), "--eps", "2/255"],
    );
    let o = prm(&[
        "verify",
        "--clean",
        s(&input),
        "--adv",
        s(&smaller),
        "--eps",
        "2/255",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // From the zero start, zero steps would save the clean image: still a usage error.
    let o = attack(
        &input,
        &t.path().join("z"),
        &["--steps", "0", "--device", "cpu"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--init random"), "{}", stderr(&o));
}

#[test]
fn compare_script_tabulates_every_attack() {
    let python = ["python3", "python"].into_iter().find(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(python) = python else {
        eprintln!("skipped: no Python");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let input = t.path().join("in");
    write_image(&input.join("a.png"), 40, 34, 1);
    let names = t.path().join("names.txt");
    std::fs::write(&names, "cat\ndog\nsky\n").unwrap();
    let out = t.path().join("cmp");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/compare.py");
    let o = Command::new(python)
        .args([
            s(&script),
            "--prm",
            env!("CARGO_BIN_EXE_prm"),
            "--surrogate",
            "random:tiny",
            "--target-model",
            "random:tiny",
            "--classes",
            s(&names),
            "--input",
            s(&input),
            "--out",
            s(&out),
            "--targets",
            "maskclip,features",
            "--eval-device",
            "cpu",
            "--plots",
            "--",
            "--preset",
            "pgd",
            "--steps",
            "2",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let j = read_json(&out.join("compare.json"));
    let table = j["table"].as_object().unwrap();
    let rows: Vec<&str> = table.keys().map(|k| k.as_str()).collect();
    for attack in ["prm", "nrd", "dr", "embed", "uniform"] {
        assert!(rows.contains(&attack), "{rows:?}");
        let row = table[attack].as_object().unwrap();
        assert_eq!(row.len(), 2);
        assert!(row.values().all(|v| v.is_number()), "{attack}: {row:?}");
        assert!(out.join("loss").join(format!("{attack}.png")).is_file());
    }
    let uniform = manifest(&out.join("adv/uniform"));
    assert_eq!(uniform[0]["steps"], 0);
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(md.contains("| uniform |"), "{md}");
}
