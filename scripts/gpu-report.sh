#!/usr/bin/env bash
# Side-by-side throughput on a GPU machine: `prm bench` against the same attack loop in PyTorch
# (tools/torch_prm.py), in one run, and a table with the ratios the throughput issue targets.
#
#   bash scripts/gpu-report.sh [PRM_BINARY] [OUT_DIR]
#
# PRM_BINARY defaults to target/release/prm (built here with cargo when missing). Each row's
# JSON goes to OUT_DIR (default target/gpu-report); the table goes to stdout. Rows run in order
# of importance; with DEADLINE (epoch seconds) set, a row that cannot start at least 20 s before
# it is skipped and every row's timeout ends at it (ROW_TIMEOUT caps each row, default 150 s;
# torch.compile gets 240 s); REPORT_ROWS=name,name,... runs only those rows (names as in
# OUT_DIR, e.g. prm-pgd-bf16,torch-pgd-eager-bf16,torch-pgd-compile). Workloads:
#   pgd    ViT-B/16, 224 px, 10 PGD steps, batch $BATCH (default 64): prm bf16 and fp32;
#          torch eager fp32, eager bf16 (autocast + SDPA), torch.compile
#   paper  ViT-B/16, 640x480, 250 AdamW steps, dynamic scale, all layers: prm bf16 at batch
#          $PAPER_BATCH (default 8), 32 and 1, prm fp32 at batch 1; torch fp32 at batch 1
#   A/B    prm bf16 with attention pinned (v3; v4 split 1, 2, and paired query blocks), with graphs
#          off, with attention v2, with staging off (bench and attack row), at batch 32 and
#          128 (where --batch-size auto's cap should be), at batch 1 with graphs on and off
#   L/14   prm bf16, ViT-L/14 at 224 px (257 tokens), batch 32
#   H/14   prm bf16 (attention v3, and v2), open_clip's ViT-H/14 shape at 224 px (heads 80 wide),
#          batch 16, beside torch eager bf16: the table's last rows
#   attack 480 images through `prm attack --profile` on cuda:0, again with PRM_NO_STAGING=1
#          (and cuda:all with several GPUs)
#   eval   `prm eval` of those images on cuda:0: maskclip with 150 classes (and with
#          PRM_HOST_LOGITS=1, the logits formed on the host), zeroshot (the default
#          --batch-size 32, and zeroshot at batch 1, the way it ran before 2026-12-06, and with
#          PRM_NO_STAGING=1, plain uploads and downloads)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PRM=${1:-target/release/prm}
OUT=${2:-target/gpu-report}
BATCH=${BATCH:-64}
PAPER_BATCH=${PAPER_BATCH:-8}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-0}
mkdir -p "$OUT"
if [[ ! -x $PRM ]]; then
  command -v cargo >/dev/null || { echo "no $PRM and no cargo: pass the prm binary" >&2; exit 2; }
  cargo build --release || exit 1
