//! What `prm attack` writes once its images are done: the device timeline, the loss plot and
//! the profile. The timeline's table, its trace's path and the profile's table were asked for by
//! a flag, so they are printed even with `--quiet`; the plot's and the profile file's paths are
//! not.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use prm::attack::campaign::{Progress, RedoneOnResume};
use prm::attack::profile::Timeline;
use prm::attack::AttackSettings;
use prm::gpu::Device;
use prm::viz::plot::{write_loss_plot, LossCurves};

use super::super::progress::Bar;
use super::super::timeline::{timeline_table, write_trace};
use super::{value_name, AttackArgs};

/// `--device-timeline`: the table on stderr, every operation in a trace file.
pub(super) fn write_device_timeline(path: &Path, dev: &Device) -> anyhow::Result<()> {
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
    Ok(())
}

/// `--plot`: the loss curves of every attacked image, as a PNG and the JSON of its numbers.
pub(super) fn write_plot(
    args: &AttackArgs,
    settings: &AttackSettings,
    path: &Path,
    p: Curves<'_>,
) -> anyhow::Result<()> {
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
    Ok(())
}

/// `--profile`: the summary on stderr and, with a file, every batch's timestamps as JSON.
pub(super) fn write_profile(args: &AttackArgs, t: &Timeline) -> anyhow::Result<()> {
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
    Ok(())
}

/// The progress bar, plus the loss curves of `--plot`.
pub(super) struct Curves<'a> {
    pub bar: &'a Bar,
    pub curves: Mutex<LossCurves>,
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
