// The CPU item loops: an inner loop the compiler vectorises, built for AVX-512, AVX2+FMA and the
// portable baseline and chosen at run time (no -march=native needed). Torch-free.
#include "adamw_cpu_kernel.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace d2z {
namespace {

constexpr int64_t kCpuChunk = 1 << 16;  // elements per work item
constexpr int64_t kItemCost = 256;      // fixed cost of an item (scalars, dispatch), in elements

using Item = CpuItems::Item;

// The scalars by value: a reference could alias the arrays written, and the compiler would then
// reload them each iteration and not vectorise (1 x 16M fp32: 43 ms instead of ~15 ms).
// D: the storage of p and g; M: of m, v and vmax (D, or for lean moments another of fp32/bf16/fp16:
// one pass, vectorised over the mixed widths, 8 fp32 p, g with 8 bf16 m, v per AVX2 vector, given
// kLow = 1: GCC 12 does not vectorise mixed widths around the lerp's invariant select).
// kRem: a bf16 parameter with a remainder (master_weights="remainders"), D = kBF16: the fp32 master
// is joined from both halves, updated, and split back (never rounded stochastically).
template <int D, int M, bool kFma, bool kAms, int kLow = -1, bool kSR = false, bool kRem = false>
__attribute__((always_inline)) inline void cpu_loop(const CpuTensor& ct, int64_t b, int64_t e,
                                                    const ScalarsOf<typename Storage<D>::compute> s,
                                                    const uint32_t key = 0) {
  static_assert(!kRem || D == kBF16, "a remainder completes a bfloat16 parameter");
  using T = typename Storage<D>::type;
  using TM = typename Storage<M>::type;
  using C = typename Storage<D>::compute;
  using S = Storage<D>;
  using SM = Storage<M>;
  T* __restrict__ p = static_cast<T*>(ct.p);
  const T* __restrict__ g = static_cast<const T*>(ct.g);
  TM* __restrict__ m = static_cast<TM*>(ct.m);
  TM* __restrict__ v = static_cast<TM*>(ct.v);
  TM* __restrict__ x = static_cast<TM*>(ct.vmax);
  int16_t* __restrict__ r = ct.rem;
  // stochastic rounding's counter, key + i mod 2^32 (sr_word: adamw_math.h), as a 32-bit
  // induction variable (a 64-bit one is narrowed per vector: measured slower)
  uint32_t ctr = key + static_cast<uint32_t>(b);
  for (int64_t i = b; i < e; ++i, ++ctr) {
    C fp = kRem ? remainder_join(p[i], r[i]) : S::load(p[i]), fm = SM::load(m[i]), fv = SM::load(v[i]);
    C fx = kAms ? SM::load(x[i]) : C(0);
    adamw_element<kFma, kAms, C, kLow>(fp, S::load(g[i]), fm, fv, fx, s);
    if constexpr (kRem) remainder_split(fp, p[i], r[i]);
    if constexpr (kSR) {  // stochastic rounding of the 16-bit arrays
      const uint32_t w0 = sr_mix(ctr);
      if constexpr (!kRem) p[i] = S::store_sr(fp, w0 & 0xffffu);
      m[i] = SM::store_sr(fm, w0 >> 16);
      const uint32_t w1 = SM::kNarrow ? sr_second(w0) : 0u;
      v[i] = SM::store_sr(fv, w1);
      if (kAms) x[i] = SM::store_sr(fx, w1);
    } else {
      if constexpr (!kRem) p[i] = S::store(fp);
      m[i] = SM::store(fm);
      v[i] = SM::store(fv);
      if (kAms) x[i] = SM::store(fx);
    }
  }
}

template <int D, int M, bool kFma, int kLow = -1, bool kSR = false, bool kRem = false>
__attribute__((always_inline)) inline void cpu_loop_ams(const CpuTensor& ct, int64_t b, int64_t e,
                                                        const ScalarsOf<typename Storage<D>::compute> s,
                                                        const uint32_t key = 0) {
  ct.vmax != nullptr ? cpu_loop<D, M, kFma, true, kLow, kSR, kRem>(ct, b, e, s, key)
                     : cpu_loop<D, M, kFma, false, kLow, kSR, kRem>(ct, b, e, s, key);
}

// Moments stored in another dtype than their parameter's (exp_avg_dtype): a tile at a time, the
// moments are converted into float arrays (vectorised loops, one per storage dtype), the update
// runs on those and on p, g in their own dtype, and the moments are rounded back: one loop per
// parameter dtype instead of one per dtype triple (the arrays of a tile stay in L1). One pass over
// mixed widths (fp32 p with bf16 m, v in one loop) was not vectorised by GCC: 5x slower (AVX2).
constexpr int64_t kTile = 512;

template <int D>
__attribute__((always_inline)) inline void load_tile(const void* src, int64_t b, int64_t n, float* __restrict__ dst) {
  const typename Storage<D>::type* __restrict__ x = static_cast<const typename Storage<D>::type*>(src) + b;
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<D>::load(x[i]);
}

// sr: stochastic rounding with element b + i's bits of array `stream` (sr_r16: adamw_math.h)
template <int D>
__attribute__((always_inline)) inline void store_tile(void* dst, int64_t b, int64_t n, const float* __restrict__ src,
                                                      bool sr, uint32_t key, int stream) {
  typename Storage<D>::type* __restrict__ x = static_cast<typename Storage<D>::type*>(dst) + b;
  if (Storage<D>::kNarrow && sr) {
    for (int64_t i = 0; i < n; ++i) x[i] = Storage<D>::store_sr(src[i], sr_r16(sr_word(key, b + i), stream));
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = Storage<D>::store(src[i]);
  }
}

__attribute__((always_inline)) inline void load_tile_as(Dtype d, const void* src, int64_t b, int64_t n, float* dst) {
  if (d == kF32) {
    load_tile<kF32>(src, b, n, dst);
  } else if (d == kBF16) {
    load_tile<kBF16>(src, b, n, dst);
  } else {
    load_tile<kF16>(src, b, n, dst);
  }
}

__attribute__((always_inline)) inline void store_tile_as(Dtype d, void* dst, int64_t b, int64_t n, const float* src,
                                                         bool sr, uint32_t key, int stream) {
  if (d == kF32) {
    store_tile<kF32>(dst, b, n, src, sr, key, stream);
  } else if (d == kBF16) {
    store_tile<kBF16>(dst, b, n, src, sr, key, stream);
  } else {
    store_tile<kF16>(dst, b, n, src, sr, key, stream);
  }
}

template <int D, bool kFma, bool kAms>
__attribute__((always_inline)) inline void cpu_loop_lean(const CpuTensor& ct, int64_t b, int64_t e, const ElemScalars s,
                                                         const bool sr, const uint32_t key) {
  using T = typename Storage<D>::type;
  using S = Storage<D>;
  T* __restrict__ p = static_cast<T*>(ct.p);
  const T* __restrict__ g = static_cast<const T*>(ct.g);
  alignas(64) float mt[kTile], vt[kTile], xt[kTile];
  for (int64_t t0 = b; t0 < e; t0 += kTile) {
    const int64_t n = std::min(kTile, e - t0);
    load_tile_as(ct.m_dtype, ct.m, t0, n, mt);
    load_tile_as(ct.v_dtype, ct.v, t0, n, vt);
    if (kAms) load_tile_as(ct.v_dtype, ct.vmax, t0, n, xt);
    T* __restrict__ pt = p + t0;
    const T* __restrict__ gt = g + t0;
    for (int64_t i = 0; i < n; ++i) {
      float fp = S::load(pt[i]), fm = mt[i], fv = vt[i];
      float fx = kAms ? xt[i] : 0.0f;
      adamw_element<kFma, kAms>(fp, S::load(gt[i]), fm, fv, fx, s);
      pt[i] = sr ? S::store_sr(fp, sr_word(key, t0 + i) & 0xffffu) : S::store(fp);
      mt[i] = fm;
      vt[i] = fv;
      if (kAms) xt[i] = fx;
    }
    store_tile_as(ct.m_dtype, ct.m, t0, n, mt, sr, key, 1);
    store_tile_as(ct.v_dtype, ct.v, t0, n, vt, sr, key, 2);
    if (kAms) store_tile_as(ct.v_dtype, ct.vmax, t0, n, xt, sr, key, 2);
  }
}

// A bf16 parameter with a remainder (master_weights="remainders") whose moments the one-pass loop
// does not take (cpu_item_rem): by tiles, the fp32 master joined from both halves, updated as an
// fp32 parameter, split back; the moments as in cpu_loop_lean.
template <bool kFma, bool kAms>
__attribute__((always_inline)) inline void cpu_loop_rem(const CpuTensor& ct, int64_t b, int64_t e, const ElemScalars s,
                                                        const bool sr, const uint32_t key) {
  uint16_t* __restrict__ p = static_cast<uint16_t*>(ct.p);
  const uint16_t* __restrict__ g = static_cast<const uint16_t*>(ct.g);
  int16_t* __restrict__ r = ct.rem;
  alignas(64) float pt[kTile], mt[kTile], vt[kTile], xt[kTile];
  for (int64_t t0 = b; t0 < e; t0 += kTile) {
    const int64_t n = std::min(kTile, e - t0);
    for (int64_t i = 0; i < n; ++i) pt[i] = remainder_join(p[t0 + i], r[t0 + i]);
    load_tile_as(ct.m_dtype, ct.m, t0, n, mt);
    load_tile_as(ct.v_dtype, ct.v, t0, n, vt);
    if (kAms) load_tile_as(ct.v_dtype, ct.vmax, t0, n, xt);
    const uint16_t* __restrict__ gt = g + t0;
    for (int64_t i = 0; i < n; ++i) {
      float fx = kAms ? xt[i] : 0.0f;
      adamw_element<kFma, kAms>(pt[i], bf16_to_float(gt[i]), mt[i], vt[i], fx, s);
      if (kAms) xt[i] = fx;
    }
    for (int64_t i = 0; i < n; ++i) remainder_split(pt[i], p[t0 + i], r[t0 + i]);
    store_tile_as(ct.m_dtype, ct.m, t0, n, mt, sr, key, 1);
    store_tile_as(ct.v_dtype, ct.v, t0, n, vt, sr, key, 2);
    if (kAms) store_tile_as(ct.v_dtype, ct.vmax, t0, n, xt, sr, key, 2);
  }
}

// A bf16 parameter with a remainder: one vectorised pass for moments both fp32 or both bf16 (the
// modes users ask for; the lerp's branch known, as the lean loops), the other mixes by tiles.
template <bool kFma>
__attribute__((always_inline)) inline void cpu_item_rem(const CpuTensor& ct, int64_t b, int64_t e, const ElemScalars& s,
                                                        bool sr, uint32_t key) {
  const bool one_pass = ct.m_dtype == ct.v_dtype && s.lerp_low && (ct.m_dtype == kF32 || ct.m_dtype == kBF16);
  if (!one_pass) {
    ct.vmax != nullptr ? cpu_loop_rem<kFma, true>(ct, b, e, s, sr, key)
                       : cpu_loop_rem<kFma, false>(ct, b, e, s, sr, key);
  } else if (ct.m_dtype == kF32) {  // fp32 moments are never rounded stochastically
    cpu_loop_ams<kBF16, kF32, kFma, 1, false, true>(ct, b, e, s, key);
  } else if (sr) {
    cpu_loop_ams<kBF16, kBF16, kFma, 1, true, true>(ct, b, e, s, key);
  } else {
    cpu_loop_ams<kBF16, kBF16, kFma, 1, false, true>(ct, b, e, s, key);
  }
}

// Stochastic rounding (sr: the tensor's row asks it and some array is 16-bit) of one pass over
// arrays of one dtype, or of fp32 parameters with 16-bit moments; the other mixes by tiles.
template <bool kFma>
__attribute__((always_inline)) inline bool cpu_item_sr(const CpuTensor& ct, int64_t b, int64_t e, const ElemScalars& s,
                                                       uint32_t key) {
  if (ct.m_dtype != ct.v_dtype || !s.lerp_low) return false;
  if (ct.dtype == ct.m_dtype && ct.dtype == kBF16) {
    cpu_loop_ams<kBF16, kBF16, kFma, 1, true>(ct, b, e, s, key);
  } else if (ct.dtype == ct.m_dtype && ct.dtype == kF16) {
    cpu_loop_ams<kF16, kF16, kFma, 1, true>(ct, b, e, s, key);
  } else if (ct.dtype == kF32 && ct.m_dtype == kBF16) {
    cpu_loop_ams<kF32, kBF16, kFma, 1, true>(ct, b, e, s, key);
  } else if (ct.dtype == kBF16 && ct.m_dtype == kF32) {
    cpu_loop_ams<kBF16, kF32, kFma, 1, true>(ct, b, e, s, key);
  } else {
    return false;
  }
  return true;
}

// The item's scalars come in double (cheap to round again per item) and are rounded to the
// compute type of the tensor's dtype here. sr: round the 16-bit arrays stochastically with `key`.
template <bool kFma>
__attribute__((always_inline)) inline void cpu_item(const CpuTensor& ct, int64_t b, int64_t e,
                                                    const ScalarsOf<double>& sd, const ElemScalars& s, bool sr,
                                                    uint32_t key) {
  const bool ams = ct.vmax != nullptr;
  if (ct.rem != nullptr) {
    cpu_item_rem<kFma>(ct, b, e, s, sr, key);
    return;
  }
  if (sr && cpu_item_sr<kFma>(ct, b, e, s, key)) return;
  if (!sr && ct.m_dtype == ct.v_dtype && ct.m_dtype != ct.dtype && s.lerp_low && ct.dtype != kF16) {
    const bool to_bf16 = ct.m_dtype == kBF16;  // fp32 parameters with bf16 or fp16 moments, bf16 with fp32
    if (ct.dtype == kF32) {
      to_bf16 ? cpu_loop_ams<kF32, kBF16, kFma, 1>(ct, b, e, s) : cpu_loop_ams<kF32, kF16, kFma, 1>(ct, b, e, s);
      return;
    }
    if (ct.m_dtype == kF32) {
      cpu_loop_ams<kBF16, kF32, kFma, 1>(ct, b, e, s);
      return;
    }
  }
  if (sr || ct.m_dtype != ct.dtype || ct.v_dtype != ct.dtype) {  // the other mixes: by tiles
    if (ct.dtype == kF32) {
      ams ? cpu_loop_lean<kF32, kFma, true>(ct, b, e, s, sr, key)
          : cpu_loop_lean<kF32, kFma, false>(ct, b, e, s, sr, key);
    } else if (ct.dtype == kBF16) {
      ams ? cpu_loop_lean<kBF16, kFma, true>(ct, b, e, s, sr, key)
          : cpu_loop_lean<kBF16, kFma, false>(ct, b, e, s, sr, key);
    } else {
      ams ? cpu_loop_lean<kF16, kFma, true>(ct, b, e, s, sr, key)
          : cpu_loop_lean<kF16, kFma, false>(ct, b, e, s, sr, key);
    }
    return;
  }
  switch (ct.dtype) {
    case kF32:
      cpu_loop_ams<kF32, kF32, kFma>(ct, b, e, s);
      break;
    case kF64:
      cpu_loop_ams<kF64, kF64, kFma>(ct, b, e, sd);
      break;
    // 16-bit arrays with fp32 math are mixed widths: GCC vectorises them given kLow (as the lean loops)
    case kBF16:
      s.lerp_low ? cpu_loop_ams<kBF16, kBF16, kFma, 1>(ct, b, e, s) : cpu_loop_ams<kBF16, kBF16, kFma>(ct, b, e, s);
      break;
    default:
      s.lerp_low ? cpu_loop_ams<kF16, kF16, kFma, 1>(ct, b, e, s) : cpu_loop_ams<kF16, kF16, kFma>(ct, b, e, s);
      break;
  }
}

// Small tensors live on pages of their own, where the hardware prefetchers cannot run ahead:
// ask for the next small item's cache lines (into L2) while this one is computed.
inline void prefetch_item(const std::vector<CpuTensor>& ts, const Item& it) {
  constexpr int64_t kMaxBytes = 16384;  // per array
  const CpuTensor& ct = ts[it.tensor];
  auto esize = [](Dtype d) -> int64_t { return d == kF64 ? 8 : (d == kF32 ? 4 : 2); };
  if ((it.end - it.begin) * esize(ct.dtype) > kMaxBytes) return;
  const char* arrays[5] = {static_cast<const char*>(ct.p), static_cast<const char*>(ct.g),
                           static_cast<const char*>(ct.m), static_cast<const char*>(ct.v),
                           static_cast<const char*>(ct.vmax)};
  const Dtype dtypes[5] = {ct.dtype, ct.dtype, ct.m_dtype, ct.v_dtype, ct.v_dtype};
  for (int a = 0; a < 5; ++a) {
    if (arrays[a] == nullptr) continue;
    const int64_t es = esize(dtypes[a]);
    const char* base = arrays[a] + it.begin * es;
    const int64_t bytes = (it.end - it.begin) * es;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(base + off, 1, 2);
  }
}

using ItemFn = void (*)(const CpuTensor&, int64_t, int64_t, const ScalarsOf<double>&, const ElemScalars&, bool,
                        uint32_t);

// Baseline x86-64 (SSE2) or any other architecture: no hardware FMA assumed, so a*b+c
// (std::fma would be a libm call per element there).
void item_baseline(const CpuTensor& ct, int64_t b, int64_t e, const ScalarsOf<double>& sd, const ElemScalars& s,
                   bool sr, uint32_t key) {
  cpu_item<false>(ct, b, e, sd, s, sr, key);
}

#if defined(__x86_64__) && defined(__GNUC__)
// Function multiversioning by hand: the same loop built for two more ISA levels, chosen once at
// run time with __builtin_cpu_supports (GCC's target attribute; the callee templates are
// always_inline so they are compiled for the caller's ISA).
__attribute__((target("avx2,fma,f16c,bmi,bmi2"))) void item_avx2(const CpuTensor& ct, int64_t b, int64_t e,
                                                                 const ScalarsOf<double>& sd, const ElemScalars& s,
                                                                 bool sr, uint32_t key) {
  cpu_item<true>(ct, b, e, sd, s, sr, key);
}

__attribute__((
    target("avx512f,avx512vl,avx512bw,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,prefer-vector-width=512"))) void
item_avx512(const CpuTensor& ct, int64_t b, int64_t e, const ScalarsOf<double>& sd, const ElemScalars& s, bool sr,
            uint32_t key) {
  cpu_item<true>(ct, b, e, sd, s, sr, key);
}
#endif

int best_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd")) {
    return 2;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")) {
    return 1;
  }
