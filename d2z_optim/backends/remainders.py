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


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """The low and high 16 bits of each 32-bit element of ``x``, as int16 (little-endian halves)."""
    pairs = x.reshape(-1).view(torch.int16).view(*x.shape, 2)
    return pairs[..., 0], pairs[..., 1]


def _word(lo: Tensor, hi: Tensor) -> Tensor:
    """The float32 whose low and high 16 bits are the int16 ``lo`` and ``hi``."""
    return torch.stack((lo, hi), dim=-1).view(torch.float32).view(lo.shape)


def join(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master values of a bf16 ``param`` and its int16 ``remainder`` (same shape)."""
    lo = remainder.to(torch.int16)
    # never wraps for a split value: a carry was added only below 0x7FFF and 0xFFFF (NaN high halves)
    hi = param.view(torch.int16) - (lo < 0).to(torch.int16)
    return _word(lo, hi)


def split(x: Tensor) -> tuple[Tensor, Tensor]:
    """The bf16 parameter and int16 remainder of fp32 ``x`` (join(*split(x)) == x, bit for bit,
    NaNs aside: a NaN stays a NaN)."""
    lo, hi = _halves(x)
    nan = torch.isnan(x)
    # the carry never wraps: a high half of 0x7FFF or 0xFFFF is a NaN's, and NaNs take no carry
    hi = torch.where(nan, hi | 0x40, hi + (lo < 0).to(torch.int16))
    lo = torch.where(nan, torch.zeros_like(lo), lo)
    return hi.view(torch.bfloat16).view(x.shape), lo.view(x.shape)
