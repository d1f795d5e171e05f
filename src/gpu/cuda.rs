//! The CUDA backend: cudarc's driver API for contexts, streams, memory and modules, raw
//! `cuLaunchKernel` for the kernels of `kernels/*.cu`, and cuBLASLt for matrix products.
//!
//! - **No driver, no panic.** cudarc panics when libcuda is missing (and, with dynamic loading,
//!   when a symbol is missing), so [`device_count`] and [`CudaBackend::new`] check
//!   `is_culib_present()` first and run every first contact with the driver under
//!   `catch_unwind`. cuBLASLt is loaded lazily, on the first product, with the same care.
//! - **Kernels.** `build/nvcc.rs` compiles each `kernels/*.cu` into its own fatbin and generates
//!   a table of modules with their kernel names (`$OUT_DIR/prm_cuda_modules.rs`), included here
//!   under `cfg(prm_cuda_kernels)`. Every module is loaded when the backend is created; functions
//!   are looked up by name on first launch and cached.
//! - **One stream.** Everything (copies, launches, products, allocations, frees) is ordered on the
//!   backend's own stream; cudarc's per-buffer event tracking is switched off, since launches go
//!   around it. Copies are synchronous: they return when the data has arrived. The one
//!   exception is `gpu::staging`: uploads staged ahead on a second (copy) stream from pinned
//!   memory, ordered against this stream with events.
//! - **Debugging.** `PRM_CUDA_SYNC_EACH_LAUNCH=1` synchronises after each launch, so an
//!   asynchronous fault is reported by the launch that caused it.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as dr, sys as ds, CudaContext, CudaStream, DriverError};

use super::device::{GpuError, LaunchConfig};
use super::gemm::{MatmulShape, ProductAlgorithms, ProductPtrs, ProductTypes, INVARIANT_ROWS};

/// A fatbin compiled from one `kernels/*.cu` file, with the names of its kernels.
#[allow(dead_code)]
pub(crate) struct ModuleImage {
    pub file: &'static str,
    pub fatbin: &'static [u8],
    pub kernels: &'static [&'static str],
}

#[cfg(prm_cuda_kernels)]
mod images {
    use super::ModuleImage;
    include!(concat!(env!("OUT_DIR"), "/prm_cuda_modules.rs"));
}

/// The fatbins embedded in this build (`None`: built without nvcc).
fn module_images() -> Option<&'static [ModuleImage]> {
    #[cfg(prm_cuda_kernels)]
    {
        Some(images::MODULES)
    }
    #[cfg(not(prm_cuda_kernels))]
    {
        None
    }
}

/// Whether this build embeds compiled CUDA kernels (nvcc was found by build.rs).
pub fn has_kernels() -> bool {
    module_images().is_some()
}

/// Names of every kernel compiled into this build (empty without nvcc).
pub fn kernel_names() -> Vec<&'static str> {
    module_images()
        .unwrap_or(&[])
        .iter()
        .flat_map(|m| m.kernels.iter().copied())
        .collect()
}

/// Whether libcuda can be loaded (cached: the check opens and closes the library).
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: only tries to dlopen the driver library.
        catch_unwind(|| unsafe { ds::is_culib_present() }).unwrap_or(false)
    })
}

/// Number of CUDA devices, 0 when there is no driver (or it fails). Never panics.
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    match catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) if n > 0 => n as usize,
        _ => 0,
    }
}

pub(crate) fn cuda_err(context: impl Into<String>, e: DriverError) -> GpuError {
    let message = match e.0 {
        ds::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
        | ds::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU => {
            format!(
                "{e:?}: the kernels were built by nvcc 13.0 for PRM_CUDA_ARCHS (default 80;90); \
                 update the driver (CUDA 13 needs >= 580) or rebuild with your GPU's arch in \
                 PRM_CUDA_ARCHS"
            )
        }
        _ => format!("{e:?}"),
    };
    GpuError::Cuda {
        context: context.into(),
        message,
    }
}

/// Keeps freed memory in the device's stream-ordered pool across synchronisations. The default
/// release threshold (0) hands every free byte back to the driver at each synchronisation, so
/// the next attack's allocations map fresh physical memory again; our own buffer pool already
/// bounds what the process keeps.
fn keep_pool_memory(ctx: &CudaContext) -> Result<(), GpuError> {
    let mut pool: ds::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the context is bound (just created on this thread); the attribute takes a u64.
    unsafe {
        ds::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .and_then(|_| {
                ds::cuMemPoolSetAttribute(
                    pool,
                    ds::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut c_void,
                )
                .result()
            })
    }
    .map_err(|e| cuda_err("setting the memory pool's release threshold", e))
}

/// A loaded module; unloaded (in its context) on drop.
struct Module {
    raw: ds::CUmodule,
    image: &'static ModuleImage,
}

/// A kernel looked up in its module, and the dynamic shared memory limit set on it so far.
#[derive(Clone, Copy)]
struct Function {
    raw: ds::CUfunction,
    max_dynamic_smem: u32,
}

/// An open CUDA device (small: the state is boxed, so `Device`'s backend enum stays small).
pub struct CudaBackend {
    state: Box<State>,
}

