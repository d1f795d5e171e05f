//! v1: launchers for `kernels/attention.cu`, fused attention on SIMT cores in fp32 (every mode,
//! causal or not). The fp32 engine's kernels, and the reference the tensor-core versions are
//! checked against.

use super::*;

/// Forward attention: `out = softmax(x·yᵀ/√64 [causal mask]) · v` per sequence and head, and the
/// per-(head, row) log-sum-exp `lse [heads, N]` for the backward.
///
/// One CTA per (64-query tile, head, sequence), 128 threads, online softmax over 32-key tiles
/// (shared memory does not grow with `T`). `causal` allows key `j` for query `i` only when
/// `j ≤ i`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_f32(
    dev: &Device,
    qkv: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &mut Buffer<f32>,
    lse: &mut Buffer<f32>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
) -> Result<(), GpuError> {
    launch_forward(
        dev,
        "prm_attention_forward_f32",
        Grid::Tiles(FWD_BQ),
        0,
        qkv,
        cu_seqlens,
        seqlens_host,
        out,
        lse,
        width,
        mode,
        causal,
        None,
    )
}

/// Input gradient of [`attention_forward_f32`]: from `d_out [N, D]` (and the forward's `out` and
/// `lse`), writes `d_qkv [N, 3D]` completely. `delta` is caller-owned scratch of
/// [`attention_scratch_len`] elements (contents on return: `rowsum(dO ⊙ O)` as `[heads, N]`;
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
    mode: AttentionMode,
    causal: bool,
) -> Result<(), GpuError> {
    let (total, heads) = check_backward(
        qkv,
        out,
        d_out,
        lse,
        cu_seqlens,
        seqlens_host,
        d_qkv,
        delta,
        width,
    );
    if total == 0 {
        return Ok(());
    }
    let (w, n, m, c) = (width as i32, total as i32, mode as i32, causal as i32);

    if mode != AttentionMode::Identity {
        launch_delta(dev, DELTA_F32, out, d_out, delta, None, total, heads, width)?;
    }

    let cfg = LaunchConfig {
        grid: grid(seqlens_host, heads, BWD_B),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    let mut args = KernelArgs::new();
    args.input(qkv)
        .input(d_out)
        .input(lse)
        .input(delta)
        .input(cu_seqlens)
        .output(d_qkv)
        .i32(w)
        .i32(n)
        .i32(m)
        .i32(c);
    dev.launch("prm_attention_bwd_dkdv_f32", cfg, &mut args)?;

    if mode != AttentionMode::Identity {
        let mut args = KernelArgs::new();
        args.input(qkv)
            .input(d_out)
            .input(lse)
            .input(delta)
            .input(cu_seqlens)
            .output(d_qkv)
            .i32(w)
            .i32(n)
            .i32(m)
            .i32(c);
        dev.launch("prm_attention_bwd_dq_f32", cfg, &mut args)?;
    }
    Ok(())
}
