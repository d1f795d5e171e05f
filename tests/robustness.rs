//! The robustness suite of `prm attack` / `prm verify` on the built-in tiny model, run against the
//! binary exactly as documented: a mixed directory of valid-but-awkward and broken images
//! (generated here), `--max-pixels`, `--exclude`, unwritable outputs, every exit code (0, 1, 2;
//! 130/143 are in `tests/resume.rs`), three shards against one unsharded run, `verify` catching
//! planted violations, and WebDataset tar shards (tar and tree layouts, resume, `kill -9`).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use serde_json::Value;

use crate::common::png::raw_png;

fn prm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prm"))
        .args(args)
        .output()
        .expect("prm runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `prm attack` on random:tiny, 1 PGD step on the CPU, plus `extra`.
fn attack(input: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "attack",
        "--model",
        "random:tiny",
        "--input",
        input,
        "--output",
        s(out),
        "--preset",
        "pgd",
        "--steps",
        "1",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    prm(&args)
}

fn verify(clean: &str, adv: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "verify",
        "--clean",
        clean,
        "--adv",
        s(adv),
        "--eps",
        "8/255",
    ];
    args.extend_from_slice(extra);
    prm(&args)
}

fn manifest(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Latest record per input.
fn records(dir: &Path) -> BTreeMap<String, Value> {
    manifest(dir)
        .into_iter()
        .map(|r| (r["input"].as_str().unwrap().to_string(), r))
        .collect()
}

fn rgb_pixels(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity((3 * w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            for k in 0..3 {
                v.push(((x * (3 + k + seed) + y * (5 + 2 * k) + seed * 17) % 251) as u8);
            }
        }
    }
    v
}

fn write_png(path: &Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_raw(w, h, rgb_pixels(w, h, seed))
        .unwrap()
        .save(path)
        .unwrap();
}

fn png_bytes(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_raw(w, h, rgb_pixels(w, h, seed))
        .unwrap()
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// A TIFF block holding one IFD entry: Orientation = `o`.
fn exif_orientation(o: u16) -> Vec<u8> {
    let mut exif = b"II*\0".to_vec();
    exif.extend_from_slice(&8u32.to_le_bytes());
    exif.extend_from_slice(&1u16.to_le_bytes());
    exif.extend_from_slice(&0x0112u16.to_le_bytes());
    exif.extend_from_slice(&3u16.to_le_bytes());
    exif.extend_from_slice(&1u32.to_le_bytes());
    exif.extend_from_slice(&o.to_le_bytes());
    exif.extend_from_slice(&[0, 0]);
    exif.extend_from_slice(&0u32.to_le_bytes());
    exif
}

/// The valid-but-awkward inputs: (relative path, decoded width, decoded height).
fn write_awkward(dir: &Path) -> Vec<(&'static str, u32, u32)> {
    std::fs::create_dir_all(dir).unwrap();
    // Grayscale, gray + alpha, RGBA.
    image::GrayImage::from_fn(33, 20, |x, y| image::Luma([(x * 7 + y * 3) as u8]))
        .save(dir.join("gray.png"))
        .unwrap();
    image::GrayAlphaImage::from_fn(20, 20, |x, y| image::LumaA([(x * 9) as u8, (y * 12) as u8]))
        .save(dir.join("gray_alpha.png"))
        .unwrap();
    image::RgbaImage::from_fn(24, 17, |x, y| {
        image::Rgba([(x * 10) as u8, (y * 14) as u8, 90, (x * y) as u8])
    })
    .save(dir.join("alpha.png"))
    .unwrap();
    // 16-bit RGB.
    image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(18, 21, |x, y| {
        image::Rgb([(x * 3000) as u16, (y * 2500) as u16, 40000])
    })
    .save(dir.join("deep16.png"))
    .unwrap();
    // Palette (colour type 3) with transparency.
    let plte: Vec<u8> = (0..16u8)
        .flat_map(|i| [i * 16, 255 - i * 16, i * 8])
        .collect();
    let rows: Vec<Vec<u8>> = (0..19u32)
        .map(|y| (0..22u32).map(|x| ((x + y) % 16) as u8).collect())
        .collect();
    let trns: Vec<u8> = (0..16u8).map(|i| 255 - i).collect();
    std::fs::write(
        dir.join("palette.png"),
        raw_png(22, 19, 8, 3, &[(b"PLTE", plte), (b"tRNS", trns)], &rows),
    )
    .unwrap();
    // CMYK JPEG.
    let cmyk: Vec<u8> = (0..20u32 * 26)
        .flat_map(|i| [(i % 200) as u8, (i * 3 % 256) as u8, 40, 10])
        .collect();
    let mut buf = Vec::new();
    jpeg_encoder::Encoder::new(&mut buf, 90)
        .encode(&cmyk, 26, 20, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    std::fs::write(dir.join("cmyk.jpg"), buf).unwrap();
    // EXIF orientation 6 (rotate 90° clockwise): stored 30x18, seen 18x30. One JPEG, one PNG.
    let mut buf = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut buf, 90);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&exif_orientation(6));
    enc.add_app_segment(1, &app1).unwrap();
    enc.encode(&rgb_pixels(30, 18, 3), 30, 18, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    std::fs::write(dir.join("rotated.jpg"), buf).unwrap();
    let rows: Vec<Vec<u8>> = rgb_pixels(20, 17, 4)
        .chunks(60)
        .map(|r| r.to_vec())
        .collect();
    std::fs::write(dir.join("sub/rotated.png"), {
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        raw_png(20, 17, 8, 2, &[(b"eXIf", exif_orientation(8))], &rows)
    })
    .unwrap();
    // Other decoders: BMP, TIFF, WebP (lossless).
    image::RgbImage::from_raw(17, 23, rgb_pixels(17, 23, 5))
        .unwrap()
        .save(dir.join("plain_bmp.bmp"))
        .unwrap();
    image::RgbImage::from_raw(19, 16, rgb_pixels(19, 16, 6))
        .unwrap()
        .save(dir.join("plain_tiff.tiff"))
        .unwrap();
    image::RgbImage::from_raw(16, 18, rgb_pixels(16, 18, 7))
        .unwrap()
        .save(dir.join("plain_webp.webp"))
        .unwrap();
    vec![
        ("alpha.png", 24, 17),
        ("cmyk.jpg", 26, 20),
        ("deep16.png", 18, 21),
        ("gray.png", 33, 20),
        ("gray_alpha.png", 20, 20),
        ("palette.png", 22, 19),
        ("plain_bmp.bmp", 17, 23),
        ("plain_tiff.tiff", 19, 16),
        ("plain_webp.webp", 16, 18),
        ("rotated.jpg", 18, 30),
        ("sub/rotated.png", 17, 20),
    ]
}

/// A PNG header announcing `w`×`h` followed by a tiny (wrong) IDAT: a decompression bomb's
/// header, without the bomb.
fn bomb_header(w: u32, h: u32) -> Vec<u8> {
    raw_png(w, h, 8, 2, &[], &[vec![0, 0, 0]])
}

/// The broken inputs: (relative path, a word the error must contain).
fn write_broken(dir: &Path) -> Vec<(&'static str, &'static str)> {
    std::fs::create_dir_all(dir.join("bad")).unwrap();
    let good = png_bytes(40, 40, 9);
    std::fs::write(dir.join("bad/truncated.png"), &good[..good.len() / 2]).unwrap();
    let mut jpg = Vec::new();
    jpeg_encoder::Encoder::new(&mut jpg, 90)
        .encode(&rgb_pixels(40, 40, 2), 40, 40, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    std::fs::write(dir.join("bad/truncated_jpeg.jpg"), &jpg[..jpg.len() / 3]).unwrap();
    std::fs::write(dir.join("bad/empty.jpg"), b"").unwrap();
    std::fs::write(
        dir.join("bad/text.png"),
        b"this is not an image, it is text\n",
    )
    .unwrap();
    std::fs::write(dir.join("bad/bomb.png"), bomb_header(60000, 60000)).unwrap();
    write_png(&dir.join("bad/tiny.png"), 8, 40, 1);
    // The JPEG decoder panics on this one (a fuzz finding): a per-image error all the same.
    std::fs::write(
        dir.join("bad/decoder_panic.jpg"),
        include_bytes!("data/jpeg_decoder_panic.jpg"),
    )
    .unwrap();
    vec![
        ("bad/decoder_panic.jpg", "decoder failed"),
        ("bad/bomb.png", "60000x60000"),
        ("bad/empty.jpg", "empty.jpg"),
        ("bad/text.png", "not an image"),
        ("bad/tiny.png", "patch"),
        ("bad/truncated_jpeg.jpg", "truncated_jpeg.jpg"),
        ("bad/truncated.png", "truncated.png"),
    ]
}

#[test]
fn a_mixed_directory_of_awkward_and_broken_images() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let awkward = write_awkward(&input);
    let broken = write_broken(&input);
    // Not images: ignored with a count.
    std::fs::write(input.join("README.txt"), b"notes").unwrap();
    std::fs::write(input.join("sub/labels.json"), b"{}").unwrap();
    let out = tmp.path().join("out");
    let o = attack(s(&input), &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // The decoder's panic is the file's error, not a panic message on the terminal.
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("ignored 2 non-image file(s)"),
        "{}",
        stderr(&o)
    );
    let recs = records(&out);
    assert_eq!(recs.len(), awkward.len() + broken.len(), "{recs:?}");
    assert_eq!(manifest(&out).len(), recs.len(), "one line per input");
    for (rel, w, h) in &awkward {
        let r = &recs[*rel];
        assert_eq!(r["status"], "ok", "{rel}: {r}");
        assert_eq!(
            (r["width"].as_u64(), r["height"].as_u64()),
            (Some(*w as u64), Some(*h as u64)),
            "{rel}"
        );
        let png = out.join(r["output"].as_str().unwrap());
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), (*w, *h), "{rel}");
        assert_eq!(img.color(), image::ColorType::Rgb8, "{rel}");
    }
    for (rel, needle) in &broken {
        let r = &recs[*rel];
        assert_eq!(r["status"], "error", "{rel}: {r}");
        let msg = r["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{rel}: '{msg}' lacks '{needle}'");
        assert!(r["output"].is_null());
    }
    assert!(recs["bad/bomb.png"]["error"]
        .as_str()
        .unwrap()
        .contains("more than the limit of 40000000"));
    // verify lists exactly the broken inputs (their outputs are missing or their clean image
    // is unreadable) and exits 1.
    let v = verify(s(&input), &out, &[]);
    assert_eq!(v.status.code(), Some(1), "{}", stdout(&v));
    let text = stdout(&v);
    for (rel, _) in &broken {
        assert!(text.contains(&format!("VIOLATION {rel}:")), "{rel}: {text}");
    }
    for (rel, _, _) in &awkward {
        assert!(
            !text.contains(&format!("VIOLATION {rel}:")),
            "{rel}: {text}"
        );
    }
    // Excluding the broken ones makes both the run and verify clean.
    let out2 = tmp.path().join("out2");
    let o = attack(s(&input), &out2, &["--exclude", "bad/**"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("excluded {} image(s)", broken.len())),
        "{}",
        stderr(&o)
    );
    assert_eq!(records(&out2).len(), awkward.len());
    let v = verify(s(&input), &out2, &["--exclude", "bad/**"]);
    assert_eq!(v.status.code(), Some(0), "{}", stdout(&v));
    // So does manifest merge: excluded inputs are not missing.
    let merged = tmp.path().join("merged.jsonl");
    let m2 = out2.join("manifest.jsonl");
    let o = prm(&[
        "manifest",
        "merge",
        "--input",
        s(&input),
        "--output",
        s(&merged),
        s(&m2),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("MISSING bad/bomb.png"),
        "{}",
        stdout(&o)
    );
    let o = prm(&[
        "manifest",
        "merge",
        "--input",
        s(&input),
        "--exclude",
        "bad/**",
        "--output",
        s(&merged),
        s(&m2),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
}

#[test]
fn max_pixels_is_a_per_image_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write_png(&input.join("small.png"), 32, 32, 1); // 1024 pixels
    write_png(&input.join("large.png"), 48, 40, 2); // 1920 pixels
    let out = tmp.path().join("out");
    let o = attack(s(&input), &out, &["--max-pixels", "1500"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let recs = records(&out);
    assert_eq!(recs["small.png"]["status"], "ok");
    assert_eq!(recs["large.png"]["status"], "error");
    assert!(recs["large.png"]["error"]
        .as_str()
        .unwrap()
        .contains("48x40 = 1920 pixels, more than the limit of 1500"));
    // A re-run with a larger budget finishes the job.
    let o = attack(s(&input), &out, &["--max-pixels", "2000"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(records(&out)["large.png"]["status"], "ok");
    let o = attack(s(&input), &out, &["--max-pixels", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn every_exit_code_of_attack() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write_png(&input.join("a.png"), 32, 32, 1);
    write_png(&input.join("b/c.png"), 40, 24, 2);
    // 0: every image succeeded.
    let o = attack(s(&input), &tmp.path().join("ok"), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // 0 again on a resume (skipped images count as succeeded).
    let o = attack(s(&input), &tmp.path().join("ok"), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // 1: some images failed.
    std::fs::write(input.join("broken.jpg"), b"\xff\xd8\xff\xe0 cut").unwrap();
    let o = attack(s(&input), &tmp.path().join("some"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    std::fs::remove_file(input.join("broken.jpg")).unwrap();

    // 2: usage, model and configuration errors, each before any output is written.
    let truncated = tmp.path().join("truncated.safetensors");
    std::fs::write(&truncated, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{', b'"']).unwrap();
    let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_tiny/model.safetensors");
    let bytes = std::fs::read(&hf).unwrap();
    let cut = tmp.path().join("cut/model.safetensors");
    std::fs::create_dir_all(cut.parent().unwrap()).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let empty_dir = tmp.path().join("empty-model-dir");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let collide = tmp.path().join("collide");
    write_png(&collide.join("x.png"), 32, 32, 3);
    write_png(&collide.join("x.jpg"), 32, 32, 4);
    let missing = tmp.path().join("no-such-dir");
    let model_cases: Vec<(String, &str)> = vec![
        (
            s(&tmp.path().join("no-such-model")).to_string(),
            "no-such-model",
        ),
        (s(&truncated).to_string(), "truncated"),
        (s(&cut).to_string(), "truncated"),
        (s(&empty_dir).to_string(), "safetensors"),
        ("random:huge".to_string(), "huge"),
    ];
    for (i, (model, needle)) in model_cases.iter().enumerate() {
        let out = tmp.path().join(format!("m{i}"));
        let o = prm(&[
            "attack",
            "--model",
            model,
            "--input",
            s(&input),
            "--output",
            s(&out),
            "--steps",
            "1",
        ]);
        assert_eq!(o.status.code(), Some(2), "{model}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{model}: {}", stderr(&o));
        assert!(!out.join("manifest.jsonl").exists(), "{model}");
    }
    let flag_cases: &[(&[&str], &str)] = &[
        (&["--eps", "3"], "--eps"),
        (&["--eps=-1/255"], "eps"),
        (&["--steps", "0"], "--steps"),
        (&["--steps=-3"], "steps"),
        (&["--step-size", "0"], "step"),
        (&["--batch-size", "0"], "--batch-size"),
        (&["--shard", "3/3"], "shard"),
        (&["--shards", "4"], "--shards"),
        (&["--exclude", "[unclosed"], "unclosed"),
        (&["--output-layout", "tar"], "--output-layout tar"),
        (&["--max-pixels", "many"], "max-pixels"),
        (&["--no-such-flag"], "no-such-flag"),
    ];
    for (i, (extra, needle)) in flag_cases.iter().enumerate() {
        let out = tmp.path().join(format!("f{i}"));
        let o = attack(s(&input), &out, extra);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(needle),
            "{extra:?} lacks '{needle}': {}",
            stderr(&o)
        );
        assert!(!out.join("manifest.jsonl").exists(), "{extra:?}");
    }
    let input_cases: Vec<(String, &str)> = vec![
        (s(&missing).to_string(), "no-such-dir"),
        (s(&collide).to_string(), "x.png"),
        (
            s(&tmp.path().join("shards/t-{0..2}.tar")).to_string(),
            "t-0.tar",
        ),
        (
            s(&tmp.path().join("shards/t-{0..x}.tar")).to_string(),
            "range",
        ),
    ];
    for (i, (inp, needle)) in input_cases.iter().enumerate() {
        let out = tmp.path().join(format!("i{i}"));
        let o = attack(inp, &out, &[]);
        assert_eq!(o.status.code(), Some(2), "{inp}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{inp}: {}", stderr(&o));
        assert!(!out.join("manifest.jsonl").exists(), "{inp}");
    }
    // No panic anywhere: a panic would exit 101 and print "panicked".
}

#[test]
fn unwritable_outputs_are_reported_with_their_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write_png(&input.join("a.png"), 32, 32, 1);
    write_png(&input.join("sub/b.png"), 32, 32, 2);
    // The output's subdirectory is blocked by a file: that image fails (with the OS's reason),
    // the other is written, nothing half-written is left.
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("sub"), b"a file where a directory should be").unwrap();
    let o = attack(s(&input), &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let recs = records(&out);
    assert_eq!(recs["a.png"]["status"], "ok");
    let b = &recs["sub/b.png"];
    assert_eq!(b["status"], "error");
    let msg = b["error"].as_str().unwrap();
    assert!(
        msg.contains("cannot write") && msg.contains("sub") && msg.contains("os error"),
        "{msg}"
    );
    assert!(out.join("a.png").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Once unblocked, a re-run does only the failed image.
    std::fs::remove_file(out.join("sub")).unwrap();
    let o = attack(s(&input), &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(manifest(&out).len(), 3);
    // The manifest itself cannot be written: a run error (exit 2) naming it.
    let out2 = tmp.path().join("out2");
    std::fs::create_dir_all(out2.join("manifest.jsonl")).unwrap();
    let o = attack(s(&input), &out2, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("manifest.jsonl"), "{}", stderr(&o));
    // The output directory cannot be created: a run error naming it.
    let blocked = tmp.path().join("blocked");
    std::fs::write(&blocked, b"file").unwrap();
    let o = attack(s(&input), &blocked.join("out"), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("blocked"), "{}", stderr(&o));
}

/// A full disk, where the test may mount a tiny tmpfs (root on Linux); skipped elsewhere.
#[test]
fn a_full_disk_is_a_per_image_error_and_nothing_is_half_written() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..4 {
        write_png(&input.join(format!("img{i}.png")), 96, 96, i);
    }
    let out = tmp.path().join("small-disk");
    std::fs::create_dir_all(&out).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48k", "tmpfs", s(&out)])
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(out.clone());
    // Fill the disk but for a little room.
    let filler = vec![0u8; 36 * 1024];
    std::fs::write(out.join("filler"), &filler).unwrap();
    let o = attack(s(&input), &out, &[]);
    let code = o.status.code();
    assert!(
        code == Some(1) || code == Some(2),
        "{code:?}: {}",
        stderr(&o)
    );
    let text = if code == Some(2) {
        stderr(&o)
    } else {
        std::fs::read_to_string(out.join("manifest.jsonl")).unwrap()
    };
    assert!(text.contains("No space left on device"), "{text}");
    // Whatever was written decodes; no temporary is left under a final name or beside it.
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "{name}");
        if name.ends_with(".png") {
            image::open(e.path()).unwrap();
        }
    }
}

#[test]
fn three_shards_equal_one_unsharded_run() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..9 {
        write_png(&input.join(format!("d{}/img{i}.png", i % 3)), 32 + i, 32, i);
    }
    let whole = tmp.path().join("whole");
    let o = attack(s(&input), &whole, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let shared = tmp.path().join("shared");
    let mut per_shard = Vec::new();
    for k in 0..3 {
        let o = attack(s(&input), &shared, &["--shard", &format!("{k}/3")]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        per_shard.push(manifest(&shared).len());
    }
    // Each shard added its own lines only; together exactly the inputs, once each.
    let a = records(&whole);
    let b = records(&shared);
    assert_eq!(manifest(&shared).len(), 9);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(per_shard.windows(2).all(|w| w[0] < w[1]), "{per_shard:?}");
    for (rel, r) in &a {
        let out = r["output"].as_str().unwrap();
        assert_eq!(
            std::fs::read(whole.join(out)).unwrap(),
            std::fs::read(shared.join(out)).unwrap(),
            "{rel}"
        );
        assert_eq!(r["loss_final"], b[rel]["loss_final"], "{rel}");
    }
}

#[test]
fn verify_catches_planted_violations_and_lists_every_one() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..4 {
        write_png(&input.join(format!("img{i}.png")), 32, 32, i);
    }
    let out = tmp.path().join("out");
    assert_eq!(attack(s(&input), &out, &[]).status.code(), Some(0));
    let v = verify(s(&input), &out, &[]);
    assert_eq!(v.status.code(), Some(0), "{}", stdout(&v));
    // img0: one pixel pushed outside the ε-ball.
    let p0 = out.join("img0.png");
    let mut img = image::open(&p0).unwrap().to_rgb8();
    let px = img.get_pixel_mut(5, 7);
    px.0[1] = px.0[1].wrapping_add(40);
    img.save(&p0).unwrap();
    // img1: deleted. img2: replaced by garbage. img3: resized.
    std::fs::remove_file(out.join("img1.png")).unwrap();
    std::fs::write(out.join("img2.png"), b"garbage").unwrap();
    write_png(&out.join("img3.png"), 31, 32, 3);
    let v = verify(s(&input), &out, &[]);
    assert_eq!(v.status.code(), Some(1));
    let text = stdout(&v);
    for (rel, needle) in [
        ("img0.png", "> eps"),
        ("img1.png", "missing"),
        ("img2.png", "does not decode"),
        ("img3.png", "size mismatch"),
        ("img3.png", "disagrees"),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("VIOLATION {rel}:")) && l.contains(needle)),
            "{rel} / {needle}: {text}"
        );
    }
    assert!(text.contains("6 violation(s)"), "{text}");
    // A bad flag is a usage error.
    assert_eq!(verify(s(&input), &out, &["--eps"]).status.code(), Some(2));
}

// ---------------------------------------------------------------------------------------------
// WebDataset tar shards

/// Writes `n` shards `train-000.tar`… of `per` samples each (`<key>.png` + `.cls` + `.json`),
/// plus a stray member. Returns the input spec.
fn write_shards(dir: &Path, n: usize, per: usize, size: u32) -> String {
    std::fs::create_dir_all(dir).unwrap();
    for s in 0..n {
        let mut b = tar::Builder::new(
            std::fs::File::create(dir.join(format!("train-{s:03}.tar"))).unwrap(),
        );
        for k in 0..per {
            let key = format!("s{s}/{k:05}");
            let img = png_bytes(size + k as u32, size, (s * 10 + k) as u32);
            for (ext, data) in [
                ("png", img),
                ("cls", format!("{k}").into_bytes()),
                ("json", format!("{{\"k\":{k}}}").into_bytes()),
            ] {
                let mut h = tar::Header::new_ustar();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, format!("{key}.{ext}"), data.as_slice())
                    .unwrap();
            }
        }
        let mut h = tar::Header::new_ustar();
        h.set_size(2);
        h.set_cksum();
        b.append_data(&mut h, "README", &b"hi"[..]).unwrap();
        b.finish().unwrap();
    }
    format!("{}/train-{{000..{:03}}}.tar", dir.display(), n - 1)
}

/// name → bytes of every member of a tar.
fn tar_members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut a = tar::Archive::new(std::fs::File::open(path).unwrap());
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            (name, v)
        })
        .collect()
}

fn mtimes(dir: &Path) -> HashMap<PathBuf, SystemTime> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.path(), e.metadata().unwrap().modified().unwrap()))
        .collect()
}

#[test]
fn tar_shards_in_tar_shards_out_with_resume_and_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_shards(&tmp.path().join("shards"), 3, 3, 32);
    let out = tmp.path().join("out");
    let o = attack(&spec, &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("3 tar shard(s)"), "{}", stderr(&o));
    assert!(stderr(&o).contains("ignored 3 non-image"), "{}", stderr(&o));
    let recs = records(&out);
    assert_eq!(recs.len(), 9);
    assert_eq!(
        recs["train-001.tar/s1/00002.png"]["output"],
        "train-001.tar/s1/00002.png"
    );
    // Every output shard holds, per sample, the adversarial PNG and the sample's other members,
    // in input order; nothing else is left in the output directory.
    for s in 0..3 {
        let members = tar_members(&out.join(format!("train-{s:03}.tar")));
        let names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<String> = (0..3)
            .flat_map(|k| ["png", "cls", "json"].map(|e| format!("s{s}/{k:05}.{e}")))
            .collect();
        assert_eq!(names, want);
        assert_eq!(members[1].1, b"0");
        let img = image::load_from_memory(&members[0].1).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
    }
    let mut listing: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    assert_eq!(
        listing,
        [
            "manifest.jsonl",
            "run.json",
            "train-000.tar",
            "train-001.tar",
            "train-002.tar"
        ]
    );
    let v = verify(&spec, &out, &[]);
    assert_eq!(v.status.code(), Some(0), "{}{}", stdout(&v), stderr(&v));
    assert!(stdout(&v).contains("checked 9 image(s)"));

    // A resume rewrites nothing.
    let before = mtimes(&out);
    let lines = manifest(&out).len();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let o = attack(&spec, &out, &[]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(mtimes(&out), before);
    assert_eq!(manifest(&out).len(), lines);

    // Three shards (split by tar file) into one directory equal the unsharded run, byte for
    // byte.
    let shared = tmp.path().join("shared");
    for k in 0..3 {
        let o = attack(&spec, &shared, &["--shard", &format!("{k}/3")]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    for s in 0..3 {
        let name = format!("train-{s:03}.tar");
        assert_eq!(
            std::fs::read(out.join(&name)).unwrap(),
            std::fs::read(shared.join(&name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(records(&shared).len(), 9);

    // verify catches a planted violation inside an output tar.
    let t = out.join("train-002.tar");
    let mut members = tar_members(&t);
    let mut img = image::load_from_memory(&members[3].1).unwrap().to_rgb8();
    img.get_pixel_mut(0, 0).0[0] ^= 0x80;
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    members[3].1 = buf.into_inner();
    let mut b = tar::Builder::new(std::fs::File::create(&t).unwrap());
    for (name, data) in &members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
    let v = verify(&spec, &out, &[]);
    assert_eq!(v.status.code(), Some(1));
    assert!(
        stdout(&v).contains(
            "VIOLATION train-002.tar/s2/00001.png: output train-002.tar/s2/00001.png: linf"
        ),
        "{}",
        stdout(&v)
    );
}

#[test]
fn tar_shards_to_a_tree_with_failures_retried_into_the_tar() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    let spec = write_shards(&dir, 2, 2, 32);
    // Tree layout: <out>/<shard without .tar>/<member>.png.
    let tree = tmp.path().join("tree");
    let o = attack(&spec, &tree, &["--output-layout", "tree"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(tree.join("train-000/s0/00001.png").is_file());
    assert!(tree.join("train-001/s1/00000.png").is_file());
    assert!(!tree.join("train-000.tar").exists());
    let v = verify(&spec, &tree, &[]);
    assert_eq!(v.status.code(), Some(0), "{}", stdout(&v));

    // A shard with a broken image and a too-large one: the run goes on, the output tar holds
    // the good samples; a re-run with a larger budget adds the one that was too large.
    let mut b = tar::Builder::new(std::fs::File::create(dir.join("mixed.tar")).unwrap());
    for (name, data) in [
        ("a.png", png_bytes(32, 32, 1)),
        ("a.txt", b"caption a".to_vec()),
        ("b.png", b"\x89PNG\r\n\x1a\nbroken".to_vec()),
        ("b.txt", b"caption b".to_vec()),
        ("c.png", png_bytes(64, 40, 2)),
        ("c.txt", b"caption c".to_vec()),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
    let mixed = dir.join("mixed.tar");
    let out = tmp.path().join("out");
    let o = attack(s(&mixed), &out, &["--max-pixels", "2000"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let names = |p: &Path| -> Vec<String> { tar_members(p).into_iter().map(|(n, _)| n).collect() };
    assert_eq!(names(&out.join("mixed.tar")), ["a.png", "a.txt"]);
    let recs = records(&out);
    assert!(recs["mixed.tar/b.png"]["error"]
        .as_str()
        .unwrap()
        .contains("mixed.tar/b.png"));
    assert!(recs["mixed.tar/c.png"]["error"]
        .as_str()
        .unwrap()
        .contains("limit of 2000"));
    let o = attack(s(&mixed), &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        names(&out.join("mixed.tar")),
        ["a.png", "a.txt", "c.png", "c.txt"]
    );
    assert!(!out.join(".mixed.tar.parts").exists());
    // a.png was not attacked again: one ok record.
    let a_lines = manifest(&out)
        .iter()
        .filter(|r| r["input"] == "mixed.tar/a.png")
        .count();
    assert_eq!(a_lines, 1);
}

#[test]
fn kill_9_during_a_tar_run_then_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_shards(&tmp.path().join("shards"), 2, 6, 48);
    let out = tmp.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_prm"))
        .args([
            "attack",
            "--model",
            "random:tiny",
            "--input",
            &spec,
            "--output",
            s(&out),
            "--preset",
            "pgd",
            "--steps",
            "40",
            "--device",
            "cpu",
            "--quiet",
        ])
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let n = std::fs::read_to_string(out.join("manifest.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= 3 {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("finished before it could be killed: {status}");
        }
        assert!(started.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The first shard is incomplete: its images are staged, its tar does not exist yet.
    assert!(!out.join("train-001.tar").exists());
    let o = Command::new(env!("CARGO_BIN_EXE_prm"))
        .args([
            "attack",
            "--model",
            "random:tiny",
            "--input",
            &spec,
            "--output",
            s(&out),
            "--preset",
            "pgd",
            "--steps",
            "40",
            "--device",
            "cpu",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let all = manifest(&out);
    let recs = records(&out);
    assert_eq!(recs.len(), 12);
    assert_eq!(all.len(), 12, "every image recorded exactly once");
    assert!(recs.values().all(|r| r["status"] == "ok"));
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            [
                "manifest.jsonl",
                "run.json",
                "train-000.tar",
                "train-001.tar"
            ]
            .contains(&name.as_str()),
            "left behind: {name}"
        );
    }
    let v = verify(&spec, &out, &[]);
    assert_eq!(v.status.code(), Some(0), "{}", stdout(&v));
}

#[test]
fn tar_outputs_feed_init_from_and_manifest_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_shards(&tmp.path().join("shards"), 2, 2, 32);
    let first = tmp.path().join("first");
    assert_eq!(attack(&spec, &first, &[]).status.code(), Some(0));
    // --init from: an earlier tar-layout output continues the attack.
    let second = tmp.path().join("second");
    let from = format!("from:{}", first.display());
    let o = attack(&spec, &second, &["--init", &from]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(records(&second).len(), 4);
    // The same with a missing start is a per-image error naming it.
    std::fs::remove_file(first.join("train-001.tar")).unwrap();
    let third = tmp.path().join("third");
    let o = attack(&spec, &third, &["--init", &from]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let recs = records(&third);
    assert!(recs["train-001.tar/s1/00000.png"]["error"]
        .as_str()
        .unwrap()
        .contains("--init from:"));
    // manifest merge understands the tar spec: inputs with no record are missing.
    let merged = tmp.path().join("merged.jsonl");
    let o = prm(&[
        "manifest",
        "merge",
        "--input",
        &spec,
        "--output",
        s(&merged),
        s(&second.join("manifest.jsonl")),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let o = prm(&[
        "manifest",
        "merge",
        "--input",
        &spec,
        "--output",
        s(&merged),
        s(&third.join("manifest.jsonl")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("train-001.tar/s1/00000.png"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_list_file_with_braces_in_its_name_is_still_a_list() {
    let tmp = tempfile::tempdir().unwrap();
    write_png(&tmp.path().join("a.png"), 32, 32, 1);
    let list = tmp.path().join("list{1}.txt");
    std::fs::write(&list, "a.png\n").unwrap();
    let o = attack(s(&list), &tmp.path().join("out"), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn bomb_headers_in_every_format_fail_fast_as_too_large() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    // PNG.
    std::fs::write(input.join("bomb_png.png"), bomb_header(60000, 60000)).unwrap();
    // JPEG: a complete small JPEG whose frame header claims 60000x60000.
    let mut jpg = Vec::new();
    jpeg_encoder::Encoder::new(&mut jpg, 90)
        .encode(&rgb_pixels(16, 16, 1), 16, 16, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    let sof = jpg
        .windows(2)
        .position(|w| w[0] == 0xFF && (w[1] == 0xC0 || w[1] == 0xC2))
        .unwrap();
    jpg[sof + 5..sof + 7].copy_from_slice(&60000u16.to_be_bytes());
    jpg[sof + 7..sof + 9].copy_from_slice(&60000u16.to_be_bytes());
    std::fs::write(input.join("bomb_jpg.jpg"), jpg).unwrap();
    // BMP: the DIB header's width and height.
    let mut bmp = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_raw(16, 16, rgb_pixels(16, 16, 2))
        .unwrap()
        .write_to(&mut bmp, image::ImageFormat::Bmp)
        .unwrap();
    let mut bmp = bmp.into_inner();
    bmp[18..22].copy_from_slice(&60000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&60000i32.to_le_bytes());
    std::fs::write(input.join("bomb_bmp.bmp"), bmp).unwrap();
    write_png(&input.join("fine.png"), 32, 32, 3);
    let out = tmp.path().join("out");
    let o = attack(s(&input), &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let recs = records(&out);
    assert_eq!(recs["fine.png"]["status"], "ok");
    for f in ["bomb_png.png", "bomb_jpg.jpg", "bomb_bmp.bmp"] {
        let msg = recs[f]["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("60000x60000") && msg.contains("more than the limit"),
            "{f}: {msg}"
        );
    }
}

#[test]
fn a_tar_member_cannot_write_outside_the_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let shard = tmp.path().join("evil.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&shard).unwrap());
    for name in ["ok/a.png", "ok/../../../escape.png", "./ok/b.png"] {
        let data = png_bytes(32, 32, 1);
        let mut h = tar::Header::new_gnu();
        // Write the raw name: the builder refuses `..` itself.
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
    let out = tmp.path().join("deep/out");
    for layout in ["tar", "tree"] {
        let o = attack(s(&shard), &out.join(layout), &["--output-layout", layout]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(stderr(&o).contains("leaves the shard"), "{}", stderr(&o));
        let recs = records(&out.join(layout));
        assert_eq!(
            recs.keys().collect::<Vec<_>>(),
            ["evil.tar/ok/a.png", "evil.tar/ok/b.png"]
        );
    }
    assert!(!tmp.path().join("escape.png").exists());
    assert!(!tmp.path().join("deep/escape.png").exists());
    assert!(out.join("tree/evil/ok/b.png").is_file());
}

#[test]
fn an_output_tar_that_cannot_be_written_is_a_run_error_and_the_resume_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_shards(&tmp.path().join("shards"), 1, 3, 32);
    let out = tmp.path().join("out");
    // A directory squats on the output tar's name: the rename into place fails.
    std::fs::create_dir_all(out.join("train-000.tar")).unwrap();
    let o = attack(&spec, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("train-000.tar: cannot write") && stderr(&o).contains("os error"),
        "{}",
        stderr(&o)
    );
    // Every image is recorded and staged; no temporary tar is left.
    assert_eq!(records(&out).len(), 3);
    assert!(out.join(".train-000.tar.parts/s0/00002.png").is_file());
    let tmps: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmps.is_empty(), "{tmps:?}");
    // Once the name is free, a re-run attacks nothing and assembles the tar.
    std::fs::remove_dir(out.join("train-000.tar")).unwrap();
    let o = attack(&spec, &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("3 skipped"), "{}", stderr(&o));
    assert_eq!(manifest(&out).len(), 3);
    assert_eq!(tar_members(&out.join("train-000.tar")).len(), 9);
    assert!(!out.join(".train-000.tar.parts").exists());
    assert_eq!(verify(&spec, &out, &[]).status.code(), Some(0));
}
