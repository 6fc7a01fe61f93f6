// The step holders (d2z_optim._C): a fixed list of parameters and their states, handed over once,
// stepped each time with the schedule tensors only; the gradients are read from the parameters
// (param.grad()) here, in C++.
//
// Handing the op six lists of tensors costs more than the update itself for thousands of small
// tensors (each tensor crosses from Python and is unpacked every step). The step cache builds a
// holder once its parameters, states and groups are settled (d2z_optim/backends/cpp_backend.py,
// triton_backend.py).
//
// CpuStepHolder: the CPU kernel. Every check of the op runs each step, on the tensors as they are
// now (a `.data =` swap, a resized state), before anything is written.
//
// DeviceStepHolder: the CUDA kernel (kind "cuda", launched here) or the Triton kernels (kind
// "triton", launched by Python from the metadata kept here). Each step reads every tensor's
// address, size, dtype and contiguity (a key); the op's checks run, and the device metadata is
// rebuilt and uploaded (one asynchronous copy), only when a key changed. Its buffers are its own:
// nothing a kernel reads is in a process-wide cache. A buffer a CUDA graph capture recorded (the
// caller says it is capturing) is kept for the holder's life and never written again; a change met
// while capturing gets new buffers, so the graph's copy of the metadata stays as it was recorded.
// Modes: "device" (CUDA tensors), "replay" (CPU tensors: the kind "cuda" replays the CUDA grid on
// the host, the kind "triton" leaves the launches to Python, e.g. under TRITON_INTERPRET=1), "stub"
// (CPU tensors, nothing launched: the host-overhead benchmark).
//
// Parameters are held as their Python objects, as the optimizer's param_groups hold them, and
// each step reads the tensor each object has now: a reference to the tensor itself would make
// torch.utils.swap_tensors refuse it (Module.to / load_state_dict with
// swap_module_params_on_conversion swap a new tensor into the same Python object). The garbage
// collector sees those references (tp_traverse / tp_clear), so a reference cycle through the
// optimizer is collected. A step holds the gradients it reads while it runs (the GIL is released
// then: another thread may drop one).
#include "adamw_step_holder.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <atomic>
#include <climits>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "adamw_cpu.h"
#include "adamw_worklist.h"

namespace py = pybind11;

namespace d2z {

namespace {
const CudaHooks* g_cuda_hooks = nullptr;
}  // namespace

const CudaHooks* cuda_hooks() { return g_cuda_hooks; }
void set_cuda_hooks(const CudaHooks* hooks) { g_cuda_hooks = hooks; }

namespace {

constexpr int64_t kGatherGrain = 1024;  // parameters per thread at least

// The op's checks refused a tensor of this step (raised as d2z_optim._C.StepRefused).
struct StepRefusedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The first refusal of a parallel loop over parameters (the lowest index wins: deterministic).
struct FirstRefusal {
  std::atomic<int64_t> index{INT64_MAX};
  std::string why;
  std::mutex mutex;
  void note(int64_t k, const c10::Error& e) {
    std::lock_guard<std::mutex> lock(mutex);
    if (k < index.load()) {
      index.store(k);
      why = e.what_without_backtrace();
    }
  }
  void raise_if_any() const {
    if (index.load() != INT64_MAX) throw StepRefusedError(why);
  }
};

// The parameters (their Python objects) and states of a holder, and the header prefetching.
struct HeldParams {
  std::vector<PyObject*> params;  // owned references
  std::vector<at::Tensor> exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  // master_weights="remainders": empty, or one per parameter (0 elements: none), checked each step
  // as the op checks its remainders argument
  std::vector<at::Tensor> remainders;
  std::vector<int64_t> group_index, numel;

  HeldParams(const char* what, const py::list& params_, std::vector<at::Tensor> exp_avgs_,
             std::vector<at::Tensor> exp_avg_sqs_, std::vector<at::Tensor> max_exp_avg_sqs_,
             std::vector<at::Tensor> steps_, std::vector<int64_t> group_index_, std::vector<at::Tensor> remainders_)
      : exp_avgs(std::move(exp_avgs_)),
        exp_avg_sqs(std::move(exp_avg_sqs_)),
        max_exp_avg_sqs(std::move(max_exp_avg_sqs_)),
        steps(std::move(steps_)),
        remainders(std::move(remainders_)),
        group_index(std::move(group_index_)) {
    const size_t n = params_.size();
    TORCH_CHECK(remainders.empty() || remainders.size() == n, what, ": remainders has ", remainders.size(),
                " entries: it must be empty or as long as params (", n, ")");
    for (const auto& [len, name] : {std::pair{exp_avgs.size(), "exp_avgs"},
                                    {exp_avg_sqs.size(), "exp_avg_sqs"},
                                    {steps.size(), "steps"},
                                    {group_index.size(), "group_index"}}) {
      TORCH_CHECK(len == n, what, ": ", name, " has ", len, " entries but params has ", n);
    }
    TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n, what, ": max_exp_avg_sqs has ",
                max_exp_avg_sqs.size(), " entries: it must be empty or as long as params (", n, ")");
    for (size_t k = 0; k < n; ++k) {
      PyObject* obj = params_[k].ptr();
      TORCH_CHECK(THPVariable_Check(obj), what, ": params[", k, "] is not a tensor");
      numel.push_back(THPVariable_Unpack(obj).numel());
    }
    // every check passed: now own the references
    for (size_t k = 0; k < n; ++k) params.push_back(py::handle(params_[k]).inc_ref().ptr());
  }

