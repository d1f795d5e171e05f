//! Builds the kernels twice: as C++ for the simulator (always, with the system C++ compiler),
//! and with nvcc into an embedded fatbin when nvcc is present (always in CI).
//!
//! Both halves' compiles (one a file) run on one pool of `NUM_JOBS` threads, longest first,
//! and come from the kernel cache when nothing they read has changed (`build/cache.rs`).

#[path = "build/cache.rs"]
mod cache;
#[path = "build/nvcc.rs"]
mod nvcc;
#[path = "build/pool.rs"]
mod pool;
#[path = "build/sim.rs"]
mod sim;

use std::path::PathBuf;

/// What a job of either half returns.
enum Output {
    SimObject(Result<PathBuf, String>),
    Fatbin(Result<nvcc::Compiled, String>),
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cache = cache::KernelCache::open(&out_dir, &manifest.join("kernels"));

    let simulator = sim::plan();
    let cuda = nvcc::plan();

    let mut jobs: Vec<(u64, pool::Job<'_, Output>)> = Vec::new();
    for (cost, job) in simulator.jobs(&cache) {
        jobs.push((cost, Box::new(move || Output::SimObject(job()))));
    }
    for (cost, job) in cuda.iter().flat_map(|c| c.jobs(&cache)) {
        jobs.push((cost, Box::new(move || Output::Fatbin(job()))));
    }
    let outputs = pool::run(jobs, pool::workers());

    let mut objects = Vec::new();
    let mut fatbins = Vec::new();
    for output in outputs {
        match output {
            Output::SimObject(o) => objects.push(o),
            Output::Fatbin(f) => fatbins.push(f),
        }
    }
    // Both halves report before the build fails, so one run shows every compiler error.
    let errors: Vec<String> = [
        simulator.finish(objects).err(),
        cuda.and_then(|c| c.finish(fatbins).err()),
    ]
    .into_iter()
    .flatten()
    .collect();
    cache.prune();
    if !errors.is_empty() {
        panic!("{}", errors.join("\n\n"));
    }
}
