"""Ahead-of-time compilation of the Triton kernels for GPUs that are not here.

``triton.compile`` with a ``GPUTarget`` needs no GPU: for sm_80 and sm_90, every
storage dtype, with and without amsgrad, the kernel compiles; the fp32 build (whose
full chunks of 16-byte aligned tensors take the hinted, unmasked path) has 128-bit
global loads and stores; bf16 results are rounded to nearest even; sqrt and division
are the IEEE ones; and ptxas reports no stack frame and no spills.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import tempfile

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16", "fp64")
SIGNATURE = {
    "meta_ptr": "*i64",
    "work_ptr": "*i64",
    "hp_ptr": "*fp64",
    "lr_table_ptr": "*fp32",
    "wd_table_ptr": "*fp32",
    "table_len": "i64",
    "step_count_ptr": "*i64",
    "grad_scale_ptr": "*fp32",
    "found_inf_ptr": "*fp32",
}


# parameters of one dtype with moments stored in another (exp_avg_dtype): "param+moments"; "bf16r":
# bf16 parameters with remainders (master_weights="remainders", their own launch)
LEAN = ("fp32+bf16", "bf16+fp32", "fp16+fp32", "bf16r+fp32")


@functools.cache
def _compile(dtype: str, arch: int, amsgrad: bool = True):
    import torch
    import triton
    import triton.language as tl
    from d2z_optim.triton_kernels import adamw
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from d2z_optim.backends import triton_backend

    dtype, _, moments = dtype.partition("+")
    remainder = dtype == "bf16r"
    dtype = "bf16" if remainder else dtype
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    launch = (names[dtype], names[moments or dtype], names[moments or dtype]) + ((True,) if remainder else ())
    torch_dtype = triton_backend.block_dtype(launch)
    tl_dtype = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
    constexprs = dict(
        DTYPE=tl_dtype[dtype],
        M_DTYPE=tl_dtype[moments or dtype],
        V_DTYPE=tl_dtype[moments or dtype],
        COMPUTE=tl.float64 if dtype == "fp64" else tl.float32,
        INDEPENDENT_WD=False,
        HAS_GRAD_SCALE=True,
        HAS_FOUND_INF=True,
        AMSGRAD=amsgrad,
        REMAINDER=remainder,
        BLOCK=adamw.BLOCK[torch_dtype],
        CHUNK=adamw.CHUNK_BLOCKS * adamw.BLOCK[torch_dtype],
        SUB=adamw.sub_block(adamw.BLOCK[torch_dtype]),
        **triton_backend.COLUMN_ARGS,
    )
    sig = dict(SIGNATURE, **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn=adamw.adamw_kernel, signature=sig, constexprs=constexprs)
    options = {"num_warps": adamw.NUM_WARPS, "enable_fp_fusion": adamw.FP_FUSION}  # as the launcher
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _ptxas_report(ptx: str, arch: int) -> str:
    """ptxas -v on the PTX: the ptxas and the flags Triton itself uses for this architecture."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}"]
        proc = subprocess.run(
            [get_ptxas(arch).path, *flags, f.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
        )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def adamw_num_warps() -> int:
    from d2z_optim.triton_kernels import adamw

    return adamw.NUM_WARPS


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES + LEAN)
@pytest.mark.parametrize("amsgrad", [True, False])
def test_compiles_without_spills(dtype, arch, amsgrad):
    k = _compile(dtype, arch, amsgrad)
    ptx = k.asm["ptx"]
    assert k.asm["cubin"], "no cubin"
    assert ".local" not in ptx  # no local memory (stack) in the PTX
    report = _ptxas_report(ptx, arch)
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in report, report
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    # 256 threads per program: at most 255 registers per thread, else the launch fails
    # (measured: 48-112 on sm_80, 74-182 on sm_90; see the BLOCK comment in adamw.py)
    assert regs * 32 * adamw_num_warps() <= 65536, report
    # IEEE sqrt and division, never the approximate ones (float64: the element math in f64)
    assert "sqrt.approx" not in ptx and "div.approx" not in ptx and "div.full" not in ptx
    width = "f64" if dtype == "fp64" else "f32"
    assert f"sqrt.rn.{width}" in ptx and f"div.rn.{width}" in ptx
    # no shared-memory round trip anywhere, the masked path (tails, unaligned tensors) included: an
    # elementwise update needs none (a layout conversion between loads and stores put two bar.sync
    # per stored array in each masked iteration before)
    assert "bar.sync" not in ptx and "barrier" not in ptx


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_aligned_fp32_and_fp64_use_128_bit_accesses(arch, dtype):
    ptx = _compile(dtype, arch).asm["ptx"]
    wide = r"\.v4\.|\.v2\.b64" if dtype == "fp64" else r"\.v4\."  # 128 bits: 4 x 32 or 2 x 64
    assert re.search(rf"ld\.global({wide})", ptx), "no 128-bit loads: the aligned path lost its alignment hints"
    assert re.search(rf"st\.global({wide})", ptx), "no 128-bit stores"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_vectorised_and_rounded_to_nearest(dtype, arch):
    ptx = _compile(dtype, arch).asm["ptx"]
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx  # 8 halves per 128-bit access
    if dtype == "bf16":  # stored from the bits (to nearest even, or stochastically): no truncating cvt
        to_bf16 = re.findall(r"cvt(\.\w+)*\.bf16(x2)?\.f32", ptx)
        assert all(c[0] in (".rn", ".satfinite") for c in to_bf16), f"a bf16 conversion not to nearest even: {to_bf16}"
        assert "cvt.rz." not in ptx  # (cvt.rzi.s64.f64: the seed, an integer-valued float64, to an integer)


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_moments_are_vectorised_and_rounded_to_nearest(arch):
    """fp32 parameters with bf16 moments: 128-bit accesses to p and g, 64-bit ones to the moments
    (the same elements per thread), the moments rounded to nearest even from their bits (integer
    adds and a shift: no truncating conversion anywhere)."""
    ptx = _compile("fp32+bf16", arch).asm["ptx"]
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx
    assert re.search(r"ld\.global(\.\w+)*\.v2\.b32", ptx) or re.search(r"ld\.global\.v2", ptx), "moments not vectorised"
    assert "cvt.rz." not in ptx


