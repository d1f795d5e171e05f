//! Builds the kernels twice: as C++ for the simulator (always, with the system C++ compiler),
//! and with nvcc into an embedded fatbin when nvcc is present (always in CI).

#[path = "build/nvcc.rs"]
mod nvcc;
#[path = "build/sim.rs"]
mod sim;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build");
    sim::build();
    nvcc::build();
}