#endif
  return 0;
}

std::atomic<int> g_isa{-1};

int active_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = best_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

ItemFn item_fn(int isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == 2) return item_avx512;
  if (isa == 1) return item_avx2;
#endif
  return item_baseline;
}

const char* isa_name(int isa) { return isa == 2 ? "avx512" : (isa == 1 ? "avx2" : "baseline"); }

// An element is a NaN or an Inf when its exponent bits are all ones: with the sign masked off,
// its bits as a signed integer are >= the bits of +Inf. An OR of all-ones/zero masks vectorises
// on any x86-64 (SSE2 pand/pcmpgt/por; a bool |= did not, nor would a float sum of x * 0
// without -ffast-math).
template <typename Bits, Bits kMask, Bits kInf>
bool nonfinite_bits(const void* data, int64_t b, int64_t e) {
  const Bits* x = static_cast<const Bits*>(data);
  Bits acc = 0;
  for (int64_t i = b; i < e; ++i) acc |= (static_cast<Bits>(x[i] & kMask) >= kInf) ? Bits(-1) : Bits(0);
  return acc != 0;
}

// The sum of squares of x[b, e): blocks of 256 elements summed in 16 float lanes (independent
// accumulators: the loop vectorises without reassociation; 16 terms per lane and block, so the
// float rounding stays near one ulp), each block's lanes added into a double, in a fixed order.
template <int D>
__attribute__((always_inline)) inline double sumsq_loop(const void* data, int64_t b, int64_t e) {
  using S = Storage<D>;
  const typename S::type* __restrict__ x = static_cast<const typename S::type*>(data);
  if constexpr (D == kF64) {
    double acc[4] = {0, 0, 0, 0};
    int64_t i = b;
    for (; i + 4 <= e; i += 4) {
      for (int j = 0; j < 4; ++j) acc[j] += x[i + j] * x[i + j];
    }
    for (; i < e; ++i) acc[0] += x[i] * x[i];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
  } else {
    constexpr int kLanes = 16, kBlock = 256;
    double total = 0.0;
    int64_t i = b;
    for (; i + kBlock <= e; i += kBlock) {
      float acc[kLanes] = {};
      for (int k = 0; k < kBlock; k += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const float v = S::load(x[i + k + j]);
          acc[j] += v * v;
        }
      }
      double block = 0.0;
      for (int j = 0; j < kLanes; ++j) block += static_cast<double>(acc[j]);
      total += block;
    }
    double tail = 0.0;
    for (; i < e; ++i) {
      const double v = static_cast<double>(S::load(x[i]));
      tail += v * v;
    }
    return total + tail;
  }
}

