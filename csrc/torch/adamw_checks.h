// Argument checks of d2z::adamw_step_, shared by the CPU, grid-replay and CUDA implementations.
// Every check runs before anything is written.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "kernels/adamw_math.h"
#include "kernels/clip_math.h"

namespace d2z {

// The op's arguments, as the dispatcher hands them to a kernel.
struct StepArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  const at::Tensor& step_count;
  const at::Tensor& lr_table;
  const at::Tensor& wd_table;
  const at::Tensor& hparams;
  c10::IntArrayRef group_index;
  bool independent_wd;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  at::TensorList remainders = {};  // empty, or one per parameter (0 elements: none)
};

inline at::TensorList remainder_list(const std::optional<at::TensorList>& r) {
  return r.has_value() ? *r : at::TensorList();
}

// Parameter k's remainder, nullptr when it has none.
inline const at::Tensor* remainder_of(at::TensorList remainders, size_t k) {
  return remainders.empty() || remainders[k].numel() == 0 ? nullptr : &remainders[k];
}

inline Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kDouble:
      return kF64;
    default:
      return kF16;
  }
}

// Strided (dense) layout; cheaper than layout(), which is checked once per call per tensor.
inline bool is_dense(const at::Tensor& t) { return !t.is_sparse() && !t.is_sparse_csr() && !t.is_mkldnn(); }

// The elements fill one block of numel() elements starting at data_ptr() (contiguous, channels_last,
// any dense permutation): the kernels walk that block, so it is all they need.
inline bool fills_block(const at::Tensor& t) { return t.is_contiguous() || t.is_non_overlapping_and_dense(); }

// t stores its elements in the same order as p (strides of size-1 dims do not matter).
inline bool same_layout(const at::Tensor& t, const at::Tensor& p) {
  if (t.is_contiguous() && p.is_contiguous()) return true;
  if (!fills_block(t)) return false;
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (p.size(d) > 1 && t.stride(d) != p.stride(d)) return false;
  }
  return true;
}

inline void check_on(const at::Tensor& t, const at::Device& dev, const char* name, int64_t i) {
  TORCH_CHECK(t.device() == dev, "d2z::adamw_step_: ", name, "[", i, "] is on ", t.device(), " but the call is on ",
              dev, " (all tensors of one call must be on one device)");
}

inline void check_scalar(const at::Tensor& t, const at::Device& dev, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.layout() == at::kStrided, "d2z::adamw_step_: ", name, " must be a dense tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "d2z::adamw_step_: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1, "d2z::adamw_step_: ", name, " must have one element, got ", t.numel());
  TORCH_CHECK(t.device() == dev, "d2z::adamw_step_: ", name, " is on ", t.device(), " but the call is on ", dev);
}

// The call's tensors besides the per-parameter lists; `expected` is the device type of the
// implementation. Returns the device.
inline at::Device check_call_tensors(const at::Tensor& step_count, const at::Tensor& lr_table,
                                     const at::Tensor& wd_table, const at::Tensor& hparams,
                                     const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf, c10::DeviceType expected) {
  const at::Device dev = step_count.device();
  TORCH_CHECK(dev.type() == expected, "d2z::adamw_step_: step_count is on ", dev, ", this implementation runs on ",
              expected);
  check_scalar(step_count, dev, at::kLong, "step_count");
  for (const auto* tab : {&lr_table, &wd_table}) {
    const char* name = tab == &lr_table ? "lr_table" : "wd_table";
    TORCH_CHECK(tab->layout() == at::kStrided && tab->dim() == 1 && tab->scalar_type() == at::kFloat,
                "d2z::adamw_step_: ", name, " must be a 1-D float32 tensor, got ", tab->scalar_type(), " with ",
                tab->dim(), " dims");
    TORCH_CHECK(tab->numel() > 0, "d2z::adamw_step_: ", name, " is empty");
    TORCH_CHECK(tab->is_contiguous(), "d2z::adamw_step_: ", name, " must be contiguous");
    TORCH_CHECK(tab->device() == dev, "d2z::adamw_step_: ", name, " is on ", tab->device(), " but the call is on ",
                dev);
  }
  TORCH_CHECK(lr_table.numel() == wd_table.numel(), "d2z::adamw_step_: lr_table (", lr_table.numel(),
              ") and wd_table (", wd_table.numel(), ") must have the same length");
  TORCH_CHECK(hparams.layout() == at::kStrided && hparams.scalar_type() == at::kDouble && hparams.dim() == 2 &&
                  hparams.size(1) == kHpCols && hparams.is_contiguous(),
              "d2z::adamw_step_: hparams must be a contiguous float64 tensor [G, 8], got ", hparams.scalar_type(), " ",
              hparams.sizes());
  TORCH_CHECK(hparams.device() == dev, "d2z::adamw_step_: hparams is on ", hparams.device(), " but the call is on ",
              dev);
  if (grad_scale.has_value()) check_scalar(*grad_scale, dev, at::kFloat, "grad_scale");
  if (found_inf.has_value()) check_scalar(*found_inf, dev, at::kFloat, "found_inf");
  return dev;
}

