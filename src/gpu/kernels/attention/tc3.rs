//! v3: launchers for `kernels/attention_tc3.cu` (bf16 in and out, cp.async double buffering,
//! ldmatrix fragments): the bf16 engine's attention past v4's sequence lengths, and v4's
//! fallback.

use super::*;

/// Bytes of one 64×64 bf16 shared tile of the v3 kernels (row stride 72 elements).
const TC3_TILE_BYTES: u32 = 64 * 72 * 2;
/// Dynamic shared memory of the v3 kernels: Q + two stages of K and V; Q and dO + two stages
/// of K and V; K and V + two stages of Q and dO and of their lse / delta (64 floats each).
const TC3_FORWARD_SMEM: u32 = 5 * TC3_TILE_BYTES;
/// The paired forward ([`TcOptions::paired_rows`]): a 128-row Q tile, two stages of K and V.
const TC3_FORWARD_PAIRS_SMEM: u32 = 6 * TC3_TILE_BYTES;
const TC3_DQ_SMEM: u32 = 6 * TC3_TILE_BYTES;
const TC3_DKDV_SMEM: u32 = 6 * TC3_TILE_BYTES + 2 * 2 * 64 * 4;
/// v3's dK/dV and dQ kernels with their shared memory, in launch order.
const TC3_DKDV_DQ: [(&str, u32); 2] = [
    ("prm_attention_bwd_dkdv_tc3", TC3_DKDV_SMEM),
    ("prm_attention_bwd_dq_tc3", TC3_DQ_SMEM),
];
/// v3's dQ kernel that forms delta itself (and writes it for dK/dV, launched after it).
const TC3_DQ_DELTA: (&str, u32) = ("prm_attention_bwd_dq_delta_tc3", TC3_DQ_SMEM);
/// The paired backward ([`TcOptions::paired_rows`]), over 128-row tiles: dQ keeps 128 rows of
/// Q and dO with two stages of K and V; dK/dV 128 keys of K and V with two stages of Q and dO
/// and their statistics.
const TC3_DQ_PAIRS_SMEM: u32 = 8 * TC3_TILE_BYTES;
const TC3_DKDV_PAIRS_SMEM: u32 = 8 * TC3_TILE_BYTES + 2 * 2 * 64 * 4;
const TC3_DKDV_DQ_PAIRS: [(&str, u32); 2] = [
    ("prm_attention_bwd_dkdv_tc3_pairs", TC3_DKDV_PAIRS_SMEM),
    ("prm_attention_bwd_dq_tc3_pairs", TC3_DQ_PAIRS_SMEM),
];
const TC3_DQ_DELTA_PAIRS: (&str, u32) = ("prm_attention_bwd_dq_delta_tc3_pairs", TC3_DQ_PAIRS_SMEM);

