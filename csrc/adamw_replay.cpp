// Test-only op d2z::adamw_step_grid_replay_: the CUDA launcher's metadata built on the host, then
// the CUDA kernels' per-thread bodies (adamw_cuda.cuh, compiled here by the host compiler) run
// for every block and every thread of both grids, in launch order. Numerically the device code:
// its multiply-adds are fused (std::fma) as on the GPU.
#include "adamw_plan_torch.h"

namespace d2z {
namespace {

void adamw_step_grid_replay(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                            const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
                            const at::Tensor& hparams, c10::IntArrayRef group_index, bool independent_wd,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const StepArgs a{params,   grads,    exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,      step_count,
                   lr_table, wd_table, hparams,  group_index, independent_wd,  grad_scale, found_inf};
  check_step_args(a, c10::DeviceType::CPU);
  check_amsgrad_states(a, hparams.data_ptr<double>());
  const Plan plan = make_plan(a);
  std::vector<unsigned char> meta(plan.bytes() + 16);
  plan.pack(meta.data());
  const LaunchArgs L = make_launch_args(a, meta.data(), plan.tensors.size());
  const int64_t n_blocks = static_cast<int64_t>(plan.blocks.size());
  // Blocks of one grid may run in any order on a GPU; each writes a disjoint chunk, so the
  // sequential order here gives the same result.
  for (int64_t b = 0; b < n_blocks; ++b) {
    for (int t = 0; t < kBlockThreads; ++t) adamw_thread(b, t, kBlockThreads, L);
  }
  const int64_t cb = counter_blocks(L.n_tensors);
  for (int64_t b = 0; b < cb; ++b) {
    for (int t = 0; t < kBlockThreads; ++t) counter_thread(b, t, kBlockThreads, L);
  }
}

}  // namespace
}  // namespace d2z

TORCH_LIBRARY_IMPL(d2z, CPU, m) { m.impl("adamw_step_grid_replay_", &d2z::adamw_step_grid_replay); }
TORCH_LIBRARY_IMPL(d2z, SparseCPU, m) { m.impl("adamw_step_grid_replay_", &d2z::adamw_step_grid_replay); }
