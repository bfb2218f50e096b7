"""Build curvfast._C from csrc/ and install kernels/ as curvfast.kernels.

CUDA sources (csrc/cuda/*.cu) are compiled when the installed torch is a CUDA build and a
CUDA toolkit is found. ``CURVFAST_CUDA=1`` forces them (and fails loudly if impossible),
``CURVFAST_CUDA=0`` skips them. No GPU is needed to build: architectures come from
``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0+PTX").
"""
import glob
import json
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _want_cuda() -> tuple[bool, str]:
    switch = os.environ.get("CURVFAST_CUDA", "auto").lower()
    if switch in ("0", "no", "off", "false"):
        return False, "disabled by CURVFAST_CUDA=0"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    elif cpp_extension.CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        return True, f"torch CUDA {torch.version.cuda}, toolkit at {cpp_extension.CUDA_HOME}"
    if switch in ("1", "yes", "on", "true"):
        sys.exit(f"CURVFAST_CUDA=1 but CUDA sources cannot be built: {reason}")
    return False, reason


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


with_cuda, cuda_reason = _want_cuda()
sources = ["csrc/bindings.cpp"] + _sources("csrc/cpu/*.cpp")
# torch >= 2.14 headers need C++20; older ones build with C++17.
_torch_minor = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
CXX_STD = "-std=c++20" if _torch_minor >= (2, 14) else "-std=c++17"
cxx_flags = ["-O3", "-g0", CXX_STD, "-fvisibility=hidden"]
define_macros = [("TORCH_EXTENSION_NAME", "_C")]
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    sources += _sources("csrc/cuda/*.cu")
    define_macros.append(("CURVFAST_WITH_CUDA", "1"))
    ext = cpp_extension.CUDAExtension(
        "curvfast._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", CXX_STD, "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
else:
    ext = cpp_extension.CppExtension(
        "curvfast._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx_flags}
    )

# Build facts go into the package so that error messages can name them.
build_info = {
    "torch_version": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "with_cuda": with_cuda,
    "cuda_reason": cuda_reason,
    "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
    "cuda_home": cpp_extension.CUDA_HOME if with_cuda else None,
}
with open(os.path.join(ROOT, "curvfast", "_build_info.py"), "w") as f:
    f.write("# Written by setup.py at build time.\nimport json\nBUILD_INFO = json.loads(%r)\n" % json.dumps(build_info))

setup(
    packages=["curvfast", "curvfast.kernels"],
    package_dir={"curvfast": "curvfast", "curvfast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