fi
# cuBLASLt from the pip wheels PyTorch brings, when the system has none on the loader path.
libs=$($PY -c 'import glob,os,site;print(":".join(sorted({os.path.dirname(f) for r in site.getsitepackages() for f in glob.glob(r+"/nvidia/*/lib/libcublasLt.so*")})))' 2>/dev/null)
[[ -n $libs ]] && export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# Seconds a row may run (0: do not start it).
row_time() { # cap
  local t=$1
  if [[ $DEADLINE -gt 0 ]]; then
    local l=$((DEADLINE - $(date +%s)))
    (( l < 20 )) && { echo 0; return; }
    (( l < t )) && t=$l
  fi
  echo "$t"
}
run() { # name, command...
  local name=$1; shift
  if [[ -n ${REPORT_ROWS:-} && ,$REPORT_ROWS, != *,$name,* ]]; then
    return  # not among the rows asked for
  fi
  local t
  t=$(row_time "$( [[ $name == *compile* ]] && echo 240 || echo "${ROW_TIMEOUT:-150}")")
  if [[ $t -eq 0 ]]; then
    echo "== $name: skipped (out of time)" >&2
    return
  fi
  echo "== $name (${t}s): $*" >&2
  if timeout "$t" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"; then
    tail -n 1 "$OUT/$name.json" >"$OUT/$name.tmp" && mv "$OUT/$name.tmp" "$OUT/$name.json"
  else
    echo "   failed (rc $?): see $OUT/$name.err" >&2
    rm -f "$OUT/$name.json"
  fi
}
B="$PRM bench --device cuda --json --model random:vit-b-16"
PAPER="--preset paper --image-size 640x480"
# The targets first: prm bf16 against torch eager bf16, torch.compile and the faithful paper loop.
run prm-pgd-bf16 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
run torch-pgd-eager-bf16 $PY tools/torch_prm.py --mode eager-bf16 --batch-size "$BATCH" --steps 10 --kernels "$OUT/torch-pgd-eager-bf16-kernels.json"
run prm-paper-bf16-b$PAPER_BATCH $B --precision bf16 $PAPER --batch-size "$PAPER_BATCH" --warmup 0 --repeats 1 --no-ceiling
run torch-paper-fp32-b1 $PY tools/torch_prm.py --mode paper --repeats 1 --warmup 1
run torch-pgd-compile $PY tools/torch_prm.py --mode compile --batch-size "$BATCH" --steps 10 --kernels "$OUT/torch-pgd-compile-kernels.json"
# Since 2026-12-05 afternoon the torch rows end an attack with its images in host memory, as
# prm bench does (before, torch's stayed on the GPU while prm's were read back and copied into
# per-image vectors). This row is the old definition, for continuity with earlier runs.
run torch-pgd-eager-bf16-ondevice $PY tools/torch_prm.py --mode eager-bf16 --batch-size "$BATCH" --steps 10 --deliver device
# Not yet measured (2026-12-06): PRM_PRODUCTS=timed, cuBLASLt's first 8 answers per kind of
# product timed on the device, the fastest of those with the first answer's bits kept (same
# bits as the default). Early, because if it wins it is the next default; the JSON's
# "product_tunings" has every timing. The paper row shows its cost under dynamic scale (a key
# per power of two of rows, each tuned once).
run prm-pgd-bf16-timedproducts env PRM_PRODUCTS=timed $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
run prm-paper-bf16-b$PAPER_BATCH-timedproducts env PRM_PRODUCTS=timed $B --precision bf16 $PAPER --batch-size "$PAPER_BATCH" --warmup 0 --repeats 1 --no-ceiling
# The default is PRM_ATTENTION=auto (since 2026-12-05: v3 and v4 and their options timed per
# shape, the fastest kept; the JSON's "attention" field has the timings). Pinned: v3 (the
# default until then, the kernels timed at fba7e63), and v4 (a head resident in shared memory;
# bit-identical to v3) with one and two CTAs a head.
run prm-pgd-bf16-attn-v3 env PRM_ATTENTION=v3 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
run prm-pgd-bf16-attn-v4 env PRM_ATTENTION=v4 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
run prm-pgd-bf16-attn-v4-split2 env PRM_ATTENTION=v4 PRM_ATTENTION_SPLIT=2 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
# v4 with each warp running two 16-row blocks at once (same bits).
run prm-pgd-bf16-attn-v4-pairs env PRM_ATTENTION=v4 PRM_ATTENTION_PAIRS=1 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
# Not yet measured: v3 with every tile through the masked code (the straight-line whole tiles
# off; same bits).
run prm-pgd-bf16-masked-tiles env PRM_ATTENTION=v3 PRM_ATTENTION_STRAIGHT=0 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
# Not yet measured: the prm loss as a pass of its own after each LN1 backward (fused by default;
# same bits).
run prm-pgd-bf16-unfused-loss env PRM_FUSED_LOSS=0 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
# Not yet measured: v3 with attention's delta by its own kernel (formed inside dQ by default;
# same bits).
run prm-pgd-bf16-delta-kernel env PRM_ATTENTION=v3 PRM_ATTENTION_DELTA_IN_DQ=0 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
# A/B rows: step graphs off, the previous tensor-core attention (v2); batch 1 shows the host
# cost graphs remove.
run prm-pgd-bf16-nographs $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5 --graphs off
run prm-pgd-bf16-attn-v2 env PRM_ATTENTION=v2 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
# The bench stages each attack's batch ahead (prm attack's steady state); this row uploads it.
run prm-pgd-bf16-nostaging env PRM_NO_STAGING=1 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
# Images/s against batch size (the pgd rows run 64): --batch-size auto caps a batch at 16,384
# tokens (src/gpu/engine/mod.rs, from an H100 run of 2026-11 where batch 128 ran slower than
# 64); these rows say where the curve stands now.
run prm-pgd-bf16-b32 $B --precision bf16 --batch-size 32 --steps 10 --repeats 5 --no-ceiling
run prm-pgd-bf16-b128 $B --precision bf16 --batch-size 128 --steps 10 --repeats 3 --no-ceiling
run prm-paper-bf16-b32 $B --precision bf16 $PAPER --batch-size 32 --warmup 0 --repeats 1 --no-ceiling
run prm-paper-bf16-b1 $B --precision bf16 $PAPER --batch-size 1 --repeats 2 --no-ceiling
run prm-pgd-fp32 $B --precision fp32 --batch-size "$BATCH" --steps 10 --repeats 3
run torch-pgd-eager-fp32 $PY tools/torch_prm.py --mode eager-fp32 --batch-size "$BATCH" --steps 10
run prm-pgd-bf16-b1 $B --precision bf16 --batch-size 1 --steps 10 --repeats 5 --no-ceiling
run prm-pgd-bf16-b1-nographs $B --precision bf16 --batch-size 1 --steps 10 --repeats 5 --no-ceiling --graphs off
run prm-paper-fp32-b1 $B --precision fp32 $PAPER --batch-size 1 --warmup 0 --repeats 1 --no-ceiling
# A loss over F_0..F_3 runs blocks 0..3 only, forward and backward (c62a942; every other row
# uses all 13 layers): against prm-pgd-bf16, the GPU's share of the 12 blocks it skips.
run prm-pgd-bf16-layers0-3 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5 --no-ceiling --layers 0,1,2,3
# Batch-invariant products (PRM_BATCH_INVARIANT=1, 2026-12-06, not yet run on a GPU): one
# cuBLASLt algorithm per kind of product, chosen at 16,384 rows without split-K, whatever the
# batch; what it costs at batch 64 and at batch 1 (where an algorithm chosen for 16,384 rows
# fits worst).
run prm-pgd-bf16-invariant env PRM_BATCH_INVARIANT=1 $B --precision bf16 --batch-size "$BATCH" --steps 10 --repeats 5
run prm-pgd-bf16-b1-invariant env PRM_BATCH_INVARIANT=1 $B --precision bf16 --batch-size 1 --steps 10 --repeats 5 --no-ceiling
# ViT-L/14 at 224 px: 257 tokens, v4's since 2026-12-05 (its auto lines say whether it pays).
run prm-pgd-bf16-vit-l-14 $PRM bench --device cuda --json --model random:vit-l-14 --precision bf16 --batch-size 32 --steps 10 --repeats 2 --no-ceiling
# open_clip's ViT-H/14 shape (16 heads of 80; 2026-12-06, not yet run on a GPU) beside torch
# eager bf16 + SDPA: attention v3 with bf16 q|k|v (the default since the evening of 2026-12-06),
# and v2 with fp32 q|k|v (the default before) for the A/B.
run prm-pgd-bf16-vit-h-14 $PRM bench --device cuda --json --model random:vit-h-14 --precision bf16 --batch-size 16 --steps 10 --repeats 2 --no-ceiling
run torch-pgd-eager-bf16-vit-h-14 $PY tools/torch_prm.py --mode eager-bf16 --arch vit-h-14 --batch-size 16 --steps 10 --repeats 2
run prm-pgd-bf16-vit-h-14-attn-v2 env PRM_ATTENTION=v2 $PRM bench --device cuda --json --model random:vit-h-14 --precision bf16 --batch-size 16 --steps 10 --repeats 2 --no-ceiling
# SigLIP so400m/14 at 384 px (2026-12-07, not yet run on a GPU): no class token (729 tokens, all
# patches), 16 heads of 72 (attention v3 at bf16), tanh GELU, an MLP of 4304; beside torch eager
# bf16 + SDPA on HF's SiglipVisionModel without its pooling head.
run prm-pgd-bf16-siglip-so400m $PRM bench --device cuda --json --model random:siglip-so400m-14-384 --image-size 384 --precision bf16 --batch-size 16 --steps 10 --repeats 2 --no-ceiling
run torch-pgd-eager-bf16-siglip-so400m $PY tools/torch_prm.py --mode eager-bf16 --arch siglip-so400m-14-384 --image-size 384 --batch-size 16 --steps 10 --repeats 2
# The embed loss through SigLIP's attention-pooling head (2026-12-07, not yet run on a GPU): the
# head runs on the host, so F_L comes down and its gradient goes up every step; beside the prm row
# above it says what that costs.
run prm-pgd-bf16-siglip-so400m-embed $PRM bench --device cuda --json --model random:siglip-so400m-14-384 --image-size 384 --precision bf16 --batch-size 16 --steps 10 --repeats 2 --no-ceiling --loss embed