// The largest magnitude of x[b, e) from its bits: with the sign masked off, the bits of a
// non-negative float order as integers do, and a NaN's bits exceed +Inf's, so an integer max is
// exact and lets a NaN win. Returned as the value those bits are.
template <typename Bits, Bits kMask>
__attribute__((always_inline)) inline Bits maxabs_bits(const void* data, int64_t b, int64_t e) {
  const Bits* __restrict__ x = static_cast<const Bits*>(data);
  Bits acc = 0;
  for (int64_t i = b; i < e; ++i) {
    const Bits a = static_cast<Bits>(x[i] & kMask);
    acc = a > acc ? a : acc;
  }
  return acc;
}

template <int D>
__attribute__((always_inline)) inline double maxabs_loop(const void* data, int64_t b, int64_t e) {
  if constexpr (D == kF64) {
    const int64_t bits = maxabs_bits<int64_t, 0x7fffffffffffffff>(data, b, e);
    double v;
    std::memcpy(&v, &bits, 8);
    return v;
  } else if constexpr (D == kF32) {
    const int32_t bits = maxabs_bits<int32_t, 0x7fffffff>(data, b, e);
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  } else {
    const int16_t bits = maxabs_bits<int16_t, 0x7fff>(data, b, e);
    return static_cast<double>(Storage<D>::load(static_cast<uint16_t>(bits)));
  }
}

