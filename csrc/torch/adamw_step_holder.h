// What a step holder's step() answers (d2z_optim.backends.contract.StepStatus mirrors it; a test
// reads this enum). A refusal by the op's checks is not a status: it raises StepRefused (a
// RuntimeError subclass carrying the op's message), with nothing written.
#pragma once

#include <cstdint>

namespace d2z {

enum class StepStatus : int64_t {
  kApplied = 0,           // the step ran (or was a no-op for a nonzero found_inf)
  kSkippedNonfinite = 1,  // skip_nonfinite found a NaN or an Inf in a gradient: a no-op
  kDeclined = 2,          // the holder's tensors no longer match (a parameter lost its gradient or
                          // changed size): nothing written; the caller steps through the op
};

}  // namespace d2z
