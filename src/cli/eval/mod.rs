//! `prm eval`: a downstream target on clean and adversarial images, with a JSON + Markdown
//! report and optional prediction PNGs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use prm::eval::gpu::GpuTargets;
use prm::eval::ground_truth::LabelSource;
use prm::eval::run::{evaluate_listed, list_clean_images, markdown_summary, EvalSettings};
use prm::eval::targets::{read_probe, TargetKind};
use prm::eval::{EvalEngine, ReferenceTargets};
use prm::model::Model;

use super::EXIT_SOME_FAILED;

mod class_embeddings;
mod preflight;
mod summary;

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

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let resolution = preflight::check_args(&args)?;
    // The images first: a mistake in the paths shows before the model loads.
    let own_outputs: Vec<&Path> = [args.save_predictions.as_deref(), args.pictures.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let items = list_clean_images(&args.clean, &args.adv, &args.exclude, &own_outputs)?;
    preflight::check_outputs(&args, &items)?;
    preflight::check_label_file(&args, &items)?;
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
    let classes = class_embeddings::load_classes(&args, &model, dev, precision)?;
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
    summary::print_notes(
        &args,
        &outcome,
        &gpus,
        engines.len(),
        classes.is_some(),
        started,
        evaluating,
    );
    let summary = markdown_summary(&outcome.report);
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&outcome.report)? + "\n";
        prm::eval::labels::write_text_atomic(path, &json)?;
        prm::eval::labels::write_text_atomic(&preflight::report_paths(path), &summary)?;
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
