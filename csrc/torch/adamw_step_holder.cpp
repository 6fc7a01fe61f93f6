// d2z_optim._C.CpuStepHolder: the CPU step of a fixed list of parameters, kept across steps.
//
// Handing the op six lists of tensors costs more than the update itself for thousands of small
// tensors (each tensor crosses from Python and is unpacked every step). The step cache builds a
// holder once its parameters, states and groups are settled (d2z_optim/backends/cpp_backend.py);
// each step then hands over only the schedule tensors, and the gradients are read here from the
// parameters (param.grad()). Every check of the op still runs each step, on the tensors as they
// are now (a `.data =` swap, a resized state), before anything is written.
//
// Parameters are held as their Python objects, as the optimizer's param_groups hold them, and
// each step reads the tensor each object has now: a reference to the tensor itself would make
// torch.utils.swap_tensors refuse it (Module.to / load_state_dict with
// swap_module_params_on_conversion swap a new tensor into the same Python object). The garbage
// collector sees those references (tp_traverse / tp_clear), so a reference cycle through the
// optimizer (e.g. a gradient hook on a parameter that calls opt.step()) is collected. A step holds
// the gradients it reads while it runs (the GIL is released then: another thread may drop one).
#include "adamw_step_holder.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <atomic>
#include <climits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "adamw_cpu.h"

namespace py = pybind11;

namespace d2z {
namespace {

constexpr int64_t kGatherGrain = 1024;  // parameters per thread at least

// The op's checks refused a tensor of this step (raised as d2z_optim._C.StepRefused).
struct StepRefusedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct CpuStepHolder {
  std::vector<PyObject*> params;  // the parameters' Python objects (owned references)
  std::vector<at::Tensor> exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  std::vector<int64_t> group_index, numel;
  CpuItems items;             // from the sizes at construction
  std::vector<CpuTensor> ts;  // this step's pointers

