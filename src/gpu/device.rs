//! [`Device`], device memory ([`Buffer`]), kernel arguments and launches.

use std::marker::PhantomData;
use std::sync::Arc;

use super::gemm::ProductAlgorithms;
use super::graph::{CaptureSlot, SimOp, SimPtr};
use super::sim_memory::SimMemory;
use super::timeline::{OpKind, TimelineSlot};
use super::{cuda, sim};

/// Errors of the device layer. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no CUDA driver found (libcuda could not be loaded); use --device cpu or --device sim"
    )]
    NoDriver,
    #[error("CUDA device {ordinal} does not exist ({count} device(s) found); use --device cuda:0..{count} or --device cpu")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("this build has no CUDA kernels (nvcc was not found when it was compiled); install nvcc with scripts/install-nvcc.sh and rebuild, or use --device sim")]
    NoKernels,
    #[error("{name} has compute capability {major}.{minor}; prm's kernels need 8.0 or newer (bf16 tensor cores: A100, RTX 30xx, H100 and later); use --device cpu")]
    GpuTooOld {
        name: String,
        major: i32,
        minor: i32,
    },
    #[error("CUDA error in {context}: {message}")]
    Cuda { context: String, message: String },
    #[error("kernel {kernel} failed in the simulator: {message}")]
    Sim { kernel: String, message: String },
    #[error("unknown kernel {0} (not compiled into this build)")]
    UnknownKernel(String),
    #[error("out of device memory allocating {bytes} bytes: attack or evaluate fewer or smaller images at a time (--batch-size, --resolution), or use a device with more memory")]
    OutOfMemory { bytes: usize },
    /// Page-locked host memory (for staged copies) could not be allocated: host memory is
    /// short or locked memory is limited, while the device may be fine. Never a reason to make
    /// a batch smaller; the staging falls back to ordinary copies.
    #[error("out of page-locked host memory allocating {bytes} bytes for a staged copy: free host memory or raise the locked-memory limit (ulimit -l), or set PRM_NO_STAGING=1")]
    PinnedHostMemory { bytes: usize },
    #[error("invalid device '{0}': use auto, cpu, cuda, cuda:N or sim")]
    BadSpec(String),
    /// Something a graph cannot contain was asked for while one was being captured
    /// (allocation, upload, download, synchronisation, a nested capture).
    #[error("{what} is not allowed while a graph is being captured: capture only kernel launches, products, device copies and fills on buffers that exist before the capture")]
    Capture { what: String },
    /// A graph could not be replayed as captured.
    #[error("graph replay failed: {0}")]
    Graph(String),
    /// A setting of the GPU engine (e.g. an environment variable) has a value it does not
    /// know; the message names the allowed values.
    #[error("{0}")]
    Config(String),
    /// A timeline was started twice, or finished without being started.
    #[error("{0}")]
    Timeline(String),
}

impl GpuError {
    /// Device or page-locked host memory ran short: the operation may succeed later, and the
    /// objects involved are intact.
    pub fn is_memory_shortage(&self) -> bool {
        matches!(
            self,
            GpuError::OutOfMemory { .. } | GpuError::PinnedHostMemory { .. }
        )
    }

    /// A fault that ends the CUDA context (an illegal or misaligned address, an illegal
    /// instruction, a failed launch, a device-side assert): every later call of the process
    /// fails with it, so nothing should carry on as if one kernel were merely unavailable.
    /// Read from the code's name, which a driver error's message starts with (written from the
    /// code itself by `cuda::driver_error`, not by cudarc's formatting).
    pub fn ends_the_context(&self) -> bool {
        const STICKY: [&str; 8] = [
            "CUDA_ERROR_ILLEGAL_ADDRESS",
            "CUDA_ERROR_MISALIGNED_ADDRESS",
            "CUDA_ERROR_ILLEGAL_INSTRUCTION",
            "CUDA_ERROR_INVALID_ADDRESS_SPACE",
            "CUDA_ERROR_INVALID_PC",
            "CUDA_ERROR_HARDWARE_STACK_ERROR",
            "CUDA_ERROR_LAUNCH_FAILED",
            "CUDA_ERROR_ASSERT",
        ];
        matches!(self, GpuError::Cuda { message, .. } if STICKY.iter().any(|s| message.contains(s)))
    }

