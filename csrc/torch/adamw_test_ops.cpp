// Test-only ops.
//
// d2z::adamw_step_grid_replay_: the CUDA launcher's metadata built on the host, then the CUDA
// kernels' per-thread bodies (csrc/kernels/adamw_cuda.cuh, compiled here by the host compiler) run
// for every block and every thread of both grids, in launch order. Numerically the device code:
// its multiply-adds are fused (std::fma) as on the GPU.
//
// d2z::_test_cast_: dst.copy_(src) through the kernels' own float <-> bf16/fp16 conversions.
// d2z::_test_round_sr_, d2z::_test_sr_words_: the stochastic rounding and its generator.
#include "adamw_worklist.h"

namespace d2z {
namespace {

void adamw_step_grid_replay(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                            const at::Tensor& step_count, const at::Tensor& lr_table, const at::Tensor& wd_table,
                            const at::Tensor& hparams, c10::IntArrayRef group_index, bool independent_wd,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            const std::optional<at::TensorList>& remainders) {
  const StepArgs a{params,      grads,          exp_avgs,   exp_avg_sqs, max_exp_avg_sqs,
                   steps,       step_count,     lr_table,   wd_table,    hparams,
                   group_index, independent_wd, grad_scale, found_inf,   remainder_list(remainders)};
  check_step_args(a, c10::DeviceType::CPU);
  check_amsgrad_states(a, hparams.data_ptr<double>());
  const WorkList list = make_work_list(a);
  std::vector<unsigned char> meta(list.bytes() + 16);
  list.pack(meta.data());
  replay_grid(make_launch_args(a, meta.data(), list.tensors.size()), static_cast<int64_t>(list.blocks.size()),
              list.has_f64);
}

template <int D>
void cast_to(const float* src, void* dst, int64_t n) {
  auto* out = static_cast<typename Storage<D>::type*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = Storage<D>::store(src[i]);
}

template <int D>
void cast_from(const void* src, float* dst, int64_t n) {
  const auto* in = static_cast<const typename Storage<D>::type*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<D>::load(in[i]);
}

void test_cast(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.numel() == dst.numel() && src.is_cpu() && dst.is_cpu(),
              "_test_cast_: contiguous CPU tensors of one size");
  TORCH_CHECK(src.scalar_type() == at::kFloat || dst.scalar_type() == at::kFloat, "_test_cast_: one side float32");
  const int64_t n = src.numel();
  if (src.scalar_type() == at::kFloat) {
    const float* s = src.data_ptr<float>();
    switch (dst.scalar_type()) {
      case at::kBFloat16:
        return cast_to<kBF16>(s, dst.data_ptr(), n);
      case at::kHalf:
        return cast_to<kF16>(s, dst.data_ptr(), n);
      default:
        return cast_to<kF32>(s, dst.data_ptr(), n);
    }
  }
  float* d = dst.data_ptr<float>();
  switch (src.scalar_type()) {
    case at::kBFloat16:
      return cast_from<kBF16>(src.data_ptr(), d, n);
    case at::kHalf:
      return cast_from<kF16>(src.data_ptr(), d, n);
    default:
      TORCH_CHECK(false, "_test_cast_: unsupported dtype ", src.scalar_type());
  }
}

void test_round_sr(const at::Tensor& src, const at::Tensor& bits, const at::Tensor& dst) {
  TORCH_CHECK(src.is_contiguous() && bits.is_contiguous() && dst.is_contiguous() && src.is_cpu() && dst.is_cpu() &&
                  bits.is_cpu() && src.numel() == dst.numel() && bits.numel() == src.numel(),
              "_test_round_sr_: contiguous CPU tensors of one size");
  TORCH_CHECK(src.scalar_type() == at::kFloat && bits.scalar_type() == at::kLong &&
                  (dst.scalar_type() == at::kBFloat16 || dst.scalar_type() == at::kHalf),
              "_test_round_sr_: float32 src, int64 bits, bfloat16 or float16 dst");
  const float* s = src.data_ptr<float>();
  const int64_t* r = bits.data_ptr<int64_t>();
  auto* out = static_cast<uint16_t*>(dst.data_ptr());
  const bool bf16 = dst.scalar_type() == at::kBFloat16;
  for (int64_t i = 0; i < src.numel(); ++i) {
    const uint32_t r16 = static_cast<uint32_t>(r[i]) & 0xffffu;
    out[i] = bf16 ? float_to_bf16_sr(s[i], r16) : float_to_f16_sr(s[i], r16);
  }
}

void test_sr_words(int64_t seed, int64_t position, int64_t tensor, const at::Tensor& out) {
  TORCH_CHECK(
      out.is_cpu() && out.is_contiguous() && out.scalar_type() == at::kLong && out.dim() == 2 && out.size(1) == 2,
      "_test_sr_words_: a contiguous int64 [n, 2] CPU tensor");
  const uint32_t key =
      sr_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(position), static_cast<uint32_t>(tensor));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t e = 0; e < out.size(0); ++e) {
    o[2 * e] = sr_word(key, e);
    o[2 * e + 1] = sr_second(sr_word(key, e));
  }
}

}  // namespace
}  // namespace d2z

TORCH_LIBRARY_IMPL(d2z, CPU, m) {
  m.impl("_test_round_sr_", &d2z::test_round_sr);
  m.impl("_test_sr_words_", &d2z::test_sr_words);
  m.impl("adamw_step_grid_replay_", &d2z::adamw_step_grid_replay);
  m.impl("_test_cast_", &d2z::test_cast);
}
TORCH_LIBRARY_IMPL(d2z, SparseCPU, m) { m.impl("adamw_step_grid_replay_", &d2z::adamw_step_grid_replay); }
