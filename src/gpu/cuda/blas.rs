//! cuBLASLt for the CUDA backend's matrix products: one descriptor, layouts and algorithm per
//! product shape (a [`Plan`]), the algorithm chosen by cuBLASLt's heuristic per row bucket or
//! once per kind of product ([`ProductAlgorithms`]), or timed on the device among the
//! heuristic's answers that give the same bits (`timing`).

use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::catch_unwind;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{result as dr, sys as ds, CudaStream};

use super::{cuda_err, RawAlloc};
use crate::gpu::device::GpuError;
use crate::gpu::gemm::{MatmulShape, ProductAlgorithms, ProductPtrs, ProductTypes, INVARIANT_ROWS};
use crate::gpu::product_timing::{
    self, CandidateOutcome, ProductTuning, TIMED_CANDIDATES, TUNING_REPEATS, TUNING_ROUNDS,
};

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

/// Whether an algorithm forms each element's inner sum in one block (it does not split the
/// inner dimension, whose parts would be added in an order of their own).
fn keeps_inner_dimension_whole(algo: &Algo) -> bool {
    use lt::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
    let mut splits: i32 = 0;
    let mut written = 0usize;
    // SAFETY: `algo` was initialised by the heuristic; SPLITK_NUM is an int32.
    let read = unsafe {
        lt::sys::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            lt::sys::cublasLtMatmulAlgoConfigAttributes_t::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
            &mut splits as *mut i32 as *mut c_void,
            std::mem::size_of::<i32>(),
            &mut written,
        )
    };
    read == CUBLAS_STATUS_SUCCESS && splits <= 1
}

/// What an error about `key`'s product says it was doing.
fn context(key: PlanKey, what: &str) -> String {
    let s = key.shape;
    format!(
        "cuBLASLt {what} for m={} n={} k={} b_transposed={} types={:?} accumulate={} bias={}",
        s.m, s.n, s.k, s.b_transposed, key.types, key.accumulate, key.bias
    )
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

/// How a product's algorithm is chosen: by which key ([`ProductAlgorithms`]), and whether the
/// heuristic's answers are timed on the device (`PRM_PRODUCTS=timed`, [`crate::gpu::product_timing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Selection {
    pub algorithms: ProductAlgorithms,
    pub timed: bool,
}

type Algo = lt::sys::cublasLtMatmulAlgo_t;

pub(super) struct Blas {
    handle: lt::sys::cublasLtHandle_t,
    workspace: RawAlloc,
    plans: HashMap<(PlanKey, Selection), Plan>,
    /// Chosen algorithms by [`algo_key`].
    algos: HashMap<(PlanKey, Selection), Algo>,
    /// Every tuning under `timed`, in the order they ran.
    tunings: Vec<ProductTuning>,
    /// A tuning failed to run and kept the reference (said once).
    tuning_failure_told: bool,
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
            tunings: Vec::new(),
            tuning_failure_told: false,
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
    fn plan(
        &mut self,
        stream: &Arc<CudaStream>,
        key: PlanKey,
        sel: Selection,
        call: ProductPtrs,
        capturing: bool,
    ) -> Result<&Plan, GpuError> {
        if !self.plans.contains_key(&(key, sel)) {
            if self.plans.len() >= MAX_PLANS {
                self.plans.clear();
            }
            let from = (algo_key(key, sel.algorithms), sel);
            let algo = match self.algos.get(&from) {
                Some(algo) => *algo,
                // Asked at the reference size of the key, never at this one: every size that
                // shares the key borrows it, whichever came first. A capture cannot time
                // (nothing runs), and a small product cannot show that an answer sums in the
                // reference's order: under `timed` they take the first answer for this size
                // only, so that the key is timed when a large enough direct call meets it.
                None if !sel.timed
                    || capturing
                    || !crate::gpu::product_timing::large_enough_to_tune(
                        key.shape.m,
                        key.shape.n,
                        key.types.bf16_output(),
                    ) =>
                {
                    let algo = self.create_plan(from.0, None, sel.algorithms)?.algo;
                    if !sel.timed {
                        self.algos.insert(from, algo);
                    }
                    algo
                }
                None => {
                    let algo = self.timed_algorithm(stream, key, from.0, sel.algorithms, call)?;
                    self.algos.insert(from, algo);
                    algo
                }
            };
            let plan = self.create_plan(key, Some(algo), sel.algorithms)?;
            self.plans.insert((key, sel), plan);
        }
        Ok(&self.plans[&(key, sel)])
    }

