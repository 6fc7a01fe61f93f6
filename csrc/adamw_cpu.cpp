// The CPU implementation of d2z::adamw_step_: every (tensor, chunk) of the call in one parallel
// region, an inner loop the compiler vectorises, chosen at run time among builds of it for
// AVX-512, AVX2+FMA and the portable baseline (no -march=native needed).
#include "adamw_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace d2z {
namespace {

constexpr int64_t kCpuChunk = 1 << 16;  // elements per work item
constexpr int64_t kItemCost = 256;      // fixed cost of an item (scalars, dispatch), in elements

using Item = CpuItems::Item;

template <int D, bool kFma, bool kAms>
__attribute__((always_inline)) inline void cpu_loop(const CpuTensor& ct, int64_t b, int64_t e, ElemScalars s) {
  using T = typename Storage<D>::type;
  using S = Storage<D>;
  T* __restrict__ p = static_cast<T*>(ct.p);
  const T* __restrict__ g = static_cast<const T*>(ct.g);
  T* __restrict__ m = static_cast<T*>(ct.m);
  T* __restrict__ v = static_cast<T*>(ct.v);
  T* __restrict__ x = static_cast<T*>(ct.vmax);
  for (int64_t i = b; i < e; ++i) {
    float fp = S::load(p[i]), fm = S::load(m[i]), fv = S::load(v[i]);
    float fx = kAms ? S::load(x[i]) : 0.0f;
    adamw_element<kFma, kAms>(fp, S::load(g[i]), fm, fv, fx, s);
    p[i] = S::store(fp);
    m[i] = S::store(fm);
    v[i] = S::store(fv);
    if (kAms) x[i] = S::store(fx);
  }
}

template <bool kFma>
__attribute__((always_inline)) inline void cpu_item(const CpuTensor& ct, int64_t b, int64_t e, const ElemScalars& s) {
  const bool ams = ct.vmax != nullptr;
  switch (ct.dtype) {
    case kF32:
      ams ? cpu_loop<kF32, kFma, true>(ct, b, e, s) : cpu_loop<kF32, kFma, false>(ct, b, e, s);
      break;
    case kBF16:
      ams ? cpu_loop<kBF16, kFma, true>(ct, b, e, s) : cpu_loop<kBF16, kFma, false>(ct, b, e, s);
      break;
    default:
      ams ? cpu_loop<kF16, kFma, true>(ct, b, e, s) : cpu_loop<kF16, kFma, false>(ct, b, e, s);
      break;
  }
}

// Small tensors live on pages of their own, where the hardware prefetchers cannot run ahead:
// ask for the next small item's cache lines (into L2) while this one is computed.
inline void prefetch_item(const std::vector<CpuTensor>& ts, const Item& it) {
  constexpr int64_t kMaxBytes = 16384;  // per array
  const CpuTensor& ct = ts[it.tensor];
  const int64_t esize = ct.dtype == kF32 ? 4 : 2;
  const int64_t bytes = (it.end - it.begin) * esize;
  if (bytes > kMaxBytes) return;
  const char* arrays[5] = {static_cast<const char*>(ct.p), static_cast<const char*>(ct.g),
                           static_cast<const char*>(ct.m), static_cast<const char*>(ct.v),
                           static_cast<const char*>(ct.vmax)};
  for (const char* base : arrays) {
    if (base == nullptr) continue;
    base += it.begin * esize;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(base + off, 1, 2);
  }
}

using ItemFn = void (*)(const CpuTensor&, int64_t, int64_t, const ElemScalars&);

// Baseline x86-64 (SSE2) or any other architecture: no hardware FMA assumed, so a*b+c
// (std::fma would be a libm call per element there).
void item_baseline(const CpuTensor& ct, int64_t b, int64_t e, const ElemScalars& s) { cpu_item<false>(ct, b, e, s); }

#if defined(__x86_64__) && defined(__GNUC__)
// Function multiversioning by hand: the same loop built for two more ISA levels, chosen once at
// run time with __builtin_cpu_supports (GCC's target attribute; the callee templates are
// always_inline so they are compiled for the caller's ISA).
__attribute__((target("avx2,fma,f16c,bmi,bmi2"))) void item_avx2(const CpuTensor& ct, int64_t b, int64_t e,
                                                                 const ElemScalars& s) {
  cpu_item<true>(ct, b, e, s);
}

__attribute__((
    target("avx512f,avx512vl,avx512bw,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,prefer-vector-width=512"))) void
item_avx512(const CpuTensor& ct, int64_t b, int64_t e, const ElemScalars& s) {
  cpu_item<true>(ct, b, e, s);
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

// Test/diagnostic op: force (0 baseline, 1 avx2, 2 avx512, capped at what the CPU has; -1 keeps
// the current choice) and return the active ISA's name.
std::string cpu_isa(int64_t force) {
  if (force >= 0) g_isa.store(static_cast<int>(std::min<int64_t>(force, best_isa())));
  return isa_name(active_isa());
}

}  // namespace

void CpuItems::add(int32_t tensor, int64_t n) {
  for (int64_t b = 0; b < n; b += kCpuChunk) {
    const int64_t e = std::min(n, b + kCpuChunk);
    items.push_back({tensor, b, e});
    total += (e - b) + kItemCost;
    cost.push_back(total);
  }
}

namespace {

// The step's schedule multipliers and options, read once per call.
struct CpuStepScalars {
  float lr_mult, wd_mult;
  bool independent_wd;
  const float* grad_scale;  // nullptr when absent
};

// The update of every item, then each tensor's step.
void cpu_update(const std::vector<CpuTensor>& ts, const CpuItems& work, const CpuStepScalars& sc) {
  const std::vector<Item>& items = work.items;
  const ItemFn fn = item_fn(active_isa());
  auto run = [&](size_t i0, size_t i1) {
    // The scalars depend on the tensor only through its group row and step: consecutive tensors
    // of one group at one step (the usual case) share them, and skip the two pow() calls.
    const double* last_hp = nullptr;
    float last_t = -1.0f;
    ElemScalars s{};
    for (size_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const CpuTensor& ct = ts[it.tensor];
      if (ct.hp != last_hp || ct.t != last_t) {
        s = make_scalars(ct.hp, sc.lr_mult, sc.wd_mult, ct.t, sc.independent_wd, sc.grad_scale);
        last_hp = ct.hp;
        last_t = ct.t;
      }
      if (i + 1 < i1) prefetch_item(ts, items[i + 1]);
      fn(ct, it.begin, it.end, s);
    }
  };
  // One parallel region; each thread takes a contiguous run of items of about equal cost.
  const int64_t total = work.total;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / (4 * kCpuChunk)));
  if (threads <= 1 || items.size() < 2) {
    run(0, items.size());
  } else {
    const std::vector<int64_t>& cost = work.cost;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const auto lo = std::lower_bound(cost.begin(), cost.end(), total * t / threads + 1) - cost.begin();
        const auto hi = std::lower_bound(cost.begin(), cost.end(), total * (t + 1) / threads + 1) - cost.begin();
        run(static_cast<size_t>(lo), static_cast<size_t>(hi));
      }
    });
  }
  for (const CpuTensor& ct : ts) *ct.step = ct.t;
}

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

