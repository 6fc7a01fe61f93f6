// The CPU step of d2z::adamw_step_ as the op and the step holder share it: tensors to the
// kernel's raw pointers (csrc/kernels/adamw_cpu_kernel.h), then one step over both threads.
#pragma once

#include <optional>
#include <vector>

#include "adamw_checks.h"
#include "kernels/adamw_cpu_kernel.h"

namespace d2z {

// Parameter k's pointers; vmax undefined or 0-element without amsgrad. Everything checked before.
inline CpuTensor cpu_tensor(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                            const at::Tensor* vmax, const at::Tensor& step, const double* hp_row,
                            const at::Tensor* rem = nullptr) {
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
          *st + 1.0f,
          to_dtype(m.scalar_type()),
          to_dtype(v.scalar_type()),
          rem == nullptr ? nullptr : rem->data_ptr<int16_t>()};
}

// The reduction of every gradient element of `items` (`ts`' g pointers): the sum of squares, or
// the largest magnitude for inf_norm (a NaN wins), in double; both threads, the per-item partials
// combined in item order (the same bits whatever the thread count).
double cpu_norm_total(const std::vector<CpuTensor>& ts, const CpuItems& items, bool inf_norm);

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