    /// Replaces a plan whose borrowed algorithm cuBLASLt rejected with an exact query: an
    /// algorithm of this size alone (the other sizes of its key keep theirs). For
    /// [`ProductAlgorithms::BatchInvariant`] that is said once per kind of product, since its
    /// rows may then differ from the same rows in other batches.
    fn replan_exact(&mut self, key: PlanKey, sel: Selection) -> Result<(), GpuError> {
        let plan = self.create_plan(key, None, sel.algorithms)?;
        let from = algo_key(key, sel.algorithms);
        if sel.algorithms == ProductAlgorithms::BatchInvariant && self.invariance_lost.insert(from)
        {
            let s = key.shape;
            eprintln!(
                "prm: cuBLASLt refused the batch-invariant algorithm of the product m={} \
                     n={} k={} ({:?}); this size uses an algorithm of its own, so its rows may \
                     differ in their last bits from the same rows in batches of other sizes",
                s.m, s.n, s.k, key.types
            );
        }
        self.plans.insert((key, sel), plan);
        Ok(())
    }

    /// A plan for `key` with the `borrowed` algorithm, or else the heuristic's first answer.
    fn create_plan(
        &self,
        key: PlanKey,
        borrowed: Option<Algo>,
        choice: ProductAlgorithms,
    ) -> Result<Plan, GpuError> {
        let mut plan = self.describe(key)?;
        match borrowed {
            Some(algo) => {
                plan.algo = algo;
                plan.borrowed = true;
            }
            None => plan.algo = self.heuristic_algos(&plan, key, choice, 1)?[0],
        }
        Ok(plan)
    }

    /// The descriptor and layouts of `key`'s product (its algorithm not yet set).
    fn describe(&self, key: PlanKey) -> Result<Plan, GpuError> {
        use lt::sys::cublasLtMatmulDescAttributes_t as D;
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
        let ctx = |what: &str| context(key, what);

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

        Ok(plan)
    }

