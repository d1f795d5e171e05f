//! v3: launchers for `kernels/attention_tc3.cu` (bf16 in and out, cp.async double buffering,
//! ldmatrix fragments): the bf16 engine's attention past v4's sequence lengths, v4's fallback,
//! and the bf16 engine's attention for heads that are not 64 wide (every multiple of 8 from 64
//! to 128, [`tensor_core_v3_supports_head_dim`]).

use super::simt::{checked_head_dim, kernel};
use super::*;

/// Whether v3 has kernels for heads `head_dim` wide: every multiple of 8 from 64 to 128 (64, the
/// OpenAI towers', and open_clip's 80 for ViT-H/14, 88 for ViT-g/14, 104 for ViT-bigG/14). v4
/// and v3's paired kernels ([`TcOptions::paired_rows`]) take heads of 64 only.
pub fn tensor_core_v3_supports_head_dim(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8) && (64..=128).contains(&head_dim)
}

/// The widest heads whose dK and dV one kernel forms together, in v2 and v3; wider heads run a
/// dV kernel and a dK kernel (attention_tc.cu's `PRM_TC2_KERNELS_SPLIT`, attention_tc3.cu's
/// `PRM_V3_KERNELS_SPLIT`), each holding one accumulator within the register file.
const ONE_PASS_DKDV_MAX_HEAD_DIM: usize = 96;

/// The backward kernels after delta of a tensor-core version (`version`: `tc` for v2, `tc3`)
/// at `head_dim`, with their shared memory `(dK/dV, dQ)`: dK/dV, or dV and dK above
/// [`ONE_PASS_DKDV_MAX_HEAD_DIM`], then dQ.
pub(super) fn dkdv_then_dq(
    version: &str,
    head_dim: usize,
    (dkdv, dq): (u32, u32),
) -> Vec<(String, u32)> {
    let name = |part: &str| kernel(&format!("prm_attention_bwd_{part}_{version}"), head_dim);
    let mut kernels = if head_dim <= ONE_PASS_DKDV_MAX_HEAD_DIM {
        vec![(name("dkdv"), dkdv)]
    } else {
        vec![(name("dv"), dkdv), (name("dk"), dkdv)]
    };
    kernels.push((name("dq"), dq));
    kernels
}

/// Bytes of one shared tile of heads `head_dim` wide: 64 rows of KP + 8 bf16, KP the head dim
/// rounded up to 16 (`V3Tile<HD>`; 64 rows of 72 at 64).
fn tile_bytes(head_dim: usize) -> u32 {
    (TC_TILE * (head_dim.next_multiple_of(16) + 8) * 2) as u32
}
/// The per-query lse and delta rows of dK/dV's two stages (64 floats each).
const DKDV_STATS_BYTES: u32 = 2 * 2 * 64 * 4;

/// Dynamic shared memory of the v3 kernels: Q + two stages of K and V; Q and dO + two stages
/// of K and V; K and V + two stages of Q and dO and of their lse / delta.
fn forward_smem(head_dim: usize) -> u32 {
    5 * tile_bytes(head_dim)
}
fn dq_smem(head_dim: usize) -> u32 {
    6 * tile_bytes(head_dim)
}
fn dkdv_smem(head_dim: usize) -> u32 {
    6 * tile_bytes(head_dim) + DKDV_STATS_BYTES
}
/// The paired kernels ([`TcOptions::paired_rows`], heads of 64): a 128-row Q tile and two
/// stages of K and V (forward); 128 rows of Q and dO with two stages of K and V (dQ); 128 keys
/// of K and V with two stages of Q and dO and their statistics (dK/dV).
const FORWARD_PAIRS_SMEM: u32 = 6 * 64 * 72 * 2;
const DQ_PAIRS_SMEM: u32 = 8 * 64 * 72 * 2;
const DKDV_PAIRS_SMEM: u32 = 8 * 64 * 72 * 2 + DKDV_STATS_BYTES;

/// The head dim of `width` in `heads`, which v3 must have kernels for (a programming error
/// otherwise: the engine sends other heads to v2 or v1, whose buffers are fp32).
fn v3_head_dim(width: usize, heads: usize) -> usize {
    let head_dim = checked_head_dim(width, heads);
    assert!(
        tensor_core_v3_supports_head_dim(head_dim),
        "attention v3 runs heads 64 to 128 wide in steps of 8, not {head_dim}; use the fp32 \
         kernels"
    );
    head_dim
}

