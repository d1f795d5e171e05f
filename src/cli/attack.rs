//! `prm attack`: the options of DESIGN §8, resolved against a preset, then the run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use clap::Args;
use prm::attack::campaign::{
    Campaign, CampaignError, MemoryBudget, OutputOptions, Progress, RedoneOnResume, Worker,
};
use prm::attack::profile::Timeline;
use prm::attack::*;
use prm::gpu::engine::{GpuVit, Precision};
use prm::gpu::Device;
use prm::io::shard::{shard_from_env, Shard};
use prm::io::{
    check_output_collisions_in, list_inputs_with, InputSource, ListOptions, OutputLayout,
    DEFAULT_MAX_PIXELS,
};
use prm::model::{Model, ModelSource};
use prm::reference::ReferenceVit;
use prm::viz::plot::{write_loss_plot, LossCurves};
use signal_hook::consts::{SIGINT, SIGTERM};

use super::progress::Bar;
use super::require_extension;
use super::settings_args::SettingsArgs;
use super::timeline::{timeline_table, write_trace};
use super::{EXIT_SIGINT, EXIT_SIGTERM, EXIT_SOME_FAILED, EXIT_USAGE};

#[derive(Args)]
pub struct AttackArgs {
    /// A Hugging Face CLIP directory (sharded ones too) or hub id in the local cache
    /// (owner/name[@revision]), an OpenAI/open_clip .safetensors file, or
    /// random:ARCH (tiny, vit-b-32, vit-b-16, vit-l-14, vit-l-14-336, vit-h-14; random:ARCH@SEED
    /// for another seed)
    #[arg(long)]
    model: String,
    /// A directory of images (scanned recursively), a text file with one path per line, or
    /// WebDataset tar shards such as 'shards/train-{000..099}.tar' (quote it)
    #[arg(long)]
    input: PathBuf,
    /// Output directory: <output>/<relative path>.png plus manifest.jsonl
    #[arg(long)]
    output: PathBuf,
    /// Leave out inputs whose relative path matches GLOB (repeatable; `*` also matches `/`)
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// For tar-shard inputs: tar (one output tar per input shard, the default) or tree (a
    /// directory per shard)
    #[arg(long, value_enum)]
    output_layout: Option<LayoutArg>,
    /// Images whose header announces more pixels than this fail without being decoded
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_parser = clap::value_parser!(u64).range(1..))]
    max_pixels: u64,
    /// Settings bundle; explicit flags below override it
    #[arg(long, value_enum, default_value = "paper")]
    preset: Preset,
    #[command(flatten)]
    settings: SettingsArgs,
    /// Seed of every random draw; draws are per image, keyed by (seed, relative path)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto (CUDA device 0 if there is one, else cpu), cpu, cuda[:N], several GPUs in one
    /// process: cuda:all (every device) or cuda:0,1,... (one engine worker per device, each
    /// with its own batch size), sim, or sim:N (N simulated devices, for tests)
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp32, or bf16: bf16 inputs to the matrix products with fp32 accumulation, everything
    /// else fp32 (needs the GPU engine: --device cuda, sim, or auto on a GPU)
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// On CUDA, one cuBLASLt algorithm per kind of matrix product whatever the batch, so that
    /// an image's results do not depend on its batch (as on the CPU and the simulator, where
    /// they never do); the same as PRM_BATCH_INVARIANT=1
    #[arg(long)]
    batch_invariant: bool,
    /// Images per batch, or auto: on a GPU, batches of as many images as fit the device's free
    /// memory (their tokens for the blocks the loss runs, and their pixels at the native size)
    /// and at most 16384 tokens, where larger batches stopped paying; so a batch of large
    /// images holds fewer of them. The CPU engine attacks one image at a time (results never
    /// depend on batching)
    #[arg(long, default_value = "auto")]
    batch_size: String,
    /// At most N tokens per batch, counted at each image's working size ((h/p)·(w/p) + 1 at
    /// its native size or at --resolution); a batch always takes at least one image. With
    /// --batch-size auto on a GPU, the smaller of N and what fits
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    batch_tokens: Option<u64>,
    /// Also write the unquantised float image as <relative path>.safetensors
    #[arg(long)]
    save_float: bool,
    /// Plot the loss against the step to FILE.png (mean and min–max over the images attacked by
    /// this run, and the first 8 images' curves), with the numbers in FILE.json. On a GPU this
    /// costs one host sync per step
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Process only shard K of N (0-based), partitioned by a hash of the relative path.
    /// Without it, K/N come from SLURM_ARRAY_TASK_ID/_COUNT, SLURM_PROCID/SLURM_NTASKS, or
    /// JOB_COMPLETION_INDEX with --shards N
    #[arg(long, value_parser = Shard::parse)]
    shard: Option<Shard>,
    /// Number of shards N for a Kubernetes Indexed Job (index from JOB_COMPLETION_INDEX)
    #[arg(long)]
    shards: Option<u64>,
    /// Threads that read and decode the next images while the engine works [default: one
    /// per CPU, at most 8 per device]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=256))]
    decode_threads: Option<u64>,
    /// Time the pipeline: per batch, the wait for decoded input, the engine's busy time and the
    /// wait for the writer; a summary on stderr at the end, and with FILE.json every batch's
    /// timestamps too
    #[arg(long, value_name = "FILE.json", num_args = 0..=1)]
    #[allow(clippy::option_option)]
    profile: Option<Option<PathBuf>>,
    /// Record every operation on the device (one GPU device: cuda:N or sim) and print at the
    /// end where the device's time went; the trace of every operation goes to FILE.json (open
    /// it in ui.perfetto.dev). The stamps cost the device a little per operation. A step
    /// replayed from a CUDA graph shows as one operation: PRM_NO_GRAPHS=1 shows its kernels
    #[arg(long, value_name = "FILE.json")]
    device_timeline: Option<PathBuf>,
    /// No progress bar or summary
    #[arg(long, short)]
    quiet: bool,
}

