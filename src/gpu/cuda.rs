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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as dr, sys as ds, CudaContext, CudaStream, DriverError};

use super::device::{GpuError, LaunchConfig};
use super::gemm::{MatmulShape, ProductAlgorithms, ProductPtrs, ProductTypes};
use super::product_timing::ProductTuning;

mod blas;
use blas::Blas;

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
    // The driver's description of its code (a driver call: there is one, as it just failed).
    let description = e
        .error_string()
        .ok()
        .map(|s| s.to_string_lossy().into_owned());
    driver_error(context, e.0, description.as_deref())
}

/// The error of a driver call that returned `code`: its message starts with the code's name
/// (`CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered`), which
/// [`GpuError::ends_the_context`] reads. Kept apart from [`cuda_err`] so it needs no driver.
fn driver_error(
    context: impl Into<String>,
    code: ds::CUresult,
    description: Option<&str>,
) -> GpuError {
    let name = format!("{code:?}");
    let mut message = match description {
        Some(d) => format!("{name}: {d}"),
        None => name,
    };
    if matches!(
        code,
        ds::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
            | ds::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
    ) {
        message.push_str(
            "; the kernels were built by nvcc 13.0 for PRM_CUDA_ARCHS (default 80;90): update \
             the driver (CUDA 13 needs >= 580) or rebuild with your GPU's arch in PRM_CUDA_ARCHS",
        );
    }
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
    /// Whether products time cuBLASLt's answers on the device (`PRM_PRODUCTS=timed`,
    /// [`super::product_timing`]); read when a product's algorithm is first chosen.
    timed_products: AtomicBool,
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
        // Refused before anything is opened: a typo must not silently mean the default.
        let timed = super::product_timing::timed_from_env().map_err(GpuError::Config)?;
        catch_unwind(AssertUnwindSafe(|| Self::open(ordinal, images, timed))).unwrap_or_else(|p| {
            Err(GpuError::Cuda {
                context: format!("opening CUDA device {ordinal}"),
                message: crate::panic_message(&*p),
            })
        })
    }

    fn open(
        ordinal: usize,
        images: &'static [ModuleImage],
        timed_products: bool,
    ) -> Result<Self, GpuError> {
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
                timed_products: AtomicBool::new(timed_products),
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

    /// Whether products time cuBLASLt's answers on the device (`PRM_PRODUCTS=timed`).
    pub fn timed_products(&self) -> bool {
        self.timed_products.load(Ordering::Relaxed)
    }

    /// Sets whether products time cuBLASLt's answers from now on (each way keeps its own
    /// cache of plans).
    pub fn set_timed_products(&self, timed: bool) {
        self.timed_products.store(timed, Ordering::Relaxed);
    }

    /// Every tuning of a product's algorithm so far (`PRM_PRODUCTS=timed`), in order.
    pub fn product_tunings(&self) -> Vec<ProductTuning> {
        self.blas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or_else(Vec::new, |b| b.tunings().to_vec())
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
        // cudarc reports an error that an earlier drop of one of its handles stored at the
        // next bind, and then does nothing else: taken here, so that the capture is ended
        // whatever it was (a stream left capturing would refuse every later direct call).
        let stale = self.ctx.check_err();
        let ended = catch_unwind(AssertUnwindSafe(|| {
            self.stream.end_capture(ds::CUgraphInstantiate_flags(0))
        }))
        .map_err(|p| GpuError::Cuda {
            context: "ending a graph capture".into(),
            message: crate::panic_message(&*p),
        });
        // Buffers dropped during the capture are freed now, in stream order after it.
        free_deferred(&self.stream);
        if let Err(e) = stale {
            eprintln!("prm: a CUDA handle released before the end of a graph capture failed: {e}");
        }
        match ended? {
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
        let selection = blas::Selection {
            algorithms: self.product_algorithms(),
            timed: self.timed_products(),
        };
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
            blas.matmul(&self.stream, shape, types, p, capturing, selection)
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

/// Allocations dropped while their stream was being captured, freed by
/// [`CudaBackend::end_capture`]: during a capture `cuMemFreeAsync` becomes a node of the graph,
/// which the driver accepts only for the graph's own allocations (any other address breaks the
/// capture), and a synchronisation is not allowed at all. Freed after the capture, in stream
/// order, they still wait for the work queued before it; the captured work itself must not use
/// them (the pool and `pin_to_capture` keep what it uses alive, and the simulator checks it).
static DEFERRED_FREES: Mutex<Vec<(ds::CUdeviceptr, Arc<CudaStream>)>> = Mutex::new(Vec::new());

/// Frees the deferred allocations of `stream` (see [`DEFERRED_FREES`]).
fn free_deferred(stream: &Arc<CudaStream>) {
    let mine: Vec<ds::CUdeviceptr> = {
        let mut deferred = DEFERRED_FREES.lock().unwrap_or_else(|p| p.into_inner());
        let (mine, rest) = deferred
            .drain(..)
            .partition(|(_, s)| Arc::ptr_eq(s, stream));
        *deferred = rest;
        mine.into_iter().map(|(ptr, _)| ptr).collect()
    };
    for ptr in mine {
        drop(RawAlloc {
            ptr,
            stream: stream.clone(),
        });
    }
}

/// Whether `stream` is being captured (an error counts as not: the free then fails as it
/// would have).
fn capturing(stream: &CudaStream) -> bool {
    let mut status = ds::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: a query on a live stream into a local.
    let queried = unsafe { ds::cuStreamIsCapturing(stream.cu_stream(), &mut status) };
    queried == ds::CUresult::CUDA_SUCCESS
        && status != ds::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
}

impl Drop for RawAlloc {
    fn drop(&mut self) {
        let ctx = self.stream.context();
        // SAFETY: the allocation is freed once, in stream order after every use queued on the
        // stream (or after a stream synchronisation without memory pools), or handed to
        // `DEFERRED_FREES` while the stream is captured. Errors are ignored: there is nothing
        // to report them to.
        unsafe {
            let _ = dr::ctx::set_current(ctx.cu_ctx());
            if capturing(&self.stream) {
                DEFERRED_FREES
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((self.ptr, self.stream.clone()));
                return;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The faults that end a CUDA context are told from the others by the code's name at the
    /// start of the message, which comes from the code itself, not from cudarc's formatting.
    #[test]
    fn driver_errors_name_their_code_and_the_fatal_ones_end_the_context() {
        use ds::CUresult as R;
        for code in [
            R::CUDA_ERROR_ILLEGAL_ADDRESS,
            R::CUDA_ERROR_MISALIGNED_ADDRESS,
            R::CUDA_ERROR_ILLEGAL_INSTRUCTION,
            R::CUDA_ERROR_INVALID_ADDRESS_SPACE,
            R::CUDA_ERROR_INVALID_PC,
            R::CUDA_ERROR_HARDWARE_STACK_ERROR,
            R::CUDA_ERROR_LAUNCH_FAILED,
            R::CUDA_ERROR_ASSERT,
        ] {
            let e = driver_error("launching k", code, Some("what the driver says"));
            assert!(e.ends_the_context(), "{e}");
            assert!(e.to_string().contains(": what the driver says"), "{e}");
        }
        for code in [
            R::CUDA_ERROR_OUT_OF_MEMORY,
            R::CUDA_ERROR_INVALID_VALUE,
            R::CUDA_ERROR_NOT_READY,
        ] {
            let e = driver_error("launching k", code, None);
            assert!(!e.ends_the_context(), "{e}");
        }
        let e = driver_error("loading", R::CUDA_ERROR_NO_BINARY_FOR_GPU, None);
        let text = e.to_string();
        assert!(
            text.starts_with("CUDA error in loading: CUDA_ERROR_NO_BINARY_FOR_GPU; ")
                && text.contains("PRM_CUDA_ARCHS"),
            "{text}"
        );
    }
}
