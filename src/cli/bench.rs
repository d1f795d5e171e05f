//! `prm bench`: times whole attacks on synthetic images and reports throughput against a
//! matrix-product ceiling measured in the same process.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use prm::attack::*;
use prm::bench::{gemm_ceiling_tflops, median, synthetic_images, time_attacks, AttackTiming};
use prm::gpu::engine::{GpuVit, Precision};
use prm::gpu::host_stats::HostStats;
use prm::gpu::Timeline;
use prm::model::{Model, ModelSource};
use prm::reference::ReferenceVit;
use serde_json::json;

use super::require_extension;
use super::settings_args::SettingsArgs;
use super::timeline::{timeline_table, write_trace, TIMELINE_ROWS};

#[derive(Args)]
pub struct BenchArgs {
    /// A model, as for `prm attack` (random:ARCH needs no download)
    #[arg(long, default_value = "random:vit-b-16")]
    model: String,
    /// Image side N, or WxH (e.g. 640x480)
    #[arg(long, default_value = "224")]
    image_size: String,
    /// Images per attack [default: 64 on CUDA, 1 on the CPU and the simulator]
    #[arg(long)]
    batch_size: Option<usize>,
    /// Settings bundle; the attack flags override it
    #[arg(long, value_enum, default_value = "pgd")]
    preset: Preset,
    #[command(flatten)]
    settings: SettingsArgs,
    /// auto, cpu, cuda[:N] or sim
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp32 or bf16 (GPU engine only)
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// On CUDA, one cuBLASLt algorithm per kind of product whatever the batch (as prm attack
    /// --batch-invariant; the same as PRM_BATCH_INVARIANT=1)
    #[arg(long)]
    batch_invariant: bool,
    /// Untimed attacks first
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed attacks; the median is reported
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seed of the synthetic images and the attack's draws
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip measuring the GEMM ceiling (under a profiler, say)
    #[arg(long)]
    no_ceiling: bool,
    /// Also report where the host's time went: device calls by kind (count and host seconds per
    /// timed attack), next to the phases
    #[arg(long)]
    profile: bool,
    /// Capture fixed-shape attack steps into CUDA graphs and replay them (GPU engine; `off`
    /// runs every step directly, as PRM_NO_GRAPHS=1 does for `prm attack`)
    #[arg(long, value_enum, default_value = "on")]
    graphs: OnOff,
    /// After the timed attacks, run one more with a device timeline: every kernel, product and
    /// copy stamped on the device, summed by name, with the idle gaps between them (GPU engine;
    /// with `--graphs on` a step's replay is one entry, so use `--graphs off` for per-kernel
    /// rows). With FILE.json, also every operation in the Trace Event format (open it in
    /// ui.perfetto.dev)
    #[arg(long, value_name = "FILE.json", num_args = 0..=1)]
    #[allow(clippy::option_option)]
    timeline: Option<Option<PathBuf>>,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn parse_image_size(s: &str) -> anyhow::Result<(usize, usize)> {
    let parse = |v: &str| -> anyhow::Result<usize> {
        match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("--image-size '{s}': give N or WxH with positive whole numbers"),
        }
    };
    match s.split_once(['x', 'X']) {
        Some((w, h)) => Ok((parse(h)?, parse(w)?)),
        None => {
            let n = parse(s)?;
            Ok((n, n))
        }
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let (device, precision) = super::device::choose_device(&args.device, &args.precision)?;
    super::device::batch_invariant_products(device.as_slice(), args.batch_invariant);
    let (height, width) = parse_image_size(&args.image_size)?;
    let batch = args.batch_size.unwrap_or(match &device {
        Some(d) if !d.is_sim() => 64,
        _ => 1,
    });
    if batch == 0 || args.repeats == 0 {
        bail!("--batch-size and --repeats must be at least 1");
    }
    if args.timeline.is_some() && device.is_none() {
        bail!("--timeline records a GPU device's stream: use --device cuda or --device sim");
    }
    if args.profile && device.is_none() {
        bail!(
            "--profile counts the host's calls into a GPU device, and the CPU engine makes none: \
             use --device cuda or --device sim"
        );
    }
    if let Some(Some(p)) = &args.timeline {
        require_extension(p, "--timeline", "the trace is JSON", "json")?;
    }
    if let Some(Init::From(_)) = args.settings.init {
        bail!("--init from:<DIR> needs a run's outputs; prm bench attacks synthetic images: use --init zero or random");
    }
    let settings = args.settings.resolve(args.preset, args.seed);
    settings.validate().map_err(anyhow::Error::msg)?;
    let model =
        Model::load(&args.model).with_context(|| format!("cannot load model '{}'", args.model))?;
    check_image_size(height, width, model.config.patch).map_err(anyhow::Error::msg)?;
    // An allocation that fails aborts the process: refuse sizes beyond what prm attack decodes.
    let budget = prm::io::DEFAULT_MAX_PIXELS;
    if (height as u64).saturating_mul(width as u64) > budget {
        bail!("--image-size {width}x{height} is beyond the budget of {budget} pixels an image");
    }
    settings
        .check_working_size(model.config.patch, budget, None)
        .map_err(anyhow::Error::msg)?;
    let layers = settings
        .layers
        .resolve(model.config.feature_layers())
        .map_err(anyhow::Error::msg)?;
    let objective = Objective::new(settings.loss, layers, settings.tokens, &model)
        .map_err(anyhow::Error::msg)?;
    let images = synthetic_images(batch, height, width, args.seed);

    let ceiling = if args.no_ceiling {
        None
    } else {
        gemm_ceiling_tflops(device.as_ref()).context("measuring the GEMM ceiling")?
    };
    let baseline = match &device {
        Some(d) => d.memory_in_use()?,
        None => None,
    };
    let mut peak = baseline;
    let stats_before = HostStats::now();
    let mut stats_after = stats_before.clone();
    let mut graph_report = serde_json::Value::Null;
    let mut attention_report = serde_json::Value::Null;
    // The stamped attack's device timeline and its wall-clock seconds on the host.
    let mut timeline_report: Option<(Timeline, f64)> = None;
    let timings: Vec<AttackTiming> = match &device {
        None => time_attacks(
            &ReferenceVit::new(&model),
            &objective,
            &settings,
            &images,
            height,
            width,
            args.warmup,
            args.repeats,
            || {},
        )
        .inspect(|_| stats_after = HostStats::now())?,
        Some(dev) => {
            let engine = GpuVit::new_with_precision(dev, &model, precision)
                .with_context(|| format!("cannot load the model onto {}", dev.name()))?;
            engine.set_graphs(args.graphs == OnOff::On);
            let attacks = |warmup, repeats, after_step: &mut dyn FnMut()| {
                time_attacks(
                    &engine, &objective, &settings, &images, height, width, warmup, repeats,
                    after_step,
                )
            };
            let timings = attacks(args.warmup, args.repeats, &mut || {
                if let Ok(Some(used)) = dev.memory_in_use() {
                    peak = peak.max(Some(used));
                }
            })?;
            // The simulator counts its true peak, between the samples above too.
            peak = peak.max(dev.memory_peak());
            stats_after = HostStats::now();
            let g = engine.graph_stats();
            if precision == Precision::Bf16 {
                attention_report = json!({
                    "setting": engine.attention_in_use(),
                    "tuned": engine.attention_tuning().iter().map(|t| t.to_json()).collect::<Vec<_>>(),
                });
            }
            if args.timeline.is_some() {
                // Untimed: the stamps cost the device a little, so throughput comes from the
                // attacks above.
                dev.start_timeline()?;
                let recorded = attacks(0, 1, &mut || {});
                let timeline = dev.finish_timeline()?;
                let wall = recorded?.first().map_or(f64::NAN, |t| t.seconds);
                timeline_report = Some((timeline, wall));
            }
            let ops = g.ops_per_replay;
            graph_report = json!({
                "requested": args.graphs == OnOff::On,
                "captures": g.captures,
                "replays": g.replays,
                "direct_steps": g.direct_steps,
                "failures": g.failures,
                "ops_per_replay": {
                    "launches": ops.launches,
                    "products": ops.products,
                    "copies": ops.copies,
                    "fills": ops.fills,
                },
            });
            timings
        }
    };
    // Warm-up attacks made the same calls: scale to one attack.
    let per_attack = 1.0 / (args.warmup + args.repeats) as f64;
    let host_calls: Vec<serde_json::Value> = stats_after
        .since(&stats_before)
        .entries
        .iter()
        .map(|&(call, n, secs)| {
            json!({"call": call.name(), "count": n as f64 * per_attack, "host_seconds": secs * per_attack})
        })
        .collect();
    let seconds: Vec<f64> = timings.iter().map(|t| t.seconds).collect();
    let attack_seconds = median(&seconds);
    let phase = |f: fn(&AttackTiming) -> f64| median(&timings.iter().map(f).collect::<Vec<_>>());
    let phases = json!({
        "clean_seconds": phase(|t| t.clean_seconds),
        "start_seconds": phase(|t| t.start_seconds),
        "steps_seconds": phase(|t| t.steps_seconds),
    });
    let flops = median(&timings.iter().map(|t| t.flops).collect::<Vec<_>>());
    let tflops = flops / attack_seconds / 1e12;
    let peak_memory = match (peak, baseline) {
        (Some(p), Some(b)) => Some(p.saturating_sub(b)),
        _ => None,
    };
    let device_name = device
        .as_ref()
        .map_or_else(|| "cpu (reference engine)".to_string(), |d| d.name());
    let precision_name = match (&device, precision) {
        (None, _) | (_, Precision::Fp32) => "fp32",
        (_, Precision::Bf16) => "bf16",
    };
    let report = json!({
        "engine": "prm",
        "device": device_name,
        "model": args.model,
        "weights_random": matches!(model.source, ModelSource::Random { .. }),
        "image_size": [height, width],
        "batch_size": batch,
        "steps": settings.steps,
        "optimizer": format!("{:?}", settings.optimizer).to_lowercase(),
        "loss": format!("{:?}", settings.loss).to_lowercase(),
        "dynamic_scale": settings.dynamic_scale,
        "precision": precision_name,
        "attack_seconds": attack_seconds,
        "attack_seconds_all": seconds,
        "phases": phases,
        "flops_per_attack": flops,
        "image_steps_per_s": (batch * settings.steps) as f64 / attack_seconds,
        "images_per_s": batch as f64 / attack_seconds,
        "tflops": tflops,
        "ceiling_tflops": ceiling,
        "ceiling_fraction": ceiling.map(|c| tflops / c),
        "peak_memory_bytes": peak_memory,
        "graphs": graph_report,
        "attention": attention_report,
        "product_algorithms": device.as_ref().map(|d| d.product_algorithms().name()),
        "products_timed": device.as_ref().map(|d| d.timed_products()),
        "product_tunings": device.as_ref().map(|d| {
            d.product_tunings().iter().map(|t| t.to_json()).collect::<Vec<_>>()
        }),
    });
    let mut report = report;
    if args.profile {
        report["host_calls_per_attack"] = json!(host_calls);
    }
    if let Some((t, wall)) = &timeline_report {
        report["timeline"] = t.summary_json(TIMELINE_ROWS);
        report["timeline"]["attack_wall_ms"] = json!(wall * 1e3);
        report["timeline"]["host_outside_span_ms"] = json!(host_outside_span_ms(t, *wall));
        if let Some(Some(path)) = &args.timeline {
            write_trace(path, &t.trace_event_json(&device_name))?;
            report["timeline"]["trace_file"] = json!(path);
        }
    }
    if args.json {
        println!("{report}");
    } else {
        println!("device            {device_name} ({precision_name})");
        println!(
            "workload          {} at {width}x{height}, batch {batch}, {} steps of {}",
            args.model,
            settings.steps,
            report["optimizer"].as_str().unwrap_or("?")
        );
        println!(
            "attack            {attack_seconds:.4} s (median of {})",
            seconds.len()
        );
        println!(
            "phases            clean {:.4} s, start {:.4} s, steps {:.4} s (medians)",
            phases["clean_seconds"].as_f64().unwrap_or(0.0),
            phases["start_seconds"].as_f64().unwrap_or(0.0),
            phases["steps_seconds"].as_f64().unwrap_or(0.0)
        );
        println!(
            "throughput        {:.1} image-steps/s, {:.2} images/s",
            report["image_steps_per_s"].as_f64().unwrap_or(0.0),
            report["images_per_s"].as_f64().unwrap_or(0.0)
        );
        match ceiling {
            Some(c) => println!(
                "compute           {tflops:.2} TFLOP/s = {:.1}% of the {c:.1} TFLOP/s GEMM ceiling",
                100.0 * tflops / c
            ),
            None => println!("compute           {tflops:.4} TFLOP/s (no ceiling measured)"),
        }
        if args.profile {
            println!("host calls per attack (count, host seconds):");
            for c in &host_calls {
                println!(
                    "  {:<40} {:>9.0} {:>9.4}",
                    c["call"].as_str().unwrap_or("?"),
                    c["count"].as_f64().unwrap_or(0.0),
                    c["host_seconds"].as_f64().unwrap_or(0.0)
                );
            }
        }
        if !graph_report.is_null() {
            let g = &graph_report;
            let n = |k: &str| g[k].as_u64().unwrap_or(0);
            let o = &g["ops_per_replay"];
            let m = |k: &str| o[k].as_u64().unwrap_or(0);
            println!(
                "graphs            {}: {} captured, {} replayed, {} direct steps, {} failed; \
                 one replay = {} launches + {} products + {} copies + {} fills",
                if args.graphs == OnOff::On {
                    "on"
                } else {
                    "off"
                },
                n("captures"),
                n("replays"),
                n("direct_steps"),
                n("failures"),
                m("launches"),
                m("products"),
                m("copies"),
                m("fills")
            );
        }
        print_attention_tuning(&attention_report);
        if let Some(d) = device.as_ref().filter(|d| d.timed_products()) {
            print_product_tunings(&d.product_tunings());
        }
        if let Some((t, wall)) = &timeline_report {
            print!(
                "{}",
                timeline_table(t, "one more attack, stamped on the device")
            );
            println!(
                "host              the same attack took {:.2} ms on the host clock: {:.2} ms of \
                 it outside the device's first-to-last span (set-up before the first operation; \
                 read-back, copies and results after the last)",
                wall * 1e3,
                host_outside_span_ms(t, *wall)
            );
            if let Some(Some(path)) = &args.timeline {
                println!(
                    "trace             {} (every operation; open it in ui.perfetto.dev)",
                    path.display()
                );
            }
        }
        if let Some(p) = peak_memory {
            println!(
                "peak memory       {:.2} GiB",
                p as f64 / (1u64 << 30) as f64
            );
        }
        if matches!(model.source, ModelSource::Random { .. }) {
            println!("note              random weights: speed only");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Milliseconds of an attack's wall-clock time that lie outside its device timeline's span:
/// host work before the first stamped operation and after the last (the staged read-back is
/// not stamped, so it counts here).
fn host_outside_span_ms(t: &Timeline, wall_seconds: f64) -> f64 {
    (wall_seconds * 1e3 - t.span_us() / 1e3).max(0.0)
}

/// Under `PRM_PRODUCTS=timed`, what the products' tunings chose: a summary, then a line each.
fn print_product_tunings(tunings: &[prm::gpu::product_timing::ProductTuning]) {
    let moved = tunings.iter().filter(|t| t.chosen != 0).count();
    let seconds: f64 = tunings.iter().map(|t| t.seconds).sum();
    println!(
        "products          timed (PRM_PRODUCTS=timed): {} kinds of product, {moved} took another \
         of cuBLASLt's answers than its first; tuning took {seconds:.2} s",
        tunings.len()
    );
    for t in tunings {
        println!("  {}", prm::gpu::product_timing::describe(t));
    }
}

/// The bf16 engine's attention setting, and under `auto` what it timed: a line per pass and
/// bucket, the chosen kernels first, then every candidate's microseconds per call.
fn print_attention_tuning(report: &serde_json::Value) {
    if report.is_null() {
        return;
    }
    println!(
        "attention         {}",
        report["setting"].as_str().unwrap_or("?")
    );
    for t in report["tuned"].as_array().into_iter().flatten() {
        let candidates: Vec<String> = t["candidates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let kernels = c["kernels"].as_str().unwrap_or("?");
                match c["us_per_call"].as_f64() {
                    Some(us) => format!("{kernels} {us:.1}"),
                    None => format!("{kernels} dropped"),
                }
            })
            .collect();
        println!(
            "  {} on {} sequences of up to {} tokens: {} (µs a call: {}; tuned in {:.1} ms)",
            t["pass"].as_str().unwrap_or("?"),
            t["timed_on"]["sequences"],
            t["timed_on"]["longest"],
            t["chosen"].as_str().unwrap_or("?"),
            candidates.join(", "),
            t["tuning_seconds"].as_f64().unwrap_or(f64::NAN) * 1e3
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_image_size;

    #[test]
    fn image_sizes_are_n_or_width_by_height() {
        assert_eq!(parse_image_size("224").unwrap(), (224, 224));
        assert_eq!(parse_image_size("640x480").unwrap(), (480, 640));
        assert!(parse_image_size("0").is_err());
        assert!(parse_image_size("12x").is_err());
    }
}
