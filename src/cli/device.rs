//! `--device` and `--precision`, shared by the subcommands that run an engine.

use anyhow::bail;
use prm::gpu::engine::Precision;
use prm::gpu::Device;

/// The engine to run on: `None` is the CPU reference engine. `auto` is CUDA device 0 when a
/// driver and a device exist, else the CPU; and the precision of the GPU engine's products.
pub fn choose_device(device: &str, precision: &str) -> anyhow::Result<(Option<Device>, Precision)> {
    let chosen = match device {
        "cpu" => None,
        "auto" => Device::cuda_available()
            .then(|| Device::cuda(0))
            .transpose()?,
        "sim" => Some(Device::sim()),
        "cuda" => Some(Device::cuda(0)?),
        d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Some(Device::cuda(n)?),
            _ => bail!("unknown device '{d}': use auto, cpu, cuda, cuda:N or sim"),
        },
    };
    let precision = match precision {
        "fp32" => Precision::Fp32,
        "bf16" if chosen.is_none() => bail!(
            "--precision bf16 needs the GPU engine, but --device {device} runs the CPU reference \
             engine, and the CPU reference engine runs fp32: use --device cuda or sim, or \
             --precision fp32"
        ),
        "bf16" => Precision::Bf16,
        p => bail!("unknown precision '{p}': use fp32 or bf16"),
    };
    Ok((chosen, precision))
}