    /// A launch asking a block for more dynamic shared memory than the GPU allows one (its
    /// opt-in limit): the CUDA backend refuses it before launching, and so does a simulator
    /// made with a GPU's limit.
    pub(crate) fn shared_memory_refused(kernel: &str, requested: u32, limit: u32) -> GpuError {
        GpuError::Cuda {
            context: format!("launching {kernel}"),
            message: format!(
                "{requested} bytes of dynamic shared memory requested; this GPU allows at most \
                 {limit} per block"
            ),
        }
    }
}

/// Element types that may live in device memory.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {}
impl Element for f32 {}
impl Element for i32 {}
impl Element for u32 {}
impl Element for u8 {}
impl Element for u64 {}
impl Element for f64 {}
impl Element for half::bf16 {}

pub(crate) enum Backend {
    Sim(SimOptions),
    Cuda(cuda::CudaBackend),
}

/// What a simulator device was made with.
#[derive(Clone, Default)]
pub(crate) struct SimOptions {
    /// The schedule of its launches (`None`: `PRM_SIM_SCHEDULE`).
    pub(crate) schedule: Option<sim::Schedule>,
    /// The most dynamic shared memory a block may ask for, as a GPU's per-block opt-in limit
    /// (`None`: the simulator's own, an H100's 227 KiB, which it does not report).
    pub(crate) shared_per_block: Option<u32>,
    /// Its memory accounting, and the total it pretends to have ([`Device::sim_with_memory`]).
    pub(crate) memory: Arc<SimMemory>,
    /// Held through each of its launches (and graph replays): one device runs them one at a
    /// time, in the order its threads make them, as a stream does. The simulator itself runs
    /// launches on different OS threads at once (each thread has its own fibers and shared
    /// memory), so different devices, and the tests' own devices, work in parallel.
    launch_order: Arc<std::sync::Mutex<()>>,
}

impl SimOptions {
    /// Runs `launch` with this device's other launches held off.
    pub(crate) fn one_at_a_time<T>(&self, launch: impl FnOnce() -> T) -> T {
        // A launch that panicked leaves nothing half-done that the lock guards.
        let _turn = self
            .launch_order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        launch()
    }
}

/// What a new allocation holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    Zero,
    Undefined,
}

/// A device: cheap to clone, shared by every buffer allocated on it.
#[derive(Clone)]
pub struct Device {
    pub(crate) backend: Arc<Backend>,
    /// The capture in progress, if any ([`Device::capture`]), shared by every clone.
    pub(crate) capture: CaptureSlot,
    /// The timeline being recorded, if any ([`Device::start_timeline`]), shared by every clone.
    pub(crate) timeline: TimelineSlot,
}

/// Where a buffer's bytes live.
pub(crate) enum Memory {
    /// Simulator memory: a zeroed host mapping of `bytes`, 16-byte aligned, with an
    /// inaccessible page at its `guard` end (a kernel that runs past it faults; see
    /// `sim::alloc`), written by kernels through raw pointers (hence no Rust reference to its
    /// contents is ever handed out).
    Host {
        ptr: *mut u8,
        bytes: usize,
        guard: sim::Guard,
        /// The device's accounting, which the bytes go back to.
        meter: Arc<SimMemory>,
    },
    Cuda(cuda::CudaMemory),
}

// SAFETY: host memory is owned exclusively by its Buffer; access is synchronised by &/&mut.
unsafe impl Send for Memory {}
unsafe impl Sync for Memory {}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Memory::Host {
            ptr,
            bytes,
            guard,
            meter,
        } = self
        {
            super::graph::unregister_allocation(*ptr as u64);
            // SAFETY: allocated by `sim::alloc(bytes, guard)` in `Device::alloc`, freed once
            // here.
            unsafe { sim::free(*ptr, *bytes, *guard) };
            meter.release(*bytes);
        }
    }
}

/// A typed array in device memory.
pub struct Buffer<T: Element> {
    len: usize,
    pub(crate) mem: Memory,
    _t: PhantomData<T>,
}