// True when some gradient element is a NaN or an Inf (every element read; both threads).
bool cpu_any_nonfinite(const std::vector<CpuTensor>& ts, const CpuItems& work) {
  std::atomic<bool> found{false};
  at::parallel_for(0, static_cast<int64_t>(work.items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1 && !found.load(std::memory_order_relaxed); ++i) {
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
        default:
          bad = nonfinite_bits<int16_t, 0x7fff, 0x7c00>(ct.g, it.begin, it.end);
          break;
      }
      if (bad) found.store(true, std::memory_order_relaxed);
    }
  });
  return found.load();
}

}  // namespace

CpuStepResult cpu_step(const std::vector<CpuTensor>& ts, const CpuItems& items, const at::Tensor& step_count,
                       const at::Tensor& lr_table, const at::Tensor& wd_table, bool independent_wd,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                       bool skip_nonfinite) {
  if (found_inf.has_value() && found_inf->data_ptr<float>()[0] != 0.0f) return CpuStepResult::kSkippedFoundInf;
  if (skip_nonfinite && cpu_any_nonfinite(ts, items)) return CpuStepResult::kSkippedNonfinite;
  int64_t* count = step_count.data_ptr<int64_t>();
  const int64_t idx = std::clamp<int64_t>(*count, 0, lr_table.numel() - 1);
  const CpuStepScalars sc{lr_table.data_ptr<float>()[idx], wd_table.data_ptr<float>()[idx], independent_wd,
                          grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr};
  cpu_update(ts, items, sc);
  *count += 1;
  return CpuStepResult::kApplied;
}

