//! Tests of the I/O layer (`prm::io`): ε-preserving quantisation, atomic writers, input listing,
//! manifests, `verify`, decoding of every colour form, bad files, fraction parsing and the
//! bundled samples. All fast; everything is written into temporary directories.

use std::io::Write;
use std::path::{Path, PathBuf};

use prm::io::*;

use crate::common::png::raw_png;

// ---------------------------------------------------------------------------------------------
// helpers

/// xorshift64*: deterministic test randomness without a dependency.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn touch(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A small 8-bit RGB PNG with a deterministic pattern; returns its planar [0,1] data.
fn write_rgb_png(path: &Path, w: usize, h: usize, seed: u64) -> RgbImage {
    let mut rng = Rng(seed | 1);
    let rgb: Vec<u8> = (0..3 * w * h)
        .map(|_| (rng.next_u64() >> 56) as u8)
        .collect();
    write_png_atomic(path, w, h, &rgb).unwrap();
    RgbImage::from_u8_interleaved(w, h, &rgb)
}

fn record(input: &str, status: Status) -> ManifestRecord {
    ManifestRecord {
        input: input.to_string(),
        output: (status == Status::Ok).then(|| output_rel_path(input)),
        status,
        error: (status == Status::Error).then(|| "boom".to_string()),
        width: 7,
        height: 5,
        loss_initial: Some(13.0),
        loss_final: (status == Status::Ok).then_some(4.25),
        layer_cosine: Some(vec![0.5, 0.25]),
        linf: Some(8.0),
        steps: 10,
        seconds: 0.5,
        input_bytes: None,
    }
}

// ---------------------------------------------------------------------------------------------
// quantisation

#[test]
fn quantize_stays_within_eps_and_range() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let epses: [f32; 10] = [
        0.0,
        1.0 / 255.0,
        2.0 / 255.0,
        4.0 / 255.0,
        8.0 / 255.0,
        16.0 / 255.0,
        0.0313,
        0.1,
        0.5,
        1.0,
    ];
    for &eps in &epses {
        for grid in [true, false] {
            let n = 4000;
            let clean: Vec<f32> = (0..n)
                .map(|i| {
                    if grid {
                        // Hit the range ends often.
                        let k = match i % 10 {
                            0 => 0,
                            1 => 255,
                            _ => (rng.next_u64() % 256) as u32,
                        };
                        k as f32 / 255.0
                    } else {
                        (rng.next_u64() % 65536) as f32 / 65535.0
                    }
                })
                .collect();
            let adv: Vec<f32> = clean
                .iter()
                .map(|&c| {
                    c + ((rng.unit() * 4.0 - 2.0) * eps as f64 + (rng.unit() - 0.5) * 0.01) as f32
                })
                .collect();
            let q = quantize_within_eps(&adv, &clean, eps);
            assert_eq!(q.len(), n);
            for i in 0..n {
                let (c, a) = (clean[i] as f64, adv[i] as f64);
                let lo = ((c - eps as f64) * 255.0).ceil().max(0.0);
                let hi = ((c + eps as f64) * 255.0).floor().min(255.0);
                let d = (q[i] as f64 / 255.0 - c).abs();
                if grid || lo <= hi {
                    assert!(
                        d <= eps as f64 + 1e-6,
                        "eps {eps} clean {c} adv {a} -> {} (d {d})",
                        q[i]
                    );
                } else {
                    // Empty interval: nearest level to clean.
                    assert_eq!(q[i] as f64, (c * 255.0).round());
                }
                let r = (a * 255.0).round();
                if (0.0..=255.0).contains(&r) && (r / 255.0 - c).abs() <= eps as f64 {
                    assert_eq!(q[i] as f64, r, "already inside must equal plain rounding");
                }
            }
            // And the saved L∞ agrees.
            let l = linf_255(&q, &clean);
            if grid {
                assert!(l <= eps as f64 * 255.0 + 1e-4, "eps {eps}: linf {l}");
            }
        }
    }
}

#[test]
fn quantize_exact_ball_edges_on_the_8bit_grid() {
    let eps = 8.0f32 / 255.0;
    for k in 0..=255u32 {
        let c = k as f32 / 255.0;
        let up = quantize_within_eps(&[c + 0.5], &[c], eps)[0] as u32;
        let down = quantize_within_eps(&[c - 0.5], &[c], eps)[0] as u32;
        assert_eq!(up, (k + 8).min(255), "k {k}");
        assert_eq!(down, k.saturating_sub(8), "k {k}");
        // Just inside the edge is kept.
        let edge = quantize_within_eps(&[c + eps], &[c], eps)[0] as u32;
        assert_eq!(edge, (k + 8).min(255));
    }
    // NaN / infinite adv fall back to clean.
    assert_eq!(quantize_within_eps(&[f32::NAN], &[0.5], eps), vec![128]);
    assert_eq!(
        quantize_within_eps(&[f32::INFINITY], &[100.0 / 255.0], eps),
        vec![100]
    );
}

#[test]
fn linf_and_layout_helpers() {
    assert_eq!(linf_255(&[10, 20], &[10.0 / 255.0, 17.0 / 255.0]), 3.0);
    let planar: Vec<u8> = (0..12).collect(); // 2x2
    let inter = planar_to_interleaved(&planar, 2, 2);
    assert_eq!(inter, vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
    assert_eq!(interleaved_to_planar(&inter, 2, 2), planar);
    let img = RgbImage::from_u8_interleaved(2, 2, &inter);
    assert_eq!(img.to_u8_interleaved(), inter);
    assert_eq!(img.data[4], 4.0 / 255.0);
}

// ---------------------------------------------------------------------------------------------
// atomic writers

#[test]
fn png_write_is_atomic_and_decodable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/out.png");
    let img = write_rgb_png(&path, 13, 7, 3);
    assert_eq!(files_in(&dir.path().join("a/b")), vec!["out.png"]);
    let back = read_image(&path).unwrap();
    assert_eq!(back, img);
    // Overwriting replaces the file, still without leftovers.
    let img2 = write_rgb_png(&path, 5, 4, 9);
    assert_eq!(read_image(&path).unwrap(), img2);
    assert_eq!(files_in(&dir.path().join("a/b")), vec!["out.png"]);
    // Outputs get ordinary permissions (like a plain File::create), not a temp file's 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&plain));
    }
    // A bad buffer is an error and leaves neither the file nor a temporary behind.
    let bad = dir.path().join("a/b/bad.png");
    let err = write_png_atomic(&bad, 4, 4, &[0u8; 10]).unwrap_err();
    assert!(matches!(err, IoError::Encode { .. }), "{err}");
    assert_eq!(files_in(&dir.path().join("a/b")), vec!["out.png"]);
}

