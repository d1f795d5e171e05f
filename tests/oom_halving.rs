//! Out-of-device-memory handling of the batch loop: a batch that runs out of memory is retried
//! in halves, without losing or duplicating an image, and gives the same outputs as a run at the
//! smaller batch size from the start (every random draw is per image).

use std::cell::Cell;

use prm::attack::campaign::{run_campaign, OutputOptions, Progress};
use prm::attack::engine::{Engine, EngineError, LossAndGradient};
use prm::attack::image::{Evaluation, Planar};
use prm::attack::*;
use prm::gpu::GpuError;
use prm::io::list_inputs;
use prm::model::Model;
use prm::reference::ReferenceVit;

/// The reference engine, failing with out-of-memory on any call with more than `max` images.
struct SmallMemory<'m> {
    inner: ReferenceVit<'m>,
    max: usize,
    releases: Cell<usize>,
}

impl SmallMemory<'_> {
    fn check(&self, images: usize) -> Result<(), EngineError> {
        if images > self.max {
            return Err(GpuError::OutOfMemory {
                bytes: images << 20,
            }
            .into());
        }
        Ok(())
    }
}

impl Engine for SmallMemory<'_> {
    type Clean = <ReferenceVit<'static> as Engine>::Clean;
    fn model(&self) -> &Model {
        self.inner.model()
    }
    fn clean_features(&self, images: &[Planar]) -> Result<Self::Clean, EngineError> {
        self.check(images.len())?;
        self.inner.clean_features(images)
    }
    fn loss_and_gradient(
        &self,
        adv: &[Planar],
        clean: &Self::Clean,
        objective: &Objective,
    ) -> Result<Vec<LossAndGradient>, EngineError> {
        self.check(adv.len())?;
        self.inner.loss_and_gradient(adv, clean, objective)
    }
    fn evaluate(
        &self,
        adv: &[Planar],
        clean: &Self::Clean,
        objective: &Objective,
    ) -> Result<Vec<Evaluation>, EngineError> {
        self.check(adv.len())?;
        self.inner.evaluate(adv, clean, objective)
    }
    fn release_cached_memory(&self) {
        self.releases.set(self.releases.get() + 1);
    }
}

#[derive(Default)]
struct Shrinks(Cell<Vec<usize>>);
impl Progress for Shrinks {
    fn batch_shrunk(&self, size: usize, _redone: usize) {
        let mut v = self.0.take();
        v.push(size);
        self.0.set(v);
    }
}

fn write_images(dir: &std::path::Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let img = ::image::RgbImage::from_fn(40 + i as u32, 36, |x, y| {
            ::image::Rgb([(x * 7 + i as u32) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        });
        img.save(dir.join(format!("img{i}.png"))).unwrap();
    }
}

#[test]
fn an_out_of_memory_batch_is_retried_in_halves_with_nothing_lost() {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    write_images(&input, 5);
    let model = Model::load("random:tiny").unwrap();
    let mut settings = Preset::Pgd.settings();
    settings.steps = 2;
    let layers = settings
        .layers
        .resolve(model.config.feature_layers())
        .unwrap();
    let objective = Objective::new(settings.loss, layers, settings.tokens, &model).unwrap();
    let items = list_inputs(&input, None).unwrap().items;

    let run = |dir: &str, batch: usize, max: usize| {
        let mut output = OutputOptions::new(root.path().join(dir));
        output.batch_size = batch;
        let engine = SmallMemory {
            inner: ReferenceVit::new(&model),
            max,
            releases: Cell::new(0),
        };
        let progress = Shrinks::default();
        let summary =
            run_campaign(&engine, &objective, &settings, &items, &output, &progress).unwrap();
        (summary, progress.0.take(), engine.releases.get())
    };
    let (summary, shrinks, releases) = run("halved", 8, 2);
    assert_eq!((summary.ok, summary.failed), (5, 0));
    assert_eq!(shrinks, vec![2], "8 → (5 images) 2 per batch");
    assert_eq!(releases, 1);
    let manifest = std::fs::read_to_string(root.path().join("halved/manifest.jsonl")).unwrap();
    assert_eq!(
        manifest.lines().count(),
        5,
        "one record per image, none twice"
    );

    let (direct, shrinks, _) = run("direct", 2, 2);
    assert_eq!((direct.ok, shrinks.len()), (5, 0));
    for i in 0..5 {
        let a = std::fs::read(root.path().join(format!("halved/img{i}.png"))).unwrap();
        let b = std::fs::read(root.path().join(format!("direct/img{i}.png"))).unwrap();
        assert_eq!(a, b, "img{i}: same output whatever the batch history");
    }

    // Out of memory even at one image per batch: every image is a recorded failure.
    let (summary, shrinks, _) = run("never", 4, 0);
    assert_eq!((summary.ok, summary.failed), (0, 5));
    assert_eq!(shrinks, vec![2, 1]);
}
