#!/usr/bin/env bash
# The sm_90 machine code (SASS) of one kernel, for reading what nvcc made of it on a machine
# without a GPU: instruction counts, predication, branches around slow paths, registers.
#
#   scripts/sass.sh kernels/activation.cu prm_activation_forward_bf16            # the listing
#   scripts/sass.sh --summary kernels/loss.cu prm_loss_rows_f32_d768            # counts only
#   SASS_ARCH=sm_80 scripts/sass.sh ...                                          # another arch
#
# The summary gives the registers (ptxas), the instruction count, the most frequent opcodes,
# and the straight-line sections between unconditional EXITs (a kernel's paths each end in
# one): a path's length there is what a warp issues for one pass of it.
#
# Needs the pinned nvcc (scripts/install-nvcc.sh). The disassembler is not part of those pins:
# the first run installs cuobjdump and nvdisasm from NVIDIA's pip wheels into .nvcc/disasm
# (git-ignored). They only read the cubin, so their version need not match the compiler's.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
summary=0
if [[ ${1:-} == --summary ]]; then summary=1; shift; fi
if [[ $# -ne 2 ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
src=$1
kernel=$2
arch=${SASS_ARCH:-sm_90}
nvcc=$ROOT/.nvcc/cuda/bin/nvcc
if [[ ! -x $nvcc ]]; then
  echo "error: no nvcc at $nvcc; run scripts/install-nvcc.sh first" >&2
  exit 1
fi

tools=$ROOT/.nvcc/disasm
if [[ ! -x $tools/nvidia/cu13/bin/cuobjdump || ! -x $tools/nvidia/cu13/bin/nvdisasm ]]; then
  echo "installing cuobjdump and nvdisasm into $tools" >&2
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
    --no-warn-script-location --no-deps --target "$tools" \
    "nvidia-cuda-cuobjdump==13.2.78" "nvidia-cuda-nvdisasm==13.5.37" >&2
  chmod +x "$tools"/nvidia/cu13/bin/* 2>/dev/null || true
fi
bin=$tools/nvidia/cu13/bin

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$nvcc" -cubin -O3 -std=c++17 -I kernels -arch="$arch" -Xptxas -v "$src" -o "$work/k.cubin" \
  2>"$work/ptxas.txt"
listing() {
  PATH=$bin:$PATH "$bin/cuobjdump" -sass -fun "$kernel" "$work/k.cubin" |
    grep -E '^\s+/\*[0-9a-f]{4,}\*/' | sed -E 's@^\s+@@; s@ ;\s*/\*.*$@@; s@;\s*$@@'
}
listing >"$work/sass.txt" 2>/dev/null || true
if [[ ! -s $work/sass.txt ]]; then
  echo "error: no kernel named $kernel in $src" >&2
  exit 1
fi
if [[ $summary -eq 0 ]]; then
  cat "$work/sass.txt"
  exit 0
fi
regs=$(grep -A4 "entry function '$kernel'" "$work/ptxas.txt" | grep -o 'Used [0-9]* registers' || true)
echo "$kernel ($arch): ${regs:-registers unknown}, $(wc -l <"$work/sass.txt") instructions"
echo "most frequent:"
awk '{op = ($2 ~ /^@/) ? $3 : $2; print op}' "$work/sass.txt" | sort | uniq -c | sort -rn | head -8
echo "sections ending in an unconditional EXIT (instructions, of them predicated, stores):"
awk '{n++; if ($2 ~ /^@/) p++; if ($0 ~ /STG|STS/) s++;
      if ($2 == "EXIT") { printf "  %5d  %5d  %4d\n", n, p, s; n = 0; p = 0; s = 0 } }' "$work/sass.txt"