impl<T: Element> Buffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
    /// Bytes of memory behind the buffer (at least [`Buffer::bytes`]).
    pub fn capacity_bytes(&self) -> usize {
        match &self.mem {
            Memory::Host { bytes, .. } => *bytes,
            Memory::Cuda(m) => m.len(),
        }
    }

    /// Re-sizes the buffer's view within its memory (a pooled buffer handed out for a shorter
    /// request). Panics if `len` elements do not fit.
    pub(crate) fn set_len(&mut self, len: usize) {
        assert!(
            len * std::mem::size_of::<T>() <= self.capacity_bytes(),
            "{len} elements do not fit in {} bytes",
            self.capacity_bytes()
        );
        self.len = len;
    }

    /// The same memory viewed as elements of `U` (as many as fit in [`Buffer::bytes`]): how the
    /// engine's pool lends its f32 buffers as bf16 storage.
    pub(crate) fn reinterpret<U: Element>(self) -> Buffer<U> {
        let len = self.bytes() / std::mem::size_of::<U>();
        Buffer {
            len,
            mem: self.mem,
            _t: PhantomData,
        }
    }

    /// The address a kernel sees: a host address under the simulator, a CUdeviceptr on CUDA.
    pub fn address(&self) -> u64 {
        match &self.mem {
            Memory::Host { ptr, .. } => *ptr as u64,
            Memory::Cuda(m) => m.address(),
        }
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch.
    pub fn linear(blocks: u32, threads: u32, shared_bytes: u32) -> Self {
        LaunchConfig {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes,
        }
    }
}

/// Kernel arguments packed as `cuLaunchKernel` expects: one slot per parameter, and a pointer
/// to each slot.
#[derive(Default)]
pub struct KernelArgs {
    slots: Vec<u64>,
    /// Indices of the slots that hold buffer addresses (checked when a graph is replayed under
    /// the simulator).
    pointer_slots: Vec<usize>,
    /// Per output buffer (in argument order), the accessible bytes right after its last
    /// element, (address, length): the simulator fills them with a canary before a launch
    /// and checks them after it (see [`OutputTail`]).
    output_tails: Vec<OutputTail>,
}

/// The bytes a simulator launch may not write after an output buffer's last element: up to
/// [`TAIL_CANARY_BYTES`] of what is still accessible behind it (the rounding of the buffer to
/// 16 bytes, or a pooled buffer's unused capacity). The guard page behind a buffer catches
/// an overrun past its rounded end; this catches the smaller ones, e.g. a kernel that writes
/// element `len` of a 197-float row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OutputTail {
    address: u64,
    len: usize,
}

/// Bytes checked after each output buffer of a simulator launch.
const TAIL_CANARY_BYTES: usize = 64;

/// The canary, as 32-bit words: a NaN as fp32 and as each bf16 half, so that a kernel that
/// reads the tail (rather than writing it) gets NaN, which the tests see in its outputs.
const TAIL_CANARY_WORD: u32 = 0x7FFF_7FFF;

/// A simulator launch with its output tails armed before and checked after (see
/// [`OutputTail`]): a changed tail fails the launch, naming the kernel and the buffer.
///
/// # Safety
/// Every tail lies inside a live simulator allocation that nothing else uses during the launch.
pub(crate) unsafe fn sim_launch_checking_tails(
    kernel: &str,
    cfg: LaunchConfig,
    schedule: Option<sim::Schedule>,
    args: &mut [*mut std::ffi::c_void],
    tails: &[OutputTail],
) -> Result<(), GpuError> {
    // SAFETY: as the function's contract.
    tails.iter().for_each(|t| unsafe { t.arm() });
    sim::launch(kernel, cfg, schedule, args)?;
    for (i, t) in tails.iter().enumerate() {
        // SAFETY: as above.
        if let Some(offset) = unsafe { t.first_change() } {
            return Err(GpuError::Sim {
                kernel: kernel.into(),
                message: format!(
                    "wrote past the end of its output buffer {} of {}: byte {offset} after the \
                     buffer's last element changed",
                    i + 1,
                    tails.len()
                ),
            });
        }
    }
    Ok(())
}

impl OutputTail {
    fn of<T: Element>(b: &Buffer<T>) -> Self {
        let accessible = b.capacity_bytes().div_ceil(16) * 16;
        OutputTail {
            address: b.address() + b.bytes() as u64,
            len: accessible.saturating_sub(b.bytes()).min(TAIL_CANARY_BYTES),
        }
    }

    /// The canary's byte at tail offset `i` (the words aligned to 4-byte addresses).
    fn canary_byte(&self, i: usize) -> u8 {
        TAIL_CANARY_WORD.to_le_bytes()[(self.address as usize + i) % 4]
    }

    /// Fills the tail with the canary.
    ///
    /// # Safety
    /// The tail lies inside a live simulator allocation that nothing else uses during the
    /// launch (the bytes past an exclusively borrowed buffer's last element).
    unsafe fn arm(&self) {
        for i in 0..self.len {
            // SAFETY: as the function's contract.
            unsafe { (self.address as *mut u8).add(i).write(self.canary_byte(i)) };
        }
    }