template <int D>
__attribute__((always_inline)) inline double norm_loop(int kind, const void* data, int64_t b, int64_t e) {
  return kind == 0 ? sumsq_loop<D>(data, b, e) : maxabs_loop<D>(data, b, e);
}

__attribute__((always_inline)) inline double norm_item(const CpuTensor& ct, int kind, int64_t b, int64_t e) {
  switch (ct.dtype) {
    case kF32:
      return norm_loop<kF32>(kind, ct.g, b, e);
    case kF64:
      return norm_loop<kF64>(kind, ct.g, b, e);
    case kBF16:
      return norm_loop<kBF16>(kind, ct.g, b, e);
    default:
      return norm_loop<kF16>(kind, ct.g, b, e);
  }
}

using NormFn = double (*)(const CpuTensor&, int, int64_t, int64_t);

double norm_baseline(const CpuTensor& ct, int kind, int64_t b, int64_t e) { return norm_item(ct, kind, b, e); }

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma,f16c,bmi,bmi2"))) double norm_avx2(const CpuTensor& ct, int kind, int64_t b,
                                                                   int64_t e) {
  return norm_item(ct, kind, b, e);
}
#endif

NormFn norm_fn(int isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa >= 1) return norm_avx2;  // memory-bound: AVX-512 would add nothing
#endif
  return norm_baseline;
}

}  // namespace

