// The CUDA multi-tensor AdamW kernel: metadata, work list and per-thread bodies. Torch-free.
//
// Every block updates one chunk (kChunk elements) of one tensor; the work list maps blocks to
// (tensor, chunk). The per-thread bodies are D2Z_HD functions of (block, thread, block_dim,
// arguments) so that the host compiler builds them too: the grid replay op
// (adamw_replay.cpp) runs every block and thread of the real grid on the CPU.
//
// Launches per call: adamw_kernel (all tensors, all dtypes, amsgrad or not) then
// counter_kernel (per-tensor steps and the schedule counter, which every block of the first
// kernel reads and so cannot be advanced inside it without a grid-wide barrier). A step clipped
// by the global norm launches clip_kernel first, over the same blocks: each block's share of the
// norm, and the last block to finish reduces the blocks' partials in block order and takes the
// step's decisions (clip_math.h), which the update then reads: 3 launches for any tensor count.
#pragma once

#include <cstdint>
#include <vector>

#include "adamw_math.h"
#include "clip_math.h"

#if defined(__CUDACC__)
#define D2Z_UNROLL _Pragma("unroll")
#else
#define D2Z_UNROLL
#endif

namespace d2z {

constexpr int kBlockThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block: 16 x 128-bit accesses per thread (fp32)

// One tensor of the call. 72 bytes.
struct TensorMeta {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;   // nullptr: no amsgrad state for this tensor (its group has amsgrad = 0)
  float* step;  // float32 per-parameter step, incremented by counter_kernel
  int64_t n;
  int32_t group;   // row of hparams
  int8_t dtype;    // Dtype of p and g
  int8_t m_dtype;  // of m, and of v and vmax: dtype, or (fp32/bf16/fp16 parameters) another of those three
  int8_t v_dtype;
  int8_t vec;    // 1 when every pointer of the tensor is 16-byte aligned: 128-bit accesses
  int16_t* rem;  // a bf16 parameter's remainder (master_weights="remainders"), or nullptr
};

struct BlockWork {
  int32_t tensor;
  int32_t chunk;
};

// Kernel arguments (passed by value).
struct LaunchArgs {
  const TensorMeta* tensors;
  const BlockWork* blocks;
  const double* hparams;  // [G, kHpCols]
  const float* lr_table;
  const float* wd_table;
  int64_t table_len;
  int64_t* step_count;
  const float* grad_scale;  // nullptr when absent
  const float* found_inf;   // nullptr when absent
  int32_t n_tensors;
  int32_t independent_wd;
  // clipping (clip_on != 0): clip_kernel's arguments; the update's grad_scale / found_inf are then
  // clip_t.grad_scale_out / clip_t.found_out (the caller points them there)
  int32_t clip_on;
  ClipConfig clip;
  ClipTensors clip_t;
  double* clip_partials;      // [max(n_blocks, 1)] one per clip_kernel block
  unsigned int* clip_ticket;  // blocks done: 0 before a launch, reset by the last block
};

D2Z_INLINE bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// ---- the work list (host) ----
// Metadata buffer layout: [TensorMeta x n_tensors][BlockWork x n_blocks], one upload.
struct WorkList {
  std::vector<TensorMeta> tensors;
  std::vector<BlockWork> blocks;
  bool has_f64 = false;  // a float64 tensor: the launch takes adamw_kernel_f64
  size_t bytes() const { return tensors.size() * sizeof(TensorMeta) + blocks.size() * sizeof(BlockWork); }
  void pack(void* dst) const {
    std::memcpy(dst, tensors.data(), tensors.size() * sizeof(TensorMeta));
    std::memcpy(static_cast<char*>(dst) + tensors.size() * sizeof(TensorMeta), blocks.data(),
                blocks.size() * sizeof(BlockWork));
  }
};

// Fills list.blocks from list.tensors (whose pointers, sizes and dtypes are set) and sets vec.
inline void build_work_list(WorkList& list) {
  list.blocks.clear();
  list.has_f64 = false;
  for (size_t i = 0; i < list.tensors.size(); ++i) {
    TensorMeta& t = list.tensors[i];
    t.vec = aligned16(t.p) && aligned16(t.g) && aligned16(t.m) && aligned16(t.v) &&
            (t.vmax == nullptr || aligned16(t.vmax));
    list.has_f64 = list.has_f64 || t.dtype == kF64;
    const int64_t chunks = (t.n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) list.blocks.push_back({static_cast<int32_t>(i), static_cast<int32_t>(c)});
  }
}

// ---- per-thread bodies (host and device) ----
D2Z_INLINE void load16(const void* base, int64_t k, uint32_t (&w)[4]) {
#if defined(__CUDA_ARCH__)
  // Explicit global-space 128-bit access: the pointers come from the metadata in memory, so the
  // compiler cannot prove their state space and would emit generic ld.v4 / st.v4. volatile
  // keeps the loads before the stores to the same addresses.
  const uint4* ptr = reinterpret_cast<const uint4*>(base) + k;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(ptr));
#else
  std::memcpy(w, static_cast<const char*>(base) + k * 16, 16);
#endif
}

