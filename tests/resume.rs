//! Resume, crash safety and signal handling of `prm attack` on the built-in tiny model: a re-run
//! skips what is done and rewrites nothing, redoes what is missing or failed, and a `kill -9`
//! or SIGTERM mid-run followed by a re-run ends with every image done exactly once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

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

struct Fixture {
    _tmp: tempfile::TempDir,
    input: PathBuf,
    out: PathBuf,
}

/// `n` images of `w`×`h`, two of every three in a subdirectory.
fn fixture(n: u32, w: u32, h: u32) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..n {
        let rel = if i % 3 == 0 {
            format!("img{i:03}.png")
        } else {
            format!("sub{}/img{i:03}.png", i % 3)
        };
        write_image(&input.join(rel), w + i % 5, h + i % 7, i);
    }
    let out = tmp.path().join("out");
    Fixture {
        _tmp: tmp,
        input,
        out,
    }
}

fn command(f: &Fixture, steps: &str) -> Command {
    let mut c = loud_command(f, steps);
    c.arg("--quiet");
    c
}

/// [`command`] without `--quiet`: the summary is printed.
fn loud_command(f: &Fixture, steps: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prm"));
    c.args(["attack", "--model", "random:tiny", "--input"])
        .arg(&f.input)
        .arg("--output")
        .arg(&f.out)
        .args(["--preset", "pgd", "--steps", steps]);
    c
}

fn attack(f: &Fixture) -> Output {
    command(f, "2").output().expect("prm runs")
}

fn manifest_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn manifest(dir: &Path) -> Vec<Value> {
    manifest_lines(dir)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_manifest(dir: &Path, records: &[Value]) {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("manifest.jsonl"), text).unwrap();
}

/// Every file under `dir`, relative, with its modification time.
fn tree(dir: &Path) -> HashMap<PathBuf, SystemTime> {
    let mut files = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().to_path_buf();
                files.insert(rel, e.metadata().unwrap().modified().unwrap());
            }
        }
    }
    files
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    tree(dir)
        .into_keys()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect()
}

fn inputs(f: &Fixture) -> Vec<String> {
    let mut v: Vec<String> = tree(&f.input)
        .into_keys()
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .collect();
    v.sort();
    v
}

