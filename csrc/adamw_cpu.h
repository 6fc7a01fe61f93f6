// The CPU kernel's interface (adamw_cpu.cpp): the tensors of one step as raw pointers, cut into
// work items that all run in one parallel region. Used by the op (lists handed in each call)
// and by the step plan (adamw_cpu_plan.cpp: tensors kept across steps, gradients read in C++).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "adamw_checks.h"

namespace d2z {

struct CpuTensor {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;  // nullptr without amsgrad
  float* step;
  int64_t n;
  const double* hp;  // the group's hparams row
  Dtype dtype;
  float t;  // the new step: *step + 1
};

// Parameter k's pointers; vmax undefined or 0-element without amsgrad. Everything checked before.
inline CpuTensor cpu_tensor(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                            const at::Tensor* vmax, const at::Tensor& step, const double* hp_row) {
  const bool ams = hp_row[kAmsgrad] != 0.0 && vmax != nullptr && vmax->numel() > 0;
  float* st = step.data_ptr<float>();
  return {p.data_ptr(),
          g.data_ptr(),
          m.data_ptr(),
          v.data_ptr(),
          ams ? vmax->data_ptr() : nullptr,
          st,
          p.numel(),
          hp_row,
          to_dtype(p.scalar_type()),
          *st + 1.0f};
}

// The (tensor, chunk) work items of a list of tensor sizes, and their running cost (what the
// threads split evenly). Depends on the sizes only: the plan builds it once.
struct CpuItems {
  struct Item {
    int32_t tensor;
    int64_t begin, end;
  };
  std::vector<Item> items;
  std::vector<int64_t> cost;  // prefix sums of item costs
  int64_t total = 0;

  void add(int32_t tensor, int64_t n);
};

enum class CpuStepResult { kApplied, kSkippedFoundInf, kSkippedNonfinite };

// The step of every item after every check passed: skipped when found_inf is nonzero (AMP) or,
// with skip_nonfinite, when a gradient holds a NaN or an Inf (all read first); else the update
// with lr_table[step_count] and wd_table[step_count], each tensor's step (*step = t) and
// step_count + 1. `ts` is indexed by CpuItems::Item::tensor.
CpuStepResult cpu_step(const std::vector<CpuTensor>& ts, const CpuItems& items, const at::Tensor& step_count,
                       const at::Tensor& lr_table, const at::Tensor& wd_table, bool independent_wd,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                       bool skip_nonfinite);

}  // namespace d2z