/// `--output-layout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LayoutArg {
    Tar,
    Tree,
}

/// The command-line spelling of an option value.
fn value_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// What `<output>/run.json` says of this run ([`prm::io::run_record`]): the model (a path made
/// absolute, and the fingerprint of its weights), the products' precision, and the settings the
/// optimiser reads.
fn run_record(
    model: &str,
    weights: &str,
    precision: Precision,
    settings: &AttackSettings,
    layers: &[usize],
) -> serde_json::Value {
    let absolute = |p: &std::path::Path| {
        std::fs::canonicalize(p)
            .map_or_else(|_| p.display().to_string(), |c| c.display().to_string())
    };
    // A hub id is recorded as the cache snapshot it loaded.
    let model = if model.starts_with("random:") {
        model.to_string()
    } else {
        prm::model::locate(model).map_or_else(|_| model.to_string(), |p| absolute(&p))
    };
    let mut s = serde_json::json!({
        "loss": value_name(settings.loss),
        "layers": layers,
        "tokens": value_name(settings.tokens),
        "optimizer": value_name(settings.optimizer),
        "steps": settings.steps,
        "eps": settings.eps,
        "init": match &settings.init {
            Init::Zero => "zero".to_string(),
            Init::Random => "random".to_string(),
            Init::From(dir) => format!("from:{}", absolute(dir)),
        },
        "seed": settings.seed,
        "resolution": match settings.resolution {
            Resolution::Native => serde_json::json!("native"),
            Resolution::Fixed(n) => serde_json::json!(n),
        },
        "dynamic_scale": settings.dynamic_scale.map(|(lo, hi)| [lo, hi]),
    });
    match settings.optimizer {
        OptimizerKind::Adamw => {
            s["lr"] = serde_json::json!(settings.lr);
            s["weight_decay"] = serde_json::json!(settings.weight_decay);
        }
        OptimizerKind::Pgd => s["step_size"] = serde_json::json!(settings.step_size),
        OptimizerKind::Mifgsm => {
            s["step_size"] = serde_json::json!(settings.step_size);
            s["momentum"] = serde_json::json!(settings.momentum);
        }
    }
    serde_json::json!({
        "prm_version": env!("CARGO_PKG_VERSION"),
        "model": model,
        "weights": weights,
        "precision": match precision {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        },
        "settings": s,
    })
}