impl std::ops::Deref for CudaBackend {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

#[doc(hidden)]
pub struct State {
    // Drop order matters: cuBLASLt state and modules go before the stream and the context.
    blas: Mutex<Option<Blas>>,
    functions: Mutex<HashMap<String, Function>>,
    modules: Vec<Module>,
    /// kernel name → index in `modules`.
    kernel_module: HashMap<&'static str, usize>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    name: String,
    ordinal: usize,
    smem_optin: u32,
    sync_each_launch: bool,
    /// How cuBLASLt algorithms are chosen ([`ProductAlgorithms`]); read when a product's
    /// algorithm is first chosen.
    product_algorithms: Mutex<ProductAlgorithms>,
}

// SAFETY: the raw module/function handles are immutable after creation and valid in any thread
// that binds the context (every method does); mutable state is behind mutexes.
unsafe impl Send for State {}
unsafe impl Sync for State {}

impl Drop for State {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        if let Ok(mut blas) = self.blas.lock() {
            blas.take();
        }
        for m in self.modules.drain(..) {
            // SAFETY: loaded in `new` and unloaded exactly once, here.
            let _ = unsafe { dr::module::unload(m.raw) };
        }
    }
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`: driver check, device check, context, stream, and every
    /// embedded module. cuBLASLt is loaded on the first product.
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        if !driver_present() {
            return Err(GpuError::NoDriver);
        }
        let count = device_count();
        if ordinal >= count {
            return Err(GpuError::NoSuchDevice { ordinal, count });
        }
        let Some(images) = module_images() else {
            return Err(GpuError::NoKernels);
        };
        catch_unwind(AssertUnwindSafe(|| Self::open(ordinal, images))).unwrap_or_else(|p| {
            Err(GpuError::Cuda {
                context: format!("opening CUDA device {ordinal}"),
                message: crate::panic_message(&*p),
            })
        })
    }

    fn open(ordinal: usize, images: &'static [ModuleImage]) -> Result<Self, GpuError> {
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| cuda_err(format!("creating a context on device {ordinal}"), e))?;
        // SAFETY: every buffer of this backend is used on its one stream only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating a stream", e))?;
        if ctx.has_async_alloc() {
            keep_pool_memory(&ctx)?;
        }
        let device_name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let capability = ctx.compute_capability();
        let (major, minor) = capability.as_ref().map_or((0, 0), |c| *c);
        let name = format!("{device_name} (cuda:{ordinal}, sm_{major}{minor})");
        // (A failed query refuses nothing: loading the kernels then says what is wrong.)
        if capability.is_ok() && major < 8 {
            // No fatbin holds code it can run (sm_80 machine code, or PTX of a newer arch),
            // and the kernels' bf16 mma.sync and cp.async need sm_80 in any build.
            return Err(GpuError::GpuTooOld { name, major, minor });
        }
        let smem_optin = ctx
            .attribute(
                ds::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .unwrap_or(48 * 1024)
            .max(0) as u32;

        let mut modules = Vec::with_capacity(images.len());
        let mut kernel_module = HashMap::new();
        for image in images {
            // cuModuleLoadData reads the fatbin header in place: give it 8-byte alignment.
            let mut aligned = vec![0u64; image.fatbin.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..image.fatbin.len()]
                .copy_from_slice(image.fatbin);
            // SAFETY: a complete fatbin produced by nvcc; the driver copies what it needs.
            let loaded = unsafe { dr::module::load_data(aligned.as_ptr() as *const c_void) };
            match loaded {
                Ok(raw) => {
                    for k in image.kernels {
                        kernel_module.insert(*k, modules.len());
                    }
                    modules.push(Module { raw, image });
                }
                Err(e) => {
                    for m in modules.drain(..) {
                        // SAFETY: loaded just above.
                        let _ = unsafe { dr::module::unload(m.raw) };
                    }
                    return Err(cuda_err(
                        format!("loading the kernels of {}", image.file),
                        e,
                    ));
                }
            }
        }
        Ok(CudaBackend {
            state: Box::new(State {
                blas: Mutex::new(None),
                functions: Mutex::new(HashMap::new()),
                modules,
                kernel_module,
                stream,
                ctx,
                name,
                ordinal,
                smem_optin,
                sync_each_launch: std::env::var("PRM_CUDA_SYNC_EACH_LAUNCH")
                    .is_ok_and(|v| v == "1"),
                product_algorithms: Mutex::new(ProductAlgorithms::from_env()),
            }),
        })
    }

    /// The GPU's name, ordinal and compute capability.
    pub fn name(&self) -> String {
        self.name.clone()
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The most dynamic shared memory one block may ask for on this device (the opt-in limit).
    pub fn max_shared_per_block(&self) -> u32 {
        self.smem_optin
    }

    /// How this device's cuBLASLt products choose their algorithms.
    pub fn product_algorithms(&self) -> ProductAlgorithms {
        *self
            .product_algorithms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Sets how products choose their algorithms from now on (each way keeps its own cache of
    /// plans, so switching back and forth forgets nothing).
    pub fn set_product_algorithms(&self, choice: ProductAlgorithms) {
        *self
            .product_algorithms
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = choice;
    }

    /// (free, total) device memory in bytes.
    pub fn free_memory(&self) -> Result<(usize, usize), GpuError> {
        self.ctx
            .mem_get_info()
            .map_err(|e| cuda_err("querying free memory", e))
    }

    fn bind(&self) -> Result<(), GpuError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the CUDA context", e))
    }

    /// The stream every launch, product and copy of this backend is ordered on (the staging
    /// lane, `gpu::staging`, orders its copy stream against it with events).
    pub(crate) fn compute_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A zero-filled allocation of `bytes` bytes (at least 1 byte is reserved, so every
    /// buffer has a distinct, 256-byte aligned address).
    pub fn alloc_zeroed(&self, bytes: usize) -> Result<CudaMemory, GpuError> {
        self.bind()?;
        let alloc = RawAlloc::zeroed(&self.stream, bytes)?;
        Ok(self.memory(alloc, bytes))
    }

    /// An allocation of `bytes` bytes with undefined contents (no fill pass).
    pub fn alloc_undefined(&self, bytes: usize) -> Result<CudaMemory, GpuError> {
        self.bind()?;
        let alloc = RawAlloc::undefined(&self.stream, bytes)?;
        Ok(self.memory(alloc, bytes))
    }

    fn memory(&self, alloc: RawAlloc, bytes: usize) -> CudaMemory {
        CudaMemory {
            ptr: alloc.ptr,
            bytes,
            stream: self.stream.clone(),
            _alloc: alloc,
        }
    }

    fn function(&self, kernel: &str, shared_bytes: u32) -> Result<ds::CUfunction, GpuError> {
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = match functions.get(kernel) {
            Some(f) => *f,
            None => {
                let &m = self
                    .kernel_module
                    .get(kernel)
                    .ok_or_else(|| GpuError::UnknownKernel(kernel.into()))?;
                let cname =
                    CString::new(kernel).map_err(|_| GpuError::UnknownKernel(kernel.into()))?;
                // SAFETY: the module is loaded for the backend's lifetime.
                let raw = unsafe { dr::module::get_function(self.modules[m].raw, cname) }.map_err(
                    |e| {
                        cuda_err(
                            format!("looking up {kernel} in {}", self.modules[m].image.file),
                            e,
                        )
                    },
                )?;
                Function {
                    raw,
                    max_dynamic_smem: 48 * 1024,
                }
            }
        };
        if shared_bytes > f.max_dynamic_smem {
            if shared_bytes > self.smem_optin {
                return Err(GpuError::shared_memory_refused(
                    kernel,
                    shared_bytes,
                    self.smem_optin,
                ));
            }
            // SAFETY: a valid function handle; the value is within the device's opt-in limit.
            unsafe {
                dr::function::set_function_attribute(
                    f.raw,
                    ds::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )
            }
            .map_err(|e| {
                cuda_err(
                    format!("allowing {shared_bytes} bytes of dynamic shared memory for {kernel}"),
                    e,
                )
            })?;
            f.max_dynamic_smem = shared_bytes;
        }
        functions.insert(kernel.to_string(), f);
        Ok(f.raw)
    }

    /// Launches `kernel` on the backend's stream with the packed `void**` argument list exactly
    /// as given (one pointer per kernel parameter).
    pub fn launch(
        &self,
        kernel: &str,
        cfg: LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        self.bind()?;
        let f = self.function(kernel, cfg.shared_bytes)?;
        // SAFETY: `args` holds one pointer per parameter of `kernel`, each pointing at a live
        // slot (KernelArgs); cuLaunchKernel copies the values before returning.
        unsafe {
            dr::launch_kernel(
                f,
                cfg.grid,
                cfg.block,
                cfg.shared_bytes,
                self.stream.cu_stream(),
                args,
            )
        }
        .map_err(|e| {
            cuda_err(
                format!(
                    "launching {kernel} (grid {:?}, block {:?}, {} bytes shared)",
                    cfg.grid, cfg.block, cfg.shared_bytes
                ),
                e,
            )
        })?;
        if self.sync_each_launch {
            self.stream.synchronize().map_err(|e| {
                cuda_err(format!("running {kernel} (PRM_CUDA_SYNC_EACH_LAUNCH=1)"), e)
            })?;
        }
        Ok(())
    }

    /// Starts a stream capture of the backend's stream (thread-local mode: this thread may not
    /// make calls that are unsafe during a capture; other threads are unaffected).
    pub(crate) fn begin_capture(&self) -> Result<(), GpuError> {
        if self.sync_each_launch {
            return Err(GpuError::Capture {
                what: "PRM_CUDA_SYNC_EACH_LAUNCH=1 (a synchronisation after each launch)".into(),
            });
        }
        self.bind()?;
        catch_unwind(AssertUnwindSafe(|| {
            self.stream
                .begin_capture(ds::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        }))
        .map_err(|p| GpuError::Cuda {
            context: "beginning a graph capture".into(),
            message: crate::panic_message(&*p),
        })?
        .map_err(|e| cuda_err("beginning a graph capture", e))
    }

    /// Ends the capture begun by [`Self::begin_capture`] and instantiates the graph. Always
    /// ends the capture, also when it was invalidated by a call that cannot be captured.
    pub(crate) fn end_capture(&self) -> Result<cudarc::driver::CudaGraph, GpuError> {
        self.bind()?;
        let ended = catch_unwind(AssertUnwindSafe(|| {
            self.stream.end_capture(ds::CUgraphInstantiate_flags(0))
        }))
        .map_err(|p| GpuError::Cuda {
            context: "ending a graph capture".into(),
            message: crate::panic_message(&*p),
        })?;
        match ended {
            Ok(Some(graph)) => Ok(graph),
            Ok(None) => Err(GpuError::Cuda {
                context: "ending a graph capture".into(),
                message: "the driver returned no graph".into(),
            }),
            Err(e) => Err(cuda_err(
                "ending a graph capture and instantiating the graph",
                e,
            )),
        }
    }

    /// A new event that records timing (for [`crate::gpu::timeline`]).
    pub(crate) fn timing_event(&self) -> Result<cudarc::driver::CudaEvent, GpuError> {
        self.ctx
            .new_event(Some(ds::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("creating a timing event", e))
    }

    /// Records `event` on the backend's stream: the device stamps it when it gets there.
    pub(crate) fn record_event(&self, event: &cudarc::driver::CudaEvent) -> Result<(), GpuError> {
        event
            .record(&self.stream)
            .map_err(|e| cuda_err("recording a timing event", e))
    }

    /// Launches an instantiated graph on the backend's stream.
    pub(crate) fn launch_graph(&self, graph: &cudarc::driver::CudaGraph) -> Result<(), GpuError> {
        self.bind()?;
        graph.launch().map_err(|e| cuda_err("launching a graph", e))
    }

    /// Waits for everything queued on the backend's stream.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.bind()?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronising the stream", e))
    }

    /// Sets the first `bytes` bytes of `dst` to `value`, in stream order.
    pub fn memset(&self, dst: &mut CudaMemory, value: u8, bytes: usize) -> Result<(), GpuError> {
        dst.check(bytes, "memset")?;
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the allocation holds at least `bytes` bytes (checked).
        unsafe { dr::memset_d8_async(dst.ptr, value, bytes, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("memset", e))
    }

    /// Copies `bytes` bytes from byte `src_offset` of `src` to byte `dst_offset` of `dst`, in
    /// stream order (no host synchronisation).
    pub fn copy_at(
        &self,
        src: &CudaMemory,
        src_offset: usize,
        dst: &mut CudaMemory,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<(), GpuError> {
        let what = "device-to-device copy";
        src.check(src_offset.saturating_add(bytes), what)?;
        dst.check(dst_offset.saturating_add(bytes), what)?;
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        let (from, to) = (src.ptr + src_offset as u64, dst.ptr + dst_offset as u64);
        // SAFETY: both ranges lie inside their allocations (checked), which stay alive until
        // the stream reaches the copy (buffers are freed in stream order).
        unsafe { dr::memcpy_dtod_async(to, from, bytes, self.stream.cu_stream()) }
            .map_err(|e| cuda_err(what, e))
    }

    /// `d = (c or 0) + a · op(b) + bias`, row-major, through cuBLASLt (fp32 compute and scale;
    /// element types per `types`; see [`Blas::plan`] for the mapping onto cuBLASLt's
    /// column-major convention). The extents were checked by `gemm`'s entry points.
    pub(crate) fn matmul(
        &self,
        shape: MatmulShape,
        types: ProductTypes,
        p: ProductPtrs,
        capturing: bool,
    ) -> Result<(), GpuError> {
        if shape.m == 0 || shape.n == 0 {
            return Ok(());
        }
        self.bind()?;
        let choice = self.product_algorithms();
        let mut guard = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            if capturing {
                // Its workspace would be allocated on the capturing stream.
                return Err(GpuError::Capture {
                    what: "the first cuBLASLt product of the process".into(),
                });
            }
            *guard = Some(Blas::new(&self.stream)?);
        }
        let blas = guard.as_mut().expect("initialised above");
        let result = catch_unwind(AssertUnwindSafe(|| {
            blas.matmul(&self.stream, shape, types, p, capturing, choice)
        }));
        result.unwrap_or_else(|p| {
            Err(GpuError::Cuda {
                context: "cuBLASLt".into(),
                message: crate::panic_message(&*p),
            })
        })
    }
}

/// Device memory of one [`Buffer`](crate::gpu::Buffer), freed (stream-ordered) on drop.
pub struct CudaMemory {
    ptr: ds::CUdeviceptr,
    bytes: usize,
    stream: Arc<CudaStream>,
    _alloc: RawAlloc,
}

/// A raw device allocation on a stream (cuMemAllocAsync where the device has memory pools).
/// Unlike cudarc's `CudaSlice`, its drop binds the context first, so a buffer may be dropped on
/// any thread, and it never records an error that a later, unrelated call would report.
struct RawAlloc {
    ptr: ds::CUdeviceptr,
    stream: Arc<CudaStream>,
}

impl RawAlloc {
    /// `bytes` zero bytes (at least 1 is reserved, so every allocation has its own 256-byte
    /// aligned address). The context must be bound.
    fn zeroed(stream: &Arc<CudaStream>, bytes: usize) -> Result<RawAlloc, GpuError> {
        let alloc = RawAlloc::undefined(stream, bytes)?;
        // SAFETY: `alloc.ptr` is a live allocation of at least `bytes.max(1)` bytes.
        unsafe { dr::memset_d8_async(alloc.ptr, 0, bytes.max(1), stream.cu_stream()) }
            .map_err(|e| cuda_err("zero-filling a new buffer", e))?;
        Ok(alloc)
    }

    /// `bytes` bytes with undefined contents (at least 1 is reserved, as for [`Self::zeroed`]).
    fn undefined(stream: &Arc<CudaStream>, bytes: usize) -> Result<RawAlloc, GpuError> {
        let size = bytes.max(1);
        // SAFETY: plain allocation calls on a live stream of the bound context.
        let ptr = unsafe {
            if stream.context().has_async_alloc() {
                dr::malloc_async(stream.cu_stream(), size)
            } else {
                dr::malloc_sync(size)
            }
        }
        .map_err(|e| {
            if e.0 == ds::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                GpuError::OutOfMemory { bytes }
            } else {
                cuda_err(format!("allocating {bytes} bytes"), e)
            }
        })?;
        Ok(RawAlloc {
            ptr,
            stream: stream.clone(),
        })
    }
}

impl Drop for RawAlloc {
    fn drop(&mut self) {
        let ctx = self.stream.context();
        // SAFETY: the allocation is freed once, in stream order after every use queued on the
        // stream (or after a stream synchronisation without memory pools). Errors are ignored:
        // there is nothing to report them to.
        unsafe {
            let _ = dr::ctx::set_current(ctx.cu_ctx());
            if ctx.has_async_alloc() {
                let _ = dr::free_async(self.ptr, self.stream.cu_stream());
            } else {
                let _ = ds::cuStreamSynchronize(self.stream.cu_stream());
                let _ = dr::free_sync(self.ptr);
            }
        }
    }
}

// SAFETY: a device address plus owning handles; access is synchronised by &/&mut on the Buffer.
unsafe impl Send for CudaMemory {}
unsafe impl Sync for CudaMemory {}

impl CudaMemory {
    pub fn address(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    fn check(&self, n: usize, what: &str) -> Result<(), GpuError> {
        if n > self.bytes {
            return Err(GpuError::Cuda {
                context: what.into(),
                message: format!("{n} bytes do not fit in a buffer of {} bytes", self.bytes),
            });
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the CUDA context", e))
    }

    /// Copies `bytes` to the start of the buffer, in stream order, without waiting for the
    /// device: from pageable host memory the driver stages the bytes before it returns (CUDA's
    /// API synchronisation rules for cuMemcpyHtoDAsync), so `bytes` may be reused at once and
    /// the host never stalls the queue. (A synchronisation here cost two full drains per
    /// attack step: the step's small tables are uploaded as it starts.)
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), GpuError> {
        self.write_at(0, bytes)
    }

    /// [`CudaMemory::write`] from byte `offset` of the buffer on.
    pub fn write_at(&mut self, offset: usize, bytes: &[u8]) -> Result<(), GpuError> {
        self.check(offset.saturating_add(bytes.len()), "copy to device")?;
        if bytes.is_empty() {
            return Ok(());
        }
        // SAFETY: the destination holds at least `offset + bytes.len()` bytes (checked); the
        // source is staged by the driver before the call returns (pageable memory).
        unsafe { dr::memcpy_htod_async(self.ptr + offset as u64, bytes, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("copy to device", e))
    }

    /// Copies the start of the buffer into `bytes`, after all work queued on the stream.
    pub fn read(&self, bytes: &mut [u8]) -> Result<(), GpuError> {
        self.read_at(0, bytes)
    }

    /// Copies the buffer's bytes from `offset` on into `bytes`, after all work queued on the
    /// stream.
    pub fn read_at(&self, offset: usize, bytes: &mut [u8]) -> Result<(), GpuError> {
        let end = offset.saturating_add(bytes.len());
        self.check(end, "copy to host")?;
        if bytes.is_empty() {
            return Ok(());
        }
        // SAFETY: the source holds at least `offset + bytes.len()` bytes (checked); we wait for
        // the copy before `bytes` is released.
        unsafe { dr::memcpy_dtoh_async(bytes, self.ptr + offset as u64, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("copy to host", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("copy to host", e))
    }
}

// ---------------------------------------------------------------------------------------------
// cuBLASLt
// ---------------------------------------------------------------------------------------------

mod lt {
    pub use cudarc::cublaslt::result;
    pub use cudarc::cublaslt::sys;
}

const WORKSPACE_BYTES: usize = 32 << 20;
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;

fn blas_err(context: impl Into<String>, e: lt::result::CublasError) -> GpuError {
    GpuError::Cuda {
        context: context.into(),
        message: format!("{:?}", e.0),
    }
}

/// Everything cached for one product shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    shape: MatmulShape,
    /// β = 1 (C is added; it may be D itself or another buffer of the same layout).
    accumulate: bool,
    bias: bool,
    /// Element types of a and b, bias, and C = D (compute and scale are fp32 always).
    types: ProductTypes,
    /// Alignment (bytes, ≤ 256) of the a, b, c, d and bias addresses, capped by the byte
    /// pitch of each matrix's leading dimension: the heuristic's choice depends on it.
    align: [u32; 5],
}

struct Plan {
    desc: lt::sys::cublasLtMatmulDesc_t,
    /// Layouts of cuBLASLt's A (our b), B (our a), and C and D (our c and d: one layout).
    layouts: [lt::sys::cublasLtMatrixLayout_t; 3],
    algo: lt::sys::cublasLtMatmulAlgo_t,
    /// The algorithm came from the heuristic for another `m` of the same bucket.
    borrowed: bool,
}

/// The heuristic's answers are shared by every `m` up to the next power of two (the row count
/// changes every step under dynamic scale; a heuristic query costs far more than a product's
/// launch). The heuristic is asked at that power of two, not at the first `m` met, so that the
/// algorithm of a size does not depend on the sizes that came before it (a resumed run, another
/// shard). A borrowed algorithm that cuBLASLt rejects is replaced by an exact query for that size
/// alone.
fn algo_bucket(mut key: PlanKey) -> PlanKey {
    key.shape.m = key.shape.m.next_power_of_two();
    key
}

/// The key [`ProductAlgorithms::BatchInvariant`] chooses an algorithm by: the product at
/// [`INVARIANT_ROWS`] rows, each operand's alignment that of its row pitch alone, at most 16
/// bytes (an address's own alignment may change with the batch: a slice of a packed batch
/// starts where the rows before it end).
fn invariant_key(mut key: PlanKey) -> PlanKey {
    let shape = key.shape;
    let in_bytes = if key.types.bf16_inputs() { 2 } else { 4 };
    let out_bytes = if key.types.bf16_output() { 2 } else { 4 };
    let ld_b = if shape.b_transposed { shape.k } else { shape.n };
    let pitch = |ld: usize, elem: usize| alignment((ld * elem) as u64).min(16);
    key.shape.m = INVARIANT_ROWS;
    key.align = [
        pitch(shape.k, in_bytes),
        pitch(ld_b, in_bytes),
        pitch(shape.n, out_bytes),
        pitch(shape.n, out_bytes),
        16,
    ];
    key
}

/// Where a plan's algorithm comes from.
fn algo_key(key: PlanKey, choice: ProductAlgorithms) -> PlanKey {
    match choice {
        ProductAlgorithms::BySize => algo_bucket(key),
        ProductAlgorithms::BatchInvariant => invariant_key(key),
    }
}

/// Heuristic results [`ProductAlgorithms::BatchInvariant`] looks through for one that does not
/// split the inner dimension.
const INVARIANT_CANDIDATES: usize = 16;

/// Plans kept before the cache is cleared (dynamic scale makes a new `m` every step).
const MAX_PLANS: usize = 4096;

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in `Blas::plan`, destroyed once.
        unsafe {
            for l in self.layouts {
                if !l.is_null() {
                    let _ = lt::result::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::result::destroy_matmul_desc(self.desc);
            }
        }
    }
}

struct Blas {
    handle: lt::sys::cublasLtHandle_t,
    workspace: RawAlloc,
    plans: HashMap<(PlanKey, ProductAlgorithms), Plan>,
    /// Heuristic algorithms by [`algo_key`].
    algos: HashMap<(PlanKey, ProductAlgorithms), lt::sys::cublasLtMatmulAlgo_t>,
    /// Batch-invariant algorithm keys whose algorithm cuBLASLt refused at some size (warned
    /// about once).
    invariance_lost: std::collections::HashSet<PlanKey>,
    /// Zeros standing in for a and b when k = 0 (a product of length 1 with zero operands).
    zeros: Option<(RawAlloc, usize)>,
    /// Smaller zero operands replaced by a larger one (a captured graph may still read them).
    retired_zeros: Vec<RawAlloc>,
}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.clear();
        if !self.handle.is_null() {
            // SAFETY: created in `Blas::new`, destroyed once.
            let _ = unsafe { lt::result::destroy_handle(self.handle) };
        }
    }
}

fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

impl Blas {
    fn new(stream: &Arc<CudaStream>) -> Result<Blas, GpuError> {
        let present = catch_unwind(|| unsafe { lt::sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(GpuError::Cuda {
                context: "loading cuBLASLt".into(),
                message:
                    "libcublasLt.so (CUDA 12 or 13) not found; add its folder to LD_LIBRARY_PATH \
                          (e.g. the nvidia/cublas/lib folder of a pip-installed PyTorch)"
                        .into(),
            });
        }
        let handle = catch_unwind(lt::result::create_handle)
            .map_err(|p| GpuError::Cuda {
                context: "loading cuBLASLt".into(),
                message: crate::panic_message(&*p),
            })?
            .map_err(|e| blas_err("cublasLtCreate", e))?;
        let workspace = match RawAlloc::zeroed(stream, WORKSPACE_BYTES) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above.
                let _ = unsafe { lt::result::destroy_handle(handle) };
                return Err(e);
            }
        };
        Ok(Blas {
            handle,
            workspace,
            plans: HashMap::new(),
            algos: HashMap::new(),
            invariance_lost: Default::default(),
            zeros: None,
            retired_zeros: Vec::new(),
        })
    }

    /// Descriptor, layouts and heuristic algorithm for one key, created once.
    ///
    /// Row-major ↔ column-major: a row-major `[r, c]` matrix is, byte for byte, the
    /// column-major `[c, r]` matrix (its transpose) with leading dimension `c`. So the row-major
    /// product `C[m,n] = A[m,k]·op(B)` is computed as the column-major product
    /// `Cᵀ[n,m] = op(B)ᵀ[n,k] · Aᵀ[k,m]`, with cuBLASLt's operands swapped:
    /// - cuBLASLt A = our `b`. If `b` is `[n,k]` (a linear weight, op(b) = bᵀ), its memory is the
    ///   column-major `[k,n]` (ld k), and `op(B)ᵀ = b` needs TRANSA = T. If `b` is `[k,n]`, its
    ///   memory is the column-major `[n,k]` (ld n) = `op(B)ᵀ` itself: TRANSA = N.
    /// - cuBLASLt B = our `a`: column-major `[k,m]` (ld k) = `Aᵀ`, TRANSB = N.
    /// - C and D = our `c` and `d`: column-major `[n,m]` (ld n), one layout for both (cuBLASLt
    ///   reads C from one address and writes D to another when they differ).
    /// - The bias epilogue adds a vector with one entry per *row* of D, i.e. per column `j` of
    ///   our row-major `d`: `d[i,j] += bias[j]`, as required. β = 1 when accumulating.
    /// - bf16 output (`ProductTypes::Bf16Out`): C, D and the bias are `CUDA_R_16BF`, compute and
    ///   scale fp32; the epilogue adds the bias to the fp32 accumulator before the one rounding.
    fn plan(&mut self, key: PlanKey, choice: ProductAlgorithms) -> Result<&Plan, GpuError> {
        if !self.plans.contains_key(&(key, choice)) {
            if self.plans.len() >= MAX_PLANS {
                self.plans.clear();
            }
            let from = (algo_key(key, choice), choice);
            let algo = match self.algos.get(&from) {
                Some(algo) => *algo,
                None => {
                    // Asked at the reference size of the key, never at this one: every size
                    // that shares the key borrows it, whichever came first.
                    let algo = self.create_plan(from.0, None, choice)?.algo;
                    self.algos.insert(from, algo);
                    algo
                }
            };
            let plan = self.create_plan(key, Some(algo), choice)?;
            self.plans.insert((key, choice), plan);
        }
        Ok(&self.plans[&(key, choice)])
    }

    /// Replaces a plan whose borrowed algorithm cuBLASLt rejected with an exact query: an
    /// algorithm of this size alone (the other sizes of its key keep theirs). For
    /// [`ProductAlgorithms::BatchInvariant`] that is said once per kind of product, since its
    /// rows may then differ from the same rows in other batches.
    fn replan_exact(&mut self, key: PlanKey, choice: ProductAlgorithms) -> Result<(), GpuError> {
        let plan = self.create_plan(key, None, choice)?;
        let from = algo_key(key, choice);
        if choice == ProductAlgorithms::BatchInvariant && self.invariance_lost.insert(from) {
            let s = key.shape;
            eprintln!(
                "prm: cuBLASLt refused the batch-invariant algorithm of the product m={} \
                     n={} k={} ({:?}); this size uses an algorithm of its own, so its rows may \
                     differ in their last bits from the same rows in batches of other sizes",
                s.m, s.n, s.k, key.types
            );
        }
        self.plans.insert((key, choice), plan);
        Ok(())
    }

    fn create_plan(
        &self,
        key: PlanKey,
        borrowed: Option<lt::sys::cublasLtMatmulAlgo_t>,
        choice: ProductAlgorithms,
    ) -> Result<Plan, GpuError> {
        use lt::sys::cublasLtMatmulDescAttributes_t as D;
        use lt::sys::cublasLtMatmulPreferenceAttributes_t as P;
        let MatmulShape {
            m,
            n,
            k,
            b_transposed,
        } = key.shape;
        let (m, n, k) = (m as u64, n as u64, k as u64);
        let f32t = lt::sys::cudaDataType::CUDA_R_32F;
        let bf16t = lt::sys::cudaDataType::CUDA_R_16BF;
        let in_t = if key.types.bf16_inputs() { bf16t } else { f32t };
        let out_t = if key.types.bf16_output() { bf16t } else { f32t };
        let ctx = |what: &str| {
            format!(
                "cuBLASLt {what} for m={m} n={n} k={k} b_transposed={b_transposed} types={:?} \
                 accumulate={} bias={}",
                key.types, key.accumulate, key.bias
            )
        };

        let desc =
            lt::result::create_matmul_desc(lt::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t)
                .map_err(|e| blas_err(ctx("matmul descriptor"), e))?;
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: unsafe { std::mem::zeroed() },
            borrowed: false,
        };
        let trans_a = if b_transposed {
            CUBLAS_OP_T
        } else {
            CUBLAS_OP_N
        };
        let trans_b = CUBLAS_OP_N;
        let epilogue = if key.bias {
            lt::sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            lt::sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        // SAFETY: valid descriptor; each value has the size and type the attribute expects
        // (int32 for the operations, uint32 for the epilogue).
        unsafe {
            lt::result::set_matmul_desc_attribute(
                desc,
                D::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans_a as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
            .and_then(|_| {
                lt::result::set_matmul_desc_attribute(
                    desc,
                    D::CUBLASLT_MATMUL_DESC_TRANSB,
                    &trans_b as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            })
            .and_then(|_| {
                lt::result::set_matmul_desc_attribute(
                    desc,
                    D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epilogue as *const lt::sys::cublasLtEpilogue_t as *const c_void,
                    std::mem::size_of::<lt::sys::cublasLtEpilogue_t>(),
                )
            })
        }
        .map_err(|e| blas_err(ctx("descriptor attributes"), e))?;
        if key.bias && key.types.bf16_output() {
            // The default (the type of D) already is bf16; stated so the plan does not depend
            // on that default.
            let bias_t = bf16t as i32;
            // SAFETY: valid descriptor; the attribute is an int32 cudaDataType.
            unsafe {
                lt::result::set_matmul_desc_attribute(
                    desc,
                    D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &bias_t as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
            .map_err(|e| blas_err(ctx("bias data type"), e))?;
        }

        let (a_rows, a_cols, lda) = if b_transposed { (k, n, k) } else { (n, k, n) };
        let dims = [(a_rows, a_cols, lda), (k, m, k), (n, m, n)];
        for (i, (rows, cols, ld)) in dims.into_iter().enumerate() {
            let t = if i < 2 { in_t } else { out_t };
            plan.layouts[i] = lt::result::create_matrix_layout(t, rows, cols, ld as i64)
                .map_err(|e| blas_err(ctx("matrix layout"), e))?;
        }

        if let Some(algo) = borrowed {
            plan.algo = algo;
            plan.borrowed = true;
            return Ok(plan);
        }
        let pref = lt::result::create_matmul_pref().map_err(|e| blas_err(ctx("preference"), e))?;
        let ws = WORKSPACE_BYTES as u64;
        let [al_a, al_b, al_c, al_d, _] = key.align;
        // cuBLASLt's A is our b and its B is our a.
        let prefs: [(P, u64); 5] = [
            (P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ws),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, al_b as u64),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, al_a as u64),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, al_c as u64),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, al_d as u64),
        ];
        let mut result = Ok(());
        for (attr, value) in prefs {
            // MAX_WORKSPACE_BYTES is uint64; the MIN_ALIGNMENT_* attributes are uint32.
            let r = if matches!(attr, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES) {
                unsafe {
                    lt::result::set_matmul_pref_attribute(
                        pref,
                        attr,
                        &value as *const u64 as *const c_void,
                        8,
                    )
                }
            } else {
                let v = value as u32;
                unsafe {
                    lt::result::set_matmul_pref_attribute(
                        pref,
                        attr,
                        &v as *const u32 as *const c_void,
                        4,
                    )
                }
            };
            if let Err(e) = r {
                result = Err(blas_err(ctx("preference attributes"), e));
                break;
            }
        }
        let heuristic = result.and_then(|_| {
            let no_algorithm = |e| {
                blas_err(
                    ctx("algorithm heuristic (no algorithm supports this configuration)"),
                    e,
                )
            };
            match choice {
                // SAFETY: all descriptors are live.
                ProductAlgorithms::BySize => unsafe {
                    lt::result::get_matmul_algo_heuristic(
                        self.handle,
                        desc,
                        plan.layouts[0],
                        plan.layouts[1],
                        plan.layouts[2],
                        plan.layouts[2],
                        pref,
                    )
                }
                .map_err(no_algorithm),
                // SAFETY: as above.
                ProductAlgorithms::BatchInvariant => {
                    unsafe { self.unsplit_heuristic(desc, &plan.layouts, pref) }.map_err(
                        |e| match e {
                            Ok(count) => GpuError::Cuda {
                                context: ctx("batch-invariant algorithm"),
                                message: format!(
                                    "none of cuBLASLt's {count} algorithms for it keeps the inner \
                                     dimension whole; run without --batch-invariant and \
                                     PRM_BATCH_INVARIANT=1"
                                ),
                            },
                            Err(e) => no_algorithm(e),
                        },
                    )
                }
            }
        });
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::result::destroy_matmul_pref(pref) };
        let heuristic = heuristic?;
        if heuristic.workspaceSize > WORKSPACE_BYTES {
            return Err(GpuError::Cuda {
                context: ctx("algorithm heuristic"),
                message: format!(
                    "algorithm wants {} bytes of workspace",
                    heuristic.workspaceSize
                ),
            });
        }
        plan.algo = heuristic.algo;
        Ok(plan)
    }

    fn matmul(
        &mut self,
        stream: &Arc<CudaStream>,
        shape: MatmulShape,
        types: ProductTypes,
        p: ProductPtrs,
        capturing: bool,
        choice: ProductAlgorithms,
    ) -> Result<(), GpuError> {
        let (mut shape, mut p) = (shape, p);
        if shape.k == 0 {
            // d = (c or 0) + bias: a product of inner length 1 with zero operands (zero bytes
            // are zeros in f32 and bf16 alike).
            let need = 4 * shape.m.max(shape.n);
            if self.zeros.as_ref().is_none_or(|z| z.1 < need) {
                if capturing {
                    return Err(GpuError::Capture {
                        what: "allocating cuBLASLt's zero operand".into(),
                    });
                }
                // A smaller one may be used by a captured graph: keep it until the backend goes.
                if let Some(old) = self.zeros.take() {
                    self.retired_zeros.push(old.0);
                }
                self.zeros = Some((RawAlloc::zeroed(stream, need)?, need));
            }
            let z = self.zeros.as_ref().expect("allocated above").0.ptr;
            shape.k = 1;
            p.a = z;
            p.b = z;
        }
        // An operand's alignment is that of its address and of its row pitch (every column of
        // the column-major view starts one leading dimension further on): bf16 rows of odd
        // length are only 2-byte aligned even in a 256-byte aligned buffer.
        let in_bytes = if types.bf16_inputs() { 2 } else { 4 };
        let out_bytes = if types.bf16_output() { 2 } else { 4 };
        let ld_b = if shape.b_transposed { shape.k } else { shape.n };
        let pitch =
            |ptr: u64, ld: usize, elem: usize| alignment(ptr).min(alignment((ld * elem) as u64));
        let c = p.c.unwrap_or(p.d);
        let key = PlanKey {
            shape,
            accumulate: p.c.is_some(),
            bias: p.bias.is_some(),
            types,
            align: [
                pitch(p.a, shape.k, in_bytes),
                pitch(p.b, ld_b, in_bytes),
                pitch(c, shape.n, out_bytes),
                pitch(p.d, shape.n, out_bytes),
                p.bias.map_or(256, alignment),
            ],
        };
        let first = self.matmul_with_plan(stream, key, p, choice);
        match first {
            Err(_) if self.plans.get(&(key, choice)).is_some_and(|p| p.borrowed) => {
                self.replan_exact(key, choice)?;
                self.matmul_with_plan(stream, key, p, choice)
            }
            r => r,
        }
    }

    /// The first of cuBLASLt's heuristic answers (best first) that does not split the inner
    /// dimension: `Err(Ok(n))` when none of its `n` answers qualifies.
    ///
    /// # Safety
    /// The descriptor, layouts and preference must be live.
    unsafe fn unsplit_heuristic(
        &self,
        desc: lt::sys::cublasLtMatmulDesc_t,
        layouts: &[lt::sys::cublasLtMatrixLayout_t; 3],
        pref: lt::sys::cublasLtMatmulPreference_t,
    ) -> Result<lt::sys::cublasLtMatmulHeuristicResult_t, Result<usize, lt::result::CublasError>>
    {
        use lt::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
        // SAFETY: plain-old-data, written by cuBLASLt before it is read.
        let mut results: [lt::sys::cublasLtMatmulHeuristicResult_t; INVARIANT_CANDIDATES] =
            unsafe { std::mem::zeroed() };
        let mut count: std::ffi::c_int = 0;
        // SAFETY: the caller's descriptors; `results` holds the count asked for.
        let status = unsafe {
            lt::sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                layouts[0],
                layouts[1],
                layouts[2],
                layouts[2],
                pref,
                INVARIANT_CANDIDATES as std::ffi::c_int,
                results.as_mut_ptr(),
                &mut count,
            )
        };
        if status != CUBLAS_STATUS_SUCCESS {
            return Err(Err(lt::result::CublasError(status)));
        }
        let count = (count.max(0) as usize).min(INVARIANT_CANDIDATES);
        for r in &results[..count] {
            if r.state != CUBLAS_STATUS_SUCCESS {
                continue;
            }
            let mut splits: i32 = 0;
            let mut written = 0usize;
            // SAFETY: `r.algo` was initialised by the heuristic; SPLITK_NUM is an int32.
            let read = unsafe {
                lt::sys::cublasLtMatmulAlgoConfigGetAttribute(
                    &r.algo,
                    lt::sys::cublasLtMatmulAlgoConfigAttributes_t::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                    &mut splits as *mut i32 as *mut c_void,
                    std::mem::size_of::<i32>(),
                    &mut written,
                )
            };
            if read == CUBLAS_STATUS_SUCCESS && splits <= 1 {
                return Ok(*r);
            }
        }
        Err(Ok(count))
    }

    /// One `cublasLtMatmul` through the plan for `key` (created if needed).
    fn matmul_with_plan(
        &mut self,
        stream: &Arc<CudaStream>,
        key: PlanKey,
        p: ProductPtrs,
        choice: ProductAlgorithms,
    ) -> Result<(), GpuError> {
        let shape = key.shape;
        let (handle, workspace) = (self.handle, self.workspace.ptr);
        let plan = self.plan(key, choice)?;
        if let Some(bias) = p.bias {
            // SAFETY: valid descriptor; the attribute is a device pointer (8 bytes). The
            // descriptor is read by cublasLtMatmul at call time, under the backend's lock.
            unsafe {
                lt::result::set_matmul_desc_attribute(
                    plan.desc,
                    lt::sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(|e| blas_err("cuBLASLt bias pointer", e))?;
        }
        let alpha = 1.0f32;
        let beta = if key.accumulate { 1.0f32 } else { 0.0f32 };
        // With β = 0, C is not read; it is given D's address (a valid pointer of its layout).
        let c = p.c.unwrap_or(p.d);
        // SAFETY: the addresses are live device buffers of the extents asserted by `gemm`'s
        // entry points; the plan's layouts describe them (see `plan`).
        unsafe {
            lt::result::matmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                p.b as *const c_void,
                plan.layouts[0],
                p.a as *const c_void,
                plan.layouts[1],
                c as *const c_void,
                plan.layouts[2],
                p.d as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as lt::sys::cudaStream_t,
            )
        }
        .map_err(|e| {
            blas_err(
                format!(
                    "cublasLtMatmul m={} n={} k={} b_transposed={} types={:?} accumulate={} \
                     separate_c={} bias={}",
                    shape.m,
                    shape.n,
                    shape.k,
                    shape.b_transposed,
                    key.types,
                    key.accumulate,
                    p.c.is_some_and(|c| c != p.d),
                    p.bias.is_some()
                ),
                e,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(m: usize, n: usize, k: usize, types: ProductTypes, align: [u32; 5]) -> PlanKey {
        PlanKey {
            shape: MatmulShape {
                m,
                n,
                k,
                b_transposed: true,
            },
            accumulate: false,
            bias: true,
            types,
            align,
        }
    }

    /// Batch-invariant products choose by everything but the row count and the addresses'
    /// own alignment (both change with the batch); by size, the rows' power of two counts.
    #[test]
    fn the_invariant_algorithm_key_ignores_what_a_batch_changes() {
        let a = key(197, 768, 768, ProductTypes::Bf16In, [256; 5]);
        let b = key(12_608, 768, 768, ProductTypes::Bf16In, [2, 32, 16, 16, 4]);
        assert_eq!(invariant_key(a), invariant_key(b));
        assert_eq!(invariant_key(a).shape.m, INVARIANT_ROWS);
        // Row pitches of 768 bf16 (1,536 B) and 768 f32 (3,072 B): 16-byte aligned at most.
        assert_eq!(invariant_key(a).align, [16; 5]);
        // An odd bf16 pitch is 2-byte aligned whatever the address.
        let odd = key(5, 769, 769, ProductTypes::Bf16Out, [256; 5]);
        assert_eq!(invariant_key(odd).align, [2, 2, 2, 2, 16]);
        // What the batch does not change still tells products apart.
        let wider = key(197, 3072, 768, ProductTypes::Bf16In, [256; 5]);
        assert_ne!(invariant_key(a), invariant_key(wider));
        let fp32 = key(197, 768, 768, ProductTypes::F32, [256; 5]);
        assert_ne!(invariant_key(a), invariant_key(fp32));
        // By size: 197 and 200 rows share the 256 bucket, 12,608 does not.
        let c = key(200, 768, 768, ProductTypes::Bf16In, [256; 5]);
        assert_eq!(
            algo_key(a, ProductAlgorithms::BySize),
            algo_key(c, ProductAlgorithms::BySize)
        );
        assert_ne!(
            algo_key(a, ProductAlgorithms::BySize),
            algo_key(b, ProductAlgorithms::BySize)
        );
    }
}