D2Z_INLINE void store16(void* base, int64_t k, const uint32_t (&w)[4]) {
#if defined(__CUDA_ARCH__)
  uint4* ptr = reinterpret_cast<uint4*>(base) + k;
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
#else
  std::memcpy(static_cast<char*>(base) + k * 16, w, 16);
#endif
}

template <int D>
using ScalarsFor = ScalarsOf<typename Storage<D>::compute>;

// One element given as storage values, updated in place.
template <int D, bool kAms>
D2Z_INLINE void update_stored(typename Storage<D>::type& p, typename Storage<D>::type g, typename Storage<D>::type& m,
                              typename Storage<D>::type& v, typename Storage<D>::type* vmax, const ScalarsFor<D>& s) {
  using S = Storage<D>;
  using C = typename S::compute;
  C fp = S::load(p), fm = S::load(m), fv = S::load(v);
  C fx = kAms ? S::load(*vmax) : C(0);
  adamw_element<true, kAms>(fp, S::load(g), fm, fv, fx, s);
  p = S::store(fp);
  m = S::store(fm);
  v = S::store(fv);
  if (kAms) *vmax = S::store(fx);
}

// 16 bytes of each array (4 fp32, 2 fp64 or 8 bf16/fp16 elements), vector index k.
template <int D, bool kAms>
D2Z_INLINE void update_vec16(const TensorMeta& t, int64_t k, const ScalarsFor<D>& s) {
  uint32_t p[4], g[4], m[4], v[4], x[4] = {0, 0, 0, 0};
  load16(t.p, k, p);
  load16(t.g, k, g);
  load16(t.m, k, m);
  load16(t.v, k, v);
  if (kAms) load16(t.vmax, k, x);
  if constexpr (D == kF64) {
    D2Z_UNROLL
    for (int w = 0; w < 4; w += 2) {
      double fp = bits_to_double(p[w], p[w + 1]), fm = bits_to_double(m[w], m[w + 1]);
      double fv = bits_to_double(v[w], v[w + 1]), fx = bits_to_double(x[w], x[w + 1]);
      adamw_element<true, kAms>(fp, bits_to_double(g[w], g[w + 1]), fm, fv, fx, s);
      double_to_bits(fp, p[w], p[w + 1]);
      double_to_bits(fm, m[w], m[w + 1]);
      double_to_bits(fv, v[w], v[w + 1]);
      double_to_bits(fx, x[w], x[w + 1]);
    }
  } else {
    D2Z_UNROLL
    for (int w = 0; w < 4; ++w) {
      if constexpr (D == kF32) {
        float fp = bits_to_float(p[w]), fm = bits_to_float(m[w]), fv = bits_to_float(v[w]), fx = bits_to_float(x[w]);
        adamw_element<true, kAms>(fp, bits_to_float(g[w]), fm, fv, fx, s);
        p[w] = float_to_bits(fp);
        m[w] = float_to_bits(fm);
        v[w] = float_to_bits(fv);
        x[w] = float_to_bits(fx);
      } else {
        uint16_t p2[2] = {uint16_t(p[w]), uint16_t(p[w] >> 16)}, m2[2] = {uint16_t(m[w]), uint16_t(m[w] >> 16)};
        uint16_t v2[2] = {uint16_t(v[w]), uint16_t(v[w] >> 16)}, x2[2] = {uint16_t(x[w]), uint16_t(x[w] >> 16)};
        const uint16_t g2[2] = {uint16_t(g[w]), uint16_t(g[w] >> 16)};
        D2Z_UNROLL
        for (int h = 0; h < 2; ++h) update_stored<D, kAms>(p2[h], g2[h], m2[h], v2[h], &x2[h], s);
        p[w] = uint32_t(p2[0]) | (uint32_t(p2[1]) << 16);
        m[w] = uint32_t(m2[0]) | (uint32_t(m2[1]) << 16);
        v[w] = uint32_t(v2[0]) | (uint32_t(v2[1]) << 16);
        x[w] = uint32_t(x2[0]) | (uint32_t(x2[1]) << 16);
      }
    }
  }
  store16(t.p, k, p);
  store16(t.m, k, m);
  store16(t.v, k, v);
  if (kAms) store16(t.vmax, k, x);
}

