#!/usr/bin/env bash
# Compile check for the CUDA sources (csrc/cuda/*.cu) on a machine without a GPU.
#
# What it does (and prints):
#   1. creates or reuses a venv with the CUDA build of torch (default <repo>/.cudavenv,
#      override with CURVFAST_CUDAVENV); the CPU torch cannot build a CUDAExtension;
#   2. copies the tree (no .git, venvs, build outputs) into a temporary folder, so the
#      shared tree's curvfast/_C*.so and curvfast/_build_info.py are left alone;
#   3. builds curvfast._C there with CURVFAST_CUDA=1 for TORCH_CUDA_ARCH_LIST (default 9.0);
#   4. loads the .so with the CUDA torch and checks that the CUDA kernels are registered.
# Exits non-zero on any failure. Nothing runs on a GPU. Set KEEP_BUILD=1 to keep the copy.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CURVFAST_CUDAVENV:-$ROOT/.cudavenv}"
TORCH_SPEC="${CURVFAST_CUDA_TORCH:-torch==2.14.1}"
ARCHS="${TORCH_CUDA_ARCH_LIST:-9.0}"
PY_BOOT="${PYTHON:-python3}"
t_start=$(date +%s)

if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda_compile_check: nvcc not found on PATH; nothing to check (skipped)"
  exit 0
fi
NVCC_BIN="$(command -v nvcc)"
# The toolkit (lib64/libcudart, headers): CUDA_HOME, else /usr/local/cuda, else next to nvcc.
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  else CUDA_HOME="$(cd "$(dirname "$(readlink -f "$NVCC_BIN")")/.." && pwd)"; fi
fi
echo "cuda_compile_check: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_HOME=$CUDA_HOME, archs $ARCHS"

# 1. venv with a CUDA build of torch
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "cuda_compile_check: reusing $VENV ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
else
  echo "cuda_compile_check: creating $VENV with $TORCH_SPEC (CUDA build, ~80 s, ~5.5 GB)"
  "$PY_BOOT" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" pybind11 ninja setuptools wheel numpy
fi
"$VENV/bin/python" -c "import torch, sys; print('cuda_compile_check: torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(torch.version.cuda is None)"
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
NV_INC="$SITE/nvidia/cu13/include"
[ -d "$NV_INC" ] || NV_INC="$(ls -d "$SITE"/nvidia/*/include 2>/dev/null | tr '\n' ':' )"

# 2. a private copy of the tree
BUILD="$(mktemp -d /tmp/curvfast-cudabuild.XXXXXX)"
if [ "${KEEP_BUILD:-0}" != "1" ]; then trap 'rm -rf "$BUILD"' EXIT; fi
(cd "$ROOT" && tar -cf - --exclude=./.git --exclude=./.cudavenv --exclude=./build --exclude='*.so' \
    --exclude='__pycache__' --exclude=./.whl --exclude=./.gl --exclude='*.egg-info' .) | (cd "$BUILD" && tar -xf -)
echo "cuda_compile_check: building in $BUILD"

# 3. build
t_build=$(date +%s)
(cd "$BUILD" && env CUDA_HOME="$CUDA_HOME" TORCH_CUDA_ARCH_LIST="$ARCHS" CURVFAST_CUDA=1 \
    CPATH="$NV_INC${CPATH:+:$CPATH}" MAX_JOBS="${MAX_JOBS:-2}" \
    "$VENV/bin/python" setup.py build_ext --inplace > "$BUILD/build.log" 2>&1) || {
  echo "cuda_compile_check: BUILD FAILED; last lines of the log:"; tail -n 60 "$BUILD/build.log"; exit 1; }
echo "cuda_compile_check: built in $(( $(date +%s) - t_build )) s"
grep -E "warning" "$BUILD/build.log" | grep -v "^ninja" | head -n 20 || true

# 4. load it with the CUDA torch (without importing the package, whose deps this venv lacks)
"$VENV/bin/python" - "$BUILD" <<'PY'
import glob, importlib.util, sys
import torch
build = sys.argv[1]
so = glob.glob(f"{build}/curvfast/_C*.so")
assert so, "no curvfast/_C*.so was produced"
spec = importlib.util.spec_from_file_location("curvfast._C", so[0])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert mod.with_cuda(), "the extension was built without CUDA"
has = torch._C._dispatch_has_kernel_for_dispatch_key
missing = [op for op in ("curvfast::covariance_update_", "curvfast::covariance_update_grouped_")
           if not has(op, "CUDA")]
print("cuda_compile_check: loaded", so[0].rsplit("/", 1)[-1], "with_cuda =", mod.with_cuda())
if "curvfast::covariance_update_" in missing:
    sys.exit("cuda_compile_check: no CUDA kernel registered for curvfast::covariance_update_")
if missing:
    print("cuda_compile_check: note: no CUDA kernel for", missing, "(schema not declared yet?)")
PY
echo "cuda_compile_check: OK in $(( $(date +%s) - t_start )) s"
