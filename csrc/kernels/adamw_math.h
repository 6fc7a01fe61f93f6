// The single source of the AdamW math in C++: per-step scalars and the per-element update.
//
// Torch-free and usable from host code (g++: the CPU kernel, the CUDA grid replay) and device
// code (nvcc). Semantics follow d2z_optim/backends/torch_backend.py:
//   scalars, once per tensor (double, rounded once to the compute type):
//     idx = min(step_count, T-1); lr_t = lr * lr_table[idx]; wm = wd_table[idx]
//     decay = (independent_wd ? lr_table[idx] : lr_t) * (weight_decay * wm)
//     t = steps[i] + 1 (float32, written back); bc1 = 1 - beta1^t; bc2_sqrt = sqrt(1 - beta2^t)
//     step_size = lr_t / bc1
//   element, in the compute type: fp32 registers (fp32/bf16/fp16 storage), fp64 for float64:
//     g = grad * (maximize ? -1 : 1) / grad_scale
//     p = p - decay * p;  m = lerp(m, g, 1 - beta1) as ATen computes it (see adamw_element)
//     v = beta2 * v + (1 - beta2) * g * g
//     vhat = amsgrad ? (vmax = max(vmax, v)) : v;  p = p - step_size * m / (sqrt(vhat) / bc2_sqrt + eps)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define D2Z_HD __host__ __device__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#define D2Z_HD
#endif

#define D2Z_INLINE D2Z_HD inline __attribute__((always_inline))