impl AttackArgs {
    /// The preset, overridden by every flag that was given.
    fn settings(&self) -> AttackSettings {
        self.settings.resolve(self.preset, self.seed)
    }

    /// The devices to run on, one engine worker each (none: the CPU reference engine); `auto`
    /// is CUDA device 0 when a driver and a device exist, else the CPU. And the precision of
    /// the GPU engine's matrix products.
    fn devices(&self) -> anyhow::Result<(Vec<Device>, Precision)> {
        let (devices, precision) = super::device::choose_devices(&self.device, &self.precision)?;
        super::device::batch_invariant_products(&devices, self.batch_invariant);
        Ok((devices, precision))
    }

    /// `--profile` without a file: `Some(None)`; with one: `Some(Some(path))`.
    fn profile_file(&self) -> Option<Option<&PathBuf>> {
        self.profile.as_ref().map(Option::as_ref)
    }

    /// `--batch-size N`, or `None` for `auto` (see [`auto_batch_limits`]).
    fn fixed_batch_size(&self) -> anyhow::Result<Option<usize>> {
        if self.batch_size == "auto" {
            return Ok(None);
        }
        match self.batch_size.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => bail!(
                "--batch-size '{}' must be a positive number or auto",
                self.batch_size
            ),
        }
    }
}

/// A worker's limits per batch: images, tokens at the working size, device memory.
struct BatchLimits {
    images: usize,
    tokens: Option<usize>,
    memory: Option<MemoryBudget>,
}

/// `--batch-size auto`: 1 on the CPU and in the simulator (batching gains nothing there), unless
/// the simulator stands in for a GPU's memory (`PRM_SIM_MEMORY`). On a GPU:
/// - a device-memory budget, 80% of the free memory, that each image takes its share of: its
///   tokens at this model's activation size for the blocks the loss runs (a shallow `--layers`
///   saves fewer blocks' activations), and its pixels at the native size, where the engine
///   keeps its images ([`prm::gpu::engine::auto_batch_memory`]);
/// - a token budget, capped at the token count where larger batches stopped paying (and at
///   `--batch-tokens`) ([`prm::gpu::engine::auto_batch_tokens`]);
/// - room in images for twice as many images of the nominal size (`--resolution`, else the
///   model's) as the token budget holds.
///
/// A batch that still runs out of memory is retried in halves by the campaign.
fn auto_batch_limits(
    dev: &Device,
    model: &Model,
    blocks: usize,
    resolution: Resolution,
    batch_tokens: Option<usize>,
    precision: Precision,
) -> Result<BatchLimits, prm::gpu::GpuError> {
    let Some(free) = dev.free_memory()? else {
        // The simulator, unbounded.
        return Ok(BatchLimits {
            images: 1,
            tokens: batch_tokens,
            memory: None,
        });
    };
    let side = match resolution {
        Resolution::Native => model.config.image_size(),
        Resolution::Fixed(n) => n,
    };
    let grid = side / model.config.patch;
    let mut tokens = prm::gpu::engine::auto_batch_tokens(free, &model.config, blocks, precision);
    if let Some(cap) = batch_tokens {
        tokens = tokens.min(cap);
    }
    let images = (tokens / model.config.tokens(grid, grid)).max(1) * 2;
    let memory = prm::gpu::engine::auto_batch_memory(free, &model.config, blocks, precision);
    Ok(BatchLimits {
        images,
        tokens: Some(tokens),
        memory: Some(memory),
    })
}

