//! Eval's outputs never land on its inputs.
//!
//! `--pictures DIR` writes `DIR/<rel>.png`, the very name `prm attack` gives the adversarial
//! image of `<rel>` in its output directory; `--save-predictions DIR` writes
//! `DIR/{clean,adv}/<rel>.png`, which is the adversarial image again when `--adv` is
//! `DIR/adv`; `--report` may name any file. Scanning `--clean` already leaves the output
//! directories out, but that protects neither `--adv`, nor a list file's images, nor label
//! maps, nor the files named by other flags. Each of these mistakes would destroy the
//! attack's results (or the ground truth) and still exit 0, so every path an evaluation would
//! write is compared with every input it reads, once, before any work.
//!
//! Paths are compared after resolving their directories (`canonicalize` of the longest part
//! that exists), so `adv`, `./adv` and a symbolic link to it are one directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::EvalError;
use crate::io::paths::resolved;
use crate::io::{InputItem, OutputLayout};

/// What an evaluation reads, besides the listed images.
#[derive(Default)]
pub struct Inputs<'a> {
    /// `--adv`: the attack's output directory.
    pub adv: Option<&'a Path>,
    /// `--labels DIR` of label maps at the images' relative paths (dense targets).
    pub label_dir: Option<&'a Path>,
    /// Single files, with the flag that names them: `--classes`, a `--labels` file, `--probe`,
    /// `--tokenizer`, a `--clean` list file.
    pub files: Vec<(&'static str, &'a Path)>,
}

/// What an evaluation writes.
#[derive(Default)]
pub struct Outputs<'a> {
    /// `--pictures DIR`: `DIR/<rel>.png`.
    pub pictures: Option<&'a Path>,
    /// `--save-predictions DIR`: `DIR/clean/<rel>.png` and `DIR/adv/<rel>.png`.
    pub save_predictions: Option<&'a Path>,
    /// Single files, with the flag that names them (the report and its Markdown summary).
    pub files: Vec<(&'static str, &'a Path)>,
}

/// Refuses an output directory that is an existing file, or lies under one:
/// [`crate::io::paths::check_output_dir`] as eval's usage error.
pub fn check_output_dir(flag: &str, dir: &Path) -> Result<(), EvalError> {
    crate::io::paths::check_output_dir(flag, dir).map_err(EvalError::Usage)
}

