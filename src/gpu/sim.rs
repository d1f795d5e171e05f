//! The simulator backend: launches go to the C++ runtime in `kernels/sim/`, which runs the
//! kernels (compiled from the same `.cu` files) block by block on the calling thread, a block's
//! threads as fibers switched at every `__syncthreads` and warp collective.

use std::ffi::{c_char, c_void, CString};

use super::device::{GpuError, LaunchConfig};

extern "C" {
    /// Runs kernel `name` over the grid, synchronously. Returns 0 on success, 1 for an unknown
    /// kernel, 2 for a failure inside the launch (deadlock, bad configuration, ...), with a
    /// message written to `err` (NUL-terminated, at most `err_len` bytes).
    fn prm_sim_launch(
        name: *const c_char,
        grid_x: u32,
        grid_y: u32,
        grid_z: u32,
        block_x: u32,
        block_y: u32,
        block_z: u32,
        shared_bytes: u32,
        args: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

pub(crate) fn launch(
    kernel: &str,
    cfg: LaunchConfig,
    args: &mut [*mut c_void],
) -> Result<(), GpuError> {
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