/// The files written beside the images (`--plot` and the JSON of its numbers, `--profile`,
/// `--device-timeline`), checked before any work: each must be writable (they are written at
/// the end, when a campaign of days would learn it too late), none may replace the run's record,
/// its manifest, one of its images or another of them; and `--init from:` must not be the
/// output directory, whose images the run would overwrite while starting from them (and a
/// resume would take as done).
fn check_side_files(
    args: &AttackArgs,
    settings: &AttackSettings,
    items: &[prm::io::inputs::InputItem],
    layout: OutputLayout,
) -> anyhow::Result<()> {
    use prm::io::paths::{check_file_writable, resolved};
    if let Init::From(dir) = &settings.init {
        if resolved(dir) == resolved(&args.output) {
            bail!(
                "--init from:{} is the --output directory: the attack would overwrite the images \
                 it starts from; give another --output",
                dir.display()
            );
        }
    }
    let mut side: Vec<(String, PathBuf)> = Vec::new();
    if let Some(p) = &args.plot {
        side.push(("--plot".into(), p.clone()));
        side.push(("--plot's numbers".into(), p.with_extension("json")));
    }
    if let Some(Some(p)) = args.profile_file() {
        side.push(("--profile".into(), p.clone()));
    }
    if let Some(p) = &args.device_timeline {
        side.push(("--device-timeline".into(), p.clone()));
    }
    if side.is_empty() {
        return Ok(());
    }
    let out = &args.output;
    let mut taken: std::collections::HashMap<PathBuf, String> = [
        ("the run record", prm::io::run_record::RUN_RECORD_FILE),
        ("the manifest", prm::io::manifest::MANIFEST_FILE),
    ]
    .iter()
    .map(|(what, f)| {
        let place = format!("{what} {f} in {}", out.display());
        (resolved(&out.join(f)), place)
    })
    .collect();
    let resolved_out = resolved(out);
    if side
        .iter()
        .any(|(_, p)| resolved(p).starts_with(&resolved_out))
    {
        for item in items {
            for rel in [layout.output_rel(item), layout.file_rel(item)] {
                let png = resolved(&out.join(&rel));
                let place = format!("the output of {} in {}", item.rel, out.display());
                taken.insert(png.with_extension("safetensors"), place.clone());
                taken.insert(png, place);
            }
        }
    }
    // The clean inputs: only those with a side file's name are resolved, so that a campaign of
    // a million images pays nothing for this.
    let names: std::collections::HashSet<&std::ffi::OsStr> =
        side.iter().filter_map(|(_, p)| p.file_name()).collect();
    for item in items {
        if item.path.file_name().is_some_and(|n| names.contains(n)) {
            taken.insert(
                resolved(&item.path),
                format!("the clean input {}", item.rel),
            );
        }
    }
    let input_dir = args.input.is_dir().then(|| resolved(&args.input));
    for (flag, path) in &side {
        check_file_writable(path).map_err(|e| anyhow::anyhow!("{flag} {e}"))?;
        let r = resolved(path);
        if let Some(what) = taken.get(&r) {
            bail!(
                "{flag} {} would replace {what}; give another path",
                path.display()
            );
        }
        // A plot inside the input directory is an image the next run would attack.
        let image = r.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            prm::io::inputs::IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
        });
        if let Some(dir) = &input_dir {
            if image && r.starts_with(dir) && !r.starts_with(&resolved_out) {
                bail!(
                    "{flag} {} lies in the input directory {}, where the next run would take \
                     it for an input image; give a path outside it",
                    path.display(),
                    args.input.display()
                );
            }
        }
        taken.insert(r, flag.clone());
    }
    // The plot's numbers are a file the user did not name: they may replace an earlier plot's,
    // never another file.
    if let Some(p) = &args.plot {
        let numbers = p.with_extension("json");
        if numbers.is_file() {
            let earlier: Option<serde_json::Value> = std::fs::read(&numbers)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let is_plot =
                earlier.is_some_and(|v| v.get("points").is_some() && v.get("shown").is_some());
            if !is_plot {
                bail!(
                    "--plot {} writes its numbers to {}, which holds another file; give the plot \
                     another name",
                    p.display(),
                    numbers.display()
                );
            }
        }
    }
    Ok(())
}

