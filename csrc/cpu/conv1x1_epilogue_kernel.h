// conv1x1's epilogue written once on the vector type V (vec_avx2.h, vec_avx512.h);
// kernels_avx2.cpp and kernels_avx512.cpp instantiate it inside their ISA's target
// region. The sums run in the plain loop's order, so every ISA gives the same bits.
#pragma once

#include "cpu/conv1x1_epilogue.h"

namespace resnet_fused {
namespace conv1x1 {

// T: float, or uint16_t holding bfloat16 (where V loads and stores it).
template <class V, class T>
void epilogue(const float* c, const T* bias, const T* residual, T* out, int64_t rows, int64_t ld,
              bool relu) {
  constexpr int64_t kL = V::kLanes, kRegs = kPanel / kL;
  typename V::Reg b[kRegs];
  for (int64_t j = 0; j < kRegs; ++j) b[j] = bias ? V::load(bias + j * kL, kL) : V::zero();
  for (int64_t r = 0; r < rows; ++r) {
    const float* cr = c + r * kPanel;
    const T* res = residual ? residual + r * ld : nullptr;
    T* o = out + r * ld;
    for (int64_t j = 0; j < kRegs; ++j) {
      typename V::Reg v = V::add(V::load(cr + j * kL, kL), b[j]);
      if (res) v = V::add(v, V::load(res + j * kL, kL));
      if (relu) v = V::relu(v);
      V::store(o + j * kL, v, kL);
    }
  }
}

}  // namespace conv1x1
}  // namespace resnet_fused
