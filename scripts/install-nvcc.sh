#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, cicc/libNVVM, ptxas, fatbinary, CUDA and CCCL
# headers) from NVIDIA's pip wheels into the git-ignored folder .nvcc/ of this checkout.
# No GPU, driver or root needed. Idempotent: a second run only checks the install.
#
# Layout produced (the wheels already form a CUDA_HOME-like tree under nvidia/cu13):
#   .nvcc/site/nvidia/cu13/bin/{nvcc,ptxas,fatbinary,nvlink,nvcc.profile,...}
#   .nvcc/site/nvidia/cu13/nvvm/{bin/cicc,libdevice/libdevice.10.bc}
#   .nvcc/site/nvidia/cu13/include/{cuda_bf16.h,crt/,cuda/,cub/,thrust/,...}
#   .nvcc/site/nvidia/cu13/lib/{libcudart.so.13,libnvvm.so.4,...}
#   .nvcc/cuda -> site/nvidia/cu13          (stable CUDA_HOME)
#
# build.rs finds .nvcc/cuda/bin/nvcc by itself; other tools want:
#   export CUDA_HOME=$PWD/.nvcc/cuda NVCC=$PWD/.nvcc/cuda/bin/nvcc
# Needs python3 with pip and a host C++ compiler (g++) on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=$ROOT/.nvcc
SITE=$DEST/site
HOME_LINK=$DEST/cuda
PINS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl<13.1"
)
STAMP=$DEST/.installed
WANT="${PINS[*]}"

start=$(date +%s)
if [[ -f $STAMP && "$(cat "$STAMP")" == "$WANT" && -x $HOME_LINK/bin/nvcc ]]; then
  echo "nvcc already installed in $DEST (pins unchanged)"
else
  echo "installing ${PINS[*]} into $SITE"
  rm -rf "$SITE" "$HOME_LINK" "$STAMP"
  mkdir -p "$DEST"
  PIP=(python3 -m pip)
  if ! "${PIP[@]}" --version >/dev/null 2>&1; then
    echo "error: python3 -m pip is not available; install pip (e.g. apt-get install python3-pip)" >&2
    exit 1
  fi
  # --no-deps: the pins are the complete set; nothing else is pulled in.
  PIP_ROOT_USER_ACTION=ignore "${PIP[@]}" install --quiet --disable-pip-version-check \
    --no-warn-script-location --no-deps --target "$SITE" "${PINS[@]}"
  cuda_home=""
  for cand in "$SITE"/nvidia/cu13 "$SITE"/nvidia/cuda_nvcc "$SITE"/nvidia/cu*; do
    if [[ -x $cand/bin/nvcc ]]; then cuda_home=$cand; break; fi
  done
  if [[ -z $cuda_home ]]; then
    echo "error: no bin/nvcc found under $SITE/nvidia after installing the wheels:" >&2
    find "$SITE/nvidia" -maxdepth 3 >&2 || true
    exit 1
  fi
  ln -sfn "${cuda_home#"$DEST"/}" "$HOME_LINK"
  echo "$WANT" >"$STAMP"
fi

CUDA_HOME=$HOME_LINK
NVCC=$CUDA_HOME/bin/nvcc
for f in bin/nvcc bin/ptxas bin/fatbinary nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc \
         include/cuda_bf16.h include/crt/host_config.h include/cuda_runtime.h; do
  if [[ ! -e $CUDA_HOME/$f ]]; then
    echo "error: $CUDA_HOME/$f is missing; delete $DEST and run this script again" >&2
    exit 1
  fi
done

# Smoke test: a bf16 kernel to one fatbin with sm_80 and sm_90 SASS plus compute_90 PTX.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/probe.cu" <<'CU'
#include <cuda_bf16.h>
extern "C" __global__ void prm_probe(const __nv_bfloat16* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __bfloat162float(x[i]) * 2.0f;
}
CU
if ! "$NVCC" -fatbin -O3 -std=c++17 \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -gencode arch=compute_90,code=compute_90 -o "$tmp/probe.fatbin" "$tmp/probe.cu" >"$tmp/log" 2>&1; then
  cat "$tmp/log" >&2
  echo "error: $NVCC could not compile a probe kernel (is a host C++ compiler, g++, on PATH?)" >&2
  exit 1
fi
echo "probe kernel compiled ($(stat -c %s "$tmp/probe.fatbin") byte fatbin: sm_80, sm_90, compute_90)"
"$NVCC" --version | tail -n 2
echo "done in $(( $(date +%s) - start ))s; build.rs finds it by itself. For other tools:"
echo "export CUDA_HOME=$CUDA_HOME NVCC=$NVCC"