$PY - "$OUT" "$BATCH" "$PAPER_BATCH" <<'PYEOF'
import json, os, sys
out, batch, pb = sys.argv[1], sys.argv[2], sys.argv[3]
def get(name):
    try:
        return json.load(open(os.path.join(out, name + ".json")))
    except Exception:
        return None
rows = [
    ("pgd", "prm bf16", "prm-pgd-bf16"), ("pgd", "prm fp32", "prm-pgd-fp32"),
    ("pgd", "torch eager fp32", "torch-pgd-eager-fp32"), ("pgd", "torch eager bf16+SDPA", "torch-pgd-eager-bf16"),
    ("pgd", "torch bf16, left on GPU", "torch-pgd-eager-bf16-ondevice"),
    ("pgd", "torch.compile bf16", "torch-pgd-compile"),
    ("pgd", "prm bf16 products timed", "prm-pgd-bf16-timedproducts"),
    ("pgd", "prm bf16 graphs off", "prm-pgd-bf16-nographs"), ("pgd", "prm bf16 attention v3", "prm-pgd-bf16-attn-v3"),
    ("pgd", "prm bf16 attention v4", "prm-pgd-bf16-attn-v4"),
    ("pgd", "prm bf16 v4 split 2", "prm-pgd-bf16-attn-v4-split2"), ("pgd", "prm bf16 v4 pairs", "prm-pgd-bf16-attn-v4-pairs"),
    ("pgd", "prm bf16 attention v2", "prm-pgd-bf16-attn-v2"),
    ("pgd", "prm bf16 masked tiles", "prm-pgd-bf16-masked-tiles"),
    ("pgd", "prm bf16 loss unfused", "prm-pgd-bf16-unfused-loss"),
    ("pgd", "prm bf16 delta kernel", "prm-pgd-bf16-delta-kernel"),
    ("pgd", "prm bf16 uploads unstaged", "prm-pgd-bf16-nostaging"),
    ("pgd", "prm bf16 b32", "prm-pgd-bf16-b32"), ("pgd", "prm bf16 b128", "prm-pgd-bf16-b128"),
    ("pgd", "prm bf16 b1", "prm-pgd-bf16-b1"), ("pgd", "prm bf16 b1 graphs off", "prm-pgd-bf16-b1-nographs"),
    ("pgd", "prm bf16 layers 0..3", "prm-pgd-bf16-layers0-3"),
    ("pgd", "prm bf16 batch-invariant", "prm-pgd-bf16-invariant"),
    ("pgd", "prm bf16 b1 batch-invariant", "prm-pgd-bf16-b1-invariant"),
    ("paper", "prm bf16 b1", "prm-paper-bf16-b1"), ("paper", f"prm bf16 b{pb}", f"prm-paper-bf16-b{pb}"),
    ("paper", f"prm bf16 b{pb} products timed", f"prm-paper-bf16-b{pb}-timedproducts"),
    ("paper", "prm bf16 b32", "prm-paper-bf16-b32"),
    ("paper", "prm fp32 b1", "prm-paper-fp32-b1"), ("paper", "torch fp32 b1", "torch-paper-fp32-b1"),
    ("pgd L/14", "prm bf16 b32", "prm-pgd-bf16-vit-l-14"),
    ("pgd H/14", "prm bf16 b16", "prm-pgd-bf16-vit-h-14"),
    ("pgd H/14", "torch eager bf16 b16", "torch-pgd-eager-bf16-vit-h-14"),
    ("pgd H/14", "prm bf16 b16 attention v2", "prm-pgd-bf16-vit-h-14-attn-v2"),
    ("pgd SigLIP", "prm bf16 b16 384px", "prm-pgd-bf16-siglip-so400m"),
    ("pgd SigLIP", "torch eager bf16 b16", "torch-pgd-eager-bf16-siglip-so400m"),
    ("pgd SigLIP", "prm bf16 b16 --loss embed", "prm-pgd-bf16-siglip-so400m-embed"),
]
dev = next((r["device"] for _, _, n in rows if (r := get(n))), "?")
print(f"device: {dev}")
print(f"{'workload':8} {'engine':24} {'images/s':>10} {'img-steps/s':>12} {'TFLOP/s':>8} {'of ceiling':>10} {'peak GiB':>9}")
for w, label, name in rows:
    r = get(name)
    if not r:
        print(f"{w:8} {label:24} {'failed':>10}"); continue
    frac = r.get("ceiling_fraction")
    peak = r.get("peak_memory_bytes")
    print(f"{w:8} {label:24} {r['images_per_s']:10.2f} {r['image_steps_per_s']:12.1f} {r['tflops']:8.1f} "
          f"{(f'{100*frac:.1f}%' if frac else '-'):>10} {(f'{peak/2**30:.2f}' if peak else '-'):>9}")
