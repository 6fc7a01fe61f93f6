"""Master weights as a bfloat16 parameter and an int16 remainder (``master_weights="remainders"``).

An fp32 master value ``x`` is kept as two 16-bit halves: the bf16 parameter the model reads (``x``
rounded to the nearest bf16, ties away from zero) and an int16 remainder, such that the pair gives
back the fp32 bits of ``x`` exactly. With ``u`` the bits of ``x``: the remainder is the low 16 bits
read as an int16, and the parameter is the high 16 bits plus one where that remainder is negative
(the low half was at least half a bf16 ulp: the nearest bf16 is the next one up in magnitude).
Joining undoes it: high bits = parameter bits minus one where the remainder is negative. A NaN
keeps its high bits (quieted) and a zero remainder: the carry would change its sign or wrap.

2 bytes per parameter instead of a 4-byte fp32 copy; the step computes in fp32 from the joined
value and writes both halves. The kernels' version is ``remainder_join`` / ``remainder_split`` in
``csrc/kernels/adamw_math.h`` and the Triton kernel's ``_join`` / ``_split``: the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["join", "split"]


def join(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master values of a bf16 ``param`` and its int16 ``remainder`` (same shape)."""
    hi = param.view(torch.int16).to(torch.int64) & 0xFFFF
    lo = remainder.to(torch.int64)
    hi = (hi - (lo < 0).to(torch.int64)) & 0xFFFF
    bits = (hi << 16) | (lo & 0xFFFF)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def split(x: Tensor) -> tuple[Tensor, Tensor]:
    """The bf16 parameter and int16 remainder of fp32 ``x`` (join(*split(x)) == x, bit for bit,
    NaNs aside: a NaN stays a NaN)."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    lo = u & 0xFFFF
    lo = torch.where(lo >= 0x8000, lo - 0x10000, lo)  # as an int16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    hi = torch.where(nan, (u >> 16) | 0x40, (u >> 16) + (lo < 0).to(torch.int64))
    lo = torch.where(nan, 0, lo)
    hi = torch.where(hi >= 0x8000, hi - 0x10000, hi)
    return hi.to(torch.int16).view(torch.bfloat16).view(x.shape), lo.to(torch.int16).view(x.shape)
