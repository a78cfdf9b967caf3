#!/usr/bin/env bash
# Compile-only check of the CUDA sources (spark_ext/csrc/cuda/*.cu) with nvcc, so a CUDA
# build error fails CI even on machines without a GPU.
#
# torch's CPU wheel ships no CUDA headers (c10/cuda, ...), so the include/
# folder of a CUDA build of torch is unpacked once into a cache and used for
# this check only (the .o files are thrown away); a CUDA build of torch is used
# as it is. Skipped, with a message,
# when nvcc is not installed or the headers cannot be downloaded; set
# SPARK_EXT_REQUIRE_NVCC=1 to fail instead. About 1 min (plus a few seconds
# the first time, to fetch and unpack the headers).
#
# Env: PYTHON (default .venv/bin/python), TORCH_CUDA_HEADERS_VERSION (2.14.1),
#      SPARK_EXT_HEADER_CACHE (default ~/.cache/spark_ext/torch-cuda-headers),
#      CUDA_ARCH (default 90).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
VERSION=${TORCH_CUDA_HEADERS_VERSION:-2.14.1}
CACHE=${SPARK_EXT_HEADER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spark_ext/torch-cuda-headers}/$VERSION
ARCH=${CUDA_ARCH:-90}

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  if [[ -n "${SPARK_EXT_REQUIRE_NVCC:-}" ]]; then echo "cuda-compile-check: nvcc not found" >&2; exit 1; fi
  echo "cuda-compile-check: nvcc not found, skipped"
  exit 0
fi

start=$(date +%s)
# A CUDA build of torch in this environment has the headers already: no download.
OWN=$("$PYTHON" -c "import os, torch; print(os.path.dirname(torch.__file__) if torch.version.cuda else '')")
if [[ -n "$OWN" && -f "$OWN/include/c10/cuda/CUDAStream.h" ]]; then
  CACHE=$OWN
  VERSION=$("$PYTHON" -c "import torch; print(torch.__version__)")
elif [[ ! -f "$CACHE/include/c10/cuda/CUDAStream.h" ]]; then
  echo "cuda-compile-check: fetching the headers of torch==$VERSION (CUDA build) into $CACHE"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if ! "$PYTHON" -m pip download -q --no-deps "torch==$VERSION" -d "$tmp" \
      --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11; then
    # No package index reachable: that is no CUDA build error, so only a
    # machine that insists (SPARK_EXT_REQUIRE_NVCC=1) fails here.
    echo "cuda-compile-check: could not download torch==$VERSION for its CUDA headers" >&2
    if [[ -n "${SPARK_EXT_REQUIRE_NVCC:-}" ]]; then exit 1; fi
    echo "cuda-compile-check: skipped"
    exit 0
  fi
  wheel=$(ls "$tmp"/torch-*.whl)
  mkdir -p "$CACHE.partial"
  # Only torch/include/** (a few MB of a multi-GB wheel).
  "$PYTHON" - "$wheel" "$CACHE.partial" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("torch/include/")]
    for n in names:
        z.extract(n, dest)
print(f"cuda-compile-check: unpacked {len(names)} headers")
PY
  rm -rf "$CACHE"
  mv "$CACHE.partial/torch" "$CACHE"
  rmdir "$CACHE.partial"
fi

# The same nvcc flags the real build uses (spark_ext/_build.py), plus
# what torch.utils.cpp_extension adds for CUDA sources.
read -r -a FLAGS <<<"$("$PYTHON" - "$VERSION" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("cfg", "spark_ext/_build.py")
cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg)
print(" ".join(cfg.compile_flags(sys.argv[1], True)[1]))
PY
)"
INC=$CACHE/include
PYINC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
status=0
for cu in spark_ext/csrc/cuda/*.cu; do
  t0=$(date +%s)
  if ! "$NVCC" -c "$cu" -o /dev/null -std=c++20 \
      -gencode "arch=compute_$ARCH,code=sm_$ARCH" \
      -I "$INC" -I "$INC/torch/csrc/api/include" -I "$PYINC" -I spark_ext/csrc \
      -DTORCH_EXTENSION_NAME=spark_ext_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1 \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler -fPIC -Werror all-warnings "${FLAGS[@]}"; then
    status=1
  fi
  echo "cuda-compile-check: $cu ($(( $(date +%s) - t0 )) s)"
done
echo "cuda-compile-check: $([[ $status == 0 ]] && echo ok || echo FAILED) in $(( $(date +%s) - start )) s (nvcc $("$NVCC" --version | grep -o 'release [0-9.]*'), sm_$ARCH, torch $VERSION headers)"
exit $status
