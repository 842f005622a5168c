// CPU all_finite: whether a tensor holds no NaN or Inf, as one bool. FusedResNet asks it of
// its input on every CPU forward, so that the kernels may skip their own scans
// (assume_finite). ATen's torch.isfinite(x.sum()) took ~0.2 ms of a ResNet-50 forward at
// batch 1 for the same answer (a reduction, a second op, a sync to Python); this is one
// memory-bound pass over the bits (cpu/finite.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/finite.h"

namespace resnet_fused {
namespace {

bool all_finite_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.is_floating_point(), "all_finite: expected a floating-point tensor, got ",
              input.scalar_type());
  switch (input.scalar_type()) {
    case at::kFloat:
    case at::kBFloat16:
    case at::kDouble:
      return all_finite(input);
    default:  // float16 and the 8-bit floats: rare here, exact through ATen
      return at::isfinite(input).all().item<bool>();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("all_finite", &all_finite_cpu); }

}  // namespace resnet_fused