  HeldParams(const HeldParams&) = delete;
  HeldParams& operator=(const HeldParams&) = delete;
  virtual ~HeldParams() { release(); }

  // Drops the parameters (the GC's tp_clear, or destruction). Needs the GIL.
  void release() {
    std::vector<PyObject*> held;
    held.swap(params);
    if (!Py_IsInitialized()) return;  // the interpreter is gone: nothing left to release
    for (PyObject* obj : held) Py_DECREF(obj);
  }

  bool released() const { return params.size() != steps.size(); }

  // The tensor parameter k's Python object holds now.
  const at::Tensor& param(size_t k) const { return THPVariable_Unpack(params[k]); }
  const at::Tensor* vmax(size_t k) const { return max_exp_avg_sqs.empty() ? nullptr : &max_exp_avg_sqs[k]; }
  // Parameter k's remainder, nullptr when it has none.
  const at::Tensor* rem(size_t k) const { return remainder_of(remainders, k); }
  // The op's check of parameter k's remainders entry (none when the list is empty).
  void check_rem(int64_t k, const at::Device& dev) const {
    if (!remainders.empty()) check_remainder(k, param(static_cast<size_t>(k)), remainders[k], dev);
  }

  // Software pipelining of the header reads (cache and TLB misses for thousands of small tensors):
  // the parameter's Python object kDist * 3 ahead, the tensor headers kDist * 2 ahead, their
  // storage and autograd-meta headers kDist ahead, the gradient's header kDist / 2 ahead. The
  // states' storage headers only when the step reads their data pointers (`state_storages`: the
  // CPU step, a device step that checks everything; a steady device step reads their seals).
  static constexpr int64_t kDist = 8;
  static void prefetch_lines(const void* p, int lines) {
    for (int i = 0; i < lines; ++i) __builtin_prefetch(static_cast<const char*>(p) + 64 * i, 0, 3);
  }
  // A tensor header's lines that a step reads: the storage and autograd-meta pointers at its
  // start, the offset, size, dtype, flags and dispatch keys at its end (c10::TensorImpl's
  // layout; the sizes between are not read). Any layout is correct: only the speed depends on it.
  static void prefetch_impl(const c10::TensorImpl* t) {
    const char* c = reinterpret_cast<const char*>(t);
    __builtin_prefetch(c + 16, 0, 3);
    __builtin_prefetch(c + sizeof(c10::TensorImpl) - 32, 0, 3);
    __builtin_prefetch(c + sizeof(c10::TensorImpl) - 1, 0, 3);
  }
  // A storage header's data pointer and flags (its first 64 bytes), an autograd meta's gradient.
  static void prefetch_head(const void* t) {
    const char* c = static_cast<const char*>(t);
    __builtin_prefetch(c, 0, 3);
    __builtin_prefetch(c + 63, 0, 3);
  }
  void prefetch_headers(int64_t k, int64_t end, bool state_storages = true) const {
    if (k + 3 * kDist < end) prefetch_lines(params[k + 3 * kDist], 1);  // the Python object
    if (k + 2 * kDist < end) {
      const int64_t j = k + 2 * kDist;
      prefetch_impl(param(j).unsafeGetTensorImpl());
      for (const auto* list : {&exp_avgs, &exp_avg_sqs, &steps}) prefetch_impl((*list)[j].unsafeGetTensorImpl());
      if (!max_exp_avg_sqs.empty()) prefetch_impl(max_exp_avg_sqs[j].unsafeGetTensorImpl());
    }
    if (k + kDist < end) {
      const int64_t j = k + kDist;
      const c10::TensorImpl* p = param(j).unsafeGetTensorImpl();
      prefetch_head(p->unsafe_storage().unsafeGetStorageImpl());
      prefetch_head(p->autograd_meta());
      if (state_storages) {
        for (const auto* list : {&exp_avgs, &exp_avg_sqs, &steps}) {
          prefetch_lines((*list)[j].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), 2);
        }
      }
    }
    if (k + kDist / 2 < end) {
      const c10::AutogradMetaInterface* meta = param(k + kDist / 2).unsafeGetTensorImpl()->autograd_meta();
      if (meta != nullptr && meta->grad().defined()) prefetch_impl(meta->grad().unsafeGetTensorImpl());
      if (state_storages && !max_exp_avg_sqs.empty()) {
        prefetch_lines(max_exp_avg_sqs[k + kDist / 2].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(),
                       2);
      }
    }
    if (k + kDist / 4 < end) {  // the gradient's storage header, once its tensor header is in
      const c10::AutogradMetaInterface* meta = param(k + kDist / 4).unsafeGetTensorImpl()->autograd_meta();
      if (meta != nullptr && meta->grad().defined()) {
        prefetch_head(meta->grad().unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
      }
    }
  }
};

// ---------------------------------------------------------------------------------- CPU
struct CpuStepHolder : HeldParams {
  CpuItems items;             // from the sizes at construction
  std::vector<CpuTensor> ts;  // this step's pointers