    /// The first byte of the tail the launch changed, as an offset past the buffer's end.
    ///
    /// # Safety
    /// As [`Self::arm`].
    unsafe fn first_change(&self) -> Option<usize> {
        // SAFETY: as the function's contract.
        (0..self.len)
            .find(|&i| unsafe { (self.address as *const u8).add(i).read() != self.canary_byte(i) })
    }
}

impl KernelArgs {
    pub fn new() -> Self {
        KernelArgs::default()
    }
    /// A read-only buffer (`const T*`).
    pub fn input<T: Element>(&mut self, b: &Buffer<T>) -> &mut Self {
        self.pointer_slots.push(self.slots.len());
        self.slots.push(b.address());
        self
    }
    /// A buffer the kernel writes (`T*`). Taking `&mut` lets the borrow checker catch aliasing.
    pub fn output<T: Element>(&mut self, b: &mut Buffer<T>) -> &mut Self {
        self.pointer_slots.push(self.slots.len());
        self.slots.push(b.address());
        if matches!(b.mem, Memory::Host { .. }) {
            self.output_tails.push(OutputTail::of(b));
        }
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.slots.push(v as u32 as u64);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.slots.push(v as u64);
        self
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.slots.push(v.to_bits() as u64);
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.slots.push(v);
        self
    }
    /// The `void**` list. Scalars sit at the start of their 8-byte slot (little-endian), which
    /// is where a 4-byte parameter is read from.
    pub(crate) fn pointers(&mut self) -> Vec<*mut std::ffi::c_void> {
        self.slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut std::ffi::c_void)
            .collect()
    }
}

impl Device {
    /// The CPU simulator of the CUDA execution model, running blocks and threads in the order
    /// `PRM_SIM_SCHEDULE` names (forward when unset).
    pub fn sim() -> Device {
        Device::sim_backend(SimOptions::default())
    }

    /// The simulator under a chosen [`Schedule`](sim::Schedule): comparing the results of the
    /// two schedules finds races (see [`sim`]).
    pub fn sim_with_schedule(schedule: sim::Schedule) -> Device {
        Device::sim_backend(SimOptions {
            schedule: Some(schedule),
            ..SimOptions::default()
        })
    }

    /// The simulator standing in for a GPU that allows a block at most `bytes` of dynamic
    /// shared memory (an A100 163 KiB, the sm_86 / sm_89 / sm_120 GPUs 99 KiB; the simulator
    /// itself allows an H100's 227 KiB): [`Device::max_shared_per_block`] reports `bytes`, so
    /// kernels choose as they would there, and a launch that asks for more fails with the CUDA
    /// backend's error.
    pub fn sim_with_shared_limit(bytes: u32) -> Device {
        Device::sim_backend(SimOptions {
            shared_per_block: Some(bytes),
            ..SimOptions::default()
        })
    }

    /// The simulator standing in for a GPU with `bytes` of device memory: its buffers count
    /// against it, [`Device::free_memory`] reports what is left (so `--batch-size auto` sizes
    /// batches from it as on a GPU), and an allocation beyond it fails with
    /// [`GpuError::OutOfMemory`], wherever in the engine it happens (see
    /// [`sim_memory`](super::sim_memory)).
    pub fn sim_with_memory(bytes: usize) -> Device {
        Device::sim_backend(SimOptions {
            memory: Arc::new(SimMemory::new(Some(bytes))),
            ..SimOptions::default()
        })
    }

    fn sim_backend(options: SimOptions) -> Device {
        Device {
            backend: Arc::new(Backend::Sim(options)),
            capture: CaptureSlot::default(),
            timeline: TimelineSlot::default(),
        }
    }

    /// CUDA device `ordinal`. Checks for the driver first: cudarc panics without one.
    pub fn cuda(ordinal: usize) -> Result<Device, GpuError> {
        Ok(Device {
            backend: Arc::new(Backend::Cuda(cuda::CudaBackend::new(ordinal)?)),
            capture: CaptureSlot::default(),
            timeline: TimelineSlot::default(),
        })
    }

    /// Whether a CUDA driver and at least one device are present (never panics).
    pub fn cuda_available() -> bool {
        cuda::device_count() > 0
    }

    pub fn is_sim(&self) -> bool {
        matches!(*self.backend, Backend::Sim(_))
    }

