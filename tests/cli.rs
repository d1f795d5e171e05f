//! End-to-end tests of the `prm` command on the built-in tiny model: outputs, manifest, resume
//! from an earlier run, `verify`, and the documented exit codes for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn prm(args: &[&str]) -> Output {
    prm_command(args).output().expect("prm runs")
}

fn prm_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_prm"));
    command.args(args);
    command
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes a smooth, textured RGB test image.
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

fn manifest(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn max_abs_diff(a: &Path, b: &Path) -> u8 {
    let (a, b) = (
        image::open(a).unwrap().to_rgb8(),
        image::open(b).unwrap().to_rgb8(),
    );
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    input: PathBuf,
    root: PathBuf,
}

/// Three images: odd sizes (not multiples of the 16-pixel patch), one in a subdirectory, one JPEG.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let input = root.join("in");
    write_image(&input.join("a.png"), 70, 53, 1);
    write_image(&input.join("sub/b.jpg"), 64, 64, 2);
    write_image(&input.join("c.png"), 45, 81, 3);
    Fixture {
        _tmp: tmp,
        input,
        root,
    }
}

fn attack(f: &Fixture, out: &str, extra: &[&str]) -> (Output, PathBuf) {
    let out = f.root.join(out);
    let mut args = vec![
        "attack",
        "--model",
        "random:tiny",
        "--input",
        f.input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    (prm(&args), out)
}

#[test]
fn attack_writes_pngs_within_eps_and_a_complete_manifest() {
    let f = fixture();
    let (o, out) = attack(
        &f,
        "out",
        &["--preset", "pgd", "--steps", "3", "--save-float"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let records = manifest(&out);
    assert_eq!(records.len(), 3);
    for r in &records {
        assert_eq!(r["status"], "ok");
        let rel = r["input"].as_str().unwrap();
        let output = r["output"].as_str().unwrap();
        assert_eq!(
            output,
            rel.rsplit_once('.')
                .map(|(s, _)| format!("{s}.png"))
                .unwrap()
        );
        let diff = max_abs_diff(&f.input.join(rel), &out.join(output));
        // JPEG inputs decode to the same values prm saw, so the bound holds for every input.
        assert!(diff <= 8, "{rel}: saved L∞ {diff}/255");
        assert!(diff > 0, "{rel}: the attack changed nothing");
        assert!(r["linf"].as_f64().unwrap() <= 8.0 + 1e-6);
        assert_eq!(r["steps"], 3);
        assert!(r["loss_initial"].as_f64().unwrap().is_finite());
        assert!(r["loss_final"].as_f64().unwrap() < r["loss_initial"].as_f64().unwrap());
        assert_eq!(
            r["layer_cosine"].as_array().unwrap().len(),
            3,
            "tiny has F_0..F_2"
        );
        assert!(r["seconds"].as_f64().unwrap() >= 0.0);
        let (w, h) = image::image_dimensions(f.input.join(rel)).unwrap();
        assert_eq!(
            (r["width"].as_u64().unwrap(), r["height"].as_u64().unwrap()),
            (w as u64, h as u64)
        );
        assert!(out.join(output).with_extension("safetensors").exists());
    }
    // verify accepts it
    let verify = |eps: &str| {
        prm(&[
            "verify",
            "--clean",
            f.input.to_str().unwrap(),
            "--adv",
            out.to_str().unwrap(),
            "--eps",
            eps,
        ])
    };
    let v = verify("8/255");
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        stderr(&v)
    );
    assert!(!stderr(&v).contains("the attack's ε"), "{}", stderr(&v));
    // A looser --eps than the attack's (run.json) passes, with a note saying so.
    let v = verify("16/255");
    assert!(v.status.success());
    assert!(
        stderr(&v)
            .contains("the attack's ε was 8.00/255; checked against --eps 16.00/255 (a looser"),
        "{}",
        stderr(&v)
    );
}

#[test]
fn runs_are_reproducible_and_paper_preset_runs() {
    let f = fixture();
    let (o1, out1) = attack(&f, "p1", &["--steps", "2", "--seed", "5"]);
    // A different batching must not change anything: draws are keyed per image.
    let (o2, out2) = attack(
        &f,
        "p2",
        &["--steps", "2", "--seed", "5", "--batch-size", "2"],
    );
    assert!(
        o1.status.success() && o2.status.success(),
        "{}",
        stderr(&o1)
    );
    for name in ["a.png", "sub/b.png", "c.png"] {
        assert_eq!(
            std::fs::read(out1.join(name)).unwrap(),
            std::fs::read(out2.join(name)).unwrap(),
            "{name} differs"
        );
    }
}

#[test]
fn init_from_continues_an_earlier_run() {
    let f = fixture();
    let (o, first) = attack(&f, "first", &["--preset", "pgd", "--steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let from = format!("from:{}", first.display());
    let (o, second) = attack(
        &f,
        "second",
        &["--preset", "pgd", "--steps", "2", "--init", &from],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (manifest(&first), manifest(&second));
    for (ra, rb) in a.iter().zip(&b) {
        assert_eq!(ra["input"], rb["input"]);
        // The second run starts where the first one saved (up to the f32 rounding of the
        // ε-ball bounds when the start is projected).
        let (end, start) = (
            ra["loss_final"].as_f64().unwrap(),
            rb["loss_initial"].as_f64().unwrap(),
        );
        assert!((end - start).abs() <= 1e-6 * end.abs(), "{end} vs {start}");
        assert!(rb["loss_final"].as_f64().unwrap() < start);
        let out = rb["output"].as_str().unwrap();
        let diff = max_abs_diff(
            &f.input.join(ra["input"].as_str().unwrap()),
            &second.join(out),
        );
        assert!(diff <= 8);
    }
    // A start directory that lacks an image is a per-image failure, not a crash.
    std::fs::remove_file(first.join("c.png")).unwrap();
    let (o, third) = attack(
        &f,
        "third",
        &["--preset", "pgd", "--steps", "1", "--init", &from],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let failed: Vec<_> = manifest(&third)
        .into_iter()
        .filter(|r| r["status"] == "error")
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["error"].as_str().unwrap().contains("c.png"));
}

#[test]
fn verify_rejects_a_violation() {
    let f = fixture();
    let (o, out) = attack(&f, "out", &["--preset", "pgd", "--steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let path = out.join("a.png");
    let mut img = image::open(&path).unwrap().to_rgb8();
    let clean = image::open(f.input.join("a.png")).unwrap().to_rgb8();
    let px = clean.get_pixel(3, 4)[0];
    img.get_pixel_mut(3, 4)[0] = if px > 127 { px - 20 } else { px + 20 };
    img.save(&path).unwrap();
    let v = prm(&[
        "verify",
        "--clean",
        f.input.to_str().unwrap(),
        "--adv",
        out.to_str().unwrap(),
        "--eps",
        "8/255",
    ]);
    assert_eq!(v.status.code(), Some(1));
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(
        text.contains("a.png") && text.contains("VIOLATION"),
        "{text}"
    );
}

#[test]
fn a_corrupt_image_is_recorded_and_the_run_goes_on() {
    let f = fixture();
    std::fs::write(f.input.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let (o, out) = attack(&f, "out", &["--preset", "pgd", "--steps", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let records = manifest(&out);
    assert_eq!(records.len(), 4);
    let broken = records.iter().find(|r| r["input"] == "broken.png").unwrap();
    assert_eq!(broken["status"], "error");
    assert!(broken["error"].as_str().unwrap().contains("broken.png"));
    assert!(!out.join("broken.png").exists());
    assert_eq!(records.iter().filter(|r| r["status"] == "ok").count(), 3);
}

#[test]
fn usage_and_model_errors_exit_2_with_a_clear_message() {
    let f = fixture();
    let cases: &[(&[&str], &str)] = &[
        (&["--eps", "3"], "--eps"),
        (&["--steps", "0"], "--steps"),
        (&["--eps", "banana"], "eps"),
        (&["--layers", "0,99"], "layer 99"),
        (&["--device", "quantum"], "device"),
        (&["--init", "sometimes"], "init"),
    ];
    for (extra, needle) in cases {
        let (o, _) = attack(&f, "out", extra);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(needle),
            "{extra:?}: message lacks '{needle}': {}",
            stderr(&o)
        );
    }
    let out = f.root.join("out");
    let missing = f.root.join("no-such-model");
    let o = prm(&[
        "attack",
        "--model",
        missing.to_str().unwrap(),
        "--input",
        f.input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no-such-model"), "{}", stderr(&o));
    let truncated = f.root.join("truncated.safetensors");
    std::fs::write(&truncated, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
    let o = prm(&["info", "--model", truncated.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    // Two inputs that would both be written as x.png: refused before any work.
    write_image(&f.input.join("x.png"), 32, 32, 4);
    write_image(&f.input.join("x.jpg"), 32, 32, 5);
    let (o, out) = attack(&f, "collide", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("x.png"), "{}", stderr(&o));
    assert!(!out.join("manifest.jsonl").exists());
}

/// Files written beside the images, and working sizes, are checked before any work: a plot,
/// its numbers or a profile that would replace the run record, the manifest, an image or each
/// other; a plot path that is a directory; `--init from:` the output directory itself; a fixed
/// working size below one patch or beyond the pixel budget (before: a panic per image, or an
/// aborted process).
#[test]
fn side_files_and_working_sizes_are_refused_before_any_work() {
    let f = fixture();
    let (o, out) = attack(&f, "out", &["--steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let record = std::fs::read(out.join("run.json")).unwrap();
    let image = std::fs::read(out.join("a.png")).unwrap();
    std::fs::write(f.root.join("notes.json"), "{}").unwrap();
    let dir_plot = f.root.join("plots.png");
    std::fs::create_dir(&dir_plot).unwrap();
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--plot".into(), s(out.join("run.png"))], "run record"),
        (
            vec!["--plot".into(), s(out.join("../out/./a.png"))],
            "output of a.png",
        ),
        (
            vec!["--plot".into(), s(out.join("sub/b.png"))],
            "output of sub/b.jpg",
        ),
        (
            vec!["--profile".into(), s(out.join("manifest.jsonl.json"))],
            "",
        ),
        (
            vec![
                "--plot".into(),
                s(f.root.join("p.png")),
                "--profile".into(),
                s(f.root.join("p.json")),
            ],
            "--plot's numbers",
        ),
        (
            vec!["--plot".into(), s(f.input.join("a.png"))],
            "clean input a.png",
        ),
        (
            vec!["--plot".into(), s(f.input.join("new.png"))],
            "input directory",
        ),
        (
            vec!["--plot".into(), s(f.root.join("notes.png"))],
            "holds another file",
        ),
        (vec!["--plot".into(), s(dir_plot.clone())], "is a directory"),
        (
            vec!["--init".into(), format!("from:{}", s(out.join(".")))],
            "--output directory",
        ),
        (
            vec!["--resolution".into(), "8".into()],
            "smaller than one 16-pixel patch",
        ),
        (vec!["--resolution".into(), "20000".into()], "--max-pixels"),
    ];
    for (extra, needle) in &cases {
        let mut extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        extra.extend(["--steps", "1"]);
        let (o, _) = attack(&f, "out", &extra);
        if needle.is_empty() {
            // Not a clash: manifest.jsonl.json is a file of its own.
            assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
            continue;
        }
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(needle),
            "{extra:?}: lacks {needle:?}: {}",
            stderr(&o)
        );
    }
    assert_eq!(std::fs::read(out.join("run.json")).unwrap(), record);
    assert_eq!(std::fs::read(out.join("a.png")).unwrap(), image);
    for extra in [["--resolution", "8"], ["--image-size", "100000"]] {
        let o = prm(&[
            "bench",
            "--model",
            "random:tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            extra[0],
            extra[1],
        ]);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(extra[0]), "{extra:?}: {}", stderr(&o));
    }
    // --profile counts device calls: the CPU engine makes none (was a table of zeros).
    let o = prm(&[
        "bench",
        "--model",
        "random:tiny",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--profile",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--device sim"), "{}", stderr(&o));
}

/// A resume re-attacks an input whose size changed since its record (another image under the
/// same name), instead of keeping the other image's output as its own.
#[test]
fn a_resume_attacks_again_an_input_that_changed() {
    let f = fixture();
    let (o, out) = attack(&f, "out", &["--steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(manifest(&out)
        .iter()
        .all(|r| r["input_bytes"].as_u64().is_some()));
    // c.png is replaced by another image of another size under the same name.
    write_image(&f.input.join("c.png"), 50, 40, 9);
    let (o, _) = attack(&f, "out", &["--steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let records = manifest(&out);
    assert_eq!(records.len(), 4, "c.png attacked again, the others skipped");
    let last = records.last().unwrap();
    assert_eq!(
        (last["input"].as_str(), last["width"].as_u64()),
        (Some("c.png"), Some(50))
    );
    let saved = image::open(out.join("c.png")).unwrap();
    assert_eq!((saved.width(), saved.height()), (50, 40));
    // --save-float added on a resume: every image lacks its float file, and the note says so.
    let o = prm(&[
        "attack",
        "--model",
        "random:tiny",
        "--input",
        f.input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--steps",
        "1",
        "--save-float",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("3 input(s) recorded as done lack the float file"),
        "{}",
        stderr(&o)
    );
    assert!(out.join("c.safetensors").is_file());
}

/// `prm info | head -1`: a reader that goes away ends prm quietly (SIGPIPE), never with a panic
/// and a backtrace.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_prm_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = prm_command(&["info", "--json", "--model", "random:vit-b-16"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader is gone before prm has loaded the model and printed anything.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(
        o.status.success() || o.status.signal() == Some(13),
        "{:?}: {}",
        o.status,
        stderr(&o)
    );
}

#[test]
fn info_says_when_weights_are_random() {
    let o = prm(&["info", "--model", "random:vit-b-16"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("RANDOM") && text.contains("768") && text.contains("quick_gelu"),
        "{text}"
    );
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_tiny");
    let o = prm(&["info", "--model", golden.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "huggingface");
    assert_eq!(v["weights_random"], false);
    assert_eq!(v["config"]["activation"], "gelu");
    // The fingerprint run.json records, the same on every load.
    let print = v["fingerprint"].as_str().unwrap();
    assert!(
        print.starts_with("xxh3-128:") && print.len() == 41,
        "{print}"
    );
    let again = prm(&["info", "--model", golden.to_str().unwrap(), "--json"]);
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["fingerprint"], print);
}

/// `prm` with the Hugging Face cache at `cache` (and no other hub variable from the caller).
fn prm_with_hub_cache(cache: &Path, args: &[&str]) -> Output {
    prm_command(args)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .output()
        .expect("prm runs")
}

#[test]
fn models_in_the_hugging_face_cache_load_by_hub_id() {
    let f = fixture();
    // The layout `hf download` leaves: refs/main names the snapshot holding the files.
    let cache = f.root.join("hub");
    let repo = cache.join("models--someone--clip-tiny");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_tiny");
    for file in ["model.safetensors", "config.json"] {
        std::fs::copy(golden.join(file), snap.join(file)).unwrap();
    }
    let info = |spec: &str| {
        let o = prm_with_hub_cache(&cache, &["info", "--model", spec, "--json"]);
        assert!(o.status.success(), "{spec}: {}", stderr(&o));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()["fingerprint"].clone()
    };
    let direct = info(golden.to_str().unwrap());
    assert_eq!(info("someone/clip-tiny"), direct);
    assert_eq!(info("hf-hub:someone/clip-tiny"), direct);
    assert_eq!(info("someone/clip-tiny@0123"), direct);

    // An attack by hub id records the snapshot it loaded.
    let out = f.root.join("out-hub");
    let o = prm_with_hub_cache(
        &cache,
        &[
            "attack",
            "--model",
            "someone/clip-tiny",
            "--input",
            f.input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--preset",
            "pgd",
            "--steps",
            "1",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let run: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    let recorded = run["model"].as_str().unwrap();
    assert!(recorded.ends_with("snapshots/0123abcd"), "{recorded}");

    // A model not in the cache: exit 2, with the cache looked in and the command that fetches it.
    let o = prm_with_hub_cache(&cache, &["info", "--model", "openai/clip-vit-base-patch16"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("models--openai--clip-vit-base-patch16")
            && e.contains("hf download openai/clip-vit-base-patch16")
            && e.contains(cache.to_str().unwrap()),
        "{e}"
    );
}

#[test]
fn bf16_runs_on_the_gpu_engine_and_is_refused_on_the_cpu() {
    let f = fixture();
    let (o, out) = attack(&f, "cpu-bf16", &["--device", "cpu", "--precision", "bf16"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the CPU reference engine runs fp32"),
        "{}",
        stderr(&o)
    );
    assert!(!out.join("manifest.jsonl").exists());
    let (o, _) = attack(&f, "half", &["--precision", "half"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("fp32 or bf16"), "{}", stderr(&o));
    let (o, out) = attack(
        &f,
        "sim-bf16",
        &[
            "--device",
            "sim",
            "--precision",
            "bf16",
            "--preset",
            "pgd",
            "--steps",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(manifest(&out).len(), 3);
}

/// `dir/in` holding one bundled sample photo (`chelsea.png`), for attacks on a single image.
fn one_sample_input(dir: &Path) -> PathBuf {
    let input = dir.join("in");
    std::fs::create_dir(&input).unwrap();
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples");
    std::fs::copy(samples.join("chelsea.png"), input.join("chelsea.png")).unwrap();
    input
}

/// A checkpoint whose heads are not 64 wide (here hf_tiny's config saying 1 head of 128, 4 heads
/// of 32 or 8 of 16; in the wild open_clip's ViT-H/14, 16 heads of 80). Heads 128 wide: `prm
/// info` says the GPU engine runs them on v3 at bf16, and an attack on `--device sim` (the GPU
/// engine's code path) at bf16 writes its image. Heads 32 wide: the same on its SIMT attention
/// kernels. Heads 16 wide: `prm info` says the GPU engine cannot run them, an attack on `--device
/// sim` is refused before any image is written, with the way out. `--device cpu` attacks all.
#[test]
fn a_model_with_heads_not_64_wide_runs_on_the_gpu_engine_or_is_refused_with_the_way_out() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let input = one_sample_input(tmp.path());
    for heads in [1usize, 4, 8] {
        let model = tmp.path().join(format!("model{heads}"));
        std::fs::create_dir(&model).unwrap();
        std::fs::copy(
            golden.join("model.safetensors"),
            model.join("model.safetensors"),
        )
        .unwrap();
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(golden.join("config.json")).unwrap())
                .unwrap();
        config["vision_config"]["num_attention_heads"] = heads.into();
        std::fs::write(model.join("config.json"), config.to_string()).unwrap();
        let model = model.to_str().unwrap();
        let runs_on_gpu = heads != 8;
        let head_dim = 128 / heads;

        let o = prm(&["info", "--model", model]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        let expected = match heads {
            1 => {
                text.contains("gpu engine:   supported")
                    && text.contains("heads 128 wide run attention v3 on tensor cores")
            }
            4 => {
                text.contains("gpu engine:   supported")
                    && text.contains("heads 32 wide run the fp32 SIMT")
            }
            _ => text.contains("gpu engine:   not supported") && text.contains("8 heads 16 wide"),
        };
        assert!(expected, "{text}");
        let o = prm(&["info", "--model", model, "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        if runs_on_gpu {
            assert_eq!(v["gpu_engine"], "supported", "{v}");
            let attention = if heads == 1 {
                "tensor cores at bf16 (v3), simt at fp32"
            } else {
                "simt (fp32) at either precision"
            };
            assert_eq!(v["gpu_attention"], attention, "{v}");
        } else {
            let why = v["gpu_engine"].as_str().unwrap();
            assert!(why.contains("--device cpu"), "{v}");
            assert_eq!(v["gpu_attention"], "none", "{v}");
        }

        let attack = |device: &str, out: &str| {
            let out = tmp.path().join(format!("{out}{heads}"));
            let o = prm(&[
                "attack",
                "--model",
                model,
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--preset",
                "pgd",
                "--steps",
                "1",
                "--resolution",
                "32",
                "--precision",
                if device == "cpu" { "fp32" } else { "bf16" },
                "--device",
                device,
                "--quiet",
            ]);
            (o, out)
        };
        let (o, out) = attack("sim", "out_sim");
        if runs_on_gpu {
            assert!(o.status.success(), "{}", stderr(&o));
            assert!(out.join("chelsea.png").exists());
        } else {
            assert!(!o.status.success());
            let err = stderr(&o);
            assert!(
                err.contains(&format!("{head_dim} wide")) && err.contains("--device cpu"),
                "{err}"
            );
            assert!(!out.join("chelsea.png").exists(), "an image was written");
        }
        let (o, out) = attack("cpu", "out_cpu");
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(out.join("chelsea.png").exists());
    }
}

// ---------------------------------------------------------------------------------------------
// Input and verify fixes from the user-eyes audit: outputs over inputs, list files, counts in the
// log, verify's arguments and report.

fn verify_cmd(clean: &Path, adv: &Path, eps: &str) -> Output {
    prm(&[
        "verify",
        "--clean",
        clean.to_str().unwrap(),
        "--adv",
        adv.to_str().unwrap(),
        "--eps",
        eps,
    ])
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Audit #1: `--input list.txt --output <the list's directory>` with `a.png` listed would replace
/// the clean `a.png` by its adversarial version; it is refused before any work, and `verify`
/// refuses to compare the clean images with themselves.
#[test]
fn an_output_over_an_input_file_is_refused_before_any_work() {
    let f = fixture();
    let list = f.input.join("list.txt");
    std::fs::write(&list, "a.png\nsub/b.jpg\n").unwrap();
    let before = std::fs::read(f.input.join("a.png")).unwrap();
    let o = prm(&[
        "attack",
        "--model",
        "random:tiny",
        "--input",
        list.to_str().unwrap(),
        "--output",
        f.input.to_str().unwrap(),
        "--preset",
        "pgd",
        "--steps",
        "1",
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("`a.png` is the input `a.png`"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(f.input.join("a.png")).unwrap(), before);
    assert!(!f.input.join("run.json").exists());
    assert!(!f.input.join("manifest.jsonl").exists());
    assert!(!f.input.join("sub/b.png").exists());

    let v = verify_cmd(&list, &f.input, "8/255");
    assert_eq!(v.status.code(), Some(2), "{}", stderr(&v));
    assert!(
        stderr(&v).contains("--adv") && stderr(&v).contains("clean images themselves"),
        "{}",
        stderr(&v)
    );
    let v = verify_cmd(&f.input, &f.input, "8/255");
    assert_eq!(v.status.code(), Some(2), "{}", stderr(&v));
    assert!(
        stderr(&v).contains("--clean and --adv are the same directory"),
        "{}",
        stderr(&v)
    );
}

/// Audit #13: `--output` equal to `--input` is named as such (exit 2), not "no input images".
#[test]
fn an_output_equal_to_the_input_is_a_usage_error() {
    let f = fixture();
    let o = prm(&[
        "attack",
        "--model",
        "random:tiny",
        "--input",
        f.input.to_str().unwrap(),
        "--output",
        f.input.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("the output directory is the input directory") && !err.contains("no input"),
        "{err}"
    );
    assert!(!f.input.join("run.json").exists());
}

/// An `--output` that is a file is named as such (exit 2) before the model is loaded, not as
/// "cannot create … File exists".
#[test]
fn an_output_that_is_a_file_is_a_usage_error() {
    let f = fixture();
    let file = f.root.join("not-a-directory");
    std::fs::write(&file, b"kept").unwrap();
    // Checked before the model is read: a model that does not exist is not what is reported.
    let model = f.root.join("no-such-model.safetensors");
    let o = prm(&[
        "attack",
        "--model",
        model.to_str().unwrap(),
        "--input",
        f.input.to_str().unwrap(),
        "--output",
        file.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("a file of that name exists); give a directory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"kept");
}

/// Audit #5: `verify --eps 8` (a forgotten /255) or `--eps 0` is refused like the attack's.
#[test]
fn verify_refuses_an_eps_outside_0_1() {
    let f = fixture();
    let (o, out) = attack(&f, "out", &["--preset", "pgd", "--steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for eps in ["8", "0", "1.5"] {
        let v = verify_cmd(&f.input, &out, eps);
        assert_eq!(v.status.code(), Some(2), "--eps {eps}: {}", stdout(&v));
        assert!(
            stderr(&v).contains("outside (0, 1]") && stderr(&v).contains("8/255"),
            "{}",
            stderr(&v)
        );
        assert!(stdout(&v).is_empty(), "{}", stdout(&v));
    }
    assert!(verify_cmd(&f.input, &out, "1").status.success());
}

/// Audit #14 and #26: an ε excess is reported once per image, as the file's; a corrupt
/// `run.json` gets a note; nothing measured is not printed as "max L∞ 0.000/255".
#[test]
fn verify_reports_each_excess_once_and_notes_a_corrupt_run_record() {
    let f = fixture();
    let (o, out) = attack(&f, "out", &["--preset", "pgd", "--steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = verify_cmd(&f.input, &out, "4/255");
    assert_eq!(v.status.code(), Some(1));
    let text = stdout(&v);
    assert_eq!(text.matches("VIOLATION").count(), 3, "{text}");
    assert!(!text.contains("disagrees"), "{text}");

    std::fs::write(out.join("run.json"), "{broken").unwrap();
    let v = verify_cmd(&f.input, &out, "8/255");
    assert!(v.status.success(), "{}", stdout(&v));
    assert!(
        stderr(&v).contains("run.json: not a run record")
            && stderr(&v).contains("ε was not compared"),
        "{}",
        stderr(&v)
    );

    let clean = f.root.join("one");
    let adv = f.root.join("one_adv");
    write_image(&clean.join("x.png"), 20, 20, 1);
    write_image(&adv.join("x.png"), 20, 19, 1);
    let v = verify_cmd(&clean, &adv, "8/255");
    assert_eq!(v.status.code(), Some(1));
    assert!(
        stdout(&v).contains("L∞ not measured") && !stdout(&v).contains("max L∞"),
        "{}",
        stdout(&v)
    );
}

/// Audit #21: a single image as `--clean` or `--input` says so and names what to give, with no
/// "line 0" and, for verify, the right flag.
#[test]
fn a_single_image_as_input_says_what_to_give_instead() {
    let f = fixture();
    let (o, out) = attack(&f, "out", &["--preset", "pgd", "--steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = f.input.join("a.png");
    let v = verify_cmd(&img, &out, "8/255");
    assert_eq!(v.status.code(), Some(2));
    let err = stderr(&v);
    assert!(
        err.contains("--clean")
            && !err.contains("--input")
            && err.contains("single image")
            && !err.contains(":0:"),
        "{err}"
    );
    let o = prm(&[
        "attack",
        "--model",
        "random:tiny",
        "--input",
        img.to_str().unwrap(),
        "--output",
        f.root.join("single").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("single image") && stderr(&o).contains("one image path per line"),
        "{}",
        stderr(&o)
    );
    assert!(!f.root.join("single").exists());
}

/// Audit #9 and #22: a list file with a byte-order mark, CRLF lines and a path listed twice
/// runs: the BOM is not part of the first path, the repeat is processed once with a warning.
#[test]
fn a_list_file_with_a_bom_and_a_repeated_path_runs_each_image_once() {
    let f = fixture();
    let list = f.root.join("bom.txt");
    std::fs::write(&list, b"\xef\xbb\xbfin/a.png\r\nin/c.png\r\n./in/a.png\r\n").unwrap();
    let out = f.root.join("outb");
    let o = prm(&[
        "attack",
        "--model",
        "random:tiny",
        "--input",
        list.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--preset",
        "pgd",
        "--steps",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: ") && stderr(&o).contains("on line 3 repeats line 1"),
        "{}",
        stderr(&o)
    );
    let records = manifest(&out);
    let inputs: Vec<&str> = records
        .iter()
        .map(|r| r["input"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, vec!["in/a.png", "in/c.png"]);
    assert!(records.iter().all(|r| r["status"] == "ok"));
    let v = verify_cmd(&list, &out, "8/255");
    assert!(v.status.success(), "{}{}", stdout(&v), stderr(&v));
}

/// Audit #12: the log's "excluded" count covers images in an excluded directory, and a hidden
/// image is not called a non-image file.
#[test]
fn the_log_counts_excluded_directories_and_not_hidden_files() {
    let f = fixture();
    write_image(&f.input.join("raw/deep/r.png"), 20, 20, 4);
    write_image(&f.input.join(".hidden.png"), 20, 20, 5);
    let (o, _) = attack(
        &f,
        "out",
        &["--preset", "pgd", "--steps", "1", "--exclude", "raw"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // `attack` passes --quiet; run again without it for the log.
    let out = f.root.join("out2");
    let o = prm(&[
        "attack",
        "--model",
        "random:tiny",
        "--input",
        f.input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--preset",
        "pgd",
        "--steps",
        "1",
        "--exclude",
        "raw",
        "--exclude",
        "*.jpg",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("excluded 2 image(s)"),
        "raw/deep/r.png and sub/b.jpg: {err}"
    );
    assert!(!err.contains("non-image"), "{err}");
    assert_eq!(manifest(&out).len(), 2, "a.png and c.png");
}

/// A SigLIP checkpoint (tests/golden/siglip_tiny): `prm info` says what it is, an attack runs on
/// the CPU and on `--device sim` (the GPU engine's code path), with the prm loss and with
/// `--loss embed` through its attention-pooling head, and `prm classes` refuses its text tower.
#[test]
fn a_siglip_checkpoint_is_described_and_attacked() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/siglip_tiny");
    let o = prm(&["info", "--model", golden.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for part in ["no class token", "gelu_tanh", "attention head", "16 tokens"] {
        assert!(text.contains(part), "{part:?} not in {text}");
    }
    let o = prm(&["info", "--model", golden.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["class_token"], false);
    assert_eq!(v["tokens_at_native_size"], 16);
    assert_eq!(v["config"]["pooling"], "attention_head");

    let tmp = tempfile::tempdir().unwrap();
    let input = one_sample_input(tmp.path());
    // The prm loss, and --loss embed through SigLIP's attention-pooling head: each runs on both
    // engines with the same first loss (the GPU engine forms the head on the host from F_L).
    let mut first_loss = Vec::new();
    for loss in ["prm", "embed"] {
        for device in ["cpu", "sim"] {
            let out = tmp.path().join(format!("{loss}-{device}"));
            let o = prm(&[
                "attack",
                "--model",
                golden.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--loss",
                loss,
                "--preset",
                "pgd",
                "--steps",
                "2",
                "--resolution",
                "64",
                "--device",
                device,
            ]);
            assert!(o.status.success(), "{loss} {device}: {}", stderr(&o));
            assert!(out.join("chelsea.png").exists(), "{loss} {device}");
            let record = &manifest(&out)[0];
            assert_eq!(record["status"], "ok", "{loss} {device}: {record}");
            let (initial, last) = (
                record["loss_initial"].as_f64().unwrap(),
                record["loss_final"].as_f64().unwrap(),
            );
            assert!(last < initial, "{loss} {device}: {record}");
            if loss == "embed" {
                assert!(initial < 1.0, "{device}: {record}");
                first_loss.push(initial);
            }
        }
    }
    assert!(
        (first_loss[0] - first_loss[1]).abs() < 1e-5,
        "cpu and sim: {first_loss:?}"
    );
    // eval's zeroshot target reads the same embedding, against class embeddings made elsewhere
    // (SigLIP's text tower is not built): the clean image against its embed-attacked copy.
    let classes = tmp.path().join("siglip-classes.safetensors");
    let dim = 128;
    prm::eval::text::write_class_safetensors(
        &classes,
        &prm::eval::text::ClassEmbeddings {
            names: vec!["cat".into(), "dog".into(), "car".into()],
            embeddings: (0..3 * dim).map(|i| (i as f32 * 0.37).sin()).collect(),
            dim,
            source: "test".into(),
            text_weights: None,
            text_weights_match: None,
        },
    )
    .unwrap();
    let mut agreement = Vec::new();
    for device in ["cpu", "sim"] {
        let report = tmp.path().join(format!("zeroshot-{device}.json"));
        let o = prm(&[
            "eval",
            "-q",
            "--model",
            golden.to_str().unwrap(),
            "--target",
            "zeroshot",
            "--clean",
            input.to_str().unwrap(),
            "--adv",
            tmp.path().join("embed-cpu").to_str().unwrap(),
            "--classes",
            classes.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
            "--device",
            device,
        ]);
        assert!(o.status.success(), "{device}: {}", stderr(&o));
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(r["images"], 1, "{device}: {r}");
        agreement.push(r["top1_agreement"].clone());
    }
    assert_eq!(agreement[0], agreement[1], "cpu and sim");
    // The dense targets project every patch with CLIP's projection, which SigLIP has not.
    let o = prm(&[
        "eval",
        "--model",
        golden.to_str().unwrap(),
        "--target",
        "maskclip",
        "--clean",
        input.to_str().unwrap(),
        "--adv",
        tmp.path().join("embed-cpu").to_str().unwrap(),
        "--classes",
        classes.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("attention head"), "{}", stderr(&o));
    // Its text tower is SigLIP's, not CLIP's: `prm classes` says so.
    let names = tmp.path().join("names.txt");
    std::fs::write(&names, "cat\ndog\n").unwrap();
    let classes = tmp.path().join("classes.safetensors");
    let o = prm(&[
        "classes",
        "--model",
        golden.to_str().unwrap(),
        "--names",
        names.to_str().unwrap(),
        "--output",
        classes.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("SigLIP's"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("tools/class_embeddings.py"),
        "{}",
        stderr(&o)
    );
    assert!(!classes.exists());
}
