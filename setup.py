"""Build d2z_optim.

A build needs torch importable (D2Z_NO_EXTENSION=1 opts out: pure Python). ``triton_kernels/`` ships inside the wheel
as ``d2z_optim.triton_kernels``: a top-level ``triton_kernels`` module already
exists in the Triton project.

The C++ extension ``d2z_optim._C`` (``csrc/``) registers the ``d2z::`` ops: a
``CppExtension`` (CPU kernel, grid replay) everywhere, a ``CUDAExtension`` adding
the CUDA kernel when torch is a CUDA build and a CUDA toolkit (nvcc) is found.

    pip install --no-build-isolation -e .     # development
    pip wheel --no-build-isolation .          # a wheel, against the installed torch

Environment:
    D2Z_NO_EXTENSION=1    a pure-Python install, no kernel (only the "torch" backend); without it a build
                          that cannot import torch (pip's build isolation) fails, saying what works
    D2Z_DEBUG=1           keep debug info (release builds are built with -g0 and stripped)
    D2Z_FORCE_CPU=1       build the CPU-only extension even with CUDA available
    D2Z_FORCE_CUDA=1      build the CUDA extension or fail (no silent CPU-only fallback)
    D2Z_CUDA_ARCH_LIST    CUDA architectures, in TORCH_CUDA_ARCH_LIST's syntax; else a TORCH_CUDA_ARCH_LIST
                          you set; else "8.0;9.0+PTX": cubins for A100 and H100, and sm_90 PTX that newer
                          GPUs compile when loading. The device code built is recorded in the extension
                          (d2z_optim._C.cuda_code()): "auto" never picks the cuda kernel for a GPU it
                          holds no code for, and backend="cuda" there says what to rebuild with.
    MAX_JOBS              parallel compile jobs (honoured by torch's BuildExtension/ninja)
A compile error fails the build: the extension is never skipped silently.
"""

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

