//! What `prm attack` says on stderr when a run starts and when it ends (not with `--quiet`).

use std::time::Instant;

use prm::attack::campaign::CampaignSummary;
use prm::attack::AttackSettings;
use prm::gpu::engine::Precision;
use prm::gpu::Device;
use prm::io::shard::{Shard, ShardSource};
use prm::io::{InputList, OutputLayout};
use prm::model::{Model, ModelSource};
use signal_hook::consts::SIGTERM;

use super::{value_name, AttackArgs};

/// What a run is about to do, beyond its flags and settings.
pub(super) struct Start<'a> {
    pub shard: Option<(Shard, ShardSource)>,
    /// Images this run attacks (after `--exclude` and the shard).
    pub images: usize,
    /// The listing's counts of skipped files and excluded images, and its tar shards (its
    /// items are the campaign's by now).
    pub inputs: &'a InputList,
    pub layout: OutputLayout,
    pub devices: &'a [Device],
    pub precision: Precision,
}

/// The run's first lines: the model's provenance, the shard, what is attacked how and where.
pub(super) fn print_start(
    args: &AttackArgs,
    model: &Model,
    settings: &AttackSettings,
    start: &Start<'_>,
) {
    if let ModelSource::Random { arch, seed } = &model.source {
        eprintln!("note: random:{arch} has RANDOM weights (seed {seed}); results show speed and mechanics, not real transfer");
    }
    if let Some((s, src)) = start.shard {
        eprintln!("shard {}/{} (from {})", s.index, s.count, src.describe());
    }
    eprintln!(
        "attacking {} image(s){} with loss {}, optimizer {}, {} steps, eps {:.2}/255 on {}",
        start.images,
        start
            .shard
            .map(|(s, _)| format!(" (shard {}/{})", s.index, s.count))
            .unwrap_or_default(),
        value_name(settings.loss),
        value_name(settings.optimizer),
        settings.steps,
        settings.eps * 255.0,
        match start.devices {
            [] => "cpu (reference engine)".to_string(),
            devs => {
                let names: Vec<String> = devs.iter().map(|d| d.name()).collect();
                let names = if names.len() > 1 {
                    format!("{} devices: {}", names.len(), names.join("; "))
                } else {
                    names.join("")
                };
                match start.precision {
                    Precision::Fp32 => names,
                    Precision::Bf16 => format!("{names} (bf16 matrix products)"),
                }
            }
        }
    );
    if start.inputs.ignored > 0 {
        eprintln!(
            "note: ignored {} non-image file(s) in {}",
            start.inputs.ignored,
            args.input.display()
        );
    }
    if start.inputs.excluded > 0 {
        eprintln!(
            "note: excluded {} image(s) by --exclude (inside excluded directories too)",
            start.inputs.excluded
        );
    }
    if !start.inputs.shards.is_empty() {
        eprintln!(
            "reading {} tar shard(s); output layout: {}",
            start.inputs.shards.len(),
            match start.layout {
                OutputLayout::Tar => "tar (one output tar per input shard)",
                OutputLayout::Tree => "tree",
            }
        );
    }
}

/// The run's last line, and why it stopped early if it did. `signal` is the signal received
/// (0 for none).
pub(super) fn print_done(
    args: &AttackArgs,
    summary: &CampaignSummary,
    signal: i32,
    started: Instant,
) {
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