/// Whether the paired kernels run: asked for, and heads of 64 (the only ones they exist for;
/// other heads run single blocks, whose results are the same).
fn paired(options: TcOptions, head_dim: usize) -> bool {
    options.paired_rows && head_dim == HEAD_DIM
}

/// v3's backward kernels for `options` and `head_dim`: those after delta (dK/dV, or dV and dK,
/// then dQ), the dQ that forms delta itself, and the rows a CTA covers.
fn tc3_backward_kernels(
    options: TcOptions,
    head_dim: usize,
) -> (Vec<(String, u32)>, (String, u32), usize) {
    if paired(options, head_dim) {
        return (
            vec![
                ("prm_attention_bwd_dkdv_tc3_pairs".into(), DKDV_PAIRS_SMEM),
                ("prm_attention_bwd_dq_tc3_pairs".into(), DQ_PAIRS_SMEM),
            ],
            ("prm_attention_bwd_dq_delta_tc3_pairs".into(), DQ_PAIRS_SMEM),
            2 * TC_TILE,
        );
    }
    let smem = (dkdv_smem(head_dim), dq_smem(head_dim));
    let after_delta = dkdv_then_dq("tc3", head_dim, smem);
    let dq_delta = (
        kernel("prm_attention_bwd_dq_delta_tc3", head_dim),
        dq_smem(head_dim),
    );
    (after_delta, dq_delta, TC_TILE)
}

/// Whether the v3 kernels implement `mode` / `causal` in the given direction: the forward
/// takes q·kᵀ, q·qᵀ and k·kᵀ, the backward q·kᵀ (causal or not in both), the same cases as v2
/// ([`tensor_core_supports`]). Other cases need the fp32 kernels ([`attention_forward_f32`],
/// [`attention_backward_f32`]).
pub fn tensor_core_v3_supports(mode: AttentionMode, backward: bool) -> bool {
    tensor_core_supports(mode, backward)
}

/// Forward attention v3 on tensor cores: `out = softmax(x·yᵀ/√HD [causal]) · v` from bf16
/// `qkv [N, 3D]` into the bf16 context `out [N, D]` (the out-projection's operand), and fp32
/// `lse [heads, N]`, `HD = width / heads` one of [`tensor_core_v3_supports_head_dim`]'s.
/// Products take bf16 operands (P rounded to bf16) and accumulate in fp32; softmax statistics
/// are fp32. One CTA of 128 threads per (64-query tile, head, sequence), 46,080 bytes of
/// dynamic shared memory at HD 64 (87,040 at 128); with [`TcOptions::paired_rows`] and heads of
/// 64, per 128-query tile (each warp running two 16-row blocks at once; 55,296 bytes), with the
/// same bits.
///
/// Panics (a programming error, like a shape mismatch) for a mode
/// [`tensor_core_v3_supports`] rejects, or heads v3 has no kernels for.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_tc3(
    dev: &Device,
    qkv: &Buffer<bf16>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &mut Buffer<bf16>,
    lse: &mut Buffer<f32>,
    width: usize,
    heads: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    assert!(
        tensor_core_v3_supports(mode, false),
        "attention v3 has no forward for {mode:?}; use attention_forward_f32"
    );
    let head_dim = v3_head_dim(width, heads);
    let (kernel, tile, smem) = if paired(options, head_dim) {
        (
            "prm_attention_forward_tc3_pairs".to_string(),
            2 * TC_TILE,
            FORWARD_PAIRS_SMEM,
        )
    } else {
        (
            kernel("prm_attention_forward_tc3", head_dim),
            TC_TILE,
            forward_smem(head_dim),
        )
    };
    launch_forward(
        dev,
        &kernel,
        Grid::Tiles(tile),
        smem,
        qkv,
        cu_seqlens,
        seqlens_host,
        out,
        lse,
        (width, heads),
        mode,
        causal,
        Some(options.straight_tiles),
    )
}

