//! `prm eval`: a downstream target on clean and adversarial images, with a JSON + Markdown
//! report and optional prediction PNGs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use prm::eval::gpu::{GpuTargets, PASS_TOKENS};
use prm::eval::ground_truth::LabelSource;
use prm::eval::labels::{check_lines_name_images, read_label_lines};
use prm::eval::outputs::{check_output_dir, check_outputs_spare_inputs, Inputs, Outputs};
use prm::eval::run::{evaluate_listed, list_clean_images, markdown_summary, EvalSettings};
use prm::eval::targets::{read_probe, TargetKind};
use prm::eval::text::{is_safetensors, read_class_safetensors, ClassEmbeddings};
use prm::eval::{EvalEngine, EvalError, ReferenceTargets};
use prm::gpu::engine::Precision;
use prm::gpu::Device;
use prm::io::InputItem;
use prm::model::{load_text_tower, Model};

use super::EXIT_SOME_FAILED;

#[derive(Args)]
pub struct EvalArgs {
    /// A Hugging Face CLIP directory (sharded ones too) or hub id in the local cache
    /// (owner/name[@revision]), an OpenAI/open_clip .safetensors file, or
    /// random:ARCH
    #[arg(long)]
    model: String,
    /// maskclip, sclip, clearclip (segmentation), zeroshot (classification), features (per-layer
    /// drift) or probe (a linear head given with --probe)
    #[arg(long, value_parser = TargetKind::parse)]
    target: TargetKind,
    /// The clean images as given to `prm attack --input`: a directory (scanned recursively), a
    /// list file, or tar shards (`shards/train-{000..009}.tar`)
    #[arg(long)]
    clean: PathBuf,
    /// Inputs left out, as given to `prm attack --exclude` (repeatable)
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Pixel budget for decoding, as given to `prm attack --max-pixels`
    #[arg(long, default_value_t = prm::io::DEFAULT_MAX_PIXELS, value_parser = clap::value_parser!(u64).range(1..))]
    max_pixels: u64,
    /// The attack's output directory: <adv>/<relative path with .png>, or for tar inputs the
    /// output shards (either of prm attack's layouts)
    #[arg(long)]
    adv: PathBuf,
    /// Class embeddings: a .safetensors with `class_embeddings` [C, E] and metadata `names` (as
    /// `prm classes` writes), or a text file of class names (embedded with the checkpoint's text
    /// tower and the 80 CLIP prompt templates)
    #[arg(long)]
    classes: Option<PathBuf>,
    /// tokenizer.json for class names given as text (default: next to the checkpoint; bundled
    /// for random:ARCH)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Only the template "a photo of a {}." instead of the 80-template ensemble (class names
    /// given as text)
    #[arg(long)]
    single_template: bool,
    /// Ground truth: a directory of class-index PNGs (segmentation, same relative paths with
    /// .png), or for zeroshot a text file of `<relative path><TAB><class name or index>` lines
    /// (a comma or, when the path holds none, a space also separates them); or
    /// member:EXT, the member <key>.EXT of each image's sample in the clean tar shards
    /// (member:seg.png label maps, member:cls class names or indices)
    #[arg(long, value_parser = LabelSource::parse)]
    labels: Option<LabelSource>,
    /// Label value that is not counted
    #[arg(long, default_value_t = 255)]
    ignore_index: u32,
    /// JSON report (a Markdown summary is written next to it, extension .md)
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write 8-bit label maps DIR/clean/<rel>.png and DIR/adv/<rel>.png at native size
    #[arg(long)]
    save_predictions: Option<PathBuf>,
    /// Write a picture per image, DIR/<rel>.png: clean | adversarial | amplified perturbation,
    /// then for segmentation targets clean | adversarial label maps in a fixed palette with a
    /// legend of the classes shown (classification: the predicted classes in the titles)
    #[arg(long, value_name = "DIR")]
    pictures: Option<PathBuf>,
    /// native (default) or N: resize every image to N×N (bicubic) before the model
    #[arg(long, default_value = "native")]
    resolution: String,
    /// probe target: safetensors head (`weight` [K, D] or [K, D, 1, 1], optional `bias` [K])
    #[arg(long)]
    probe: Option<PathBuf>,
    /// probe target: feature layer l of F_0..F_L (default: metadata `layer`, else L)
    #[arg(long)]
    probe_layer: Option<usize>,
    /// probe target: classify the CLS token instead of every patch token
    #[arg(long)]
    probe_cls: bool,
    /// auto (CUDA device 0 if there is one, else cpu), cpu, cuda[:N], several GPUs in one
    /// process: cuda:all (every device) or cuda:0,1,... (one engine per device, taking batches
    /// from one queue; the records are the same on one device or several of one kind), sim, or
    /// sim:N (N simulated devices, for tests)
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp32, or bf16 (GPU engine only: bf16 inputs to the matrix products and, on tensor cores,
    /// to attention's)
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Image pairs the device runs at once: the clean and adversarial images of up to N pairs
    /// packed into one forward (at most 32,768 tokens a pass; a larger batch runs as several).
    /// On the CPU and the simulator a record does not depend on it; on CUDA see
    /// --batch-invariant
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_size: u64,
    /// Keep one cuBLASLt algorithm per kind of matrix product whatever the batch, so that an
    /// image's predictions cannot depend on the images batched with it (the same as
    /// PRM_BATCH_INVARIANT=1; not yet measured on a GPU)
    #[arg(long)]
    batch_invariant: bool,
    /// No progress bar or summary
    #[arg(long, short)]
    quiet: bool,
}

fn load_classes(
    args: &EvalArgs,
    model: &Model,
    dev: Option<&Device>,
    precision: Precision,
) -> anyhow::Result<Option<ClassEmbeddings>> {
    let needs = matches!(
        args.target,
        TargetKind::MaskClip | TargetKind::Sclip | TargetKind::ClearClip | TargetKind::ZeroShot
    );
    let Some(path) = &args.classes else {
        if needs {
            bail!(
                "--target {} needs --classes FILE (a .safetensors of class embeddings or a text \
                 file of class names)",
                args.target.name()
            );
        }
        return Ok(None);
    };
    if !needs {
        bail!(
            "--target {} takes no --classes (its classes come from {})",
            args.target.name(),
            if args.target == TargetKind::Probe {
                "the probe file"
            } else {
                "nowhere: it compares features"
            }
        );
    }
    if !path.is_file() {
        bail!("--classes {}: no such file", path.display());
    }
    // The dense targets project every patch token with CLIP's projection; zeroshot reads the
    // image embedding, however the tower pools it.
    let e = if args.target.is_dense() {
        model.image_projection().map(|p| p.out_features)
    } else {
        model.image_head().map(|h| h.dim())
    }
    .map_err(EvalError::NoImageEmbedding)
    .context("class embeddings need image embeddings")?;
    let classes = if is_safetensors(path) {
        let mut classes = read_class_safetensors(path)?;
        // Compared when both are known: a file that names its text tower, and a checkpoint
        // with one (a vision-only checkpoint cannot say).
        if let Some(theirs) = &classes.text_weights {
            if let Ok(Some(tower)) = load_text_tower(&args.model) {
                classes.text_weights_match = Some(tower.fingerprint() == *theirs);
            }
        }
        classes
    } else {
        super::classes::embed_names_file(
            &args.model,
            path,
            args.tokenizer.as_deref(),
            args.single_template,
            dev,
            precision,
        )?
    };
    if classes.dim != e {
        return Err(EvalError::EmbedDim {
            classes: classes.dim,
            model: e,
        }
        .into());
    }
    Ok(Some(classes))
}

fn report_paths(report: &Path) -> PathBuf {
    report.with_extension("md")
}

/// `--tokenizer` and `--single-template` say how class names are embedded: with embeddings
/// read from a `.safetensors` (made once, by `prm classes`), or with no `--classes` at all,
/// they would be ignored, and the report would claim settings that were not used.
fn check_text_class_flags(args: &EvalArgs) -> anyhow::Result<()> {
    let flags = [
        (args.single_template, "--single-template"),
        (args.tokenizer.is_some(), "--tokenizer"),
    ];
    for flag in flags.iter().filter(|f| f.0).map(|f| f.1) {
        match &args.classes {
            None => bail!(
                "{flag} applies to class names given as a text file with --classes, and there \
                 is no --classes"
            ),
            Some(c) if is_safetensors(c) => bail!(
                "{flag} applies to class names embedded here, but --classes {} holds embeddings \
                 made already; leave {flag} out, or give it to `prm classes` when making them",
                c.display()
            ),
            Some(_) => {}
        }
    }
    if let Some(t) = &args.tokenizer {
        if !t.is_file() {
            bail!("--tokenizer {}: no such file", t.display());
        }
    }
    Ok(())
}

/// Refuses, before the model loads, outputs that would be written over inputs
/// ([`check_outputs_spare_inputs`]): `--pictures` in `--adv` would replace the adversarial
/// images with their pictures, and so on.
fn check_outputs(args: &EvalArgs, items: &[InputItem]) -> anyhow::Result<()> {
    let label_path = match &args.labels {
        Some(LabelSource::Path(p)) => Some(p.as_path()),
        _ => None,
    };
    let mut files: Vec<(&'static str, &Path)> = [
        ("--classes", args.classes.as_deref()),
        ("--probe", args.probe.as_deref()),
        ("--tokenizer", args.tokenizer.as_deref()),
        ("--labels", label_path.filter(|p| p.is_file())),
    ]
    .into_iter()
    .filter_map(|(flag, p)| Some((flag, p?)))
    .collect();
    if args.clean.is_file() {
        // A list file (or a single tar shard, protected with its members anyway).
        files.push(("--clean", &args.clean));
    }
    let summary = args.report.as_deref().map(report_paths);
    let written: Vec<(&'static str, &Path)> = [args.report.as_deref(), summary.as_deref()]
        .into_iter()
        .flatten()
        .map(|p| ("--report", p))
        .collect();
    check_outputs_spare_inputs(
        items,
        &Inputs {
            adv: Some(&args.adv),
            label_dir: label_path.filter(|p| p.is_dir()),
            files,
        },
        &Outputs {
            pictures: args.pictures.as_deref(),
            save_predictions: args.save_predictions.as_deref(),
            files: written,
        },
    )?;
    Ok(())
}

/// A classification `--labels FILE` none of whose lines names an image is refused before the
/// model loads (its classes are checked once the class names are known).
fn check_label_file(args: &EvalArgs, items: &[InputItem]) -> anyhow::Result<()> {
    let Some(LabelSource::Path(p)) = &args.labels else {
        return Ok(());
    };
    match args.target {
        TargetKind::Features => bail!(
            "--labels {}: the features target takes no labels",
            p.display()
        ),
        t if t.is_dense() && !p.is_dir() => bail!(
            "--labels {}: --target {} needs a directory of label PNGs",
            p.display(),
            t.name()
        ),
        TargetKind::ZeroShot | TargetKind::Probe if p.is_file() => {
            check_lines_name_images(p, &read_label_lines(p)?, items)?;
        }
        _ => {}
    }
    Ok(())
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let resolution = match args.resolution.as_str() {
        "native" => None,
        s => match s.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => bail!("--resolution {s}: use native or a positive size N"),
        },
    };
    if !args.clean.exists() && !prm::io::webdataset::is_tar_spec(&args.clean.to_string_lossy()) {
        bail!(
            "--clean {}: no such file or directory",
            args.clean.display()
        );
    }
    if !args.adv.is_dir() {
        bail!("--adv {}: not a directory", args.adv.display());
    }
    if let Some(LabelSource::Path(l)) = &args.labels {
        if !l.exists() {
            bail!("--labels {}: no such file or directory", l.display());
        }
    }
    if (args.target == TargetKind::Probe) != args.probe.is_some() {
        bail!("--probe FILE is required by --target probe, and used by it only");
    }
    check_text_class_flags(&args)?;
    for (flag, dir) in [
        ("--pictures", &args.pictures),
        ("--save-predictions", &args.save_predictions),
    ] {
        if let Some(dir) = dir {
            check_output_dir(flag, dir)?;
        }
    }
    if let Some(report) = &args.report {
        if report.is_dir() {
            bail!(
                "--report {}: is a directory; give a FILE.json",
                report.display()
            );
        }
        // The summary is a second file the user did not name: it may replace an earlier
        // summary, never another file (a LICENSE.md beside a LICENSE.json report).
        let summary = report_paths(report);
        if summary.is_file() {
            let head = std::fs::read(&summary).unwrap_or_default();
            if !head.starts_with(b"# prm eval") {
                bail!(
                    "--report {} writes its summary to {}, which holds another file; give the \
                     report another name",
                    report.display(),
                    summary.display()
                );
            }
        }
    }
    // The images first: a mistake in the paths shows before the model loads.
    let own_outputs: Vec<&Path> = [args.save_predictions.as_deref(), args.pictures.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let items = list_clean_images(&args.clean, &args.adv, &args.exclude, &own_outputs)?;
    check_outputs(&args, &items)?;
    check_label_file(&args, &items)?;
    let (devices, precision) = super::device::choose_devices(&args.device, &args.precision)?;
    super::device::batch_invariant_products(&devices, args.batch_invariant);
    // The text tower, when class names are embedded, runs on the first device.
    let dev = devices.first();
    let model =
        Model::load(&args.model).with_context(|| format!("cannot load model '{}'", args.model))?;
    if let Some(n) = resolution {
        prm::attack::settings::check_fixed_size(
            n,
            model.config.patch,
            args.max_pixels,
            Some("--max-pixels"),
        )
        .map_err(anyhow::Error::msg)?;
    }
    let probe = match &args.probe {
        Some(p) => Some(read_probe(
            p,
            &model,
            args.probe_layer,
            args.probe_cls.then_some(false),
        )?),
        None => None,
    };
    let classes = load_classes(&args, &model, dev, precision)?;
    let random = model.source.weights_are_random();
    let settings = EvalSettings {
        target: args.target,
        resolution,
        ignore_index: args.ignore_index,
        labels: args.labels.clone(),
        save_predictions: args.save_predictions.clone(),
        pictures: args.pictures.clone(),
        probe,
        exclude: args.exclude.clone(),
        max_pixels: args.max_pixels,
        batch_size: args.batch_size as usize,
        product_algorithms: dev.map(|d| d.product_algorithms().name()),
        weights: Some(model.fingerprint()),
        model_spec: args.model.clone(),
        weights_random: random,
        device: match devices.as_slice() {
            [] => "cpu".into(),
            [d] if d.is_sim() => "sim".into(),
            [d, ..] if d.is_sim() => format!("sim:{}", devices.len()),
            _ => args.device.clone(),
        },
        precision: args.precision.clone(),
    };
    if random && !args.quiet {
        eprintln!(
            "note: {} has random weights; its evaluation exercises the pipeline and says nothing \
             about real transfer",
            args.model
        );
    }
    // One engine per device, each loaded on its own thread (the weights' uploads overlap).
    let gpus: Vec<GpuTargets> = std::thread::scope(|s| {
        let loading: Vec<_> = devices
            .iter()
            .map(|d| {
                let model = &model;
                s.spawn(move || {
                    GpuTargets::new(d, model, precision)
                        .with_context(|| format!("cannot load the model onto {}", d.name()))
                })
            })
            .collect();
        loading
            .into_iter()
            .map(|l| l.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<anyhow::Result<_>>()
    })?;
    let reference;
    let engines: Vec<&(dyn EvalEngine + Sync)> = if gpus.is_empty() {
        reference = ReferenceTargets::new(&model);
        vec![&reference]
    } else {
        gpus.iter().map(|g| g as &(dyn EvalEngine + Sync)).collect()
    };
    let bar = (!args.quiet).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} images",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    });
    let evaluating = std::time::Instant::now();
    let outcome = evaluate_listed(
        &engines,
        &items,
        &args.adv,
        classes.as_ref(),
        &settings,
        |done, total| {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        },
    )?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if !args.quiet {
        let seconds = evaluating.elapsed().as_secs_f64();
        let total = outcome.total;
        let e = outcome.engine_time;
        let engines = match engines.len() {
            1 => "the engine".to_string(),
            n => format!("the {n} engines (summed)"),
        };
        eprintln!(
            "evaluated {total} image pairs in {seconds:.2} s ({:.1} pairs/s), after {:.2} s of \
             set-up (model, class embeddings); {engines}: {:.2} s busy, {:.2} s waiting for a \
             batch; the batches waited {:.2} s for reading; the finisher (label maps, metrics, \
             files): {:.2} s busy",
            total as f64 / seconds.max(1e-9),
            (evaluating - started).as_secs_f64(),
            e.busy,
            e.idle,
            e.waiting_for_input,
            e.finisher_busy
        );
        if !gpus.is_empty() {
            let (mut passes, mut taken, mut pending) = (0, 0, 0);
            for u in gpus.iter().map(GpuTargets::pass_uploads) {
                (passes, taken, pending) =
                    (passes + u.passes, taken + u.taken, pending + u.copy_pending);
            }
            let logits = match (&classes, gpus.first()) {
                (Some(_), Some(g)) if g.forms_logits() => "; cosine logits formed on the device",
                (Some(_), Some(_)) => "; cosine logits formed on the host (PRM_HOST_LOGITS=1)",
                _ => "",
            };
            eprintln!(
                "device passes: {passes} ({taken} took pixels staged ahead during the pass \
                 before, {pending} of them still copying when taken){logits}"
            );
        }
        if let Some(tokens) = gpus
            .iter()
            .map(GpuTargets::pass_tokens)
            .filter(|&t| t < PASS_TOKENS)
            .min()
        {
            eprintln!(
                "note: a pass ran out of device memory; passes were cut down to at most {tokens} \
                 tokens (the records are the same; a smaller --batch-size avoids the failed \
                 tries)"
            );
        }
        if outcome.batches_rerun_alone > 0 {
            eprintln!(
                "note: {} batches failed as a whole and were run again one pair at a time (their \
                 records are right, at batch 1's speed)",
                outcome.batches_rerun_alone
            );
        }
    }
    // Printed even with --quiet: the predictions themselves are in question.
    if outcome.report["text_weights_match"] == false {
        eprintln!(
            "warning: the class embeddings were made by another text tower ({}) than {}'s: \
             they lie in another embedding space, so the predictions mean nothing; embed the \
             classes with this checkpoint (`prm classes --model {}`)",
            outcome.report["text_weights"].as_str().unwrap_or("?"),
            args.model,
            args.model,
        );
    }
    if outcome.report["attack_weights_match"] == false && !args.quiet {
        eprintln!(
            "note: the adversarial images were made against other weights ({}) than {} ({}): \
             this measures a transfer between two encoders (pass the attack's --model to \
             evaluate the encoder they were made against)",
            outcome.report["attack"]["weights"].as_str().unwrap_or("?"),
            args.model,
            outcome.report["weights"].as_str().unwrap_or("?"),
        );
    }
    // Printed even with --quiet: not progress but a problem with the inputs, which the report
    // also records.
    if let Some(problem) = outcome.report["attack_record_error"].as_str() {
        eprintln!(
            "warning: {problem}: the images are evaluated all the same, but the report cannot \
             say which attack made them"
        );
    }
    let unmatched = outcome.report["unmatched_label_lines"]
        .as_u64()
        .unwrap_or(0);
    if unmatched > 0 && !args.quiet {
        eprintln!(
            "note: {unmatched} line(s) of --labels name no image of this run (e.g. {}); images \
             are named by their path relative to --clean",
            outcome.report["unmatched_label_examples"][0]
                .as_str()
                .unwrap_or("?")
        );
    }
    let summary = markdown_summary(&outcome.report);
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&outcome.report)? + "\n";
        prm::eval::labels::write_text_atomic(path, &json)?;
        prm::eval::labels::write_text_atomic(&report_paths(path), &summary)?;
    }
    if !args.quiet {
        println!("{summary}");
    }
    Ok(if outcome.failed > 0 {
        ExitCode::from(EXIT_SOME_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}