#[test]
fn float_safetensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let img = RgbImage {
        width: 3,
        height: 2,
        data: (0..18).map(|i| i as f32 / 17.0).collect(),
    };
    let path = dir.path().join("f/x.safetensors");
    write_float_safetensors_atomic(&path, &img).unwrap();
    assert_eq!(files_in(&dir.path().join("f")), vec!["x.safetensors"]);
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let m = meta.metadata().as_ref().unwrap();
    assert_eq!(m["width"], "3");
    assert_eq!(m["height"], "2");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("image").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    assert_eq!(t.shape(), &[3, 2, 3]);
    let vals: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(vals, img.data);
}

// ---------------------------------------------------------------------------------------------
// input listing

#[test]
fn list_directory_sorted_filtered_and_excluding_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for f in [
        "b.png",
        "a.JPG",
        "sub/c.webp",
        "sub/deeper/d.TIFF",
        "sub/e.bmp",
        "z.jpeg",
        "y.tif",
        "notes.txt",
        "sub/readme",
        ".hidden/x.png",
        ".y.png",
        "out/z.png",
    ] {
        touch(&d.join(f), b"x");
    }
    let list = list_inputs(d, Some(&d.join("out"))).unwrap();
    assert_eq!(list.source, InputSource::Directory);
    let rels: Vec<&str> = list.items.iter().map(|i| i.rel.as_str()).collect();
    assert_eq!(
        rels,
        vec![
            "a.JPG",
            "b.png",
            "sub/c.webp",
            "sub/deeper/d.TIFF",
            "sub/e.bmp",
            "y.tif",
            "z.jpeg"
        ]
    );
    // Hidden files are skipped, not counted as "non-image files".
    assert_eq!(list.ignored, 2, "notes.txt, sub/readme");
    assert_eq!(list.items[2].path, d.join("sub").join("c.webp"));
    // Without the exclusion the output dir is an ordinary subdirectory.
    let all = list_inputs(d, None).unwrap();
    assert!(all.items.iter().any(|i| i.rel == "out/z.png"));
}

#[test]
fn list_errors_empty_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    touch(&dir.path().join("only.txt"), b"x");
    let err = list_inputs(dir.path(), None).unwrap_err();
    assert!(matches!(err, IoError::EmptyInput { .. }), "{err}");
    assert!(err.to_string().contains("1 other file"), "{err}");
    let err = list_inputs(&dir.path().join("nope"), None).unwrap_err();
    assert!(matches!(err, IoError::NotFound { .. }), "{err}");
    let list = dir.path().join("empty.lst");
    touch(&list, b"# nothing\n\n   \n");
    assert!(matches!(
        list_inputs(&list, None).unwrap_err(),
        IoError::EmptyInput { .. }
    ));
}

