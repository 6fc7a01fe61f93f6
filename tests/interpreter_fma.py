"""An fma that rounds once for Triton interpreters whose ``tl.fma`` rounds twice (before 3.9).

The kernel's lerp is ``tl.fma`` as ATen's (one rounding on the GPU). Triton 3.8's interpreter
computes ``x * y + z`` in the tensor's dtype, two roundings, so a bit-for-bit test against torch
fails under that interpreter only (the GPU and Triton 3.9's interpreter round once). The tests
install this in such an interpreter instead of loosening the kernel's assertions.

float32 / float16 / bfloat16: the product is exact in float64 and the sum is taken there with
round-to-odd (TwoSum gives the error; an inexact even result moves one ulp toward it), which
then rounds once to the narrow dtype exactly as a single rounding would (53 >= 2 * 24 + 2).
float64 keeps the interpreter's two roundings (no wider type in numpy); the float64 tests
compare against the float64 reference with tolerances, not bit for bit.
"""

from __future__ import annotations

import numpy as np


def fma_via_float64(x, y, z):
    x, y, z = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (x, y, z)))
    p = x * y
    s = p + z
    b = s - z
    e = (p - b) + (z - (s - b))
    odd = (s.view(np.int64) & 1) == 1
    move = np.isfinite(s) & (e != 0) & ~odd
    s = np.where(move, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
    return s


def _rounds_twice(builder_cls, handle_cls, tl) -> bool:
    one = np.float32(1)
    x = np.array([one + np.float32(2.0**-12)], dtype=np.float32)
    z = np.array([-(one + np.float32(2.0**-11))], dtype=np.float32)
    h = lambda a: handle_cls(a, tl.float32)
    out = builder_cls.create_fma(None, h(x), h(x), h(z)).data
    return float(out[0]) != 2.0**-24


def install() -> bool:
    """Patch the interpreter if its fma rounds twice; True when patched."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
    if not _rounds_twice(builder, handle, tl):
        return False
    twice = builder.create_fma

    def create_fma(self, x, y, z):
        if z.data.dtype == np.float64:
            return twice(self, x, y, z)
        return handle(fma_via_float64(x.data, y.data, z.data).astype(z.data.dtype), z.dtype.scalar)

    builder.create_fma = create_fma
    assert not _rounds_twice(builder, handle, tl)
    return True