inline bool is_lean_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// A moment's storage dtype: its parameter's, or for fp32/bf16/fp16 parameters any of those three.
inline bool moment_dtype_ok(at::ScalarType param, at::ScalarType moment) {
  return moment == param || (is_lean_dtype(param) && is_lean_dtype(moment));
}

// Parameter i of the call and its tensors. vmax: nullptr when the call has no max_exp_avg_sqs
// (an empty list); a 0-element placeholder when its group has no amsgrad.
inline void check_param(int64_t i, const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                        const at::Tensor* vmax, const at::Tensor& st, int64_t group, int64_t groups,
                        const at::Device& dev) {
  TORCH_CHECK(group >= 0 && group < groups, "d2z::adamw_step_: group_index[", i, "] = ", group,
              " is out of range for hparams with ", groups, " rows");
  TORCH_CHECK(is_dense(p), "d2z::adamw_step_: params[", i, "] must be a dense tensor");
  const auto dt = p.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "d2z::adamw_step_: params[", i, "] has dtype ", dt, "; supported: float32, bfloat16, float16, float64");
  check_on(p, dev, "params", i);
  TORCH_CHECK(fills_block(p), "d2z::adamw_step_: params[", i, "] is not dense (strides ", p.strides(),
              "): its elements must fill one block of memory, as contiguous and channels_last tensors do");
  struct Named {
    const at::Tensor* t;
    const char* name;
  };
  Named same[4] = {{&g, "grads"}, {&m, "exp_avgs"}, {&v, "exp_avg_sqs"}, {}};
  int n_same = 3;
  if (vmax != nullptr && vmax->numel() != 0) same[n_same++] = {vmax, "max_exp_avg_sqs"};
  for (int j = 0; j < n_same; ++j) {
    const Named& s = same[j];
    const at::Tensor& t = *s.t;
    TORCH_CHECK(t.defined(), "d2z::adamw_step_: ", s.name, "[", i, "] is undefined");
    TORCH_CHECK(is_dense(t), "d2z::adamw_step_: ", s.name, "[", i, "] is ", t.layout(),
                "; only dense (strided) tensors are supported");
    if (j == 0) {
      TORCH_CHECK(t.scalar_type() == dt, "d2z::adamw_step_: ", s.name, "[", i, "] has dtype ", t.scalar_type(),
                  " but params[", i, "] has ", dt);
    } else if (j == 3) {
      TORCH_CHECK(t.scalar_type() == v.scalar_type(), "d2z::adamw_step_: max_exp_avg_sqs[", i, "] has dtype ",
                  t.scalar_type(), " but exp_avg_sqs[", i, "] has ", v.scalar_type());
    } else {
      TORCH_CHECK(moment_dtype_ok(dt, t.scalar_type()), "d2z::adamw_step_: ", s.name, "[", i, "] has dtype ",
                  t.scalar_type(), " but params[", i, "] has ", dt,
                  " (a moment is stored in its parameter's dtype, or for float32/bfloat16/float16 parameters in "
                  "one of those three)");
    }
    TORCH_CHECK(t.sizes() == p.sizes(), "d2z::adamw_step_: ", s.name, "[", i, "] has shape ", t.sizes(), " but params[",
                i, "] has ", p.sizes());
    check_on(t, dev, s.name, i);
    TORCH_CHECK(same_layout(t, p), "d2z::adamw_step_: ", s.name, "[", i, "] has strides ", t.strides(), " but params[",
                i, "] has ", p.strides(), " (the tensors of a parameter must share its memory layout)");
  }
  if (vmax != nullptr) {
    TORCH_CHECK(is_dense(*vmax) && vmax->scalar_type() == v.scalar_type(), "d2z::adamw_step_: max_exp_avg_sqs[", i,
                "] must be a dense ", v.scalar_type(),
                " tensor, as exp_avg_sqs[i] (a 0-element placeholder when its group has no amsgrad)");
    check_on(*vmax, dev, "max_exp_avg_sqs", i);
  }
  TORCH_CHECK(is_dense(st) && st.scalar_type() == at::kFloat && st.numel() == 1, "d2z::adamw_step_: steps[", i,
              "] must be a float32 tensor with one element");
  check_on(st, dev, "steps", i);
}