namespace d2z {

// Storage dtypes of params/grads/states (grads and states have their param's dtype). The math runs
// in float for the first three and in double for kF64 (as torch's fused kernels do: opmath).
enum Dtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

// Columns of the hparams [G, 8] float64 tensor. kRounding: 0 rounds every 16-bit value the step
// writes to nearest even; seed + 1 (seed an integer in [0, 2^32)) rounds it stochastically.
enum HpCol : int { kLr = 0, kBeta1, kBeta2, kEps, kWeightDecay, kAmsgrad, kMaximize, kRounding, kHpCols = 8 };

// Per-tensor scalars of one step, rounded once from double to the compute type T (float, or
// double for float64 parameters).
template <typename T>
struct ScalarsOf {
  T gmul;         // (maximize ? -1 : 1) / grad_scale: exact for 1 and powers of two
  T neg_decay;    // -decay: p = fma(-decay, p, p)
  T lerp_w;       // w = 1 - beta1 (the lerp weight, rounded to T) when w < 0.5, else w - 1 (exact)
  bool lerp_low;  // w < 0.5
  T beta2;
  T omb2;      // 1 - beta2
  T bc2_sqrt;  // sqrt(1 - beta2^t)
  T eps;
  T neg_step_size;  // -lr_t / (1 - beta1^t)
};
using ElemScalars = ScalarsOf<float>;

// hp: this tensor's hparams row; lr_mult/wd_mult: lr_table[idx], wd_table[idx]; t: the new step
// (old + 1); grad_scale: nullptr when absent. All in double, as torch's Python scalars are.
template <typename T = float>
D2Z_INLINE ScalarsOf<T> make_scalars(const double* hp, float lr_mult, float wd_mult, float t, bool independent_wd,
                                     const float* grad_scale) {
  const double m = static_cast<double>(lr_mult);
  const double wm = static_cast<double>(wd_mult);
  const double lr_t = m * hp[kLr];
  const double decay = (independent_wd ? m : lr_t) * (hp[kWeightDecay] * wm);
  const double td = static_cast<double>(t);
  const double bc1 = 1.0 - pow(hp[kBeta1], td);
  const double bc2_sqrt = sqrt(1.0 - pow(hp[kBeta2], td));
  double gmul = hp[kMaximize] != 0.0 ? -1.0 : 1.0;
  if (grad_scale != nullptr) gmul = gmul * (1.0 / static_cast<double>(*grad_scale));
  ScalarsOf<T> s;
  s.gmul = static_cast<T>(gmul);
  s.neg_decay = static_cast<T>(-decay);
  const T w1 = static_cast<T>(1.0 - hp[kBeta1]);
  s.lerp_low = w1 < T(0.5);
  s.lerp_w = s.lerp_low ? w1 : w1 - T(1);
  s.beta2 = static_cast<T>(hp[kBeta2]);
  s.omb2 = static_cast<T>(1.0 - hp[kBeta2]);
  s.bc2_sqrt = static_cast<T>(bc2_sqrt);
  s.eps = static_cast<T>(hp[kEps]);
  s.neg_step_size = static_cast<T>(-lr_t / bc1);
  return s;
}

// a * b + c. On the device and in kFma host code a fused multiply-add (one rounding). The
// kFma=false variant is for host code compiled without hardware FMA, where std::fma is a slow libm
// call: there it is a plain multiply then add (two roundings), fine for the accuracy target.
template <bool kFma>
D2Z_INLINE float madd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  if constexpr (kFma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
#endif
}

template <bool kFma>
D2Z_INLINE double madd(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  if constexpr (kFma) {
    return __builtin_fma(a, b, c);
  } else {
    return a * b + c;
  }
#endif
}

D2Z_INLINE float sqrt_of(float x) { return sqrtf(x); }
D2Z_INLINE double sqrt_of(double x) { return sqrt(x); }

// The update of one element in compute type T; p, m, v (and vmax when kAmsgrad) updated in place.
// kLow: -1 reads s.lerp_low; 0 or 1 is its value known at compile time (a loop the compiler should
// vectorise over arrays of mixed widths, where GCC 12 does not vectorise the invariant select).
template <bool kFma, bool kAmsgrad, typename T, int kLow = -1>
D2Z_INLINE void adamw_element(T& p, T g, T& m, T& v, T& vmax, const ScalarsOf<T>& s) {
  g = g * s.gmul;
  p = madd<kFma>(s.neg_decay, p, p);
  // ATen's lerp: fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g), so beta1 = 0 gives m = g
  // exactly (m + 1 * (g - m) would not: g - m rounds at m's magnitude).
  const bool low = kLow < 0 ? s.lerp_low : kLow == 1;
  m = madd<kFma>(s.lerp_w, g - m, low ? m : g);
  v = madd<kFma>(s.beta2, v, (s.omb2 * g) * g);
  T vhat = v;
  if constexpr (kAmsgrad) {
    vmax = (vmax > v || vmax != vmax) ? vmax : v;  // a NaN in either propagates, as torch.maximum
    vhat = vmax;
  }
  const T denom = sqrt_of(vhat) / s.bc2_sqrt + s.eps;
  p = madd<kFma>(s.neg_step_size, m / denom, p);
}

// ---- storage conversions (round to nearest even), bit-exact with torch's .to(dtype) ----
D2Z_INLINE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

D2Z_INLINE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// A double from / to its two 32-bit halves (little-endian: low word first), for 128-bit accesses.
D2Z_INLINE double bits_to_double(uint32_t lo, uint32_t hi) {
  const uint64_t u = (static_cast<uint64_t>(hi) << 32) | lo;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double d;
  std::memcpy(&d, &u, 8);
  return d;
#endif
}

D2Z_INLINE void double_to_bits(double d, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__)
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, 8);
#endif
  lo = static_cast<uint32_t>(u);
  hi = static_cast<uint32_t>(u >> 32);
}

D2Z_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

D2Z_INLINE uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded);
#endif
}

