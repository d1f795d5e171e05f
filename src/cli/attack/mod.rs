//! `prm attack`: the options of DESIGN §8, resolved against a preset, then the run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{bail, Context};
use clap::Args;
use prm::attack::campaign::{Campaign, CampaignError, OutputOptions, Progress, Worker};
use prm::attack::profile::Timeline;
use prm::attack::*;
use prm::gpu::engine::{GpuVit, Precision};
use prm::gpu::Device;
use prm::io::shard::{shard_from_env, Shard};
use prm::io::{
    check_output_collisions_in, list_inputs_with, InputSource, ListOptions, OutputLayout,
    DEFAULT_MAX_PIXELS,
};
use prm::model::Model;
use prm::reference::ReferenceVit;
use prm::viz::plot::LossCurves;
use signal_hook::consts::SIGTERM;

use super::progress::Bar;
use super::require_extension;
use super::settings_args::SettingsArgs;
use super::{EXIT_SIGINT, EXIT_SIGTERM, EXIT_SOME_FAILED, EXIT_USAGE};

mod batch_limits;
mod messages;
mod outputs;
mod run_record;
mod side_files;
mod signals;

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
    prm::io::paths::check_output_dir("--output", &args.output).map_err(anyhow::Error::msg)?;

    // Everything that can be wrong with the run is checked before the first image is touched.
    let shard = shard_from_env(args.shard, args.shards, &|k| std::env::var(k).ok())?;
    let mut inputs = list_inputs_with(
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
    // The items go on to the campaign; the rest of the listing (counts, shards, warnings) is
    // reported below.
    let mut items = std::mem::take(&mut inputs.items);
    if let Some((shard, _)) = shard {
        // Tar inputs are sharded by tar file, so each output tar has one writer.
        items.retain(|item| shard.contains(item.shard_key()));
    }
    check_output_collisions_in(&items, layout)?;
    side_files::check_side_files(&args, &settings, &items, layout)?;
    let model =
        Model::load(&args.model).with_context(|| format!("cannot load model '{}'", args.model))?;
    settings
        .check_working_size(model.config.patch, args.max_pixels, Some("--max-pixels"))
        .map_err(anyhow::Error::msg)?;
    let layers = settings
        .layers
        .resolve(model.config.feature_layers())
        .map_err(anyhow::Error::msg)?;
    let record = run_record::run_record(
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
        let start = messages::Start {
            shard,
            images: items.len(),
            inputs: &inputs,
            layout,
            devices: &devices,
            precision,
        };
        messages::print_start(&args, &model, &settings, &start);
    }
    for w in &inputs.warnings {
        eprintln!("warning: {w}");
    }

    let signal = signals::Interrupt::install()?;
    let interrupted = || signal.received() != 0;
    let bar = Bar::new(items.len(), settings.steps, args.quiet);
    let plotting = args.plot.as_ref().map(|_| outputs::Curves {
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
                Some(n) => batch_limits::BatchLimits {
                    images: n,
                    tokens: batch_tokens,
                    memory: None,
                },
                None => {
                    let blocks = objective.blocks_needed();
                    batch_limits::auto_batch_limits(
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
        outputs::write_device_timeline(path, dev)?;
    }
    if let (Some(path), Some(p)) = (&args.plot, plotting) {
        outputs::write_plot(&args, &settings, path, p)?;
    }
    if let Some(t) = &timeline {
        outputs::write_profile(&args, t)?;
    }
    let signal = signal.received() as i32;
    if !args.quiet {
        messages::print_done(&args, &summary, signal, started);
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