  CpuStepHolder(const py::list& params_, std::vector<at::Tensor> exp_avgs_, std::vector<at::Tensor> exp_avg_sqs_,
                std::vector<at::Tensor> max_exp_avg_sqs_, std::vector<at::Tensor> steps_,
                std::vector<int64_t> group_index_, std::vector<at::Tensor> remainders_)
      : HeldParams("d2z.CpuStepHolder", params_, std::move(exp_avgs_), std::move(exp_avg_sqs_),
                   std::move(max_exp_avg_sqs_), std::move(steps_), std::move(group_index_), std::move(remainders_)) {
    ts.resize(params.size());
    for (size_t k = 0; k < params.size(); ++k) items.add(static_cast<int32_t>(k), numel[k]);
  }

  // This step's gradients and pointers into `ts`, with the op's checks (raises StepRefused, with
  // nothing written); false: declined (a parameter has no gradient or changed size). The
  // gradients are held in `grads` until the update is done. (Parameters are not copied: the
  // holder's Python objects hold them, and a copy of a tensor whose only reference is its Python
  // object takes the GIL to keep that object alive.)
  bool gather(const at::Tensor& hparams, const at::Device& dev, std::vector<at::Tensor>& grads) {
    const int64_t groups = hparams.size(0);
    const double* hp = hparams.data_ptr<double>();
    std::atomic<bool> declined{false};
    const int64_t n = static_cast<int64_t>(params.size());
    grads.resize(n);
    FirstRefusal refused;
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
        try {
          check_param(k, p, g, exp_avgs[k], exp_avg_sqs[k], vmax(k), steps[k], gi, groups, dev);
          check_amsgrad_state(k, p, vmax(k), gi, hp);
          check_rem(k, dev);
        } catch (const c10::Error& e) {
          refused.note(k, e);
          return;
        }
        ts[k] = cpu_tensor(p, g, exp_avgs[k], exp_avg_sqs[k], vmax(k), steps[k], hp + gi * kHpCols, rem(k));
      }
    });
    if (declined.load()) return false;
    refused.raise_if_any();
    return true;
  }

  // One step of every parameter (the op's semantics). Called with the GIL released.
  StepStatus step(const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
                  const at::Tensor& hparams, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, bool skip_nonfinite) {
    TORCH_CHECK(!released(), "d2z.CpuStepHolder: used after release()");
    const at::Device dev =
        check_call_tensors(step_count, lr_table, wd_table, hparams, grad_scale, found_inf, c10::DeviceType::CPU);
    std::vector<at::Tensor> grads;
    if (!gather(hparams, dev, grads)) return StepStatus::kDeclined;
    // ---- nothing is written above this line ----
    const CpuStepResult r =
        cpu_step(ts, items, step_count, lr_table, wd_table, independent_wd, grad_scale, found_inf, skip_nonfinite);
    return r == CpuStepResult::kSkippedNonfinite ? StepStatus::kSkippedNonfinite : StepStatus::kApplied;
  }

  // A step clipped by the global norm (d2z::clip_grad_norm_'s semantics on the held gradients),
  // then the update with its decisions: one read of the gradients for the norm, one for the step.
  StepStatus step_clipped(const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
                          const at::Tensor& hparams, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, const at::Tensor& ring,
                          const at::Tensor& recorded, const at::Tensor& grad_norm, const at::Tensor& grad_scale_out,
                          const at::Tensor& found_out, double max_norm, double ord, bool spike_skip,
                          double spike_sigma) {
    TORCH_CHECK(!released(), "d2z.CpuStepHolder: used after release()");
    const at::Device dev =
        check_call_tensors(step_count, lr_table, wd_table, hparams, grad_scale, found_inf, c10::DeviceType::CPU);
    const ClipTensors t =
        check_clip_tensors(dev, grad_scale, found_inf, ring, recorded, grad_norm, grad_scale_out, found_out);
    const ClipConfig c = clip_config(max_norm, ord, spike_skip, spike_sigma, ring);
    std::vector<at::Tensor> grads;
    if (!gather(hparams, dev, grads)) return StepStatus::kDeclined;
    // ---- nothing is written above this line ----
    clip_finalize(cpu_norm_total(ts, items, c.inf_norm != 0), c, t);
    cpu_step(ts, items, step_count, lr_table, wd_table, independent_wd, grad_scale_out, found_out, false);
    return StepStatus::kApplied;
  }
};

