// CUDA implementation of d2z::adamw_step_ (CUDA builds only): checks, the cached metadata
// upload, and the launch on the current stream. Never synchronises with the host.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <list>
#include <mutex>

#include "adamw_worklist.h"

namespace d2z {
namespace {

// Metadata depends only on the tensors' addresses, sizes, dtypes and groups: cached per key,
// rebuilt when any of them changes (e.g. grads reallocated by zero_grad(set_to_none=True)).
struct CachedWorkList {
  std::vector<int64_t> key;
  at::Tensor device_meta;  // uint8 on the device: [TensorMeta x n][BlockWork x blocks]
  int64_t n_blocks = 0;
  bool has_f64 = false;
  cudaStream_t stream = nullptr;
};

std::mutex g_mutex;
// Never destroyed: device tensors must not be freed during static destruction at exit.
std::list<CachedWorkList>& g_cache = *new std::list<CachedWorkList>();  // most recent first
constexpr size_t kCacheSize = 8;

std::vector<int64_t> work_list_key(const StepArgs& a, const at::Device& dev) {
  std::vector<int64_t> key;
  const size_t n = a.params.size();
  key.reserve(2 + n * 9);
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
    key.push_back(static_cast<int64_t>(a.params[k].scalar_type()));
  }
  return key;
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& step_count,
                     const at::Tensor& lr_table, const at::Tensor& wd_table, const at::Tensor& hparams,
                     c10::IntArrayRef group_index, bool independent_wd, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const StepArgs a{params,   grads,    exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,      step_count,
                   lr_table, wd_table, hparams,  group_index, independent_wd,  grad_scale, found_inf};
  const at::Device dev = check_step_args(a, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(dev.index()).stream();

  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<int64_t> key = work_list_key(a, dev);
  auto it = g_cache.begin();
  for (; it != g_cache.end(); ++it) {
    if (it->key == key) break;
  }
  if (it == g_cache.end()) {
    const WorkList list = make_work_list(a);
    CachedWorkList c;
    c.key = std::move(key);
    c.n_blocks = static_cast<int64_t>(list.blocks.size());
    c.has_f64 = list.has_f64;
    const int64_t bytes = static_cast<int64_t>(std::max<size_t>(list.bytes(), 16));
    // Pinned staging buffer from torch's caching host allocator: it is not reused before the
    // asynchronous copy that reads it has completed (the allocator records the copy's stream).
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    list.pack(host.data_ptr());
    c.device_meta = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(dev));
    c.device_meta.copy_(host, /*non_blocking=*/true);
    c.stream = stream;
    g_cache.push_front(std::move(c));
    if (g_cache.size() > kCacheSize) g_cache.pop_back();  // freed in stream order by the allocator
    it = g_cache.begin();
  } else if (it != g_cache.begin()) {
    g_cache.splice(g_cache.begin(), g_cache, it);
    it = g_cache.begin();
  }
  if (it->stream != stream) {  // used on another stream than it was made on: keep it alive for it
    c10::cuda::CUDACachingAllocator::recordStream(it->device_meta.storage().data_ptr(),
                                                  at::cuda::getCurrentCUDAStream(dev.index()));
  }
  const LaunchArgs L = make_launch_args(a, it->device_meta.data_ptr(), params.size());
  const int err = launch_adamw(L, it->n_blocks, it->has_f64, stream);
  TORCH_CHECK(err == 0, "d2z::adamw_step_: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace d2z

TORCH_LIBRARY_IMPL(d2z, CUDA, m) { m.impl("adamw_step_", &d2z::adamw_step_cuda); }
// A sparse grad routes the call to the sparse key: the same kernel, whose checks reject it by name.
TORCH_LIBRARY_IMPL(d2z, SparseCUDA, m) { m.impl("adamw_step_", &d2z::adamw_step_cuda); }