def ratio(a, b):
    ra, rb = get(a), get(b)
    return ra["images_per_s"] / rb["images_per_s"] if ra and rb else float("nan")
print()
print(f"pgd   prm bf16 / torch eager bf16      {ratio('prm-pgd-bf16', 'torch-pgd-eager-bf16'):6.2f}x   (target >= 2)")
print(f"pgd   prm bf16 / torch.compile          {ratio('prm-pgd-bf16', 'torch-pgd-compile'):6.2f}x   (target >= 1.3)")
print(f"pgd   prm bf16 / torch eager bf16 with its images left on the GPU (the definition before 2026-12-05): "
      f"{ratio('prm-pgd-bf16', 'torch-pgd-eager-bf16-ondevice'):.2f}x; torch delivered / on the GPU "
      f"{ratio('torch-pgd-eager-bf16', 'torch-pgd-eager-bf16-ondevice'):.3f}x")
if not get("prm-pgd-bf16") and get("prm-pgd-bf16-attn-v3"):
    # The default (attention auto) failed: the pinned-v3 row still gives the session a figure.
    print("pgd   THE DEFAULT ROW FAILED (see prm-pgd-bf16.err); with attention pinned to v3:")
    print(f"pgd   prm bf16 v3 / torch eager bf16   {ratio('prm-pgd-bf16-attn-v3', 'torch-pgd-eager-bf16'):6.2f}x")
    print(f"pgd   prm bf16 v3 / torch.compile       {ratio('prm-pgd-bf16-attn-v3', 'torch-pgd-compile'):6.2f}x")
