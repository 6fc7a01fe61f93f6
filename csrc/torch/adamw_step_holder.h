// The step holders' shared pieces: what a step answers, the Triton metadata's columns, and the
// hooks through which a holder reaches CUDA (registered by the CUDA glue in CUDA builds only).
//
// d2z_optim.backends.contract.StepStatus mirrors StepStatus and triton_backend.MetaCol mirrors
// TritonMetaCol (tests/test_layers.py reads these enums). A refusal by the op's checks is not a
// status: it raises StepRefused (a RuntimeError subclass carrying the op's message), with nothing
// written.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "kernels/adamw_cuda.cuh"

namespace d2z {

enum class StepStatus : int64_t {
  kApplied = 0,           // the step ran (or was a no-op for a nonzero found_inf)
  kSkippedNonfinite = 1,  // skip_nonfinite found a NaN or an Inf in a gradient: a no-op
  kDeclined = 2,          // the holder's tensors no longer match (a parameter lost its gradient or
                          // changed size): nothing written; the caller steps through the op
};

// Columns of the Triton kernels' metadata table (int64, one row per tensor).
enum TritonMetaCol : int64_t {
  kMetaP = 0,
  kMetaG,
  kMetaM,
  kMetaV,
  kMetaX,  // max_exp_avg_sq, 0 when none
  kMetaStep,
  kMetaNumel,
  kMetaGroup,
  kMetaAligned,
  kMetaR,  // a bf16 parameter's remainder (master_weights="remainders"), 0 when none
  kMetaCols
};

// What a holder needs of CUDA, as plain function pointers: the CUDA glue (adamw_cuda_glue.cpp)
// registers them when the extension loads in a CUDA build; a CPU build has none.
struct CudaHooks {
  void* (*current_stream)(int device);  // the device's current cudaStream_t
  // adamw_kernel (or adamw_kernel_f64) then counter_kernel; a cudaError_t value, 0 on success
  int (*launch)(const LaunchArgs& a, int64_t n_blocks, bool with_f64, void* stream);
  const char* (*error_string)(int err);
  // c10::cuda::CUDACachingAllocator::recordStream on the device's stream `stream`
  void (*record_stream)(const at::Tensor& t, void* stream);
};

const CudaHooks* cuda_hooks();  // nullptr in a CPU-only build
void set_cuda_hooks(const CudaHooks* hooks);

}  // namespace d2z