CSRC = "csrc"  # kernels/: torch-free (g++ and nvcc); torch/: the op glue (ATen, pybind11)
CPU_SOURCES = [f"{CSRC}/kernels/adamw_cpu_kernel.cpp"] + [
    f"{CSRC}/torch/{f}" for f in ("adamw_ops.cpp", "adamw_cpu.cpp", "adamw_step_holder.cpp", "adamw_test_ops.cpp")
]
CUDA_SOURCES = [f"{CSRC}/kernels/adamw_cuda.cu", f"{CSRC}/torch/adamw_cuda_glue.cpp"]
HEADERS = [f"{CSRC}/kernels/{h}" for h in ("adamw_math.h", "adamw_cpu_kernel.h", "adamw_cuda.cuh")] + [
    f"{CSRC}/torch/{h}" for h in ("adamw_checks.h", "adamw_cpu.h", "adamw_step_holder.h", "adamw_worklist.h")
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home() -> str | None:
    """A CUDA toolkit root: bin/nvcc and include/cuda_runtime_api.h (nvcc on PATH may be a wrapper)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and all(os.path.exists(os.path.join(home, *f)) for f in (("bin", "nvcc"), ("include", "cuda.h"))):
            return home
    return None


def _nvcc_release(cuda_home: str) -> str:
    """The toolkit's version, e.g. "13.0", from ``nvcc --version`` ("... release 13.0, V13.0.88")."""
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot read the CUDA version from {cuda_home}/bin/nvcc --version:\n{out}")
    return f"{m.group(1)}.{m.group(2)}"


def _check_cuda_versions(torch_cuda: str, nvcc: str, cuda_home: str) -> None:
    """nvcc and torch must agree on the CUDA major version, or the link/ABI breaks in obscure ways."""
    if torch_cuda.split(".")[0] != nvcc.split(".")[0]:
        raise RuntimeError(
            f"CUDA version mismatch: torch is built for CUDA {torch_cuda} but the toolkit at {cuda_home} "
            f"is CUDA {nvcc} (nvcc). Either point CUDA_HOME at a CUDA {torch_cuda.split('.')[0]}.x toolkit, "
            f"install a torch built for CUDA {nvcc.split('.')[0]}, or build the CPU-only extension with "
            "D2Z_FORCE_CPU=1."
        )


# nvcc: -fmad=false, so a * b + c is never contracted into an fma behind the source's back (the
# fmas are explicit, d2z::fma in adamw_math.h; the CPU replay, compiled with -ffp-contract=off, then
# rounds exactly as the GPU); tests/test_csrc_nvcc.py compiles with these flags and checks the PTX
NVCC_FLAGS = ["-O3", "-lineinfo", "-fmad=false"]
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_arch_list() -> str:
    """The architectures to build: D2Z_CUDA_ARCH_LIST, else the user's TORCH_CUDA_ARCH_LIST, else ours."""
    for name in ("D2Z_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return DEFAULT_CUDA_ARCHS


def cuda_code(gencode_flags: list[str]) -> list[str]:
    """The device code nvcc is asked for, from its -gencode flags: ["sm_80", "sm_90", "compute_90"]."""
    code = []
    for flag in gencode_flags:
        m = re.search(r",code=\[?([\w,]+)\]?", flag)
        if m:
            code += [c for c in m.group(1).split(",") if c not in code]
    if not code:
        raise RuntimeError(f"no device code in the CUDA flags {gencode_flags} (TORCH_CUDA_ARCH_LIST?)")
    return code


def _nvidia_include_dirs() -> list[str]:
    """Headers of the nvidia-* pip packages a CUDA torch wheel depends on (cusparse.h etc.)."""
    dirs = []
    for entry in sys.path:
        base = os.path.join(entry, "nvidia")
        if not os.path.isdir(base):
            continue
        for sub in sorted(os.listdir(base)):
            inc = os.path.join(base, sub, "include")
            if os.path.isdir(inc):
                dirs.append(inc)
    return dirs


BUILD_INFO = os.path.join("d2z_optim", "build_info.py")  # generated, not tracked (.gitignore)


def _write_build_info(torch_version: str, cuda: str | None) -> None:
    """Record the torch the extension is compiled against: at import, another torch's major.minor
    is reported as such (d2z_optim/backends/cpp_backend.py), not as an obscure loader error."""
    text = (
        '"""Written by setup.py when d2z_optim._C was built: the torch it was compiled against."""\n\n'
        f"TORCH_VERSION = {torch_version!r}\nTORCH_CUDA = {cuda!r}\n"
    )
    old = open(BUILD_INFO).read() if os.path.exists(BUILD_INFO) else None
    if old != text:
        with open(BUILD_INFO, "w") as f:
            f.write(text)


def _extensions():
    import torch
    from torch.utils import cpp_extension

    _write_build_info(torch.__version__, torch.version.cuda)

    force_cpu, force_cuda = _flag("D2Z_FORCE_CPU"), _flag("D2Z_FORCE_CUDA")
    if force_cpu and force_cuda:
        raise RuntimeError("D2Z_FORCE_CPU and D2Z_FORCE_CUDA are both set")
    cuda_home = _cuda_home()
    want_cuda = bool(torch.version.cuda) and cuda_home is not None and not force_cpu
    if force_cuda and not want_cuda:
        raise RuntimeError(
            f"D2Z_FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and CUDA toolkit={cuda_home!r}"
        )

    # No -std: torch's cpp_extension picks the standard its headers need (C++17 or C++20).
    # -fno-math-errno: sqrt without errno, so the loop vectorises (results unchanged).
    # -ffp-contract=off: a*b+c is never silently fused; fmas are explicit (adamw_math.h).
    # -g0 and -s (unless D2Z_DEBUG=1): no debug info in release builds (with it the .so was 12 MB).
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off"] + ([] if _flag("D2Z_DEBUG") else ["-g0"])
    link = [] if _flag("D2Z_DEBUG") else ["-s"]
    if "OpenMP" in torch.__config__.parallel_info():
        cxx.append("-fopenmp")  # at::parallel_for is inline: it needs the compiler's OpenMP
    common = {
        "sources": CPU_SOURCES,
        "include_dirs": [os.path.abspath(CSRC)],
        "depends": HEADERS,
        "extra_link_args": link,
    }
    if not want_cuda:
        return [cpp_extension.CppExtension("d2z_optim._C", extra_compile_args={"cxx": cxx}, **common)]

    _check_cuda_versions(torch.version.cuda, _nvcc_release(cuda_home), cuda_home)
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    # the code torch's build passes to nvcc for that list (names such as "Hopper" resolved), recorded
    # in the extension for the arch gate (d2z_optim/backends/cpp_backend.py: arch_refusal)
    code = cuda_code(cpp_extension._get_cuda_arch_flags())
    cxx.append("-DD2Z_CUDA_CODE=" + ",".join(code))
    nvcc = list(NVCC_FLAGS)
    common["sources"] = CPU_SOURCES + CUDA_SOURCES
    # Fallback headers (e.g. cusparse.h) from the nvidia pip packages, searched after the
    # toolkit's own (-idirafter): their partial copies of cuda_runtime_api.h must not shadow it.
    # The .cu sources are torch-free and need none of them.
    for inc in _nvidia_include_dirs():
        cxx += ["-idirafter", inc]
    return [cpp_extension.CUDAExtension("d2z_optim._C", extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)]


# setup.py commands that build the package (a wheel, an editable install): they need torch
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}

NO_TORCH = """d2z_optim: torch is not importable in this build environment, so the C++ kernel cannot
be built (it compiles against the torch it will run with). pip's build isolation builds in a fresh
environment without your torch. Install torch first, then build without isolation:

    pip install torch
    pip install --no-build-isolation <this folder or git URL>

or, for a pure-Python install that runs only the (slower) "torch" backend, say so:

    D2Z_NO_EXTENSION=1 pip install <this folder or git URL>
"""


def _setup_kwargs():
    if _flag("D2Z_NO_EXTENSION"):  # an explicit pure-Python install
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        if BUILD_COMMANDS & set(sys.argv[1:]):  # never a silent wheel without the kernel
            raise SystemExit(NO_TORCH) from None
        return {}  # metadata only (egg_info, dist_info, sdist): nothing to compile
    return {"ext_modules": _extensions(), "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


if __name__ == "__main__":  # pip and setuptools run it so; tests import NVCC_FLAGS and the helpers
    setup(
        packages=["d2z_optim", "d2z_optim.backends", "d2z_optim.integrations", "d2z_optim.triton_kernels"],
        package_dir={"d2z_optim.triton_kernels": "triton_kernels"},
        **_setup_kwargs(),
    )
