// The CPU kernel of the fused AdamW step: raw pointers, cut into (tensor, chunk) work items.
// Torch-free: the torch glue (csrc/torch/adamw_cpu.cpp) fills CpuTensor from tensors, splits the
// items over its threads and calls the item loops below from each.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "adamw_math.h"

namespace d2z {

// One parameter of the step and its tensors.
struct CpuTensor {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;  // nullptr without amsgrad
  float* step;
  int64_t n;
  const double* hp;  // the group's hparams row
  Dtype dtype;       // of p and g
  float t;           // the new step: *step + 1
  // of m and of v / vmax: dtype, or (fp32/bf16/fp16 parameters) another of those three
  // (exp_avg_dtype); unused by the gradient scans
  Dtype m_dtype = kF32, v_dtype = kF32;
  int16_t* rem = nullptr;  // a bf16 parameter's remainder (master_weights="remainders"), or none
};

// The (tensor, chunk) work items of a list of tensor sizes, and their running cost (what the
// threads split evenly). Depends on the sizes only: a step holder builds it once.
struct CpuItems {
  struct Item {
    int32_t tensor;
    int64_t begin, end;
  };
  std::vector<Item> items;
  std::vector<int64_t> cost;  // prefix sums of item costs
  int64_t total = 0;

  void add(int32_t tensor, int64_t n);
  // How many of `max_threads` threads are worth waking for these items (at least 1).
  int64_t useful_threads(int64_t max_threads) const;
  // Items [first, second) of thread t of `threads`: contiguous runs of about equal cost.
  std::pair<size_t, size_t> share(int64_t t, int64_t threads) const;
};

// The step's schedule multipliers and options, read once per call.
struct CpuStepScalars {
  float lr_mult, wd_mult;
  bool independent_wd;
  const float* grad_scale;  // nullptr when absent
  uint32_t position;        // the step counter before this step, mod 2^32 (stochastic rounding's key)
};

// The update of items [i0, i1) (each tensor's scalars from its group row and new step).
// `ts` is indexed by CpuItems::Item::tensor, which is also the tensor's position in stochastic
// rounding's key (its group row's kRounding: the seed + 1). Steps are not written here.
void cpu_update_items(const std::vector<CpuTensor>& ts, const CpuItems& items, const CpuStepScalars& sc, size_t i0,
                      size_t i1);

// True when a gradient element of items [i0, i1) is a NaN or an Inf (exact: its bits).
bool cpu_nonfinite_items(const std::vector<CpuTensor>& ts, const CpuItems& items, size_t i0, size_t i1);

// The gradients' norm over items [i0, i1), one partial per item into partials[i - i0]: the sum of
// squares (kind 0) or the largest magnitude (kind 1; a NaN wins), accumulated in double. Summing
// the partials in item order gives a result that does not depend on how items were shared.
void cpu_norm_items(const std::vector<CpuTensor>& ts, const CpuItems& items, int kind, size_t i0, size_t i1,
                    double* partials);

// The instruction set the item loops use: force 0 (baseline), 1 (AVX2+FMA), 2 (AVX-512), capped at
// what the CPU has; -1 keeps the current choice. Returns the active one's name.
std::string cpu_isa(int64_t force);

}  // namespace d2z