// ------------------------------------------------------------------------------- device
enum class Kind { kCuda, kTriton };
enum class Mode { kDevice, kReplay, kStub };

// What a step's metadata depends on, per tensor: an unchanged key means the uploaded metadata and
// the checks made with it still hold. `flags`: dtypes, contiguity and amsgrad (a tensor that is
// not contiguous is checked in full every step: its strides are not in the key).
//
// A steady step reads the parameter and its gradient as above (a `.data =` swap, a storage
// resized by FSDP, a new gradient tensor each step) and each state's seal: its storage object,
// offset, size, dtype and contiguity, from the tensor's header alone, not the storage's data
// pointer (a cache miss per state: most of a 10,000-tensor step). The holder keeps the sealed
// storages alive, so a swapped one (`.data =`, `set_`, a load) can never come back at the same
// address unseen; a change of either makes this step read and check every tensor in full. Not
// seen: a state's storage reallocated in place (`untyped_storage().resize_()`), which nothing but
// FSDP's parameter buffers does.
struct TensorKey {
  const void *p, *g, *m, *v, *x, *step, *r;  // r: the remainder (nullptr: none)
  int64_t n, ng, nm, nv;
  uint64_t flags;
  static constexpr uint64_t kAllContiguous = uint64_t{1} << 32, kHasX = uint64_t{1} << 33;
  static constexpr uint64_t kLiveContiguous = uint64_t{1} << 34, kLive = 0xffffu | kLiveContiguous;
  bool operator==(const TensorKey& o) const {  // field by field, inlined (a memcmp call per tensor cost ~15%)
    return p == o.p && g == o.g && m == o.m && v == o.v && x == o.x && step == o.step && r == o.r && n == o.n &&
           ng == o.ng && nm == o.nm && nv == o.nv && flags == o.flags;
  }
  // `live` (a live_key) matches this full key, and all was contiguous (else the checks run every step)
  bool steady(const TensorKey& live) const {
    return p == live.p && g == live.g && n == live.n && ng == live.ng && (flags & kLive) == (live.flags & kLive) &&
           (flags & kAllContiguous) != 0;
  }
};

inline uint64_t dtype_bits(const at::Tensor& t) { return static_cast<uint64_t>(t.scalar_type()) & 0xffu; }

// A state tensor as a steady step checks it (see TensorKey); storage null: no such state.
struct StateSeal {
  const c10::StorageImpl* storage = nullptr;
  int64_t offset = 0, numel = 0;
  uint64_t bits = 0;  // dtype, contiguity
  static StateSeal of(const at::Tensor* t) {
    if (t == nullptr || !t->defined()) return {};
    const c10::TensorImpl* impl = t->unsafeGetTensorImpl();
    return {impl->unsafe_storage().unsafeGetStorageImpl(), impl->storage_offset(), impl->numel(),
            dtype_bits(*t) | static_cast<uint64_t>(impl->is_contiguous()) << 8};
  }
  bool operator==(const StateSeal& o) const {
    return storage == o.storage && offset == o.offset && numel == o.numel && bits == o.bits;
  }
};
constexpr int kStates = 5;  // exp_avg, exp_avg_sq, max_exp_avg_sq, step, the remainder

struct DeviceStepHolder : HeldParams {
  Kind kind;
  Mode mode;
  std::array<int64_t, 4> chunk{};  // Triton: elements per program, by Dtype (kF32, kBF16, kF16, kF64)
  std::vector<TensorKey> key;      // of the metadata now uploaded (empty: none yet)
  std::vector<std::array<StateSeal, kStates>> seals;  // each parameter's states as last checked
  std::vector<c10::Storage> sealed;                   // their storages, held: no address reused unseen
  std::vector<TensorKey> scratch;                     // the keys of the step being taken
  at::Tensor host, dev;              // that metadata: staging (pinned in device mode) and the kernel's copy
  std::vector<at::Tensor> captured;  // buffers a capture recorded: kept, never written again
  bool dev_captured = false;
  int64_t version = 0;                           // bumped with each new metadata buffer
  int64_t n_blocks = 0;                          // CUDA: blocks of adamw_kernel
  bool has_f64 = false;                          // CUDA: the launch takes adamw_kernel_f64
  std::vector<std::array<int64_t, 4>> launches;  // Triton: (dtypes code, amsgrad, offset, items) per launch
  void* dev_stream = nullptr;                    // device mode: the stream `dev` was allocated on
  std::vector<void*> dev_streams;                // and the others it was used on (recorded)