/// A finished output: exactly one `ok` record per input and no other record, every PNG decodes,
/// has the input's size and is within 8/255 of it, and no temporary file is left.
fn assert_complete(f: &Fixture) {
    let records = manifest(&f.out);
    let inputs = inputs(f);
    let mut seen: Vec<String> = records
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "ok", "{r}");
            r["input"].as_str().unwrap().to_string()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, inputs, "every input exactly once");
    for r in &records {
        let clean = image::open(f.input.join(r["input"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let adv = image::open(f.out.join(r["output"].as_str().unwrap()))
            .expect("output decodes")
            .to_rgb8();
        assert_eq!(clean.dimensions(), adv.dimensions());
        let diff = clean
            .as_raw()
            .iter()
            .zip(adv.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(diff <= 8, "{r}: L∞ {diff}/255");
    }
    assert_eq!(temporaries(&f.out), Vec::<PathBuf>::new());
}

/// Waits until the manifest has at least `lines` complete lines (the child is then past its
/// set-up, signal handlers included), or panics after a minute.
fn wait_for_lines(child: &mut Child, out: &Path, lines: usize) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(out.join("manifest.jsonl")).unwrap_or_default();
        if text.matches('\n').count() >= lines {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("prm exited early with {status}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_resume_after_a_complete_run_rewrites_nothing() {
    let f = fixture(5, 40, 36);
    let o = attack(&f);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_complete(&f);
    let before = tree(&f.out);
    let lines = manifest_lines(&f.out);
    // Make a rewrite visible even on file systems with coarse timestamps.
    std::thread::sleep(Duration::from_millis(1100));
    let o = attack(&f);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(tree(&f.out), before, "files or their mtimes changed");
    assert_eq!(manifest_lines(&f.out), lines);
    // Without --quiet the summary says what was skipped.
    let o = loud_command(&f, "2").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("5 skipped"), "{}", stderr(&o));
}

/// `run.json` records what the run that made the directory does; a re-run that would do
/// something else (another ε, more steps) is refused before any work, and one that only runs
/// differently (saves floats as well, another batch size) resumes.
#[test]
fn a_resume_with_other_settings_is_refused_before_any_work() {
    let f = fixture(4, 40, 36);
    let o = attack(&f);
    assert!(o.status.success(), "{}", stderr(&o));
    let record: Value =
        serde_json::from_slice(&std::fs::read(f.out.join("run.json")).unwrap()).unwrap();
    assert_eq!(record["model"], "random:tiny");
    assert_eq!(record["settings"]["steps"], 2);
    assert_eq!(record["settings"]["optimizer"], "pgd");
    let before = tree(&f.out);
    let lines = manifest_lines(&f.out);
    std::thread::sleep(Duration::from_millis(1100));
    for (steps, extra, says) in [
        ("2", &["--eps", "4/255"][..], "settings.eps: there 0.0313"),
        ("3", &[][..], "settings.steps: there 2, here 3"),
        (
            "2",
            &["--loss", "nrd"][..],
            "settings.loss: there \"prm\", here \"nrd\"",
        ),
    ] {
        let o = command(&f, steps).args(extra).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(says) && e.contains("another --output"), "{e}");
        assert_eq!(
            tree(&f.out),
            before,
            "{extra:?}: files or their mtimes changed"
        );
        assert_eq!(manifest_lines(&f.out), lines);
    }
    // The same attack, run otherwise: it resumes (and redoes nothing).
    let o = command(&f, "2")
        .args(["--batch-size", "3", "--device", "cpu"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(manifest_lines(&f.out), lines);
}

/// `run.json` holds the fingerprint of the weights as well as where they came from: the same
/// checkpoint moved to another directory resumes, other weights at the same path are refused.
#[test]
fn a_moved_checkpoint_resumes_and_changed_weights_are_refused() {
    let f = fixture(3, 40, 36);
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/eval/clip_tiny");
    let (first, moved) = (f.out.with_file_name("ckpt"), f.out.with_file_name("moved"));
    std::fs::create_dir_all(&first).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(golden.join(name), first.join(name)).unwrap();
    }
    let run = |model: &Path| {
        Command::new(env!("CARGO_BIN_EXE_prm"))
            .args(["attack", "--model"])
            .arg(model)
            .arg("--input")
            .arg(&f.input)
            .arg("--output")
            .arg(&f.out)
            .args(["--preset", "pgd", "--steps", "1", "--quiet"])
            .output()
            .unwrap()
    };
    let o = run(&first);
    assert!(o.status.success(), "{}", stderr(&o));
    let record: Value =
        serde_json::from_slice(&std::fs::read(f.out.join("run.json")).unwrap()).unwrap();
    let weights = record["weights"].as_str().unwrap().to_string();
    assert!(weights.starts_with("xxh3-128:"), "{record}");
    let lines = manifest_lines(&f.out);
    std::fs::rename(&first, &moved).unwrap();
    let o = run(&moved);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        manifest_lines(&f.out),
        lines,
        "the moved checkpoint redid work"
    );
    // One vision weight's last bit changed, in place.
    let file = moved.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = header["vision_model.post_layernorm.weight"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    bytes[8 + header_len + start] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let o = run(&moved);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(&format!("weights: there \"{weights}\"")), "{e}");
    assert_eq!(manifest_lines(&f.out), lines);
}

#[test]
fn a_deleted_output_is_redone_and_nothing_else() {
    let f = fixture(5, 40, 36);
    let o = attack(&f);
    assert!(o.status.success(), "{}", stderr(&o));
    let target = "sub1/img001.png";
    std::fs::remove_file(f.out.join(target)).unwrap();
    let kept: Vec<Value> = manifest(&f.out)
        .into_iter()
        .filter(|r| r["input"] != target)
        .collect();
    write_manifest(&f.out, &kept);
    let before = tree(&f.out);
    std::thread::sleep(Duration::from_millis(1100));
    let o = attack(&f);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_complete(&f);
    let after = tree(&f.out);
    for (path, mtime) in &before {
        if path.as_path() != Path::new("manifest.jsonl") {
            assert_eq!(
                after.get(path),
                Some(mtime),
                "{} was rewritten",
                path.display()
            );
        }
    }
    assert!(after.contains_key(Path::new(target)));
    let records = manifest(&f.out);
    assert_eq!(records.len(), 5);
    assert_eq!(records.last().unwrap()["input"], target);

    // An output file that is missing although its record says ok is redone too.
    std::fs::remove_file(f.out.join("img000.png")).unwrap();
    let o = attack(&f);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(f.out.join("img000.png").is_file());
    let records = manifest(&f.out);
    assert_eq!(records.len(), 6);
    assert_eq!(records.last().unwrap()["input"], "img000.png");
}

#[test]
fn an_error_record_is_retried() {
    let f = fixture(3, 40, 36);
    // A first run where one input is broken: it fails, the run exits 1.
    let good = std::fs::read(f.input.join("sub2/img002.png")).unwrap();
    std::fs::write(
        f.input.join("sub2/img002.png"),
        b"\x89PNG\r\n\x1a\ntruncated",
    )
    .unwrap();
    let o = attack(&f);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let records = manifest(&f.out);
    assert_eq!(records.len(), 3);
    let failed: Vec<_> = records.iter().filter(|r| r["status"] == "error").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["input"], "sub2/img002.png");
    // Repaired, the re-run retries only that input and exits 0.
    std::fs::write(f.input.join("sub2/img002.png"), good).unwrap();
    let o = attack(&f);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let records = manifest(&f.out);
    assert_eq!(records.len(), 4);
    let last = records.last().unwrap();
    assert_eq!(last["input"], "sub2/img002.png");
    assert_eq!(last["status"], "ok");
    assert!(f.out.join("sub2/img002.png").is_file());
    // Still broken, a re-run retries it again and exits 1.
    std::fs::write(f.input.join("img000.png"), b"not an image").unwrap();
    std::fs::remove_file(f.out.join("img000.png")).unwrap();
    let o = attack(&f);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = attack(&f);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let records = manifest(&f.out);
    assert_eq!(records.len(), 6);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["input"] == "img000.png")
            .count(),
        3
    );
}