template <int D, bool kAms>
D2Z_INLINE void update_chunk(const TensorMeta& t, const ScalarsFor<D>& s, int64_t start, int64_t end, int thread,
                             int block_dim) {
  using T = typename Storage<D>::type;
  int64_t e0 = start;
  if (t.vec) {  // start is a multiple of kChunk, so of the vector width: whole vectors, then a tail
    constexpr int64_t kV = 16 / sizeof(T);
    const int64_t v0 = start / kV;
    const int64_t nv = (end - start) / kV;
    for (int64_t k = thread; k < nv; k += block_dim) update_vec16<D, kAms>(t, v0 + k, s);
    e0 = start + nv * kV;
  }
  T* p = static_cast<T*>(t.p);
  const T* g = static_cast<const T*>(t.g);
  T* m = static_cast<T*>(t.m);
  T* v = static_cast<T*>(t.v);
  T* x = static_cast<T*>(t.vmax);
  for (int64_t e = e0 + thread; e < end; e += block_dim) {
    T xe = kAms ? x[e] : T(0);
    update_stored<D, kAms>(p[e], g[e], m[e], v[e], &xe, s);
    if (kAms) x[e] = xe;
  }
}

// ---- moments stored in another dtype than their parameter's (exp_avg_dtype) ----
// One element per thread and iteration (coalesced 2- and 4-byte accesses), the moments' dtypes
// read at run time (the same for every thread of a block: no divergence).
D2Z_INLINE float load_moment(const void* base, int64_t e, int d) {
  if (d == kF32) return static_cast<const float*>(base)[e];
  const uint16_t h = static_cast<const uint16_t*>(base)[e];
  return d == kBF16 ? bf16_to_float(h) : f16_to_float(h);
}

// sr: stochastically with the random 16 bits r16, else to nearest even
D2Z_INLINE void store_moment(void* base, int64_t e, int d, float x, bool sr, uint32_t r16) {
  if (d == kF32) {
    static_cast<float*>(base)[e] = x;
  } else if (d == kBF16) {
    static_cast<uint16_t*>(base)[e] = sr ? float_to_bf16_sr(x, r16) : float_to_bf16(x);
  } else {
    static_cast<uint16_t*>(base)[e] = sr ? float_to_f16_sr(x, r16) : float_to_f16(x);
  }
}

// Also the path of stochastic rounding (sr, with the tensor's key; adamw_math.h's sr_word).
template <int D, bool kAms>
D2Z_INLINE void update_chunk_lean(const TensorMeta& t, const ElemScalars& s, int64_t start, int64_t end, int thread,
                                  int block_dim, bool sr, uint32_t key) {
  using S = Storage<D>;
  using T = typename S::type;
  T* p = static_cast<T*>(t.p);
  const T* g = static_cast<const T*>(t.g);
  int16_t* r = D == kBF16 ? t.rem : nullptr;  // a remainder: the fp32 master joined, then split
  for (int64_t e = start + thread; e < end; e += block_dim) {
    float fp = S::load(p[e]);
    if constexpr (D == kBF16) fp = r != nullptr ? remainder_join(p[e], r[e]) : fp;
    float fm = load_moment(t.m, e, t.m_dtype), fv = load_moment(t.v, e, t.v_dtype);
    float fx = kAms ? load_moment(t.vmax, e, t.v_dtype) : 0.0f;
    adamw_element<true, kAms>(fp, S::load(g[e]), fm, fv, fx, s);
    const uint32_t w0 = sr ? sr_word(key, e) : 0u;
    const uint32_t w1 = sr_second(w0);
    if constexpr (D == kBF16) {
      if (r != nullptr) {
        remainder_split(fp, p[e], r[e]);
      } else {
        p[e] = sr ? S::store_sr(fp, w0 & 0xffffu) : S::store(fp);
      }
    } else {
      p[e] = sr ? S::store_sr(fp, w0 & 0xffffu) : S::store(fp);
    }
    store_moment(t.m, e, t.m_dtype, fm, sr, w0 >> 16);
    store_moment(t.v, e, t.v_dtype, fv, sr, w1);
    if (kAms) store_moment(t.vmax, e, t.v_dtype, fx, sr, w1);
  }
}