// Parameter i's entry of remainders (a non-empty list): int16, 0 elements (none) or a bf16
// parameter's shape and memory layout, on its device.
inline void check_remainder(int64_t i, const at::Tensor& p, const at::Tensor& r, const at::Device& dev) {
  TORCH_CHECK(r.defined() && is_dense(r) && r.scalar_type() == at::kShort, "d2z::adamw_step_: remainders[", i,
              "] must be a dense int16 tensor (0 elements: none)");
  check_on(r, dev, "remainders", i);
  if (r.numel() == 0) return;
  TORCH_CHECK(p.scalar_type() == at::kBFloat16, "d2z::adamw_step_: remainders[", i, "] is given but params[", i,
              "] has dtype ", p.scalar_type(), " (a remainder completes a bfloat16 parameter)");
  TORCH_CHECK(r.sizes() == p.sizes(), "d2z::adamw_step_: remainders[", i, "] has shape ", r.sizes(), " but params[", i,
              "] has ", p.sizes());
  TORCH_CHECK(same_layout(r, p), "d2z::adamw_step_: remainders[", i, "] has strides ", r.strides(), " but params[", i,
              "] has ", p.strides(), " (the tensors of a parameter must share its memory layout)");
}

// Checks everything; `expected` is the device type of the implementation. Returns the device.
inline at::Device check_step_args(const StepArgs& a, c10::DeviceType expected) {
  const size_t n = a.params.size();
  auto same_len = [&](size_t len, const char* name) {
    TORCH_CHECK(len == n, "d2z::adamw_step_: ", name, " has ", len, " entries but params has ", n);
  };
  same_len(a.grads.size(), "grads");
  same_len(a.exp_avgs.size(), "exp_avgs");
  same_len(a.exp_avg_sqs.size(), "exp_avg_sqs");
  same_len(a.steps.size(), "steps");
  same_len(a.group_index.size(), "group_index");
  TORCH_CHECK(a.max_exp_avg_sqs.empty() || a.max_exp_avg_sqs.size() == n, "d2z::adamw_step_: max_exp_avg_sqs has ",
              a.max_exp_avg_sqs.size(), " entries: it must be empty or as long as params (", n, ")");
  TORCH_CHECK(a.remainders.empty() || a.remainders.size() == n, "d2z::adamw_step_: remainders has ",
              a.remainders.size(), " entries: it must be empty or as long as params (", n, ")");
  const at::Device dev =
      check_call_tensors(a.step_count, a.lr_table, a.wd_table, a.hparams, a.grad_scale, a.found_inf, expected);
  const int64_t groups = a.hparams.size(0);
  for (size_t k = 0; k < n; ++k) {
    const at::Tensor* vmax = a.max_exp_avg_sqs.empty() ? nullptr : &a.max_exp_avg_sqs[k];
    check_param(static_cast<int64_t>(k), a.params[k], a.grads[k], a.exp_avgs[k], a.exp_avg_sqs[k], vmax, a.steps[k],
                a.group_index[k], groups, dev);
    if (!a.remainders.empty()) check_remainder(static_cast<int64_t>(k), a.params[k], a.remainders[k], dev);
  }
  return dev;
}

