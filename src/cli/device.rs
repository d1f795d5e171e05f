//! `--device` and `--precision`, shared by the subcommands that run an engine.
//!
//! Spellings: `auto` (CUDA device 0 when a driver and a device exist, else the CPU; also the
//! CPU, with a note, when device 0 is older than the kernels' sm_80), `cpu`,
//! `cuda` / `cuda:N`, `sim`; and for `prm attack` and `prm eval`, several devices at once: `cuda:all`
//! (every CUDA device), `cuda:0,1,...`, and `sim:N` (N simulated devices, each worker's
//! launches on its own thread: it runs the whole multi-device pipeline without a GPU).
//!
//! `PRM_SIM_MEMORY=BYTES` (e.g. `512M`) makes each simulated device stand in for a GPU with that
//! much memory: `--batch-size auto` sizes batches from what is left of it, and an allocation
//! beyond it fails as on a full GPU (see `prm::gpu::sim_memory`).

use anyhow::bail;
use prm::gpu::engine::Precision;
use prm::gpu::{Device, ProductAlgorithms};

/// The engine to run on: `None` is the CPU reference engine. `auto` is CUDA device 0 when a
/// driver and a device exist, else the CPU; and the precision of the GPU engine's products.
pub fn choose_device(device: &str, precision: &str) -> anyhow::Result<(Option<Device>, Precision)> {
    let (devices, precision) = choose_devices(device, precision)?;
    match devices.len() {
        0 => Ok((None, precision)),
        1 => Ok((devices.into_iter().next(), precision)),
        n => bail!(
            "--device {device} names {n} devices, but this command runs on one: use cuda:N or \
             sim (several devices at once are for prm attack and prm eval)"
        ),
    }
}

/// `--batch-invariant`: every device's matrix products keep one algorithm per kind of product
/// whatever the batch ([`ProductAlgorithms::BatchInvariant`]). Without it, each device keeps
/// what `PRM_BATCH_INVARIANT` said when it was opened.
pub fn batch_invariant_products(devices: &[Device], batch_invariant: bool) {
    if batch_invariant {
        for d in devices {
            d.set_product_algorithms(ProductAlgorithms::BatchInvariant);
        }
    }
}

/// A simulator device, with the memory `PRM_SIM_MEMORY` gives it when set.
fn sim_device() -> anyhow::Result<Device> {
    match std::env::var("PRM_SIM_MEMORY") {
        Ok(text) => match prm::gpu::sim_memory::parse_bytes(&text) {
            Ok(bytes) => Ok(Device::sim_with_memory(bytes)),
            Err(e) => bail!("PRM_SIM_MEMORY: {e}"),
        },
        Err(_) => Ok(Device::sim()),
    }
}

/// The devices to run on, one engine worker each: empty for the CPU reference engine.
pub fn choose_devices(device: &str, precision: &str) -> anyhow::Result<(Vec<Device>, Precision)> {
    let usage = "use auto, cpu, cuda, cuda:N, cuda:all, cuda:N,M,..., sim or sim:N";
    let chosen: Vec<Device> = match device {
        "cpu" => Vec::new(),
        "auto" => {
            if !Device::cuda_available() {
                Vec::new()
            } else {
                match Device::cuda(0) {
                    Ok(dev) => vec![dev],
                    // No build can run on it: the CPU is what auto means there.
                    Err(e @ prm::gpu::GpuError::GpuTooOld { .. }) => {
                        eprintln!("note: {e}; --device auto runs on the CPU");
                        Vec::new()
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        "sim" => vec![sim_device()?],
        "cuda" => vec![Device::cuda(0)?],
        "cuda:all" => {
            let count = prm::gpu::cuda::device_count();
            if count == 0 {
                // Device::cuda says why (no driver, no kernels, no device).
                Device::cuda(0)?;
                bail!("--device cuda:all: no CUDA device found; use --device cpu or sim");
            }
            (0..count).map(Device::cuda).collect::<Result<_, _>>()?
        }
        d => {
            if let Some(n) = d.strip_prefix("sim:") {
                match n.parse::<usize>() {
                    Ok(n) if (1..=64).contains(&n) => {
                        (0..n).map(|_| sim_device()).collect::<Result<_, _>>()?
                    }
                    _ => bail!(
                        "--device {d}: sim:N takes a number of simulated devices from 1 to 64"
                    ),
                }
            } else if let Some(list) = d.strip_prefix("cuda:") {
                let ordinals = list
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<Vec<_>, _>>();
                match ordinals {
                    Ok(ordinals) if !ordinals.is_empty() => {
                        let mut seen = std::collections::HashSet::new();
                        if let Some(dup) = ordinals.iter().find(|&&o| !seen.insert(o)) {
                            bail!(
                                "--device {d}: cuda:{dup} is listed twice; list each device once"
                            );
                        }
                        ordinals
                            .into_iter()
                            .map(Device::cuda)
                            .collect::<Result<_, _>>()?
                    }
                    _ => bail!("unknown device '{d}': {usage}"),
                }
            } else {
                bail!("unknown device '{d}': {usage}")
            }
        }
    };
    let precision = match precision {
        "fp32" => Precision::Fp32,
        "bf16" if chosen.is_empty() => bail!(
            "--precision bf16 needs the GPU engine, but --device {device} runs the CPU reference \
             engine, and the CPU reference engine runs fp32: use --device cuda or sim, or \
             --precision fp32"
        ),
        "bf16" => Precision::Bf16,
        p => bail!("unknown precision '{p}': use fp32 or bf16"),
    };
    Ok((chosen, precision))
}
