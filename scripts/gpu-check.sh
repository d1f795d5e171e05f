#!/usr/bin/env bash
# The GPU machine's one command: every bundled test against the real device, `prm attack
# --device cuda` on the samples, device timelines of six bench attacks and of a `prm attack`
# run (`--timeline`, `--device-timeline`: kernel time in place and the idle gaps between
# kernels), the benchmark report against PyTorch (scripts/gpu-report.sh), prm's pgd attack set
# beside PyTorch's by kind of work (tools/kernel_groups.py on the timelines and the torch rows'
# kernel tables), the attention kernels' occupancy and stall reasons and a per-kernel profile
# of one pgd step (Nsight Compute), inside a time budget, then one table. Lent GPU time is
# short (15 minutes a session, machine start included), so sections run in order of what
# matters and each gets at most what is left of the budget.
#
#   With cargo:         bash scripts/gpu-check.sh               (builds the bundle first)
#   Without Rust:       bash scripts/gpu-check.sh --bundle target/gpu-bundle
#                       (bundle from scripts/gpu-bundle.sh, in a copy of this checkout)
#   Options:            --budget SECONDS   whole run (default 480)
#                       --only LIST        comma-separated sections:
#                                          tests,attack,timeline,report,profile,stalls
#                                          (stalls: the attention stall table without
#                                          the per-kernel profile)
#                       --out DIR          where summary.txt and gpu-check-logs.tar.gz go
#                                          (default $OUT when set, else target/gpu-check)
# Extra arguments after `--` are test name filters: only tests whose names contain every one
# run (whole executables other than the integration tests get them as they are).
# Environment: TEST_BINARIES=name,name,... runs only those test groups (modules of
# tests/integration.rs, i.e. files of tests/) and bundled executables;
# REPORT_ROWS=row,row,... only those rows of scripts/gpu-report.sh (a short recheck).
#
# cuBLASLt is loaded at run time: libcublasLt.so.{13,12} must be findable; the folder of a
# pip-installed PyTorch / nvidia-cublas wheel or /usr/local/cuda is added to LD_LIBRARY_PATH.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
START=$(date +%s)

BUNDLE="" BUDGET=480 ONLY="tests,attack,timeline,report,profile" DEST=${OUT:-$ROOT/target/gpu-check}
TEST_ARGS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --bundle) BUNDLE=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --out) DEST=$2; shift 2 ;;
    --) shift; TEST_ARGS=("$@"); break ;;
    *) echo "usage: $0 [--bundle DIR] [--budget SECONDS] [--only tests,attack,timeline,report,profile,stalls] [--out DIR] [-- TEST_ARGS]" >&2; exit 2 ;;
  esac
done
want() { [[ ,$ONLY, == *,$1,* ]]; }
DEADLINE=$((START + BUDGET))
left() { echo $((DEADLINE - $(date +%s))); }
# Seconds a section may take: what is left, less what later sections reserve (at most half of
# what is left: earlier sections matter more), capped.
allow() { # cap reserve
  local now_left r
  now_left=$(left)
  r=$2
  (( r > now_left / 2 )) && r=$((now_left / 2))
  local l=$((now_left - r))
  (( l > $1 )) && l=$1
  echo $l
}
# What the sections after the tests need at least: attack 30 s, timeline 60 s, report 150 s,
# profile 170 s (the attention stall table of three versions, then the pgd profile).
after_tests=0
want attack && after_tests=$((after_tests + 30))
want timeline && after_tests=$((after_tests + 60))
want report && after_tests=$((after_tests + 150))
want profile && after_tests=$((after_tests + 170))
want stalls && ! want profile && after_tests=$((after_tests + 60))

if [[ -z $BUNDLE ]]; then
  if command -v cargo >/dev/null; then
    echo "== cargo found: building the bundle"
    bash "$HERE/gpu-bundle.sh" || exit 1
    BUNDLE=$ROOT/target/gpu-bundle
  else
    echo "no --bundle and no cargo: build one with scripts/gpu-bundle.sh" >&2
    exit 2
  fi