  DeviceStepHolder(const py::list& params_, std::vector<at::Tensor> exp_avgs_, std::vector<at::Tensor> exp_avg_sqs_,
                   std::vector<at::Tensor> max_exp_avg_sqs_, std::vector<at::Tensor> steps_,
                   std::vector<int64_t> group_index_, const std::string& kind_, const std::string& mode_,
                   std::vector<int64_t> chunk_, std::vector<at::Tensor> remainders_)
      : HeldParams("d2z.DeviceStepHolder", params_, std::move(exp_avgs_), std::move(exp_avg_sqs_),
                   std::move(max_exp_avg_sqs_), std::move(steps_), std::move(group_index_), std::move(remainders_)) {
    TORCH_CHECK(kind_ == "cuda" || kind_ == "triton", "d2z.DeviceStepHolder: kind must be 'cuda' or 'triton', got ",
                kind_);
    TORCH_CHECK(kind_ == "cuda" || remainders.empty(),
                "d2z.DeviceStepHolder: remainders need kind 'cuda' (the Triton launches step them through the op)");
    TORCH_CHECK(mode_ == "device" || mode_ == "replay" || mode_ == "stub",
                "d2z.DeviceStepHolder: mode must be 'device', 'replay' or 'stub', got ", mode_);
    kind = kind_ == "cuda" ? Kind::kCuda : Kind::kTriton;
    mode = mode_ == "device" ? Mode::kDevice : (mode_ == "replay" ? Mode::kReplay : Mode::kStub);
    TORCH_CHECK(mode != Mode::kDevice || cuda_hooks() != nullptr,
                "d2z.DeviceStepHolder: mode 'device' needs a CUDA build of d2z_optim._C");
    if (kind == Kind::kTriton) {
      TORCH_CHECK(chunk_.size() == 4, "d2z.DeviceStepHolder: chunk needs 4 sizes (f32, bf16, f16, f64)");
      for (int i = 0; i < 4; ++i) {
        TORCH_CHECK(chunk_[i] > 0, "d2z.DeviceStepHolder: chunk sizes must be positive");
        chunk[i] = chunk_[i];
      }
    }
  }

  c10::DeviceType device_type() const { return mode == Mode::kDevice ? c10::DeviceType::CUDA : c10::DeviceType::CPU; }

  // The live part of a key: the parameter and its gradient only.
  static TensorKey live_key(const at::Tensor& p, const at::Tensor& g) {
    TensorKey key{};
    key.p = p.data_ptr();
    key.g = g.const_data_ptr();
    key.n = p.numel();
    key.ng = g.numel();
    key.flags = dtype_bits(p) | dtype_bits(g) << 8;
    if (p.is_contiguous() && g.is_contiguous()) key.flags |= TensorKey::kLiveContiguous;
    return key;
  }

  // Parameter k's states (nullptr: none), in the order of its seals.
  std::array<const at::Tensor*, kStates> states_of(size_t k) const {
    return {&exp_avgs[k], &exp_avg_sqs[k], vmax(k), &steps[k], rem(k)};
  }

  std::array<StateSeal, kStates> seal_of(size_t k) const {
    const std::array<const at::Tensor*, kStates> st = states_of(k);
    std::array<StateSeal, kStates> out;
    for (int i = 0; i < kStates; ++i) out[i] = StateSeal::of(st[i]);
    return out;
  }

  // Seal every parameter's states as they are now (after a step that checked them all).
  void reseal() {
    const size_t n = params.size();
    seals.resize(n);
    std::vector<c10::Storage> held;
    held.reserve(n * kStates);
    for (size_t k = 0; k < n; ++k) {
      seals[k] = seal_of(k);
      for (const at::Tensor* t : states_of(k)) {
        if (t != nullptr && t->defined()) held.push_back(t->storage());
      }
    }
    sealed.swap(held);
  }

  TensorKey key_of(size_t k, const at::Tensor& p, const at::Tensor& g) const {
    const at::Tensor &m = exp_avgs[k], &v = exp_avg_sqs[k], &st = steps[k];
    const at::Tensor* x = vmax(k);
    const bool has_x = x != nullptr && x->numel() > 0;
    TensorKey key = live_key(p, g);
    key.m = m.data_ptr();
    key.v = v.data_ptr();
    key.x = has_x ? x->data_ptr() : nullptr;
    key.step = st.data_ptr();
    key.r = rem(k) == nullptr ? nullptr : rem(k)->data_ptr();
    key.nm = m.numel();
    key.nv = v.numel();
    key.flags |= dtype_bits(m) << 16 | dtype_bits(v) << 24;
    if ((key.flags & TensorKey::kLiveContiguous) && m.is_contiguous() && v.is_contiguous() &&
        (!has_x || x->is_contiguous())) {
      key.flags |= TensorKey::kAllContiguous;
    }
    if (has_x) key.flags |= TensorKey::kHasX;
    return key;
  }

