//! The simulator backend: launches go to the C++ runtime in `kernels/sim/`, which runs the
//! kernels (compiled from the same `.cu` files) block by block on the calling thread, a block's
//! threads as fibers switched at every `__syncthreads` and warp collective.
//!
//! Between two meeting points the simulator runs a block's threads one at a time, in the order
//! of its [`Schedule`]. A race-free kernel gives the same bits under every schedule; a kernel in
//! which one thread reads what another writes without a meeting point between them does not, so
//! running the same work on [`Device::sim()`](super::Device::sim) and on
//! [`Device::sim_with_schedule`](super::Device::sim_with_schedule)`(Schedule::Reverse)` and
//! comparing the bits finds races that a GPU shows only sometimes.

use std::ffi::{c_char, c_void, CString};

use super::device::{GpuError, LaunchConfig};

extern "C" {
    /// Runs kernel `name` over the grid, synchronously, under `schedule` (0 forward, 1 reverse,
    /// -1 `PRM_SIM_SCHEDULE`). Returns 0 on success, 1 for an unknown kernel, 2 for a failure
    /// inside the launch (deadlock, bad configuration, ...), with a message written to `err`
    /// (NUL-terminated, at most `err_len` bytes).
    fn prm_sim_launch(
        name: *const c_char,
        grid_x: u32,
        grid_y: u32,
        grid_z: u32,
        block_x: u32,
        block_y: u32,
        block_z: u32,
        shared_bytes: u32,
        schedule: i32,
        args: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;

    /// A zeroed mapping of `bytes` (> 0), 16-byte aligned, that ends where an inaccessible page
    /// begins (`guard_before` 0) or starts where one ends; null when it cannot be mapped.
    fn prm_sim_alloc(bytes: usize, guard_before: i32) -> *mut c_void;

    /// Unmaps what `prm_sim_alloc(bytes, guard_before)` returned.
    fn prm_sim_free(ptr: *mut c_void, bytes: usize, guard_before: i32);
}

/// Which end of a simulator buffer an inaccessible page guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Guard {
    /// The page follows the buffer: reads and writes past its end fault.
    After,
    /// The page precedes the buffer: reads and writes before its start fault.
    Before,
}

impl Guard {
    /// The reverse schedule's devices guard the start, the others the end: the kernel tests run
    /// on both, so both ends are checked.
    pub(crate) fn of(schedule: Option<Schedule>) -> Guard {
        match schedule {
            Some(Schedule::Reverse) => Guard::Before,
            _ => Guard::After,
        }
    }

    fn code(self) -> i32 {
        match self {
            Guard::After => 0,
            Guard::Before => 1,
        }
    }
}

/// Simulator device memory: `bytes` (> 0) zeroed bytes, 16-byte aligned, with an inaccessible
/// page at the `guard` end, so that a kernel that reads or writes past that end of its buffer
/// faults at once; the runtime's fault handler then names the kernel, block and thread and
/// aborts. `None` when the memory cannot be mapped.
pub(crate) fn alloc(bytes: usize, guard: Guard) -> Option<*mut u8> {
    // SAFETY: maps fresh memory; no other effect.
    let ptr = unsafe { prm_sim_alloc(bytes, guard.code()) } as *mut u8;
    (!ptr.is_null()).then_some(ptr)
}

/// Unmaps memory from [`alloc`].
///
/// # Safety
/// `ptr` came from `alloc(bytes, guard)` with the same `bytes` and `guard`, and is not used
/// afterwards.
pub(crate) unsafe fn free(ptr: *mut u8, bytes: usize, guard: Guard) {
    // SAFETY: the caller's contract.
    unsafe { prm_sim_free(ptr as *mut c_void, bytes, guard.code()) }
}

/// The order in which the simulator runs the blocks of a grid, and a block's runnable threads
/// after every meeting point (`__syncthreads`, a warp collective).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Blocks in grid order (x fastest), threads in thread order; `cp.async` copies land as
    /// late as a GPU may land them (at the wait that covers them). The default, unless
    /// `PRM_SIM_SCHEDULE=reverse` is set.
    Forward,
    /// Blocks and threads in the opposite order; `cp.async` copies land as early as a GPU may
    /// (when issued).
    Reverse,
}