print(f"pgd   products timed / heuristic       {ratio('prm-pgd-bf16-timedproducts', 'prm-pgd-bf16'):6.2f}x (batch {batch}) "
      f"{ratio(f'prm-paper-bf16-b{pb}-timedproducts', f'prm-paper-bf16-b{pb}'):6.2f}x (paper b{pb})")
print(f"pgd   graphs on / off (batch {batch})      {ratio('prm-pgd-bf16', 'prm-pgd-bf16-nographs'):6.2f}x")
print(f"pgd   graphs on / off (batch 1)        {ratio('prm-pgd-bf16-b1', 'prm-pgd-bf16-b1-nographs'):6.2f}x")
print(f"pgd   batch 32 / 64, 128 / 64          {ratio('prm-pgd-bf16-b32', 'prm-pgd-bf16'):6.2f}x {ratio('prm-pgd-bf16-b128', 'prm-pgd-bf16'):6.2f}x")
print(f"pgd   attention auto / v3              {ratio('prm-pgd-bf16', 'prm-pgd-bf16-attn-v3'):6.2f}x")
print(f"pgd   H/14 prm bf16 / torch eager bf16 {ratio('prm-pgd-bf16-vit-h-14', 'torch-pgd-eager-bf16-vit-h-14'):6.2f}x (attention v3)")
print(f"pgd   H/14 attention v3 / v2           {ratio('prm-pgd-bf16-vit-h-14', 'prm-pgd-bf16-vit-h-14-attn-v2'):6.2f}x")
print(f"pgd   SigLIP so400m prm / torch eager  {ratio('prm-pgd-bf16-siglip-so400m', 'torch-pgd-eager-bf16-siglip-so400m'):6.2f}x (bf16, 384 px)")
print(f"pgd   SigLIP so400m embed / prm loss   {ratio('prm-pgd-bf16-siglip-so400m-embed', 'prm-pgd-bf16-siglip-so400m'):6.2f}x (the host-side pooling head)")
print(f"pgd   attention v4 / v3                {ratio('prm-pgd-bf16-attn-v4', 'prm-pgd-bf16-attn-v3'):6.2f}x")
print(f"pgd   v4 split 2 / split 1             {ratio('prm-pgd-bf16-attn-v4-split2', 'prm-pgd-bf16-attn-v4'):6.2f}x")
print(f"pgd   v4 pairs / single blocks         {ratio('prm-pgd-bf16-attn-v4-pairs', 'prm-pgd-bf16-attn-v4'):6.2f}x")
print(f"pgd   straight / masked tiles (v3)     {ratio('prm-pgd-bf16-attn-v3', 'prm-pgd-bf16-masked-tiles'):6.2f}x")
print(f"pgd   loss fused / unfused             {ratio('prm-pgd-bf16', 'prm-pgd-bf16-unfused-loss'):6.2f}x")
print(f"pgd   delta in dQ / delta kernel (v3)  {ratio('prm-pgd-bf16-attn-v3', 'prm-pgd-bf16-delta-kernel'):6.2f}x")
print(f"pgd   attention v3 / v2                {ratio('prm-pgd-bf16-attn-v3', 'prm-pgd-bf16-attn-v2'):6.2f}x")
print(f"pgd   staged / plain uploads           {ratio('prm-pgd-bf16', 'prm-pgd-bf16-nostaging'):6.2f}x")
print(f"pgd   layers 0..3 / all layers         {ratio('prm-pgd-bf16-layers0-3', 'prm-pgd-bf16'):6.2f}x")
print(f"pgd   batch-invariant / by size        {ratio('prm-pgd-bf16-invariant', 'prm-pgd-bf16'):6.2f}x (batch {batch}) "
      f"{ratio('prm-pgd-bf16-b1-invariant', 'prm-pgd-bf16-b1'):6.2f}x (batch 1)")