// A check that needs the hparams values (CPU and grid replay only; on CUDA reading them would be
// a sync): parameter i in a group with amsgrad = 1 needs a full-size max_exp_avg_sqs entry.
inline void check_amsgrad_state(int64_t i, const at::Tensor& p, const at::Tensor* vmax, int64_t group,
                                const double* hp) {
  if (hp[group * kHpCols + kAmsgrad] == 0.0 || p.numel() == 0) return;
  TORCH_CHECK(vmax != nullptr && vmax->numel() == p.numel(), "d2z::adamw_step_: params[", i, "] is in group ", group,
              " with amsgrad = 1 but max_exp_avg_sqs[", i, "] is ",
              vmax == nullptr ? "missing (empty list)" : "a placeholder");
}

inline void check_amsgrad_states(const StepArgs& a, const double* hp) {
  for (size_t k = 0; k < a.params.size(); ++k) {
    const at::Tensor* vmax = a.max_exp_avg_sqs.empty() ? nullptr : &a.max_exp_avg_sqs[k];
    check_amsgrad_state(static_cast<int64_t>(k), a.params[k], vmax, a.group_index[k], hp);
  }
}

// The clipping tensors of a step (d2z::clip_grad_norm_, the step holders' clipped steps): all on
// `dev`; ring a contiguous 1-D float32 window of >= 2 norms, recorded int64 0-d, the rest float32
// 0-d. Returns the ClipTensors view of them (AMP's grad_scale / found_inf: nullptr when absent).
inline ClipTensors check_clip_tensors(const at::Device& dev, const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf, const at::Tensor& ring,
                                      const at::Tensor& recorded, const at::Tensor& grad_norm,
                                      const at::Tensor& grad_scale_out, const at::Tensor& found_out) {
  if (grad_scale.has_value()) check_scalar(*grad_scale, dev, at::kFloat, "grad_scale");
  if (found_inf.has_value()) check_scalar(*found_inf, dev, at::kFloat, "found_inf");
  TORCH_CHECK(ring.device() == dev && ring.scalar_type() == at::kFloat && ring.dim() == 1 && ring.numel() >= 2 &&
                  ring.is_contiguous(),
              "d2z::clip_grad_norm_: ring must be a contiguous 1-D float32 tensor of >= 2 norms on ", dev);
  check_scalar(recorded, dev, at::kLong, "recorded");
  check_scalar(grad_norm, dev, at::kFloat, "grad_norm");
  check_scalar(grad_scale_out, dev, at::kFloat, "grad_scale_out");
  check_scalar(found_out, dev, at::kFloat, "found_out");
  return {grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr,
          found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr,
          ring.data_ptr<float>(),
          recorded.data_ptr<int64_t>(),
          grad_norm.data_ptr<float>(),
          grad_scale_out.data_ptr<float>(),
          found_out.data_ptr<float>()};
}

inline ClipConfig clip_config(double max_norm, double ord, bool spike_skip, double spike_sigma,
                              const at::Tensor& ring) {
  TORCH_CHECK(ord == 2.0 || std::isinf(ord), "d2z::clip_grad_norm_: ord must be 2 or inf, got ", ord);
  return {static_cast<float>(max_norm), std::isinf(ord) ? 1 : 0, spike_skip ? 1 : 0, static_cast<float>(spike_sigma),
          ring.numel()};
}

}  // namespace d2z