D2Z_INLINE float f16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  // Shift exponent and mantissa into place, rebias; Inf/NaN get the rest of the exponent;
  // subnormals are normalised by a float subtraction (exact). Branch-free so it vectorises.
  const uint32_t hu = h;
  uint32_t o = (hu & 0x7fffu) << 13;
  const uint32_t exp = o & 0x0f800000u;
  o += (127u - 15u) << 23;
  // Inf/NaN; a NaN comes back quiet, as the hardware conversion (and torch) gives it.
  const uint32_t o_inf = (o + ((128u - 16u) << 23)) | ((hu & 0x3ffu) != 0u ? 0x00400000u : 0u);
  const float sub = bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23);
  const uint32_t o_sub = float_to_bits(sub);
  o = exp == 0x0f800000u ? o_inf : (exp == 0u ? o_sub : o);
  return bits_to_float(o | ((hu & 0x8000u) << 16));
#endif
}

D2Z_INLINE uint16_t float_to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // Overflow to Inf (NaN stays a quiet NaN).
  const uint32_t o_big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // Subnormal results: adding 0.5f aligns the mantissa so the FPU rounds to nearest even.
  const uint32_t o_sub = float_to_bits(bits_to_float(u) + 0.5f) - 0x3f000000u;
  // Normal results: rebias, round to nearest even on bit 13.
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t o_norm = (u + 0xc8000fffu + mant_odd) >> 13;  // (15 - 127) << 23 + 0xfff, mod 2^32
  const uint32_t o = u >= 0x47800000u ? o_big : (u < 0x38800000u ? o_sub : o_norm);
  return static_cast<uint16_t>(o | (sign >> 16));
#endif
}

// ---- stochastic rounding: a counter-based generator and the roundings that take its bits ----
// Random bits are a function of (seed, schedule position, tensor, element) only: no generator
// state, the same bits on every backend (d2z_optim/backends/torch_backend.py and the Triton kernel
// compute the same functions). sr_mix is a 32-bit integer hash (xor-shift-multiply; multipliers
// below 2^31 so that int64 tensor arithmetic computes it exactly).
D2Z_INLINE uint32_t sr_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// One tensor's key at one step: the seed, the schedule position (the step counter before this step,
// mod 2^32) and the tensor's position among the step's tensors on its device (groups in order).
D2Z_INLINE uint32_t sr_key(uint32_t seed, uint32_t position, uint32_t tensor) {
  return sr_mix(sr_mix(sr_mix(seed) ^ position) ^ tensor);
}

// Element e's random word (e: its offset, mod 2^32): the parameter takes its low 16 bits, exp_avg
// its high 16, exp_avg_sq (and max_exp_avg_sq, so that equal values round alike) sr_second's.
D2Z_INLINE uint32_t sr_word(uint32_t key, int64_t e) { return sr_mix(key + static_cast<uint32_t>(e)); }

// exp_avg_sq's 16 bits: the high half of the word times an odd constant, which depends on all 32
// bits (one multiply instead of a second hash: the CPU kernel is compute-bound in bf16, where
// bench_rounding.py measured stochastic rounding at +28% over round-to-nearest on 1 x 64M with a
// second hash per element, +18% with this).
D2Z_INLINE uint32_t sr_second(uint32_t w) { return (w * 0x5851f42du) >> 16; }

// The 16 random bits of array `stream` (0: the parameter, 1: exp_avg, 2: exp_avg_sq and its max).
D2Z_INLINE uint32_t sr_r16(uint32_t w, int stream) {
  return stream == 0 ? w & 0xffffu : (stream == 1 ? w >> 16 : sr_second(w));
}

// float32 -> bfloat16 rounded up with probability (the 16 bits dropped) / 2^16: r16 in [0, 2^16).
D2Z_INLINE uint16_t float_to_bf16_sr(float f, uint32_t r16) {
  const uint32_t u = float_to_bits(f);
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(is_nan ? 0x7fc0u : (u + r16) >> 16);
}