for name in ("prm-pgd-bf16", "prm-paper-bf16-b1", f"prm-paper-bf16-b{pb}", "prm-pgd-bf16-vit-l-14"):
    # What PRM_ATTENTION=auto timed (µs a call) and chose, per pass and shape.
    for t in ((get(name) or {}).get("attention") or {}).get("tuned", []):
        times = ", ".join(f"{c['kernels']} {c['us_per_call']:.1f}" if c["us_per_call"] is not None
                          else f"{c['kernels']} dropped" for c in t["candidates"])
        print(f"{name}: auto {t['pass']} on {t['timed_on']['sequences']} x {t['timed_on']['longest']} tokens: "
              f"{t['chosen']} ({times}; tuned in {1e3 * t.get('tuning_seconds', float('nan')):.1f} ms)")
        for d in t["dropped"]:
            print(f"{name}: DROPPED {d}")
for name in ("prm-pgd-bf16-timedproducts", f"prm-paper-bf16-b{pb}-timedproducts"):
    # What PRM_PRODUCTS=timed timed (µs a call, in cuBLASLt's order) and kept, per product key.
    for t in (get(name) or {}).get("product_tunings") or []:
        times = ", ".join(f"{c:.1f}" if isinstance(c, (int, float)) else c for c in t["candidates_us"])
        print(f"{name}: m={t['m']} n={t['n']} k={t['k']} {t['types']}{' +C' if t['accumulate'] else ''}"
              f"{' bias' if t['bias'] else ''}: answer {t['chosen'] + 1} ({times}; {1e3 * t['seconds']:.1f} ms)")
r = get("prm-pgd-bf16")
if r and r.get("ceiling_fraction"):
    print(f"pgd   prm bf16 fraction of GEMM ceiling {100*r['ceiling_fraction']:6.1f}%   (target >= 50%)")