    /// The schedule a simulator device was made with ([`Device::sim_with_schedule`]); `None` for
    /// [`Device::sim`] (which follows `PRM_SIM_SCHEDULE`) and for CUDA devices.
    pub fn sim_schedule(&self) -> Option<sim::Schedule> {
        match &*self.backend {
            Backend::Sim(options) => options.schedule,
            Backend::Cuda(_) => None,
        }
    }

    /// A human-readable name: "sim" or the GPU's name.
    pub fn name(&self) -> String {
        match &*self.backend {
            Backend::Sim(options) => {
                let mut name = String::from("sim (CPU simulator of the CUDA execution model");
                if options.schedule == Some(sim::Schedule::Reverse) {
                    name.push_str(", reverse schedule");
                }
                if let Some(bytes) = options.shared_per_block {
                    name.push_str(&format!(", {bytes} bytes of shared memory a block"));
                }
                if let Some(bytes) = options.memory.limit() {
                    name.push_str(&format!(", {bytes} bytes of device memory"));
                }
                name + ")"
            }
            Backend::Cuda(c) => c.name(),
        }
    }

    /// A zero-filled buffer of `len` elements.
    pub fn alloc<T: Element>(&self, len: usize) -> Result<Buffer<T>, GpuError> {
        self.alloc_filled(len, Fill::Zero)
    }

    /// A buffer of `len` elements with undefined contents, for memory that is written before
    /// it is read (a pool's miss, an upload): on CUDA no fill pass runs, which on a large
    /// buffer is a pass over memory the size of the buffer. Under the simulator every byte is
    /// 0xFF (NaN for floats), so code that reads it before writing fails its tests instead of
    /// reading zeros.
    pub fn alloc_undefined<T: Element>(&self, len: usize) -> Result<Buffer<T>, GpuError> {
        self.alloc_filled(len, Fill::Undefined)
    }

    fn alloc_filled<T: Element>(&self, len: usize, fill: Fill) -> Result<Buffer<T>, GpuError> {
        let _timed = super::host_stats::timed(super::host_stats::Call::Alloc);
        self.refuse_in_capture("allocating device memory")?;
        let bytes = len * std::mem::size_of::<T>();
        let mem = match &*self.backend {
            Backend::Sim(options) => {
                let (size, guard) = (bytes.max(1), sim::Guard::of(options.schedule));
                if !options.memory.reserve(size) {
                    return Err(GpuError::OutOfMemory { bytes });
                }
                let Some(ptr) = sim::alloc(size, guard) else {
                    options.memory.release(size);
                    return Err(GpuError::OutOfMemory { bytes });
                };
                super::graph::register_allocation(ptr as u64);
                Memory::Host {
                    ptr,
                    bytes: size,
                    guard,
                    meter: options.memory.clone(),
                }
            }
            Backend::Cuda(c) => Memory::Cuda(match fill {
                Fill::Zero => c.alloc_zeroed(bytes)?,
                Fill::Undefined => c.alloc_undefined(bytes)?,
            }),
        };
        let mut buf = Buffer {
            len,
            mem,
            _t: PhantomData,
        };
        if fill == Fill::Undefined && self.is_sim() {
            self.poison(&mut buf)?;
        }
        Ok(buf)
    }

    /// A new buffer holding `data`.
    pub fn upload<T: Element>(&self, data: &[T]) -> Result<Buffer<T>, GpuError> {
        let mut b = self.alloc_undefined(data.len())?;
        self.write(&mut b, data)?;
        Ok(b)
    }

    /// Overwrites `buf` (which must have `data.len()` elements) with `data`.
    pub fn write<T: Element>(&self, buf: &mut Buffer<T>, data: &[T]) -> Result<(), GpuError> {
        assert_eq!(
            buf.len,
            data.len(),
            "write of {} elements into a buffer of {}",
            data.len(),
            buf.len
        );
        self.write_range(buf, 0, data)
    }

    /// Copies `buf` back to the host.
    pub fn download<T: Element>(&self, buf: &Buffer<T>) -> Result<Vec<T>, GpuError> {
        self.download_range(buf, 0, buf.len)
    }

