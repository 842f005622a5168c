// Whether a CPU tensor holds only finite values, for the kernels whose fast
// path would not propagate NaN/Inf as torch does.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace resnet_fused {

// A value is non-finite iff its exponent bits are all ones; integer ops keep the
// scan vectorized and memory bound.
template <typename Bits, Bits kExponent>
inline bool all_finite_bits(const at::Tensor& t) {
  const Bits* p = reinterpret_cast<const Bits*>(t.const_data_ptr());
  return at::parallel_reduce(
      0, t.numel(), 1 << 16, true,
      [&](int64_t begin, int64_t end, bool ok) {
        Bits bad = 0;
        for (int64_t i = begin; i < end; ++i) bad |= static_cast<Bits>((p[i] & kExponent) == kExponent);
        return ok && bad == 0;
      },
      [](bool a, bool b) { return a && b; });
}

// float32, bfloat16 or float64 (the CPU kernels' dtypes).
inline bool all_finite(const at::Tensor& t) {
  if (t.scalar_type() == at::kDouble) return at::isfinite(t).all().item<bool>();
  // Only the memory the tensor covers matters; a dense tensor is read as flat.
  const at::Tensor d = t.is_non_overlapping_and_dense() ? t : t.contiguous();
  return d.scalar_type() == at::kFloat ? all_finite_bits<uint32_t, 0x7f800000u>(d)
                                       : all_finite_bits<uint16_t, 0x7f80u>(d);
}

}  // namespace resnet_fused