void cpu_norm_items(const std::vector<CpuTensor>& ts, const CpuItems& work, int kind, size_t i0, size_t i1,
                    double* partials) {
  const NormFn fn = norm_fn(active_isa());
  for (size_t i = i0; i < i1; ++i) {
    const Item& it = work.items[i];
    partials[i - i0] = fn(ts[it.tensor], kind, it.begin, it.end);
  }
}

void CpuItems::add(int32_t tensor, int64_t n) {
  for (int64_t b = 0; b < n; b += kCpuChunk) {
    const int64_t e = std::min(n, b + kCpuChunk);
    items.push_back({tensor, b, e});
    total += (e - b) + kItemCost;
    cost.push_back(total);
  }
}

int64_t CpuItems::useful_threads(int64_t max_threads) const {
  if (items.size() < 2) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(max_threads, total / (4 * kCpuChunk)));
}

std::pair<size_t, size_t> CpuItems::share(int64_t t, int64_t threads) const {
  const auto lo = std::lower_bound(cost.begin(), cost.end(), total * t / threads + 1) - cost.begin();
  const auto hi = std::lower_bound(cost.begin(), cost.end(), total * (t + 1) / threads + 1) - cost.begin();
  return {static_cast<size_t>(lo), static_cast<size_t>(hi)};
}