/// Input gradient of [`attention_forward_tc3`] (q·kᵀ, causal or not): from the fp32 `d_out
/// [N, D]` (the out-projection's input gradient) and the forward's bf16 `out` and fp32 `lse`,
/// writes every element of the bf16 `d_qkv [N, 3D]`, the operand of the QKV input-gradient
/// product. Scratch, caller-owned: `delta` ([`attention_stats_len`] fp32; on return
/// `rowsum(dO ⊙ O)` as `[heads, N]`) and `d_out_bf16 [N, D]` (on return bf16(`d_out`)).
///
/// Three launches without atomics (four for heads wider than 96, whose dK and dV are two
/// kernels): delta (which also rounds dO to bf16), dK/dV over 64-key tiles (56,320 bytes of
/// shared memory at HD 64), dQ over 64-query tiles (55,296 bytes); with
/// [`TcOptions::paired_rows`] and heads of 64, over 128-row tiles, each warp running two 16-row
/// blocks at once (74,752 and 73,728 bytes), with the same bits.
///
/// Panics (a programming error) for a mode [`tensor_core_v3_supports`] rejects, or heads v3 has
/// no kernels for.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_tc3(
    dev: &Device,
    qkv: &Buffer<bf16>,
    out: &Buffer<bf16>,
    d_out: &Buffer<f32>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    d_qkv: &mut Buffer<bf16>,
    delta: &mut Buffer<f32>,
    d_out_bf16: &mut Buffer<bf16>,
    width: usize,
    heads: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    assert!(
        tensor_core_v3_supports(mode, true),
        "attention v3 has no backward for {mode:?}; use attention_backward_f32"
    );
    let head_dim = v3_head_dim(width, heads);
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
    assert_eq!(
        d_out_bf16.len(),
        total * width,
        "d_out_bf16 has {} elements, expected [{total}, {width}]",
        d_out_bf16.len()
    );
    if total == 0 {
        return Ok(());
    }
    let delta_kernel = kernel(DELTA_TC3, head_dim);
    let delta_kernel = DeltaKernel::of(&delta_kernel);
    launch_delta(
        dev,
        delta_kernel,
        out,
        d_out,
        delta,
        Some(&mut *d_out_bf16),
        total,
        heads,
        width,
    )?;
    let (after_delta, _, tile) = tc3_backward_kernels(options, head_dim);
    launch_dkdv_dq(
        dev,
        &after_delta,
        grid(seqlens_host, heads, tile),
        qkv,
        d_out_bf16,
        lse,
        cu_seqlens,
        delta,
        d_qkv,
        (total, width),
        causal,
        options.straight_tiles,
    )
}

/// [`attention_backward_tc3`] with `d_out` already in bf16 (the engine's path: the
/// out-projection's input-gradient product writes it in bf16, as PyTorch autocast does).
/// `delta` is formed from the bf16 `d_out`; on a `d_out` whose values are bf16-exact the
/// results are bit-identical to [`attention_backward_tc3`]'s. Two launches (three for heads
/// wider than 96): dQ, which forms delta for its own rows and writes it, then dK/dV (with
/// [`TcOptions::delta_in_dq`] off: the delta kernel first, then dK/dV and dQ; same bits).
/// [`TcOptions::paired_rows`] as in [`attention_backward_tc3`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_tc3_bf16_dout(
    dev: &Device,
    qkv: &Buffer<bf16>,
    out: &Buffer<bf16>,
    d_out: &Buffer<bf16>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    d_qkv: &mut Buffer<bf16>,
    delta: &mut Buffer<f32>,
    width: usize,
    heads: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    let head_dim = v3_head_dim(width, heads);
    let (after_delta, dq_delta, tile) = tc3_backward_kernels(options, head_dim);
    let delta_kernel = kernel(DELTA_BF16_TC3, head_dim);
    bf16_dout_backward(
        dev,
        "v3",
        (&after_delta, DeltaKernel::of(&delta_kernel)),
        options.delta_in_dq.then_some(&dq_delta),
        Grid::Tiles(tile),
        (qkv, out, d_out, lse, cu_seqlens, seqlens_host),
        d_qkv,
        delta,
        (width, heads),
        mode,
        causal,
        options.straight_tiles,
    )
}