impl Schedule {
    fn code(self) -> i32 {
        match self {
            Schedule::Forward => 0,
            Schedule::Reverse => 1,
        }
    }
}

pub(crate) fn launch(
    kernel: &str,
    cfg: LaunchConfig,
    schedule: Option<Schedule>,
    args: &mut [*mut c_void],
) -> Result<(), GpuError> {
    check_block_resources(kernel, cfg)?;
    let name = CString::new(kernel).map_err(|_| GpuError::UnknownKernel(kernel.into()))?;
    let mut err = vec![0u8; 1024];
    // SAFETY: `args` points at live argument slots for the duration of this synchronous call;
    // the runtime writes at most `err.len()` bytes into `err`.
    let code = unsafe {
        prm_sim_launch(
            name.as_ptr(),
            cfg.grid.0,
            cfg.grid.1,
            cfg.grid.2,
            cfg.block.0,
            cfg.block.1,
            cfg.block.2,
            cfg.shared_bytes,
            schedule.map_or(-1, Schedule::code),
            args.as_mut_ptr(),
            err.as_mut_ptr() as *mut c_char,
            err.len(),
        )
    };
    let message = || {
        String::from_utf8_lossy(&err[..err.iter().position(|&b| b == 0).unwrap_or(err.len())])
            .into_owned()
    };
    match code {
        0 => Ok(()),
        1 => Err(GpuError::UnknownKernel(kernel.into())),
        _ => Err(GpuError::Sim {
            kernel: kernel.into(),
            message: message(),
        }),
    }
}

mod limits {
    include!(concat!(env!("OUT_DIR"), "/prm_kernel_limits.rs"));
}

/// Registers a block may use on the GPUs prm builds for (sm_80 and sm_90: 64 Ki a block).
const REGISTERS_PER_BLOCK: u32 = 65_536;

/// What the GPU knows of `kernel` that a launch must respect and the simulator cannot see by
/// running it: the most registers a thread uses over the architectures built (ptxas) and the
/// most threads a block may have (its `__launch_bounds__`). `None` where the build did not say:
/// every field is `None` in a build without nvcc.
pub fn kernel_limits(kernel: &str) -> (Option<u32>, Option<u32>) {
    let find = |table: &[(&str, u32)]| table.iter().find(|(k, _)| *k == kernel).map(|e| e.1);
    (
        find(limits::KERNEL_REGISTERS),
        find(limits::KERNEL_MAX_THREADS),
    )
}

/// Registers a block of `threads` needs at `per_thread` registers: a warp's allocation is
/// `per_thread` rounded up to 8, times 32, rounded up to 256 (sm_80 and sm_90).
pub fn block_registers(per_thread: u32, threads: u32) -> u32 {
    let per_warp = (per_thread.min(255).div_ceil(8) * 8 * 32).div_ceil(256) * 256;
    per_warp.saturating_mul(threads.div_ceil(32))
}

/// Fails a launch the GPU would refuse with `CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES` ("too many
/// resources requested for launch"): a block larger than the kernel's `__launch_bounds__`, or
/// one whose threads need more registers than a block has.
fn check_block_resources(kernel: &str, cfg: LaunchConfig) -> Result<(), GpuError> {
    let threads = cfg
        .block
        .0
        .saturating_mul(cfg.block.1)
        .saturating_mul(cfg.block.2);
    if threads > 1024 {
        return Ok(()); // not a valid block at all: the runtime refuses it with its own message
    }
    let (registers, max_threads) = kernel_limits(kernel);
    let refuse = |why: String| {
        Err(GpuError::Sim {
            kernel: kernel.into(),
            message: format!("a GPU refuses this launch (too many resources requested): {why}"),
        })
    };
    if let Some(max) = max_threads.filter(|&max| threads > max) {
        return refuse(format!(
            "a block of {threads} threads, where its __launch_bounds__ allows {max}"
        ));
    }
    if let Some(per_thread) = registers {
        let need = block_registers(per_thread, threads);
        if need > REGISTERS_PER_BLOCK {
            return refuse(format!(
                "a block of {threads} threads at {per_thread} registers each needs {need} \
                 registers, more than the {REGISTERS_PER_BLOCK} a block has"
            ));
        }
    }
    Ok(())
}