    /// cuBLASLt's first `count` answers for `key`'s product (best first) whose workspace fits,
    /// and under [`ProductAlgorithms::BatchInvariant`] only those that keep the inner dimension
    /// whole; never empty.
    fn heuristic_algos(
        &self,
        plan: &Plan,
        key: PlanKey,
        choice: ProductAlgorithms,
        count: usize,
    ) -> Result<Vec<Algo>, GpuError> {
        use lt::sys::cublasLtMatmulPreferenceAttributes_t as P;
        let ctx = |what: &str| context(key, what);
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
        let asked = match choice {
            ProductAlgorithms::BySize => count,
            ProductAlgorithms::BatchInvariant => INVARIANT_CANDIDATES.max(count),
        };
        let answers = result.and_then(|_| {
            // SAFETY: the plan's descriptor and layouts and the preference are live.
            unsafe { self.heuristic_answers(plan.desc, &plan.layouts, pref, asked) }.map_err(|e| {
                blas_err(
                    ctx("algorithm heuristic (no algorithm supports this configuration)"),
                    e,
                )
            })
        });
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::result::destroy_matmul_pref(pref) };
        let answers = answers?;
        let total = answers.len();
        let algos: Vec<Algo> = answers
            .into_iter()
            .filter(|r| r.workspaceSize <= WORKSPACE_BYTES)
            .filter(|r| choice == ProductAlgorithms::BySize || keeps_inner_dimension_whole(&r.algo))
            .map(|r| r.algo)
            .take(count)
            .collect();
        if algos.is_empty() {
            return Err(match choice {
                ProductAlgorithms::BatchInvariant => GpuError::Cuda {
                    context: ctx("batch-invariant algorithm"),
                    message: format!(
                        "none of cuBLASLt's {total} algorithms for it keeps the inner dimension \
                         whole; run without --batch-invariant and PRM_BATCH_INVARIANT=1"
                    ),
                },
                ProductAlgorithms::BySize => GpuError::Cuda {
                    context: ctx("algorithm heuristic"),
                    message: format!(
                        "none of cuBLASLt's {total} answers fits the {WORKSPACE_BYTES}-byte \
                         workspace"
                    ),
                },
            });
        }
        Ok(algos)
    }

    pub(super) fn matmul(
        &mut self,
        stream: &Arc<CudaStream>,
        shape: MatmulShape,
        types: ProductTypes,
        p: ProductPtrs,
        capturing: bool,
        sel: Selection,
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
        let first = self.matmul_with_plan(stream, key, p, sel, capturing);
        match first {
            Err(_) if self.plans.get(&(key, sel)).is_some_and(|p| p.borrowed) => {
                self.replan_exact(key, sel)?;
                self.matmul_with_plan(stream, key, p, sel, capturing)
            }
            r => r,
        }
    }

    /// cuBLASLt's heuristic answers for a product (best first, at most `count`), those it
    /// marks as usable; `CUBLAS_STATUS_NOT_SUPPORTED` when there are none.
    ///
    /// # Safety
    /// The descriptor, layouts and preference must be live.
    unsafe fn heuristic_answers(
        &self,
        desc: lt::sys::cublasLtMatmulDesc_t,
        layouts: &[lt::sys::cublasLtMatrixLayout_t; 3],
        pref: lt::sys::cublasLtMatmulPreference_t,
        count: usize,
    ) -> Result<Vec<lt::sys::cublasLtMatmulHeuristicResult_t>, lt::result::CublasError> {
        use lt::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
        let count = count.max(1);
        // SAFETY: plain-old-data, written by cuBLASLt before it is read.
        let mut results: Vec<lt::sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; count];
        let mut returned: std::ffi::c_int = 0;
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
                count as std::ffi::c_int,
                results.as_mut_ptr(),
                &mut returned,
            )
        };
        if status != CUBLAS_STATUS_SUCCESS {
            return Err(lt::result::CublasError(status));
        }
        results.truncate((returned.max(0) as usize).min(count));
        results.retain(|r| r.state == CUBLAS_STATUS_SUCCESS);
        if results.is_empty() {
            // As cudarc's single-answer query says it.
            return Err(lt::result::CublasError(
                lt::sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
            ));
        }
        Ok(results)
    }

    /// One `cublasLtMatmul` through the plan for `key` (created if needed).
    fn matmul_with_plan(
        &mut self,
        stream: &Arc<CudaStream>,
        key: PlanKey,
        p: ProductPtrs,
        sel: Selection,
        capturing: bool,
    ) -> Result<(), GpuError> {
        self.plan(stream, key, sel, p, capturing)?;
        let plan = &self.plans[&(key, sel)];
        self.launch(stream, plan, &plan.algo, key, p).map_err(|e| {
            let s = key.shape;
            blas_err(
                format!(
                    "cublasLtMatmul m={} n={} k={} b_transposed={} types={:?} accumulate={} \
                     separate_c={} bias={}",
                    s.m,
                    s.n,
                    s.k,
                    s.b_transposed,
                    key.types,
                    key.accumulate,
                    p.c.is_some_and(|c| c != p.d),
                    p.bias.is_some()
                ),
                e,
            )
        })
    }

    /// Queues `d = (c or 0) + a · op(b) + bias` with `algo` through `plan`'s descriptor and
    /// layouts (those of `key`).
    fn launch(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        algo: &Algo,
        key: PlanKey,
        p: ProductPtrs,
    ) -> Result<(), lt::result::CublasError> {
        if let Some(bias) = p.bias {
            // SAFETY: valid descriptor; the attribute is a device pointer (8 bytes). The
            // descriptor is read by cublasLtMatmul at call time, under the backend's lock.
            unsafe {
                lt::result::set_matmul_desc_attribute(
                    plan.desc,
                    lt::sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )?
            };
        }
        let alpha = 1.0f32;
        let beta = if key.accumulate { 1.0f32 } else { 0.0f32 };
        // With β = 0, C is not read; it is given D's address (a valid pointer of its layout).
        let c = p.c.unwrap_or(p.d);
        // SAFETY: the addresses are live device buffers of the extents asserted by `gemm`'s
        // entry points (or scratch buffers of the same extents); the plan's layouts describe
        // them (see `plan`).
        unsafe {
            lt::result::matmul(
                self.handle,
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
                algo,
                self.workspace.ptr as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as lt::sys::cudaStream_t,
            )
        }
    }

    /// The algorithm for `from` (the algorithm key of `key`) under `PRM_PRODUCTS=timed`: the
    /// heuristic's first answers timed on this call's operands, among those that give the
    /// first answer's bits ([`crate::gpu::product_timing`]). A tuning that cannot run keeps
    /// the first answer and says why, once.
    fn timed_algorithm(
        &mut self,
        stream: &Arc<CudaStream>,
        key: PlanKey,
        from: PlanKey,
        choice: ProductAlgorithms,
        call: ProductPtrs,
    ) -> Result<Algo, GpuError> {
        let started = Instant::now();
        let answers =
            self.heuristic_algos(&self.describe(from)?, from, choice, TIMED_CANDIDATES)?;
        match self.time_answers(stream, key, &answers, call) {
            Ok(candidates) => {
                let chosen = product_timing::choose(&candidates);
                let s = key.shape;
                self.tunings.push(ProductTuning {
                    m: s.m,
                    n: s.n,
                    k: s.k,
                    types: match key.types {
                        ProductTypes::F32 => "f32",
                        ProductTypes::Bf16In => "bf16 in",
                        ProductTypes::Bf16Out => "bf16 out",
                    },
                    accumulate: key.accumulate,
                    bias: key.bias,
                    algorithms: choice,
                    candidates,
                    chosen,
                    seconds: started.elapsed().as_secs_f64(),
                });
                Ok(answers[chosen])
            }
            Err(e) => {
                if !std::mem::replace(&mut self.tuning_failure_told, true) {
                    eprintln!(
                        "prm: PRM_PRODUCTS=timed could not time the product {}: {e}; it and any \
                         other that cannot keep cuBLASLt's first answer",
                        context(key, "algorithms")
                    );
                }
                Ok(answers[0])
            }
        }
    }

    /// Runs each answer on `call`'s operands into scratch outputs (its `c` copied first when
    /// the product accumulates in place), compares its bits with the first answer's, and
    /// times those that match. The call's own output is not touched.
    fn time_answers(
        &self,
        stream: &Arc<CudaStream>,
        key: PlanKey,
        answers: &[Algo],
        call: ProductPtrs,
    ) -> Result<Vec<CandidateOutcome>, GpuError> {
        let s = key.shape;
        let out_bytes = s.m * s.n * if key.types.bf16_output() { 2 } else { 4 };
        let reference_out = RawAlloc::undefined(stream, out_bytes)?;
        let trial_out = RawAlloc::undefined(stream, out_bytes)?;
        // In place (c = d), each run would add to the last one's output: add to a copy.
        let c_copy = match call.c {
            Some(c) if c == call.d => {
                let copy = RawAlloc::undefined(stream, out_bytes)?;
                // SAFETY: both are live allocations of at least `out_bytes` bytes.
                unsafe { dr::memcpy_dtod_async(copy.ptr, c, out_bytes, stream.cu_stream()) }
                    .map_err(|e| cuda_err("copying a product's C for its tuning", e))?;
                Some(copy)
            }
            _ => None,
        };
        let into = |d: &RawAlloc| ProductPtrs {
            c: c_copy.as_ref().map(|c| c.ptr).or(call.c),
            d: d.ptr,
            ..call
        };
        let plan = self.describe(key)?;
        let download = |d: &RawAlloc| -> Result<Vec<u8>, GpuError> {
            let mut host = vec![0u8; out_bytes];
            // SAFETY: `d` holds `out_bytes` bytes; the stream is synchronised before the host
            // reads them.
            unsafe { dr::memcpy_dtoh_async(&mut host[..], d.ptr, stream.cu_stream()) }
                .and_then(|_| stream.synchronize())
                .map_err(|e| cuda_err("reading a product's tuning output", e))?;
            Ok(host)
        };
        self.launch(stream, &plan, &answers[0], key, into(&reference_out))
            .map_err(|e| blas_err(context(key, "reference run of a tuning"), e))?;
        let reference = download(&reference_out)?;
        let mut outcomes = vec![CandidateOutcome::Timed(f64::NAN)];
        for algo in &answers[1..] {
            outcomes.push(
                match self.launch(stream, &plan, algo, key, into(&trial_out)) {
                    Err(_) => CandidateOutcome::Refused,
                    Ok(()) if download(&trial_out)? != reference => CandidateOutcome::OtherBits,
                    Ok(()) => CandidateOutcome::Timed(f64::NAN),
                },
            );
        }
        let ctx = stream.context();
        let event = || {
            ctx.new_event(Some(ds::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_err("creating a timing event", e))
        };
        let (start, end) = (event()?, event()?);
        for _ in 0..TUNING_ROUNDS {
            for (algo, outcome) in answers.iter().zip(outcomes.iter_mut()) {
                let CandidateOutcome::Timed(best) = outcome else {
                    continue;
                };
                start
                    .record(stream)
                    .map_err(|e| cuda_err("recording a timing event", e))?;
                let mut ran = Ok(());
                for _ in 0..TUNING_REPEATS {
                    ran = ran.and(self.launch(stream, &plan, algo, key, into(&trial_out)));
                }
                end.record(stream)
                    .map_err(|e| cuda_err("recording a timing event", e))?;
                let ms = end
                    .synchronize()
                    .and_then(|_| start.elapsed_ms(&end))
                    .map_err(|e| cuda_err("reading a timing event", e))?;
                if ran.is_err() {
                    *outcome = CandidateOutcome::Refused;
                    continue;
                }
                let us = ms as f64 * 1e3 / TUNING_REPEATS as f64;
                *best = if best.is_nan() { us } else { best.min(us) };
            }
        }
        // The scratch outputs are freed in stream order, after the runs that write them.
        Ok(outcomes)
    }

    /// Every tuning under `PRM_PRODUCTS=timed` so far.
    pub(super) fn tunings(&self) -> &[ProductTuning] {
        &self.tunings
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