namespace {

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& step_count,
                    const at::Tensor& lr_table, const at::Tensor& wd_table, const at::Tensor& hparams,
                    c10::IntArrayRef group_index, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const StepArgs a{params,   grads,    exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,      step_count,
                   lr_table, wd_table, hparams,  group_index, independent_wd,  grad_scale, found_inf};
  check_step_args(a, c10::DeviceType::CPU);
  const double* hp = hparams.data_ptr<double>();
  check_amsgrad_states(a, hp);
  // ---- nothing is written above this line ----
  const size_t n = params.size();
  std::vector<CpuTensor> ts(n);
  CpuItems items;
  for (size_t k = 0; k < n; ++k) {
    const at::Tensor* vmax = max_exp_avg_sqs.empty() ? nullptr : &max_exp_avg_sqs[k];
    ts[k] = cpu_tensor(params[k], grads[k], exp_avgs[k], exp_avg_sqs[k], vmax, steps[k], hp + group_index[k] * kHpCols);
    items.add(static_cast<int32_t>(k), ts[k].n);
  }
  cpu_step(ts, items, step_count, lr_table, wd_table, independent_wd, grad_scale, found_inf, false);
}

template <int D>
void cast_to(const float* src, void* dst, int64_t n) {
  auto* out = static_cast<typename Storage<D>::type*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = Storage<D>::store(src[i]);
}

template <int D>
void cast_from(const void* src, float* dst, int64_t n) {
  const auto* in = static_cast<const typename Storage<D>::type*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<D>::load(in[i]);
}

void test_cast(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.numel() == dst.numel() && src.is_cpu() && dst.is_cpu(),
              "_test_cast_: contiguous CPU tensors of one size");
  TORCH_CHECK(src.scalar_type() == at::kFloat || dst.scalar_type() == at::kFloat, "_test_cast_: one side float32");
  const int64_t n = src.numel();
  if (src.scalar_type() == at::kFloat) {
    const float* s = src.data_ptr<float>();
    switch (dst.scalar_type()) {
      case at::kBFloat16:
        return cast_to<kBF16>(s, dst.data_ptr(), n);
      case at::kHalf:
        return cast_to<kF16>(s, dst.data_ptr(), n);
      default:
        return cast_to<kF32>(s, dst.data_ptr(), n);
    }
  }
  float* d = dst.data_ptr<float>();
  switch (src.scalar_type()) {
    case at::kBFloat16:
      return cast_from<kBF16>(src.data_ptr(), d, n);
    case at::kHalf:
      return cast_from<kF16>(src.data_ptr(), d, n);
    default:
      TORCH_CHECK(false, "_test_cast_: unsupported dtype ", src.scalar_type());
  }
}

}  // namespace
}  // namespace d2z

TORCH_LIBRARY_FRAGMENT(d2z, m) { m.def("_cpu_isa(int force=-1) -> str", &d2z::cpu_isa); }

TORCH_LIBRARY_IMPL(d2z, CPU, m) {
  m.impl("adamw_step_", &d2z::adamw_step_cpu);
  m.impl("_test_cast_", &d2z::test_cast);
}

// A sparse grad routes the call to the sparse key: the same kernel, whose checks reject it by name.
TORCH_LIBRARY_IMPL(d2z, SparseCPU, m) { m.impl("adamw_step_", &d2z::adamw_step_cpu); }