template <int D>
D2Z_INLINE void update_chunk_lean_dtype(const TensorMeta& t, bool ams, const ElemScalars& s, int64_t start, int64_t end,
                                        int thread, int block_dim, bool sr, uint32_t key) {
  if (ams) {
    update_chunk_lean<D, true>(t, s, start, end, thread, block_dim, sr, key);
  } else {
    update_chunk_lean<D, false>(t, s, start, end, thread, block_dim, sr, key);
  }
}

template <int D>
D2Z_INLINE void update_chunk_dtype(const TensorMeta& t, bool ams, const ScalarsFor<D>& s, int64_t start, int64_t end,
                                   int thread, int block_dim) {
  if (ams) {
    update_chunk<D, true>(t, s, start, end, thread, block_dim);
  } else {
    update_chunk<D, false>(t, s, start, end, thread, block_dim);
  }
}

// The body of adamw_kernel (kWithF64 = false: fp32/bf16/fp16 tensors only, at most 64 registers)
// and adamw_kernel_f64 (every dtype; the fp64 path needs more registers): thread `thread` of block
// `block`.
template <bool kWithF64>
D2Z_HD inline void adamw_thread(int64_t block, int thread, int block_dim, const LaunchArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // AMP: skip the whole step
  const BlockWork w = a.blocks[block];
  const TensorMeta& t = a.tensors[w.tensor];
  // Table lookup, bias corrections and step size: once per block (each thread in registers).
  int64_t idx = *a.step_count;
  idx = idx < 0 ? 0 : (idx > a.table_len - 1 ? a.table_len - 1 : idx);
  const double* hp = a.hparams + static_cast<int64_t>(t.group) * kHpCols;
  const float lr_mult = a.lr_table[idx], wd_mult = a.wd_table[idx], step = *t.step + 1.0f;
  const bool wd_mode = a.independent_wd != 0;
  const bool ams = t.vmax != nullptr && hp[kAmsgrad] != 0.0;
  const int64_t start = static_cast<int64_t>(w.chunk) * kChunk;
  const int64_t end = start + kChunk < t.n ? start + kChunk : t.n;
  if constexpr (kWithF64) {
    if (t.dtype == kF64) {
      const ScalarsOf<double> sd = make_scalars<double>(hp, lr_mult, wd_mult, step, wd_mode, a.grad_scale);
      update_chunk_dtype<kF64>(t, ams, sd, start, end, thread, block_dim);
      return;
    }
  }
  const ElemScalars s = make_scalars<float>(hp, lr_mult, wd_mult, step, wd_mode, a.grad_scale);
  // stochastic rounding: the row asks it (seed + 1) and some array is 16-bit (never float64 ones)
  const bool sr = hp[kRounding] != 0.0 && (t.dtype != kF32 || t.m_dtype != kF32 || t.v_dtype != kF32);
  if (sr || t.m_dtype != t.dtype || t.v_dtype != t.dtype || t.rem != nullptr) {  // lean (never float64 parameters)
    const uint32_t key = sr ? sr_key(static_cast<uint32_t>(hp[kRounding] - 1.0), static_cast<uint32_t>(*a.step_count),
                                     static_cast<uint32_t>(w.tensor))
                            : 0u;
    switch (t.dtype) {
      case kF32:
        update_chunk_lean_dtype<kF32>(t, ams, s, start, end, thread, block_dim, sr, key);
        break;
      case kBF16:
        update_chunk_lean_dtype<kBF16>(t, ams, s, start, end, thread, block_dim, sr, key);
        break;
      default:
        update_chunk_lean_dtype<kF16>(t, ams, s, start, end, thread, block_dim, sr, key);
        break;
    }
    return;
  }
  switch (t.dtype) {
    case kF32:
      update_chunk_dtype<kF32>(t, ams, s, start, end, thread, block_dim);
      break;
    case kBF16:
      update_chunk_dtype<kBF16>(t, ams, s, start, end, thread, block_dim);
      break;
    case kF16:
      update_chunk_dtype<kF16>(t, ams, s, start, end, thread, block_dim);
      break;
    default:  // kF64 reaches only adamw_kernel_f64 (the launcher's choice)
      break;
  }
}