#[test]
fn list_file_mode() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("lists/set.txt");
    touch(
        &list,
        b"# a comment\n\nimgs/b.jpg\n./imgs/./a.png\n  c/../d.webp  \n/abs/p/q.bmp\nimgs/a.png\n",
    );
    let l = list_inputs(&list, None).unwrap();
    assert_eq!(l.source, InputSource::ListFile);
    let got: Vec<(PathBuf, &str)> = l
        .items
        .iter()
        .map(|i| (i.path.clone(), i.rel.as_str()))
        .collect();
    let base = dir.path().join("lists");
    assert_eq!(
        got,
        vec![
            (base.join("imgs/b.jpg"), "imgs/b.jpg"),
            (base.join("./imgs/./a.png"), "imgs/a.png"),
            (base.join("c/../d.webp"), "d.webp"),
            (PathBuf::from("/abs/p/q.bmp"), "abs/p/q.bmp"),
        ]
    );
    // The same file listed again (line 7 repeats line 4) is kept once, with a warning.
    assert!(
        l.warnings.len() == 1 && l.warnings[0].contains("`imgs/a.png` on line 7 repeats line 4"),
        "{:?}",
        l.warnings
    );
    check_output_collisions(&l.items).unwrap();
    // Climbing out is rejected with the line number.
    let bad = dir.path().join("bad.txt");
    touch(&bad, b"ok.png\n../x.png\n");
    match list_inputs(&bad, None).unwrap_err() {
        IoError::ListFile { line, .. } => assert_eq!(line, 2),
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn output_names_and_collisions() {
    assert_eq!(output_rel_path("a/b.jpg"), "a/b.png");
    assert_eq!(output_rel_path("x.PNG"), "x.png");
    assert_eq!(output_rel_path("a.d/c"), "a.d/c.png");
    assert_eq!(output_rel_path("a/b.tar.gz"), "a/b.tar.png");
    assert_eq!(output_rel_path(".hidden"), ".hidden.png");
    let item = |rel: &str| InputItem {
        member: None,
        path: PathBuf::from(rel),
        rel: rel.to_string(),
    };
    check_output_collisions(&[item("x.jpg"), item("y.png"), item("d/x.png")]).unwrap();
    match check_output_collisions(&[item("x.jpg"), item("y.png"), item("x.png"), item("x.webp")])
        .unwrap_err()
    {
        IoError::OutputCollision { pairs } => assert_eq!(
            pairs,
            vec![
                ("x.jpg".into(), "x.png".into(), "x.png".into()),
                ("x.jpg".into(), "x.webp".into(), "x.png".into())
            ]
        ),
        e => panic!("unexpected {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// manifest

#[test]
fn manifest_round_trip_and_append() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let recs = vec![
        record("a/x.jpg", Status::Ok),
        record("b.png", Status::Error),
    ];
    {
        let mut w = ManifestWriter::open(&out).unwrap();
        for r in &recs {
            w.append(r).unwrap();
        }
        w.sync().unwrap();
        assert_eq!(w.path(), out.join(MANIFEST_FILE));
    }
    let text = std::fs::read_to_string(out.join(MANIFEST_FILE)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].contains("\"status\":\"ok\"") && !lines[0].contains("\"error\""));
    assert!(lines[1].contains("\"status\":\"error\"") && lines[1].contains("\"error\":\"boom\""));
    assert_eq!(read_manifest(&out.join(MANIFEST_FILE)).unwrap(), recs);
    // Reopening appends.
    let mut w = ManifestWriter::open(&out).unwrap();
    w.append(&recs[0]).unwrap();
    assert_eq!(read_manifest(&out.join(MANIFEST_FILE)).unwrap().len(), 3);
}

/// A writer that opens the manifest while another process (a shard) is in the middle of a line
/// waits for that line instead of cutting it off as a crash's leftover (the partial line a crash
/// leaves, with no writer behind it, is still cut: `manifest_partial_trailing_line`). Only where
/// the file system has locks, as it has here.
#[test]
fn opening_the_manifest_waits_for_a_line_another_writer_is_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(MANIFEST_FILE);
    let first = serde_json::to_string(&record("a.png", Status::Ok)).unwrap();
    let other = serde_json::to_string(&record("b.png", Status::Ok)).unwrap();
    std::fs::write(&path, format!("{first}\n")).unwrap();
    // The other writer: the manifest's lock held, half its line out, the rest after a pause.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.lock().unwrap();
    write!(f, "{}", &other[..other.len() / 2]).unwrap();
    f.flush().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let opener = {
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let mut w = ManifestWriter::open(&dir).unwrap();
            tx.send(()).unwrap();
            w.append(&record("c.png", Status::Ok)).unwrap();
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        rx.try_recv().is_err(),
        "the opener did not wait for the lock"
    );
    writeln!(f, "{}", &other[other.len() / 2..]).unwrap();
    f.flush().unwrap();
    f.unlock().unwrap();
    opener.join().unwrap();
    let c = read_manifest_detailed(&path).unwrap();
    let inputs: Vec<&str> = c.records.iter().map(|r| r.input.as_str()).collect();
    assert_eq!(inputs, ["a.png", "b.png", "c.png"]);
    assert_eq!(c.ignored_partial_line, None);
}

#[test]
fn manifest_partial_trailing_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(MANIFEST_FILE);
    let full = serde_json::to_string(&record("a.png", Status::Ok)).unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{full}").unwrap();
    write!(f, "{}", &full[..full.len() / 2]).unwrap();
    drop(f);
    let c = read_manifest_detailed(&path).unwrap();
    assert_eq!(c.records.len(), 1);
    assert_eq!(c.ignored_partial_line, Some(2));
    // The writer cuts the partial line before appending.
    let mut w = ManifestWriter::open(dir.path()).unwrap();
    w.append(&record("b.png", Status::Ok)).unwrap();
    let c = read_manifest_detailed(&path).unwrap();
    assert_eq!(c.ignored_partial_line, None);
    let inputs: Vec<&str> = c.records.iter().map(|r| r.input.as_str()).collect();
    assert_eq!(inputs, vec!["a.png", "b.png"]);
    // A complete but invalid line in the middle is an error naming the line.
    std::fs::write(&path, format!("{full}\nnot json\n{full}\n")).unwrap();
    match read_manifest(&path).unwrap_err() {
        IoError::Manifest { line, .. } => assert_eq!(line, 2),
        e => panic!("unexpected {e}"),
    }
    // NaN cosines survive as NaN (JSON null).
    let mut r = record("n.png", Status::Ok);
    r.layer_cosine = Some(vec![f64::NAN, 1.0]);
    std::fs::write(&path, serde_json::to_string(&r).unwrap() + "\n").unwrap();
    let back = read_manifest(&path).unwrap();
    let lc = back[0].layer_cosine.as_ref().unwrap();
    assert!(lc[0].is_nan() && lc[1] == 1.0);
}

// ---------------------------------------------------------------------------------------------
// verify

/// A clean tree and a matching adversarial tree (eps 8/255) with a manifest.
fn make_pair(root: &Path) -> (PathBuf, PathBuf) {
    let clean = root.join("clean");
    let adv = root.join("adv");
    let eps = 8.0f32 / 255.0;
    let mut w = ManifestWriter::open(&adv).unwrap();
    for (i, (rel, wd, ht)) in [
        ("a.png", 17usize, 9usize),
        ("s/b.png", 8, 8),
        ("c.png", 5, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let img = write_rgb_png(&clean.join(rel), wd, ht, 100 + i as u64);
        let mut rng = Rng(7 + i as u64);
        // Push well past the ball so that the projection does the work.
        let advf: Vec<f32> = img
            .data
            .iter()
            .map(|&c| c + ((rng.unit() - 0.5) * 0.2) as f32)
            .collect();
        let q = quantize_within_eps(&advf, &img.data, eps);
        let out = output_rel_path(rel);
        write_png_atomic(&adv.join(&out), wd, ht, &planar_to_interleaved(&q, wd, ht)).unwrap();
        let mut r = record(rel, Status::Ok);
        r.output = Some(out);
        (r.width, r.height) = (wd, ht);
        w.append(&r).unwrap();
    }
    (clean, adv)
}

#[test]
fn verify_accepts_a_good_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, adv) = make_pair(dir.path());
    let rep = verify(&clean, &adv, 8.0 / 255.0).unwrap();
    assert!(rep.is_ok(), "{:?}", rep.violations);
    assert_eq!(rep.checked, 3);
    assert!(rep.manifest_checked);
    assert!(
        rep.max_linf_255 > 7.5 && rep.max_linf_255 <= 8.0 + 1e-4,
        "{}",
        rep.max_linf_255
    );
    // A tighter eps is violated.
    let rep = verify(&clean, &adv, 4.0 / 255.0).unwrap();
    assert!(!rep.is_ok());
    // Without a manifest it is still fine.
    std::fs::remove_file(adv.join(MANIFEST_FILE)).unwrap();
    let rep = verify(&clean, &adv, 8.0 / 255.0).unwrap();
    assert!(rep.is_ok() && !rep.manifest_checked);
    // adv inside clean is excluded from the clean list.
    let (clean2, _) = make_pair(&dir.path().join("nested"));
    std::fs::rename(dir.path().join("nested/adv"), clean2.join("adv")).unwrap();
    let rep = verify(&clean2, &clean2.join("adv"), 8.0 / 255.0).unwrap();
    assert!(rep.is_ok() && rep.checked == 3, "{:?}", rep.violations);
}

