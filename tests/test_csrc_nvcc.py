"""The CUDA sources compile for sm_80 and sm_90 with no spills, at most 64 registers per thread,
and 128-bit global loads and stores on the fp32 path. Needs nvcc only (no GPU, no CUDA torch)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "kernels"  # the torch-free CUDA sources
NVCC = shutil.which("nvcc")
ARCHS = ("80", "90")
# per kernel: adamw_kernel's launch bounds keep 4 blocks of 256 threads per SM (64 registers);
# adamw_kernel_f64 (taken only when a float64 tensor is in the call) keeps 2 (128)
MAX_REGISTERS = {"adamw_kernel_f64": 128, "adamw_kernel": 64, "counter_kernel": 64, "clip_kernel": 64}

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA compile checks need a toolkit")

# fp32 path alone, so that its PTX (not another dtype's) is what the vector-access check sees.
FP32_ONLY = r"""
#include "adamw_cuda.cuh"
using namespace d2z;
__global__ void __launch_bounds__(kBlockThreads, 4) fp32_only(const TensorMeta t, const ElemScalars s) {
  update_chunk<kF32, false>(t, s, blockIdx.x * kChunk, t.n, threadIdx.x, blockDim.x);
}
"""


def _setup_nvcc_flags() -> list[str]:
    """setup.py's own nvcc flags (imported, not copied: a flag dropped there fails here)."""
    spec = importlib.util.spec_from_file_location("d2z_setup", CSRC.parent.parent / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() is not called
    return list(mod.NVCC_FLAGS)


NVCC_FLAGS = _setup_nvcc_flags()


def _nvcc(args, cwd):
    cmd = [NVCC, "-std=c++17", *NVCC_FLAGS, f"-I{CSRC}", *args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def _parse_ptxas(log: str) -> dict[tuple[str, str], dict]:
    """{(function, arch): {"registers": int, "spill_stores": int, "spill_loads": int}} from -Xptxas -v."""
    out: dict[tuple[str, str], dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?(?: for '(sm_\d+)')?", line)
        if m:
            arch = m.group(2) or (current[1] if current else "?")
            current = (m.group(1), arch)
            out.setdefault(current, {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[current]["spill_stores"] = int(m.group(1))
            out[current]["spill_loads"] = int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["registers"] = int(m.group(1))
    return out


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nvcc")
    reports = {}
    for cu in sorted(CSRC.glob("*.cu")):
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
        log = _nvcc(["-c", str(cu), "-o", str(tmp / (cu.stem + ".o")), "-Xptxas", "-v", *gencode], tmp)
        reports[cu.name] = (_parse_ptxas(log), log)
    return reports


def test_every_cu_file_is_checked(ptxas_report):
    assert "adamw_cuda.cu" in ptxas_report


def test_no_spills_and_registers_within_the_launch_bounds(ptxas_report):
    for name, (funcs, log) in ptxas_report.items():
        entries = [k for k, v in funcs.items() if "registers" in v]
        for arch in ARCHS:
            kernels = {f for f, a in entries if a == f"sm_{arch}"}
            for kernel in MAX_REGISTERS:
                assert any(kernel in k for k in kernels), f"{name}: no {kernel} for sm_{arch}\n{log}"
        for (func, arch), v in funcs.items():
            assert v.get("spill_stores", 0) == 0 and v.get("spill_loads", 0) == 0, f"{name} {func} {arch} spills\n{log}"
            if "registers" in v:
                limit = next(n for k, n in MAX_REGISTERS.items() if k in func)  # the longest name first
                assert v["registers"] <= limit, f"{name} {func} {arch}: {v['registers']} registers\n{log}"


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_path_has_128_bit_global_accesses(tmp_path, arch):
    src = tmp_path / "fp32_only.cu"
    src.write_text(FP32_ONLY)
    _nvcc(["-ptx", str(src), "-o", "fp32_only.ptx", f"-arch=compute_{arch}"], tmp_path)
    ptx = (tmp_path / "fp32_only.ptx").read_text()
    assert re.search(r"\bld\.global\.v4\.", ptx), "no 128-bit global load in the fp32 path"
    assert re.search(r"\bst\.global\.v4\.", ptx), "no 128-bit global store in the fp32 path"


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_kernel_ptx_has_128_bit_global_accesses(tmp_path, arch):
    _nvcc(["-ptx", str(CSRC / "adamw_cuda.cu"), "-o", "k.ptx", f"-arch=compute_{arch}"], tmp_path)
    ptx = (tmp_path / "k.ptx").read_text()
    assert len(re.findall(r"\bld\.global\.v4\.", ptx)) >= 4  # p, g, m, v at least
    assert len(re.findall(r"\bst\.global\.v4\.", ptx)) >= 3  # p, m, v


@pytest.mark.parametrize("arch", ARCHS)
def test_no_float_mul_add_sub_left_to_contraction(tmp_path, arch):
    """-fmad=false: every f32/f64 mul, add and sub in the PTX carries .rn, so neither nvcc nor ptxas
    (nor a newer GPU's driver JIT of the embedded PTX) may fuse them; the fmas are the source's own.
    With nvcc's default (-fmad=true) this PTX held ~1,200 plain ones and 3 more fmas."""
    assert "-fmad=false" in NVCC_FLAGS
    _nvcc(["-ptx", str(CSRC / "adamw_cuda.cu"), "-o", "k.ptx", f"-arch=compute_{arch}"], tmp_path)
    ptx = (tmp_path / "k.ptx").read_text()
    plain = re.findall(r"^\s*(?:@%p\d+\s+)?((?:mul|add|sub)(?:\.(?:ftz|sat))*\.f(?:32|64))\b", ptx, re.M)
    assert not plain, f"{len(plain)} float mul/add/sub without .rn, e.g. {plain[:5]}"
    assert len(re.findall(r"^\s*(?:mul|add|sub)\.rn", ptx, re.M)) > 100  # the pattern sees the kernel's math
