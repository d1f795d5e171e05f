//! The progress bar of `prm attack`: image-steps done, images/s, current image.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use prm::attack::campaign::{Progress, RedoneOnResume};
use prm::io::{ManifestRecord, Status};

pub struct Bar {
    bar: ProgressBar,
    steps_per_image: u64,
    quiet: bool,
    started: Instant,
    done: std::sync::atomic::AtomicUsize,
}

impl Bar {
    /// `images` × `steps` image-steps in all. Hidden with `quiet` or when stderr is not a
    /// terminal.
    pub fn new(images: usize, steps: usize, quiet: bool) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some((images * steps) as u64),
            if quiet {
                ProgressDrawTarget::hidden()
            } else {
                ProgressDrawTarget::stderr()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} image-steps, {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Bar {
            bar,
            steps_per_image: steps as u64,
            quiet,
            started: Instant::now(),
            done: 0.into(),
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn redone_on_resume(&self, redone: RedoneOnResume) {
        if self.quiet {
            return;
        }
        let reasons = [
            (
                redone.changed,
                "have another size than when they were attacked (another image under the same \
                 name?)",
            ),
            (
                redone.other_layout,
                "were written in the other --output-layout (give the earlier run's to resume it)",
            ),
            (redone.no_float, "lack the float file --save-float asks for"),
        ];
        self.bar.suspend(|| {
            for (n, why) in reasons.iter().filter(|(n, _)| *n > 0) {
                eprintln!("note: {n} input(s) recorded as done {why}: attacking them again");
            }
        });
    }
    fn skipped(&self, images: usize) {
        // A resumed run starts from what is already done.
        self.bar.inc(images as u64 * self.steps_per_image);
        if !self.quiet {
            self.bar.suspend(|| {
                eprintln!("resuming: {images} image(s) already done, skipped");
            });
        }
    }
    fn image_started(&self, rel: &str) {
        let done = self.done.load(std::sync::atomic::Ordering::Relaxed);
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        self.bar
            .set_message(format!("{done} images ({rate:.2} images/s), now {rel}"));
    }
    fn batch_shrunk(&self, size: usize, redone: usize) {
        // `dec`, not a read-then-set: other engine workers move the bar at the same time.
        self.bar.dec(redone as u64);
        if !self.quiet {
            self.bar.suspend(|| {
                eprintln!(
                    "note: out of device memory; retrying with {size} image(s) per batch \
                     (nothing was lost: the batch is redone)"
                );
            });
        }
    }
    fn steps_done(&self, image_steps: usize) {
        self.bar.inc(image_steps as u64);
    }
    fn image_done(&self, record: &ManifestRecord) {
        self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if record.status == Status::Error {
            self.bar.suspend(|| {
                eprintln!(
                    "failed: {}: {}",
                    record.input,
                    record.error.as_deref().unwrap_or("unknown error")
                );
            });
        }
    }
}
