// Builds the CUDA kernel's WorkList and LaunchArgs from tensors (host code, torch). Shared by the
// CUDA glue, the grid replay and the device step holder, so each runs on the launcher's metadata.
#pragma once

#include "adamw_checks.h"
#include "kernels/adamw_cuda.cuh"

namespace d2z {

// One tensor's metadata (vec is set by build_work_list). vmax: nullptr or a 0-element placeholder
// when it has no amsgrad state.
inline TensorMeta tensor_meta(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                              const at::Tensor* vmax, const at::Tensor& step, int64_t group,
                              const at::Tensor* rem = nullptr) {
  TensorMeta t;
  const bool has_max = vmax != nullptr && vmax->numel() > 0;
  t.p = p.data_ptr();
  t.g = g.data_ptr();
  t.m = m.data_ptr();
  t.v = v.data_ptr();
  t.vmax = has_max ? vmax->data_ptr() : nullptr;
  t.step = step.data_ptr<float>();
  t.n = p.numel();
  t.group = static_cast<int32_t>(group);
  t.dtype = static_cast<int8_t>(to_dtype(p.scalar_type()));
  t.m_dtype = static_cast<int8_t>(to_dtype(m.scalar_type()));
  t.v_dtype = static_cast<int8_t>(to_dtype(v.scalar_type()));
  t.vec = 0;
  t.rem = rem == nullptr ? nullptr : rem->data_ptr<int16_t>();
  return t;
}

inline void check_work_list(const WorkList& list) {
  TORCH_CHECK(list.blocks.size() < (size_t(1) << 31), "d2z::adamw_step_: too many chunks for one launch");
}

inline WorkList make_work_list(const StepArgs& a) {
  WorkList list;
  const size_t n = a.params.size();
  list.tensors.resize(n);
  for (size_t k = 0; k < n; ++k) {
    const at::Tensor* vmax = a.max_exp_avg_sqs.empty() ? nullptr : &a.max_exp_avg_sqs[k];
    list.tensors[k] = tensor_meta(a.params[k], a.grads[k], a.exp_avgs[k], a.exp_avg_sqs[k], vmax, a.steps[k],
                                  a.group_index[k], remainder_of(a.remainders, k));
  }
  build_work_list(list);
  check_work_list(list);
  return list;
}

// Kernel arguments; tensors/blocks point at the metadata buffer (device or host copy).
inline LaunchArgs launch_args(const void* meta, size_t n_tensors, const at::Tensor& hparams, const at::Tensor& lr_table,
                              const at::Tensor& wd_table, const at::Tensor& step_count,
                              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                              bool independent_wd) {
  LaunchArgs L{};  // clip_on = 0: no clipping
  L.tensors = static_cast<const TensorMeta*>(meta);
  L.blocks = reinterpret_cast<const BlockWork*>(static_cast<const char*>(meta) + n_tensors * sizeof(TensorMeta));
  L.hparams = hparams.data_ptr<double>();
  L.lr_table = lr_table.data_ptr<float>();
  L.wd_table = wd_table.data_ptr<float>();
  L.table_len = lr_table.numel();
  L.step_count = step_count.data_ptr<int64_t>();
  L.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  L.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  L.n_tensors = static_cast<int32_t>(n_tensors);
  L.independent_wd = independent_wd ? 1 : 0;
  return L;
}

inline LaunchArgs make_launch_args(const StepArgs& a, const void* meta, size_t n_tensors) {
  return launch_args(meta, n_tensors, a.hparams, a.lr_table, a.wd_table, a.step_count, a.grad_scale, a.found_inf,
                     a.independent_wd);
}

// Every block and thread of both grids on the host, in launch order (the CUDA kernels' bodies; the
// kernel with the float64 path when the launcher would take it). Blocks of one grid may run in any
// order on a GPU; each writes a disjoint chunk, so the sequential order gives the same result.
// clip_kernel on the host: every block's threads, its tree, the ticket; the last block's gather.
inline void replay_clip(const LaunchArgs& L, int64_t n_blocks) {
  const bool inf = L.clip.inf_norm != 0;
  const int64_t grid = clip_blocks(n_blocks);
  double sh[kBlockThreads];
  auto tree = [&] {
    for (int s = kBlockThreads / 2; s > 0; s >>= 1) {
      for (int t = 0; t < s; ++t) clip_tree_level(sh, t, s, inf);
    }
  };
  for (int64_t b = 0; b < grid; ++b) {
    for (int t = 0; t < kBlockThreads; ++t) sh[t] = clip_thread(b, t, kBlockThreads, L, n_blocks);
    tree();
    L.clip_partials[b] = sh[0];
    *L.clip_ticket += 1u;
  }
  for (int t = 0; t < kBlockThreads; ++t) sh[t] = clip_gather(L.clip_partials, grid, t, kBlockThreads, inf);
  tree();
  clip_finalize(sh[0], L.clip, L.clip_t);
  *L.clip_ticket = 0u;
}

inline void replay_grid(const LaunchArgs& L, int64_t n_blocks, bool with_f64) {
  if (L.clip_on) replay_clip(L, n_blocks);
  for (int64_t b = 0; b < n_blocks; ++b) {
    for (int t = 0; t < kBlockThreads; ++t) {
      with_f64 ? adamw_thread<true>(b, t, kBlockThreads, L) : adamw_thread<false>(b, t, kBlockThreads, L);
    }
  }
  const int64_t cb = counter_blocks(L.n_tensors);
  for (int64_t b = 0; b < cb; ++b) {
    for (int t = 0; t < kBlockThreads; ++t) counter_thread(b, t, kBlockThreads, L);
  }
}

}  // namespace d2z