/// Refuses outputs written over each other: a picture over a prediction map (`--pictures` set
/// to `--save-predictions`'s `clean/`, say), or a report over either. Only output directories
/// that lie one inside the other, and files inside an output directory, can clash, so the
/// per-image paths are formed only then.
fn check_outputs_apart(
    items: &[InputItem],
    roots: &[(&str, &Path, PathBuf, &[&str])],
    outputs: &Outputs,
    files: &[(&str, PathBuf)],
) -> Result<(), EvalError> {
    let nested = roots.iter().enumerate().any(|(i, a)| {
        roots[i + 1..]
            .iter()
            .any(|b| a.2.starts_with(&b.2) || b.2.starts_with(&a.2))
    });
    let file_inside = files
        .iter()
        .any(|(_, f)| roots.iter().any(|(_, _, r, _)| f.starts_with(r)));
    if !nested && !file_inside {
        return Ok(());
    }
    let mut written: HashMap<PathBuf, (&str, &Path)> = HashMap::new();
    for (&(flag, given), (_, f)) in outputs.files.iter().zip(files) {
        written.insert(f.clone(), (flag, given));
    }
    for item in items {
        let tree = OutputLayout::Tree.output_rel(item);
        for &(flag, given, ref root, subs) in roots {
            for sub in subs {
                let path = root.join(sub).join(&tree);
                if let Some((other, other_given)) = written.insert(path.clone(), (flag, given)) {
                    if other != flag {
                        return Err(EvalError::Usage(format!(
                            "{flag} {} and {other} {} would both write {}; give them places \
                             apart",
                            given.display(),
                            other_given.display(),
                            path.display()
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Refuses, before any work, an evaluation that would write any of its outputs over one of its
/// inputs: an adversarial image, the attack's `run.json` or `manifest.jsonl`, a clean image, a
/// label map, or a file named by another flag.
pub fn check_outputs_spare_inputs(
    items: &[InputItem],
    inputs: &Inputs,
    outputs: &Outputs,
) -> Result<(), EvalError> {
    // (flag, the directory given, resolved, the sub-directories it writes `<rel>.png` into)
    let roots: Vec<(&str, &Path, PathBuf, &[&str])> = [
        ("--pictures", outputs.pictures, &[""][..]),
        (
            "--save-predictions",
            outputs.save_predictions,
            &["clean", "adv"][..],
        ),
    ]
    .into_iter()
    .filter_map(|(flag, dir, subs)| Some((flag, dir?, resolved(dir?), subs)))
    .collect();
    let files: Vec<(&str, PathBuf)> = outputs
        .files
        .iter()
        .map(|&(flag, f)| (flag, resolved(f)))
        .collect();
    if roots.is_empty() && files.is_empty() {
        return Ok(());
    }
    check_outputs_apart(items, &roots, outputs, &files)?;
    // Only inputs where an output could land are kept: one lookup per written path.
    let relevant = |p: &Path| {
        roots.iter().any(|(_, _, r, _)| p.starts_with(r)) || files.iter().any(|(_, f)| f == p)
    };
    let mut protected: HashMap<PathBuf, String> = HashMap::new();
    let mut protect = |p: PathBuf, what: &dyn Fn() -> String| {
        if relevant(&p) {
            protected.entry(p).or_insert_with(what);
        }
    };
    for &(flag, f) in &inputs.files {
        protect(resolved(f), &|| format!("the {flag} file"));
    }
    let adv = inputs.adv.map(resolved);
    let labels = inputs.label_dir.map(resolved);
    if let Some(adv) = &adv {
        for (name, what) in [
            ("run.json", "the attack's run record"),
            ("manifest.jsonl", "the attack's manifest"),
        ] {
            protect(adv.join(name), &|| format!("{what} (--adv)"));
        }
    }
    // Clean images: their directories resolved once each.
    let mut dirs: HashMap<&Path, PathBuf> = HashMap::new();
    for item in items {
        let rel = &item.rel;
        let tree = OutputLayout::Tree.output_rel(item);
        if let Some(adv) = &adv {
            let what = || format!("the adversarial image of `{rel}` (--adv)");
            protect(adv.join(&tree), &what);
            // An adversarial image of the clean one's own name, found when the first is not.
            protect(adv.join(rel), &what);
            if let Some(m) = &item.member {
                protect(adv.join(&m.shard.rel), &|| {
                    format!("the adversarial shard {} (--adv)", m.shard.rel)
                });
                protect(adv.join(OutputLayout::Tar.file_rel(item)), &what);
            }
        }
        if let Some(labels) = &labels {
            protect(labels.join(&tree), &|| {
                format!("the label map of `{rel}` (--labels)")
            });
        }
        let (Some(parent), Some(name)) = (item.path.parent(), item.path.file_name()) else {
            continue;
        };
        let dir = dirs.entry(parent).or_insert_with(|| resolved(parent));
        protect(dir.join(name), &|| match &item.member {
            Some(_) => format!("the clean shard {} (--clean)", item.path.display()),
            None => format!("the clean image `{rel}` (--clean)"),
        });
    }
    if protected.is_empty() {
        return Ok(());
    }
    let refuse = |flag: &str, given: &Path, written: &Path, what: &String, other: &str| {
        Err(EvalError::Usage(format!(
            "{flag} {} would write {} over {what}; give {flag} another {other}",
            given.display(),
            written.display()
        )))
    };
    for (&(flag, given), (_, f)) in outputs.files.iter().zip(&files) {
        if let Some(what) = protected.get(f) {
            return refuse(flag, given, f, what, "file");
        }
    }
    for item in items {
        let tree = OutputLayout::Tree.output_rel(item);
        for &(flag, given, ref root, subs) in &roots {
            for sub in subs {
                let written = root.join(sub).join(&tree);
                if let Some(what) = protected.get(&written) {
                    return refuse(flag, given, &written, what, "directory");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(path: &Path, rel: &str) -> InputItem {
        InputItem::file(path, rel)
    }

    /// `--pictures` on `--adv`, `--save-predictions` on its parent, and a report on `run.json`
    /// are refused, naming the file; a pictures directory inside `--adv` that writes over no
    /// image, and directories elsewhere, are accepted.
    #[test]
    fn outputs_over_adversarial_images_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let (clean, adv) = (t.path().join("clean"), t.path().join("adv"));
        std::fs::create_dir_all(clean.join("sub")).unwrap();
        std::fs::create_dir_all(&adv).unwrap();
        let items = [
            item(&clean.join("a.jpg"), "a.jpg"),
            item(&clean.join("sub/b.png"), "sub/b.png"),
        ];
        let inputs = Inputs {
            adv: Some(&adv),
            ..Default::default()
        };
        let dotted = t.path().join("clean/../adv/.");
        let parent = t.path().to_path_buf();
        let run_json = adv.join("run.json");
        let (inner, pictures, pred, report) = (
            adv.join("pictures"),
            t.path().join("pictures"),
            t.path().join("pred"),
            t.path().join("r.json"),
        );
        let cases: [(Outputs, Option<&str>); 5] = [
            (
                Outputs {
                    pictures: Some(&dotted),
                    ..Default::default()
                },
                Some("a.png over the adversarial image of `a.jpg`"),
            ),
            (
                Outputs {
                    save_predictions: Some(&parent),
                    ..Default::default()
                },
                Some("--save-predictions"),
            ),
            (
                Outputs {
                    files: vec![("--report", &run_json)],
                    ..Default::default()
                },
                Some("run record"),
            ),
            (
                Outputs {
                    pictures: Some(&inner),
                    ..Default::default()
                },
                None,
            ),
            (
                Outputs {
                    pictures: Some(&pictures),
                    save_predictions: Some(&pred),
                    files: vec![("--report", &report)],
                },
                None,
            ),
        ];
        for (outputs, refused) in cases {
            let got = check_outputs_spare_inputs(&items, &inputs, &outputs);
            match refused {
                Some(text) => {
                    let e = got.unwrap_err().to_string();
                    assert!(e.contains(text), "{e}");
                }
                None => got.unwrap(),
            }
        }
    }

    /// A list file's images, label maps and named files are inputs too.
    #[test]
    fn clean_images_label_maps_and_named_files_are_spared() {
        let t = tempfile::tempdir().unwrap();
        let list_dir = t.path().join("list");
        std::fs::create_dir_all(&list_dir).unwrap();
        let items = [item(&list_dir.join("x.png"), "x.png")];
        let classes = t.path().join("classes.txt");
        let labels = t.path().join("labels");
        let inputs = Inputs {
            label_dir: Some(&labels),
            files: vec![("--classes", &classes)],
            ..Default::default()
        };
        for (outputs, text) in [
            (
                Outputs {
                    pictures: Some(&list_dir),
                    ..Default::default()
                },
                "the clean image `x.png`",
            ),
            (
                Outputs {
                    pictures: Some(&labels),
                    ..Default::default()
                },
                "the label map of `x.png`",
            ),
            (
                Outputs {
                    files: vec![("--report", &classes)],
                    ..Default::default()
                },
                "the --classes file",
            ),
        ] {
            let e = check_outputs_spare_inputs(&items, &inputs, &outputs)
                .unwrap_err()
                .to_string();
            assert!(e.contains(text), "{e}");
        }
    }

    #[test]
    fn an_output_directory_that_is_a_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("afile");
        std::fs::write(&f, "x").unwrap();
        for dir in [f.clone(), f.join("sub")] {
            let e = check_output_dir("--pictures", &dir)
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a directory"), "{e}");
        }
        check_output_dir("--pictures", &t.path().join("new/dir")).unwrap();
        check_output_dir("--pictures", Path::new("relative")).unwrap();
    }

    /// Outputs over each other: pictures in `--save-predictions`'s `clean/` write the same files
    /// as its prediction maps, and a report named like a picture would be replaced by it.
    #[test]
    fn outputs_written_over_each_other_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let clean = t.path().join("clean");
        let items = [item(&clean.join("a.png"), "a.png")];
        let pred = t.path().join("pred");
        let in_clean = pred.join("clean");
        let report = pred.join("adv/a.png");
        let beside = t.path().join("pictures");
        let inputs = Inputs::default();
        for (outputs, refused) in [
            (
                Outputs {
                    pictures: Some(&in_clean),
                    save_predictions: Some(&pred),
                    ..Default::default()
                },
                true,
            ),
            (
                Outputs {
                    save_predictions: Some(&pred),
                    files: vec![("--report", &report)],
                    ..Default::default()
                },
                true,
            ),
            (
                Outputs {
                    pictures: Some(&pred),
                    save_predictions: Some(&pred),
                    ..Default::default()
                },
                false,
            ),
            (
                Outputs {
                    pictures: Some(&beside),
                    save_predictions: Some(&pred),
                    ..Default::default()
                },
                false,
            ),
        ] {
            let got = check_outputs_spare_inputs(&items, &inputs, &outputs);
            if refused {
                let e = got.unwrap_err().to_string();
                assert!(e.contains("would both write"), "{e}");
            } else {
                got.unwrap();
            }
        }
    }
}
