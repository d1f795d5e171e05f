#!/usr/bin/env bash
# Builds, here, what a GPU machine without Rust needs to test and benchmark this checkout:
#   target/gpu-bundle/tests/integration  the integration test executable (tests/integration.rs),
#                                    kernels embedded (nvcc is required: scripts/install-nvcc.sh)
#   target/gpu-bundle/test-groups.txt    its modules (files of tests/) that have a CUDA path
#                                    (naming cuda, on_devices or devices()), one a line:
#                                    gpu-check.sh runs each as one row of its table
#   target/gpu-bundle/prm            the release binary
#   target/gpu-bundle/paths.env      the absolute paths baked into the test binaries
#                                    (CARGO_MANIFEST_DIR, CARGO_BIN_EXE_prm), which gpu-check.sh
#                                    recreates as links to the checkout it runs in
#   target/gpu-bundle.tar.xz         all of it in one solid archive, small enough to travel
#                                    with a checkout
#
# Usage: scripts/gpu-bundle.sh   (ALL_TESTS=1 also bundles the other test executables, the
#        library's and binary's unit tests and tests/sim.rs, and lists every module)
# Then, on the GPU machine, in a copy of this checkout that holds target/gpu-bundle.tar.xz:
#   python3 -c "import tarfile; tarfile.open('target/gpu-bundle.tar.xz').extractall('target', filter='data')"
#   bash scripts/gpu-check.sh --bundle target/gpu-bundle
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/target/gpu-bundle

if [[ -z ${NVCC:-} && -z ${CUDA_HOME:-} && ! -x .nvcc/cuda/bin/nvcc ]] && ! command -v nvcc >/dev/null; then
  bash scripts/install-nvcc.sh
fi
export PRM_REQUIRE_NVCC=1

echo "== building (release)"
cargo build --release --bins
json=$(mktemp)
cargo test --release --no-run --message-format=json >"$json"

rm -rf "$OUT" "$OUT.tar.xz"
mkdir -p "$OUT/tests"
ALL_TESTS=${ALL_TESTS:-0} python3 - "$json" "$OUT" "$ROOT/tests" <<'PY'
import json, os, re, shutil, sys
src, out, tests_dir = sys.argv[1:4]
take_all = os.environ.get("ALL_TESTS") == "1"
def has_cuda_path(module):
    path = os.path.join(tests_dir, module + ".rs")
    return re.search(r"cuda|on_devices|devices\(\)", open(path).read()) is not None
# The modules of tests/integration.rs, in its order.
root = open(os.path.join(tests_dir, "integration.rs")).read()
modules = [m for m in re.findall(r"(?m)^mod (\w+);", root) if m != "common"]
groups = [m for m in modules if take_all or has_cuda_path(m)]
with open(os.path.join(out, "test-groups.txt"), "w") as f:
    f.write("".join(m + "\n" for m in groups))
print(f"  integration modules with a CUDA path: {' '.join(groups)}")
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
    if kind == "bin":
        name = "bin-" + name
    if name != "integration" and not take_all:
        continue  # unit tests and tests/sim.rs: the simulator only, CI's job
    shutil.copy2(exe, os.path.join(out, "tests", name))
    print(f"  test executable {name}")
PY
rm -f "$json"

TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$TARGET_DIR/release/prm" "$OUT/prm"
cat >"$OUT/paths.env" <<ENV
MANIFEST_DIR=$ROOT
PRM_EXE=$TARGET_DIR/release/prm
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)
ENV
if command -v strip >/dev/null; then
  strip "$OUT"/tests/* "$OUT/prm"
fi
echo "== archive"
# One window over the binaries: both embed every kernel image, and a window wider than the
# bundle (about 50 MB unpacked) lets xz store the second copy as a reference to the first.
# 256 MiB needs about 2.6 GiB here and 256 MiB to unpack.
(cd "$ROOT/target" && tar -cf - gpu-bundle | xz -T1 --lzma2=preset=9,dict=256MiB >"$OUT.tar.xz.tmp" && mv "$OUT.tar.xz.tmp" "$OUT.tar.xz")
echo "== bundle: $OUT ($(du -sh "$OUT" | cut -f1)), $OUT.tar.xz ($(du -h "$OUT.tar.xz" | cut -f1))"
cat <<EOF
On the GPU machine (device tool: carry ["target/gpu-bundle.tar.xz"]), in the checkout:
  python3 -c "import tarfile; tarfile.open('target/gpu-bundle.tar.xz').extractall('target', filter='data')" && bash scripts/gpu-check.sh --bundle target/gpu-bundle
EOF