#[test]
fn verify_reports_each_kind_of_violation() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, adv) = make_pair(dir.path());
    // Missing output.
    std::fs::remove_file(adv.join("s/b.png")).unwrap();
    // Undecodable output.
    std::fs::write(adv.join("c.png"), b"\x89PNG\r\n\x1a\ngarbage").unwrap();
    // Size mismatch and linf violation on extra clean images.
    write_rgb_png(&clean.join("d.png"), 6, 6, 1);
    write_rgb_png(&adv.join("d.png"), 6, 5, 1);
    let e = write_rgb_png(&clean.join("e.png"), 4, 4, 2);
    let mut far = e.to_u8_interleaved();
    far[5] = far[5].wrapping_add(100);
    write_png_atomic(&adv.join("e.png"), 4, 4, &far).unwrap();
    // An unreadable clean image.
    touch(&clean.join("f.png"), b"not an image");
    // Manifest: an ok record whose output is missing (b), and d/e/f have no records.
    let rep = verify(&clean, &adv, 8.0 / 255.0).unwrap();
    let has = |file: &str, pred: &dyn Fn(&ViolationKind) -> bool| {
        rep.violations
            .iter()
            .any(|v| v.file == file && pred(&v.kind))
    };
    assert!(has("s/b.png", &|k| matches!(
        k,
        ViolationKind::Missing { .. }
    )));
    assert!(has("s/b.png", &|k| matches!(
        k,
        ViolationKind::ManifestOutputMissing { .. }
    )));
    assert!(has("c.png", &|k| matches!(
        k,
        ViolationKind::Undecodable { .. }
    )));
    assert!(has("d.png", &|k| matches!(
        k,
        ViolationKind::SizeMismatch {
            adv: (6, 5),
            clean: (6, 6),
            ..
        }
    )));
    assert!(has(
        "e.png",
        &|k| matches!(k, ViolationKind::LinfExceeded { linf_255, .. } if *linf_255 >= 92.0)
    ));
    assert!(has("f.png", &|k| matches!(
        k,
        ViolationKind::CleanUnreadable { .. }
    )));
    for f in ["d.png", "e.png", "f.png"] {
        assert!(
            has(f, &|k| matches!(k, ViolationKind::ManifestNoRecord)),
            "{f}"
        );
    }
    assert!(!has("a.png", &|_| true), "{:?}", rep.violations);
    assert_eq!(rep.checked, 6);
    // Messages name the file and the numbers.
    let text: Vec<String> = rep.violations.iter().map(|v| v.to_string()).collect();
    assert!(
        text.iter().any(|t| t.contains("6x5") && t.contains("6x6")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with("e.png:") && t.contains("> eps 8.0000/255")),
        "{text:?}"
    );
    // A record that disagrees with its file (size, or an L∞ above ε) is a violation.
    let mut lines: Vec<ManifestRecord> = read_manifest(&adv.join(MANIFEST_FILE)).unwrap();
    for r in &mut lines {
        if r.input == "a.png" {
            r.width += 1;
        }
    }
    std::fs::remove_file(adv.join(MANIFEST_FILE)).unwrap();
    let mut w = ManifestWriter::open(&adv).unwrap();
    for r in &lines {
        w.append(r).unwrap();
    }
    let mut r = record("c.png", Status::Ok);
    r.output = Some("c.png".into());
    r.linf = Some(9.0);
    w.append(&r).unwrap();
    let rep = verify(&clean, &adv, 8.0 / 255.0).unwrap();
    let disagrees = |f: &str, needle: &str| {
        rep.violations.iter().any(|v| {
            v.file == f
                && matches!(v.kind, ViolationKind::ManifestDisagrees { .. })
                && v.to_string().contains(needle)
        })
    };
    assert!(disagrees("a.png", "18x9"), "{:?}", rep.violations);
    // c.png does not decode, so its record's L∞ above ε is the only evidence, and says so.
    assert!(
        rep.violations.iter().any(|v| v.file == "c.png"
            && matches!(v.kind, ViolationKind::ManifestLinfExceeded { linf_255, .. } if linf_255 == 9.0)
            && v.to_string().contains("records linf 9.0000/255")),
        "{:?}",
        rep.violations
    );
    // An unreadable manifest is itself a violation.
    std::fs::write(adv.join(MANIFEST_FILE), "garbage\n{}\n").unwrap();
    let rep = verify(&clean, &adv, 8.0 / 255.0).unwrap();
    assert!(rep
        .violations
        .iter()
        .any(|v| matches!(v.kind, ViolationKind::ManifestUnreadable { .. })));
    // A missing adv directory is an error, not a report.
    assert!(matches!(
        verify(&clean, &dir.path().join("none"), 0.1).unwrap_err(),
        IoError::NotFound { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// decoding

#[test]
fn read_grayscale_rgba_16bit_palette_and_jpeg() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let gray = ::image::GrayImage::from_raw(3, 2, vec![0, 10, 20, 30, 40, 255]).unwrap();
    gray.save(d.join("g.png")).unwrap();
    let g = read_image(&d.join("g.png")).unwrap();
    assert_eq!((g.width, g.height), (3, 2));
    for c in 0..3 {
        assert_eq!(g.data[c * 6 + 1], 10.0 / 255.0);
        assert_eq!(g.data[c * 6 + 5], 1.0);
    }

    let rgba = ::image::RgbaImage::from_raw(2, 1, vec![1, 2, 3, 0, 250, 251, 252, 128]).unwrap();
    rgba.save(d.join("a.png")).unwrap();
    let a = read_image(&d.join("a.png")).unwrap();
    assert_eq!(a.to_u8_interleaved(), vec![1, 2, 3, 250, 251, 252]);

    let g16: ::image::ImageBuffer<::image::Rgb<u16>, Vec<u16>> =
        ::image::ImageBuffer::from_raw(2, 1, vec![0, 1, 65535, 32768, 12345, 65534]).unwrap();
    g16.save(d.join("h.png")).unwrap();
    let h = read_image(&d.join("h.png")).unwrap();
    // Planar: R = [0, 32768], G = [1, 12345], B = [65535, 65534].
    let want = [0u16, 32768, 1, 12345, 65535, 65534];
    for (got, w) in h.data.iter().zip(want) {
        assert!(
            (*got as f64 - w as f64 / 65535.0).abs() < 1e-7,
            "{got} vs {w}"
        );
    }

    let l16: ::image::ImageBuffer<::image::Luma<u16>, Vec<u16>> =
        ::image::ImageBuffer::from_raw(1, 1, vec![65535]).unwrap();
    l16.save(d.join("l16.png")).unwrap();
    assert_eq!(read_image(&d.join("l16.png")).unwrap().data, vec![1.0; 3]);

    // Palette (colour type 3, 8-bit indices) with a transparency chunk.
    let plte = vec![255, 0, 0, 0, 255, 0, 0, 0, 255];
    let png = raw_png(
        3,
        1,
        8,
        3,
        &[(b"PLTE", plte), (b"tRNS", vec![255, 0, 128])],
        &[vec![2, 0, 1]],
    );
    touch(&d.join("p.png"), &png);
    let p = read_image(&d.join("p.png")).unwrap();
    assert_eq!(p.to_u8_interleaved(), vec![0, 0, 255, 255, 0, 0, 0, 255, 0]);

    // JPEG decodes (lossy, so only roughly).
    let rgb = ::image::RgbImage::from_pixel(16, 8, ::image::Rgb([200, 100, 50]));
    rgb.save(d.join("j.jpg")).unwrap();
    let j = read_image(&d.join("j.jpg")).unwrap();
    assert_eq!((j.width, j.height), (16, 8));
    assert!((j.data[0] - 200.0 / 255.0).abs() < 0.03);
}

#[test]
fn exif_orientation_is_applied() {
    // 2x1 image [red, blue] with EXIF orientation 6 (rotate 90° clockwise) -> 1x2 [red; blue].
    let mut exif = b"II*\0".to_vec();
    exif.extend_from_slice(&8u32.to_le_bytes());
    exif.extend_from_slice(&1u16.to_le_bytes());
    exif.extend_from_slice(&0x0112u16.to_le_bytes());
    exif.extend_from_slice(&3u16.to_le_bytes());
    exif.extend_from_slice(&1u32.to_le_bytes());
    exif.extend_from_slice(&6u16.to_le_bytes());
    exif.extend_from_slice(&[0, 0]);
    exif.extend_from_slice(&0u32.to_le_bytes());
    let png = raw_png(
        2,
        1,
        8,
        2,
        &[(b"eXIf", exif)],
        &[vec![255, 0, 0, 0, 0, 255]],
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.png");
    touch(&p, &png);
    let img = read_image(&p).unwrap();
    assert_eq!((img.width, img.height), (1, 2));
    assert_eq!(img.to_u8_interleaved(), vec![255, 0, 0, 0, 0, 255]);
}

#[test]
fn bad_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = read_image(&d.join("missing.png")).unwrap_err();
    assert!(matches!(err, IoError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("missing.png"));

    touch(&d.join("text.jpg"), b"hello, this is not a jpeg at all");
    let err = read_image(&d.join("text.jpg")).unwrap_err();
    assert!(
        matches!(
            err,
            IoError::Decode { .. } | IoError::UnsupportedFormat { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("text.jpg"));

    touch(&d.join("noext"), b"\x00\x01\x02 random bytes");
    let err = read_image(&d.join("noext")).unwrap_err();
    assert!(matches!(err, IoError::UnsupportedFormat { .. }), "{err}");

    write_rgb_png(&d.join("full.png"), 40, 30, 5);
    let bytes = std::fs::read(d.join("full.png")).unwrap();
    for cut in [bytes.len() / 2, 40, 12] {
        touch(&d.join("trunc.png"), &bytes[..cut]);
        let err = read_image(&d.join("trunc.png")).unwrap_err();
        assert!(matches!(err, IoError::Decode { .. }), "cut {cut}: {err}");
    }
    let mut rng = Rng(42);
    let mut corrupt = bytes.clone();
    for b in corrupt.iter_mut().skip(40) {
        *b = (rng.next_u64() >> 56) as u8;
    }
    touch(&d.join("corrupt.png"), &corrupt);
    assert!(read_image(&d.join("corrupt.png")).is_err());

    let rgb = ::image::RgbImage::from_pixel(8, 8, ::image::Rgb([1, 2, 3]));
    rgb.save(d.join("j.jpg")).unwrap();
    let jb = std::fs::read(d.join("j.jpg")).unwrap();
    touch(&d.join("jt.jpg"), &jb[..jb.len() / 3]);
    assert!(read_image(&d.join("jt.jpg")).is_err());

    let err = read_image_limited(&d.join("full.png"), 1000).unwrap_err();
    match &err {
        IoError::TooLarge {
            width,
            height,
            max_pixels,
            ..
        } => assert_eq!((*width, *height, *max_pixels), (40, 30, 1000)),
        e => panic!("unexpected {e}"),
    }
    assert!(err.to_string().contains("1200 pixels"), "{err}");
    assert!(read_image_limited(&d.join("full.png"), 1200).is_ok());
}

// ---------------------------------------------------------------------------------------------
// units and samples

#[test]
fn parse_fraction_accepts_and_rejects() {
    assert_eq!(parse_fraction("8/255").unwrap(), 8.0 / 255.0);
    assert_eq!(parse_fraction("2/255").unwrap(), 2.0 / 255.0);
    assert_eq!(parse_fraction("0.0313").unwrap(), 0.0313);
    assert_eq!(parse_fraction("1e-3").unwrap(), 0.001);
    for bad in [
        "", "eight", "8/", "8/0", "-0.1", "-8/255", "NaN", "nan/1", "inf", "1/2/3", "0x10",
    ] {
        assert!(parse_fraction(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn bundled_samples_decode_and_are_licensed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples");
    let list = list_inputs(&dir, None).unwrap();
    assert!(list.items.len() >= 4);
    check_output_collisions(&list.items).unwrap();
    let licence = std::fs::read_to_string(dir.join("LICENSE.md")).unwrap();
    let mut odd = 0;
    let (mut png, mut jpg) = (false, false);
    for item in &list.items {
        assert!(
            licence.contains(&format!("`{}`", item.rel)),
            "{} not in LICENSE.md",
            item.rel
        );
        let img = read_image(&item.path).unwrap();
        assert_eq!(img.width.max(img.height), 320, "{}", item.rel);
        if !img.width.is_multiple_of(16) || !img.height.is_multiple_of(16) {
            odd += 1;
        }
        png |= item.rel.ends_with(".png");
        jpg |= item.rel.ends_with(".jpg");
        assert!(img.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    assert!(odd >= 2 && png && jpg);
}

#[test]
fn cmyk_jpeg_colours_come_out_right() {
    // No ink is white, full cyan is (0, 255, 255), full black ink is black.
    let dir = tempfile::tempdir().unwrap();
    for (cmyk, rgb) in [
        ([0u8, 0, 0, 0], [255u8, 255, 255]),
        ([255, 0, 0, 0], [0, 255, 255]),
        ([0, 0, 0, 255], [0, 0, 0]),
    ] {
        let data: Vec<u8> = (0..16 * 16).flat_map(|_| cmyk).collect();
        let mut buf = Vec::new();
        jpeg_encoder::Encoder::new(&mut buf, 100)
            .encode(&data, 16, 16, jpeg_encoder::ColorType::Cmyk)
            .unwrap();
        let p = dir.path().join("c.jpg");
        std::fs::write(&p, buf).unwrap();
        let img = read_image(&p).unwrap();
        let px = &img.to_u8_interleaved()[..3];
        for c in 0..3 {
            assert!(
                (px[c] as i32 - rgb[c] as i32).abs() <= 8,
                "cmyk {cmyk:?}: got {px:?}, want {rgb:?}"
            );
        }
    }
}

/// A malformed JPEG found by the `image_decode` fuzz target (2026-12-05) on which the JPEG
/// decoder of our dependencies (zune-jpeg 0.5.15) panics instead of returning an error. Every
/// reader of images (attack, eval, verify) gets a corrupt-image error naming the file.
#[test]
fn a_jpeg_the_decoder_panics_on_is_a_corrupt_image() {
    let bytes = include_bytes!("data/jpeg_decoder_panic.jpg");
    let name = Path::new("fuzzed.jpg");
    let err = read_image_bytes(bytes, name, 1 << 20).unwrap_err();
    assert!(matches!(err, IoError::Decode { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("fuzzed.jpg") && msg.contains("decoder failed"),
        "{msg}"
    );

    let d = tempfile::tempdir().unwrap();
    touch(&d.path().join("fuzzed.jpg"), bytes);
    let err = read_image(&d.path().join("fuzzed.jpg")).unwrap_err();
    assert!(matches!(err, IoError::Decode { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// input-listing and verify fixes from the user-eyes audit (outputs over inputs, list files,
// counts, verify's reporting)

fn list_with_out(input: &Path, out: &Path) -> Result<InputList, IoError> {
    list_inputs_with(
        input,
        &ListOptions {
            exclude_dirs: vec![out.to_path_buf()],
            exclude: Vec::new(),
        },
    )
}

/// Audit #1: `--input list.txt --output <the list's directory>` with `a.png` listed would write
/// `<output>/a.png` over the clean `a.png`.
#[test]
fn an_output_that_is_an_input_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    touch(&d.join("a.png"), b"x");
    touch(&d.join("b.jpg"), b"x");
    touch(&d.join("list.txt"), b"a.png\nb.jpg\n");
    let list = d.join("list.txt");
    match list_with_out(&list, &d).unwrap_err() {
        IoError::OutputOverwritesInput { dir: out, pairs } => {
            assert_eq!(out, d);
            assert_eq!(pairs, vec![("a.png".to_string(), "a.png".to_string())]);
        }
        e => panic!("unexpected {e}"),
    }
    // Elsewhere, or not yet created, it is fine; so is a `b.png` beside `b.jpg` (not an input).
    list_with_out(&list, &dir.path().join("out")).unwrap();
    list_with_out(&list, &dir.path().join("not/yet")).unwrap();
    // Through a symlink to the list's directory.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&d, dir.path().join("link")).unwrap();
        assert!(matches!(
            list_with_out(&list, &dir.path().join("link")).unwrap_err(),
            IoError::OutputOverwritesInput { .. }
        ));
        // An input that is a symlink to a file in the output directory.
        let (input, out) = (dir.path().join("in"), dir.path().join("o"));
        touch(&out.join("s.png"), b"x");
        std::fs::create_dir_all(&input).unwrap();
        std::os::unix::fs::symlink(out.join("s.png"), input.join("s.png")).unwrap();
        let err = list_with_out(&input, &out).unwrap_err();
        assert!(
            matches!(err, IoError::OutputOverwritesInput { .. })
                && err.to_string().contains("s.png"),
            "{err}"
        );
    }
    // A list of earlier outputs attacked again into the folder above them.
    let prev = dir.path().join("prev");
    touch(&prev.join("adv/x.png"), b"x");
    touch(&prev.join("again.txt"), b"adv/x.png\n");
    assert!(matches!(
        list_with_out(&prev.join("again.txt"), &prev).unwrap_err(),
        IoError::OutputOverwritesInput { .. }
    ));
    // A directory input whose tree repeats under an output directory above it: the output of
    // `sub/x.png` is the input `x.png`.
    let nd = dir.path().join("nd");
    touch(&nd.join("sub/x.png"), b"x");
    touch(&nd.join("sub/sub/x.png"), b"x");
    match list_with_out(&nd.join("sub"), &nd).unwrap_err() {
        IoError::OutputOverwritesInput { pairs, .. } => {
            assert_eq!(pairs, vec![("sub/x.png".to_string(), "x.png".to_string())])
        }
        e => panic!("unexpected {e}"),
    }
    // The message says what to do.
    let msg = list_with_out(&list, &d).unwrap_err().to_string();
    assert!(
        msg.contains("would overwrite an input file") && msg.contains("give an output directory"),
        "{msg}"
    );
}

/// Audit #1 for tar shards: the tar layout's `<output>/<shard>.tar` would replace the input.
#[test]
fn an_output_tar_that_is_the_input_shard_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let mut b = tar::Builder::new(std::fs::File::create(shards.join("s-000.tar")).unwrap());
    let png =
        std::fs::read(env!("CARGO_MANIFEST_DIR").to_string() + "/samples/astronaut.png").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(png.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "0001.png", png.as_slice()).unwrap();
    b.into_inner().unwrap();
    let spec = shards.join("s-000.tar");
    match list_with_out(&spec, &shards).unwrap_err() {
        IoError::OutputOverwritesInput { pairs, .. } => {
            assert_eq!(pairs, vec![("s-000.tar".into(), "s-000.tar".into())])
        }
        e => panic!("unexpected {e}"),
    }
    list_with_out(&spec, &dir.path().join("out")).unwrap();
}

/// Audit #13: an output directory that is the input directory is named as such, not reported
/// as "no input images found".
#[test]
fn an_output_directory_that_is_the_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("in");
    touch(&d.join("a.png"), b"x");
    let err = list_inputs(&d, Some(&d)).unwrap_err();
    assert!(matches!(err, IoError::OutputIsInput { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("the output directory is the input directory"),
        "{err}"
    );
    // Spelled differently (a trailing `.`), it is still the same directory.
    assert!(matches!(
        list_inputs(&d, Some(&d.join("."))).unwrap_err(),
        IoError::OutputIsInput { .. }
    ));
}

/// Audit #9: a UTF-8 byte-order mark at the start of a list file is not part of the first path.
#[test]
fn a_list_file_byte_order_mark_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("bom.txt");
    touch(&list, b"\xef\xbb\xbfimgs/r.jpg\r\nimgs/c.jpg\r\n");
    let l = list_inputs(&list, None).unwrap();
    let rels: Vec<&str> = l.items.iter().map(|i| i.rel.as_str()).collect();
    assert_eq!(rels, vec!["imgs/r.jpg", "imgs/c.jpg"]);
    assert_eq!(l.items[0].path, dir.path().join("imgs/r.jpg"));
}

/// Audit #22: one file listed twice is kept once with a warning; two files under one name stay
/// a collision.
#[test]
fn a_file_listed_twice_is_kept_once_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    touch(&d.join("imgs/r.jpg"), b"x");
    touch(
        &d.join("list.txt"),
        b"imgs/r.jpg\n./imgs/r.jpg\nimgs/x/../r.jpg\nimgs/c.jpg\n",
    );
    std::fs::create_dir_all(d.join("imgs/x")).unwrap();
    let l = list_inputs(&d.join("list.txt"), None).unwrap();
    let rels: Vec<&str> = l.items.iter().map(|i| i.rel.as_str()).collect();
    assert_eq!(rels, vec!["imgs/r.jpg", "imgs/c.jpg"]);
    assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    let w = &l.warnings[0];
    assert!(
        w.contains("2 path(s) listed more than once")
            && w.contains("on line 2 repeats line 1")
            && w.contains("on line 3 repeats line 1"),
        "{w}"
    );
    check_output_collisions(&l.items).unwrap();
    // One name for two files (`link/..` is `elsewhere`, not the list's directory, on disk):
    // both kept, and refused as a collision.
    #[cfg(unix)]
    {
        touch(&d.join("data/a.jpg"), b"x");
        touch(&d.join("elsewhere/data/a.jpg"), b"y");
        std::fs::create_dir_all(d.join("elsewhere/sub")).unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere/sub"), d.join("link")).unwrap();
        touch(&d.join("two.txt"), b"data/a.jpg\nlink/../data/a.jpg\n");
        let l = list_inputs(&d.join("two.txt"), None).unwrap();
        assert_eq!(l.items.len(), 2);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let err = check_output_collisions(&l.items).unwrap_err();
        assert!(matches!(err, IoError::OutputCollision { .. }), "{err}");
    }
}

/// Audit #21: a single image, or a binary file, is not called a list file with a "line 0".
#[test]
fn a_single_image_or_binary_file_as_input_says_what_to_give() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("rocket.JPG");
    touch(&img, b"\xff\xd8\xff\xe0 not UTF-8 \xff");
    let err = list_inputs(&img, None).unwrap_err();
    assert!(matches!(err, IoError::SingleImage { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("a single image is not accepted")
            && msg.contains("one image path per line")
            && !msg.contains(":0")
            && !msg.contains("--input"),
        "{msg}"
    );
    let bin = dir.path().join("data.bin");
    touch(&bin, b"\x00\x9f\x92\x96");
    let err = list_inputs(&bin, None).unwrap_err();
    assert!(matches!(err, IoError::NotAListFile { .. }), "{err}");
    assert!(
        !err.to_string().contains(":0") && !err.to_string().contains("--input"),
        "{err}"
    );
}

/// Audit #12: images in an excluded directory count as excluded; hidden files are not counted
/// as ignored non-image files.
#[test]
fn excluded_directories_are_counted_and_hidden_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for f in [
        "raw/deep/a.jpg",
        "raw/deep/b.png",
        "raw/notes.txt",
        "keep/b.jpg",
        "keep/c.png",
        ".hidden.jpg",
        ".git/x.png",
        "readme.md",
    ] {
        touch(&d.join(f), b"x");
    }
    let opts = |ex: &[&str]| ListOptions {
        exclude_dirs: Vec::new(),
        exclude: ex.iter().map(|s| s.to_string()).collect(),
    };
    let l = list_inputs_with(d, &opts(&["raw"])).unwrap();
    assert_eq!(l.items.len(), 2);
    assert_eq!(l.excluded, 2, "raw/deep/a.jpg, raw/deep/b.png");
    assert_eq!(
        l.ignored, 1,
        "readme.md only: not .hidden.jpg, not raw/notes.txt"
    );
    let l = list_inputs_with(d, &opts(&["*.jpg", "raw"])).unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(l.excluded, 3);
    // With everything excluded the message gives every count.
    let err = list_inputs_with(d, &opts(&["keep", "raw"])).unwrap_err();
    assert!(
        err.to_string()
            .contains("1 other file(s) ignored, 2 hidden, 4 excluded"),
        "{err}"
    );
    // An excluded directory that cannot be read is passed over, not an error (it may be
    // excluded for that reason). Only checkable where permissions apply (not as root).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let locked = d.join("raw/deep");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read_dir(&locked).is_err() {
            assert!(list_inputs_with(d, &opts(&[])).is_err());
            let l = list_inputs_with(d, &opts(&["raw"])).unwrap();
            assert_eq!(l.items.len(), 2);
        }
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Audit #14: an output over ε that its record describes truly is reported once, as the file's
/// violation; a record over ε for a file within ε is a disagreement; and the number of measured
/// pairs is given, so nothing measured is not shown as "max 0".
#[test]
fn verify_reports_an_eps_excess_once_and_counts_what_it_measured() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, adv) = make_pair(dir.path());
    let good = verify(&clean, &adv, 8.0 / 255.0).unwrap();
    assert!(good.is_ok(), "{:?}", good.violations);
    assert_eq!((good.checked, good.measured), (3, 3));
    // ε = 4/255: the files and their records (8/255) agree that each image is over ε; each is
    // reported once, as the file's L∞, and nothing "disagrees".
    let rep = verify(&clean, &adv, 4.0 / 255.0).unwrap();
    assert_eq!(rep.violations.len(), 3, "{:?}", rep.violations);
    assert!(rep
        .violations
        .iter()
        .all(|v| matches!(v.kind, ViolationKind::LinfExceeded { .. })));
    // A record over ε for a file within ε: the record and the file disagree.
    let mut lines = read_manifest(&adv.join(MANIFEST_FILE)).unwrap();
    lines[0].linf = Some(9.0);
    std::fs::remove_file(adv.join(MANIFEST_FILE)).unwrap();
    let mut w = ManifestWriter::open(&adv).unwrap();
    for r in &lines {
        w.append(r).unwrap();
    }
    drop(w);
    let rep = verify(&clean, &adv, 8.0 / 255.0).unwrap();
    assert_eq!(rep.violations.len(), 1, "{:?}", rep.violations);
    let text = rep.violations[0].to_string();
    assert!(
        matches!(
            rep.violations[0].kind,
            ViolationKind::ManifestDisagrees { .. }
        ) && text.contains("record says linf 9.0000/255 > eps 8.0000/255, the output measures"),
        "{text}"
    );
    // Nothing measurable: measured is 0.
    let (c2, a2) = (dir.path().join("c2"), dir.path().join("a2"));
    write_rgb_png(&c2.join("x.png"), 6, 6, 1);
    write_rgb_png(&a2.join("x.png"), 6, 5, 1);
    let rep = verify(&c2, &a2, 8.0 / 255.0).unwrap();
    assert_eq!((rep.checked, rep.measured), (1, 0));
}

/// Audit #1 and #26 for verify: `--adv` that is the clean images themselves is refused, and a
/// corrupt `run.json` gets a note instead of silence.
#[test]
fn verify_refuses_clean_as_adv_and_notes_a_corrupt_run_record() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, adv) = make_pair(dir.path());
    assert!(matches!(
        verify(&clean, &clean, 8.0 / 255.0).unwrap_err(),
        IoError::OutputIsInput { .. }
    ));
    let list = clean.join("list.txt");
    touch(&list, b"a.png\ns/b.png\n");
    match verify(&list, &clean, 8.0 / 255.0).unwrap_err() {
        IoError::OutputOverwritesInput { pairs, .. } => assert_eq!(pairs.len(), 2),
        e => panic!("unexpected {e}"),
    }
    verify(&list, &adv, 8.0 / 255.0).unwrap();
    std::fs::write(adv.join("run.json"), "{broken").unwrap();
    let rep = verify(&clean, &adv, 8.0 / 255.0).unwrap();
    assert!(rep.is_ok());
    assert!(
        rep.notes
            .iter()
            .any(|n| n.contains("run.json: not a run record") && n.contains("not compared")),
        "{:?}",
        rep.notes
    );
}

/// A tar shard holding one member name twice (as `tar rf` appends) is named as such, not as two
/// inputs to rename.
#[test]
fn a_tar_member_name_repeated_in_its_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("s-000.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&shard).unwrap());
    let png =
        std::fs::read(env!("CARGO_MANIFEST_DIR").to_string() + "/samples/astronaut.png").unwrap();
    for _ in 0..2 {
        let mut h = tar::Header::new_gnu();
        h.set_size(png.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "k/0001.png", png.as_slice()).unwrap();
    }
    b.into_inner().unwrap();
    let list = list_inputs(&shard, None).unwrap();
    let err = check_output_collisions_in(&list.items, OutputLayout::Tar).unwrap_err();
    assert!(matches!(err, IoError::RepeatedTarMember { .. }), "{err}");
    assert!(err.to_string().contains("s-000.tar/k/0001.png"), "{err}");
    assert!(!err.to_string().contains("rename the inputs"), "{err}");
}
