//! How many images a worker's batch may hold: `--batch-size N`, or `auto` from the device's
//! free memory.

use prm::attack::campaign::MemoryBudget;
use prm::attack::Resolution;
use prm::gpu::engine::Precision;
use prm::gpu::Device;
use prm::model::Model;

/// A worker's limits per batch: images, tokens at the working size, device memory.
pub(super) struct BatchLimits {
    pub images: usize,
    pub tokens: Option<usize>,
    pub memory: Option<MemoryBudget>,
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
pub(super) fn auto_batch_limits(
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