/// v3's backward kernels for `options` (dK/dV then dQ; the dQ that forms delta) and the rows
/// a CTA covers.
fn tc3_backward_kernels(
    options: TcOptions,
) -> ([(&'static str, u32); 2], (&'static str, u32), usize) {
    if options.paired_rows {
        (TC3_DKDV_DQ_PAIRS, TC3_DQ_DELTA_PAIRS, 2 * TC_TILE)
    } else {
        (TC3_DKDV_DQ, TC3_DQ_DELTA, TC_TILE)
    }
}

/// Whether the v3 kernels implement `mode` / `causal` in the given direction: the forward
/// takes q·kᵀ, q·qᵀ and k·kᵀ, the backward q·kᵀ (causal or not in both), the same cases as v2
/// ([`tensor_core_supports`]). Other cases need the fp32 kernels ([`attention_forward_f32`],
/// [`attention_backward_f32`]).
pub fn tensor_core_v3_supports(mode: AttentionMode, backward: bool) -> bool {
    tensor_core_supports(mode, backward)
}

/// Forward attention v3 on tensor cores: `out = softmax(x·yᵀ/√64 [causal]) · v` from bf16
/// `qkv [N, 3D]` into the bf16 context `out [N, D]` (the out-projection's operand), and fp32
/// `lse [heads, N]`. Products take bf16 operands (P rounded to bf16) and accumulate in fp32;
/// softmax statistics are fp32. One CTA of 128 threads per (64-query tile, head, sequence),
/// 46,080 bytes of dynamic shared memory; with [`TcOptions::paired_rows`], per 128-query tile
/// (each warp running two 16-row blocks at once; 55,296 bytes), with the same bits.
///
/// Panics (a programming error, like a shape mismatch) for a mode
/// [`tensor_core_v3_supports`] rejects.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_tc3(
    dev: &Device,
    qkv: &Buffer<bf16>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &mut Buffer<bf16>,
    lse: &mut Buffer<f32>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    assert!(
        tensor_core_v3_supports(mode, false),
        "attention v3 has no forward for {mode:?}; use attention_forward_f32"
    );
    let (kernel, tile, smem) = if options.paired_rows {
        (
            "prm_attention_forward_tc3_pairs",
            2 * TC_TILE,
            TC3_FORWARD_PAIRS_SMEM,
        )
    } else {
        ("prm_attention_forward_tc3", TC_TILE, TC3_FORWARD_SMEM)
    };
    launch_forward(
        dev,
        kernel,
        Grid::Tiles(tile),
        smem,
        qkv,
        cu_seqlens,
        seqlens_host,
        out,
        lse,
        (width, tc_heads(width)),
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
/// Three launches without atomics: delta (which also rounds dO to bf16), dK/dV over 64-key
/// tiles (56,320 bytes of shared memory), dQ over 64-query tiles (55,296 bytes); with
/// [`TcOptions::paired_rows`], over 128-row tiles, each warp running two 16-row blocks at once
/// (74,752 and 73,728 bytes), with the same bits.
///
/// Panics (a programming error) for a mode [`tensor_core_v3_supports`] rejects.
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
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    assert!(
        tensor_core_v3_supports(mode, true),
        "attention v3 has no backward for {mode:?}; use attention_backward_f32"
    );
    let (total, heads) = check_backward(
        qkv,
        out,
        d_out,
        lse,
        cu_seqlens,
        seqlens_host,
        d_qkv,
        delta,
        (width, tc_heads(width)),
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
    launch_delta(
        dev,
        DELTA_TC3,
        out,
        d_out,
        delta,
        Some(&mut *d_out_bf16),
        total,
        heads,
        width,
    )?;
    tc3_dkdv_dq(
        dev,
        qkv,
        d_out_bf16,
        lse,
        cu_seqlens,
        seqlens_host,
        delta,
        d_qkv,
        (total, width),
        causal,
        options,
    )
}

/// [`attention_backward_tc3`] with `d_out` already in bf16 (the engine's path: the
/// out-projection's input-gradient product writes it in bf16, as PyTorch autocast does).
/// `delta` is formed from the bf16 `d_out`; on a `d_out` whose values are bf16-exact the
/// results are bit-identical to [`attention_backward_tc3`]'s. Two launches: dQ, which forms
/// delta for its own rows and writes it, then dK/dV (with [`TcOptions::delta_in_dq`] off: the
/// delta kernel first, then dK/dV and dQ; same bits). [`TcOptions::paired_rows`] as in
/// [`attention_backward_tc3`].
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
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    let (dkdv_dq, dq_delta, tile) = tc3_backward_kernels(options);
    bf16_dout_backward(
        dev,
        "v3",
        dkdv_dq,
        options.delta_in_dq.then_some(dq_delta),
        Grid::Tiles(tile),
        (qkv, out, d_out, lse, cu_seqlens, seqlens_host),
        d_qkv,
        delta,
        width,
        mode,
        causal,
        options.straight_tiles,
    )
}

/// The v3 dK/dV and dQ kernels, after the delta kernel.
#[allow(clippy::too_many_arguments)]
fn tc3_dkdv_dq(
    dev: &Device,
    qkv: &Buffer<bf16>,
    d_out: &Buffer<bf16>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    delta: &Buffer<f32>,
    d_qkv: &mut Buffer<bf16>,
    (total, width): (usize, usize),
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    let (dkdv_dq, _, tile) = tc3_backward_kernels(options);
    let straight = options.straight_tiles;
    launch_dkdv_dq(
        dev,
        &dkdv_dq,
        grid(seqlens_host, width / HEAD_DIM, tile),
        qkv,
        d_out,
        lse,
        cu_seqlens,
        delta,
        d_qkv,
        (total, width),
        causal,
        straight,
    )
}
