//! cuBLASLt for the CUDA backend's matrix products: one descriptor, layouts and algorithm per
//! product shape (a [`Plan`]), the algorithm chosen by cuBLASLt's heuristic per row bucket or
//! once per kind of product ([`ProductAlgorithms`]), or timed on the device among the
//! heuristic's answers that give the same bits (`timing`).

use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::catch_unwind;
use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::RawAlloc;
use crate::gpu::device::GpuError;
use crate::gpu::gemm::{MatmulShape, ProductAlgorithms, ProductPtrs, ProductTypes, INVARIANT_ROWS};

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

pub(super) struct Blas {
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
    pub(super) fn new(stream: &Arc<CudaStream>) -> Result<Blas, GpuError> {
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

    pub(super) fn matmul(
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