fi
BUNDLE=$(cd "$BUNDLE" && pwd) || exit 2
[[ -f $BUNDLE/paths.env ]] || { echo "error: $BUNDLE/paths.env missing: not a bundle" >&2; exit 2; }
# shellcheck disable=SC1091
source "$BUNDLE/paths.env"
mkdir -p "$DEST"
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$LOGS"

{
  echo "== machine ($(date -u +%Y-%m-%dT%H:%MZ), bundle commit ${COMMIT:-?})"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
  python3 -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo "no PyTorch"
} | tee "$LOGS/machine.txt"

# The test binaries read fixtures through the absolute path of the checkout they were built in,
# and find prm at the absolute path it was built at: link both to this checkout and bundle.
link_path() { # target link
  local target=$1 link=$2
  [[ $(cd "$target" 2>/dev/null && pwd) == "$link" ]] && return 0
  [[ -e $link || -L $link ]] && return 0
  if mkdir -p "$(dirname "$link")" 2>/dev/null && ln -s "$target" "$link" 2>/dev/null; then
    echo "linked $link -> $target"
  else
    echo "warning: could not create $link; tests reading fixtures may fail" >&2
  fi
}
link_path "$ROOT" "$MANIFEST_DIR"
link_path "$BUNDLE/prm" "$PRM_EXE"

