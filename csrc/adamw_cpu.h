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

// The step's schedule multipliers and options, read once per call.
struct CpuStepScalars {
  float lr_mult, wd_mult;
  bool independent_wd;
  const float* grad_scale;  // nullptr when absent
};

// The update of every item, then each tensor's step (*step = t). `ts` is indexed by Item::tensor.
void cpu_update(const std::vector<CpuTensor>& ts, const CpuItems& items, const CpuStepScalars& s);

// True when some gradient element is a NaN or an Inf (every element read; both threads).
bool cpu_any_nonfinite(const std::vector<CpuTensor>& ts, const CpuItems& items);

// Reads lr_table[step_count], wd_table[step_count] and grad_scale; false when found_inf is
// nonzero (AMP: the step is skipped). Call after every check.
bool cpu_step_scalars(const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
                      bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, CpuStepScalars* out);

}  // namespace d2z
