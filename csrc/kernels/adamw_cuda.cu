// CUDA kernels of the fused AdamW step: thin __global__ wrappers around the per-thread bodies of
// adamw_cuda.cuh, and their launcher. Torch-free (raw pointers, cudaStream_t).
#include <cuda_runtime.h>

#include "adamw_cuda.cuh"

namespace d2z {

// 256 threads and at least 4 resident blocks per SM: at most 64 registers per thread.
__global__ void __launch_bounds__(kBlockThreads, 4) adamw_kernel(const LaunchArgs a) {
  adamw_thread<false>(blockIdx.x, threadIdx.x, blockDim.x, a);
}

// With float64 tensors: the fp64 path's scalars and values take twice the registers (at 64 it
// spilled: ptxas, nvcc 13.0), so 2 resident blocks per SM, at most 128 registers.
__global__ void __launch_bounds__(kBlockThreads, 2) adamw_kernel_f64(const LaunchArgs a) {
  adamw_thread<true>(blockIdx.x, threadIdx.x, blockDim.x, a);
}

// Each block's share of the global norm, then the last block to finish: every partial in block
// order, the decisions (clip_finalize), the ticket reset for the next launch (or graph replay).
__global__ void __launch_bounds__(kBlockThreads) clip_kernel(const LaunchArgs a, int64_t n_blocks) {
  __shared__ double sh[kBlockThreads];
  __shared__ bool last;
  const bool inf = a.clip.inf_norm != 0;
  const int t = threadIdx.x;
  sh[t] = clip_thread(blockIdx.x, t, blockDim.x, a, n_blocks);
  __syncthreads();
  for (int s = kBlockThreads / 2; s > 0; s >>= 1) {
    if (t < s) clip_tree_level(sh, t, s, inf);
    __syncthreads();
  }
  if (t == 0) {
    a.clip_partials[blockIdx.x] = sh[0];
    __threadfence();  // the partial is visible to every block before this block counts as done
    last = atomicAdd(a.clip_ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  sh[t] = clip_gather(a.clip_partials, gridDim.x, t, blockDim.x, inf);
  __syncthreads();
  for (int s = kBlockThreads / 2; s > 0; s >>= 1) {
    if (t < s) clip_tree_level(sh, t, s, inf);
    __syncthreads();
  }
  if (t == 0) {
    clip_finalize(sh[0], a.clip, a.clip_t);
    *a.clip_ticket = 0u;
  }
}

__global__ void __launch_bounds__(kBlockThreads) counter_kernel(const LaunchArgs a) {
  counter_thread(blockIdx.x, threadIdx.x, blockDim.x, a);
}

int launch_adamw(const LaunchArgs& a, int64_t n_blocks, bool with_f64, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.clip_on) {
    clip_kernel<<<static_cast<unsigned>(clip_blocks(n_blocks)), kBlockThreads, 0, stream>>>(a, n_blocks);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  if (n_blocks > 0) {
    if (with_f64) {
      adamw_kernel_f64<<<static_cast<unsigned>(n_blocks), kBlockThreads, 0, stream>>>(a);
    } else {
      adamw_kernel<<<static_cast<unsigned>(n_blocks), kBlockThreads, 0, stream>>>(a);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  counter_kernel<<<static_cast<unsigned>(counter_blocks(a.n_tensors)), kBlockThreads, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace d2z
