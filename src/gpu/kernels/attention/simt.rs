//! v1: launchers for `kernels/attention.cu`, fused attention on SIMT cores in fp32 (every mode,
//! causal or not, every head dim [`simt_supports_head_dim`] allows). The fp32 engine's kernels,
//! any precision's kernels for towers whose heads are not 64 wide, and the reference the
//! tensor-core versions are checked against.

use super::*;

/// Key tile of the forward kernel (`FWD_BK` in attention.cu).
const FWD_BK: usize = 32;
const F32_BYTES: usize = 4;

/// The kernel `base` of one head dim: 64 keeps the plain names, the others are suffixed
/// `_hd<HD>` (attention.cu's `PRM_ATT_SIMT_KERNELS`, and attention_tc.cu's v2 kernels too).
pub(super) fn kernel(base: &str, head_dim: usize) -> String {
    if head_dim == HEAD_DIM {
        base.to_string()
    } else {
        format!("{base}_hd{head_dim}")
    }
}

/// The head dim of `width` in `heads`, checked against the instantiated ones.
pub(super) fn checked_head_dim(width: usize, heads: usize) -> usize {
    assert!(
        heads > 0 && width.is_multiple_of(heads),
        "attention width {width} does not split into {heads} heads"
    );
    let head_dim = width / heads;
    assert!(
        simt_supports_head_dim(head_dim),
        "attention heads {head_dim} wide: the SIMT kernels run multiples of 8 from 32 to 128 \
         (check_head_layout says so before any launch)"
    );
    head_dim
}

// Dynamic shared memory of each kernel, as its carve in attention.cu lays it out (floats):
// rows of `head_dim + 1` (padded) or `head_dim`, and the 33-wide score tiles.
fn forward_shared_bytes(head_dim: usize) -> u32 {
    let floats = (FWD_BQ + FWD_BK) * (head_dim + 1) + FWD_BK * head_dim + FWD_BQ * (FWD_BK + 1);
    (floats * F32_BYTES) as u32
}
fn dkdv_shared_bytes(head_dim: usize) -> u32 {
    let floats = 4 * BWD_B * (head_dim + 1) + 2 * BWD_B * (BWD_B + 1) + 2 * BWD_B;
    (floats * F32_BYTES) as u32
}
fn dq_shared_bytes(head_dim: usize) -> u32 {
    let floats = 4 * BWD_B * (head_dim + 1) + BWD_B * (BWD_B + 1);
    (floats * F32_BYTES) as u32
}

/// Forward attention: `out = softmax(x·yᵀ/√HD [causal mask]) · v` per sequence and head (`HD =
/// width / heads`), and the per-(head, row) log-sum-exp `lse [heads, N]` for the backward.
///
/// One CTA per (64-query tile, head, sequence), 128 threads, online softmax over 32-key tiles
/// (shared memory does not grow with `T`; 41.6 KB at head dim 64, 74.4 KB at 128). `causal`
/// allows key `j` for query `i` only when `j ≤ i`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_f32(
    dev: &Device,
    qkv: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &mut Buffer<f32>,
    lse: &mut Buffer<f32>,
    width: usize,
    heads: usize,
    mode: AttentionMode,
    causal: bool,
) -> Result<(), GpuError> {
    let hd = checked_head_dim(width, heads);
    launch_forward(
        dev,
        &kernel("prm_attention_forward_f32", hd),
        Grid::Tiles(FWD_BQ),
        forward_shared_bytes(hd),
        qkv,
        cu_seqlens,
        seqlens_host,
        out,
        lse,
        (width, heads),
        mode,
        causal,
        None,
    )
}

/// Input gradient of [`attention_forward_f32`]: from `d_out [N, D]` (and the forward's `out` and
/// `lse`), writes `d_qkv [N, 3D]` completely. `delta` is caller-owned scratch of
/// [`attention_stats_len`] elements (contents on return: `rowsum(dO ⊙ O)` as `[heads, N]`;
/// untouched in identity mode).
///
/// Three launches, in stream order and without atomics: `delta`; dK/dV (one CTA per 32-key tile,
/// head and sequence, looping over query tiles); dQ (one CTA per 32-query tile, head and
/// sequence, looping over key tiles). Every mode and `causal` are supported; `mode` and
/// `causal` must be those of the forward that produced `out` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_f32(
    dev: &Device,
    qkv: &Buffer<f32>,
    out: &Buffer<f32>,
    d_out: &Buffer<f32>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    d_qkv: &mut Buffer<f32>,
    delta: &mut Buffer<f32>,
    width: usize,
    heads: usize,
    mode: AttentionMode,
    causal: bool,
) -> Result<(), GpuError> {
    let hd = checked_head_dim(width, heads);
    let (total, heads) = check_backward(
        qkv,
        out,
        d_out,
        lse,
        cu_seqlens,
        seqlens_host,
        d_qkv,
        delta,
        (width, heads),
    );
    if total == 0 {
        return Ok(());
    }
    if mode != AttentionMode::Identity {
        launch_delta_f32(dev, hd, out, d_out, delta, total, heads, width)?;
    }
    let kernels = [
        (
            kernel("prm_attention_bwd_dkdv_f32", hd),
            dkdv_shared_bytes(hd),
        ),
        (kernel("prm_attention_bwd_dq_f32", hd), dq_shared_bytes(hd)),
    ];
    // dQ does nothing in identity mode (dK/dV writes every part there).
    let launches = if mode == AttentionMode::Identity {
        1
    } else {
        2
    };
    let grid = grid(seqlens_host, heads, BWD_B);
    let ops = (qkv, d_out, lse, &*delta, cu_seqlens);
    let flags = [mode as i32, causal as i32];
    launch_f32_backward(
        dev,
        &kernels[..launches],
        grid,
        ops,
        d_qkv,
        (width, total),
        &flags,
    )
}

/// v1's delta kernel of head dim `hd` (fp32 `out` and dO, one (row, head) pair a warp); v2
/// runs it too.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_delta_f32(
    dev: &Device,
    hd: usize,
    out: &Buffer<f32>,
    d_out: &Buffer<f32>,
    delta: &mut Buffer<f32>,
    total: usize,
    heads: usize,
    width: usize,
) -> Result<(), GpuError> {
    let name = kernel("prm_attention_delta_f32", hd);
    let delta_kernel = DeltaKernel {
        name: &name,
        pairs_per_warp: 1,
    };
    launch_delta(
        dev,
        delta_kernel,
        out,
        d_out,
        delta,
        None,
        total,
        heads,
        width,
    )
}