  // The metadata of the tensors as they are now, into a new staging buffer.
  at::Tensor build(const std::vector<at::Tensor>& grads) {
    const size_t n = params.size();
    if (kind == Kind::kCuda) {
      WorkList list;
      list.tensors.resize(n);
      for (size_t k = 0; k < n; ++k)
        list.tensors[k] =
            tensor_meta(param(k), grads[k], exp_avgs[k], exp_avg_sqs[k], vmax(k), steps[k], group_index[k], rem(k));
      build_work_list(list);
      check_work_list(list);
      at::Tensor staging = new_host(static_cast<int64_t>(std::max<size_t>(list.bytes(), 16)));
      list.pack(staging.data_ptr());
      n_blocks = static_cast<int64_t>(list.blocks.size());
      has_f64 = list.has_f64;
      return staging;
    }
    // Triton: [meta rows, kMetaCols int64 each][per dtype: (tensor row, chunk start) items]
    std::vector<int64_t> flat;
    flat.reserve(n * kMetaCols);
    // one launch per (p, m, v) dtypes: code p + 4 m + 16 v, launched in code order (the Python launcher's)
    std::array<std::vector<int64_t>, 64> items;
    std::array<bool, 64> ams{};
    for (size_t k = 0; k < n; ++k) {
      const TensorMeta t =
          tensor_meta(param(k), grads[k], exp_avgs[k], exp_avg_sqs[k], vmax(k), steps[k], group_index[k]);
      const bool aligned = aligned16(t.p) && aligned16(t.g) && aligned16(t.m) && aligned16(t.v) &&
                           (t.vmax == nullptr || aligned16(t.vmax));
      int64_t row[kMetaCols];
      row[kMetaP] = reinterpret_cast<int64_t>(t.p);
      row[kMetaG] = reinterpret_cast<int64_t>(t.g);
      row[kMetaM] = reinterpret_cast<int64_t>(t.m);
      row[kMetaV] = reinterpret_cast<int64_t>(t.v);
      row[kMetaX] = reinterpret_cast<int64_t>(t.vmax);
      row[kMetaStep] = reinterpret_cast<int64_t>(t.step);
      row[kMetaNumel] = t.n;
      row[kMetaGroup] = t.group;
      row[kMetaAligned] = aligned ? 1 : 0;
      row[kMetaR] = 0;  // remainders step through the op under Triton (the constructor refuses them here)
      flat.insert(flat.end(), row, row + kMetaCols);
      const int d = t.dtype + 4 * t.m_dtype + 16 * t.v_dtype;
      ams[d] = ams[d] || t.vmax != nullptr;
      // the launch's chunk: of its widest array (triton_backend.block_dtype: fp32 moments of 16-bit parameters)
      const int wide = (t.m_dtype == kF32 || t.v_dtype == kF32) ? kF32 : t.dtype;
      for (int64_t s = 0; s < t.n; s += chunk[wide]) {
        items[d].push_back(static_cast<int64_t>(k));
        items[d].push_back(s);
      }
    }
    launches.clear();
    for (int d = 0; d < 64; ++d) {  // the launch order of the Python launcher
      if (items[d].empty()) continue;
      launches.push_back(
          {d, ams[d] ? 1 : 0, static_cast<int64_t>(flat.size()), static_cast<int64_t>(items[d].size() / 2)});
      flat.insert(flat.end(), items[d].begin(), items[d].end());
    }
    if (flat.empty()) flat.push_back(0);
    at::Tensor staging = new_host(static_cast<int64_t>(flat.size() * sizeof(int64_t)));
    std::memcpy(staging.data_ptr(), flat.data(), flat.size() * sizeof(int64_t));
    return staging;
  }