#[test]
fn kill_9_mid_run_then_resume_ends_with_every_image_done_once() {
    let f = fixture(60, 64, 56);
    let mut child = command(&f, "12")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as two records are out: a fixed delay let a fast machine (16 cores) finish
    // all 60 images before the kill.
    wait_for_lines(&mut child, &f.out, 2);
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = manifest_lines(&f.out).len();
    assert!(partial < 60, "the run finished before it was killed");
    // Every ok record written before the kill has its file.
    for r in manifest(&f.out) {
        assert!(f.out.join(r["output"].as_str().unwrap()).is_file());
    }
    let o = command(&f, "12").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_complete(&f);
}

#[test]
fn a_crash_mid_line_leaves_a_partial_record_that_the_resume_tolerates() {
    let f = fixture(3, 40, 36);
    let o = attack(&f);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut lines = manifest_lines(&f.out);
    let last = lines.pop().unwrap();
    let rel = serde_json::from_str::<Value>(&last).unwrap()["input"]
        .as_str()
        .unwrap()
        .to_string();
    let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    text.push_str(&last[..last.len() / 2]);
    std::fs::write(f.out.join("manifest.jsonl"), text).unwrap();
    // A temporary file left by a killed writer is cleaned up by the completed re-run.
    std::fs::write(f.out.join(".img000.png.abc123.tmp"), b"partial").unwrap();
    let o = attack(&f);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_complete(&f);
    assert_eq!(manifest(&f.out).last().unwrap()["input"], rel.as_str());
}

#[test]
fn sigterm_stops_cleanly_with_143_and_a_consistent_output() {
    let f = fixture(60, 64, 56);
    let mut child = command(&f, "12")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_lines(&mut child, &f.out, 1);
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status}");
    let records = manifest(&f.out);
    assert!(records.len() < 60, "the run did not stop early");
    for r in &records {
        assert_eq!(r["status"], "ok");
        assert!(f.out.join(r["output"].as_str().unwrap()).is_file());
    }
    assert_eq!(temporaries(&f.out), Vec::<PathBuf>::new());
    // Only recorded images have files: nothing half-done was written.
    let pngs = tree(&f.out)
        .into_keys()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .count();
    assert_eq!(pngs, records.len());
    let o = command(&f, "12").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_complete(&f);
}

#[test]
fn sigint_exits_130() {
    let f = fixture(60, 64, 56);
    let mut child = command(&f, "12")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_lines(&mut child, &f.out, 1);
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(child.wait().unwrap().code(), Some(130));
    for r in manifest(&f.out) {
        assert!(f.out.join(r["output"].as_str().unwrap()).is_file());
    }
}
