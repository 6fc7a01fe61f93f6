// torch.classes.d2z.CpuPlan: the CPU step of a fixed list of parameters, kept across steps.
//
// Handing the op six lists of tensors costs more than the update itself for thousands of small
// tensors (each tensor crosses from Python and is unpacked every step). The optimizer builds a
// plan once its parameters, states and groups are settled (d2z_optim/backends/cpp_backend.py);
// each step then hands over only the schedule tensors, and the gradients are read here from the
// parameters (param.grad()). Every check of the op still runs each step, on the tensors as they
// are now (a `.data =` swap, a resized state), before anything is written.
#include <ATen/Parallel.h>
#include <torch/custom_class.h>

#include <atomic>
#include <climits>

#include "adamw_cpu.h"

namespace d2z {
namespace {

constexpr int64_t kGatherGrain = 1024;  // parameters per thread at least

struct CpuPlan : torch::CustomClassHolder {
  std::vector<at::Tensor> params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  std::vector<int64_t> group_index, numel;
  CpuItems items;             // from the sizes at construction
  std::vector<CpuTensor> ts;  // this step's pointers

  CpuPlan(std::vector<at::Tensor> params_, std::vector<at::Tensor> exp_avgs_, std::vector<at::Tensor> exp_avg_sqs_,
          std::vector<at::Tensor> max_exp_avg_sqs_, std::vector<at::Tensor> steps_, std::vector<int64_t> group_index_)
      : params(std::move(params_)),
        exp_avgs(std::move(exp_avgs_)),
        exp_avg_sqs(std::move(exp_avg_sqs_)),
        max_exp_avg_sqs(std::move(max_exp_avg_sqs_)),
        steps(std::move(steps_)),
        group_index(std::move(group_index_)) {
    const size_t n = params.size();
    for (const auto& [len, name] : {std::pair{exp_avgs.size(), "exp_avgs"},
                                    {exp_avg_sqs.size(), "exp_avg_sqs"},
                                    {steps.size(), "steps"},
                                    {group_index.size(), "group_index"}}) {
      TORCH_CHECK(len == n, "d2z.CpuPlan: ", name, " has ", len, " entries but params has ", n);
    }
    TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n, "d2z.CpuPlan: max_exp_avg_sqs has ",
                max_exp_avg_sqs.size(), " entries: it must be empty or as long as params (", n, ")");
    ts.resize(n);
    for (size_t k = 0; k < n; ++k) {
      numel.push_back(params[k].numel());
      items.add(static_cast<int32_t>(k), numel.back());
    }
  }

  // Software pipelining of the header reads: the tensor headers kDist * 2 parameters ahead,
  // their storage and autograd-meta headers kDist ahead, the gradient's header kDist / 2 ahead.
  static constexpr int64_t kDist = 8;
  static void prefetch_lines(const void* p, int lines) {
    for (int i = 0; i < lines; ++i) __builtin_prefetch(static_cast<const char*>(p) + 64 * i, 0, 3);
  }
  void prefetch_headers(int64_t k, int64_t end) const {
    if (k + 2 * kDist < end) {
      const int64_t j = k + 2 * kDist;
      for (const auto* list : {&params, &exp_avgs, &exp_avg_sqs, &steps}) {
        prefetch_lines((*list)[j].unsafeGetTensorImpl(), 4);
      }
    }
    if (k + kDist < end) {
      const int64_t j = k + kDist;
      for (const auto* list : {&params, &exp_avgs, &exp_avg_sqs, &steps}) {
        prefetch_lines((*list)[j].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), 2);
      }
      prefetch_lines(params[j].unsafeGetTensorImpl()->autograd_meta(), 2);
    }
    if (k + kDist / 2 < end) {
      const int64_t j = k + kDist / 2;
      const c10::AutogradMetaInterface* meta = params[j].unsafeGetTensorImpl()->autograd_meta();
      if (meta != nullptr && meta->grad().defined()) prefetch_lines(meta->grad().unsafeGetTensorImpl(), 4);
    }
  }

  // One step of every parameter (the op's semantics). Returns 0 when applied (or skipped by a
  // nonzero found_inf), or k + 1 when parameter k has no gradient or changed size since the plan
  // was built: nothing is written then, and the caller steps through the op and builds a new
  // plan. A bad tensor raises the op's error, also before anything is written.
  int64_t step(at::Tensor step_count, at::Tensor lr_table, at::Tensor wd_table, at::Tensor hparams, bool independent_wd,
               std::optional<at::Tensor> grad_scale, std::optional<at::Tensor> found_inf) {
    const at::Device dev =
        check_call_tensors(step_count, lr_table, wd_table, hparams, grad_scale, found_inf, c10::DeviceType::CPU);
    const int64_t groups = hparams.size(0);
    const double* hp = hparams.data_ptr<double>();
    // Reading ~10 headers (tensor, storage, autograd meta) per parameter is bound by cache and
    // TLB misses for thousands of small tensors: both threads take a share.
    std::atomic<int64_t> missing{INT64_MAX};
    const int64_t n = static_cast<int64_t>(params.size());
    at::parallel_for(0, n, kGatherGrain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        prefetch_headers(k, k1);
        const at::Tensor& p = params[k];
        const at::Tensor& g = p.grad();
        if (!g.defined() || p.numel() != numel[k]) {
          int64_t cur = missing.load();
          while (k < cur && !missing.compare_exchange_weak(cur, k)) {
          }
          return;
        }
        const int64_t gi = group_index[k];
        const at::Tensor* vmax = max_exp_avg_sqs.empty() ? nullptr : &max_exp_avg_sqs[k];
        check_param(k, p, g, exp_avgs[k], exp_avg_sqs[k], vmax, steps[k], gi, groups, dev);
        check_amsgrad_state(k, p, vmax, gi, hp);
        ts[k] = cpu_tensor(p, g, exp_avgs[k], exp_avg_sqs[k], vmax, steps[k], hp + gi * kHpCols);
      }
    });
    if (missing.load() != INT64_MAX) return missing.load() + 1;
    // ---- nothing is written above this line ----
    CpuStepScalars sc;
    if (!cpu_step_scalars(step_count, lr_table, wd_table, independent_wd, grad_scale, found_inf, &sc)) return 0;
    cpu_update(ts, items, sc);
    step_count.data_ptr<int64_t>()[0] += 1;
    return 0;
  }
};

}  // namespace
}  // namespace d2z

TORCH_LIBRARY_FRAGMENT(d2z, m) {
  m.class_<d2z::CpuPlan>("CpuPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>>())
      .def("step", &d2z::CpuPlan::step);
}