    /// Copies elements `start .. start + len` of `buf` back to the host (after all work queued
    /// before). Panics when the range is not inside the buffer.
    pub fn download_range<T: Element>(
        &self,
        buf: &Buffer<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>, GpuError> {
        let _timed = super::host_stats::timed(super::host_stats::Call::Download);
        self.refuse_in_capture("copying device data to the host")?;
        assert!(
            start.checked_add(len).is_some_and(|end| end <= buf.len),
            "download of elements {start}..{start}+{len} from a buffer of {}",
            buf.len
        );
        let mut out = vec![T::zeroed(); len];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        let (offset, count) = (start * std::mem::size_of::<T>(), bytes.len());
        self.timed_op(
            OpKind::Download,
            || (format!("download ({})", size_bucket(count)), 0.0),
            || match &buf.mem {
                Memory::Host { ptr, .. } => {
                    // SAFETY: the range lies inside the allocation (asserted above); no kernel
                    // is running (simulator launches are synchronous).
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr.add(offset), bytes.as_mut_ptr(), count)
                    };
                    Ok(())
                }
                Memory::Cuda(m) => m.read_at(offset, bytes),
            },
        )?;
        Ok(out)
    }

    /// Copies the first elements of `buf` back to the host cut into pieces of `lens` elements
    /// (one vector per image of a packed batch), with one wait for the device.
    pub fn download_split<T: Element>(
        &self,
        buf: &Buffer<T>,
        lens: &[usize],
    ) -> Result<Vec<Vec<T>>, GpuError> {
        let mut offset = 0;
        lens.iter()
            .map(|&len| {
                // The first read waits for the device; the rest find it idle.
                let piece = self.download_range(buf, offset, len);
                offset += len;
                piece
            })
            .collect()
    }

    /// Writes `data` into `buf` from element `start` on (the rest of `buf` is left as it is), in
    /// stream order, like [`Device::write`]. Panics when the range is not inside the buffer.
    pub fn write_range<T: Element>(
        &self,
        buf: &mut Buffer<T>,
        start: usize,
        data: &[T],
    ) -> Result<(), GpuError> {
        let _timed = super::host_stats::timed(super::host_stats::Call::Upload);
        self.refuse_in_capture("copying host data to the device")?;
        assert!(
            start
                .checked_add(data.len())
                .is_some_and(|end| end <= buf.len),
            "write of elements {start}..{start}+{} into a buffer of {}",
            data.len(),
            buf.len
        );
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let offset = start * std::mem::size_of::<T>();
        self.timed_op(
            OpKind::Upload,
            || (format!("upload ({})", size_bucket(bytes.len())), 0.0),
            || match &mut buf.mem {
                Memory::Host { ptr, .. } => {
                    // SAFETY: the range lies inside the allocation (asserted above), which is
                    // exclusively borrowed.
                    unsafe {
                        std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.add(offset), bytes.len())
                    };
                    Ok(())
                }
                Memory::Cuda(m) => m.write_at(offset, bytes),
            },
        )
    }

    /// Copies `src` into `dst` on the device (same length).
    pub fn copy<T: Element>(&self, src: &Buffer<T>, dst: &mut Buffer<T>) -> Result<(), GpuError> {
        assert_eq!(
            src.len, dst.len,
            "copy of {} elements into a buffer of {}",
            src.len, dst.len
        );
        self.copy_range(src, 0, dst, 0, src.len)
    }

    /// Copies elements `src_start .. src_start + len` of `src` to `dst_start ..` of `dst` on the
    /// device, in stream order (the rest of `dst` is left as it is). Panics when a range is
    /// not inside its buffer.
    pub fn copy_range<T: Element>(
        &self,
        src: &Buffer<T>,
        src_start: usize,
        dst: &mut Buffer<T>,
        dst_start: usize,
        len: usize,
    ) -> Result<(), GpuError> {
        let _timed = super::host_stats::timed(super::host_stats::Call::Copy);
        let inside =
            |start: usize, buf_len: usize| start.checked_add(len).is_some_and(|end| end <= buf_len);
        assert!(
            inside(src_start, src.len) && inside(dst_start, dst.len),
            "copy of elements {src_start}..{src_start}+{len} of a buffer of {} into \
             {dst_start}.. of a buffer of {}",
            src.len,
            dst.len
        );
        let size = std::mem::size_of::<T>();
        let (src_offset, dst_offset, bytes) = (src_start * size, dst_start * size, len * size);
        let recorded = self.record(
            || SimOp::Copy {
                src: SimPtr::new(src.address()),
                src_offset,
                dst: SimPtr::new(dst.address()),
                dst_offset,
                bytes,
            },
            |o| o.copies += 1,
        );
        if recorded {
            return Ok(());
        }
        self.timed_op(
            OpKind::Copy,
            || (format!("device copy ({})", size_bucket(bytes)), 0.0),
            || match (&src.mem, &mut dst.mem) {
                (Memory::Host { ptr: s, .. }, Memory::Host { ptr: d, .. }) => {
                    // SAFETY: both ranges lie inside their allocations (asserted above), which
                    // are distinct (`dst` is exclusively borrowed).
                    unsafe {
                        std::ptr::copy_nonoverlapping(s.add(src_offset), d.add(dst_offset), bytes)
                    };
                    Ok(())
                }
                (Memory::Cuda(s), Memory::Cuda(d)) => match &*self.backend {
                    Backend::Cuda(c) => c.copy_at(s, src_offset, d, dst_offset, bytes),
                    Backend::Sim(_) => unreachable!("CUDA buffers on a simulator device"),
                },
                _ => unreachable!("buffers from different devices"),
            },
        )
    }

    /// Fills `buf` with 0xFF bytes (NaN for floats): tests poison outputs before a launch.
    pub fn poison<T: Element>(&self, buf: &mut Buffer<T>) -> Result<(), GpuError> {
        self.fill_bytes(buf, 0xFF)
    }

    /// Sets every element of `buf` to zero.
    pub fn zero<T: Element>(&self, buf: &mut Buffer<T>) -> Result<(), GpuError> {
        self.fill_bytes(buf, 0)
    }

    fn fill_bytes<T: Element>(&self, buf: &mut Buffer<T>, value: u8) -> Result<(), GpuError> {
        let bytes = buf.bytes();
        let address = buf.address();
        let recorded = self.record(
            || SimOp::Fill {
                dst: SimPtr::new(address),
                value,
                bytes,
            },
            |o| o.fills += 1,
        );
        if recorded {
            return Ok(());
        }
        self.timed_op(
            OpKind::Fill,
            || (format!("fill ({})", size_bucket(bytes)), 0.0),
            || match &mut buf.mem {
                Memory::Host { ptr, .. } => {
                    // SAFETY: the allocation holds at least `bytes` bytes and is exclusively
                    // borrowed.
                    unsafe { std::ptr::write_bytes(*ptr, value, bytes) };
                    Ok(())
                }
                Memory::Cuda(m) => match &*self.backend {
                    Backend::Cuda(c) => c.memset(m, value, bytes),
                    Backend::Sim(_) => unreachable!("CUDA buffer on a simulator device"),
                },
            },
        )
    }

    /// Launches `kernel` (its `extern "C"` name) and checks the launch.
    pub fn launch(
        &self,
        kernel: &str,
        cfg: LaunchConfig,
        args: &mut KernelArgs,
    ) -> Result<(), GpuError> {
        let _timed = super::host_stats::timed(super::host_stats::Call::Launch);
        if let Backend::Sim(SimOptions {
            shared_per_block: Some(limit),
            ..
        }) = *self.backend
        {
            // The CUDA backend refuses this before launching, in a capture too.
            if cfg.shared_bytes > limit {
                return Err(GpuError::shared_memory_refused(
                    kernel,
                    cfg.shared_bytes,
                    limit,
                ));
            }
        }
        let recorded = self.record(
            || SimOp::Launch {
                kernel: kernel.to_string(),
                cfg,
                slots: args.slots.clone(),
                pointers: args
                    .pointer_slots
                    .iter()
                    .map(|&i| (i, SimPtr::new(args.slots[i])))
                    .collect(),
                output_tails: args.output_tails.clone(),
            },
            |o| o.launches += 1,
        );
        if recorded {
            return Ok(());
        }
        let mut ptrs = args.pointers();
        self.timed_op(
            OpKind::Kernel,
            || (kernel.to_string(), 0.0),
            || match &*self.backend {
                // SAFETY: each tail lies behind an output buffer that `args` borrowed
                // exclusively when it was added, inside its allocation.
                Backend::Sim(options) => options.one_at_a_time(|| unsafe {
                    sim_launch_checking_tails(
                        kernel,
                        cfg,
                        options.schedule,
                        &mut ptrs,
                        &args.output_tails,
                    )
                }),
                Backend::Cuda(c) => c.launch(kernel, cfg, &mut ptrs),
            },
        )
    }

    /// Device memory in use by every process on the device, in bytes (total − free, which
    /// includes what stream-ordered pools keep reserved); under the simulator, the bytes this
    /// device's buffers hold.
    pub fn memory_in_use(&self) -> Result<Option<usize>, GpuError> {
        match &*self.backend {
            Backend::Sim(options) => Ok(Some(options.memory.used())),
            Backend::Cuda(c) => {
                let (free, total) = c.free_memory()?;
                Ok(Some(total.saturating_sub(free)))
            }
        }
    }

    /// The most dynamic shared memory a kernel launch may ask for per block, in bytes; `None`
    /// under the simulator (its own limit is an H100's) unless it was made with one
    /// ([`Device::sim_with_shared_limit`]).
    pub fn max_shared_per_block(&self) -> Option<u32> {
        match &*self.backend {
            Backend::Sim(options) => options.shared_per_block,
            Backend::Cuda(c) => Some(c.max_shared_per_block()),
        }
    }

    /// How this device's matrix products choose cuBLASLt's algorithms (`PRM_BATCH_INVARIANT=1`
    /// when the device was opened, or [`Device::set_product_algorithms`]). The simulator forms
    /// a product's rows by the same sums whatever the row count: it reports
    /// [`ProductAlgorithms::BatchInvariant`].
    pub fn product_algorithms(&self) -> ProductAlgorithms {
        match &*self.backend {
            Backend::Sim(_) => ProductAlgorithms::BatchInvariant,
            Backend::Cuda(c) => c.product_algorithms(),
        }
    }

    /// Sets how this device's products choose their algorithms from now on (every clone of the
    /// device shares it). Nothing changes under the simulator.
    pub fn set_product_algorithms(&self, choice: ProductAlgorithms) {
        if let Backend::Cuda(c) = &*self.backend {
            c.set_product_algorithms(choice);
        }
    }

    /// Whether this device's products time cuBLASLt's answers on the device and keep the
    /// fastest of those with the first answer's bits (`PRM_PRODUCTS=timed` when the device was
    /// opened, or [`Device::set_timed_products`]; [`crate::gpu::product_timing`]). Always false
    /// under the simulator, which has no algorithms to choose from.
    pub fn timed_products(&self) -> bool {
        match &*self.backend {
            Backend::Sim(_) => false,
            Backend::Cuda(c) => c.timed_products(),
        }
    }

    /// Sets whether this device's products are timed from now on (every clone of the device
    /// shares it). Nothing changes under the simulator.
    pub fn set_timed_products(&self, timed: bool) {
        if let Backend::Cuda(c) = &*self.backend {
            c.set_timed_products(timed);
        }
    }

    /// Every tuning of a product's algorithm on this device so far, in order (empty unless
    /// products are timed).
    pub fn product_tunings(&self) -> Vec<crate::gpu::product_timing::ProductTuning> {
        match &*self.backend {
            Backend::Sim(_) => Vec::new(),
            Backend::Cuda(c) => c.product_tunings(),
        }
    }

    /// Free device memory in bytes; under the simulator, what is left of the memory it was made
    /// with ([`Device::sim_with_memory`]), `None` without one.
    pub fn free_memory(&self) -> Result<Option<usize>, GpuError> {
        match &*self.backend {
            Backend::Sim(options) => Ok(options.memory.free()),
            Backend::Cuda(c) => Ok(Some(c.free_memory()?.0)),
        }
    }

    /// The most bytes this simulator device's buffers have held at once, since it was made or
    /// since [`Device::reset_memory_peak`]; `None` on CUDA (where the bench samples
    /// [`Device::memory_in_use`] instead).
    pub fn memory_peak(&self) -> Option<usize> {
        match &*self.backend {
            Backend::Sim(options) => Some(options.memory.peak()),
            Backend::Cuda(_) => None,
        }
    }

    /// Starts [`Device::memory_peak`] afresh from what is held now.
    pub fn reset_memory_peak(&self) {
        if let Backend::Sim(options) = &*self.backend {
            options.memory.reset_peak();
        }
    }

    /// Waits for all work on the device.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        let _timed = super::host_stats::timed(super::host_stats::Call::Synchronize);
        self.refuse_in_capture("synchronising with the device")?;
        match &*self.backend {
            Backend::Sim(_) => Ok(()),
            Backend::Cuda(c) => c.synchronize(),
        }
    }
}

/// `bytes` rounded up to a power of two, for timeline labels: transfers of about the same size
/// are summed together.
pub(crate) fn size_bucket(bytes: usize) -> String {
    let b = bytes.max(1).next_power_of_two();
    match b {
        b if b >= 1 << 30 => format!("≤{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("≤{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("≤{} KiB", b >> 10),
        b => format!("≤{b} B"),
    }
}