  at::Tensor new_host(int64_t bytes) const {
    return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(mode == Mode::kDevice));
  }

  // The new metadata into a new kernel-side buffer (never an old one: a kernel in flight or a graph
  // may read it), uploaded with one asynchronous copy on the current stream in device mode.
  void upload(at::Tensor staging, int device, void* stream) {
    if (mode == Mode::kDevice) {
      at::Tensor fresh = at::empty(staging.sizes(), at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
      fresh.copy_(staging, /*non_blocking=*/true);
      dev = std::move(fresh);
      dev_stream = stream;
      dev_streams.clear();
    } else {
      dev = staging;  // CPU tensors: the kernels (replay, the interpreter) read the host copy
    }
    host = std::move(staging);
    dev_captured = false;
    ++version;
  }

  // In device mode: a buffer used on another stream than its own is recorded there (the caching
  // allocator then waits for that stream before reusing it).
  void record_use(void* stream) {
    if (mode != Mode::kDevice || stream == dev_stream) return;
    for (void* s : dev_streams) {
      if (s == stream) return;
    }
    cuda_hooks()->record_stream(dev, stream);
    dev_streams.push_back(stream);
  }

  // A clipped step's arguments (kind cuda): checked, as clip_kernel takes them.
  struct Clip {
    ClipConfig config;
    ClipTensors tensors;
  };

  // The clip kernel's partials and ticket: one double per block and the ticket in a last slot,
  // zeroed once (the last block resets the ticket). Kept across steps; a buffer a capture used is
  // kept in `captured` and never written by a later, larger step.
  at::Tensor clip_ws;
  bool clip_ws_captured = false;

  void clip_workspace(int64_t blocks, bool capturing, const at::Device& device) {
    const int64_t need = clip_blocks(blocks) + 1;
    if (!clip_ws.defined() || clip_ws.numel() < need || clip_ws.device() != device) {
      clip_ws = at::zeros({need}, at::TensorOptions().dtype(at::kDouble).device(device));
      clip_ws_captured = false;
    }
    if (capturing && !clip_ws_captured) {
      captured.push_back(clip_ws);
      clip_ws_captured = true;
    }
  }

  StepStatus step(const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
                  const at::Tensor& hparams, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, bool capturing) {
    return step_impl(step_count, lr_table, wd_table, hparams, independent_wd, grad_scale, found_inf, capturing,
                     nullptr);
  }

  // A step clipped by the global norm (kind cuda): clip_kernel, then the update with its decisions.
  StepStatus step_clipped(const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
                          const at::Tensor& hparams, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, const at::Tensor& ring,
                          const at::Tensor& recorded, const at::Tensor& grad_norm, const at::Tensor& grad_scale_out,
                          const at::Tensor& found_out, double max_norm, double ord, bool spike_skip, double spike_sigma,
                          bool capturing) {
    TORCH_CHECK(kind == Kind::kCuda, "d2z.DeviceStepHolder: step_clipped needs kind 'cuda'");
    const Clip clip{clip_config(max_norm, ord, spike_skip, spike_sigma, ring),
                    check_clip_tensors(step_count.device(), grad_scale, found_inf, ring, recorded, grad_norm,
                                       grad_scale_out, found_out)};
    return step_impl(step_count, lr_table, wd_table, hparams, independent_wd, grad_scale, found_inf, capturing, &clip);
  }

  StepStatus step_impl(const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
                       const at::Tensor& hparams, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, bool capturing, const Clip* clip) {
    TORCH_CHECK(!released(), "d2z.DeviceStepHolder: used after release()");
    const at::Device dev_ =
        check_call_tensors(step_count, lr_table, wd_table, hparams, grad_scale, found_inf, device_type());
    const int64_t n = static_cast<int64_t>(params.size());
    std::vector<at::Tensor> grads(n);
    std::atomic<bool> declined{false}, changed{key.size() != static_cast<size_t>(n)};
    at::parallel_for(0, n, kGatherGrain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        prefetch_headers(k, k1, /*state_storages=*/false);
        const at::Tensor& p = param(k);
        const at::Tensor& g = grads[k] = p.grad();
        if (!g.defined() || p.numel() != numel[k]) {
          declined.store(true);
          return;
        }
        if (changed.load(std::memory_order_relaxed)) continue;  // every tensor is read below
        if (!is_dense(p) || !is_dense(g) || !key[k].steady(live_key(p, g)) || !(seal_of(k) == seals[k])) {
          changed.store(true, std::memory_order_relaxed);  // a sparse gradient: the checks refuse it
        }
      }
    });
    if (declined.load()) return StepStatus::kDeclined;
    void* stream = mode == Mode::kDevice ? cuda_hooks()->current_stream(dev_.index()) : nullptr;
    if (changed.load()) {  // read and check every tensor, states included, as they are now
      const int64_t groups = hparams.size(0);
      std::vector<TensorKey>& now = scratch;  // reused: a fresh vector was an allocation per step
      now.resize(n);
      FirstRefusal refused;
      at::parallel_for(0, n, kGatherGrain, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          prefetch_headers(k, k1);
          try {
            check_param(k, param(k), grads[k], exp_avgs[k], exp_avg_sqs[k], vmax(k), steps[k], group_index[k], groups,
                        dev_);
            check_rem(k, dev_);
            now[k] = key_of(k, param(k), grads[k]);
          } catch (const c10::Error& e) {
            refused.note(k, e);
          }
        }
      });
      refused.raise_if_any();
      // ---- nothing is written above this line ----
      if (!(now == key) || !dev.defined()) {  // a buffer a graph recorded stays in `captured`, as it is
        upload(build(grads), dev_.index(), stream);
        key.swap(now);
      }
      reseal();
    }
    record_use(stream);
    if (capturing && !dev_captured) {  // the graph reads `dev` at every replay: never rewrite it
      captured.push_back(dev);
      captured.push_back(host);  // the copy that filled it, if it was recorded too
      dev_captured = true;
    }
    if (kind == Kind::kCuda && mode != Mode::kStub) {
      LaunchArgs L = launch_args(dev.data_ptr(), static_cast<size_t>(n), hparams, lr_table, wd_table, step_count,
                                 grad_scale, found_inf, independent_wd);
      if (clip != nullptr) {
        clip_workspace(n_blocks, capturing, dev_);
        L.clip_on = 1;
        L.clip = clip->config;
        L.clip_t = clip->tensors;
        L.clip_partials = clip_ws.data_ptr<double>();
        L.clip_ticket = reinterpret_cast<unsigned int*>(clip_ws.data_ptr<double>() + clip_ws.numel() - 1);
        L.grad_scale = clip->tensors.grad_scale_out;  // the update divides by the clip's divisor
        L.found_inf = clip->tensors.found_out;
      }
      if (mode == Mode::kDevice) {
        const int err = cuda_hooks()->launch(L, n_blocks, has_f64, stream);
        TORCH_CHECK(err == 0, "d2z::adamw_step_: kernel launch failed: ", cuda_hooks()->error_string(err));
      } else {
        replay_grid(L, n_blocks, has_f64);
      }
    }
    return StepStatus::kApplied;
  }
};

