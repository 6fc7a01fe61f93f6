// The CPU implementation of d2z::adamw_step_: the op's checks, then every (tensor, chunk) item of
// the call in one parallel region over the kernel's item loops (csrc/kernels/adamw_cpu_kernel.cpp).
#include "adamw_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

namespace d2z {
namespace {

// The update of every item over the useful threads (contiguous runs of about equal cost), then
// each tensor's step.
void cpu_update(const std::vector<CpuTensor>& ts, const CpuItems& items, const CpuStepScalars& sc) {
  const int64_t threads = items.useful_threads(at::get_num_threads());
  if (threads <= 1) {
    cpu_update_items(ts, items, sc, 0, items.items.size());
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const auto [lo, hi] = items.share(t, threads);
        cpu_update_items(ts, items, sc, lo, hi);
      }
    });
  }
  for (const CpuTensor& ct : ts) *ct.step = ct.t;
}

// True when some gradient element is a NaN or an Inf (every element read; both threads, which
// stop early once one has found one).
bool cpu_any_nonfinite(const std::vector<CpuTensor>& ts, const CpuItems& items) {
  std::atomic<bool> found{false};
  at::parallel_for(0, static_cast<int64_t>(items.items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1 && !found.load(std::memory_order_relaxed); ++i) {
      if (cpu_nonfinite_items(ts, items, i, i + 1)) found.store(true, std::memory_order_relaxed);
    }
  });
  return found.load();
}

}  // namespace

double cpu_norm_total(const std::vector<CpuTensor>& ts, const CpuItems& items, bool inf_norm) {
  std::vector<double> partials(items.items.size());
  const int kind = inf_norm ? 1 : 0;
  const int64_t threads = items.useful_threads(at::get_num_threads());
  if (threads <= 1) {
    cpu_norm_items(ts, items, kind, 0, items.items.size(), partials.data());
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const auto [lo, hi] = items.share(t, threads);
        cpu_norm_items(ts, items, kind, lo, hi, partials.data() + lo);
      }
    });
  }
  double total = 0.0;
  for (const double x : partials) total = combine_norm(total, x, inf_norm);
  return total;
}

CpuStepResult cpu_step(const std::vector<CpuTensor>& ts, const CpuItems& items, const at::Tensor& step_count,
                       const at::Tensor& lr_table, const at::Tensor& wd_table, bool independent_wd,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                       bool skip_nonfinite) {
  if (found_inf.has_value() && found_inf->data_ptr<float>()[0] != 0.0f) return CpuStepResult::kSkippedFoundInf;
  if (skip_nonfinite && cpu_any_nonfinite(ts, items)) return CpuStepResult::kSkippedNonfinite;
  int64_t* count = step_count.data_ptr<int64_t>();
  const int64_t idx = std::clamp<int64_t>(*count, 0, lr_table.numel() - 1);
  const CpuStepScalars sc{lr_table.data_ptr<float>()[idx], wd_table.data_ptr<float>()[idx], independent_wd,
                          grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr,
                          static_cast<uint32_t>(*count)};
  cpu_update(ts, items, sc);
  *count += 1;
  return CpuStepResult::kApplied;
}

namespace {

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& step_count,
                    const at::Tensor& lr_table, const at::Tensor& wd_table, const at::Tensor& hparams,
                    c10::IntArrayRef group_index, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::TensorList>& remainders) {
  const StepArgs a{params,      grads,          exp_avgs,   exp_avg_sqs, max_exp_avg_sqs,
                   steps,       step_count,     lr_table,   wd_table,    hparams,
                   group_index, independent_wd, grad_scale, found_inf,   remainder_list(remainders)};
  check_step_args(a, c10::DeviceType::CPU);
  const double* hp = hparams.data_ptr<double>();
  check_amsgrad_states(a, hp);
  // ---- nothing is written above this line ----
  const size_t n = params.size();
  std::vector<CpuTensor> ts(n);
  CpuItems items;
  for (size_t k = 0; k < n; ++k) {
    const at::Tensor* vmax = max_exp_avg_sqs.empty() ? nullptr : &max_exp_avg_sqs[k];
    ts[k] = cpu_tensor(params[k], grads[k], exp_avgs[k], exp_avg_sqs[k], vmax, steps[k], hp + group_index[k] * kHpCols,
                       remainder_of(a.remainders, k));
    items.add(static_cast<int32_t>(k), ts[k].n);
  }
  cpu_step(ts, items, step_count, lr_table, wd_table, independent_wd, grad_scale, found_inf, false);
}

