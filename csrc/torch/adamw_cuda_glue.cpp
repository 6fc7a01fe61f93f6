// CUDA implementation of d2z::adamw_step_ (CUDA builds only): checks, the metadata upload, the
// launch on the current stream; and the hooks through which the device step holder reaches CUDA.
// Never synchronises with the host.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <list>
#include <mutex>

#include "adamw_step_holder.h"
#include "adamw_worklist.h"

namespace d2z {
namespace {

// ---- the op's metadata: cached by the tensors' addresses, sizes, dtypes and groups, rebuilt when
// any changes (e.g. grads reallocated by zero_grad(set_to_none=True)). The optimizer's steady
// state goes through the device step holder, whose buffers are its own; this cache serves the op
// called directly and under torch.compile. An entry a CUDA graph capture used is never evicted
// (the graph reads it at every replay): it moves to g_captured and stays for the process.
struct CachedWorkList {
  std::vector<int64_t> key;
  at::Tensor device_meta;  // uint8 on the device: [TensorMeta x n][BlockWork x blocks]
  at::Tensor host_meta;    // its pinned staging copy (kept with it: a captured copy reads it at replay)
  int64_t n_blocks = 0;
  bool has_f64 = false;
  cudaStream_t stream = nullptr;
  std::vector<cudaStream_t> recorded;
};

std::mutex g_mutex;
// Never destroyed: device tensors must not be freed during static destruction at exit.
std::list<CachedWorkList>& g_cache = *new std::list<CachedWorkList>();     // most recent first
std::list<CachedWorkList>& g_captured = *new std::list<CachedWorkList>();  // used by a capture: kept
constexpr size_t kCacheSize = 8;

std::vector<int64_t> work_list_key(const StepArgs& a, const at::Device& dev) {
  std::vector<int64_t> key;
  const size_t n = a.params.size();
  key.reserve(2 + n * 10);
  key.push_back(dev.index());
  key.push_back(static_cast<int64_t>(n));
  for (size_t k = 0; k < n; ++k) {
    const bool has_max = !a.max_exp_avg_sqs.empty() && a.max_exp_avg_sqs[k].numel() > 0;
    key.push_back(reinterpret_cast<int64_t>(a.params[k].data_ptr()));
    key.push_back(reinterpret_cast<int64_t>(a.grads[k].data_ptr()));
    key.push_back(reinterpret_cast<int64_t>(a.exp_avgs[k].data_ptr()));
    key.push_back(reinterpret_cast<int64_t>(a.exp_avg_sqs[k].data_ptr()));
    key.push_back(has_max ? reinterpret_cast<int64_t>(a.max_exp_avg_sqs[k].data_ptr()) : 0);
    key.push_back(reinterpret_cast<int64_t>(a.steps[k].data_ptr()));
    key.push_back(a.params[k].numel());
    key.push_back(a.group_index[k]);
    key.push_back(static_cast<int64_t>(a.params[k].scalar_type()) |
                  static_cast<int64_t>(a.exp_avgs[k].scalar_type()) << 8 |
                  static_cast<int64_t>(a.exp_avg_sqs[k].scalar_type()) << 16);
    const at::Tensor* rem = remainder_of(a.remainders, k);
    key.push_back(rem == nullptr ? 0 : reinterpret_cast<int64_t>(rem->data_ptr()));
  }
  return key;
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

CachedWorkList* find(std::list<CachedWorkList>& list, const std::vector<int64_t>& key) {
  for (auto& c : list) {
    if (c.key == key) return &c;
  }
  return nullptr;
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& step_count,
                     const at::Tensor& lr_table, const at::Tensor& wd_table, const at::Tensor& hparams,
                     c10::IntArrayRef group_index, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::TensorList>& remainders) {
  const StepArgs a{params,      grads,          exp_avgs,   exp_avg_sqs, max_exp_avg_sqs,
                   steps,       step_count,     lr_table,   wd_table,    hparams,
                   group_index, independent_wd, grad_scale, found_inf,   remainder_list(remainders)};
  const at::Device dev = check_step_args(a, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(dev);
  const c10::cuda::CUDAStream current = at::cuda::getCurrentCUDAStream(dev.index());
  const cudaStream_t stream = current.stream();
  const bool capturing = is_capturing(stream);

  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<int64_t> key = work_list_key(a, dev);
  CachedWorkList* c = find(g_captured, key);
  if (c == nullptr) {
    auto it = g_cache.begin();
    for (; it != g_cache.end() && it->key != key; ++it) {
    }
    if (it == g_cache.end()) {
      const WorkList list = make_work_list(a);
      CachedWorkList entry;
      entry.key = std::move(key);
      entry.n_blocks = static_cast<int64_t>(list.blocks.size());
      entry.has_f64 = list.has_f64;
      const int64_t bytes = static_cast<int64_t>(std::max<size_t>(list.bytes(), 16));
      // Pinned staging buffer from torch's caching host allocator: it is not reused before the
      // asynchronous copy that reads it has completed (the allocator records the copy's stream);
      // kept with the entry, so a copy recorded by a capture reads it unchanged at every replay.
      entry.host_meta = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      list.pack(entry.host_meta.data_ptr());
      entry.device_meta = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(dev));
      entry.device_meta.copy_(entry.host_meta, /*non_blocking=*/true);
      entry.stream = stream;
      g_cache.push_front(std::move(entry));
      if (g_cache.size() > kCacheSize) g_cache.pop_back();  // freed in stream order by the allocator
      it = g_cache.begin();
    } else if (it != g_cache.begin()) {
      g_cache.splice(g_cache.begin(), g_cache, it);
      it = g_cache.begin();
    }
    if (capturing) {  // the graph reads this entry at every replay: it leaves the evicting cache
      g_captured.splice(g_captured.begin(), g_cache, it);
      c = &g_captured.front();
    } else {
      c = &*it;
    }
  }
  if (c->stream != stream && std::find(c->recorded.begin(), c->recorded.end(), stream) == c->recorded.end()) {
    // used on another stream than it was made on: keep it alive for that stream's work too
    c10::cuda::CUDACachingAllocator::recordStream(c->device_meta.storage().data_ptr(), current);
    c->recorded.push_back(stream);
  }
  const LaunchArgs L = make_launch_args(a, c->device_meta.data_ptr(), params.size());
  const int err = launch_adamw(L, c->n_blocks, c->has_f64, stream);
  TORCH_CHECK(err == 0, "d2z::adamw_step_: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- d2z::any_nonfinite_ on CUDA: torch's fused max-abs norm per tensor (exact, no copy)
void any_nonfinite_cuda(at::TensorList tensors, const at::Tensor& found) {
  TORCH_CHECK(found.is_cuda() && found.scalar_type() == at::kFloat && found.numel() == 1,
              "d2z::any_nonfinite_: found must be a float32 CUDA tensor with one element");
  std::vector<at::Tensor> nonempty;
  for (const auto& t : tensors) {
    if (t.numel() > 0) nonempty.push_back(t);
  }
  if (nonempty.empty()) return;
  std::vector<std::vector<at::Tensor>> by_dtype;
  for (const auto& t : nonempty) {
    auto it = std::find_if(by_dtype.begin(), by_dtype.end(),
                           [&](const std::vector<at::Tensor>& v) { return v[0].scalar_type() == t.scalar_type(); });
    if (it == by_dtype.end()) {
      by_dtype.push_back({t});
    } else {
      it->push_back(t);
    }
  }
  for (const auto& same : by_dtype) {
    const auto norms = at::_foreach_norm(same, std::numeric_limits<double>::infinity());
    const at::Tensor bad = at::logical_not(at::isfinite(at::stack(norms)).all()).to(at::kFloat).reshape(found.sizes());
    found.copy_(at::maximum(found, bad));
  }
}

// ---- the hooks of the device step holder
void* current_stream(int device) { return at::cuda::getCurrentCUDAStream(device).stream(); }

int launch(const LaunchArgs& a, int64_t n_blocks, bool with_f64, void* stream) {
  return launch_adamw(a, n_blocks, with_f64, stream);
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

void record_stream(const at::Tensor& t, void* stream) {
  const c10::cuda::CUDAStream s =
      c10::cuda::getStreamFromExternal(static_cast<cudaStream_t>(stream), t.device().index());
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), s);
}

const CudaHooks kHooks{current_stream, launch, error_string, record_stream};

[[maybe_unused]] const bool kRegistered = [] {
  set_cuda_hooks(&kHooks);
  return true;
}();

}  // namespace
}  // namespace d2z

TORCH_LIBRARY_IMPL(d2z, CUDA, m) {
  m.impl("adamw_step_", &d2z::adamw_step_cuda);
  m.impl("any_nonfinite_", &d2z::any_nonfinite_cuda);
}
// A sparse grad routes the call to the sparse key: the same kernel, whose checks reject it by name.
TORCH_LIBRARY_IMPL(d2z, SparseCUDA, m) { m.impl("adamw_step_", &d2z::adamw_step_cuda); }
