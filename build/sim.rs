//! Simulator half of build.rs (placeholder until the `sim` branch lands).
pub fn build() {
    cc::Build::new()
        .cpp(true)
        .file("kernels/sim/runtime.cpp")
        .flag("-std=c++20")
        .compile("prm_sim");
}