pub fn run(args: AttackArgs) -> anyhow::Result<ExitCode> {
    let (devices, precision) = args.devices()?;
    let fixed_batch = args.fixed_batch_size()?; // checked before anything is read
    if let Some(Some(p)) = args.profile_file() {
        require_extension(p, "--profile", "the profile is JSON", "json")?;
    }
    if let Some(p) = &args.device_timeline {
        if devices.len() != 1 {
            bail!(
                "--device-timeline records one GPU device's stream: use --device cuda:N or \
                 --device sim"
            );
        }
        require_extension(p, "--device-timeline", "the trace is JSON", "json")?;
    }
    let settings = args.settings();
    settings.validate().map_err(anyhow::Error::msg)?;
    if let Some(p) = &args.plot {
        require_extension(p, "--plot", "the plot is a PNG", "png")?;
    }
    if let Init::From(dir) = &settings.init {
        if !dir.is_dir() {
            bail!(
                "--init from:{}: not a directory (give the output directory of an earlier run)",
                dir.display()
            );
        }
    }

    // Everything that can be wrong with the run is checked before the first image is touched.
    let shard = shard_from_env(args.shard, args.shards, &|k| std::env::var(k).ok())
        .map_err(anyhow::Error::msg)?;
    let inputs = list_inputs_with(
        &args.input,
        &ListOptions {
            exclude_dirs: vec![args.output.clone()],
            exclude: args.exclude.clone(),
        },
    )?;
    let layout = match (args.output_layout, inputs.source) {
        (Some(LayoutArg::Tar), InputSource::TarShards) | (None, InputSource::TarShards) => {
            OutputLayout::Tar
        }
        (Some(LayoutArg::Tar), _) => bail!(
            "--output-layout tar needs tar-shard inputs (--input 'shards/train-{{000..009}}.tar'); {} is not one",
            args.input.display()
        ),
        _ => OutputLayout::Tree,
    };
    let mut items = inputs.items;
    if let Some((shard, _)) = shard {
        // Tar inputs are sharded by tar file, so each output tar has one writer.
        items.retain(|item| shard.contains(item.shard_key()));
    }
    check_output_collisions_in(&items, layout)?;
    check_side_files(&args, &settings, &items, layout)?;
    let model =
        Model::load(&args.model).with_context(|| format!("cannot load model '{}'", args.model))?;
    settings
        .check_working_size(model.config.patch, args.max_pixels, Some("--max-pixels"))
        .map_err(anyhow::Error::msg)?;
    let layers = settings
        .layers
        .resolve(model.config.feature_layers())
        .map_err(anyhow::Error::msg)?;
    let record = run_record(
        &args.model,
        &model.fingerprint(),
        precision,
        &settings,
        &layers,
    );
    let objective = Objective::new(settings.loss, layers, settings.tokens, &model)
        .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create output directory {}", args.output.display()))?;
    // A resume with other settings would keep the old outputs as this run's.
    prm::io::run_record::check_or_write(&args.output, &record)?;

    if !args.quiet {
        if let ModelSource::Random { arch, seed } = &model.source {
            eprintln!("note: random:{arch} has RANDOM weights (seed {seed}); results show speed and mechanics, not real transfer");
        }
        if let Some((s, src)) = shard {
            eprintln!("shard {}/{} (from {})", s.index, s.count, src.describe());
        }
        eprintln!(
            "attacking {} image(s){} with loss {}, optimizer {}, {} steps, eps {:.2}/255 on {}",
            items.len(),
            shard
                .map(|(s, _)| format!(" (shard {}/{})", s.index, s.count))
                .unwrap_or_default(),
            value_name(settings.loss),
            value_name(settings.optimizer),
            settings.steps,
            settings.eps * 255.0,
            match devices.as_slice() {
                [] => "cpu (reference engine)".to_string(),
                devs => {
                    let names: Vec<String> = devs.iter().map(|d| d.name()).collect();
                    let names = if names.len() > 1 {
                        format!("{} devices: {}", names.len(), names.join("; "))
                    } else {
                        names.join("")
                    };
                    match precision {
                        Precision::Fp32 => names,
                        Precision::Bf16 => format!("{names} (bf16 matrix products)"),
                    }
                }
            }
        );
        if inputs.ignored > 0 {
            eprintln!(
                "note: ignored {} non-image file(s) in {}",
                inputs.ignored,
                args.input.display()
            );
        }
        if inputs.excluded > 0 {
            eprintln!(
                "note: excluded {} image(s) by --exclude (inside excluded directories too)",
                inputs.excluded
            );
        }
        if !inputs.shards.is_empty() {
            eprintln!(
                "reading {} tar shard(s); output layout: {}",
                inputs.shards.len(),
                match layout {
                    OutputLayout::Tar => "tar (one output tar per input shard)",
                    OutputLayout::Tree => "tree",
                }
            );
        }
    }
    for w in &inputs.warnings {
        eprintln!("warning: {w}");
    }

    let signal = Interrupt::install()?;
    let interrupted = || signal.received() != 0;
    let bar = Bar::new(items.len(), settings.steps, args.quiet);
    let plotting = args.plot.as_ref().map(|_| Curves {
        bar: &bar,
        curves: Mutex::new(LossCurves::new(settings.steps)),
    });
    let progress: &(dyn Progress + Sync) = match &plotting {
        Some(p) => p,
        None => &bar,
    };
    let started = std::time::Instant::now();
    let batch_tokens = args.batch_tokens.map(|n| n as usize);
    let output = OutputOptions {
        batch_size: fixed_batch.unwrap_or(1),
        batch_tokens,
        batch_memory: None,
        dir: args.output.clone(),
        save_float: args.save_float,
        layout,
        max_pixels: args.max_pixels,
        decoders: args.decode_threads.unwrap_or(0) as usize,
    };
    let timeline = args.profile.as_ref().map(|_| Timeline::new());
    let campaign = Campaign {
        objective: &objective,
        settings: &settings,
        items: &items,
        output: &output,
        timeline: timeline.as_ref(),
    };
    let summary = if devices.is_empty() {
        let worker = |_| {
            Ok(Worker {
                engine: ReferenceVit::new(&model),
                batch_size: fixed_batch.unwrap_or(1),
                batch_tokens,
                batch_memory: None,
                name: "cpu".into(),
            })
        };
        campaign.run_on_workers(1, &model, worker, progress, &interrupted)
    } else {
        // One engine worker per device, built on its own thread: weights upload and, with
        // --batch-size auto, the batch size from the memory the weights leave on that device.
        let worker = |w: usize| {
            let dev = &devices[w];
            let setup = |source: prm::gpu::GpuError| CampaignError::WorkerSetup {
                worker: w,
                device: dev.name(),
                source: source.into(),
            };
            // The weights first: auto batches are sized from the memory they leave.
            let engine = GpuVit::new_with_precision(dev, &model, precision).map_err(setup)?;
            let limits = match fixed_batch {
                Some(n) => BatchLimits {
                    images: n,
                    tokens: batch_tokens,
                    memory: None,
                },
                None => {
                    let blocks = objective.blocks_needed();
                    auto_batch_limits(
                        dev,
                        &model,
                        blocks,
                        settings.resolution,
                        batch_tokens,
                        precision,
                    )
                    .map_err(setup)?
                }
            };
            if args.device_timeline.is_some() {
                // After the weights' upload: the run's own work from here on.
                dev.start_timeline().map_err(setup)?;
            }
            Ok(Worker {
                engine,
                batch_size: limits.images,
                batch_tokens: limits.tokens,
                batch_memory: limits.memory,
                name: dev.name(),
            })
        };
        campaign.run_on_workers(devices.len(), &model, worker, progress, &interrupted)
    }
    .map_err(|e| match e {
        CampaignError::WorkerSetup { device, source, .. } => {
            anyhow::Error::new(source).context(format!("cannot load the model onto {device}"))
        }
        e => e.into(),
    })?;
    bar.finish();
    if let (Some(path), [dev]) = (&args.device_timeline, devices.as_slice()) {
        let t = dev
            .finish_timeline()
            .context("--device-timeline: the device recorded no timeline")?;
        // Asked for explicitly, so shown even with --quiet.
        eprint!(
            "{}",
            timeline_table(&t, "the whole run, stamped on the device")
        );
        write_trace(path, &t.trace_event_json(&dev.name()))?;
        eprintln!(
            "trace             {} (every operation; open it in ui.perfetto.dev)",
            path.display()
        );
    }
    if let (Some(path), Some(p)) = (&args.plot, plotting) {
        let curves = p
            .curves
            .into_inner()
            .expect("no panic while holding the lock");
        if curves.images == 0 {
            eprintln!(
                "note: no image was attacked by this run, so no plot was written to {}",
                path.display()
            );
        } else {
            let title = format!(
                "{} loss, {}, {} steps, eps {:.2}/255, {}",
                value_name(settings.loss),
                value_name(settings.optimizer),
                settings.steps,
                settings.eps * 255.0,
                args.model
            );
            write_loss_plot(path, &curves, &title)
                .with_context(|| format!("cannot write the plot {}", path.display()))?;
            if !args.quiet {
                eprintln!(
                    "plot: {} (numbers in {})",
                    path.display(),
                    path.with_extension("json").display()
                );
            }
        }
    }
    if let Some(t) = &timeline {
        // Asked for explicitly, so shown even with --quiet.
        eprint!("{}", t.report());
        if let Some(Some(path)) = args.profile_file() {
            let mut json = serde_json::to_vec_pretty(&t.to_json())?;
            json.push(b'\n');
            prm::io::output::write_atomic(path, |file| {
                use std::io::Write;
                file.write_all(&json)
                    .map_err(|source| prm::io::IoError::Write {
                        path: path.clone(),
                        source,
                    })
            })
            .with_context(|| format!("cannot write the profile {}", path.display()))?;
            if !args.quiet {
                eprintln!("profile: every batch's timestamps in {}", path.display());
            }
        }
    }
    let signal = signal.received() as i32;
    if !args.quiet {
        let secs = started.elapsed().as_secs_f64();
        if signal != 0 {
            eprintln!(
                "interrupted by {}: the batch in flight was abandoned, finished images are saved; \
                 re-run the same command to resume",
                if signal == SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGINT"
                }
            );
        }
        eprintln!(
            "{}: {} ok, {} failed, {} skipped (already done) in {:.1}s ({:.3} images/s); manifest: {}",
            if summary.interrupted || summary.device_lost {
                "stopped"
            } else {
                "done"
            },
            summary.ok,
            summary.failed,
            summary.skipped,
            secs,
            summary.ok as f64 / secs.max(1e-9),
            args.output.join(prm::io::MANIFEST_FILE).display()
        );
    }
    Ok(if signal == SIGTERM {
        ExitCode::from(EXIT_SIGTERM)
    } else if signal != 0 {
        ExitCode::from(EXIT_SIGINT)
    } else if summary.device_lost {
        // The run stopped with its cause on stderr, like a manifest that cannot be written.
        ExitCode::from(EXIT_USAGE)
    } else if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_SOME_FAILED)
    })
}