paper_rows = [(get(n)["images_per_s"], n) for n in ("prm-paper-bf16-b1", f"prm-paper-bf16-b{pb}", "prm-paper-bf16-b32") if get(n)]
best = max(paper_rows) if paper_rows else (float("nan"), "-")
t = get("torch-paper-fp32-b1")
if t:
    print(f"paper {best[1]} / torch fp32 b1   {best[0] / t['images_per_s']:6.2f}x   (target >= 10)")
    print(f"paper prm fp32 b1 / torch fp32 b1       {ratio('prm-paper-fp32-b1', 'torch-paper-fp32-b1'):6.2f}x")
PYEOF

# Whole-dataset attack: does the GPU wait for I/O (--profile), and does --device cuda:all scale?
# 480 inputs (96 copies of the 5 samples under distinct names: every draw is per image), so
# that several batches follow the first (which pays the warm-up: heuristics, graph captures) and
# the later ones show the steady state in --profile's per-batch phases.
DATA=$OUT/attack-inputs
if [[ ! -d $DATA ]]; then
  mkdir -p "$DATA"
  for i in $(seq -w 1 96); do for f in samples/*.png samples/*.jpg; do
    b=$(basename "$f"); cp "$f" "$DATA/$i-$b"; done; done
fi
attack() { # name, device, [env assignments...]
  local name=$1 dev=$2; shift 2
  [[ -n ${REPORT_ROWS:-} && ,$REPORT_ROWS, != *,$name,* ]] && return
  local t
  t=$(row_time "${ROW_TIMEOUT:-150}")
  if [[ $t -eq 0 ]]; then
    echo "$name: skipped (out of time)"
    return
  fi
  rm -rf "$OUT/$name-out"
  echo "== $name (${t}s): prm attack --device $dev" >&2
  env "$@" timeout "$t" "$PRM" attack --model random:vit-b-16 --input "$DATA" \
    --output "$OUT/$name-out" --preset pgd --resolution 224 --precision bf16 --batch-size auto \
    --device "$dev" --profile "$OUT/$name-profile.json" >"$OUT/$name.log" 2>&1 \
    || echo "   failed: see $OUT/$name.log" >&2
  grep -E "images/s|waited|busy|steady|staged|by phase" "$OUT/$name.log" | sed "s/^/$name: /"
}
echo
attack attack-cuda0 cuda:0
# Uploads staged on a second stream (2026-11-25, unmeasured when it landed) against none.
attack attack-cuda0-nostaging cuda:0 PRM_NO_STAGING=1
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [[ $gpus -gt 1 ]]; then
  attack attack-cuda-all cuda:all
else
  echo "one GPU: --device cuda:all scaling not measured"
fi


# prm eval on attack-cuda0's outputs (the 480 inputs and their adversarial images): a
# segmentation target with 150 classes (ADE20K's count) and a classification target, ViT-B/16 at
# native size. The host's reading, label maps and metrics overlap the device since 2026-12-05;
# since 2026-12-06 the device runs 32 pairs' images as one batch (eval-zeroshot-b1: one image
# at a time, as before). The stderr line gives pairs/s after the set-up (model, class embeddings),
# the engine's busy time (the device) and its time waiting for a batch, the batches' wait for the
# reading, and the finisher's busy time (label maps, metrics, files): which stage holds eval
# back. The `device passes` line says how many passes took pixels staged during the pass before.
# Since the night of 2026-12-06 eval's attention at bf16 runs on tensor cores (v2), not the fp32
# SIMT kernels (v1): the engine's busy time shows it.
CLASSES150=$OUT/classes150.txt
evaluate() { # name, target, [prm eval options...]
  local name=$1 target=$2 adv=$OUT/attack-cuda0-out
  shift 2
  [[ -n ${REPORT_ROWS:-} && ,$REPORT_ROWS, != *,$name,* ]] && return
  if [[ ! -f $adv/manifest.jsonl ]]; then
    echo "$name: skipped (no attack-cuda0 outputs)"
    return
  fi
  local t
  t=$(row_time "${ROW_TIMEOUT:-150}")
  if [[ $t -eq 0 ]]; then
    echo "$name: skipped (out of time)"
    return
  fi
  [[ -f $CLASSES150 ]] || for i in $(seq 1 150); do echo "class $i"; done >"$CLASSES150"
  local device=${EVAL_DEVICE:-cuda:0}
  local classes=(--classes "$CLASSES150" --single-template)
  [[ $target == features ]] && classes=()
  echo "== $name (${t}s): prm eval --target $target --device $device $*" >&2
  timeout "$t" "$PRM" eval --model random:vit-b-16 --target "$target" "${classes[@]}" \
    --clean "$DATA" --adv "$adv" --device "$device" --precision bf16 \
    --report "$OUT/$name.json" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [[ $rc -gt 1 ]] && echo "   failed (exit $rc): see $OUT/$name.log" >&2
  grep -E "^(evaluated|device passes)" "$OUT/$name.log" | sed "s/^/$name: /"
}
echo
evaluate eval-maskclip maskclip
evaluate eval-zeroshot zeroshot
# Since 2026-12-06 (session from 07:29) the cosine logits are formed on the device
# (kernels/class_logits.cu): this row brings the embeddings back and forms them on the host, as
# before (the same bits; compare its pairs/s and the finisher's busy time with eval-maskclip's).
PRM_HOST_LOGITS=1 evaluate eval-maskclip-hostlogits maskclip
# Since 2026-12-06 the drift's per-token sums are computed on the device (kernels/drift.cu)
# instead of every layer's features coming back.
evaluate eval-features features
evaluate eval-zeroshot-b1 zeroshot --batch-size 1
# Since 2026-12-06 (e5419bf) each pass's pixels are staged on a copy stream during the pass
# before and results come back through pinned memory: this row uploads and downloads plainly.
PRM_NO_STAGING=1 evaluate eval-zeroshot-nostaging zeroshot
# One engine per GPU (2026-12-06), where there are several.
[[ $gpus -gt 1 ]] && EVAL_DEVICE=cuda:all evaluate eval-zeroshot-cuda-all zeroshot
# Does a prediction depend on the batch? (cuBLASLt by size; the simulator's never do.)
if [[ -f $OUT/eval-zeroshot.json && -f $OUT/eval-zeroshot-b1.json ]]; then
  $PY - "$OUT/eval-zeroshot.json" "$OUT/eval-zeroshot-b1.json" <<'PY'
import json, sys
a, b = (json.load(open(p))["per_image"] for p in sys.argv[1:3])
differ = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
print(f"eval-batching: {differ} of {max(len(a), len(b))} zeroshot records differ between batch 32 and 1")
PY
fi

# Do an image's results depend on its batch? The 5 samples attacked (pgd, bf16, 224 px, float
# images saved) in one batch of 5 and one image at a time, with cuBLASLt's algorithms by size
# (the default) and batch-invariant (PRM_BATCH_INVARIANT=1): how many of the 5 float images
# differ between the two batchings. tests/engine_sim.rs asserts none for batch-invariant.
batching() { # name, [env assignments...]
  local name=$1; shift
  [[ -n ${REPORT_ROWS:-} && ,$REPORT_ROWS, != *,$name,* ]] && return
  local t
  t=$(row_time 60)
  if [[ $t -eq 0 ]]; then
    echo "$name: skipped (out of time)"
    return
  fi
  echo "== $name (${t}s): prm attack --batch-size 5 and 1" >&2
  local b ok=1
  for b in 5 1; do
    rm -rf "$OUT/$name-b$b"
    env "$@" timeout "$t" "$PRM" attack --model random:vit-b-16 --input samples \
      --output "$OUT/$name-b$b" --preset pgd --resolution 224 --precision bf16 --save-float \
      --batch-size $b --device cuda:0 --quiet >"$OUT/$name-b$b.log" 2>&1 || ok=0
  done
  if [[ $ok -eq 0 ]]; then
    echo "$name: failed (see $OUT/$name-b*.log)"
    return
  fi
  local differ=0 n=0 f
  for f in "$OUT/$name-b5"/*.safetensors; do
    n=$((n + 1))
    cmp -s "$f" "$OUT/$name-b1/$(basename "$f")" || differ=$((differ + 1))
  done
  echo "$name: $differ of $n float images differ between batch 5 and batch 1"
}
echo
batching batching-by-size
batching batching-invariant PRM_BATCH_INVARIANT=1
