"""Stochastic rounding in PyTorch ops: the counter-based generator and the roundings of
``csrc/kernels/adamw_math.h`` (``sr_mix``, ``sr_key``, ``sr_word``, ``float_to_bf16_sr``,
``float_to_f16_sr``), the same bits computed with int64 tensor arithmetic (no host read).

A value rounded stochastically rounds away from zero with probability (the bits dropped) / (their
unit), to 16 bits of resolution: unbiased where round-to-nearest loses an update smaller than
half an ulp. The random bits are a function of (seed, schedule position, tensor, element) only:

* key = mix(mix(mix(seed) ^ position) ^ tensor), once per tensor and step (position: the step
  counter before the step, mod 2^32; tensor: its position among the step's tensors on its device);
* element e (its offset in memory order) draws one word w = mix(key + e): the parameter takes its
  low 16 bits, ``exp_avg`` its high 16, ``exp_avg_sq`` and ``max_exp_avg_sq`` the high 16 of
  w * 0x5851F42D mod 2^32 (``sr_second``: one multiply, not a second hash).

Every value here is an unsigned 32-bit integer held in an int64 tensor; the multipliers are below
2^31 so each product stays below 2^63 (exact) before it is reduced mod 2^32.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bits", "key", "mix", "narrow", "round_stochastic", "second", "word"]

_M32 = 0xFFFFFFFF


def narrow(dtype: torch.dtype) -> bool:
    """A 16-bit floating dtype: stochastic rounding applies to what is stored in it."""
    return dtype in (torch.bfloat16, torch.float16)


def mix(x: Tensor) -> Tensor:
    """``sr_mix``: a 32-bit integer hash (xor-shift-multiply)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def key(seed: int, position: Tensor, tensor: int) -> Tensor:
    """``sr_key``: one tensor's key at the step whose counter (int64, on the device) is ``position``."""
    s = mix(torch.full((), seed & _M32, dtype=torch.int64, device=position.device))
    return mix(mix(s ^ (position.reshape(()) & _M32)) ^ (tensor & _M32))


def _offsets(like: Tensor) -> Tensor:
    """Each element's offset from the first in memory (the fused kernels' element index)."""
    span = 1 + sum((n - 1) * st for n, st in zip(like.shape, like.stride()) if n > 0)
    flat = torch.arange(span if like.numel() else 0, dtype=torch.int64, device=like.device)
    return flat.as_strided(like.shape, like.stride())


def word(k: Tensor, like: Tensor) -> Tensor:
    """``sr_word`` for every element of ``like`` (by its offset in memory)."""
    return mix((k + _offsets(like)) & _M32)


def second(w: Tensor) -> Tensor:
    """``sr_second``: exp_avg_sq's 16 bits of the word ``w``."""
    return ((w * 0x5851F42D) & _M32) >> 16


def bits(w: Tensor, name: str) -> Tensor:
    """The 16 random bits array ``name`` (param, exp_avg, exp_avg_sq, max_exp_avg_sq) takes of ``w``."""
    if name == "param":
        return w & 0xFFFF
    return w >> 16 if name == "exp_avg" else second(w)


def _to_int16(bits: Tensor) -> Tensor:
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16)  # [0, 2^16) -> the int16 with those bits


def round_stochastic(x: Tensor, dtype: torch.dtype, r16: Tensor) -> Tensor:
    """float32 ``x`` rounded stochastically to ``dtype`` (bfloat16 or float16) with the random
    16-bit integers ``r16`` (int64, ``x``'s shape): ``float_to_bf16_sr`` / ``float_to_f16_sr``."""
    u = x.view(torch.int32).to(torch.int64) & _M32
    if dtype == torch.bfloat16:
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        o = torch.where(nan, 0x7FC0, (u + r16) >> 16)
        return _to_int16(o).view(torch.bfloat16)
    if dtype != torch.float16:
        raise ValueError(f"stochastic rounding writes bfloat16 or float16, not {dtype}")
    sign = u & 0x80000000
    u = u ^ sign
    o_norm = ((u + 0xC8000000 + (r16 >> 3)) & _M32) >> 13
    e = u >> 23
    mant = (u & 0x7FFFFF) | torch.where(e != 0, 0x800000, 0)
    s = 126 - torch.where(e != 0, e, 1)
    q = mant >> s.clamp(max=31)
    fr = torch.where(s >= 16, (mant >> (s - 16).clamp(0, 31)) & 0xFFFF, (mant << (16 - s).clamp(min=0)) & 0xFFFF)
    o_sub = q + ((fr + r16) >> 16)
    o_big = torch.where(u > 0x7F800000, 0x7E00, 0x7C00)
    o = torch.where(u >= 0x47800000, o_big, torch.where(u < 0x38800000, o_sub, o_norm))
    return _to_int16(o | (sign >> 16)).view(torch.float16)