// float32 -> float16 rounded up with probability (the dropped bits, to 16 of them) / their unit.
D2Z_INLINE uint16_t float_to_f16_sr(float f, uint32_t r16) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // normal results: rebias, 13 bits dropped (a carry may reach the next binade, or Inf)
  const uint32_t o_norm = (u + 0xc8000000u + (r16 >> 3)) >> 13;
  // subnormal results, in units of 2^-24: M * 2^-s with s = 126 - exponent (>= 14); the integer
  // part q and the next 16 bits f (shifts capped at 31: M < 2^24)
  const uint32_t e = u >> 23;
  const uint32_t mant = (u & 0x7fffffu) | (e != 0u ? 0x800000u : 0u);
  const uint32_t s = 126u - (e != 0u ? e : 1u);
  const uint32_t q = mant >> (s < 31u ? s : 31u);
  const uint32_t fr = s >= 16u ? (mant >> (s - 16u < 31u ? s - 16u : 31u)) & 0xffffu : (mant << (16u - s)) & 0xffffu;
  const uint32_t o_sub = q + ((fr + r16) >> 16);
  const uint32_t o_big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t o = u >= 0x47800000u ? o_big : (u < 0x38800000u ? o_sub : o_norm);
  return static_cast<uint16_t>(o | (sign >> 16));
}

// ---- master weights as bf16 + remainder (master_weights="remainders") ----
// An fp32 master value is its bf16 parameter (the nearest, ties away from zero: the high 16 bits,
// plus one where the low 16 bits read as an int16 are negative) and that int16 remainder; the pair
// gives back the fp32 bits exactly. A NaN keeps its high bits, quieted, and a zero remainder (the
// carry would turn its sign or wrap). d2z_optim/backends/remainders.py is the same in torch.
D2Z_INLINE float remainder_join(uint16_t hi, int16_t lo) {
  const uint32_t h = static_cast<uint32_t>(hi) - (lo < 0 ? 1u : 0u);
  return bits_to_float((h << 16) | static_cast<uint16_t>(lo));
}

D2Z_INLINE void remainder_split(float x, uint16_t& hi, int16_t& lo) {
  const uint32_t u = float_to_bits(x);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const int16_t l = static_cast<int16_t>(static_cast<uint16_t>(u & 0xffffu));
  lo = nan ? int16_t(0) : l;
  hi = static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : (u >> 16) + (l < 0 ? 1u : 0u));
}

// How a storage dtype is loaded into its compute type and stored back.
template <int kDtype>
struct Storage;
template <>
struct Storage<kF32> {
  using type = float;
  using compute = float;
  static D2Z_INLINE float load(float x) { return x; }
  static D2Z_INLINE float store(float x) { return x; }
  static D2Z_INLINE float store_sr(float x, uint32_t) { return x; }
  static constexpr bool kNarrow = false;  // 16 bits: stochastic rounding applies
};
template <>
struct Storage<kF64> {
  using type = double;
  using compute = double;
  static D2Z_INLINE double load(double x) { return x; }
  static D2Z_INLINE double store(double x) { return x; }
  static D2Z_INLINE double store_sr(double x, uint32_t) { return x; }
  static constexpr bool kNarrow = false;
};
template <>
struct Storage<kBF16> {
  using type = uint16_t;
  using compute = float;
  static D2Z_INLINE float load(uint16_t x) { return bf16_to_float(x); }
  static D2Z_INLINE uint16_t store(float x) { return float_to_bf16(x); }
  static D2Z_INLINE uint16_t store_sr(float x, uint32_t r16) { return float_to_bf16_sr(x, r16); }
  static constexpr bool kNarrow = true;
};
template <>
struct Storage<kF16> {
  using type = uint16_t;
  using compute = float;
  static D2Z_INLINE float load(uint16_t x) { return f16_to_float(x); }
  static D2Z_INLINE uint16_t store(float x) { return float_to_f16(x); }
  static D2Z_INLINE uint16_t store_sr(float x, uint32_t r16) { return float_to_f16_sr(x, r16); }
  static constexpr bool kNarrow = true;
};

}  // namespace d2z