def test_counter_kernel_compiles():
    import triton
    from d2z_optim.triton_kernels import adamw
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from d2z_optim.backends import triton_backend

    constexprs = {"HAS_FOUND_INF": True, "BLOCK": adamw.COUNTER_BLOCK, **triton_backend.COUNTER_COLUMN_ARGS}
    sig = {
        "meta_ptr": "*i64",
        "n_tensors": "i64",
        "step_count_ptr": "*i64",
        "found_inf_ptr": "*fp32",
        **{k: "constexpr" for k in constexprs},
    }
    for arch in ARCHS:
        src = ASTSource(fn=adamw.counter_kernel, signature=sig, constexprs=constexprs)
        options = {"num_warps": 4, "enable_fp_fusion": adamw.FP_FUSION}
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        assert k.asm["cubin"] and ".local" not in k.asm["ptx"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inf", [False, True], ids=["l2", "inf"])
def test_clip_kernels_compile_without_spills(dtype, arch, inf):
    import torch
    import triton
    import triton.language as tl
    from d2z_optim.triton_kernels import adamw, clip
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from d2z_optim.backends import triton_backend

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[dtype]
    cols = triton_backend.MetaCol
    norm_consts = dict(
        META_COLS=triton_backend.META_COLS, COL_G=int(cols.G), COL_NUMEL=int(cols.NUMEL),
        DTYPE={"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}[dtype],
        COMPUTE=tl.float64 if dtype == "fp64" else tl.float32, INF=inf, BLOCK=adamw.BLOCK[torch_dtype],
        CHUNK=adamw.CHUNK_BLOCKS * adamw.BLOCK[torch_dtype],
    )  # fmt: skip
    norm_sig = {
        "meta_ptr": "*i64",
        "work_ptr": "*i64",
        "partial_ptr": "*fp64",
        **dict.fromkeys(norm_consts, "constexpr"),
    }
    fin_consts = dict(
        INF=inf, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, CLIP=True, SPIKE=True, BLOCK=clip.FINALIZE_BLOCK
    )
    fin_sig = {
        "partial_ptr": "*fp64", "n_partials": "i64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
        "ring_ptr": "*fp32", "window": "i64", "recorded_ptr": "*i64", "grad_norm_ptr": "*fp32",
        "grad_scale_out_ptr": "*fp32", "found_out_ptr": "*fp32", "max_norm": "fp32", "sigma": "fp32",
        **dict.fromkeys(fin_consts, "constexpr"),
    }  # fmt: skip
    for fn, sig, consts, warps in (
        (clip.norm_kernel, norm_sig, norm_consts, adamw.NUM_WARPS),
        (clip.clip_finalize_kernel, fin_sig, fin_consts, 4),
    ):
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        options = {"num_warps": warps, "enable_fp_fusion": adamw.FP_FUSION}
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        report = _ptxas_report(k.asm["ptx"], arch)
        assert k.asm["cubin"] and "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in report, report
        assert "sqrt.approx" not in k.asm["ptx"] and "div.approx" not in k.asm["ptx"]