void any_nonfinite_cpu(at::TensorList tensors, const at::Tensor& found) {
  TORCH_CHECK(found.device().is_cpu() && found.scalar_type() == at::kFloat && found.numel() == 1,
              "d2z::any_nonfinite_: found must be a float32 CPU tensor with one element");
  std::vector<at::Tensor> dense;  // each tensor as one block of real elements
  dense.reserve(tensors.size());
  for (size_t k = 0; k < tensors.size(); ++k) {
    at::Tensor t = tensors[k];
    TORCH_CHECK(t.device().is_cpu() && is_dense(t), "d2z::any_nonfinite_: tensors[", k, "] must be a dense CPU tensor");
    if (t.is_complex()) t = at::view_as_real(t);
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                "d2z::any_nonfinite_: tensors[", k, "] has dtype ", dt, "; supported: floating point and complex");
    dense.push_back(fills_block(t) ? t : t.contiguous());  // an overlapping view (expanded): its values
  }
  // ---- nothing is written above this line ----
  std::vector<CpuTensor> ts(dense.size());
  CpuItems items;
  for (size_t k = 0; k < dense.size(); ++k) {
    ts[k] = CpuTensor{nullptr,
                      dense[k].data_ptr(),
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr,
                      dense[k].numel(),
                      nullptr,
                      to_dtype(dense[k].scalar_type()),
                      0.0f};
    items.add(static_cast<int32_t>(k), ts[k].n);
  }
  if (cpu_any_nonfinite(ts, items)) found.fill_(1.0);
}

// Dense real views of `tensors` as the norm kernels take them (checked), into ts / items.
void norm_inputs(at::TensorList tensors, const char* op, std::vector<at::Tensor>& dense, std::vector<CpuTensor>& ts,
                 CpuItems& items) {
  dense.reserve(tensors.size());
  for (size_t k = 0; k < tensors.size(); ++k) {
    at::Tensor t = tensors[k];
    TORCH_CHECK(t.device().is_cpu() && is_dense(t), op, ": tensors[", k, "] must be a dense CPU tensor");
    if (t.is_complex()) t = at::view_as_real(t);
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op, ": tensors[", k,
                "] has dtype ", dt, "; supported: floating point and complex");
    dense.push_back(fills_block(t) ? t : t.contiguous());
  }
  ts.resize(dense.size());
  for (size_t k = 0; k < dense.size(); ++k) {
    ts[k] = CpuTensor{nullptr,
                      dense[k].data_ptr(),
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr,
                      dense[k].numel(),
                      nullptr,
                      to_dtype(dense[k].scalar_type()),
                      0.0f};
    items.add(static_cast<int32_t>(k), ts[k].n);
  }
}

// The norm of the gradients (ord 2: sqrt of the sum of squares; inf: the largest magnitude; a
// NaN anywhere gives NaN) as a float32 0-d tensor.
at::Tensor grad_norm_cpu(at::TensorList tensors, double ord) {
  TORCH_CHECK(ord == 2.0 || std::isinf(ord), "d2z::grad_norm: ord must be 2 or inf, got ", ord);
  std::vector<at::Tensor> dense;
  std::vector<CpuTensor> ts;
  CpuItems items;
  norm_inputs(tensors, "d2z::grad_norm", dense, ts, items);
  const bool inf = std::isinf(ord);
  const double total = cpu_norm_total(ts, items, inf);
  return at::full({}, static_cast<float>(inf ? total : std::sqrt(total)), at::TensorOptions().dtype(at::kFloat));
}

// The step's clipping, from the gradients to its decisions (csrc/kernels/clip_math.h).
void clip_grad_norm_cpu(at::TensorList grads, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, const at::Tensor& ring, const at::Tensor& recorded,
                        const at::Tensor& grad_norm, const at::Tensor& grad_scale_out, const at::Tensor& found_out,
                        double max_norm, double ord, bool spike_skip, double spike_sigma) {
  const at::Device cpu(c10::DeviceType::CPU);
  const ClipTensors t =
      check_clip_tensors(cpu, grad_scale, found_inf, ring, recorded, grad_norm, grad_scale_out, found_out);
  const ClipConfig c = clip_config(max_norm, ord, spike_skip, spike_sigma, ring);
  std::vector<at::Tensor> dense;
  std::vector<CpuTensor> ts;
  CpuItems items;
  norm_inputs(grads, "d2z::clip_grad_norm_", dense, ts, items);
  // ---- nothing is written above this line ----
  clip_finalize(cpu_norm_total(ts, items, c.inf_norm != 0), c, t);
}

}  // namespace
}  // namespace d2z

TORCH_LIBRARY_FRAGMENT(d2z, m) { m.def("_cpu_isa(int force=-1) -> str", &d2z::cpu_isa); }

TORCH_LIBRARY_IMPL(d2z, CPU, m) {
  m.impl("adamw_step_", &d2z::adamw_step_cpu);
  m.impl("any_nonfinite_", &d2z::any_nonfinite_cpu);
  m.impl("grad_norm", &d2z::grad_norm_cpu);
  m.impl("clip_grad_norm_", &d2z::clip_grad_norm_cpu);
}

// A sparse grad routes the call to the sparse key: the same kernel, whose checks reject it by name.
TORCH_LIBRARY_IMPL(d2z, SparseCPU, m) { m.impl("adamw_step_", &d2z::adamw_step_cpu); }