/// SIGINT / SIGTERM handling for a run: the first signal is recorded (and the run stops at the
/// next batch or step boundary); a second SIGINT or SIGTERM ends the process at once.
struct Interrupt {
    /// The signal number received, 0 while none.
    received: Arc<AtomicUsize>,
}

impl Interrupt {
    fn install() -> anyhow::Result<Self> {
        let received = Arc::new(AtomicUsize::new(0));
        let pending = Arc::new(AtomicBool::new(false));
        for (sig, code) in [(SIGINT, EXIT_SIGINT), (SIGTERM, EXIT_SIGTERM)] {
            // Registered first, so it sees the flag as it was before this delivery.
            signal_hook::flag::register_conditional_shutdown(sig, code.into(), pending.clone())
                .context("cannot install the signal handlers")?;
            signal_hook::flag::register(sig, pending.clone())
                .context("cannot install the signal handlers")?;
            signal_hook::flag::register_usize(sig, received.clone(), sig as usize)
                .context("cannot install the signal handlers")?;
        }
        Ok(Interrupt { received })
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

/// The progress bar, plus the loss curves of `--plot`.
struct Curves<'a> {
    bar: &'a Bar,
    curves: Mutex<LossCurves>,
}

impl Progress for Curves<'_> {
    fn skipped(&self, images: usize) {
        self.bar.skipped(images)
    }
    fn redone_on_resume(&self, redone: RedoneOnResume) {
        self.bar.redone_on_resume(redone)
    }
    fn image_started(&self, rel: &str) {
        self.bar.image_started(rel)
    }
    fn steps_done(&self, image_steps: usize) {
        self.bar.steps_done(image_steps)
    }
    fn image_done(&self, record: &prm::io::ManifestRecord) {
        self.bar.image_done(record)
    }
    fn wants_loss_curves(&self) -> bool {
        true
    }
    fn loss_curve(&self, rel: &str, losses: &[f64]) {
        if let Ok(mut c) = self.curves.lock() {
            c.add(rel, losses);
        }
    }
}