# cuBLASLt for the products.
extra_libs=()
while IFS= read -r d; do [[ -n $d ]] && extra_libs+=("$d"); done < <(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
dirs = set()
for r in roots:
    for pat in ("nvidia/*/lib/libcublasLt.so*", "nvidia/cu*/lib/libcublasLt.so*", "torch/lib/libcublasLt.so*"):
        for f in glob.glob(os.path.join(r, pat)):
            dirs.add(os.path.dirname(f))
print("\n".join(sorted(dirs)))
PY
)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  compgen -G "$d/libcublasLt.so*" >/dev/null && extra_libs+=("$d")
done
if [[ ${#extra_libs[@]} -gt 0 ]]; then
  LD_LIBRARY_PATH=$(IFS=:; echo "${extra_libs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export LD_LIBRARY_PATH
else
  echo "warning: libcublasLt not found (products will fail); install nvidia-cublas or set LD_LIBRARY_PATH" >&2
fi

# The kernel tests' reverse-schedule simulator runs (a race check) are CI's job: here the
# minutes are for CUDA (tests/common/kernel.rs).
export PRM_TEST_SIM_SCHEDULES=forward

failed=0
rows=()
row() { rows+=("$(printf '%-26s %-10s %-9s %7ss  %s' "$@")"); }

# ---------------------------------------------------------------- tests
if want tests; then
  echo "== tests (every bundled test group; CUDA and simulator paths)"
  # run_tests ROW_NAME EXECUTABLE [ARGS...]: one row of the table.
  run_tests() {
    local name=$1 exe=$2 secs_allowed s rc secs skipped summary status
    shift 2
    secs_allowed=$(allow 240 $after_tests)
    if (( secs_allowed < 10 )); then row "$name" "skipped" "-" 0 "out of time"; return; fi
    s=$(date +%s.%N)
    (cd "$ROOT" && timeout "$secs_allowed" "$exe" --nocapture "$@") >"$LOGS/test-$name.log" 2>&1
    rc=$?
    secs=$(awk -v s="$s" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')
    skipped=$(grep -c "skipped: no" "$LOGS/test-$name.log")
    summary=$(grep -E "^test result:" "$LOGS/test-$name.log" | tail -n 1 | sed 's/^test result: //; s/; finished.*//; s/ 0 ignored; 0 measured;//')
    if [[ $rc -eq 0 ]]; then status=pass; else status="FAIL($rc)"; failed=$((failed + 1)); fi
    [[ $rc -eq 124 ]] && summary="timed out after ${secs_allowed}s"
    row "$name" "$status" "skips=$skipped" "$secs" "$summary"
    [[ $rc -ne 0 ]] && grep -E "panicked|FAILED|error" "$LOGS/test-$name.log" | head -n 5 | sed "s/^/   $name: /"
  }
  # The integration executable holds every file of tests/ as a module; each listed module is
  # one row, run by its tests' exact names (a plain filter `cli::` would also run eval_cli's).
  integration=$BUNDLE/tests/integration
  if [[ ! -x $integration ]]; then
    # A bundle from before the files of tests/ were one executable's modules.
    row "integration" "FAIL" "-" 0 "not in the bundle: rebuild it with scripts/gpu-bundle.sh"
    failed=$((failed + 1))
  else
    all_names=$("$integration" --list --format terse 2>/dev/null | sed -n 's/: test$//p')
    while IFS= read -r group; do
      [[ -z $group ]] && continue
      [[ -n ${TEST_BINARIES:-} && ,$TEST_BINARIES, != *,$group,* ]] && continue
      names=$(grep "^$group::" <<<"$all_names")
      for filter in "${TEST_ARGS[@]}"; do names=$(grep -F -- "$filter" <<<"$names"); done
      if [[ -z $names ]]; then
        # A group the filters leave empty is no row; one empty without filters is a bundle
        # fault.
        [[ ${#TEST_ARGS[@]} -gt 0 ]] && continue
        row "$group" "FAIL" "-" 0 "no tests of this group in the executable"
        failed=$((failed + 1))
        continue
      fi
      # shellcheck disable=SC2086 # test names have no spaces
      run_tests "$group" "$integration" --exact $names
    done <"$BUNDLE/test-groups.txt"
  fi
  # Any other bundled executable (ALL_TESTS=1: unit tests, tests/sim.rs) runs whole.
  for t in "$BUNDLE"/tests/*; do
    [[ -e $t ]] || continue # an empty folder: the glob itself
    name=$(basename "$t")
    [[ $name == integration ]] && continue
    [[ -n ${TEST_BINARIES:-} && ,$TEST_BINARIES, != *,$name,* ]] && continue
    run_tests "$name" "$t" "${TEST_ARGS[@]}"
  done
fi

# ---------------------------------------------------------------- attention v4 smoke run
# The bf16 engine's default, PRM_ATTENTION=auto, times attention v4 on its first call, and v4
# has not run on a GPU before 2026-12-05's bundle. Should it fault (which ends the CUDA
# context, so the bit check cannot drop it), every later section's default rows would fail:
# one short v4 attack first, then with paired blocks (PRM_ATTENTION_PAIRS=1, new in
# 2026-12-05's second bundle) at 197 tokens (v4's) and at 640x480 (1,201 tokens: v3's paired
# forward and backward, which v4 runs past 512 tokens), then v3's paired kernels at 197 tokens
# (auto tries them there too); on failure the rest of the check pins v3 (the rows that pin v4
# still show the failure). Skipped when the caller set PRM_ATTENTION.
if [[ -z ${PRM_ATTENTION:-} ]] && { want attack || want timeline || want report; }; then
  s=$(date +%s.%N)
  smoke() { # version (v3 or v4), pairs (0 or 1), more prm bench arguments...
    local version=$1 pairs=$2; shift 2
    (cd "$ROOT" && PRM_ATTENTION=$version PRM_ATTENTION_PAIRS=$pairs timeout "$(allow 30 $after_tests)" "$BUNDLE/prm" bench \
      --device cuda --model random:vit-b-16 --precision bf16 --batch-size 4 --steps 1 --warmup 0 --repeats 1 \
      --no-ceiling "$@")
  }
  { smoke v4 0 && smoke v4 1 && smoke v4 1 --preset paper --image-size 640x480 && smoke v3 1; } \
    >"$LOGS/attention-v4-smoke.log" 2>&1
  rc=$?
  secs=$(awk -v s="$s" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')
  if [[ $rc -eq 0 ]]; then
    row "attention v4 smoke run" pass "-" "$secs" "PRM_ATTENTION=auto (the default) for the rest"
  else
    failed=$((failed + 1))
    export PRM_ATTENTION=v3
    row "attention v4 smoke run" "FAIL($rc)" "-" "$secs" "PRM_ATTENTION=v3 pinned for the rest (see attention-v4-smoke.log)"
    tail -n 3 "$LOGS/attention-v4-smoke.log" | sed "s/^/   attention v4: /"
  fi
fi

# ---------------------------------------------------------------- attack on the samples
if want attack; then
  echo "== prm attack --device cuda (samples)"
  out=$(mktemp -d)
  s=$(date +%s.%N)
  (cd "$ROOT" && timeout "$(allow 90 $((after_tests - 30)))" "$BUNDLE/prm" attack --model random:vit-b-16 --input samples \
    --output "$out" --preset pgd --device cuda) >"$LOGS/prm-attack.log" 2>&1
  rc=$?
  secs=$(awk -v s="$s" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')
  if [[ $rc -eq 0 ]]; then status=pass; else status="FAIL($rc)"; failed=$((failed + 1)); fi
  row "prm attack --device cuda" "$status" "-" "$secs" "$(ls "$out" | wc -l) files; $(tail -n 1 "$LOGS/prm-attack.log" | cut -c1-80)"
  rm -rf "$out"
fi

# ---------------------------------------------------------------- device timelines
# One attack each, every operation stamped with events on the device (src/gpu/timeline.rs):
# kernel and product time where they really run, and how long the GPU sat idle between them.
if want timeline; then
  echo "== timelines (prm bench --timeline; $(left) s left)"
  : >"$LOGS/timeline.txt"
  timeline_run() { # tag title prm-bench-args...   (trace: logs/timeline-TAG.json, for Perfetto)
    local tag=$1 title=$2; shift 2
    local secs_allowed reserve=$((after_tests - 90))
    (( reserve < 0 )) && reserve=0
    secs_allowed=$(allow 40 $reserve)
    if (( secs_allowed < 10 )); then echo "$title: out of time" >>"$LOGS/timeline.txt"; return; fi
    local log="$LOGS/timeline-$tag.txt" rc
    (cd "$ROOT" && timeout "$secs_allowed" "$BUNDLE/prm" bench --device cuda --model random:vit-b-16 \
      --precision bf16 --warmup 1 --repeats 1 --no-ceiling --timeline "$LOGS/timeline-$tag.json" "$@") \
      >"$log" 2>&1
    rc=$?
    { echo "$title"; grep -v "^note" "$log"; echo; } >>"$LOGS/timeline.txt"
    if [[ $rc -ne 0 ]]; then
      failed=$((failed + 1))
      echo "$title: FAILED ($rc)" >>"$LOGS/timeline.txt"
    fi
  }
  # Graphs off with attention pinned to v3 (the kernels of fba7e63's timeline), then the
  # default (PRM_ATTENTION=auto: tuned during the warm-up attack; the rows name the kernels it
  # chose) with graphs on, and with graphs off (every kernel its own row; v4 pinned is a report
  # row, and the tuning lines time every candidate).
  PRM_ATTENTION=v3 timeline_run pgd-direct "pgd: batch 64, 224 px, 10 steps, graphs off, attention v3" \
    --batch-size 64 --steps 10 --graphs off
  timeline_run pgd-graphs "pgd: batch 64, 224 px, 10 steps, graphs on, attention auto" --batch-size 64 --steps 10 --graphs on
  timeline_run pgd-auto "pgd: batch 64, 224 px, 10 steps, graphs off, attention auto" \
    --batch-size 64 --steps 10 --graphs off
  timeline_run paper-b1 "paper: batch 1, 640x480, 20 AdamW steps, dynamic scale" --preset paper \
    --image-size 640x480 --batch-size 1 --steps 20
  # The user's path: `prm attack` over 160 copies of the samples (two batches at auto size, the
  # second in steady state), graphs on as users run it; the whole run stamped, so the per-batch
  # warm-up, the resizes from the native sizes, the saving on the device and the host's gaps
  # show beside the steps (a replayed step is one row).
  title="user path: prm attack, 160 samples at native size -> 224 px, pgd, bf16, batch auto"
  reserve=$((after_tests - 90)); (( reserve < 0 )) && reserve=0
  secs_allowed=$(allow 40 $reserve)
  if (( secs_allowed < 15 )); then
    echo "$title: out of time" >>"$LOGS/timeline.txt"
  else
    inputs=$(mktemp -d)
    for i in $(seq -w 1 32); do for f in "$ROOT"/samples/*.png "$ROOT"/samples/*.jpg; do
      cp "$f" "$inputs/$i-$(basename "$f")"; done; done
    (cd "$ROOT" && timeout "$secs_allowed" "$BUNDLE/prm" attack --model random:vit-b-16 \
      --input "$inputs" --output "$inputs.out" --preset pgd --resolution 224 --precision bf16 \
      --batch-size auto --device cuda:0 --quiet --profile \
      --device-timeline "$LOGS/timeline-attack.json") >"$LOGS/timeline-attack.txt" 2>&1
    rc=$?
    { echo "$title"; cat "$LOGS/timeline-attack.txt"; echo; } >>"$LOGS/timeline.txt"
    if [[ $rc -ne 0 ]]; then
      failed=$((failed + 1))
      echo "$title: FAILED ($rc)" >>"$LOGS/timeline.txt"
    fi
    rm -rf "$inputs" "$inputs.out"
  fi
  # Paper batch 8 against batch 32 (fba7e63: 1.72 against 1.23 images/s; per image, batch 32
  # ran 40% slower). Per-kernel µs per token says whether the memory-bound kernels lose their
  # L2 hits at the larger batch; the idle gaps say whether the host or allocations stall it.
  timeline_run paper-b8 "paper: batch 8, 640x480, 10 AdamW steps, dynamic scale" --preset paper \
    --image-size 640x480 --batch-size 8 --steps 10
  timeline_run paper-b32 "paper: batch 32, 640x480, 10 AdamW steps, dynamic scale" --preset paper \
    --image-size 640x480 --batch-size 32 --steps 10
fi

# ---------------------------------------------------------------- benchmark report
if want report; then
  echo "== report (scripts/gpu-report.sh; $(left) s left)"
  reserve=0; want stalls && reserve=60; want profile && reserve=170
  DEADLINE=$(( $(date +%s) + $(allow 100000 $reserve) )) bash "$ROOT/scripts/gpu-report.sh" "$BUNDLE/prm" "$WORK/report" \
    >"$LOGS/report.txt" 2>"$LOGS/report.err"
  cp "$WORK"/report/*.json "$WORK"/report/*.err "$LOGS/" 2>/dev/null
fi

# ---------------------------------------------------------------- prm against torch by kind of work
# The device time of one pgd attack (batch 64, 10 steps) summed by kind of work (products,
# attention forward and backward, LayerNorm, ...): prm's timelines above against the kernels
# torch_prm.py profiled in the report's torch rows (--kernels). Costs no device time.
groups=()
for pair in "prm v3=timeline-pgd-direct.json" "prm auto=timeline-pgd-auto.json" \
  "torch eager bf16=torch-pgd-eager-bf16-kernels.json" "torch.compile=torch-pgd-compile-kernels.json"; do
  [[ -f $LOGS/${pair#*=} ]] && groups+=("${pair%%=*}=$LOGS/${pair#*=}")
done
if (( ${#groups[@]} > 0 )); then
  python3 "$ROOT/tools/kernel_groups.py" "${groups[@]}" >"$LOGS/groups.txt" 2>&1
fi

# ---------------------------------------------------------------- per-kernel profile
# Kernel time per kernel name (Nsight Compute's gpu__time_duration per launch, summed), graphs
# off so every kernel is its own launch, with each kernel's own roofline position: DRAM bytes
# (→ achieved TB/s), memory and SM throughput as % of peak, and the tensor pipe's active %
# (time-weighted over the kernel's launches). The pgd workload first, then the paper workload
# when time is left. Attention pinned to v3 (PROFILE_ATTENTION=v4 to change it): under auto
# the tuning's extra launches would be profiled too.
profile_run() { # title csv secs prm-bench-args...
  local title=$1 csv=$2 secs=$3; shift 3
  echo "== profile: $title (ncu, ${secs}s)"
  (cd "$ROOT" && PRM_ATTENTION=${PROFILE_ATTENTION:-v3} PRM_NO_GRAPHS=1 timeout "$secs" "$NCU" --clock-control none --metrics "$NCU_METRICS" \
    --csv "$BUNDLE/prm" bench --device cuda --model random:vit-b-16 --precision bf16 --warmup 0 --repeats 1 \
    --no-ceiling "$@") >"$csv" 2>"${csv%.csv}.err"
  python3 - "$csv" "$title" >>"$LOGS/profile.txt" 2>&1 <<'PY'
import csv, sys, collections
path, title = sys.argv[1], sys.argv[2]
rows = [r for r in csv.reader(l for l in open(path) if l.startswith('"'))]
print(title)
if not rows:
    print("  ncu produced no rows (see the .err log)"); sys.exit()
head = rows[0]
k, m, v, u = (head.index(c) for c in ("Kernel Name", "Metric Name", "Metric Value", "Metric Unit"))
# Nsight Compute has spelled units both ways ("nsecond" / "ns", "Kbyte" / "KB"); an unknown
# unit is an error rather than a silent factor of 1000.
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
         "second": 1e6, "s": 1e6}
byte_scale = {"byte": 1, "B": 1, "Kbyte": 1e3, "KB": 1e3, "Mbyte": 1e6, "MB": 1e6,
              "Gbyte": 1e9, "GB": 1e9}
ID = head.index("ID") if "ID" in head else None
# One launch = one ID; its metrics are on separate rows.
launches = collections.defaultdict(dict)
for i, r in enumerate(rows[1:]):
    key = (r[ID] if ID is not None else i, r[k].split("(")[0][:60])
    try:
        val = float(r[v].replace(",", ""))
    except ValueError:
        continue
    if r[m] == "gpu__time_duration.sum":
        if r[u] not in scale:
            sys.exit(f"  unknown time unit {r[u]!r} in the ncu CSV: extend the parser")
        val *= scale[r[u]]
    elif r[m] == "dram__bytes.sum":
        if r[u] not in byte_scale:
            sys.exit(f"  unknown byte unit {r[u]!r} in the ncu CSV: extend the parser")
        val *= byte_scale[r[u]]
    launches[key][r[m]] = val
per = collections.defaultdict(lambda: collections.defaultdict(float))
for (_, name), met in launches.items():
    us = met.get("gpu__time_duration.sum")
    if us is None:
        continue
    e = per[name]
    e["calls"] += 1
    e["us"] += us
    for metric, val in met.items():
        if metric.endswith("pct_of_peak_sustained_elapsed") or metric.endswith("pct_of_peak_sustained_active"):
            e[metric] += val * us  # time-weighted
        elif metric == "dram__bytes.sum":
            e["bytes"] += val
total = sum(e["us"] for e in per.values()) or 1.0
print(f"  kernel time {total/1e3:.1f} ms over {int(sum(e['calls'] for e in per.values()))} launches")
print(f"  {'kernel':60} {'calls':>6} {'ms':>8} {'share':>6} {'us/call':>8} {'TB/s':>6} {'mem%':>5} {'sm%':>5} {'tc%':>5}")
MEM = "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"
SM = "sm__throughput.avg.pct_of_peak_sustained_elapsed"
TC = "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
for name, e in sorted(per.items(), key=lambda x: -x[1]["us"])[:18]:
    n, us = int(e["calls"]), e["us"]
    pct = lambda key: f"{e[key]/us:5.1f}" if key in e else "    -"
    tbs = f"{e['bytes']/(us*1e-6)/1e12:6.2f}" if "bytes" in e else "     -"
    print(f"  {name:60} {n:6d} {us/1e3:8.2f} {100*us/total:5.1f}% {us/n:8.1f} {tbs} {pct(MEM)} {pct(SM)} {pct(TC)}")
print("  TB/s: DRAM bytes / kernel time; mem%, sm%: throughput as % of peak (Nsight Compute's speed")
print("  of light); tc%: tensor pipe active; all time-weighted over the kernel's launches")
PY
}
# Why the attention kernels are slow (a quarter of a pgd step's device time on an H200,
# 2026-12-04, at ~75 TFLOP/s): for the first launches of each, achieved occupancy and the
# average number of warps stalled on each reason per issued instruction (Nsight Compute's
# warp-state breakdown), largest first. Its own ncu run, so a metric this ncu lacks loses this
# table only.
attention_stalls() { # secs   (v3, then v4 with paired blocks, then v4: a third of the time each)
  local version csv
  echo "== profile: attention stall reasons (ncu, ${1}s)"
  for version in v3 v4-pairs v4; do
  csv=$LOGS/ncu-attention-$version.csv
  # Past the clean forward's 12 and 8 of the step's 12 forwards: 4 forwards, then the
  # backward's dK/dV and dQ launches (the delta kernel is left out).
  (cd "$ROOT" && PRM_ATTENTION=${version%-pairs} PRM_ATTENTION_PAIRS=$([[ $version == *-pairs ]] && echo 1 || echo 0) \
    PRM_NO_GRAPHS=1 timeout "$(($1 / 3))" "$NCU" --clock-control none \
    -k "regex:prm_attention_(forward|bwd)" --launch-skip 20 --launch-count 10 \
    --metrics "gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    --csv "$BUNDLE/prm" bench --device cuda --model random:vit-b-16 --precision bf16 --warmup 0 --repeats 1 \
    --no-ceiling --batch-size 64 --steps 1) >"$csv" 2>"${csv%.csv}.err"
  python3 - "$csv" "$version" >>"$LOGS/profile.txt" 2>&1 <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
print(f"attention {sys.argv[2]} kernels, pgd batch 64 (4 forwards, 3 dK/dV, 3 dQ of one step): occupancy and stall reasons")
if not rows:
    print(f"  ncu produced no rows (see {sys.argv[1][:-4]}.err)"); sys.exit()
head = rows[0]
k, m, v, u = (head.index(c) for c in ("Kernel Name", "Metric Name", "Metric Value", "Metric Unit"))
to_us = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
per = collections.defaultdict(lambda: collections.defaultdict(list))
for r in rows[1:]:
    try:
        val = float(r[v].replace(",", ""))
    except ValueError:
        continue
    if r[m] == "gpu__time_duration.sum":
        val = val * to_us[r[u]] if r[u] in to_us else float("nan")
    per[r[k].split("(")[0]][r[m]].append(val)
for name, met in per.items():
    mean = {key: sum(vals) / len(vals) for key, vals in met.items()}
    occ = mean.get("sm__warps_active.avg.pct_of_peak_sustained_active", float("nan"))
    stalls = sorted(((val, key.replace("smsp__average_warps_issue_stalled_", "").replace("_per_issue_active.ratio", ""))
                     for key, val in mean.items() if key.startswith("smsp__average_warps_issue_stalled_")), reverse=True)
    us = mean.get("gpu__time_duration.sum", float("nan"))
    print(f"  {name}: {us:.1f} us; achieved occupancy {occ:.1f}% of peak warps; stalled warps per issue: "
          + ", ".join(f"{s} {val:.2f}" for val, s in stalls[:6]))
PY
  done
}
NCU_METRICS=gpu__time_duration.sum,dram__bytes.sum,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
if want profile || want stalls; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
  : >"$LOGS/profile.txt"
  if [[ -z $NCU ]]; then
    echo "no ncu: no per-kernel profile" >"$LOGS/profile.txt"
  elif ! want profile; then
    # `--only stalls`: the attention stall table alone (a short recheck of attention kernels).
    secs_allowed=$(allow 120 5)
    if (( secs_allowed >= 45 )); then
      attention_stalls "$secs_allowed"
    else
      echo "out of time: no attention stall table" >"$LOGS/profile.txt"
    fi
  else
    # The attention stall table first: attention is the large piece of a pgd step far from its
    # roofline, and the table that says why has never fitted behind the per-kernel profile
    # (fba7e63's run has that profile). Then the per-kernel profile with what is left.
    secs_allowed=$(allow 90 70)
    if (( secs_allowed >= 45 )); then
      attention_stalls "$secs_allowed"
      echo >>"$LOGS/profile.txt"
    else
      echo "out of time: no attention stall table" >>"$LOGS/profile.txt"
    fi
    secs_allowed=$(allow 150 15)
    if (( secs_allowed < 40 )); then
      echo "out of time: no per-kernel profile" >>"$LOGS/profile.txt"
    else
      profile_run "pgd: batch 64, 224 px, clean forward + 1 step + final evaluation" "$LOGS/ncu-pgd.csv" \
        "$secs_allowed" --batch-size 64 --steps 1
      secs_allowed=$(allow 150 15)
      if (( secs_allowed >= 40 )); then
        echo >>"$LOGS/profile.txt"
        profile_run "paper: batch 8, 640x480, dynamic scale, clean forward + 1 AdamW step + final evaluation" \
          "$LOGS/ncu-paper.csv" "$secs_allowed" --preset paper --image-size 640x480 --batch-size 8 --steps 1
      fi
    fi
  fi
fi

# ---------------------------------------------------------------- summary
{
  echo
  echo "== summary (bundle commit ${COMMIT:-?}, $(($(date +%s) - START)) s of a ${BUDGET} s budget)"
  cat "$LOGS/machine.txt"
  if [[ ${#rows[@]} -gt 0 ]]; then
    printf '%-26s %-10s %-9s %8s  %s\n' "tests" "result" "no device" "time" "summary"
    printf '%s\n' "${rows[@]}"
  fi
  [[ -f $LOGS/report.txt ]] && { echo; cat "$LOGS/report.txt"; grep -E "failed|skipped" "$LOGS/report.err" | sed "s|$WORK/report/|logs/|" | head -n 16; }
  [[ -f $LOGS/timeline.txt ]] && { echo; cat "$LOGS/timeline.txt"; }
  [[ -f $LOGS/groups.txt ]] && { echo; echo "pgd attack, batch 64, 10 steps: device time by kind of work (logs/groups.txt lists the largest kernels)"; sed '/^$/q' "$LOGS/groups.txt"; }
  [[ -f $LOGS/profile.txt ]] && { echo; cat "$LOGS/profile.txt"; }
  [[ $failed -eq 0 ]] && echo "all checks passed" || echo "$failed check(s) FAILED"
} | tee "$LOGS/summary.txt"
cp "$LOGS/summary.txt" "$DEST/summary.txt"
tar -czf "$DEST/gpu-check-logs.tar.gz" -C "$WORK" logs
echo "logs: $DEST/gpu-check-logs.tar.gz"
rm -rf "$WORK"
[[ $failed -eq 0 ]]
