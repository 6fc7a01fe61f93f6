// Builds the CUDA kernel's WorkList and LaunchArgs from the op's tensors (host code, torch). Shared
// by the CUDA glue and the grid replay, so the replay runs on exactly the launcher's metadata.
#pragma once

#include "adamw_checks.h"
#include "kernels/adamw_cuda.cuh"

namespace d2z {

inline WorkList make_work_list(const StepArgs& a) {
  WorkList list;
  const size_t n = a.params.size();
  list.tensors.resize(n);
  for (size_t k = 0; k < n; ++k) {
    TensorMeta& t = list.tensors[k];
    const bool has_max = !a.max_exp_avg_sqs.empty() && a.max_exp_avg_sqs[k].numel() > 0;
    t.p = a.params[k].data_ptr();
    t.g = a.grads[k].data_ptr();
    t.m = a.exp_avgs[k].data_ptr();
    t.v = a.exp_avg_sqs[k].data_ptr();
    t.vmax = has_max ? a.max_exp_avg_sqs[k].data_ptr() : nullptr;
    t.step = a.steps[k].data_ptr<float>();
    t.n = a.params[k].numel();
    t.group = static_cast<int32_t>(a.group_index[k]);
    t.dtype = static_cast<int16_t>(to_dtype(a.params[k].scalar_type()));
    t.vec = 0;
  }
  build_work_list(list);
  TORCH_CHECK(list.blocks.size() < (size_t(1) << 31), "d2z::adamw_step_: too many chunks for one launch");
  return list;
}

// Kernel arguments; tensors/blocks point at the metadata buffer (device or host copy).
inline LaunchArgs make_launch_args(const StepArgs& a, const void* meta, size_t n_tensors) {
  LaunchArgs L;
  L.tensors = static_cast<const TensorMeta*>(meta);
  L.blocks = reinterpret_cast<const BlockWork*>(static_cast<const char*>(meta) + n_tensors * sizeof(TensorMeta));
  L.hparams = a.hparams.data_ptr<double>();
  L.lr_table = a.lr_table.data_ptr<float>();
  L.wd_table = a.wd_table.data_ptr<float>();
  L.table_len = a.lr_table.numel();
  L.step_count = a.step_count.data_ptr<int64_t>();
  L.grad_scale = a.grad_scale.has_value() ? a.grad_scale->data_ptr<float>() : nullptr;
  L.found_inf = a.found_inf.has_value() ? a.found_inf->data_ptr<float>() : nullptr;
  L.n_tensors = static_cast<int32_t>(n_tensors);
  L.independent_wd = a.independent_wd ? 1 : 0;
  return L;
}

}  // namespace d2z