// ---- the clip kernel's bodies (host and device) ----
// Thread `thread`'s share of block `block`'s chunk of its gradient (the elements thread,
// thread + block_dim, ...): the sum of squares, or the largest magnitude (a NaN wins), in the
// compute type (64 terms per thread for fp32), returned as double. Blocks past n_blocks: 0.
template <int D>
D2Z_INLINE double clip_partial(const TensorMeta& t, int64_t start, int64_t end, int thread, int block_dim, bool inf) {
  using S = Storage<D>;
  using C = typename S::compute;
  const typename S::type* g = static_cast<const typename S::type*>(t.g);
  C acc = C(0);
  for (int64_t e = start + thread; e < end; e += block_dim) {
    const C x = S::load(g[e]);
    if (inf) {
      const C a = x < C(0) ? -x : x;
      acc = (a > acc || a != a) ? a : acc;
    } else {
      acc = acc + x * x;
    }
  }
  return static_cast<double>(acc);
}

D2Z_HD inline double clip_thread(int64_t block, int thread, int block_dim, const LaunchArgs& a, int64_t n_blocks) {
  if (block >= n_blocks) return 0.0;
  const BlockWork w = a.blocks[block];
  const TensorMeta& t = a.tensors[w.tensor];
  const int64_t start = static_cast<int64_t>(w.chunk) * kChunk;
  const int64_t end = start + kChunk < t.n ? start + kChunk : t.n;
  const bool inf = a.clip.inf_norm != 0;
  switch (t.dtype) {
    case kF32:
      return clip_partial<kF32>(t, start, end, thread, block_dim, inf);
    case kBF16:
      return clip_partial<kBF16>(t, start, end, thread, block_dim, inf);
    case kF16:
      return clip_partial<kF16>(t, start, end, thread, block_dim, inf);
    default:
      return clip_partial<kF64>(t, start, end, thread, block_dim, inf);
  }
}

// One level of the block's fixed reduction tree over its threads' partials (shared memory on the
// GPU): for t < s, sh[t] combines sh[t + s]. Levels s = block_dim / 2, ..., 1.
D2Z_INLINE void clip_tree_level(double* sh, int t, int s, bool inf) { sh[t] = combine_norm(sh[t], sh[t + s], inf); }

D2Z_INLINE double load_partial(const double* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);  // written by other blocks: read past the (incoherent) L1
#else
  return *p;
#endif
}

// The last block: thread t combines partials t, t + block_dim, ... in order (then the tree).
D2Z_HD inline double clip_gather(const double* partials, int64_t n, int thread, int block_dim, bool inf) {
  double acc = 0.0;
  for (int64_t i = thread; i < n; i += block_dim) acc = combine_norm(acc, load_partial(partials + i), inf);
  return acc;
}

inline int64_t clip_blocks(int64_t n_blocks) { return n_blocks > 0 ? n_blocks : 1; }

// The body of counter_kernel (after adamw_kernel, same stream): steps[i] += 1 and step_count += 1.
D2Z_HD inline void counter_thread(int64_t block, int thread, int block_dim, const LaunchArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  const int64_t i = block * block_dim + thread;
  if (i < a.n_tensors) *a.tensors[i].step += 1.0f;
  if (i == 0) *a.step_count += 1;
}

inline int64_t counter_blocks(int64_t n_tensors) {
  const int64_t b = (n_tensors + kBlockThreads - 1) / kBlockThreads;
  return b < 1 ? 1 : b;
}

// Launches clip_kernel when a.clip_on (clip_blocks(n_blocks) blocks), adamw_kernel, or
// adamw_kernel_f64 when `with_f64` (n_blocks blocks, skipped when 0), then counter_kernel on `stream`. Returns the
// first launch error (cudaSuccess otherwise). Defined in adamw_cuda.cu.
int launch_adamw(const LaunchArgs& a, int64_t n_blocks, bool with_f64, void* stream);

}  // namespace d2z
