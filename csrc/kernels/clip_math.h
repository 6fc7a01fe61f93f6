// Clip-by-global-norm in C++: from the gradients' reduced norm to the step's decisions. Torch-free,
// host and device (the CPU op and holder, the CUDA clip kernel's last block, its grid replay).
// The same formulas as d2z_optim/grad_clip.py (finalize), which the torch backend uses:
//   norm  = sqrt(sum of squares) (ord 2) or max |g| (ord inf), times 1/grad_scale (AMP), float32
//   skip  = found_inf != 0 or norm not finite or (spike_skip and the window is full and
//           norm > mean + sigma * std of the window)   (std: Bessel-corrected, as torch.std)
//   coef  = min(1, (1 / (norm + 1e-6)) * max_norm) in float32: clip_grad_norm_'s
//           max_norm / (norm + 1e-6), which torch computes as a reciprocal and a product (a
//           Python number over a tensor); 1 when not clipping (max_norm <= 0)
//   grad_scale_out = (grad_scale or 1) / coef: the update kernels divide the gradients by it
//   the window records every finite norm of a step AMP did not skip, spikes included
//   (ring[recorded % window], recorded += 1): a window of applied steps only would never move
//   after a lasting rise of the norm, and every later step would be skipped
#pragma once

#include <cmath>
#include <cstdint>

#include "adamw_math.h"

namespace d2z {

struct ClipConfig {
  float max_norm;    // <= 0: no clipping (spike_skip alone)
  int32_t inf_norm;  // 1: ord inf (the partials are maxima), 0: ord 2 (sums of squares)
  int32_t spike;     // spike skip on
  float sigma;
  int64_t window;  // the ring's length
};

// The step's clipping tensors (float32 0-d unless said).
struct ClipTensors {
  const float* grad_scale;  // AMP's, nullptr when absent
  const float* found_inf;   // AMP's, nullptr when absent
  float* ring;              // [window]
  int64_t* recorded;        // norms recorded so far (int64 0-d)
  float* grad_norm;         // out: the pre-clip global norm
  float* grad_scale_out;    // out: what the update divides the gradients by
  float* found_out;         // out: 1 when the step is skipped
};

// Combine two partials of the reduction in a fixed order (a NaN wins a max).
D2Z_INLINE double combine_norm(double a, double b, bool inf_norm) {
  if (!inf_norm) return a + b;
  return (b > a || b != b) ? b : a;
}

// `total`: the reduction of every gradient element (sum of squares, or max |g|).
D2Z_HD inline void clip_finalize(double total, const ClipConfig& c, const ClipTensors& t) {
  float norm = static_cast<float>(c.inf_norm ? total : sqrt(total));
  if (t.grad_scale != nullptr) norm = norm * static_cast<float>(1.0 / static_cast<double>(*t.grad_scale));
  const bool amp = t.found_inf != nullptr && *t.found_inf != 0.0f;
  const bool finite = fabsf(norm) <= 3.402823466e38f;
  bool skip = amp || !finite;
  if (c.spike) {
    const int64_t w = c.window;
    if (*t.recorded >= w && !skip) {
      double mean = 0.0;
      for (int64_t i = 0; i < w; ++i) mean += static_cast<double>(t.ring[i]);
      mean /= static_cast<double>(w);
      double var = 0.0;
      for (int64_t i = 0; i < w; ++i) {
        const double d = static_cast<double>(t.ring[i]) - mean;
        var += d * d;
      }
      const double std_dev = sqrt(var / static_cast<double>(w - 1));
      skip = static_cast<double>(norm) > mean + static_cast<double>(c.sigma) * std_dev;
    }
    if (finite && !amp) {
      t.ring[*t.recorded % w] = norm;
      *t.recorded += 1;
    }
  }
  float coef = 1.0f;
  if (c.max_norm > 0.0f) {
    coef = (1.0f / (norm + static_cast<float>(1e-6))) * c.max_norm;
    coef = coef < 1.0f ? coef : 1.0f;
  }
  *t.grad_norm = norm;
  *t.found_out = skip ? 1.0f : 0.0f;
  *t.grad_scale_out = (t.grad_scale != nullptr ? *t.grad_scale : 1.0f) / coef;
}

}  // namespace d2z
