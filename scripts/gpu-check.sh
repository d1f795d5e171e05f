#!/usr/bin/env bash
# Runs the test suite and `prm attack --device cuda` on a GPU machine, and prints a table
# (test binary, result, CUDA tests run or skipped, time).
#
#   Without Rust:  bash gpu-bundle/gpu-check.sh gpu-bundle     (bundle from scripts/gpu-bundle.sh)
#   With cargo:    bash scripts/gpu-check.sh                   (builds the bundle first)
#
# cuBLASLt is loaded at run time: libcublasLt.so.{13,12} must be findable. Its folder is added to
# LD_LIBRARY_PATH from a pip-installed PyTorch / nvidia-cublas wheel or /usr/local/cuda when
# found. Extra arguments after the bundle folder are passed to every test binary.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

if [[ $# -ge 1 && -d $1 ]]; then
  BUNDLE=$(cd "$1" && pwd); shift
elif [[ -f $HERE/paths.env ]]; then
  BUNDLE=$HERE
elif command -v cargo >/dev/null && [[ -f $HERE/../Cargo.toml ]]; then
  echo "== cargo found: building the bundle"
  bash "$HERE/gpu-bundle.sh" "$HERE/../target/gpu-bundle" || exit 1
  BUNDLE=$(cd "$HERE/../target/gpu-bundle" && pwd)
else
  echo "usage: $0 BUNDLE_DIR  (made by scripts/gpu-bundle.sh), or run it in a checkout with cargo" >&2
  exit 2
fi
[[ -f $BUNDLE/paths.env ]] || { echo "error: $BUNDLE/paths.env missing: not a bundle" >&2; exit 2; }
# shellcheck disable=SC1091
source "$BUNDLE/paths.env"

echo "== machine"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
  echo "nvidia-smi not found"
fi

# The binaries read fixtures through absolute paths baked in at build time: recreate them.
link_path() { # target link
  local target=$1 link=$2
  if [[ -e $link ]]; then return 0; fi
  if mkdir -p "$(dirname "$link")" 2>/dev/null && ln -s "$target" "$link" 2>/dev/null; then
    echo "linked $link -> $target"
  else
    echo "warning: could not create $link; tests reading fixtures may fail" >&2
  fi
}
link_path "$BUNDLE/root" "$MANIFEST_DIR"
link_path "$BUNDLE/prm" "$PRM_EXE"

# cuBLASLt for the products.
extra_libs=()
if command -v python3 >/dev/null; then
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
fi
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  compgen -G "$d/libcublasLt.so*" >/dev/null && extra_libs+=("$d")
done
if [[ ${#extra_libs[@]} -gt 0 ]]; then
  LD_LIBRARY_PATH=$(IFS=:; echo "${extra_libs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export LD_LIBRARY_PATH
  echo "cuBLASLt from: ${extra_libs[*]}"
else
  echo "warning: libcublasLt not found (matmul tests will fail); install nvidia-cublas or set LD_LIBRARY_PATH" >&2
fi

LOGS=$BUNDLE/logs
mkdir -p "$LOGS"
rows=()
failed=0
for t in "$BUNDLE"/tests/*; do
  name=$(basename "$t")
  start=$(date +%s.%N)
  (cd "$MANIFEST_DIR" 2>/dev/null || cd "$BUNDLE/root"; "$t" --nocapture "$@") >"$LOGS/$name.log" 2>&1
  rc=$?
  secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')
  skipped=$(grep -c "skipped: no CUDA device" "$LOGS/$name.log")
  summary=$(grep -E "^test result:" "$LOGS/$name.log" | tail -n 1 | sed 's/^test result: //; s/; finished.*//')
  if [[ $rc -eq 0 ]]; then status=pass; else status="FAIL($rc)"; failed=$((failed + 1)); fi
  rows+=("$(printf '%-28s %-9s %-12s %8ss  %s' "$name" "$status" "skips=$skipped" "$secs" "$summary")")
done

echo "== prm attack --device cuda"
out=$(mktemp -d)
start=$(date +%s.%N)
(cd "$BUNDLE/root" && timeout 900 "$BUNDLE/prm" attack --model random:vit-b-16 --input samples \
  --output "$out" --preset pgd --device cuda) >"$LOGS/prm-attack.log" 2>&1
rc=$?
secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')
if [[ $rc -eq 0 ]]; then status=pass; else status="FAIL($rc)"; failed=$((failed + 1)); fi
rows+=("$(printf '%-28s %-9s %-12s %8ss  %s' "prm attack --device cuda" "$status" "-" "$secs" "$(ls "$out" | wc -l) files; $(tail -n 1 "$LOGS/prm-attack.log")")")
rm -rf "$out"

echo
printf '%-28s %-9s %-12s %9s  %s\n' "test binary" "result" "cuda" "time" "summary"
printf '%s\n' "${rows[@]}"
echo
echo "logs: $LOGS"
[[ $failed -eq 0 ]] || { echo "$failed failed"; exit 1; }