  CpuStepHolder(const py::list& params_, std::vector<at::Tensor> exp_avgs_, std::vector<at::Tensor> exp_avg_sqs_,
                std::vector<at::Tensor> max_exp_avg_sqs_, std::vector<at::Tensor> steps_,
                std::vector<int64_t> group_index_)
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
      TORCH_CHECK(len == n, "d2z.CpuStepHolder: ", name, " has ", len, " entries but params has ", n);
    }
    TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n, "d2z.CpuStepHolder: max_exp_avg_sqs has ",
                max_exp_avg_sqs.size(), " entries: it must be empty or as long as params (", n, ")");
    for (size_t k = 0; k < n; ++k) {
      PyObject* obj = params_[k].ptr();
      TORCH_CHECK(THPVariable_Check(obj), "d2z.CpuStepHolder: params[", k, "] is not a tensor");
      numel.push_back(THPVariable_Unpack(obj).numel());
    }
    ts.resize(n);
    for (size_t k = 0; k < n; ++k) items.add(static_cast<int32_t>(k), numel[k]);
    // every check passed: now own the references
    for (size_t k = 0; k < n; ++k) params.push_back(py::handle(params_[k]).inc_ref().ptr());
  }

  CpuStepHolder(const CpuStepHolder&) = delete;
  CpuStepHolder& operator=(const CpuStepHolder&) = delete;

  ~CpuStepHolder() { release(); }

  // Drops the parameters (the GC's tp_clear, or destruction). Needs the GIL.
  void release() {
    std::vector<PyObject*> held;
    held.swap(params);
    if (!Py_IsInitialized()) return;  // the interpreter is gone: nothing left to release
    for (PyObject* obj : held) Py_DECREF(obj);
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

  // One step of every parameter (the op's semantics). Called with the GIL released.
  StepStatus step(const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
                  const at::Tensor& hparams, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, bool skip_nonfinite) {
    TORCH_CHECK(params.size() == steps.size(), "d2z.CpuStepHolder: used after release()");
    const at::Device dev =
        check_call_tensors(step_count, lr_table, wd_table, hparams, grad_scale, found_inf, c10::DeviceType::CPU);
    const int64_t groups = hparams.size(0);
    const double* hp = hparams.data_ptr<double>();
    // Reading ~10 headers (tensor, storage, autograd meta) per parameter is bound by cache and
    // TLB misses for thousands of small tensors: both threads take a share.
    std::atomic<bool> declined{false};
    const int64_t n = static_cast<int64_t>(params.size());
    // This step's gradients, held until the update is done. (Parameters are not copied: the
    // holder's Python objects hold them, and a copy of a tensor whose only reference is its
    // Python object takes the GIL to keep that object alive.)
    std::vector<at::Tensor> grads(n);
    // the first refusal of the op's checks, by parameter index (the lowest wins: deterministic)
    std::atomic<int64_t> refused{INT64_MAX};
    std::string why;
    std::mutex why_mutex;
    at::parallel_for(0, n, kGatherGrain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        prefetch_headers(k, k1);
        const at::Tensor& p = param(k);
        const at::Tensor& g = grads[k] = p.grad();
        if (!g.defined() || p.numel() != numel[k]) {
          declined.store(true);
          return;
        }
        const int64_t gi = group_index[k];
        const at::Tensor* vmax = max_exp_avg_sqs.empty() ? nullptr : &max_exp_avg_sqs[k];
        try {
          check_param(k, p, g, exp_avgs[k], exp_avg_sqs[k], vmax, steps[k], gi, groups, dev);
          check_amsgrad_state(k, p, vmax, gi, hp);
        } catch (const c10::Error& e) {
          std::lock_guard<std::mutex> lock(why_mutex);
          if (k < refused.load()) {
            refused.store(k);
            why = e.what_without_backtrace();
          }
          return;
        }
        ts[k] = cpu_tensor(p, g, exp_avgs[k], exp_avg_sqs[k], vmax, steps[k], hp + gi * kHpCols);
      }
    });
    if (declined.load()) return StepStatus::kDeclined;
    if (refused.load() != INT64_MAX) throw StepRefusedError(why);
    // ---- nothing is written above this line ----
    const CpuStepResult r =
        cpu_step(ts, items, step_count, lr_table, wd_table, independent_wd, grad_scale, found_inf, skip_nonfinite);
    return r == CpuStepResult::kSkippedNonfinite ? StepStatus::kSkippedNonfinite : StepStatus::kApplied;
  }
};

bool constructed(PyObject* self) {
  return reinterpret_cast<py::detail::instance*>(self)->get_value_and_holder().holder_constructed();
}

}  // namespace

void bind_step_holders(py::module_& m) {
  py::register_exception<StepRefusedError>(m, "StepRefused", PyExc_RuntimeError);
  py::class_<CpuStepHolder>(m, "CpuStepHolder", py::custom_type_setup([](PyHeapTypeObject* heap_type) {
                              auto* type = &heap_type->ht_type;
                              type->tp_flags |= Py_TPFLAGS_HAVE_GC;
                              type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) -> int {
                                Py_VISIT(Py_TYPE(self));
                                if (!constructed(self)) return 0;
                                for (PyObject* obj : py::cast<CpuStepHolder&>(py::handle(self)).params) Py_VISIT(obj);
                                return 0;
                              };
                              type->tp_clear = [](PyObject* self) -> int {
                                if (constructed(self)) py::cast<CpuStepHolder&>(py::handle(self)).release();
                                return 0;
                              };
                            }))
      .def(py::init<const py::list&, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<int64_t>>(),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"),
           py::arg("group_index"))
      .def(
          "step",
          [](CpuStepHolder& self, const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
             const at::Tensor& hparams, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, bool skip_nonfinite) {
            return static_cast<int64_t>(self.step(step_count, lr_table, wd_table, hparams, independent_wd, grad_scale,
                                                  found_inf, skip_nonfinite));
          },
          py::call_guard<py::gil_scoped_release>());
}

}  // namespace d2z