void cpu_update_items(const std::vector<CpuTensor>& ts, const CpuItems& work, const CpuStepScalars& sc, size_t i0,
                      size_t i1) {
  const std::vector<Item>& items = work.items;
  const ItemFn fn = item_fn(active_isa());
  // The scalars depend on the tensor only through its group row and step: consecutive tensors
  // of one group at one step (the usual case) share them, and skip the two pow() calls.
  const double* last_hp = nullptr;
  float last_t = -1.0f;
  ScalarsOf<double> sd{};
  ElemScalars s{};
  for (size_t i = i0; i < i1; ++i) {
    const Item& it = items[i];
    const CpuTensor& ct = ts[it.tensor];
    if (ct.hp != last_hp || ct.t != last_t) {
      sd = make_scalars<double>(ct.hp, sc.lr_mult, sc.wd_mult, ct.t, sc.independent_wd, sc.grad_scale);
      s = make_scalars<float>(ct.hp, sc.lr_mult, sc.wd_mult, ct.t, sc.independent_wd, sc.grad_scale);
      last_hp = ct.hp;
      last_t = ct.t;
    }
    if (i + 1 < i1) prefetch_item(ts, items[i + 1]);
    // stochastic rounding: the row asks it (seed + 1) and some array of this tensor is 16-bit
    const double rounding = ct.hp[kRounding];
    const bool narrow = ct.dtype == kBF16 || ct.dtype == kF16 || ct.m_dtype == kBF16 || ct.m_dtype == kF16 ||
                        ct.v_dtype == kBF16 || ct.v_dtype == kF16;
    const bool sr = rounding != 0.0 && narrow;
    const uint32_t key =
        sr ? sr_key(static_cast<uint32_t>(rounding - 1.0), sc.position, static_cast<uint32_t>(it.tensor)) : 0u;
    fn(ct, it.begin, it.end, sd, s, sr, key);
  }
}

bool cpu_nonfinite_items(const std::vector<CpuTensor>& ts, const CpuItems& work, size_t i0, size_t i1) {
  for (size_t i = i0; i < i1; ++i) {
    const Item& it = work.items[i];
    const CpuTensor& ct = ts[it.tensor];
    bool bad;
    switch (ct.dtype) {
      case kF32:
        bad = nonfinite_bits<int32_t, 0x7fffffff, 0x7f800000>(ct.g, it.begin, it.end);
        break;
      case kBF16:
        bad = nonfinite_bits<int16_t, 0x7fff, 0x7f80>(ct.g, it.begin, it.end);
        break;
      case kF64:
        bad = nonfinite_bits<int64_t, 0x7fffffffffffffff, 0x7ff0000000000000>(ct.g, it.begin, it.end);
        break;
      default:
        bad = nonfinite_bits<int16_t, 0x7fff, 0x7c00>(ct.g, it.begin, it.end);
        break;
    }
    if (bad) return true;
  }
  return false;
}

std::string cpu_isa(int64_t force) {
  if (force >= 0) g_isa.store(static_cast<int>(std::min<int64_t>(force, best_isa())));
  return isa_name(active_isa());
}

}  // namespace d2z
