// Schema of the d2z ops, and the Python module d2z_optim._C. Implementations: adamw_cpu.cpp (CPU),
// adamw_test_ops.cpp (test only: the CUDA grid replayed on the CPU, the conversions),
// adamw_cuda_glue.cpp (CUDA builds). The step holders: adamw_step_holder.cpp.
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#define D2Z_STEP_ARGS                                                                                           \
  "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "                     \
  "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor(f!) step_count, Tensor lr_table, Tensor wd_table, " \
  "Tensor hparams, int[] group_index, bool independent_wd, Tensor? grad_scale, Tensor? found_inf, "             \
  "Tensor(g!)[]? remainders=None) -> ()"

TORCH_LIBRARY(d2z, m) {
  // One AdamW step of every tensor: lr_table[step_count] and wd_table[step_count] scale the
  // group's lr and weight decay; steps and step_count advance (unless found_inf is nonzero).
  // remainders (master_weights="remainders"): None, or one int16 tensor per parameter (a bf16
  // parameter's remainder: the pair is its fp32 master value; 0 elements: none).
  m.def("adamw_step_" D2Z_STEP_ARGS);
  // found = 1 where any element of any tensor is a NaN or an Inf (exact: their bits; complex
  // tensors as their real and imaginary parts); found is left as it is otherwise.
  m.def("any_nonfinite_(Tensor[] tensors, Tensor(a!) found) -> ()");
  // The norm of all the tensors' elements as one vector (ord 2 or inf), float32 0-d on their
  // device: one pass, accumulated in double, the same bits whatever the thread count; NaN if any
  // element is a NaN (complex tensors: as their real and imaginary parts).
  m.def("grad_norm(Tensor[] tensors, float ord) -> Tensor");
  // Clipping by the global norm of grads (ord 2 or inf; max_norm <= 0: no clipping), all on the
  // device (csrc/kernels/clip_math.h): grad_norm, the divisor the update takes as its grad_scale
  // (AMP's grad_scale / coef), found_out (1: skip the step: AMP's found_inf, a non-finite norm, a
  // spike over the window ring); the window records an applied step's norm.
  m.def(
      "clip_grad_norm_(Tensor[] grads, Tensor? grad_scale, Tensor? found_inf, Tensor(a!) ring, Tensor(b!) recorded, "
      "Tensor(c!) grad_norm, Tensor(d!) grad_scale_out, Tensor(e!) found_out, float max_norm, float ord, "
      "bool spike_skip, float spike_sigma) -> ()");
  // Test only: the CUDA kernel's grid (every block and thread) replayed on the CPU.
  m.def("adamw_step_grid_replay_" D2Z_STEP_ARGS);
  // Test only: dst.copy_(src) through the kernels' own float <-> bf16/fp16 conversions (CPU).
  m.def("_test_cast_(Tensor src, Tensor(a!) dst) -> ()");
  // Test only: dst = src (float32) rounded stochastically into dst's dtype with bits' low 16 bits
  // (int64), and out[e] = (sr_word(key, e), sr_second of it) for key = sr_key(seed, position,
  // tensor): the kernels' generator (CPU).
  m.def("_test_round_sr_(Tensor src, Tensor bits, Tensor(a!) dst) -> ()");
  m.def("_test_sr_words_(int seed, int position, int tensor, Tensor(a!) out) -> ()");
}

namespace d2z {
void bind_step_holders(pybind11::module_& m);
}

// `import d2z_optim._C` loads this library, which registers the ops above (reached through
// torch.ops.d2z), and gives the step holders and their StepRefused exception.
// The device code nvcc was asked for (setup.py passes -DD2Z_CUDA_CODE=sm_80,sm_90,compute_90 to a
// CUDA build): the arch gate compares it with a GPU's compute capability before choosing the kernel.
#define D2Z_STRINGIFY(...) #__VA_ARGS__
#define D2Z_STRING(...) D2Z_STRINGIFY(__VA_ARGS__)

PYBIND11_MODULE(_C, m) {
  m.doc() = "d2z:: ops (torch.ops.d2z) and the step holders";
  d2z::bind_step_holders(m);
#ifdef D2Z_CUDA_CODE
  m.def(
      "cuda_code", [] { return std::string(D2Z_STRING(D2Z_CUDA_CODE)); },
      "The CUDA device code this build holds, comma-separated (sm_XY: cubins, compute_XY: PTX)");
#else
  m.def("cuda_code", [] { return std::string(); }, "Empty: a build without the CUDA kernel");
#endif
}
