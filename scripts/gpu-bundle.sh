#!/usr/bin/env bash
# Builds everything a GPU machine without Rust needs to test this crate, into gpu-bundle/:
#   gpu-bundle/tests/<name>     every test executable of `cargo test --release` (CUDA kernels
#                               embedded: nvcc is required, see scripts/install-nvcc.sh)
#   gpu-bundle/prm              the release binary
#   gpu-bundle/root/            the files tests read (tests/, samples/)
#   gpu-bundle/paths.env        the absolute paths baked into the binaries (CARGO_MANIFEST_DIR,
#                               CARGO_BIN_EXE_prm), which gpu-check.sh recreates as symlinks
#   gpu-bundle/gpu-check.sh     the runner: copy the folder over, then `bash gpu-bundle/gpu-check.sh gpu-bundle`
# Usage: scripts/gpu-bundle.sh [OUT_DIR]   (default target/gpu-bundle; STRIP=0 keeps debug info;
#        PROFILE=dev builds the dev profile instead of release)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:-target/gpu-bundle}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [[ -z ${NVCC:-} && -z ${CUDA_HOME:-} && ! -x .nvcc/cuda/bin/nvcc ]] && ! command -v nvcc >/dev/null; then
  bash scripts/install-nvcc.sh
fi
export PRM_REQUIRE_NVCC=1

PROFILE=${PROFILE:-release}
PROFILE_DIR=$PROFILE
[[ $PROFILE == dev ]] && PROFILE_DIR=debug
echo "== building ($PROFILE)"
cargo build --profile "$PROFILE" --bins
json=$(mktemp)
cargo test --profile "$PROFILE" --no-run --message-format=json >"$json"

rm -rf "$OUT/tests" "$OUT/root" "$OUT/prm"
mkdir -p "$OUT/tests" "$OUT/root"
python3 - "$json" "$OUT/tests" <<'PY'
import json, shutil, sys, os
src, dest = sys.argv[1], sys.argv[2]
seen = set()
for line in open(src):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("profile", {}).get("test"):
        continue
    exe = msg.get("executable")
    if not exe or exe in seen:
        continue
    seen.add(exe)
    kind = msg["target"]["kind"][0]
    name = msg["target"]["name"] if kind != "lib" else "lib"
    if kind in ("bin",):
        name = "bin-" + name
    shutil.copy2(exe, os.path.join(dest, name))
    print(f"  test executable {name}  <- {exe}")
PY
rm -f "$json"

TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$TARGET_DIR/$PROFILE_DIR/prm" "$OUT/prm"
cp -r tests samples "$OUT/root/"
cp scripts/gpu-check.sh "$OUT/gpu-check.sh"
cat >"$OUT/paths.env" <<ENV
MANIFEST_DIR=$ROOT
PRM_EXE=$TARGET_DIR/$PROFILE_DIR/prm
ENV
if [[ ${STRIP:-1} == 1 ]] && command -v strip >/dev/null; then
  strip --strip-debug "$OUT"/tests/* "$OUT/prm"
fi
echo "== bundle: $OUT ($(du -sh "$OUT" | cut -f1))"
echo "on the GPU machine: bash $(basename "$OUT")/gpu-check.sh $(basename "$OUT")"
