// torch.classes.d2z.CpuPlan: the CPU step of a fixed list of parameters, kept across steps.
//
// Handing the op six lists of tensors costs more than the update itself for thousands of small
// tensors (each tensor crosses from Python and is unpacked every step). The optimizer builds a
// plan once its parameters, states and groups are settled (d2z_optim/backends/cpp_backend.py);
// each step then hands over only the schedule tensors, and the gradients are read here from the
// parameters (param.grad()). Every check of the op still runs each step, on the tensors as they
// are now (a `.data =` swap, a resized state), before anything is written.
//
// Parameters are held as their Python objects, as the optimizer's param_groups hold them, and
// each step reads the tensor each object has now: a reference to the tensor itself would make
// torch.utils.swap_tensors refuse it (Module.to / load_state_dict with
// swap_module_params_on_conversion swap a new tensor into the same Python object). A step holds
// the gradients it reads while it runs (the GIL is released then: another thread may drop one).
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/custom_class.h>

#include <atomic>
#include <climits>

#include "adamw_cpu.h"

namespace d2z {
namespace {

constexpr int64_t kGatherGrain = 1024;  // parameters per thread at least
constexpr int64_t kSkippedNonfinite = -1;

struct CpuPlan : torch::CustomClassHolder {
  std::vector<PyObject*> params;  // the parameters' Python objects (owned references)
  std::vector<at::Tensor> exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  std::vector<int64_t> group_index, numel;
  CpuItems items;             // from the sizes at construction
  std::vector<CpuTensor> ts;  // this step's pointers

  CpuPlan(std::vector<at::Tensor> params_, std::vector<at::Tensor> exp_avgs_, std::vector<at::Tensor> exp_avg_sqs_,
          std::vector<at::Tensor> max_exp_avg_sqs_, std::vector<at::Tensor> steps_, std::vector<int64_t> group_index_)
      : exp_avgs(std::move(exp_avgs_)),
        exp_avg_sqs(std::move(exp_avg_sqs_)),
        max_exp_avg_sqs(std::move(max_exp_avg_sqs_)),
        steps(std::move(steps_)),
        group_index(std::move(group_index_)) {
    const size_t n = params_.size();
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
      PyObject* obj = params_[k].unsafeGetTensorImpl()->pyobj_slot()->load_pyobj();
      TORCH_CHECK(obj != nullptr, "d2z.CpuPlan: params[", k, "] has no Python object");
      params.push_back(obj);
      numel.push_back(params_[k].numel());
      items.add(static_cast<int32_t>(k), numel.back());
    }
    pybind11::gil_scoped_acquire gil;  // every check passed: now own the references
    for (PyObject* obj : params) Py_INCREF(obj);
  }

  ~CpuPlan() override {
    if (!Py_IsInitialized()) return;  // the interpreter is gone: nothing left to release
    pybind11::gil_scoped_acquire gil;
    for (PyObject* obj : params) Py_DECREF(obj);
  }

  // The tensor parameter k's Python object holds now.
  const at::Tensor& param(size_t k) const { return THPVariable_Unpack(params[k]); }

  // Software pipelining of the header reads: the parameter's Python object kDist * 3 ahead, the
  // tensor headers kDist * 2 ahead, their storage and autograd-meta headers kDist ahead, the
  // gradient's header kDist / 2 ahead.
  static constexpr int64_t kDist = 8;
  static void prefetch_lines(const void* p, int lines) {
    for (int i = 0; i < lines; ++i) __builtin_prefetch(static_cast<const char*>(p) + 64 * i, 0, 3);
  }
  void prefetch_headers(int64_t k, int64_t end) const {
    if (k + 3 * kDist < end) prefetch_lines(params[k + 3 * kDist], 1);  // the Python object
    if (k + 2 * kDist < end) {
      const int64_t j = k + 2 * kDist;
      prefetch_lines(param(j).unsafeGetTensorImpl(), 4);
      for (const auto* list : {&exp_avgs, &exp_avg_sqs, &steps}) prefetch_lines((*list)[j].unsafeGetTensorImpl(), 4);
    }
    if (k + kDist < end) {
      const int64_t j = k + kDist;
      const c10::TensorImpl* p = param(j).unsafeGetTensorImpl();
      prefetch_lines(p->unsafe_storage().unsafeGetStorageImpl(), 2);
      prefetch_lines(p->autograd_meta(), 2);
      for (const auto* list : {&exp_avgs, &exp_avg_sqs, &steps}) {
        prefetch_lines((*list)[j].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), 2);
      }
    }
    if (k + kDist / 2 < end) {
      const c10::AutogradMetaInterface* meta = param(k + kDist / 2).unsafeGetTensorImpl()->autograd_meta();
      if (meta != nullptr && meta->grad().defined()) prefetch_lines(meta->grad().unsafeGetTensorImpl(), 4);
    }
  }

  // One step of every parameter (the op's semantics). Returns 0 when applied (or skipped by a
  // nonzero found_inf); kSkippedNonfinite when skip_nonfinite found a NaN or an Inf in a
  // gradient (a no-op, as for found_inf); or k + 1 when parameter k has no gradient or changed
  // size since the plan was built: nothing is written then, and the caller steps through the op
  // and builds a new plan. A bad tensor raises the op's error, also before anything is written.
  int64_t step(at::Tensor step_count, at::Tensor lr_table, at::Tensor wd_table, at::Tensor hparams, bool independent_wd,
               std::optional<at::Tensor> grad_scale, std::optional<at::Tensor> found_inf, bool skip_nonfinite) {
    const at::Device dev =
        check_call_tensors(step_count, lr_table, wd_table, hparams, grad_scale, found_inf, c10::DeviceType::CPU);
    const int64_t groups = hparams.size(0);
    const double* hp = hparams.data_ptr<double>();
    // Reading ~10 headers (tensor, storage, autograd meta) per parameter is bound by cache and
    // TLB misses for thousands of small tensors: both threads take a share.
    std::atomic<int64_t> missing{INT64_MAX};
    const int64_t n = static_cast<int64_t>(params.size());
    // This step's gradients, held until the update is done. (Parameters are not copied: the
    // plan's Python objects hold them, and a copy of a tensor whose only reference is its
    // Python object takes the GIL to keep that object alive.)
    std::vector<at::Tensor> grads(n);
    at::parallel_for(0, n, kGatherGrain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        prefetch_headers(k, k1);
        const at::Tensor& p = param(k);
        const at::Tensor& g = grads[k] = p.grad();
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
    const CpuStepResult r =
        cpu_step(ts, items, step_count, lr_table, wd_table, independent_wd, grad_scale, found_inf, skip_nonfinite);
    return r == CpuStepResult::kSkippedNonfinite ? kSkippedNonfinite : 0;
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