bool constructed(PyObject* self) {
  return reinterpret_cast<py::detail::instance*>(self)->get_value_and_holder().holder_constructed();
}

// A pybind11 class whose owned Python references the garbage collector sees.
template <typename T>
py::class_<T> gc_class(py::module_& m, const char* name) {
  return py::class_<T>(m, name, py::custom_type_setup([](PyHeapTypeObject* heap_type) {
                         auto* type = &heap_type->ht_type;
                         type->tp_flags |= Py_TPFLAGS_HAVE_GC;
                         type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) -> int {
                           Py_VISIT(Py_TYPE(self));
                           if (!constructed(self)) return 0;
                           for (PyObject* obj : py::cast<T&>(py::handle(self)).params) Py_VISIT(obj);
                           return 0;
                         };
                         type->tp_clear = [](PyObject* self) -> int {
                           if (constructed(self)) py::cast<T&>(py::handle(self)).release();
                           return 0;
                         };
                       }));
}

}  // namespace

void bind_step_holders(py::module_& m) {
  py::register_exception<StepRefusedError>(m, "StepRefused", PyExc_RuntimeError);
  gc_class<CpuStepHolder>(m, "CpuStepHolder")
      .def(py::init<const py::list&, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>>(),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"),
           py::arg("group_index"), py::arg("remainders") = std::vector<at::Tensor>{})
      .def(
          "step",
          [](CpuStepHolder& self, const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
             const at::Tensor& hparams, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, bool skip_nonfinite) {
            return static_cast<int64_t>(self.step(step_count, lr_table, wd_table, hparams, independent_wd, grad_scale,
                                                  found_inf, skip_nonfinite));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "step_clipped",
          [](CpuStepHolder& self, const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
             const at::Tensor& hparams, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, const at::Tensor& ring, const at::Tensor& recorded,
             const at::Tensor& grad_norm, const at::Tensor& grad_scale_out, const at::Tensor& found_out,
             double max_norm, double ord, bool spike_skip, double spike_sigma) {
            return static_cast<int64_t>(self.step_clipped(
                step_count, lr_table, wd_table, hparams, independent_wd, grad_scale, found_inf, ring, recorded,
                grad_norm, grad_scale_out, found_out, max_norm, ord, spike_skip, spike_sigma));
          },
          py::call_guard<py::gil_scoped_release>());
  gc_class<DeviceStepHolder>(m, "DeviceStepHolder")
      .def(py::init<const py::list&, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<int64_t>, const std::string&, const std::string&,
                    std::vector<int64_t>, std::vector<at::Tensor>>(),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"),
           py::arg("group_index"), py::arg("kind"), py::arg("mode"), py::arg("chunk") = std::vector<int64_t>{},
           py::arg("remainders") = std::vector<at::Tensor>{})
      .def(
          "step",
          [](DeviceStepHolder& self, const at::Tensor& step_count, const at::Tensor& lr_table,
             const at::Tensor& wd_table, const at::Tensor& hparams, bool independent_wd,
             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf, bool capturing) {
            return static_cast<int64_t>(
                self.step(step_count, lr_table, wd_table, hparams, independent_wd, grad_scale, found_inf, capturing));
          },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "step_clipped",
          [](DeviceStepHolder& self, const at::Tensor& step_count, const at::Tensor& lr_table,
             const at::Tensor& wd_table, const at::Tensor& hparams, bool independent_wd,
             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
             const at::Tensor& ring, const at::Tensor& recorded, const at::Tensor& grad_norm,
             const at::Tensor& grad_scale_out, const at::Tensor& found_out, double max_norm, double ord,
             bool spike_skip, double spike_sigma, bool capturing) {
            return static_cast<int64_t>(self.step_clipped(
                step_count, lr_table, wd_table, hparams, independent_wd, grad_scale, found_inf, ring, recorded,
                grad_norm, grad_scale_out, found_out, max_norm, ord, spike_skip, spike_sigma, capturing));
          },
          py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("version", [](const DeviceStepHolder& self) { return self.version; })
      .def_property_readonly("metadata", [](const DeviceStepHolder& self) { return self.dev; })
      .def_property_readonly("launches",
                             [](const DeviceStepHolder& self) {
                               std::vector<std::tuple<int64_t, bool, int64_t, int64_t>> out;
                               for (const auto& l : self.launches) out.emplace_back(l[0], l[1] != 0, l[2], l[3]);
                               return out;
                             })
      .def_property_readonly("captured", [](const DeviceStepHolder& self) { return self.captured; })
      .def_property_readonly("n_tensors", [](const DeviceStepHolder& self) { return self.params.size(); });
}

}  // namespace d2z
