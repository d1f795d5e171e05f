//! Helpers shared by the kernel tests: test data, the device loop (simulator always, CUDA when
//! present), and the fp32 closeness check.
#![allow(dead_code)]

use prm::gpu::sim::Schedule;
use prm::gpu::{Device, GpuError};

/// Tiny xorshift64* generator for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// The simulator under both schedules (a race would break one of them: see `prm::gpu::sim`),
/// or only the default one when `PRM_TEST_SIM_SCHEDULES=forward` (set by
/// `scripts/gpu-check.sh`: on a lent GPU machine the minutes are for CUDA; CI checks races).
pub fn sim_devices() -> Vec<Device> {
    let mut d = vec![Device::sim()];
    if std::env::var("PRM_TEST_SIM_SCHEDULES").map_or(true, |v| v.trim() != "forward") {
        d.push(Device::sim_with_schedule(Schedule::Reverse));
    }
    d
}

/// Whether tests that pick the simulator's schedule themselves run `schedule`: the reverse one
/// only where [`sim_devices`] would.
pub fn sim_schedule_runs(schedule: Schedule) -> bool {
    schedule == Schedule::Forward
        || std::env::var("PRM_TEST_SIM_SCHEDULES").map_or(true, |v| v.trim() != "forward")
}

/// Runs `check` on the simulator ([`sim_devices`]), and on CUDA when a device (and this build's
/// kernels) exist.
pub fn on_devices(name: &str, check: impl Fn(&Device) -> Result<(), GpuError>) {
    for dev in sim_devices() {
        check(&dev).unwrap_or_else(|e| panic!("{name} on {}: {e}", dev.name()));
    }
    if !Device::cuda_available() {
        println!("{name}: skipped: no CUDA device");
        return;
    }
    match Device::cuda(0) {
        Ok(dev) => match check(&dev) {
            Ok(()) => println!("{name}: passed on {}", dev.name()),
            Err(GpuError::NoKernels) => println!("{name}: skipped: no CUDA kernels in this build"),
            Err(e) => panic!("{name} on CUDA: {e}"),
        },
        Err(e) => println!("{name}: skipped: no usable CUDA device ({e})"),
    }
}

pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Asserts max |got − want| ≤ rel · max |want| (the fp32 tolerance of these tests).
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = max_abs(want).max(f32::MIN_POSITIVE);
    let mut worst = (0usize, 0.0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(!g.is_nan(), "{what}: NaN at {i} (want {w})");
        if d > worst.1 {
            worst = (i, d);
        }
    }
    assert!(
        worst.1 <= rel * scale,
        "{what}: |got − want| = {} at {} (got {}, want {}), limit {} · {}",
        worst.1,
        worst.0,
        got[worst.0],
        want[worst.0],
        rel,
        scale
    );
}
